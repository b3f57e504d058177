"""Which layers a config prunes: default targets, group matching and the errors that need a model.

Conventions: every Linear / Conv1d / Conv2d / Conv1D is a default target except the last supported layer (the
head) and layers whose weight is tied to an embedding; module patterns are ``re.search``-ed against full dotted
names (and their ancestors); ``excluded_modules`` wins; a layer two groups claim is an error; a layer that does
not fit its pattern is skipped with the reason, unless the user named it exactly (PatternShapeError).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtorch import ConfigError, PatternShapeError, prepare_pruning, sparsity_report
from slimtorch.config import NMPattern

SP = "compression_training.sparse_pruning"


def config(groups=None, **shared):
    params = {"enabled": True, "method": "magnitude", "pattern": "4x1", "dense_ratio": 0.5,
              "start_step": 0, "end_step": 0}
    params.update(shared)
    params = {k: v for k, v in params.items() if v is not None}  # None: leave the key out
    section = {"shared_parameters": params}
    if groups is not None:
        section["different_groups"] = groups
    return {"compression_training": {"sparse_pruning": section}}


class SelfAttention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)


class Layer(nn.Module):
    def __init__(self, d=16, ff=32):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = SelfAttention(d)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(d, d)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, ff)
        self.output = nn.Module()
        self.output.dense = nn.Linear(ff, d)


class TinyBert(nn.Module):
    """BERT's module names at toy size: embeddings, encoder.layer.N.{attention.self.*, ...}, pooler, classifier."""

    def __init__(self, layers=2, d=16):
        super().__init__()
        self.embeddings = nn.Embedding(50, d)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(d) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, 4)


def names(n_layers=2, *parts):
    return [f"encoder.layer.{i}.{p}" for i in range(n_layers) for p in parts]


ATTN = ("attention.self.query", "attention.self.key", "attention.self.value")
ALL_BODY = ATTN + ("attention.output.dense", "intermediate.dense", "output.dense")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def left_out(cb):
    return {lo.name: lo.reason for lo in cb.plan.left_out}


# ---------------------------------------------------------------------------------------- default targets
def test_default_targets_leave_the_head_dense():
    model = TinyBert()
    cb = prepare_pruning(model, config())
    assert cb.layers == names(2, *ALL_BODY) + ["pooler"]
    assert list(left_out(cb)) == ["classifier"]
    assert left_out(cb)["classifier"].startswith("output head: last supported layer")
    assert all(t.group is None and t.layout == "linear" for t in cb.plan.layers)
    row = sparsity_report(model)["classifier"]
    assert row.pattern is None and row.note.startswith("output head")


def test_head_named_exactly_is_pruned_but_a_loose_pattern_does_not_select_it():
    cb = prepare_pruning(TinyBert(), config({"head": {"modules": ["classifier"]}}))
    assert "classifier" in cb.layers and left_out(cb) == {}
    cb = prepare_pruning(TinyBert(), config({"head": {"modules": ["^classifier$"]}}))
    assert "classifier" in cb.layers  # an anchored regex is an exact name too


def test_group_that_selects_only_the_head_is_an_error():
    with pytest.raises(ConfigError) as info:
        prepare_pruning(TinyBert(), config({"head": {"params": {"dense_ratio": 0.75}, "modules": ["classif"]}}))
    message = str(info.value)
    assert f"{SP}.different_groups.head.modules: the group selects no layer to prune" in message
    assert "classifier: output head" in message


class TiedLM(nn.Module):
    """A decoder tied to the embedding, registered before the real head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.body = nn.Linear(16, 16)
        self.decoder = nn.Linear(16, 32, bias=False)
        self.decoder.weight = self.embed.weight
        self.score = nn.Linear(32, 1)


def test_layer_tied_to_an_embedding_is_left_out():
    model = TiedLM()
    cb = prepare_pruning(model, config())
    assert cb.layers == ["body"]
    assert left_out(cb)["decoder"].startswith("weight tied to an embedding")
    assert left_out(cb)["score"].startswith("output head")
    assert sparsity_report(model)["decoder"].note.startswith("weight tied to an embedding")


def test_embeddings_are_never_targets():
    cb = prepare_pruning(TinyBert(), config())
    assert not any("embeddings" in n for n in cb.layers + list(left_out(cb)))


# ------------------------------------------------------------------------------------------- group matching
def test_rfc_group_selects_attention_self_by_substring():
    cb = prepare_pruning(TinyBert(), config({"sp1": {"params": {"dense_ratio": 0.75}, "modules": ["attention.self"]}},
                                            dense_ratio=0.1))
    by_name = {t.name: t for t in cb.plan.layers}
    for name in names(2, *ATTN):
        assert by_name[name].group == "sp1" and by_name[name].settings.dense_ratio == 0.75
    for name in names(2, "attention.output.dense", "intermediate.dense", "output.dense"):
        assert by_name[name].group is None and by_name[name].settings.dense_ratio == 0.1


def test_excluded_modules_win_over_groups():
    cb = prepare_pruning(TinyBert(), config({"sp1": {"modules": ["attention.self"]}},
                                            excluded_modules=[r"layer\.0\.", "pooler"]))
    reasons = left_out(cb)
    for name in [f"encoder.layer.0.{p}" for p in ALL_BODY]:
        assert reasons[name] == "excluded_modules[0] 'layer\\\\.0\\\\.'"
    assert reasons["pooler"] == "excluded_modules[1] 'pooler'"
    assert {t.name for t in cb.plan.layers if t.group == "sp1"} == {f"encoder.layer.1.{p}" for p in ATTN}


def test_excluded_modules_win_even_over_an_exact_name():
    with pytest.raises(ConfigError, match=r"different_groups\.sp1\.modules: the group selects no layer to prune "
                                          r"\(pooler: excluded_modules\[0\] 'pooler'\)"):
        prepare_pruning(TinyBert(), config({"sp1": {"modules": ["pooler"]}}, excluded_modules=["pooler"]))


def test_two_groups_claiming_a_layer_name_both():
    groups = {"attn": {"modules": ["attention"]}, "selfs": {"modules": ["self.query"]}}
    with pytest.raises(ConfigError) as info:
        prepare_pruning(TinyBert(), config(groups))
    message = str(info.value)
    assert f"{SP}.different_groups: layer 'encoder.layer.0.attention.self.query'" in message
    assert "'attn'" in message and "'selfs'" in message


@pytest.mark.parametrize("where,cfg,closest", [
    ("different_groups.sp1.modules[0]", config({"sp1": {"modules": ["atention.self"]}}), "attention.self"),
    ("different_groups.sp1.modules[1]", config({"sp1": {"modules": ["query", "intermediat.dense"]}}),
     "intermediate.dense"),
    ("shared_parameters.modules[0]", config(modules=["poolr"]), "pooler"),
])
def test_pattern_matching_nothing_names_closest_modules(where, cfg, closest):
    with pytest.raises(ConfigError) as info:
        prepare_pruning(TinyBert(), cfg)
    message = str(info.value)
    assert f"{SP}.{where}:" in message and "matches no module of the model" in message
    assert "closest module names:" in message and closest in message.split("closest module names:")[1]


def test_exclusion_matching_nothing_only_warns():
    # DeepSpeed's stock exclusions (e.g. "pooler") must not break a config on a model without that module
    with pytest.warns(UserWarning, match=r"excluded_modules\[0\]: 'clasifier' matches no module.*classifier"):
        cb = prepare_pruning(TinyBert(), config(excluded_modules=["clasifier"]))
    assert cb.layers


def test_pattern_far_from_everything_shows_example_names():
    with pytest.raises(ConfigError, match=r"'zzzz' matches no module of the model; module names look like: "
                                          r"embeddings, encoder, encoder\.layer"):
        prepare_pruning(TinyBert(), config({"sp1": {"modules": ["zzzz"]}}))


# ------------------------------------------------------------------------------------- shapes that don't fit
class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.odd = nn.Linear(16, 6)  # 6 rows: no 4x1 blocks
        self.b = nn.Linear(6, 16)
        self.head = nn.Linear(16, 2)


def test_exactly_named_layer_that_does_not_fit_is_pattern_shape_error():
    assert issubclass(PatternShapeError, ConfigError)
    with pytest.raises(PatternShapeError) as info:
        prepare_pruning(Odd(), config({"g": {"modules": ["odd", "a"]}}))
    message = str(info.value)
    assert f"{SP}.different_groups.g.modules: layer 'odd' (weight (6, 16)) cannot hold its pattern" in message
    assert "6 output channels are not a multiple of the block height 4 of '4x1'" in message


def test_loosely_matched_layer_that_does_not_fit_is_skipped_with_reason():
    model = Odd()
    cb = prepare_pruning(model, config({"g": {"modules": ["a", "od"]}}))
    assert cb.layers == ["a", "b"]
    assert [t.group for t in cb.plan.layers] == ["g", None]
    reason = left_out(cb)["odd"]
    assert reason == "shape does not fit: 6 output channels are not a multiple of the block height 4 of '4x1'"
    assert sparsity_report(model)["odd"].note == reason


def test_anchored_exact_name_that_does_not_fit_is_pattern_shape_error():
    with pytest.raises(PatternShapeError):
        prepare_pruning(Odd(), config({"g": {"modules": ["^odd$", "a"]}}))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(8, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 32, 1)
        self.seq = nn.Conv1d(8, 8, 3)
        self.fc = nn.Linear(32, 10)


def test_depthwise_conv_under_2_4_is_skipped_and_reported():
    model = ConvNet()
    cb = prepare_pruning(model, config(pattern="2:4"))
    assert cb.layers == ["stem", "pointwise", "seq"]
    assert all(t.layout == "conv" for t in cb.plan.layers)
    assert {t.name: t.in_per_group for t in cb.plan.layers} == {"stem": 8, "pointwise": 16, "seq": 8}
    reason = "shape does not fit: 1 input channels (per group) are not a multiple of M=4 of '2:4'"
    assert left_out(cb)["depthwise"] == reason
    report = sparsity_report(model)
    row = report["depthwise"]
    assert row.pattern is None and row.pattern_valid is None and row.note == reason
    assert reason in str(report)
    # prune once and check that groups of 4 run along input channels at a fixed kernel position
    cb.on_train_begin()
    cb.on_before_optimizer_step()
    cb.on_after_optimizer_step()
    w = model.stem.weight.detach()  # [out, in, kh, kw]
    assert ((w.movedim(1, -1).reshape(-1, 4) != 0).sum(1) <= 2).all()
    assert sparsity_report(model)["stem"].pattern_valid is True
    assert torch.count_nonzero(model.depthwise.weight) == model.depthwise.weight.numel()


def test_depthwise_conv_named_exactly_under_2_4_is_an_error():
    with pytest.raises(PatternShapeError, match=r"layer 'depthwise' \(weight \(16, 1, 3, 3\)\) cannot hold"):
        prepare_pruning(ConvNet(), config({"dw": {"params": {"pattern": "2:4"}, "modules": ["depthwise"]}}))


# ---------------------------------------------------------------------------------- transformers GPT-2 Conv1D
@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    return transformers, cfg


GPT2_CONV1D = [f"h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_gpt2_lm_head_model_targets_conv1d_transposed_and_leaves_tied_head(gpt2):
    transformers, cfg = gpt2
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    cb = prepare_pruning(model, config(pattern="2:4"))
    assert cb.layers == [f"transformer.{n}" for n in GPT2_CONV1D]
    assert left_out(cb) == {"lm_head": left_out(cb)["lm_head"]}
    assert left_out(cb)["lm_head"].startswith("weight tied to an embedding")
    for t in cb.plan.layers:
        assert type(t.module).__name__ == "Conv1D"
        assert t.layout == "transposed" and t.in_per_group == t.module.weight.shape[0]  # Conv1D stores [in, out]
    cb.on_train_begin()
    cb.on_before_optimizer_step()
    cb.on_after_optimizer_step()
    w = model.transformer.h[0].attn.c_attn.weight.detach()  # [in=32, out=96]
    assert ((w.t().reshape(-1, 4) != 0).sum(1) <= 2).all()  # 2:4 along the input dimension
    assert ((w.reshape(-1, 4) != 0).sum(1) > 2).any()  # and not along the stored rows
    assert all(r.pattern_valid for r in sparsity_report(model).pruned)
    assert torch.count_nonzero(model.transformer.wte.weight) == model.transformer.wte.weight.numel()


def test_gpt2_model_without_head_leaves_its_last_conv1d_dense(gpt2):
    """No LM head: by the 'last supported layer' rule the final mlp.c_proj is treated as the head."""
    transformers, cfg = gpt2
    model = transformers.GPT2Model(cfg)
    cb = prepare_pruning(model, config({"attn": {"params": {"dense_ratio": 0.75}, "modules": [r"attn\."]}}))
    assert cb.layers == GPT2_CONV1D[:-1]
    assert left_out(cb)["h.1.mlp.c_proj"].startswith("output head")
    groups = {t.name: t.group for t in cb.plan.layers}
    assert groups["h.0.attn.c_attn"] == "attn" and groups["h.0.mlp.c_fc"] is None
    cb = prepare_pruning(transformers.GPT2Model(cfg), config({"last": {"modules": ["h.1.mlp.c_proj"]}}))
    assert cb.layers[-1] == "h.1.mlp.c_proj"


def test_settings_resolved_per_layer():
    model = TinyBert()
    cb = prepare_pruning(model, config({"nm": {"params": {"pattern": "2:4", "method": "snip_momentum"},
                                               "modules": ["intermediate"]}}, dense_ratio=None))
    by_name = {t.name: t.settings for t in cb.plan.layers}
    assert by_name["encoder.layer.0.intermediate.dense"].pattern == NMPattern(2, 4)
    assert by_name["encoder.layer.0.intermediate.dense"].dense_ratio == 0.5  # N/M when nobody sets dense_ratio
    assert by_name["encoder.layer.0.intermediate.dense"].method == "snip_momentum"
    # shared_parameters states no dense_ratio: the layers in no group stay dense (no silent 90% fallback)
    assert "pooler" not in by_name and set(by_name) == {f"encoder.layer.{i}.intermediate.dense" for i in range(2)}
    assert left_out(cb)["pooler"].startswith(
        "in no different_groups entry, and shared_parameters states no dense_ratio")
