"""Global scope: one ranking across a group's layers, per-layer bounds held exactly, the target within one unit."""
import math
import xml.etree.ElementTree as ET

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from torch import nn

import slimtorch as st
from slimtorch.config.patterns import parse_pattern
from slimtorch.pruning import allocation, masks
from slimtorch.pruning.schedules import sparsity_at


# ------------------------------------------------------------------ the pure allocation
def units(values, size=4, weights=None):
    t = torch.tensor(values, dtype=torch.float32)
    return allocation.Units(t, size, weights or t.numel() * size)


def test_lowest_units_go_first_across_layers():
    a, b = units([1, 2, 3, 4]), units([0.5, 10, 20, 30])
    # half of 32 weights = 4 units: the three lowest of a (1, 2, 3) and b's 0.5
    assert allocation.allocate([a, b], 0.5, [0, 0], [1, 1]) == [3, 1]


def test_bounds_hold_exactly_and_win_over_scores():
    a, b = units([1, 2, 3, 4]), units([0.5, 10, 20, 30])
    # b must give at least half (2 units), a at most 3 of 4 units
    assert allocation.allocate([a, b], 0.5, [0, 0.5], [0.75, 1]) == [2, 2]
    assert allocation.allocate([a, b], 0.75, [0, 0], [0.75, 1]) == [3, 3]


def test_lower_bound_rounds_up_and_upper_bound_down_to_whole_units():
    u = units([1.0] * 10)  # 10 units, 10% of the layer each
    assert allocation.unit_bounds(u, 0.25, 0.55) == (3, 5)
    assert allocation.unit_bounds(u, 0.3, 0.3) == (3, 3)  # exact multiples stay exact despite float error


def test_ties_go_to_the_earlier_layer():
    a, b = units([1, 1]), units([1, 1])
    assert allocation.allocate([a, b], 0.25, [0, 0], [1, 1]) == [1, 0]


def test_units_of_different_sizes_reach_the_target_within_one_unit():
    wide = allocation.Units(torch.tensor([1.0, 5.0]), 64, 128)
    narrow = allocation.Units(torch.tensor([2.0, 3.0, 4.0]), 8, 24)
    counts = allocation.allocate([wide, narrow], 0.5, [0, 0], [1, 1])
    pruned = counts[0] * 64 + counts[1] * 8
    assert abs(pruned - 0.5 * 152) <= 64 and counts == [1, 1]


def test_nm_units_rank_by_the_weights_they_would_drop():
    scores = torch.tensor([[4.0, 3.0, 0.1, 0.2, 4.0, 3.0, 2.0, 1.0]])
    u = allocation.layer_units(scores, parse_pattern("2:4"))
    assert u.size == 2 and u.weights == 8
    assert torch.allclose(u.scores, torch.tensor([0.15, 1.5]))


def test_intermediate_lower_bound_scales_with_the_schedule():
    assert allocation.scaled_low(0.6, 0.4, 0.8) == pytest.approx(0.3)
    assert allocation.scaled_low(0.6, 0.8, 0.8) == pytest.approx(0.6)
    assert allocation.scaled_low(0.6, 0.0, 0.0) == 0.0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=hs.data())
def test_random_groups_keep_bounds_and_target(data):
    n_layers = data.draw(hs.integers(1, 5))
    size = data.draw(hs.sampled_from([1, 2, 4, 8]))
    layers = []
    for _ in range(n_layers):
        n = data.draw(hs.integers(1, 40))
        values = data.draw(hs.lists(hs.floats(0, 10, allow_nan=False), min_size=n, max_size=n))
        layers.append(units(values, size))
    low = data.draw(hs.floats(0, 0.5))
    high = data.draw(hs.floats(low, 1.0))
    target = data.draw(hs.floats(low, high))
    counts = allocation.allocate(layers, target, [low] * n_layers, [high] * n_layers)
    total = sum(u.weights for u in layers)
    for c, u in zip(counts, layers):
        assert 0 <= c <= u.count
        assert low - 1e-9 <= u.sparsity(c) <= high + 1e-9 or c == allocation.unit_bounds(u, low, high)[0]
    fewest = [allocation.unit_bounds(u, low, high)[0] for u in layers]
    most = [allocation.unit_bounds(u, low, high)[1] for u in layers]
    pruned = sum(c * size for c in counts)
    if sum(f * size for f in fewest) <= target * total <= sum(m * size for m in most):
        assert abs(pruned - target * total) <= size / 2 + 1e-6  # equal units: the nearest whole unit


# ------------------------------------------------------------------ in training
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    with torch.no_grad():  # layers of very different importance scales
        model[2].weight.mul_(4.0)
        model[4].weight.mul_(0.25)
    return model


def cfg(pattern, dense_ratio, method="magnitude", end_step=6, frequency=2, **extra):
    shared = {"enabled": True, "method": method, "pattern": pattern, "dense_ratio": dense_ratio, "scope": "global",
              "start_step": 0, "end_step": end_step, "frequency": frequency, "sparsity_decay_type": "cos", **extra}
    return {"compression_training": {"sparse_pruning": {"shared_parameters": shared}}}


def train(model, config, updates=8, lr=1e-3):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    cb = st.prepare_pruning(model, config, optimizer=opt)
    g = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(updates):
        x = torch.randn(16, 32, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(_group_state(cb))
    return cb, seen


def _group_state(cb):
    layers = cb.pruner.layers
    zeros = sum(int((l.mask == 0).sum()) for l in layers if l.mask is not None)
    return cb.step, zeros, {l.name: 1 - l.mask.float().mean().item() for l in layers if l.mask is not None}


@pytest.mark.parametrize("pattern,dense_ratio,bounds", [
    ("4x1", 0.2, {}),
    ("4x1", 0.3, {"min_sparsity_per_layer": 0.5, "max_sparsity_per_layer": 0.85}),
    ("2:4", 0.6, {}),
    ("2:4", 0.7, {"min_sparsity_per_layer": 0.2, "max_sparsity_per_layer": 0.4}),
    ("1xchannel", 0.5, {"max_sparsity_per_layer": 0.9}),
])
def test_every_step_reaches_the_group_target_and_keeps_the_bounds(pattern, dense_ratio, bounds):
    model = mlp()
    config = cfg(pattern, dense_ratio, **bounds)
    cb, seen = train(model, config)
    s = cb.plan.layers[0].settings
    total = sum(l.weight.numel() for l in cb.pruner.layers)
    p = parse_pattern(pattern)
    unit = (p.m - p.n) if hasattr(p, "m") else max(masks.block_sides(p, *masks.to_matrix(l.weight, "linear").shape)[0]
                                                  * masks.block_sides(p, *l.weight.shape)[1] for l in cb.pruner.layers)
    for step, zeros, per_layer in seen:
        if not per_layer:
            continue
        last = max(t for t in range(0, step + 1) if t <= s.end_step and t % s.frequency == 0)
        target = sparsity_at(last, s.start_step, s.end_step, s.dense_ratio, s.decay)
        assert abs(zeros - target * total) <= unit, (step, zeros, target * total)
        low = allocation.scaled_low(s.min_sparsity, target, s.target_sparsity)
        for name, sp in per_layer.items():
            assert low - 1e-9 <= sp <= s.max_sparsity + 1e-9, (step, name, sp)
    report = st.sparsity_report(model)
    assert all(r.pattern_valid for r in report.pruned)
    assert all(r.scope == "global" and r.bounds == (s.min_sparsity, s.max_sparsity) for r in report.pruned)
    final = {r.name: r.sparsity for r in report.pruned}
    assert len(set(round(v, 3) for v in final.values())) > 1  # the layers really got different shares
    cb.finalize()


def test_allocation_follows_measured_sensitivity():
    """snip_momentum: the layer whose weights carry the loss keeps more than a magnitude ranking would let it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        model[0].weight.mul_(0.1)  # small weights, but every path goes through them
    snip = train(model, cfg("4x1", 0.5, method="snip_momentum", end_step=4), updates=6, lr=0.0)[0]
    by_snip = {r.name: r.sparsity for r in st.sparsity_report(model).pruned}
    snip.finalize()
    torch.manual_seed(0)
    model2 = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        model2[0].weight.mul_(0.1)
    mag = train(model2, cfg("4x1", 0.5, end_step=4), updates=6, lr=0.0)[0]
    by_magnitude = {r.name: r.sparsity for r in st.sparsity_report(model2).pruned}
    mag.finalize()
    assert by_magnitude["0"] == pytest.approx(0.98, abs=0.01)  # global magnitude: the small layer nearly goes
    assert by_snip["0"] < by_magnitude["0"] - 0.2


def test_local_and_global_groups_side_by_side():
    model = mlp()
    config = cfg("4x1", 0.5)
    config["compression_training"]["sparse_pruning"]["different_groups"] = {
        "first": {"params": {"scope": "local", "dense_ratio": 0.75}, "modules": ["^0$"]}}
    cb, _ = train(model, config)
    report = st.sparsity_report(model)
    assert report["0"].sparsity == pytest.approx(0.25) and report["0"].scope == "local"
    rest = [r for r in report.pruned if r.name != "0"]
    pruned = sum(r.sparsity * math.prod(r.shape) for r in rest)
    assert pruned == pytest.approx(0.5 * sum(math.prod(r.shape) for r in rest), abs=4)
    cb.finalize()


def test_resume_recomputes_the_same_allocation():
    config = cfg("4x1", 0.2, method="snip_momentum", end_step=8, frequency=2)
    full = mlp()
    cb_full, _ = train(full, config, updates=10)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    cb = st.prepare_pruning(model, config, optimizer=opt)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 32, generator=g) for _ in range(10)]

    def run(m, o, batch):
        loss = m(batch).pow(2).mean()
        o.zero_grad()
        loss.backward()
        o.step()

    for x in xs[:5]:
        run(model, opt, x)
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), cb.state_dict())
    cb.finalize()
    resumed = mlp()
    resumed.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=1e-3, momentum=0.9)
    opt2.load_state_dict(saved[1])
    cb2 = st.prepare_pruning(resumed, config, optimizer=opt2)
    cb2.load_state_dict(saved[2])
    for x in xs[5:]:
        run(resumed, opt2, x)
    for a, b in zip(cb_full.pruner.layers, cb2.pruner.layers):
        assert torch.equal(a.mask, b.mask), a.name
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    cb_full.finalize()
    cb2.finalize()


def test_report_table_and_plot(tmp_path):
    model = mlp()
    cb, _ = train(model, cfg("4x1", 0.2, min_sparsity_per_layer=0.5))
    text = str(st.sparsity_report(model))
    assert "80.0% (group)" in text and "global (layer bounds 50%-98%)" in text
    path = st.sparsity_report(model).save_plot(tmp_path / "sparsity.svg")
    root = ET.parse(path).getroot()
    bars = [e for e in root.iter("{http://www.w3.org/2000/svg}rect")][1:]  # the first rect is the background
    assert len(bars) == len(st.sparsity_report(model).rows)
    with pytest.raises(st.ConfigError, match="ending in .svg"):
        st.sparsity_report(model).save_plot(tmp_path / "sparsity.png")
    cb.finalize()


def test_contradictory_bounds_fail_at_prepare_and_leave_the_model_alone():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(st.ConfigError, match=r"shared_parameters\.min_sparsity_per_layer.*cannot reach its target"):
        st.prepare_pruning(model, cfg("4x1", 0.5, min_sparsity_per_layer=0.6), optimizer=opt)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not opt._optimizer_step_pre_hooks  # nothing was attached
    st.prepare_pruning(model, cfg("4x1", 0.5), optimizer=opt).finalize()  # and the model can still be prepared
