"""Pruning under PyTorch FSDP2 (``fully_shard``), 2 CPU ranks with gloo: each rank scores its shard, every mask
update gathers one layer at a time and computes the mask as one process does; each rank keeps its rows."""
import pytest
import torch

from tests._multiproc import WORLD, spawn

from . import _fsdp_workers as F


@pytest.mark.parametrize("arch,pattern", [("llama", "2:4"), ("llama", "4x1"), ("bert", "2:4")])
def test_fsdp2_masks_match_one_process_and_each_rank_holds_its_rows(arch, pattern, tmp_path):
    """Every rank on the whole global batch: the engine's arithmetic is one process's, so everything is bitwise."""
    spawn(F.fsdp_train, tmp_path, arch, pattern, True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    masks, weights = F.one_process(arch, pattern)
    for update, (a, b, one) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"], masks)):
        assert a.keys() == b.keys() == one.keys() and one, update
        for name in one:
            assert torch.equal(a[name], b[name]), (update, name)          # the same whole mask on every rank
            assert torch.equal(a[name], one[name]), (update, name)        # and one process's
    for name, (local, whole) in ranks[0]["local"][-1].items():
        assert local < whole, name  # a rank keeps only its rows of each mask
    for key, value in weights.items():
        torch.testing.assert_close(ranks[0]["weights"][key], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]), key
        if key.endswith(".weight") and any(key.startswith(n) for n in masks[-1]):
            layer = key[: -len(".weight")]
            assert torch.equal(ranks[0]["weights"][key] != 0, masks[-1][layer] & (value != 0)), key
    assert all(valid for _, pattern_, _, valid in ranks[0]["report"] if pattern_ is not None)
    state = ranks[0]["state"]["pruner"]["layers"]
    assert all(torch.equal(state[n]["mask"], m) for n, m in masks[-1].items())  # checkpoints hold whole masks


def test_fsdp2_with_split_batches_keeps_the_ranks_identical(tmp_path):
    """Each rank on its half of the global batch: FSDP2 averages two half-batch gradients, which differs from one
    process's gradient in the last bits, so near-ties in the scores may fall the other way; the ranks still hold
    the same whole masks after every update, and almost all of one process's."""
    spawn(F.fsdp_train, tmp_path, "llama", "2:4", False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    masks, _ = F.one_process("llama", "2:4")
    differing = total = 0
    for a, b, one in zip(ranks[0]["steps"], ranks[1]["steps"], masks):
        for name in one:
            assert torch.equal(a[name], b[name]), name
            differing += int((a[name] != one[name]).sum())
            total += one[name].numel()
    print(f"mask entries differing from one process: {differing} of {total}")
    assert differing <= 1e-3 * total
    for name, (valid, pattern) in {n: (v, p) for n, p, _, v in ranks[0]["report"]}.items():
        assert pattern is None or valid, name


def test_what_fsdp2_cannot_serve_is_refused_on_every_rank(tmp_path):
    spawn(F.refusals, tmp_path)
    for rank in range(WORLD):
        topk, replicated = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert topk.startswith("UnsupportedModelError: prepare_pruning: 'bert.encoder.layer.0.intermediate.dense' "
                               "uses topk"), topk
        assert replicated.startswith("UnsupportedModelError: prepare_pruning: parameter '0.weight' is a DTensor with "
                                     "placements (Replicate(),)"), replicated
