"""Callbacks on small models: zeros after every update, step accounting, dtypes, checkpoints, lifecycle."""
import copy
import io

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch.pruning import masks
from slimtorch.pruning.schedules import sparsity_at


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def config(**shared):
    # scope "local": these tests follow each layer's own schedule (snip_momentum's default is "global")
    base = {"enabled": True, "method": "snip_momentum", "pattern": "4x1", "dense_ratio": 0.25,
            "start_step": 2, "end_step": 10, "frequency": 2, "scope": "local"}
    base.update(shared)
    return {"compression_training": {"sparse_pruning": {"shared_parameters": base}}}


def batches(n, seed=1, dim=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, dim, generator=g), torch.randn(8, 4, generator=g)) for _ in range(n)]


def train(model, opt, data, cb=None, explicit=False, after_each=None):
    for x, y in data:
        if explicit:
            cb.on_step_begin()
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if explicit:
            cb.on_before_optimizer_step()
        opt.step()
        if explicit:
            cb.on_after_optimizer_step()
            cb.on_step_end()
        if after_each:
            after_each()


def pruned_zeros_hold(cb):
    return all(bool((l.weight.detach()[~l.mask] == 0).all()) for l in cb.pruner.layers if l.mask is not None)


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("explicit", [False, True])
def test_pruned_weights_exactly_zero_after_every_update(opt_name, explicit):
    model = mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    cb = st.prepare_pruning(model, config(), optimizer=None if explicit else opt)
    seen = []

    def check():
        seen.append(cb.step)
        assert pruned_zeros_hold(cb)

    train(model, opt, batches(16), cb, explicit, after_each=check)
    assert seen == list(range(1, 17))
    for layer in cb.pruner.layers:
        assert layer.mask.float().mean().item() == pytest.approx(0.25, abs=1 / layer.mask.numel() * 4)
    assert all(r.pattern_valid for r in st.sparsity_report(model).pruned)


def test_sparsity_follows_schedule_at_each_pruning_step():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cb = st.prepare_pruning(model, config(sparsity_decay_type="cos"), optimizer=opt)
    observed = {}

    def record():  # after k applied updates the weights hold the masks of the last pruning step <= k
        observed[cb.step] = [(l.weight.detach() == 0).sum().item() / l.weight.numel() for l in cb.pruner.layers]

    train(model, opt, batches(14), after_each=record)
    assert sorted(observed) == list(range(1, 15))
    for k, got_per_layer in observed.items():
        pruning_steps = [t for t in range(2, 11, 2) if t <= k]
        for layer, got in zip(cb.pruner.layers, got_per_layer):
            if not pruning_steps:
                assert got == 0.0
                continue
            n_blocks = layer.weight.numel() // 4
            want = masks.pruned_count(sparsity_at(pruning_steps[-1], 2, 10, 0.25, "cos"), n_blocks) / n_blocks
            assert got == want, (k, layer.name)
    assert [e["step"] for e in cb.history[::2]] == [2, 4, 6, 8, 10]


def test_hands_free_equals_explicit_bitwise():
    results = []
    for explicit in (False, True):
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        cb = st.prepare_pruning(model, config(), optimizer=None if explicit else opt)
        train(model, opt, batches(14), cb, explicit)
        results.append(model.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_gradient_accumulation_counts_updates_not_micro_batches():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cb = st.prepare_pruning(model, config(gradient_accumulation_steps=4, start_step=1, end_step=3, frequency=1))
    data = batches(20)
    for i, (x, y) in enumerate(data):
        cb.on_step_begin()
        (nn.functional.mse_loss(model(x), y) / 4).backward()
        cb.on_before_optimizer_step()
        if (i + 1) % 4 == 0:
            opt.step()
            opt.zero_grad()
        cb.on_after_optimizer_step()
        cb.on_step_end()
    assert cb.step == 5
    assert sorted({e["step"] for e in cb.history}) == [1, 2, 3]
    assert pruned_zeros_hold(cb)


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.05),
    # fused: the GradScaler calls step() on an overflow too (the optimizer skips inside), so the hooks fire
    lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True),
], ids=["sgd", "adamw_fused"])
def test_grad_scaler_skipped_update_does_not_count(make_optimizer):
    model = mlp()
    opt = make_optimizer(model.parameters())
    cb = st.prepare_pruning(model, config(), optimizer=opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for i, (x, y) in enumerate(batches(6)):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if i == 3:
            model[0].weight.grad[0, 0] = float("inf")  # overflow: the scaler skips this update
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scores = [None if l.state is None else l.state.clone() for l in cb.pruner.layers]
        scaler.step(opt)
        scaler.update()
        if i == 3:  # nothing applied, nothing observed
            assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
            assert all((a is None and l.state is None) or torch.equal(a, l.state)
                       for a, l in zip(scores, cb.pruner.layers))
    assert cb.step == 5
    assert pruned_zeros_hold(cb)


def test_skipped_update_in_explicit_mode_leaves_no_trace():
    results = []
    for skip in (False, True):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        cb = st.prepare_pruning(model, config())
        for i, (x, y) in enumerate(batches(12)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if skip and i == 3:  # an overflowed update: inf gradients, no optimizer step
                model[0].weight.grad.fill_(float("inf"))
                cb.on_before_optimizer_step()
                cb.on_after_optimizer_step(applied=False)
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()  # the same batch again, as a scaler would
            cb.on_before_optimizer_step()
            opt.step()
            cb.on_after_optimizer_step()
        assert cb.step == 12
        results.append(model.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_bf16_parameters_autocast_and_dtype_change():
    model = mlp().to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cb = st.prepare_pruning(model, config(), optimizer=opt)
    data = [(x.bfloat16(), y.bfloat16()) for x, y in batches(8)]
    train(model, opt, data, after_each=lambda: pruned_zeros_hold(cb) or pytest.fail("zeros lost"))
    # switch the model to float32 mid-schedule and train under autocast
    model.float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cb_state = cb.state_dict()
    cb.finalize()
    cb = st.prepare_pruning(model, config(), optimizer=opt)
    cb.load_state_dict(cb_state)
    for x, y in batches(6, seed=5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert pruned_zeros_hold(cb)
    assert cb.step == 14
    assert all(l.weight.dtype == torch.float32 for l in cb.pruner.layers)


def test_masks_follow_model_to_another_dtype_without_reprepare():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cb = st.prepare_pruning(model, config(), optimizer=opt)
    train(model, opt, batches(12))
    model.double()  # Parameters are converted in place: the optimizer still holds them
    train(model, opt, [(x.double(), y.double()) for x, y in batches(4, seed=9)])
    assert pruned_zeros_hold(cb) and model[0].weight.dtype == torch.float64


def test_state_dict_keys_unchanged_and_saved_model_loads():
    model = mlp()
    keys = list(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cb = st.prepare_pruning(model, config(), optimizer=opt)
    train(model, opt, batches(12))
    assert list(model.state_dict()) == keys
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = mlp()
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert cb.state_dict()["step"] == 12


def test_row_pattern_prunes_bias_with_its_neuron():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    st.prepare_pruning(model, config(pattern="1xchannel", dense_ratio=0.5), optimizer=opt)
    train(model, opt, batches(12))
    for layer in (model[0], model[2]):
        dead = (layer.weight == 0).all(dim=1)
        assert int(dead.sum()) == layer.out_features // 2
        assert (layer.bias[dead] == 0).all() and (layer.bias[~dead] != 0).all()


def test_finalize_keeps_zeros_and_detaches():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cb = st.prepare_pruning(model, config(), optimizer=opt)
    train(model, opt, batches(12))
    zeros = [(l.weight == 0).clone() for l in (model[0], model[2])]
    assert cb.finalize() is model
    for z, l in zip(zeros, (model[0], model[2])):
        assert torch.equal(l.weight == 0, z)
    report = st.sparsity_report(model)
    assert report["0"].pattern == "4x1" and report["0"].pattern_valid
    with pytest.raises(st.LifecycleError, match="finalized"):
        cb.on_step_begin()
    train(model, opt, batches(2))  # the optimizer no longer drives pruning: weights may regrow
    assert not (model[0].weight == 0).all()
    st.prepare_pruning(model, config(), optimizer=opt)  # and the model can be prepared again


def test_lifecycle_misuse_is_a_clear_error():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cb = st.prepare_pruning(model, config(), optimizer=opt)
    with pytest.raises(st.LifecycleError, match="hands-free"):
        cb.on_before_optimizer_step()
    with pytest.raises(st.LifecycleError, match="already has active"):
        st.prepare_pruning(model, config())
    with pytest.raises(st.StateDictError):
        cb.load_state_dict({"step": 1})
    other = st.prepare_pruning(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)), config())
    with pytest.raises(st.StateDictError, match="other layers"):
        cb.load_state_dict(other.state_dict())
    with pytest.raises(st.ConfigError, match="torch.nn.Module"):
        st.prepare_pruning("model", config())
    assert "sharded" not in cb.state_dict(sharded=True)["pruner"]  # unsharded parameters: the whole state
    one_rank_of_two = cb.state_dict()
    one_rank_of_two["pruner"]["sharded"] = {"world": 2, "rank": 1}  # what rank 1 of an FSDP2/ZeRO-3 run writes
    with pytest.raises(st.StateDictError, match=r"parts of rank 1 of 2 .* here is rank 0 of 1"):
        cb.load_state_dict(one_rank_of_two)


def test_disabled_config_warns_and_prunes_nothing():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.warns(UserWarning, match="enabled is false"):
        cb = st.prepare_pruning(model, config(enabled=False), optimizer=opt)
    train(model, opt, batches(12))
    assert cb.layers == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_conv_model_nm_groups_along_input_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 4, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    cb = st.prepare_pruning(model, config(pattern="2:4", dense_ratio=0.5, method="magnitude"), optimizer=opt)
    assert cb.layers == ["0", "4"]  # the depthwise conv cannot hold 2:4; the Linear head stays dense
    assert "not a multiple of M=4" in dict((lo.name, lo.reason) for lo in cb.plan.left_out)["2"]
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        loss = model(torch.randn(4, 4, 8, 8, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name in ("0", "4"):
        w = dict(model.named_modules())[name].weight.detach()
        groups = (w.permute(0, 2, 3, 1) != 0).reshape(-1, 4)  # 4 input channels at one kernel position
        assert (groups.sum(dim=1) <= 2).all()
        assert (w == 0).float().mean().item() == pytest.approx(0.5)


def test_history_stays_bounded_on_long_schedules():
    from slimtorch.pruning.lifecycle import HISTORY_EVENTS_PER_LAYER
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    cb = st.prepare_pruning(model, config(method="magnitude", start_step=0, end_step=200, frequency=1), optimizer=opt)
    train(model, opt, batches(150))
    assert len(cb.history) == HISTORY_EVENTS_PER_LAYER * 2
    assert cb.history[-1]["step"] == 150 and cb.history[0]["step"] == 150 - HISTORY_EVENTS_PER_LAYER + 1


def test_applied_update_cannot_be_forgotten_later():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cb = st.prepare_pruning(model, config())
    x, y = batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    cb.on_before_optimizer_step()
    opt.step()
    cb.on_after_optimizer_step()
    scores = [l.state.clone() for l in cb.pruner.layers]
    cb.on_after_optimizer_step(applied=False)  # a skipped update that observed nothing must not undo the last one
    assert all(torch.equal(a, l.state) for a, l in zip(scores, cb.pruner.layers))
