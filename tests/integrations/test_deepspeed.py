"""``slimtorch.deepspeed.initialize`` on DeepSpeed's real engine: 2 CPU ranks (gloo), ZeRO stages 0, 1 and 2.

Each run trains the digits CNN with snip_momentum 2:4 (the DDP test's model, data and schedule) and must give
bitwise-identical masks and weights on both ranks after every update, the single-process run's masks at every
update and its final weights within float tolerance, and pruned zeros in DeepSpeed's fp32 master copy too.
"""
import functools

import pytest
import torch

import slimtorch as st
from tests._multiproc import ROOT, WORLD, case_dir, spawn_cases, torchrun
from tests.distributed import _workers as W

from . import _ds_workers as D

pytest.importorskip("deepspeed")

PRUNED = ("3", "6")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-rank case of the fast tests in one launch (each test asserts on its own case's directory)."""
    return spawn_cases({**{f"zero{stage}": (D.train, stage) for stage in (0, 1, 2)},
                        "explicit": (D.train, 2, 2, False),
                        "resume": (D.train, 2, 1, True, 3),
                        "accumulation_mismatch": (D.gradient_accumulation_mismatch,),
                        **{f"topk{stage}": (D.topk_sections, stage) for stage in (0, 2)}},
                       tmp_path_factory.mktemp("deepspeed"))


@pytest.fixture(scope="module")
def slow_runs(tmp_path_factory):
    return spawn_cases({f"l1_bf16_zero{stage}": (D.l1_in_bf16, stage) for stage in (2, 3)},
                       tmp_path_factory.mktemp("deepspeed_slow"))


def run(runs, name):
    tmp = case_dir(runs, name)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    """One process, plain PyTorch, the same global batch of 32: every update's masks and the final weights."""
    return W.one_process()


@pytest.fixture(scope="module", params=[0, 1, 2], ids=lambda s: f"zero{s}")
def zero_run(request, runs):
    return request.param, run(runs, f"zero{request.param}")


def assert_identical_ranks(rank0, rank1):
    assert len(rank0) == len(rank1) == W.UPDATES + 1
    for update, (a, b) in enumerate(zip(rank0[:-1], rank1[:-1])):
        assert a["step"] == b["step"] == update + 1
        assert a["masks"].keys() == b["masks"].keys()
        for name in a["masks"]:
            assert torch.equal(a["masks"][name], b["masks"][name]), (update, name)
        for key in a["weights"]:
            assert torch.equal(a["weights"][key], b["weights"][key]), (update, key)


def assert_matches_single_process(ranks, single_process):
    masks, weights = single_process
    for update, snapshot in enumerate(ranks[0][:-1]):
        assert snapshot["masks"].keys() == masks[update].keys() == set(PRUNED), update
        for name, mask in masks[update].items():
            assert torch.equal(snapshot["masks"][name], mask), (update, name)
    for key, value in weights.items():
        torch.testing.assert_close(ranks[0][-2]["weights"][key], value, rtol=1e-5, atol=1e-6)


def assert_two_of_four(mask):
    matrix = mask.movedim(1, -1).reshape(mask.shape[0], -1) if mask.dim() == 4 else mask
    assert matrix.reshape(-1, 4).sum(dim=1).tolist() == [2] * (matrix.numel() // 4)


def test_every_zero_stage_keeps_the_ranks_identical_and_matches_one_process(zero_run, single_process):
    stage, ranks = zero_run
    assert_identical_ranks(*ranks)
    assert_matches_single_process(ranks, single_process)
    final = ranks[0][-2]
    for name in PRUNED:
        assert_two_of_four(final["masks"][name])
        assert final["weights"][f"{name}.weight"].eq(0).float().mean().item() == 0.5
    # DeepSpeed got its own keys, not the compression section slimtorch read
    assert ranks[0][-1]["deepspeed_keys"] == sorted(k for k in D.ds_config(stage) if k != "compression_training")
    # sparsity_report(engine) sees the model inside the engine
    assert ranks[0][-1]["report"] == [("1", None, 0.0, None), ("3", "2:4", 0.5, True), ("6", "2:4", 0.5, True),
                                      ("8", None, 0.0, None)]


def test_zero_1_and_2_master_weights_hold_the_pruned_zeros(zero_run):
    stage, ranks = zero_run
    master, weights = ranks[0][-1]["master"], ranks[0][-2]["weights"]
    if stage == 0:
        assert master == {}  # fp32 at stage 0: the parameters are the only copy
        return
    assert master.keys() == {k for k in weights}
    for key, value in master.items():  # what ZeRO checkpoints and zero_to_fp32 would hold
        assert torch.equal(value, weights[key]), key


def test_no_update_communicates_for_pruning_scores_at_zero_1_and_2(zero_run):
    # each rank scores the gradient fragment it owns; the shares are summed once per layer and mask update (steps
    # 0, 2, 4, 6), not gathered every observed update (0-5: 12 all-reduces of pruned-weight size, as before)
    stage, ranks = zero_run
    for rank in ranks:
        sizes = rank[-1]["weight_sized_all_reduces"]
        if stage == 0:
            assert sizes == []  # the full reduced gradient is in param.grad: nothing to sum
        else:
            assert sorted(sizes) == sorted([16 * 32 * 9, 64 * 512] * 4), sizes


def test_explicit_callbacks_with_gradient_accumulation_match_one_process(runs, single_process):
    # 2 micro-batches of 8 per rank and update; the callbacks are called around every engine.step()
    ranks = run(runs, "explicit")
    assert_identical_ranks(*ranks)
    assert_matches_single_process(ranks, single_process)


def test_a_deepspeed_checkpoint_resumes_the_schedule_mid_way(runs, single_process):
    # ZeRO 2: save_checkpoint after 3 updates (mid-schedule: pruning at 0, 2, 4, 6), a fresh engine loads it and
    # trains on; the callbacks' state travels in the checkpoint's client_state, next to the user's own keys
    ranks = run(runs, "resume")
    assert_identical_ranks(*ranks)  # step counts continue: 1..10 on both ranks
    assert_matches_single_process(ranks, single_process)


def test_conflicting_gradient_accumulation_is_an_error_on_every_rank(runs):
    tmp = case_dir(runs, "accumulation_mismatch")
    for rank in range(WORLD):
        text = (tmp / f"rank{rank}.txt").read_text()
        assert text.startswith("ConfigError: compression_training.sparse_pruning.shared_parameters."
                               "gradient_accumulation_steps is 4 but the DeepSpeed engine accumulates 2"), text


def test_topk_under_zero_3_is_refused_before_deepspeed_builds_anything():
    """topk's scores would be new parameters of layers ZeRO-3 partitions: refused before the engine (and before the
    scores are attached), so the model is untouched; sparse_pruning methods and l1 run under ZeRO-3 (test_zero3)."""
    from tests.distributed import _fsdp_workers as F

    model = F.build("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = {**D.ds_config(3), "compression_training": F.TOPK["compression_training"]}
    with pytest.raises(st.UnsupportedModelError, match=r"row_pruning.different_groups.rp1: method topk .* ZeRO-3"):
        st.deepspeed.initialize(model=model, config=cfg)
    assert model.state_dict().keys() == before.keys()  # no scores were attached
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_bad_arguments_are_config_errors():
    model = W.digits_cnn()
    with pytest.raises(st.ConfigError, match="given twice"):
        st.deepspeed.initialize(model=model, config=D.ds_config(0), config_params=D.ds_config(0))
    with pytest.raises(st.ConfigError, match="no DeepSpeed config"):
        st.deepspeed.initialize(model=model)
    with pytest.raises(st.ConfigError, match="model must be a torch.nn.Module"):
        st.deepspeed.initialize(model=None, config=D.ds_config(0))
    bad = D.ds_config(0)
    bad["compression_training"]["sparse_pruning"]["shared_parameters"]["end_tep"] = 5
    with pytest.raises(st.ConfigError, match="did you mean 'end_step'"):
        st.deepspeed.initialize(model=model, config=bad)


def test_importing_slimtorch_does_not_import_deepspeed():
    import subprocess
    import sys

    code = "import sys, slimtorch; assert slimtorch.deepspeed.initialize; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_example_configs_differ_only_in_the_zero_stage():
    """The example runs under torchrun with the ZeRO-3 config below; the ZeRO-2 one (docs/deepspeed.md's) is the
    same run at stage 2, whose engine path the 2-rank cases above take."""
    import json

    configs = [json.loads((ROOT / "examples" / "configs" / f"deepspeed_zero{s}_2to4.json").read_text()) for s in (2, 3)]
    stages = [c["zero_optimization"].pop("stage") for c in configs]
    configs[1]["zero_optimization"].pop("stage3_gather_16bit_weights_on_model_save")  # ZeRO-3's 16-bit save
    assert stages == [2, 3] and configs[0] == configs[1]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero3_2to4.json"])
def test_the_deepspeed_example_runs_under_torchrun(config):
    done = torchrun(ROOT / "examples" / "prune_deepspeed.py", str(ROOT / "examples" / "configs" / config))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "overall sparsity of pruned layers: 50.0% (2 of 3 layers pruned)" in done.stdout, done.stdout[-2000:]
    assert "56 updates" in done.stdout and "weights identical on all 2 ranks: True" in done.stdout


def test_zero_3_partitioned_parameters_are_refused_at_prepare():
    # what deepspeed.zero.Init leaves on every parameter (the Trainer under ZeRO-3 hands the callback such a model)
    model = W.digits_cnn()
    for p in model.parameters():
        p.ds_id = 0
    with pytest.raises(st.UnsupportedModelError, match="partitioned by DeepSpeed ZeRO stage 3.*through the engine"):
        st.prepare_pruning(model, W.config())


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_l1_under_a_bf16_engine_ranks_the_float_weights_as_deepspeed_does(slow_runs, stage):
    """DeepSpeed's init_compression ranks |w| before its engine casts the model; slimtorch ranks the float weights
    before deepspeed.initialize too, so bf16 rounding (which reorders near-equal weights) changes nothing. The fp32
    master holds the zeros, and its kept weights keep their fp32 values (masking multiplies the master; writing the
    bf16 weights into it would round them)."""
    from tests.reference.protocol import ceil_top_k

    ranks = run(slow_runs, f"l1_bf16_zero{stage}")
    assert ranks[0]["dtype"] == "torch.bfloat16"
    assert torch.equal(ranks[0]["mask"], ranks[1]["mask"])

    start = ranks[0]["start"]
    assert torch.equal(ranks[0]["mask"], ceil_top_k(start, 0.3))
    # ranking the cast weights would differ
    assert not torch.equal(ceil_top_k(start, 0.3), ceil_top_k(start.to(torch.bfloat16), 0.3))
    master, mask = ranks[0]["master"], ranks[0]["mask"]
    assert torch.equal(master != 0, mask)
    kept = master[mask]
    assert (kept != kept.to(torch.bfloat16).float()).float().mean() > 0.5  # fp32 values, not bf16 ones


@functools.lru_cache(maxsize=None)
def single_process_topk():
    x, y = W.digits_tensors()
    model = W.digits_cnn()
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cb = st.prepare_pruning(model, D.TOPK, optimizer=opt)
    steps = [{l.name: l.learned.keep().clone() for l in cb.pruner.layers} for _ in W.train(model, opt, x, y)]
    cb.finalize()
    return steps, model.state_dict()


@pytest.mark.parametrize("stage", [0, 2])
def test_topk_row_and_channel_pruning_under_the_engine(stage, runs):
    """The scores are created before the engine and trained by its optimizer: both ranks hold the same unit masks
    after every update, the single process's, and finalize writes the zeros into DeepSpeed's fp32 master."""
    ranks = run(runs, f"topk{stage}")
    steps, weights = single_process_topk()
    for update, (a, b, one) in enumerate(zip(ranks[0]["steps"], ranks[1]["steps"], steps)):
        for name in one:
            assert torch.equal(a[name], b[name]) and torch.equal(a[name], one[name]), (update, name)
            assert int(a[name].sum()) == a[name].numel() // 2
    final = ranks[0]["final"]
    assert not any("scores" in k for k in final)
    keep_rows, keep_channels = steps[-1]["6"], steps[-1]["3"]
    assert (final["6.weight"][~keep_rows] == 0).all() and (final["6.bias"][~keep_rows] == 0).all()
    assert (final["3.weight"][~keep_channels] == 0).all() and (final["3.bias"][~keep_channels] == 0).all()
    for key, value in weights.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6)
    if stage == 2:
        master = ranks[0]["master"]
        assert (master["6.weight"][~keep_rows] == 0).all() and (master["3.bias"][~keep_channels] == 0).all()
