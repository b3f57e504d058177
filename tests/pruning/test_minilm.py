"""Acceptance on the real all-MiniLM-L6-v2: the request's config, 2:4, schedule, resume."""
import copy
import random

import pytest
import torch

import slimtorch as st
from slimtorch.pruning import masks
from slimtorch.pruning.schedules import is_pruning_step, sparsity_at
from tests.conftest import token_batches

RFC = {"compression_training": {"sparse_pruning": {
    "shared_parameters": {"enabled": True, "method": "snip_momentum", "pattern": "4x1", "dense_ratio": 0.1,
                          "gradient_accumulation_steps": 1, "sparsity_decay_type": "exp", "start_step": 0,
                          "end_step": 10000},
    "different_groups": {"sp1": {"params": {"dense_ratio": 0.5}, "modules": ["attention.self"]}}}}}


def scaled_rfc(end_step, frequency=1, pattern=None, dense_ratio=None, groups=True):
    cfg = copy.deepcopy(RFC)
    shared = cfg["compression_training"]["sparse_pruning"]["shared_parameters"]
    shared.update(end_step=end_step, frequency=frequency)
    if pattern:
        shared["pattern"] = pattern
    if dense_ratio:
        shared["dense_ratio"] = dense_ratio
    if not groups:
        del cfg["compression_training"]["sparse_pruning"]["different_groups"]
    return cfg


def distill_step(student, teacher, batch):
    with torch.no_grad():
        target = teacher(**batch).last_hidden_state
    out = student(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return ((out - target) ** 2 * mask).sum() / mask.sum()


def run(student, teacher, data, opt, after_each=None):
    for batch in data:
        loss = distill_step(student, teacher, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_each:
            after_each()


def test_request_config_4x1_exp_schedule(minilm, paragraphs):
    model, tok = minilm
    teacher = copy.deepcopy(model).eval()
    end = 8
    cfg = scaled_rfc(end_step=end, frequency=2)
    # each layer follows its own schedule in scope "local" (snip_momentum's default, "global", shares the target)
    cfg["compression_training"]["sparse_pruning"]["shared_parameters"]["scope"] = "local"
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    cb = st.prepare_pruning(model, cfg, optimizer=opt)
    assert len(cb.layers) == 36 and [lo.name for lo in cb.plan.left_out] == ["pooler.dense"]
    sparsity_after = {}

    def record():  # after t applied updates: the masks of the last pruning step <= t
        t = cb.step
        sparsity_after[t] = {l.name: (l.weight.detach() == 0).sum().item() / l.weight.numel() for l in cb.pruner.layers}

    run(model, teacher, list(token_batches(tok, paragraphs[:20], 2, 32)), opt, after_each=record)
    last_pruned = 0  # step 0 is a pruning step (to sparsity 0)
    assert sorted(sparsity_after) == list(range(1, 11))
    for t in sorted(sparsity_after):
        if is_pruning_step(t, 0, end, 2):
            last_pruned = t
        for layer in cb.pruner.layers:
            d = 0.5 if ".attention.self." in layer.name else 0.1
            n_blocks = layer.weight.numel() // 4
            want = masks.pruned_count(sparsity_at(last_pruned, 0, end, d, "exp"), n_blocks) / n_blocks
            assert sparsity_after[t][layer.name] == pytest.approx(want, abs=1e-12), (t, layer.name)
    report = st.sparsity_report(model)
    for row in report.pruned:
        target = 0.5 if ".attention.self." in row.name else 0.9
        rows, cols = row.shape
        assert abs(row.sparsity - target) <= 4 / (rows * cols)  # within one 4x1 block
        w = dict(model.named_modules())[row.name].weight.detach()
        blocks = (w != 0).reshape(rows // 4, 4, cols).sum(dim=1)
        assert ((blocks == 0) | (blocks == 4)).all(), row.name
        assert row.pattern_valid
    assert report["pooler.dense"].sparsity == 0.0


def test_two_four_on_every_encoder_linear(minilm, paragraphs):
    model, tok = minilm
    teacher = copy.deepcopy(model).eval()
    cfg = scaled_rfc(end_step=4, frequency=2, pattern="2:4", dense_ratio=0.5, groups=False)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    cb = st.prepare_pruning(model, cfg, optimizer=opt)
    run(model, teacher, list(token_batches(tok, paragraphs[:12], 2, 32)), opt)
    assert cb.step == 6
    for name in cb.layers:
        w = dict(model.named_modules())[name].weight.detach()
        assert ((w != 0).reshape(-1, 4).sum(dim=1) <= 2).all(), name
        assert (w == 0).sum().item() * 2 == w.numel()


def _resume_run(model, tok, teacher, data, interrupt_at=None, total=10):
    cfg = scaled_rfc(end_step=8, frequency=2, pattern="2:4", dense_ratio=0.5, groups=False)
    torch.manual_seed(123)
    rng = random.Random(7)
    order = list(range(len(data)))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    cb = st.prepare_pruning(model, cfg, optimizer=opt)
    step = 0
    while step < total:
        if interrupt_at is not None and step == interrupt_at:
            saved = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
                     "cb": copy.deepcopy(cb.state_dict()), "torch_rng": torch.get_rng_state(),
                     "rng": rng.getstate(), "step": step}
            cb.finalize()
            del model, opt, cb
            # a new process would rebuild everything from scratch and load the checkpoint
            model = copy.deepcopy(teacher).train()
            model.load_state_dict(saved["model"])
            opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
            opt.load_state_dict(saved["opt"])
            cb = st.prepare_pruning(model, cfg, optimizer=opt)
            cb.load_state_dict(saved["cb"])
            torch.set_rng_state(saved["torch_rng"])
            rng.setstate(saved["rng"])
            interrupt_at = None
        batch = data[rng.choice(order)]
        run(model, teacher, [batch], opt)
        step += 1
    masks_now = {l.name: l.mask.clone() for l in cb.pruner.layers}
    return model.state_dict(), masks_now


def test_resume_mid_schedule_is_bitwise_identical(minilm, paragraphs):
    model, tok = minilm
    teacher = copy.deepcopy(model).eval()
    data = list(token_batches(tok, paragraphs[:16], 2, 24))
    straight, masks_a = _resume_run(copy.deepcopy(model), tok, teacher, data)
    resumed, masks_b = _resume_run(copy.deepcopy(model), tok, teacher, data, interrupt_at=5)
    assert masks_a.keys() == masks_b.keys()
    for name in masks_a:
        assert torch.equal(masks_a[name], masks_b[name]), name
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
