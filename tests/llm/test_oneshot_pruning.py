"""oneshot_pruning through the block pipeline: exact N:M / unstructured zeros in every block Linear, SparseGPT's
compensation beating magnitude, pruning combined with GPTQ keeping its zeros through save and load."""
import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.llm.modules import WeightOnlyLinear
from slimtorch.quantization.smoothquant.scales import linear_weight

from .tiny_models import TINY_MODELS, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def config(quantization=None, **pruning):
    inference = {"oneshot_pruning": {"enabled": True, **pruning}}
    if quantization is not None:
        inference["weight_only_quantization"] = {"enabled": True, **quantization}
    return {"compression_inference": inference}


def calibration(model, batches=8, length=64):
    return [random_tokens(model.config.vocab_size, 2, length, seed) for seed in range(batches)]


def block_weights(model):
    """name -> [out, in] float weight of every Linear/Conv1D/WeightOnlyLinear inside the blocks."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, WeightOnlyLinear):
            out[name] = m.dequantized_weight()
        elif (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and (".layers." in name or ".h." in name):
            out[name] = linear_weight(m)
    return out


def assert_n_m(weight, n, m, quantized=False):
    """At most n non-zeros in every group of m; exactly n unless int4 rounding made a kept weight 0 too."""
    groups = (weight.reshape(weight.shape[0], -1, m) != 0).sum(dim=2)
    assert bool((groups <= n).all())
    assert bool((groups == n).float().mean() > (0.9 if quantized else 0.999))


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_two_four_in_every_block_linear_and_nothing_else_changed(arch, method):
    model = TINY_MODELS[arch]()
    pruned = st.oneshot(model, config(method=method, pattern="2:4"), calibration(model, batches=4, length=64),
                        progress=False)
    weights = block_weights(pruned)
    assert weights and all(not isinstance(m, WeightOnlyLinear) for m in pruned.modules())
    for name, w in weights.items():
        assert_n_m(w, 2, 4)
    float_params = dict(model.named_parameters())
    for name, p in pruned.named_parameters():  # embeddings, norms and lm_head untouched
        if not any(name.startswith(layer + ".") for layer in weights):
            assert torch.equal(p, float_params[name]), name
    report = st.quantization_report(pruned)
    assert report.mode == "one-shot pruning" and all(f"pruned 2:4 ({method})" == q.scheme for q in report.quantized)


def test_unstructured_dense_ratio_and_four_eight():
    model = TINY_MODELS["llama"]()
    half = st.oneshot(model, config(dense_ratio=0.5), calibration(model), progress=False)
    for w in block_weights(half).values():
        assert bool(((w == 0).sum(dim=1) == w.shape[1] // 2).all())
    four_eight = st.oneshot(model, config(pattern="4:8"), calibration(model), progress=False)
    for w in block_weights(four_eight).values():
        assert_n_m(w, 4, 8)


def _logit_error(reference, model, ids):
    with torch.no_grad():
        ref, out = reference(input_ids=ids).logits, model(input_ids=ids).logits
    return float(((out - ref) ** 2).mean() / (ref ** 2).mean())


def test_sparsegpt_loses_less_than_magnitude_on_held_out_tokens():
    model = TINY_MODELS["llama"]()
    held_out = random_tokens(model.config.vocab_size, 4, 64, seed=99)
    errors = {m: _logit_error(model, st.oneshot(model, config(method=m, pattern="2:4"), calibration(model),
                                                progress=False), held_out) for m in ("sparsegpt", "magnitude")}
    # random weights and tokens leave little for the compensation to exploit; SmolLM2's numbers are in BENCHMARKS.md
    assert errors["sparsegpt"] < 0.9 * errors["magnitude"], errors


def test_pruned_then_gptq_keeps_exact_zeros_through_save_and_load(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = TINY_MODELS["llama"]()
    cfg = config(quantization={"algorithm": "gptq", "group_size": 32}, pattern="2:4")
    q_model = st.oneshot(model, cfg, calibration(model), progress=False)
    layers = {n: m for n, m in q_model.named_modules() if isinstance(m, WeightOnlyLinear)}
    assert len(layers) == 14
    for layer in layers.values():
        assert_n_m(layer.dequantized_weight(), 2, 4, quantized=True)
    schemes = [q.scheme for q in st.quantization_report(q_model).quantized]
    assert all(s.startswith("pruned 2:4 (sparsegpt) + w int4") for s in schemes), schemes

    st.save_compressed(q_model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = random_tokens(model.config.vocab_size, 1, 16, seed=5)
    with torch.no_grad():  # compressed-tensors decompresses the weights on the first forward
        torch.testing.assert_close(loaded(input_ids=ids).logits, q_model(input_ids=ids).logits, rtol=0, atol=1e-5)
    for name, layer in layers.items():
        w = loaded.get_submodule(name).weight
        assert torch.equal(w == 0, layer.dequantized_weight() == 0), name  # the same zeros, 2:4 kept
        assert_n_m(w, 2, 4, quantized=True)


def test_each_section_excludes_its_own_layers():
    model = TINY_MODELS["llama"]()
    cfg = config(quantization={"algorithm": "rtn", "group_size": 32, "excluded_modules": ["mlp"]}, pattern="2:4",
                 excluded_modules=["self_attn"])
    q_model = st.oneshot(model, cfg, calibration(model), progress=False)
    attn = q_model.model.layers[0].self_attn.q_proj
    mlp = q_model.model.layers[0].mlp.down_proj
    assert isinstance(attn, WeightOnlyLinear)
    assert float((attn.dequantized_weight() == 0).float().mean()) < 0.25  # only int4 rounding zeros, not 2:4
    assert isinstance(mlp, nn.Linear)
    assert_n_m(mlp.weight, 2, 4)


def test_config_mistakes_are_errors():
    model = TINY_MODELS["llama"]()
    with pytest.raises(st.ConfigError, match="call slimtorch.compress"):
        st.quantize(model, config(pattern="2:4"), calib_dataloader=calibration(model))
    with pytest.raises(st.ConfigError, match="N:M pattern .* or as an unstructured dense_ratio"):
        st.oneshot(model, config(), calibration(model), progress=False)
    with pytest.raises(st.ConfigError, match=r"oneshot_pruning\.pattern for model\.layers\.0\.self_attn\.q_proj: "
                                             r"in_features 128 is not a multiple of 3"):
        st.oneshot(model, config(pattern="2:3"), calibration(model), progress=False)


def test_ffn_units_pruned_one_shot_then_slimmed_save_with_the_new_width(tmp_path):
    """oneshot_pruning 'channelx1' on the down projections removes a quarter of every FFN's units (structured OBS
    on the calibration inputs); slim() cuts them (gate/up rows with them) and saves with intermediate_size 192."""
    from transformers import LlamaForCausalLM

    model = TINY_MODELS["llama"]().eval()
    calib = [random_tokens(model.config.vocab_size, 2, 64, seed) for seed in range(8)]
    cfg = {"compression_inference": {"oneshot_pruning": {
        "enabled": True, "pattern": "channelx1", "dense_ratio": 0.75, "modules": ["mlp.down_proj"]}}}
    pruned = st.oneshot(model, cfg, calib, progress=False)
    assert all(int((layer.mlp.down_proj.weight == 0).all(dim=0).sum()) == 64 for layer in pruned.model.layers)
    assert torch.equal(pruned.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)
    ids = random_tokens(model.config.vocab_size, 2, 16, seed=50)
    small = st.slim(pruned, {"input_ids": ids, "use_cache": False}, measure_latency=False)
    assert st.save_slim(small, tmp_path) == "transformers"
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.intermediate_size == 192
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pruned(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("section, key", [
    ({"pattern": "channelx1", "modules": ["mlp.down_proj"]}, "dense_ratio"),
    ({"pattern": "channelx1", "dense_ratio": 0.75}, "modules"),
    ({"pattern": "4x1", "dense_ratio": 0.5}, "pattern"),
])
def test_column_pruning_config_mistakes_name_the_key(section, key):
    with pytest.raises(st.ConfigError, match=f"oneshot_pruning.{key}"):
        st.load_config({"compression_inference": {"oneshot_pruning": {"enabled": True, **section}}})
