"""Pruning under PyTorch FSDP2 (``fully_shard``), 2 CPU ranks with gloo: each rank scores its shard, every mask
update gathers one layer at a time and computes the mask as one process does; each rank keeps its rows."""
import pytest
import torch

from tests._multiproc import WORLD, case_dir, spawn_cases

from . import _fsdp_workers as F

# tiny models: each case takes seconds; all-MiniLM-L6-v2 under a sharded engine is tests/integrations/test_zero3.py's
TRAIN = [("llama", "2:4"), ("llama", "4x1"), ("bert", "2:4")]


def _train_case(arch, pattern):
    return f"train-{arch}-{pattern.replace(':', 'to')}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-rank case of the fast tests in one launch (each test asserts on its own case's directory)."""
    cases = {_train_case(a, p): (F.fsdp_train, a, p, True) for a, p in TRAIN}
    cases.update({"split_batches": (F.fsdp_train, "llama", "2:4", False),
                  "refusals": (F.refusals,),
                  **{f"resume-{per_rank}": (F.resume, 3, per_rank) for per_rank in (False, True)},
                  **{f"memory-{scope}": (F.memory, F.MEMORY_LAYERS, scope) for scope in ("local", "global")}})
    return spawn_cases(cases, tmp_path_factory.mktemp("fsdp2"))


def _ranks(tmp_path):
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow  # every case reads a multi-process launch (see tests/conftest.py)
@pytest.mark.parametrize("arch,pattern", TRAIN)
def test_fsdp2_masks_match_one_process_and_each_rank_holds_its_rows(arch, pattern, runs):
    """Every rank on the whole global batch: the engine's arithmetic is one process's, so everything is bitwise."""
    ranks = _ranks(case_dir(runs, _train_case(arch, pattern)))
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


def test_fsdp2_with_split_batches_keeps_the_ranks_identical(runs):
    """Each rank on its half of the global batch: FSDP2 averages two half-batch gradients, which differs from one
    process's gradient in the last bits, so near-ties in the scores may fall the other way; the ranks still hold
    the same whole masks after every update, and almost all of one process's."""
    ranks = _ranks(case_dir(runs, "split_batches"))
    masks, _ = F.one_process("llama", "2:4")
    differing, total = F.masks_against_one_process(ranks[0]["steps"], ranks[1]["steps"], masks)
    print(f"mask entries differing from one process: {differing} of {total}")
    assert differing <= 1e-3 * total
    for name, (valid, pattern) in {n: (v, p) for n, p, _, v in ranks[0]["report"]}.items():
        assert pattern is None or valid, name


def test_what_fsdp2_cannot_serve_is_refused_on_every_rank(runs):
    tmp_path = case_dir(runs, "refusals")
    for rank in range(WORLD):
        topk, replicated = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert topk.startswith("UnsupportedModelError: prepare_pruning: 'bert.encoder.layer.0.intermediate.dense' "
                               "uses topk"), topk
        assert replicated.startswith("UnsupportedModelError: prepare_pruning: parameter '0.weight' is a DTensor with "
                                     "placements (Replicate(),)"), replicated


@pytest.mark.parametrize("per_rank", [False, True])
def test_fsdp2_resumes_bitwise_from_a_distributed_checkpoint_and_consolidates_the_zeros(runs, per_rank):
    """torch.distributed.checkpoint (sharded model and optimizer) plus the callbacks' state, saved after 3 updates
    (mid-schedule: masks are recomputed at 0, 2, 4 and 6) and loaded into a fresh sharded model: the rest of the run
    is bitwise the uninterrupted one's, with the pruning state whole (rank 0's file) or each rank's own parts. The
    consolidated (full) state dict holds exactly the pruned zeros."""
    tmp_path = case_dir(runs, f"resume-{per_rank}")
    for rank in range(WORLD):
        run = torch.load(tmp_path / f"rank{rank}.pt")
        straight, resumed = run["straight"], run["resumed"]
        for name, mask in straight["masks"].items():
            assert torch.equal(mask, resumed["masks"][name]), (rank, name)
        if rank != 0:
            assert straight["weights"] == {}  # the consolidated state dict is rank 0's (cpu_offload)
            continue
        assert straight["weights"].keys() == resumed["weights"].keys() and straight["masks"]
        for name, mask in straight["masks"].items():
            weight = straight["weights"][f"{name}.weight"]
            assert torch.equal(weight != 0, mask), name  # zeros exactly where pruned (no trained weight is 0.0)
        for key, value in straight["weights"].items():
            assert torch.equal(value, resumed["weights"][key]), key


@pytest.mark.parametrize("scope", ["local", "global"])
def test_a_mask_update_holds_one_layer_whole_at_a_time(runs, scope):
    """Beside its shard, a rank holds during a mask update the whole weight and scores of one layer at a time, never
    more: counted on every whole tensor the FSDP2 access gathers, on a tiny Llama of F.MEMORY_LAYERS layers. Global
    scope ranks the layers' units (1/4 of the scores for 2:4), gathering each layer for them and again for its mask.
    The same while the pruning state of a checkpoint is gathered."""
    F.check_one_layer_whole(case_dir(runs, f"memory-{scope}"), WORLD, F.MEMORY_LAYERS)
