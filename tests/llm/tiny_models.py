"""Tiny random-init causal LMs built from transformers configs (nothing downloaded), seeded, for fast tests.

Every builder returns a fresh model in eval mode, the same weights for the same ``seed``; a forward on [2, 32]
tokens takes milliseconds. Dropout is off everywhere, so train and eval mode compute the same thing.

Widths: every Linear's input width (hidden 128, intermediate 256, heads x head_dim 128 or 256) is divisible by
32 and by 64, so weight groups of 32 and 64 fit every layer of every model in ``TINY_MODELS``. The odd one out,
``tiny_llama_hidden_96`` (hidden 96: divisible by 32, not by 64), is kept out of ``TINY_MODELS`` so that
parametrized tests do not pick it up; it is for "group size does not divide the width" errors.

| name    | class               | what it exercises                                                         |
|---------|---------------------|---------------------------------------------------------------------------|
| llama   | LlamaForCausalLM    | GQA (4 query heads, 2 KV heads), RoPE, RMSNorm, SwiGLU, tied lm_head      |
| qwen2   | Qwen2ForCausalLM    | q/k/v biases, GQA, untied lm_head                                         |
| qwen3   | Qwen3ForCausalLM    | q/k RMSNorm, head_dim 64 != hidden / heads (q_proj 128 -> 256)            |
| gemma3  | Gemma3ForCausalLM   | text-only Gemma3: sliding (window 16) + full attention layers, GeGLU,     |
|         |                     | scaled embeddings, pre/post-norms, tied lm_head                           |
| gpt2    | GPT2LMHeadModel     | Conv1D layers (weight stored [in, out]), fused c_attn, learned positions  |
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

VOCAB = 512
HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
MAX_POSITIONS = 256


def _build(config_class, model_class, seed: int, settings: dict, overrides: dict):
    """``model_class(config_class(**settings, **overrides))`` (overrides win) with weights drawn from ``seed``,
    leaving the global RNG as it was."""
    config = config_class(**{**settings, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


_COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
               attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(LlamaConfig, LlamaForCausalLM, seed, dict(_COMMON, head_dim=32, tie_word_embeddings=True),
                  overrides)


def tiny_qwen2(seed: int = 0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(Qwen2Config, Qwen2ForCausalLM, seed,
                  dict(_COMMON, tie_word_embeddings=False, use_sliding_window=False), overrides)


def tiny_qwen3(seed: int = 0, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(Qwen3Config, Qwen3ForCausalLM, seed,
                  dict(_COMMON, head_dim=64, tie_word_embeddings=False, use_sliding_window=False), overrides)


def tiny_gemma3(seed: int = 0, **overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    settings = dict(_COMMON, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
    return _build(Gemma3TextConfig, Gemma3ForCausalLM, seed, settings, overrides)


def tiny_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    settings = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=MAX_POSITIONS,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return _build(GPT2Config, GPT2LMHeadModel, seed, settings, overrides)


def tiny_llama_hidden_96(seed: int = 0, **overrides):
    """Llama with hidden 96 (3 heads of 32) and intermediate 192: groups of 32 fit, groups of 64 do not."""
    return tiny_llama(seed, **{"hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 3,
                               "num_key_value_heads": 1, **overrides})


#: the tiny models whose every Linear width is divisible by 32 and 64 (parametrize tests over these)
TINY_MODELS: Dict[str, Callable[..., torch.nn.Module]] = {
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
    "qwen3": tiny_qwen3,
    "gemma3": tiny_gemma3,
    "gpt2": tiny_gpt2,
}


def random_tokens(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """[batch, length] int64 token ids uniform in [0, vocab), from their own generator seeded with ``seed``."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


#: Llama state_dict names -> GGUF tensor names (llama.cpp's naming, which transformers' GGUF loader maps back)
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _rope_rows_for_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter reorders each q/k head's rows for its rotary layout; transformers undoes it on load."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, weight.shape[1]).transpose(1, 2).reshape(
        weight.shape)


def write_llama_gguf(model, path) -> None:
    """Write a (tiny) transformers Llama as a float32 GGUF file with the ``gguf`` package, so that
    ``from_pretrained(dir, gguf_file=name)`` loads the same weights (no tokenizer is written: the model needs none)."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_embedding_length(c.hidden_size)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    state = model.state_dict()
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    for i in range(c.num_hidden_layers):
        for ours, theirs in _GGUF_NAMES.items():
            weight = state[f"model.layers.{i}.{ours}.weight"]
            if theirs in ("attn_q", "attn_k"):
                heads = c.num_attention_heads if theirs == "attn_q" else c.num_key_value_heads
                weight = _rope_rows_for_gguf(weight, heads)
            writer.add_tensor(f"blk.{i}.{theirs}.weight", weight.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
