"""DeepSpeed's row_pruning / head_pruning / channel_pruning: what DeepSpeed 0.19.6 prunes, during training, then slim.

The reference (``tests/reference/data/deepspeed_0.19.6_structured.pt``) comes from DeepSpeed itself, run by
``benchmarks/peers/deepspeed_structured.py`` in its own venv on the protocol of ``tests/reference/protocol.py``.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch import ConfigError, PatternShapeError
from slimtorch.pruning import learned
from tests.reference import protocol as P

REF = Path(__file__).resolve().parents[1] / "reference"
SCORES = {"row": "row_mask_scores", "head": "head_pruning_scores"}


@pytest.fixture(scope="module")
def reference():
    return torch.load(REF / "data" / "deepspeed_0.19.6_structured.pt")


def first_batch():
    return {k: v for k, v in P.batches(0)[0].items() if k != "labels"}


def row_head_config(row_method="topk", offset=2, row_ratio=0.5, head_ratio=0.5):
    """DeepSpeed's unit-test config with only row and head pruning enabled, sized for the protocol's tiny BERT."""
    doc = json.loads((REF / "configs" / "ds_unit_test.json").read_text())
    for name, body in doc["compression_training"].items():
        body.get("shared_parameters", body)["enabled"] = name in ("row_pruning", "head_pruning")
    training = doc["compression_training"]
    training["row_pruning"]["shared_parameters"].update(schedule_offset=offset, method=row_method)
    training["row_pruning"]["different_groups"]["rp1"]["params"]["dense_ratio"] = row_ratio
    training["head_pruning"]["shared_parameters"].update(schedule_offset=offset, num_heads=4)
    training["head_pruning"]["different_groups"]["rp1"]["params"]["dense_ratio"] = head_ratio
    return doc


def unit_masks(model, cb):
    out = {}
    for layer in cb.pruner.layers:
        if layer.learned is not None:
            out[layer.name] = layer.learned.keep()
        elif layer.mask is not None:  # l1 rows: whole rows of the matrix view
            out[layer.name] = layer.mask.all(dim=1)
    return out


@pytest.mark.parametrize("case", ["row_topk_head_topk", "row_l1_head_topk"])
def test_masks_weights_and_outputs_match_deepspeeds_run(case, reference):
    ref = reference[case]
    model = P.tiny_bert(0)
    assert P.fingerprint(model) == ref["fingerprint"]
    opt = torch.optim.SGD(model.parameters(), lr=P.LR)
    cb = st.prepare_pruning(model, json.loads(ref["config"]), optimizer=opt)
    assert sorted(cb.layers) == sorted(ref["units"])
    with torch.no_grad():  # DeepSpeed draws its scores after rebuilding every layer: start from the same ones
        for name, scores in ref["initial_scores"].items():
            getattr(model.get_submodule(name), SCORES[ref["units"][name]]).copy_(scores)
    P.train(model, opt, P.batches(0))
    ours = unit_masks(model, cb)
    for name, theirs in ref["unit_masks"].items():
        assert torch.equal(ours[name], theirs), name
        kept = math.ceil(0.5 * theirs.numel())
        assert int(ours[name].sum()) == kept
    model.eval()
    with torch.no_grad():
        logits = model(**first_batch()).logits
    # masks are bitwise DeepSpeed's; the logits were recorded on an AVX-512 CPU, and an AVX2 one sums the matmuls in
    # another order (3e-4 relative after the topk run's training steps, measured)
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-3, atol=2e-3)
    cb.finalize()  # DeepSpeed's redundancy_clean multiplies the weights by the masks: so does finalize()
    for name, weight in ref["weights"].items():
        keep = ref["unit_masks"][name]
        keep = keep.view(-1, 1) if ref["units"][name] == "row" else keep.repeat_interleave(16).view(1, -1)
        torch.testing.assert_close(model.get_submodule(name).weight.detach(), weight * keep, rtol=1e-4, atol=1e-5)


def test_topk_scores_get_deepspeeds_straight_through_gradient():
    """Masking the output (ours) and masking the weight and bias rows (DeepSpeed's layer) give the scores the same
    gradient, and the weights too."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 8)
    x = torch.randn(5, 3, 6)
    target = torch.randn(5, 3, 8)
    mask_ours = learned.LearnedMask(layer, "linear", learned.ROW, "row_mask_scores", 0.5)
    mask_ours.activate()
    loss = ((layer(x) - target) ** 2).sum()
    loss.backward()
    ours = (layer.row_mask_scores.grad.clone(), layer.weight.grad.clone())
    scores = layer.row_mask_scores.detach().clone().requires_grad_(True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    m = learned.topk_mask(scores, 0.5)
    theirs = nn.functional.linear(x, weight * m.view(-1, 1), layer.bias.detach() * m.view(-1))
    ((theirs - target) ** 2).sum().backward()
    torch.testing.assert_close(ours[0], scores.grad)
    torch.testing.assert_close(ours[1], weight.grad)
    assert int(m.sum()) == 4 and (ours[1][m.view(-1) == 0] == 0).all()


def test_topk_trains_then_finalize_writes_the_zeros_and_removes_the_scores():
    model = P.tiny_bert(0)
    opt = torch.optim.SGD(model.parameters(), lr=P.LR)
    torch.manual_seed(0)
    cb = st.prepare_pruning(model, row_head_config(), optimizer=opt)
    names = {n for n, _ in model.named_parameters()}
    assert "bert.encoder.layer.0.intermediate.dense.row_mask_scores" in names
    assert "bert.encoder.layer.1.attention.output.dense.head_pruning_scores" in names
    batches = P.batches(0)
    P.train(model, opt, batches[:2])
    assert [e["step"] for e in cb.history] == [2, 2, 2, 2]  # masking begins after schedule_offset updates
    P.train(model, opt, batches[2:])
    report = st.sparsity_report(model)
    assert report["bert.encoder.layer.0.intermediate.dense"].sparsity == 0.5
    assert "topk mask applied in forward" in report["bert.encoder.layer.0.intermediate.dense"].note
    dense = model.get_submodule("bert.encoder.layer.0.intermediate.dense")
    assert (dense.weight != 0).all()  # DeepSpeed keeps the weights; the mask acts in forward
    model.eval()
    with torch.no_grad():
        before = model(**first_batch()).logits
    keep = cb.pruner.layers[0].learned.keep()
    cb.finalize()
    with torch.no_grad():
        after = model(**first_batch()).logits
    assert torch.equal(before, after)
    assert not any("scores" in n for n, _ in model.named_parameters())
    assert (dense.weight[~keep] == 0).all() and (dense.bias[~keep] == 0).all()
    assert (dense.weight[keep] != 0).all()
    out = model.get_submodule("bert.encoder.layer.0.attention.output.dense")
    head_cols = (out.weight == 0).all(dim=0).reshape(4, 16)
    assert head_cols.all(dim=1).sum() == 2 and (head_cols.all(dim=1) | ~head_cols.any(dim=1)).all()
    assert (out.bias != 0).all()  # head pruning masks the projection's columns, not its bias (as DeepSpeed)


@pytest.mark.parametrize("script", ["pruning_row", "pruning_head"])
def test_deepspeed_bert_examples_train_then_slim(script):
    """DeepSpeedExamples compression/bert: ds_config_TEMPLATE.json as bash_script/pruning_row.sh and pruning_head.sh
    fill it (dense_ratio 0.6, topk), on the tiny BERT: schedule_offset 2000 -> 2 and num_heads 12 -> 4 so that it
    prunes within 12 updates of a 4-head model. Trained, finalized, then slim()."""
    config = json.loads((REF / "configs" / f"ds_examples_bert_{script}.json").read_text())
    training = config["compression_training"]
    training["row_pruning"]["shared_parameters"]["schedule_offset"] = 2
    training["head_pruning"]["shared_parameters"].update(schedule_offset=2, num_heads=4)
    model = P.tiny_bert(0)
    opt = torch.optim.SGD(model.parameters(), lr=P.LR)
    torch.manual_seed(0)
    cb = st.prepare_pruning(model, config, optimizer=opt)
    P.train(model, opt, P.batches(0))
    cb.finalize()
    model.eval()
    inputs = first_batch()
    small = st.slim(model, inputs, measure_latency=False)
    assert st.slim_report(small).max_relative_difference <= 1e-5
    for layer in small.bert.encoder.layer:
        if script == "pruning_row":  # ceil(0.6 * 128) FFN units stay
            assert layer.intermediate.dense.out_features == 77 and layer.output.dense.in_features == 77
        else:  # ceil(0.6 * 4) = 3 heads of 16 stay, with their q, k, v rows
            assert layer.attention.self.query.out_features == 48 and layer.attention.output.dense.in_features == 48
            assert layer.attention.self.num_attention_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(small(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-6)


class _Block(nn.Module):
    """DeepSpeedExamples compression/cifar/resnet.py's BasicBlock (names conv1, bn1, conv2, bn2)."""

    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


class _ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(_Block(8), _Block(8))
        self.linear = nn.Linear(8, 10)

    def forward(self, x):
        out = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(out.mean(dim=(2, 3)))


@pytest.mark.parametrize("method", ["topk", "l1"])
def test_deepspeed_cifar_channel_pruning_example_trains_then_slims(method):
    """DeepSpeedExamples compression/cifar/config/ds_config_channel_prune.json (channel_pruning of layer....conv1,
    related conv2 and bn1), on a small ResNet with that example's names."""
    config = json.loads((REF / "configs" / "ds_examples_cifar_channel_prune.json").read_text())
    config["compression_training"]["channel_pruning"]["shared_parameters"]["method"] = method
    torch.manual_seed(0)
    model = _ResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cb = st.prepare_pruning(model, config, optimizer=opt)
    assert cb.layers == ["layer1.0.conv1", "layer1.1.conv1"]
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the related BatchNorms' channels are masked with the convs' during training, so finalize() changes nothing
    # (DeepSpeed removes them only in redundancy_clean, after training)
    model.eval()
    x = torch.randn(4, 3, 8, 8, generator=gen)
    with torch.no_grad():
        trained = model(x)
    cb.finalize()
    with torch.no_grad():
        assert torch.equal(model(x), trained)
    for block in model.layer1:
        pruned = (block.conv1.weight == 0).flatten(1).all(dim=1)
        assert int(pruned.sum()) == 4 and (block.bn1.weight[pruned] == 0).all() and (block.bn1.bias[pruned] == 0).all()
    small = st.slim(model, x, measure_latency=False)
    for block in small.layer1:
        assert block.conv1.out_channels == 4 and block.bn1.num_features == 4 and block.conv2.in_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)


def test_l1_rows_are_the_largest_l1_norms_at_prepare_applied_from_the_offset():
    model = P.tiny_bert(0)
    layer = model.get_submodule("bert.encoder.layer.0.intermediate.dense")
    norms = layer.weight.detach().abs().sum(dim=1)
    expected = torch.zeros(128, dtype=torch.bool)
    expected[norms.topk(math.ceil(0.3 * 128)).indices] = True
    opt = torch.optim.SGD(model.parameters(), lr=P.LR)
    cb = st.prepare_pruning(model, row_head_config("l1", offset=3, row_ratio=0.3), optimizer=opt)
    P.train(model, opt, P.batches(0)[:2])
    assert (layer.weight != 0).all()  # not before schedule_offset
    P.train(model, opt, P.batches(0)[2:])
    assert torch.equal((layer.weight != 0).all(dim=1), expected)
    assert torch.equal(layer.bias != 0, expected)
    cb.finalize()


def test_resume_restores_learned_masking_bitwise(tmp_path):
    def run(resume_at=None):
        model = P.tiny_bert(0)
        opt = torch.optim.SGD(model.parameters(), lr=P.LR)
        torch.manual_seed(0)
        cb = st.prepare_pruning(model, row_head_config(), optimizer=opt)
        batches = P.batches(0)
        if resume_at is None:
            P.train(model, opt, batches)
            return model
        P.train(model, opt, batches[:resume_at])
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruning": cb.state_dict()},
                   tmp_path / "ckpt.pt")
        cb.finalize()
        model = P.tiny_bert(1)  # other weights: everything comes from the checkpoint
        opt = torch.optim.SGD(model.parameters(), lr=P.LR)
        cb = st.prepare_pruning(model, row_head_config(), optimizer=opt)
        state = torch.load(tmp_path / "ckpt.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        cb.load_state_dict(state["pruning"])
        P.train(model, opt, batches[resume_at:])
        return model

    straight, resumed = run(), run(resume_at=5)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_scores_outside_the_optimizer_are_reported():
    model = P.tiny_bert(0)
    cb = st.prepare_pruning(model, row_head_config(offset=0))
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "scores" not in n], lr=P.LR)
    with pytest.warns(UserWarning, match="topk scores .* did not change in an update"):
        for batch in P.batches(0)[:2]:
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            cb.on_before_optimizer_step()
            opt.step()
            cb.on_after_optimizer_step()


def test_structured_section_mistakes_on_the_model_are_clear():
    model = P.tiny_bert(0)
    # a Linear under channel_pruning
    bad = {"channel_pruning": {"shared_parameters": {"enabled": True, "schedule_offset": 0},
                               "different_groups": {"cp1": {"params": {"dense_ratio": 0.5},
                                                            "modules": ["intermediate.dense"]}}}}
    with pytest.raises(ConfigError, match=r"channel_pruning\.different_groups\.cp1\.modules: "
                                          r"'bert\.encoder\.layer\.0\.intermediate\.dense' is a Linear.*row_pruning"):
        st.prepare_pruning(model, bad)
    # num_heads that does not divide the projection
    cfg = row_head_config()
    cfg["compression_training"]["head_pruning"]["shared_parameters"]["num_heads"] = 5
    with pytest.raises(PatternShapeError, match=r"64 input features, not a multiple of num_heads 5"):
        st.prepare_pruning(model, cfg)
    # one layer in sparse_pruning and row_pruning
    cfg = row_head_config()
    cfg["compression_training"]["sparse_pruning"] = {
        "shared_parameters": {"enabled": True, "method": "magnitude", "pattern": "4x1", "dense_ratio": 0.5},
        "different_groups": {}}
    with pytest.raises(ConfigError, match=r"'bert\.encoder\.layer\.0\.intermediate\.dense' is pruned by "
                                          r"sparse_pruning .* and by row_pruning\.rp1"):
        st.prepare_pruning(model, cfg)
    # related_modules that name nothing
    cfg = row_head_config()
    cfg["compression_training"]["row_pruning"]["different_groups"]["rp1"]["related_modules"] = [["outptu.dense"]]
    with pytest.raises(ConfigError, match=r"row_pruning\.different_groups\.rp1\.related_modules\[0\]\[0\]: "
                                          r"'outptu\.dense' matches no module"):
        st.prepare_pruning(model, cfg)
    assert not any("scores" in n for n, _ in model.named_parameters())  # nothing was left on the model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.prepare_pruning(model, copy.deepcopy(row_head_config())).finalize()


def _channel_pruned_resnet(modules, related):
    """The small ResNet after one l1 channel_pruning update (lr 0: only the masks change) and finalize()."""
    torch.manual_seed(0)
    model = _ResNet()
    group = {"params": {"dense_ratio": 0.5}, "modules": modules, "related_modules": related}
    config = {"compression_training": {"channel_pruning": {
        "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0},
        "different_groups": {"cp": group}}}}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cb = st.prepare_pruning(model, config, optimizer=opt)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    opt.step()
    cb.finalize()
    return model.eval(), x


def test_related_modules_one_batchnorm_list_per_modules_entry():
    """config.md's form: related_modules[i] goes with modules[i], one BatchNorm per conv."""
    model, x = _channel_pruned_resnet(["layer1.0.conv1", "layer1.1.conv1"], [["layer1.0.bn1"], ["layer1.1.bn1"]])
    for block in model.layer1:
        pruned = (block.conv1.weight == 0).flatten(1).all(dim=1)
        assert int(pruned.sum()) == 4 and (block.bn1.weight[pruned] == 0).all() and (block.bn1.bias[pruned] == 0).all()
        assert (block.bn1.weight[~pruned] != 0).all()
    small = st.slim(model, x, measure_latency=False)
    assert [b.bn1.num_features for b in small.layer1] == [4, 4]
    with pytest.raises(ConfigError, match=r"related_modules\[0\]\[0\]: 'layer1...bn1' matches 2 BatchNorm layers "
                       r"\(layer1.0.bn1, layer1.1.bn1\) but modules\[0\] 'layer1.0.conv1' prunes 1"):
        _channel_pruned_resnet(["layer1.0.conv1", "layer1.1.conv1"], [["layer1...bn1"], ["layer1.1.bn1"]])


def test_a_residual_stream_pruned_in_part_stays_and_is_reported():
    """The stream starts at the stem conv and the blocks' conv2 add into it: pruning the stem alone cannot remove a
    channel (the blocks still write it), so the stem's zero rows stay, named in refused, and the rest is slimmed."""
    model, x = _channel_pruned_resnet(["^conv1$", "layer1.0.conv1"], [["^bn1$"], ["layer1.0.bn1"]])
    small = st.slim(model, x, measure_latency=False)
    assert small.conv1.out_channels == 8 and small.layer1[0].conv1.out_channels == 4
    assert list(st.slim_report(small).refused) == ["conv1"]
    assert "residual stream) in layer1.0, and unit 0 is pruned in conv1 but not in layer1.0.conv2, layer1.1.conv2" \
        in st.slim_report(small).refused["conv1"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    alone, x = _channel_pruned_resnet(["^conv1$"], [["^bn1$"]])
    with pytest.raises(st.UnsupportedModelError, match=r"nothing to remove.*Zero rows that cannot go: conv1: they "
                       r"are added .*residual stream.*pattern 'channelx1'"):
        st.slim(alone, x, measure_latency=False)
