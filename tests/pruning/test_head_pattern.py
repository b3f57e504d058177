"""The "head" pattern: whole attention heads (GQA: a key/value head with its query heads) of an output projection,
the width read from the model; pruned during training, then cut by slim()."""
import pytest
import torch

import slimtorch as st
from slimtorch import ConfigError, PatternShapeError
from slimtorch.config import HeadPattern, parse_pattern
from tests.llm.tiny_models import TINY_MODELS, random_tokens
from tests.reference import protocol as P


def head_config(modules, dense_ratio=0.5, **shared):
    base = {"enabled": True, "method": "snip_momentum", "scope": "local", "start_step": 0, "end_step": 4,
            "frequency": 2, **shared}
    return {"compression_training": {"sparse_pruning": {"shared_parameters": base, "different_groups": {
        "heads": {"params": {"pattern": "head", "dense_ratio": dense_ratio}, "modules": modules}}}}}


def test_head_parses_and_is_refused_where_it_cannot_mean_anything():
    assert isinstance(parse_pattern("head"), HeadPattern) and isinstance(parse_pattern(" Head "), HeadPattern)
    with pytest.raises(ConfigError, match="one-shot pruning takes an N:M pattern"):
        st.load_config({"compression_inference": {"oneshot_pruning": {"enabled": True, "pattern": "head"}}})


def test_bert_heads_are_pruned_whole_and_slimmed():
    model = P.tiny_bert(0)
    opt = torch.optim.SGD(model.parameters(), lr=P.LR)
    cb = st.prepare_pruning(model, head_config(["attention\\.output\\.dense"]), optimizer=opt)
    assert {str(l.target.settings.pattern) for l in cb.pruner.layers} == {"head (16 columns)"}  # 4 heads of 16
    P.train(model, opt, P.batches(0))
    cb.finalize()
    for layer in model.bert.encoder.layer:
        zero_heads = (layer.attention.output.dense.weight == 0).reshape(64, 4, 16).all(dim=(0, 2))
        assert int(zero_heads.sum()) == 2
        assert ((layer.attention.output.dense.weight != 0).reshape(64, 4, 16).any(dim=(0, 2)) == ~zero_heads).all()
    model.eval()
    inputs = {k: v for k, v in P.batches(0)[0].items() if k != "labels"}
    small = st.slim(model, inputs, measure_latency=False)
    assert all(layer.attention.self.num_attention_heads == 2 for layer in small.bert.encoder.layer)
    assert st.slim_report(small).max_relative_difference <= 1e-5


def test_gqa_units_are_a_key_value_head_with_its_query_heads():
    model = TINY_MODELS["llama"]().train()  # 4 query heads, 2 key/value heads of 32: a unit is 64 columns
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cb = st.prepare_pruning(model, head_config(["o_proj"]), optimizer=opt)
    assert {str(l.target.settings.pattern) for l in cb.pruner.layers} == {"head (64 columns)"}
    for step in range(6):
        ids = random_tokens(model.config.vocab_size, 2, 10, step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    cb.finalize()
    model.eval()
    inputs = {"input_ids": random_tokens(model.config.vocab_size, 2, 10, 99), "use_cache": False}
    small = st.slim(model, inputs, measure_latency=False)
    att = small.model.layers[0].self_attn
    assert (att.q_proj.out_features, att.k_proj.out_features, att.o_proj.in_features) == (64, 32, 64)
    assert st.slim_report(small).max_relative_difference <= 1e-5


def test_head_on_a_layer_that_does_not_read_heads_names_it():
    model = TINY_MODELS["llama"]()
    with pytest.raises(PatternShapeError, match=r"different_groups\.heads\.pattern: 'head' on "
                                                r"'model\.layers\.0\.mlp\.down_proj' .* does not read the heads"):
        st.prepare_pruning(model, head_config(["down_proj"]))
    with pytest.raises(PatternShapeError, match=r"'head' on 'bert\.encoder\.layer\.0\.intermediate\.dense' .* no "
                                                r"attention module with a head count"):
        st.prepare_pruning(P.tiny_bert(0), head_config(["intermediate\\.dense"]))
