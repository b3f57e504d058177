"""DeepSpeed's l1 as DeepSpeed runs it, and the rules for layers that no group lists (docs/config.md,
"Whose semantics"). The bit-for-bit comparison with DeepSpeed itself is tests/peers/test_deepspeed_configs.py."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch import ConfigError
from slimtorch.pruning.registry import masks_of
from tests.reference.protocol import ceil_top_k


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10),
                         nn.ReLU(), nn.Linear(10, 4))


def l1(dense_ratio=0.3, offset=3, modules=("^2$",), **shared):
    return {"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": offset, **shared},
        "different_groups": {"sp1": {"params": {"dense_ratio": dense_ratio}, "modules": list(modules)}}}}}


def with_shared(config, **shared):
    config["compression_training"]["sparse_pruning"]["shared_parameters"].update(shared)
    return config


def train(net, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = net(torch.randn(8, 16, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()



def test_l1_ranks_once_at_prepare_and_applies_at_schedule_offset():
    net = model()
    at_prepare = net[2].weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    cb = st.prepare_pruning(net, l1(), optimizer=opt)
    assert cb.layers == ["2"]  # only the group's module; shared_parameters states no modules
    train(net, opt, 2)
    assert not (net[2].weight == 0).any()  # nothing pruned before schedule_offset
    train(net, opt, 1)
    want = ceil_top_k(at_prepare, 0.3)
    assert torch.equal(masks_of(net)["2"], want)
    assert int(want.sum()) == math.ceil(0.3 * 1024)  # DeepSpeed keeps ceil(dense_ratio * n): 308, not 307
    train(net, opt, 5)
    assert torch.equal(masks_of(net)["2"], want)  # one-shot: the mask never changes again


def test_l1_keeps_the_ceiling_computed_as_deepspeed_computes_it():
    """0.55 * 100 is 55.00000000000001 in floating point, so DeepSpeed keeps 56 of 100 weights; so does
    slimtorch (from the dense ratio itself, not from 1 - sparsity)."""
    net = nn.Sequential(nn.Linear(100, 1), nn.Linear(1, 1))
    cb = st.prepare_pruning(net, l1(dense_ratio=0.55, modules=("^0$",), offset=0))
    cb.on_before_optimizer_step()
    assert int(masks_of(net)["0"].sum()) == math.ceil(0.55 * 100) == 56


def test_a_resume_before_schedule_offset_keeps_the_prepare_time_ranking():
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    cb = st.prepare_pruning(net, l1(offset=4), optimizer=opt)
    want = ceil_top_k(net[2].weight.detach(), 0.3)
    train(net, opt, 2)
    state = cb.state_dict()
    cb.finalize()
    opt2 = torch.optim.SGD(net.parameters(), lr=0.5)
    cb2 = st.prepare_pruning(net, l1(offset=4), optimizer=opt2)  # ranks today's weights, then the resume wins
    cb2.load_state_dict(state)
    train(net, opt2, 2, seed=2)
    assert cb2.step == 4 and torch.equal(masks_of(net)["2"], want)


def test_l1_ignores_block_pattern_as_deepspeed_does_and_honours_pattern():
    cfg = st.load_config(l1(block_pattern="4x1"))
    assert str(cfg.sparse_pruning.settings_for("sp1").pattern) == "1x1"
    assert any("block_pattern '4x1' is not read" in n for n in cfg.notes)
    cfg = st.load_config(l1(pattern="4x1"))
    assert str(cfg.sparse_pruning.settings_for("sp1").pattern) == "4x1"
    net = model()
    cb = st.prepare_pruning(net, l1(pattern="4x1", offset=0))
    cb.on_before_optimizer_step()
    blocks = masks_of(net)["2"].reshape(8, 4, 32).sum(dim=1)
    assert bool(((blocks == 0) | (blocks == 4)).all()) and int((blocks == 4).sum()) == math.ceil(0.3 * 256)


def test_l1_has_no_global_scope():
    with pytest.raises(ConfigError, match="DeepSpeed's per-layer magnitude pruning, ranked once at prepare time"):
        st.load_config(l1(scope="global"))


def test_shared_modules_add_layers_under_l1():
    cb = st.prepare_pruning(model(), with_shared(l1(), modules=["^0$"], dense_ratio=0.5))
    assert cb.layers == ["0", "2"]
    assert cb.plan.layers[0].settings.dense_ratio == 0.5 and cb.plan.layers[1].settings.dense_ratio == 0.3


def test_layers_in_no_group_stay_dense_without_a_shared_ratio_and_the_plan_is_logged(caplog):
    cfg = {"compression_training": {"sparse_pruning": {
        "shared_parameters": {"enabled": True, "method": "snip_momentum", "pattern": "4x1", "start_step": 0},
        "different_groups": {"g": {"params": {"dense_ratio": 0.5}, "modules": ["^2$"]}}}}}
    with caplog.at_level(logging.INFO, logger="slimtorch"):
        cb = st.prepare_pruning(model(), cfg)
    assert cb.layers == ["2"]
    reasons = {lo.name: lo.reason for lo in cb.plan.left_out}
    assert reasons["0"].startswith("in no different_groups entry, and shared_parameters states no dense_ratio")
    assert reasons["6"].startswith("output head") and reasons["4"].startswith("in no different_groups entry")
    log = caplog.text
    assert "different_groups.g prunes 1 layer (snip_momentum 4x1, sparsity 50.0%, global): 2" in log
    assert "dense: 0: in no different_groups entry" in log
    # stating the ratio prunes them
    cfg["compression_training"]["sparse_pruning"]["shared_parameters"]["dense_ratio"] = 0.2
    assert st.prepare_pruning(model(), cfg).layers == ["0", "2"]  # 4: 10 rows do not fit 4x1 blocks


def test_a_config_that_prunes_nothing_is_refused_at_prepare():
    cfg = {"compression_training": {"sparse_pruning": {"shared_parameters": {
        "enabled": True, "method": "snip_momentum", "pattern": "4x1"}}}}
    with pytest.raises(ConfigError, match="the config prunes no layer of this model .* Give shared_parameters a "
                                          "dense_ratio"):
        st.prepare_pruning(model(), cfg)


def test_op_types_and_a_groups_exclusions_select_layers():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 32), nn.Linear(32, 32),
                        nn.Linear(32, 4))
    shared = {"enabled": True, "method": "magnitude", "pattern": "4x1", "dense_ratio": 0.5, "op_types": ["Linear"]}
    cb = st.prepare_pruning(net, {"compression_training": {"sparse_pruning": {
        "shared_parameters": shared,
        "different_groups": {"g": {"params": {"dense_ratio": 0.25}, "modules": ["[23]"],
                                   "excluded_modules": ["^3$"]}}}}})
    groups = {t.name: t.group for t in cb.plan.layers}
    assert groups == {"2": "g", "3": None}  # layer 3 left the group and fell back to shared_parameters
    assert {lo.name: lo.reason for lo in cb.plan.left_out}["0"] == "Conv2d is not in shared_parameters.op_types"
