"""The steps of ``quantize()``, in order, and the run state they share.

| step              | reads                             | writes                                                    |
|-------------------|-----------------------------------|-----------------------------------------------------------|
| measure_baseline  | eval_fn                           | baseline metric (before anything changes)                 |
| fold_batchnorm    | first calibration batch           | convs with their BatchNorm folded in; report              |
| select_layers     | op_types, excluded_modules        | ``targets`` (name -> float module); report.left_float     |
| smooth            | calibration batches               | smoothed weights, or input hooks + ``smooth_inverse``     |
| calibrate         | calibration batches               | ``observers`` (one per target input); drops uncalled ones |
| swap_in_qdq       | targets, observers                | QDQ modules in place of the targets; report.quantized     |
| correct_bias      | calibration batches               | QDQ biases += E[(W - W_q) x]                               |
| search_accuracy   | eval_fn, calibration batches      | float fallbacks until the criterion holds; report         |

Each step is a function of the :class:`QuantizeRun` and skips itself when the config does not ask for it. The run
holds one model and one loader. The block pipeline (``slimtorch.oneshot``, llm/oneshot.py) does not run these
steps: it shares their primitives (the calibration loop :func:`~.passes.feed_batches`, the observers through
:func:`~.calibrate.observer_hooks` and :func:`~.distributed.reduce_observers`, :func:`~.smoothquant.smooth`) and
runs its own per block; docs/design.md ("What the block pipeline shares with quantize()") says step by step what
differs and why. Memory: the steps hold the model (a copy of the
caller's), one observer per target layer (a histogram observer: 2048 bins), the float modules the QDQ ones replace
(shared with nothing: they are the copy's own), and under SmoothQuant with an accuracy criterion and no folding, a
float copy of every target layer.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..batches import feed, model_device
from ..config.quant_schema import StaticQuantization
from .accuracy import evaluate_baseline, search_accuracy
from .calibrate import calibrate as observe_inputs
from .distributed import Sync, reduce_observers
from .fold import fold_batchnorm as fold_into_convs
from .observers import Observer, observer_for
from .passes import ReplayableLoader
from .qdq import QDQ_MODULES, QDQModule, op_type
from .report import FloatLayer, QuantizationReport, QuantizedLayer
from .selection import select_targets
from .smoothquant import smooth as smooth_folded
from .smoothquant import smooth_explicit
from .weight_tuning import correct_bias as add_bias_corrections
from .weight_tuning import mse_weight_scale, set_weight_scale

#: the activation granularity of a QDQ layer, by the config's name for it (static is always per tensor)
ACT_GRANULARITY = {"per_tensor": "tensor", "per_token": "token"}


@dataclass
class QuantizeRun:
    """What the steps share: the arguments (checked), the model being quantized and what each step made."""

    model: nn.Module
    section: Any                   # StaticQuantization or DynamicQuantization
    where: str                     # the section's config path, for messages
    sync: Sync
    loader: Optional[ReplayableLoader] = None
    eval_fn: Optional[Callable[[nn.Module], Any]] = None
    criterion: Optional[Tuple[Any, str]] = None  # (AccuracyCriterion, where it came from) with eval_fn
    progress: bool = True
    report: QuantizationReport = None  # type: ignore[assignment]  # set in __post_init__
    baseline: Optional[Tuple[float, float]] = None                 # (metric, seconds)
    targets: Dict[str, nn.Module] = field(default_factory=dict)    # name -> the float module it replaces
    observers: Dict[str, Observer] = field(default_factory=dict)
    smooth_inverse: Dict[str, Tensor] = field(default_factory=dict)  # explicit SmoothQuant: 1/s per layer
    smooth_hooks: List[Any] = field(default_factory=list)            # ... and the hooks that apply it meanwhile
    unsmoothed: Dict[str, nn.Module] = field(default_factory=dict)   # float fallbacks as they were before smoothing

    def __post_init__(self):
        if self.report is None:
            self.report = QuantizationReport(mode="static" if self.static else "dynamic")

    @property
    def static(self) -> bool:
        return isinstance(self.section, StaticQuantization)

    def release(self) -> None:
        """Remove what a step attached to the model for later steps only (explicit SmoothQuant's input hooks)."""
        for h in self.smooth_hooks:
            h.remove()
        self.smooth_hooks = []


def measure_baseline(run: QuantizeRun) -> None:
    """eval_fn on the untouched float copy, first: a broken eval_fn fails in seconds, before calibration."""
    if run.criterion is not None:
        run.baseline = evaluate_baseline(run.model, run.eval_fn, run.sync)


def fold_batchnorm(run: QuantizeRun) -> None:
    """Fold eval-mode BatchNorm into the preceding conv, so the int8 weight already holds the BN scale."""
    if not run.section.fold_batchnorm or run.loader is None or not _has_batchnorm(run.model):
        return
    with run.sync.guard("BatchNorm folding"):
        batch = run.loader.first()
    run.report.folded_batchnorm = fold_into_convs(run.model, lambda m: feed(m, batch), sync=run.sync)


def select_layers(run: QuantizeRun) -> None:
    run.targets, left = select_targets(run.model, run.section, run.where)
    run.report.left_float.extend(left)


def smooth(run: QuantizeRun) -> None:
    """SmoothQuant (static only): migrate activation outliers into the weights, folded into the previous op, or
    (``folding: false``) kept as an explicit multiply on each layer's input."""
    sq = getattr(run.section, "smoothquant", None)
    if sq is None or not sq.enabled:
        return
    if run.criterion is not None and not sq.folding:  # it scales these weights in place; a fallback needs them
        run.unsmoothed = {n: copy.deepcopy(m) for n, m in run.targets.items()}
    linears = [n for n, m in run.targets.items() if op_type(m) in ("Linear", "Conv1D")]
    act = run.section.activation
    kw = dict(linear_names=linears, alpha=sq.alpha, num_batches=run.section.num_calibration_batches,
              act_dtype=act.dtype, act_symmetric=act.symmetric, sync=run.sync)
    if sq.folding:
        run.report.smoothquant = smooth_folded(run.model, run.loader, **kw)
    else:
        run.smooth_inverse, run.smooth_hooks, run.report.smoothquant = smooth_explicit(run.model, run.loader, **kw)


def calibrate(run: QuantizeRun) -> None:
    """One observer on the input of every target layer over ``num_calibration_batches`` batches (static only);
    under torch.distributed the statistics of every rank's data."""
    if not run.static:
        return
    act = run.section.activation
    try:
        with run.sync.guard("calibration"):
            run.observers = observe_inputs(
                run.model, run.loader, num_batches=run.section.num_calibration_batches,
                module_filter=list(run.targets), observer_factory=lambda n, m: activation_observer(act),
                progress=run.progress)
    finally:
        run.release()  # the explicit smoothing hooks were for calibration only
    reduce_observers(run.observers, run.sync, model_device(run.model))
    run.report.calibration_batches = int(run.sync.sum_exact(torch.tensor([run.loader.batches_seen])))
    for name in list(run.targets):
        if run.observers[name].min_val is None:  # e.g. MultiheadAttention.out_proj: weight read, forward not called
            run.report.left_float.append(FloatLayer(name, op_type(run.targets.pop(name)),
                                                    "never called during calibration (its forward() did not run)"))


def swap_in_qdq(run: QuantizeRun) -> None:
    """Every target replaced by its QDQ module: int8 weight + activation QuantizeLinear/DequantizeLinear."""
    section, act = run.section, run.section.activation
    modules = dict(run.model.named_modules())
    for name, float_module in run.targets.items():
        kind = op_type(float_module)
        qparams = run.observers[name].qparams() if run.static else None
        qdq = QDQ_MODULES[kind].from_float(
            float_module, weight_granularity=section.weight.granularity, act_dtype=act.dtype,
            act_symmetric=act.symmetric, act_qparams=qparams, dynamic=not run.static,
            act_granularity="tensor" if run.static else ACT_GRANULARITY[act.granularity])
        WEIGHT_SCALES[section.weight.observer](qdq, float_module.weight, section.weight.granularity)
        if name in run.smooth_inverse:
            qdq.input_smooth = run.smooth_inverse[name].to(qdq.weight_int8.device)
        _replace(run.model, modules, name, qdq)
        run.report.quantized.append(QuantizedLayer(
            name, kind, tuple(float_module.weight.shape), scheme_text(section, run.static),
            None if qparams is None else float(qparams[0]), None if qparams is None else int(qparams[1])))


def correct_bias(run: QuantizeRun) -> None:
    """Add E[(W - W_q) x] to each layer's bias (static; "auto": convolutions only)."""
    mode = getattr(run.section, "bias_correction", False)
    if not run.static or not mode:
        return
    convs_only = mode == "auto"
    # the float weights the int8 ones were made from (targets still holds the float modules after the swap)
    weights = {n: m.weight for n, m in run.targets.items()
               if not convs_only or op_type(m) in ("Conv1d", "Conv2d")}
    if weights:
        add_bias_corrections(run.model, weights, run.loader, num_batches=run.section.num_calibration_batches,
                             sync=run.sync)
    run.report.bias_corrected = sorted(weights)


def search_accuracy_fallbacks(run: QuantizeRun) -> None:
    """With eval_fn: put the most sensitive layers back in float until the accuracy criterion holds."""
    if run.criterion is None:
        return
    fallbacks = {n: run.unsmoothed.get(n, m) for n, m in run.targets.items()}
    search_accuracy(run.model, run.report, fallbacks, run.loader, run.eval_fn, run.criterion, *run.baseline,
                    run.where, run.progress, run.sync)


STEPS: Tuple[Callable[[QuantizeRun], None], ...] = (
    measure_baseline, fold_batchnorm, select_layers, smooth, calibrate, swap_in_qdq, correct_bias,
    search_accuracy_fallbacks)


# -- helpers ----------------------------------------------------------------------------------------------------
def activation_observer(act) -> Observer:
    """A fresh observer of the kind the config's ``activation.observer`` names (:data:`OBSERVERS`)."""
    return observer_for(act.observer, dtype=act.dtype, symmetric=act.symmetric, percentile=act.percentile)


def _keep_minmax_scale(qdq: QDQModule, weight: Tensor, granularity: str) -> None:
    """minmax: ``from_float`` already chose s = max|W| / 127 (per channel or per tensor)."""


def _mse_scale(qdq: QDQModule, weight: Tensor, granularity: str) -> None:
    """mse: the clipped scale with the least squared rounding error, the int8 weight re-quantized with it."""
    axis = qdq.weight_axis if granularity == "per_channel" else None
    set_weight_scale(qdq, weight, mse_weight_scale(weight, axis))


#: how the weight scale is chosen, by the config's ``weight.observer``
WEIGHT_SCALES: Dict[str, Callable[[QDQModule, Tensor, str], None]] = {"minmax": _keep_minmax_scale,
                                                                      "mse": _mse_scale}


def scheme_text(section, static: bool) -> str:
    """The quantization scheme as the report prints it, e.g. ``w int8 per_channel, a uint8 asymmetric static``."""
    act = section.activation
    how = f"static ({act.observer})" if static else f"dynamic {act.granularity}"
    return (f"w int8 {section.weight.granularity}, a {act.dtype} "
            f"{'symmetric' if act.symmetric else 'asymmetric'} {how}")


def _replace(root: nn.Module, modules: Dict[str, nn.Module], name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(modules[parent] if parent else root, child, new)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
