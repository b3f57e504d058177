"""Accuracy-aware post-training quantization: put the layers whose quantization costs the most back in float until
``eval_fn`` meets the accuracy criterion.

1. baseline = ``eval_fn`` on the float copy, before anything is changed (a broken eval_fn fails before calibration);
2. trial 1: the fully quantized model; if it meets the criterion nothing goes back to float;
3. rank the layers by sensitivity on the first calibration batches, without ``eval_fn``: with e(S) the relative
   output error ``sum (y_S - y_float)^2 / sum y_float^2`` when only the layers in S are float,
   sensitivity(l) = e({}) - e({l}); ties keep model order;
4. the smallest k such that the k most sensitive layers in float meet the criterion: k = 1, 2, 4, ... then a binary
   search between the last failing and the first passing k; k <= n - 1 (all layers in float is no quantization);
5. refine: drop layers from that set, least sensitive first, wherever the criterion still holds.

Candidates are made by swapping modules in place (QDQ <-> float), never by copying the model, and every metric is
cached by fallback set, so no candidate is evaluated twice. ``max_trials`` bounds the ``eval_fn`` calls on
candidates; ``timeout`` the wall time from the first candidate evaluation on (ranking included). When a bound
stops the search the best candidate so far is kept: the passing one with the fewest float layers, else the one with
the best metric.
"""
from __future__ import annotations

import itertools
import math
import numbers
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..config.quant_schema import AccuracyCriterion
from ..errors import CalibrationError, ConfigError, EvaluationError
from .distributed import LOCAL
from .passes import feed_batches, preserved_modes
from .report import AccuracySearch, FloatLayer, LayerSensitivity, QuantizationReport, Trial

RANKING_BATCHES = 4  # calibration batches the sensitivity ranking runs: enough to order layers, cheap per layer
NO_CANDIDATE = "no partially-quantized model meets it"
EvalFn = Callable[[nn.Module], Any]


# -- arguments ------------------------------------------------------------------------------------------------------
def resolve_criterion(section, where: str, eval_fn: Any, calib_dataloader: Any
                      ) -> Optional[Tuple[AccuracyCriterion, str]]:
    """``(criterion, where it came from)``, or None without eval_fn; every inconsistent combination is an error."""
    crit = section.accuracy_criterion
    if eval_fn is None:
        if crit is not None:
            raise ConfigError(f"{where}.accuracy_criterion is set, but quantize() got no eval_fn: pass "
                              "eval_fn=<a function model -> number, e.g. accuracy or -loss on held-out data>, or "
                              "remove accuracy_criterion")
        return None
    if not callable(eval_fn):
        raise ConfigError(f"quantize(eval_fn=...): eval_fn must be a function model -> number, got "
                          f"{type(eval_fn).__name__}")
    if calib_dataloader is None:
        raise CalibrationError(f"{where}.accuracy_criterion: accuracy-aware quantization ranks layers by "
                               "sensitivity on calibration data: pass calib_dataloader=<an iterable of input "
                               "batches> (for dynamic quantization it is used only for this ranking)")
    if crit is not None:
        return crit, "config"
    return AccuracyCriterion(), f"default (eval_fn given, no {where}.accuracy_criterion in the config)"


# -- the criterion (pure) -------------------------------------------------------------------------------------------
def threshold(c: AccuracyCriterion, baseline: float) -> float:
    """The worst metric the criterion accepts."""
    allowed = c.tolerable_loss * abs(baseline) if c.relative else c.tolerable_loss
    return baseline - allowed if c.higher_is_better else baseline + allowed


def passes(c: AccuracyCriterion, limit: float, metric: float) -> bool:
    return metric >= limit if c.higher_is_better else metric <= limit


def criterion_text(c: AccuracyCriterion, baseline: float) -> str:
    """E.g. ``metric >= 0.9405 (baseline 0.95 - 1% relative; higher is better)``."""
    op, sign = (">=", "-") if c.higher_is_better else ("<=", "+")
    loss = f"{c.tolerable_loss:.4g} absolute" if not c.relative else f"{100 * c.tolerable_loss:.4g}% relative"
    return (f"metric {op} {threshold(c, baseline):.6g} (baseline {baseline:.6g} {sign} {loss}; "
            f"{'higher' if c.higher_is_better else 'lower'} is better)")


def as_metric(value: Any, candidate: str) -> float:
    """``eval_fn``'s result as a finite float (int, float, numpy scalar or one-element tensor/array)."""
    expected = ("eval_fn must return one finite number (a float, an int, a numpy scalar or a one-element tensor), "
                "e.g. accuracy or -loss")
    raw = value
    if hasattr(value, "item") and not isinstance(value, bool) and getattr(value, "dtype", None) is not None:
        size = value.numel() if isinstance(value, Tensor) else getattr(value, "size", 1)
        if size != 1:
            raise EvaluationError(f"eval_fn returned {_shown(raw)} for {candidate}; {expected}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EvaluationError(f"eval_fn returned {_shown(raw)} for {candidate}; {expected}")
    f = float(value) + 0.0  # -0.0 -> 0.0, so that a baseline of -loss 0 does not print as -0
    if not math.isfinite(f):
        raise EvaluationError(f"eval_fn returned {f} for {candidate}; {expected} (check it on the float model, "
                              "and for a division by zero or an empty evaluation set)")
    return f


def _shown(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)} ({str(value.dtype).replace('torch.', '')})"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {list(value.shape)} ({value.dtype})"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def candidate_text(fallback: Sequence[str]) -> str:
    if not fallback:
        return "the fully quantized model"
    names = ", ".join(fallback[:4]) + (", ..." if len(fallback) > 4 else "")
    return f"the candidate with {len(fallback)} float layer{'s' if len(fallback) > 1 else ''} ({names})"


# -- sensitivity (pure parts) ---------------------------------------------------------------------------------------
def floating_tensors(obj: Any) -> List[Tensor]:
    """Every floating-point tensor in a model output: a tensor, tuple/list, dict or transformers ModelOutput."""
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):  # ModelOutput is an OrderedDict: its values are the outputs that are set
        return [t for v in obj.values() for t in floating_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in floating_tensors(v)]
    return []


def squared_error(outputs: List[Tensor], reference: List[Tensor]) -> Tuple[float, float]:
    """``(sum (y - y_ref)^2, sum y_ref^2)`` over matching tensors, accumulated in float64."""
    if len(outputs) != len(reference):
        raise CalibrationError(f"the model returned {len(outputs)} floating tensors where the float model returned "
                               f"{len(reference)}; the sensitivity ranking compares outputs one to one")
    num = sum(float((o.double() - r.double()).abs().pow(2).sum()) for o, r in zip(outputs, reference))
    den = sum(float(r.double().abs().pow(2).sum()) for r in reference)
    return num, den


def rank(names: Sequence[str], error_quantized: float, errors_without: Sequence[float]) -> List[LayerSensitivity]:
    """Sensitivity of each layer (model order kept in the list); rank 1 = most sensitive, ties by model order."""
    sens = [error_quantized - e for e in errors_without]
    order = sorted(range(len(names)), key=lambda i: -sens[i])  # sorted() is stable: ties keep model order
    ranks = {i: r + 1 for r, i in enumerate(order)}
    return [LayerSensitivity(n, ranks[i], sens[i], errors_without[i]) for i, n in enumerate(names)]


# -- the search (pure given an evaluate function) -------------------------------------------------------------------
class Stop(Exception):
    """The search ends before it has finished: ``reason`` is max_trials, timeout or NO_CANDIDATE."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def search(order: Sequence[str], ok: Callable[[FrozenSet[str]], bool]) -> FrozenSet[str]:
    """The fallback set: the fewest of ``order`` (most sensitive first) in float for which ``ok`` holds.

    ``ok(set)`` evaluates a candidate (cached by the caller) and may raise :class:`Stop`. Raises ``Stop(NO_CANDIDATE)``
    when even the n - 1 most sensitive layers in float do not pass.
    """
    n = len(order)
    if ok(frozenset()):
        return frozenset()
    if n < 2:
        raise Stop(NO_CANDIDATE)
    lo, k = 0, 1  # exponential search: lo always fails, k is the next size to try
    while not ok(frozenset(order[:k])):
        if k == n - 1:
            raise Stop(NO_CANDIDATE)
        lo, k = k, min(2 * k, n - 1)
    hi = k
    while hi - lo > 1:  # binary search: prefix lo fails, prefix hi passes
        mid = (lo + hi) // 2
        if ok(frozenset(order[:mid])):
            hi = mid
        else:
            lo = mid
    kept = list(order[:hi])
    for name in reversed(order[:hi]):  # refine, least sensitive first: a prefix is not always the smallest set
        smaller = frozenset(kept) - {name}
        if ok(smaller):
            kept.remove(name)
    return frozenset(kept)


class Trials:
    """Runs candidates through ``metric_of`` with a cache, ``max_trials`` and a deadline; keeps the log."""

    def __init__(self, metric_of: Callable[[FrozenSet[str]], float], c: AccuracyCriterion, limit: float,
                 order_key: Callable[[str], int], clock: Callable[[], float] = time.perf_counter,
                 on_trial: Optional[Callable[[Trial], None]] = None, agree: Callable[[bool], bool] = bool):
        self.metric_of, self.c, self.limit, self.key, self.clock = metric_of, c, limit, order_key, clock
        self.agree = agree  # distributed: the timeout holds when it has run out on any rank
        self.deadline = clock() + c.timeout if c.timeout > 0 else None
        self.cache: Dict[FrozenSet[str], float] = {}
        self.log: List[Trial] = []
        self.on_trial = on_trial

    def check_time(self) -> None:
        if self.deadline is not None and self.agree(self.clock() >= self.deadline):
            raise Stop("timeout")

    def __call__(self, fallback: FrozenSet[str]) -> bool:
        if fallback not in self.cache:
            if self.log:  # the fully quantized model is always evaluated, whatever the bounds
                if len(self.log) >= self.c.max_trials:
                    raise Stop("max_trials")
                self.check_time()
            metric = self.metric_of(fallback)
            self.cache[fallback] = metric
            self.log.append(Trial(tuple(sorted(fallback, key=self.key)), metric,
                                  passes(self.c, self.limit, metric)))
            if self.on_trial is not None:
                self.on_trial(self.log[-1])
        return passes(self.c, self.limit, self.cache[fallback])

    def best(self) -> Trial:
        """The passing trial with the fewest float layers (then the best metric); else the best metric."""
        passing = [t for t in self.log if t.passed]
        if passing:
            return min(passing, key=lambda t: (len(t.float_layers), -t.metric if self.c.higher_is_better else t.metric))
        return min(self.log, key=lambda t: (-t.metric if self.c.higher_is_better else t.metric, len(t.float_layers)))


# -- the model side -------------------------------------------------------------------------------------------------
class Swapper:
    """Toggles quantized layers of ``model`` between their QDQ module and the float module it replaced, in place."""

    def __init__(self, model: nn.Module, float_modules: Dict[str, nn.Module]):
        self.model, self.names = model, list(float_modules)
        self.floats = float_modules
        self.qdqs = {n: model.get_submodule(n) for n in self.names}

    def set(self, fallback: Iterable[str]) -> None:
        wanted = set(fallback)
        for n in self.names:
            parent, _, child = n.rpartition(".")
            owner = self.model.get_submodule(parent) if parent else self.model
            module = self.floats[n] if n in wanted else self.qdqs[n]
            if getattr(owner, child) is not module:
                setattr(owner, child, module)


def call_eval_fn(eval_fn: EvalFn, model: nn.Module, candidate: str, sync: Any = LOCAL) -> float:
    """``eval_fn(model)`` as a float; the train/eval mode of every submodule is restored afterwards.

    Distributed (``sync``): an error on any rank is raised on every rank, and every rank gets the same metric
    (the mean of the ranks' values when they differ, with a warning)."""
    with sync.guard(f"eval_fn on {candidate}"):
        try:
            with preserved_modes(model, None):  # eval_fn may switch modes; the search's next candidate must not see it
                value = eval_fn(model)
        except Exception as e:
            raise EvaluationError(f"eval_fn raised while evaluating {candidate}: {type(e).__name__}: {e}") from e
        metric = as_metric(value, candidate)
    return sync.agreed_metric(metric, candidate)


def evaluate_baseline(model: nn.Module, eval_fn: EvalFn, sync: Any = LOCAL) -> Tuple[float, float]:
    """``(eval_fn(float model), seconds)``."""
    started = time.perf_counter()
    return call_eval_fn(eval_fn, model, "the float baseline (the model before quantization)", sync), \
        time.perf_counter() - started


def rank_layers(model: nn.Module, swap: Swapper, loader: Iterable, check_time: Callable[[], None],
                sync: Any = LOCAL) -> Tuple[float, List[LayerSensitivity]]:
    """``(error of the fully quantized model, sensitivities in model order)`` on the first calibration batches
    (distributed: on every rank's first batches, the squared errors summed over the ranks)."""
    with sync.guard("the sensitivity ranking"):
        batches = list(itertools.islice(loader, RANKING_BATCHES))
        if not batches:
            raise CalibrationError("the calibration loader yielded no batches; the accuracy search ranks layers on "
                                   "them")
    what = "sensitivity ranking: calibration"
    refs: List[List[Tensor]] = []

    def error(fallback: Iterable[str]) -> float:
        swap.set(fallback)
        sums = torch.zeros(2, dtype=torch.float64)

        def add(i: int, y: Any) -> None:  # batch by batch: one output held at a time besides the references
            sums.add_(torch.tensor(squared_error(floating_tensors(y), refs[i]), dtype=torch.float64))

        with sync.guard("the sensitivity ranking"):
            feed_batches(model, batches, what=what, on_output=add)
        num, den = sync.sum_ordered(sums).tolist()
        return num / max(den, 1e-30)

    swap.set(swap.names)
    with sync.guard("the sensitivity ranking"):
        feed_batches(model, batches, what=what,
                     on_output=lambda i, y: refs.append([t.detach() for t in floating_tensors(y)]))
    if not any(refs):
        raise CalibrationError(f"{type(model).__name__} returns no floating-point tensor; the sensitivity "
                               "ranking compares the model's float outputs with the quantized ones")
    base = error(())
    errors = []
    for n in swap.names:
        check_time()
        errors.append(error((n,)))
    return base, rank(swap.names, base, errors)


def search_accuracy(model: nn.Module, report: QuantizationReport, float_modules: Dict[str, nn.Module],
                    loader: Iterable, eval_fn: EvalFn, criterion: Tuple[AccuracyCriterion, str], baseline: float,
                    baseline_seconds: float, where: str, progress: bool = False, sync: Any = LOCAL) -> None:
    """Run the search on the quantized ``model`` (in place) and record it in ``report``; warns when not met."""
    c, source = criterion
    started = time.perf_counter()
    swap = Swapper(model, float_modules)
    position = {n: i for i, n in enumerate(swap.names)}
    limit = threshold(c, baseline)

    def metric_of(fallback: FrozenSet[str]) -> float:
        names = sorted(fallback, key=position.__getitem__)
        swap.set(names)
        return call_eval_fn(eval_fn, model, candidate_text(names), sync)

    def show(t: Trial) -> None:
        print(f"slimtorch accuracy search: trial {len(trials.log)}, {len(t.float_layers)} float layers: metric "
              f"{t.metric:.6g} ({'passes' if t.passed else 'fails'})", file=sys.stderr, flush=True)

    trials = Trials(metric_of, c, limit, position.__getitem__, on_trial=show if progress else None, agree=sync.any)
    error_q, ranking, stopped, ranking_seconds = None, [], "criterion met", 0.0
    try:
        if not trials(frozenset()):
            t0 = time.perf_counter()
            try:
                error_q, ranking = rank_layers(model, swap, loader, trials.check_time, sync)
            finally:
                ranking_seconds = time.perf_counter() - t0
            order = [r.name for r in sorted(ranking, key=lambda r: r.rank)]
            search(order, trials)
    except Stop as s:
        stopped = s.reason
    best = trials.best()
    swap.set(best.float_layers)
    by_name = {r.name: r for r in ranking}
    fallback = sorted((by_name[n] for n in best.float_layers), key=lambda r: r.rank)
    acc = AccuracySearch(
        criterion=criterion_text(c, baseline), criterion_source=source, baseline=baseline, threshold=limit,
        final=best.metric, met=best.passed, eval_calls=len(trials.log) + 1, trials=len(trials.log),
        seconds=baseline_seconds + time.perf_counter() - started, ranking_seconds=ranking_seconds,
        stopped_because=stopped, error_quantized=error_q,
        ranking=ranking, fallback=fallback, log=list(trials.log))
    record(report, acc, len(swap.names))
    if not acc.met:
        warnings.warn(not_met_message(acc, where, c), UserWarning, stacklevel=3)


def record(report: QuantizationReport, acc: AccuracySearch, n_quantizable: int) -> None:
    """Move the fallback layers from ``quantized`` to ``left_float`` (with their rank) and attach ``acc``."""
    by_name = {q.name: q for q in report.quantized}
    for r in acc.fallback:
        reason = (f"accuracy fallback: sensitivity rank {r.rank} of {n_quantizable} (output error "
                  f"{acc.error_quantized:.2g} -> {r.error_without:.2g})")
        report.left_float.append(FloatLayer(r.name, by_name[r.name].op_type, reason))
    gone = {r.name for r in acc.fallback}
    report.quantized = [q for q in report.quantized if q.name not in gone]
    report.bias_corrected = [n for n in report.bias_corrected if n not in gone]
    report.accuracy = acc


def not_met_message(acc: AccuracySearch, where: str, c: AccuracyCriterion) -> str:
    why = {"max_trials": f"max_trials ({c.max_trials}) eval_fn calls on candidates were spent",
           "timeout": f"the timeout ({c.timeout:g} s) ran out"}.get(acc.stopped_because, acc.stopped_because)
    return (f"{where}.accuracy_criterion not met: {acc.criterion}; the best candidate found has metric "
            f"{acc.final:.6g} with {len(acc.fallback)} layers in float and is returned. Stopped because {why}. "
            "Raise max_trials or timeout, loosen tolerable_loss, or quantize more gently (SmoothQuant, another "
            "observer, excluded_modules); quantization_report(model).accuracy has the trial log")
