"""Pruning under torch.distributed (2 CPU processes, gloo): identical masks on every rank, equal to one process
with the same global batch, and clear errors instead of hangs when the ranks disagree."""
import pytest
import torch
from torch import nn

import slimtorch as st
from tests._multiproc import ROOT, WORLD, case_dir, spawn_cases, torchrun

from . import _workers as W


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-rank case of this module in one launch (each test asserts on its own case's directory)."""
    return spawn_cases({"ddp": (W.ddp_pruning,),
                        "default_targets": (W.mismatched_plan, "default_targets"),
                        "named_module": (W.mismatched_plan, "named_module"),
                        "unsynchronised": (W.unsynchronised_gradients,)}, tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def ddp_run(runs):
    tmp = case_dir(runs, "ddp")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_masks_and_weights_are_bitwise_identical_on_every_rank_after_every_update(ddp_run):
    rank0, rank1 = ddp_run
    assert len(rank0) == len(rank1) == W.UPDATES
    for step, (a, b) in enumerate(zip(rank0, rank1)):
        assert a["masks"].keys() == b["masks"].keys() == {"3", "6"}, step  # named as in the unwrapped model
        for name in a["masks"]:
            assert torch.equal(a["masks"][name], b["masks"][name]), (step, name)
        for key in a["weights"]:
            assert torch.equal(a["weights"][key], b["weights"][key]), (step, key)
    for name in ("3", "6"):  # 2:4 reached along the inputs (the conv's at each kernel position)
        final = rank0[-1]["masks"][name]
        matrix = final.movedim(1, -1).reshape(final.shape[0], -1) if final.dim() == 4 else final
        assert matrix.reshape(-1, 4).sum(dim=1).tolist() == [2] * (matrix.numel() // 4), name


def test_ddp_run_matches_one_process_with_the_same_global_batch(ddp_run):
    every_update, weights = W.one_process()
    assert len(every_update) == len(ddp_run[0]) == W.UPDATES
    for step, masks in enumerate(every_update):
        assert masks.keys() == ddp_run[0][step]["masks"].keys()
        for name, mask in masks.items():
            assert torch.equal(mask, ddp_run[0][step]["masks"][name]), (step, name)
    for key, value in weights.items():
        torch.testing.assert_close(value, ddp_run[0][-1]["weights"][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,rank0,rank1", [
    # default targets: rank 1's model lacks a layer, so its plan differs; both ranks say so
    ("default_targets", "DistributedError: prepare_pruning: rank 1 would prune other layers than rank 0",
     "DistributedError: prepare_pruning: rank 1 would prune other layers than rank 0"),
    # a module named in the config is missing on rank 1: rank 1 raises its ConfigError, rank 0 hears of it
    ("named_module", "DistributedError: prepare_pruning failed on rank 1: ConfigError",
     "ConfigError"),
])
def test_a_rank_with_another_model_is_an_error_on_every_rank_not_a_hang(runs, case, rank0, rank1):
    tmp = case_dir(runs, case)
    outcomes = [(tmp / f"rank{r}.txt").read_text() for r in range(WORLD)]
    assert outcomes[0].startswith(rank0), outcomes
    assert outcomes[1].startswith(rank1), outcomes
    if case == "default_targets":
        assert "(1 layers against 2; missing on rank 1: ['2']" in outcomes[0]  # its layer 2 is the head


def test_unsynchronised_gradients_are_caught_at_the_first_mask_update_that_prunes(runs):
    tmp = case_dir(runs, "unsynchronised")
    outcomes = [(tmp / f"rank{r}.txt").read_text() for r in range(WORLD)]
    for text in outcomes:
        # step 0's target is 0 (nothing pruned, masks agree); step 2 is the first that prunes
        assert text.startswith("DistributedError: mask update at step 2: the ranks' masks differ"), outcomes
        assert "DistributedDataParallel" in text


def test_sharded_wrappers_are_refused_at_prepare():
    class FullyShardedDataParallel(nn.Module):  # stands in for torch's FSDP wrapper, matched by class name
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    model = nn.Sequential(FullyShardedDataParallel(nn.Linear(8, 8)), nn.Linear(8, 2))
    with pytest.raises(st.UnsupportedModelError, match="wrapped by FSDP1 .*supports FSDP2.*fully_shard"):
        st.prepare_pruning(model, W.config())


def test_a_compiled_model_is_pruned_through_its_original_module():
    x, y = W.digits_tensors()
    model = W.mlp()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cb = st.prepare_pruning(compiled, W.config(), optimizer=opt)
    assert cb.layers == ["0", "2"]
    for _ in W.train(compiled, opt, x, y):
        pass
    report = st.sparsity_report(compiled)
    assert [r.name for r in report.pruned] == ["0", "2"] and all(r.pattern_valid for r in report.pruned)
    assert report["0"].sparsity == 0.5
    torch.testing.assert_close(compiled(x[:8]), model(x[:8]))
    cb.finalize()


@pytest.mark.slow
def test_the_ddp_example_runs_under_torchrun():
    done = torchrun(ROOT / "examples" / "prune_ddp.py")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "overall sparsity of pruned layers: 50.0% (2 of 3 layers pruned)" in done.stdout
    assert "weights identical on all 2 ranks: True" in done.stdout
