"""slimtorch.save / slimtorch.load: one pair for every post-training result, each format read back to the same
tensors and outputs; the older functions read what save() wrote."""
import copy

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.llm.modules import WeightOnlyLinear
from slimtorch.quantization.qdq import QDQLinear
from slimtorch.saving import QDQ_MANIFEST, QDQ_WEIGHTS

from .llm.tiny_models import random_tokens, tiny_llama
from .test_compress import PRUNE_2_4, RTN_G32, bert_batches, inference, same_state, tiny_bert


def test_encoder_qdq_round_trip_builds_the_architecture_from_the_saved_config(tmp_path):
    q = st.compress(tiny_bert(), inference(oneshot_pruning=PRUNE_2_4, static_quantization={"enabled": True}),
                    bert_batches(), progress=False)
    assert st.save(q, tmp_path / "q") == tmp_path / "q"
    assert (tmp_path / "q" / QDQ_MANIFEST).is_file() and (tmp_path / "q" / "config.json").is_file()
    loaded = st.load(tmp_path / "q")
    assert same_state(loaded, q) and isinstance(loaded.encoder.layer[0].output.dense, QDQLinear)
    batch = bert_batches(1, seed=7)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, q.eval()(**batch).last_hidden_state)
    other = tiny_bert(seed=1)  # any float instance of the architecture: its weights are replaced, it is not changed
    before = copy.deepcopy(other)
    assert same_state(st.load(tmp_path / "q", model=other), q) and same_state(other, before)
    old = st.load_quantized(tiny_bert(seed=2), tmp_path / "q" / QDQ_WEIGHTS)  # the older function reads it
    assert same_state(old, q)


def test_plain_module_qdq_needs_its_architecture(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    q = st.compress(model, inference(dynamic_quantization={"enabled": True}), progress=False)
    st.save(q, tmp_path)
    with pytest.raises(st.SlimtorchError, match=r"plain PyTorch model: .*slimtorch.load\(directory, model=...\)"):
        st.load(tmp_path)
    assert same_state(st.load(tmp_path, model), q)


def test_llm_round_trips_in_compressed_tensors_and_pruned_float_in_transformers_format(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import LlamaForCausalLM

    llm = tiny_llama()
    q = st.compress(llm, inference(weight_only_quantization=RTN_G32), progress=False)
    st.save(q, tmp_path / "w4")
    loaded = st.load(tmp_path / "w4")
    layer, saved = loaded.model.layers[0].mlp.down_proj, q.model.layers[0].mlp.down_proj
    assert isinstance(layer, WeightOnlyLinear) and torch.equal(layer.weight_int, saved.weight_int)
    tokens = random_tokens(512, 1, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, q(tokens).logits)
    assert same_state(st.load_compressed(tmp_path / "w4"), loaded)  # the older function reads it too

    pruned = st.compress(llm, inference(oneshot_pruning={"enabled": True, "method": "magnitude", "pattern": "2:4"}),
                         progress=False)
    st.save(pruned, tmp_path / "pruned")
    assert same_state(st.load(tmp_path / "pruned"), pruned)
    assert same_state(LlamaForCausalLM.from_pretrained(tmp_path / "pruned"), pruned)  # plain transformers


def test_load_of_a_directory_save_did_not_write_is_an_error(tmp_path):
    with pytest.raises(st.StateDictError, match="holds none of what slimtorch.save writes"):
        st.load(tmp_path)
    with pytest.raises(st.StateDictError, match="is not a directory"):
        st.load(tmp_path / "missing")
