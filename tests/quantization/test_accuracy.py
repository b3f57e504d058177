"""Accuracy-aware quantization: the criterion, the sensitivity ranking, the search and its bounds, the report, the
plot, save/load and export of a partially quantized model, and every misuse as a clear error."""
import copy
import time
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtorch as st
from slimtorch import CalibrationError, ConfigError, EvaluationError
from slimtorch.config.quant_schema import AccuracyCriterion
from slimtorch.quantization.accuracy import (
    NO_CANDIDATE,
    Stop,
    Trials,
    as_metric,
    floating_tensors,
    rank,
    search,
    threshold,
)
from slimtorch.quantization.qdq import QDQConv2d, QDQLinear, QDQModule

from .cnn_data import batches as tuple_batches
from .cnn_data import digits_data, torch_threads, train_digits_cnn
from .test_api import PostLN  # a post-LN block with planted outlier channels


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):  # small models on a shared 2-core machine: one thread is several times faster
        yield


def static(**body):
    return {"compression_inference": {"static_quantization": {"enabled": True, **body}}}


def criterion(**c):
    return static(accuracy_criterion=c)


# -- a small MLP trained on scikit-learn's digits --------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    d = digits_data()
    return d.x_train.flatten(1), d.y_train, d.x_test.flatten(1), d.y_test


@pytest.fixture(scope="module")
def trained_mlp(digits):
    x, y, _, _ = digits
    with torch_threads(1):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    return m.eval()


@pytest.fixture
def mlp(trained_mlp):
    return copy.deepcopy(trained_mlp)


@pytest.fixture(scope="module")
def calib(digits):
    return [digits[0][i:i + 64] for i in range(0, 512, 64)]


class Counted:
    """An eval_fn that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, model):
        self.calls += 1
        return self.fn(model)


def accuracy_fn(digits):
    _, _, x, y = digits

    @torch.no_grad()
    def fn(m):
        return float((m(x).argmax(1) == y).float().mean())
    return Counted(fn)


def loss_fn(digits):
    _, _, x, y = digits

    @torch.no_grad()
    def fn(m):
        return F.cross_entropy(m(x), y)  # a 0-d tensor: accepted
    return Counted(fn)


def fidelity_fn(reference, x):
    """-||y - y_float|| / ||y_float||: 0 on the float model, below 0 for any quantized layer."""
    with torch.no_grad():
        ref = reference(x)

    def fn(m):
        with torch.no_grad():
            return -float((m(x) - ref).norm() / ref.norm())
    return Counted(fn)


def quantize(model, cfg, calib, eval_fn, **kw):
    return st.quantize(model, cfg, calib_dataloader=calib, eval_fn=eval_fn, progress=False, **kw)


def float_layers(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def qdq_layers(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, QDQModule))


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_report_matches_model(q):
    report = st.quantization_report(q)
    acc = report.accuracy
    assert sorted(r.name for r in report.quantized) == qdq_layers(q)
    fallback = [f.name for f in report.left_float if f.reason.startswith("accuracy fallback")]
    assert sorted(fallback) == float_layers(q) == sorted(r.name for r in acc.fallback)
    assert acc.eval_calls == acc.trials + 1 == len(acc.log) + 1
    assert acc.final == next(t.metric for t in acc.log if sorted(t.float_layers) == float_layers(q))


# -- the criterion, the metric, the search: pure functions ---------------------------------------------------------
def test_threshold_relative_absolute_and_direction():
    assert threshold(AccuracyCriterion(tolerable_loss=0.1), 2.0) == pytest.approx(1.8)
    assert threshold(AccuracyCriterion(tolerable_loss=0.1, relative=False), 2.0) == pytest.approx(1.9)
    assert threshold(AccuracyCriterion(tolerable_loss=0.1, higher_is_better=False), 2.0) == pytest.approx(2.2)
    assert threshold(AccuracyCriterion(tolerable_loss=0.1, relative=False, higher_is_better=False), 2.0) == \
        pytest.approx(2.1)
    assert threshold(AccuracyCriterion(tolerable_loss=0.1), -2.0) == pytest.approx(-2.2)  # relative to |baseline|


@pytest.mark.parametrize("value,expected", [(0.5, 0.5), (3, 3.0), (np.float32(0.25), 0.25), (np.int64(2), 2.0),
                                            (torch.tensor(0.75), 0.75), (torch.tensor([0.5]), 0.5),
                                            (np.array(1.5), 1.5)])
def test_as_metric_accepts_one_number(value, expected):
    assert as_metric(value, "x") == expected


@pytest.mark.parametrize("value,part", [(float("nan"), "returned nan"), (float("inf"), "returned inf"),
                                        (torch.tensor([0.1, 0.2]), "tensor of shape [2]"), ("0.9", "str '0.9'"),
                                        (None, "NoneType None"), (True, "bool True"),
                                        (np.zeros(3), "array of shape [3]"), ({"acc": 0.9}, "dict")])
def test_as_metric_rejects_everything_else(value, part):
    with pytest.raises(EvaluationError) as info:
        as_metric(value, "the fully quantized model")
    assert part in str(info.value) and "for the fully quantized model" in str(info.value)
    assert "one finite number" in str(info.value)


def test_floating_tensors_of_every_output_shape():
    a, b, ids = torch.ones(2), torch.zeros(3), torch.arange(3)
    Out = namedtuple("Out", "logits ids")
    assert len(floating_tensors(a)) == 1 and floating_tensors(ids) == []
    assert [t.shape for t in floating_tensors((a, [b, ids], {"x": a}))] == [(2,), (3,), (2,)]
    assert len(floating_tensors(OrderedDict(h=a, m=ids, p=b))) == 2 and len(floating_tensors(Out(a, ids))) == 1


def test_rank_orders_by_sensitivity_and_breaks_ties_by_model_order():
    ranking = rank(["a", "b", "c", "d"], 1.0, [0.9, 0.5, 0.9, 1.1])
    assert [(r.name, r.rank) for r in ranking] == [("a", 2), ("b", 1), ("c", 3), ("d", 4)]
    assert ranking[1].sensitivity == pytest.approx(0.5) and ranking[3].sensitivity == pytest.approx(-0.1)


def _run_search(order, needed, max_trials=100):
    """search() with a fake metric: 1.0 when every layer of ``needed`` is in float, else 0.0."""
    calls = []

    def metric_of(s):
        calls.append(s)
        return 1.0 if needed <= s else 0.0

    trials = Trials(metric_of, AccuracyCriterion(tolerable_loss=0.0, max_trials=max_trials), 1.0, order.index)
    try:
        search(order, trials)
        reason = None
    except Stop as s:
        reason = s.reason
    return trials, calls, reason


def test_search_finds_the_smallest_set_and_never_repeats_a_candidate():
    order = list("abcdefghij")
    trials, calls, reason = _run_search(order, {"a", "c", "f"})
    assert reason is None and trials.best().float_layers == ("a", "c", "f")
    assert len(calls) == len(set(calls)) == len(trials.log)
    # exponential k = 1, 2, 4, 8 (passes), binary 6 (passes), 5, refine drops b, d, e (f is needed)
    assert [len(s) for s in calls[:6]] == [0, 1, 2, 4, 8, 6]
    _, calls_top, _ = _run_search(order, {"a"})
    assert calls_top == [frozenset(), frozenset("a")]  # the most sensitive layer alone: two trials


def test_search_never_puts_every_layer_in_float_and_respects_max_trials():
    order = list("abcde")
    trials, calls, reason = _run_search(order, set(order))  # only the all-float model would pass
    assert reason == NO_CANDIDATE and max(len(s) for s in calls) == 4 and not trials.best().passed
    assert [len(s) for s in calls] == [0, 1, 2, 4]
    trials, calls, reason = _run_search(order, {"e"}, max_trials=3)
    assert reason == "max_trials" and len(calls) == 3
    _, calls, reason = _run_search(["a"], {"a"})
    assert reason == NO_CANDIDATE and calls == [frozenset()]


def test_best_candidate_rules():
    c = AccuracyCriterion(tolerable_loss=0.0)
    metrics = {frozenset(): 0.2, frozenset("a"): 0.9, frozenset("ab"): 0.9, frozenset("abc"): 0.95}
    trials = Trials(metrics.__getitem__, c, 1.0, "abc".index)
    for s in metrics:
        trials(s)
    assert trials.best().float_layers == ("a", "b", "c")  # none passes: the best metric
    trials = Trials(metrics.__getitem__, c, 0.9, "abc".index)
    for s in metrics:
        trials(s)
    assert trials.best().float_layers == ("a",)  # passing: the fewest float layers


# -- quantize() with eval_fn on a real model --------------------------------------------------------------------------
def test_criterion_already_met_needs_two_eval_calls_and_no_fallback(mlp, digits, calib, tmp_path):
    fn = accuracy_fn(digits)
    q = quantize(mlp, static(), calib, fn)  # eval_fn alone: the default criterion (1% relative)
    report = st.quantization_report(q)
    acc = report.accuracy
    assert fn.calls == 2 and acc.eval_calls == 2 and acc.trials == 1
    assert acc.met and acc.fallback == [] and acc.ranking == [] and acc.stopped_because == "criterion met"
    assert acc.criterion_source.startswith("default") and "1% relative" in acc.criterion
    assert qdq_layers(q) == ["0", "2", "4", "6", "8"] and len(report.quantized) == 5
    assert "accuracy: metric >= " in str(report) and "0 layers in float, 2 eval_fn calls" in str(report)
    bars, text = _plot_text(report, tmp_path / "met.svg")
    assert bars == [] and "criterion met" in text and "no ranking was needed" in text


def test_strict_criterion_falls_back_few_layers_and_the_result_meets_it(mlp, digits, calib):
    before = copy.deepcopy(mlp)
    x = digits[2]
    fn = fidelity_fn(mlp, x)
    plain = -fn(st.quantize(mlp, static(), calib_dataloader=calib, progress=False))  # fully quantized distance
    fn.calls = 0
    cfg = criterion(tolerable_loss=0.78 * plain, relative=False)  # the most sensitive layer alone is not enough
    q = quantize(mlp, cfg, calib, fn)
    acc = st.quantization_report(q).accuracy
    assert same_state(mlp, before)
    assert acc.met and acc.baseline == 0.0 and 2 <= len(acc.fallback) <= 3
    assert fn.calls == acc.eval_calls
    assert fn(q) >= acc.threshold and fn(q) == acc.final  # re-evaluated: the returned model meets it
    assert_report_matches_model(q)
    assert [r.rank for r in acc.fallback] == sorted(r.rank for r in acc.fallback)
    assert sorted(r.rank for r in acc.ranking) == [1, 2, 3, 4, 5] and len(acc.ranking) == 5
    top = min(acc.ranking, key=lambda r: r.rank)
    assert top.error_without < acc.error_quantized and top.sensitivity > 0
    again = quantize(mlp, cfg, calib, fidelity_fn(mlp, x))  # deterministic
    assert float_layers(again) == float_layers(q) and st.quantization_report(again).accuracy.log == acc.log
    assert same_state(again, q)


def test_loss_metric_lower_is_better_and_relative_vs_absolute(mlp, digits, calib):
    fn = loss_fn(digits)
    base = float(fn(mlp))
    plain = float(fn(st.quantize(mlp, static(), calib_dataloader=calib, progress=False)))
    assert plain > base  # int8 costs this model some loss: the criterion below needs a fallback
    rel = (plain - base) / base / 2
    q = quantize(mlp, criterion(tolerable_loss=rel, higher_is_better=False), calib, fn)
    acc = st.quantization_report(q).accuracy
    assert acc.met and acc.fallback and acc.threshold == pytest.approx(base * (1 + rel))
    assert float(fn(q)) <= acc.threshold and "lower is better" in acc.criterion
    a = quantize(mlp, criterion(tolerable_loss=rel, relative=False, higher_is_better=False), calib, fn)
    acc_abs = st.quantization_report(a).accuracy
    assert acc_abs.threshold == pytest.approx(base + rel) and acc_abs.met
    assert "absolute" in acc_abs.criterion and "relative" in acc.criterion


def test_impossible_criterion_stops_warns_and_says_so(mlp, digits, calib):
    fn = fidelity_fn(mlp, digits[2])
    with pytest.warns(UserWarning, match=r"accuracy_criterion not met.*no partially-quantized model meets it"):
        q = quantize(mlp, criterion(tolerable_loss=0.0), calib, fn)  # any quantized layer moves the outputs
    acc = st.quantization_report(q).accuracy
    assert not acc.met and acc.stopped_because == NO_CANDIDATE
    assert [len(t.float_layers) for t in acc.log] == [0, 1, 2, 4]  # never all 5 layers in float
    assert acc.final == max(t.metric for t in acc.log) and len(qdq_layers(q)) >= 1
    assert "NOT met" in str(st.quantization_report(q)) and fn.calls == acc.eval_calls
    assert_report_matches_model(q)


def test_max_trials_bounds_the_eval_calls(mlp, digits, calib):
    fn = fidelity_fn(mlp, digits[2])
    with pytest.warns(UserWarning, match=r"max_trials \(2\) eval_fn calls on candidates were spent"):
        q = quantize(mlp, criterion(tolerable_loss=0.0, max_trials=2), calib, fn)
    acc = st.quantization_report(q).accuracy
    assert fn.calls == 3 and acc.trials == 2 and acc.stopped_because == "max_trials" and not acc.met


def _plot_text(report, path):
    root = ET.parse(report.save_plot(path)).getroot()
    return [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if "bar" in r.get("class", "")], \
        " ".join(t.text for t in root.iter("{http://www.w3.org/2000/svg}text"))


def test_timeout_stops_the_search(mlp, digits, calib, tmp_path):
    slow = fidelity_fn(mlp, digits[2])

    def fn(m):
        time.sleep(0.05)
        return slow(m)
    with pytest.warns(UserWarning, match=r"timeout \(0.01 s\) ran out"):
        q = quantize(mlp, criterion(tolerable_loss=0.0, timeout=0.01), calib, fn)
    acc = st.quantization_report(q).accuracy
    assert acc.stopped_because == "timeout" and acc.trials == 1 and not acc.met  # trial 1 always runs
    assert qdq_layers(q) == ["0", "2", "4", "6", "8"]
    bars, text = _plot_text(st.quantization_report(q), tmp_path / "t.svg")
    assert bars == [] and "stopped before it was complete (timeout)" in text


def test_eval_fn_modes_are_restored_and_dynamic_uses_the_loader_for_ranking(mlp, digits, calib):
    fn = fidelity_fn(mlp, digits[2])
    plain = -fn(st.quantize(mlp, {"compression_inference": {"dynamic_quantization": {"enabled": True}}}))

    def flips_mode(m):
        m.train()
        return fn(m)
    cfg = {"compression_inference": {"dynamic_quantization": {
        "enabled": True, "accuracy_criterion": {"tolerable_loss": 0.95 * plain, "relative": False}}}}
    q = quantize(mlp, cfg, calib, flips_mode)
    assert not any(m.training for m in q.modules())  # as the model passed in
    acc = st.quantization_report(q).accuracy
    assert acc.met and acc.fallback and st.quantization_report(q).mode == "dynamic"
    assert all(q.get_submodule(n).dynamic for n in qdq_layers(q))


# -- report, plot, save/load and export of a partially quantized model -----------------------------------------------
def test_save_plot_writes_one_bar_per_layer(mlp, digits, calib, tmp_path):
    fn = fidelity_fn(mlp, digits[2])
    with pytest.warns(UserWarning):
        q = quantize(mlp, criterion(tolerable_loss=0.0, max_trials=3), calib, fn)
    report = st.quantization_report(q)
    path = report.save_plot(tmp_path / "sensitivity.svg")
    root = ET.parse(path).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    bars = [r for r in root.iter(f"{ns}rect") if "bar" in r.get("class", "").split()]
    assert len(bars) == 5
    assert sorted(b.find(f"{ns}title").text.split(":")[0] for b in bars if "fallback" in b.get("class")) == \
        float_layers(q)
    title = " ".join(t.text for t in root.iter(f"{ns}text"))
    assert "criterion not met (max_trials)" in title
    with pytest.raises(ConfigError, match="no accuracy search to plot"):
        st.quantization_report(st.quantize(mlp, static(), calib_dataloader=calib, progress=False)).save_plot(
            tmp_path / "x.svg")


def _needs_float(name):
    """An eval_fn that passes (1.0) only while layer ``name`` is float: forces one specific fallback."""
    return Counted(lambda m: 1.0 if isinstance(m.get_submodule(name), (nn.Linear, nn.Conv2d)) else 0.0)


def test_partially_quantized_cnn_round_trips_and_exports(tmp_path):
    d = digits_data()
    model = train_digits_cnn()
    calib = tuple_batches(d.x_train[:256], 64)
    q = quantize(model, criterion(tolerable_loss=0.0), calib, _needs_float("0"))  # conv 0 has no bias until folding
    assert isinstance(q[0], nn.Conv2d) and isinstance(q[3], QDQConv2d) and isinstance(q[7], QDQLinear)
    assert q[0].bias is not None and model[0].bias is None
    assert_report_matches_model(q)
    x = d.x_test[:16]
    restored = st.load_quantized(model, q.state_dict())
    assert same_state(restored, q) and isinstance(restored[0], nn.Conv2d)
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))
    onnx = pytest.importorskip("onnx")
    path = st.export_onnx(q, x, tmp_path / "partial.onnx")  # checked against PyTorch in ONNX Runtime
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("QuantizeLinear") == 2  # conv 0 reads float input, no QDQ pair
    float_w = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and list(i.dims) == [16, 1, 3, 3]]
    assert len(float_w) == 1


def test_fallback_after_explicit_smoothquant_is_the_unsmoothed_float_layer():
    model = PostLN().eval()
    data = [torch.randn(16, 32) for _ in range(4)]
    cfg = static(smoothquant={"enabled": True, "folding": False}, activation={"dtype": "int8"},
                 accuracy_criterion={"tolerable_loss": 0.0})
    any_float = Counted(lambda m: float(any(isinstance(x, nn.Linear) for x in (m.q, m.k, m.out))))
    q = quantize(model, cfg, data, any_float)
    fallback = [r.name for r in st.quantization_report(q).accuracy.fallback]
    assert len(fallback) == 1 and len(qdq_layers(q)) == 2
    assert all(q.get_submodule(n).input_smooth is not None for n in qdq_layers(q))  # every Linear was smoothed
    # the float layer is the original, not the smoothed copy: no 1/s multiplies its input any more
    assert torch.equal(q.get_submodule(fallback[0]).weight, model.get_submodule(fallback[0]).weight)
    with torch.no_grad():
        err = (q(data[0]) - model(data[0])).norm() / model(data[0]).norm()
    assert err < 0.05


# -- misuse: clear errors, the model passed in unchanged ---------------------------------------------------------------
def _raises_on(call):
    state = {"n": 0}

    def fn(m):
        state["n"] += 1
        if state["n"] == call:
            raise ValueError("metric blew up")
        return 0.0 if state["n"] == 1 else -1.0 * state["n"]  # quantized candidates fail a 0-loss criterion
    return fn


DYN = {"compression_inference": {"dynamic_quantization": {"enabled": True, "accuracy_criterion": {}}}}
MISTAKES = [  # (id, config, with a loader?, make eval_fn, error, message parts)
    ("criterion_without_eval_fn", criterion(tolerable_loss=0.01), True, lambda: None, ConfigError,
     ["compression_inference.static_quantization.accuracy_criterion is set", "eval_fn="]),
    ("eval_fn_not_callable", static(), True, lambda: 0.9, ConfigError, ["eval_fn must be a function", "got float"]),
    ("static_criterion_without_loader", criterion(), False, lambda: lambda m: 1.0, CalibrationError,
     ["static_quantization.accuracy_criterion", "ranks layers by sensitivity", "calib_dataloader="]),
    ("dynamic_criterion_without_loader", DYN, False, lambda: lambda m: 1.0, CalibrationError,
     ["dynamic_quantization.accuracy_criterion", "used only for this ranking"]),
    ("raises_on_baseline", criterion(tolerable_loss=0.0), True, lambda: _raises_on(1), EvaluationError,
     ["while evaluating the float baseline", "ValueError: metric blew up"]),
    ("raises_on_quantized", criterion(tolerable_loss=0.0), True, lambda: _raises_on(2), EvaluationError,
     ["while evaluating the fully quantized model", "ValueError: metric blew up"]),
    ("raises_on_candidate", criterion(tolerable_loss=0.0), True, lambda: _raises_on(3), EvaluationError,
     ["while evaluating the candidate with 1 float layer (", "ValueError: metric blew up"]),
    ("returns_nan", criterion(), True, lambda: lambda m: float("nan"), EvaluationError,
     ["returned nan for the float baseline", "one finite number"]),
    ("returns_vector", criterion(), True, lambda: lambda m: torch.ones(3), EvaluationError,
     ["returned a tensor of shape [3]", "one-element tensor"]),
    ("returns_text", criterion(), True, lambda: lambda m: "good", EvaluationError, ["returned str 'good'"]),
]


@pytest.mark.parametrize("cfg,loader,make_fn,error,parts", [pytest.param(*m[1:], id=m[0]) for m in MISTAKES])
def test_mistakes_raise_clear_errors_and_leave_model_alone(trained_mlp, calib, cfg, loader, make_fn, error, parts):
    model = copy.deepcopy(trained_mlp).train()
    model[2].eval()  # a mixed train/eval model: every module's mode must survive
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    with pytest.raises(error) as info:
        st.quantize(model, cfg, calib_dataloader=calib if loader else None, eval_fn=make_fn(), progress=False)
    for part in parts:
        assert part in str(info.value), f"{part!r} not in {info.value}"
    if "metric blew up" in parts[-1]:
        assert isinstance(info.value.__cause__, ValueError)  # chained: the user's traceback is kept
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert not any(isinstance(m, QDQModule) for m in model.modules())


# -- all-MiniLM-L6-v2: sentence embeddings within 0.005 of the float model's (slow) ---------------------------------
@pytest.fixture(scope="module")
def minilm_texts():
    import random

    from tests.conftest import real_paragraphs
    paras = real_paragraphs()
    random.Random(0).shuffle(paras)
    return paras[:256], paras[256:384]  # calibration, held out (disjoint)


@pytest.fixture
def _two_threads():
    with torch_threads(2):  # a real transformer: two threads on 2 idle cores are ~1.8x faster than one
        yield


def _minilm_case(minilm, minilm_texts, held_out):
    from .test_minilm_ptq import embed_torch, tokenize

    model, tok = minilm
    model.eval()
    # batches of 4: the ranking runs its first RANKING_BATCHES batches once per layer (38 forwards), so they are small
    calib = tokenize(tok, minilm_texts[0], batch=4)
    held = tokenize(tok, minilm_texts[1][:held_out])
    ref = embed_torch(model, held)

    def mean_cosine(m):  # 1.0 on the float model
        return float(F.cosine_similarity(embed_torch(m, held), ref).mean())
    return model, calib, Counted(mean_cosine)


@pytest.mark.slow
def test_minilm_mean_cosine_within_0005_of_float(minilm, minilm_texts, _two_threads):
    model, calib, fn = _minilm_case(minilm, minilm_texts, held_out=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = static(num_calibration_batches=32, accuracy_criterion={"tolerable_loss": 0.005, "relative": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # met: no warning
        q = quantize(model, cfg, calib, fn)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = st.quantization_report(q)
    acc = report.accuracy
    print(f"\nMiniLM: {acc.summary()}\n  float layers: {[r.name for r in acc.fallback]}\n  trials: "
          f"{[(len(t.float_layers), round(t.metric, 5)) for t in acc.log]}")
    assert acc.log[0].metric < acc.threshold  # default static misses it: the search had work to do
    assert acc.met and 1 <= len(acc.fallback) <= 6 and fn.calls == acc.eval_calls
    assert fn(q) >= acc.threshold and fn(q) >= 0.995 - 1e-6  # re-evaluated on the returned model
    assert len(report.quantized) + len(acc.fallback) == 37 and len(acc.ranking) == 37
    assert_report_matches_model(q)

