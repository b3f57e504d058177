"""``quantize()``: a QDQ copy of a model, from a config and (for static quantization) a calibration loader.

Order of work on the copy (the caller's model is never touched):
1. fold BatchNorm into the preceding conv (eval statistics), so the int8 conv weight already holds the BN scale;
2. SmoothQuant (static, optional): migrate activation outliers into the weights, folded into the previous op;
3. calibrate: one observer on the input of every target layer over ``num_calibration_batches`` batches;
4. swap every target layer for its QDQ module (int8 weight buffer + activation QuantizeLinear/DequantizeLinear);
5. with ``eval_fn``: put the most sensitive layers back in float until the accuracy criterion holds (accuracy.py).
Under torch.distributed every statistic of steps 1-5 is reduced across the data-parallel ranks (distributed.py).
"""
from __future__ import annotations

import copy
import re
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..config import load_config
from ..config.quant_schema import StaticQuantization
from ..errors import CalibrationError, ConfigError
from .accuracy import evaluate_baseline, resolve_criterion, search_accuracy
from .calibrate import calibrate, describe, feed, model_device, to_device
from .distributed import Sync, check_same_model, check_same_plan, reduce_observers
from .distributed import resolve as resolve_sync
from .observers import OBSERVERS
from .qdq import QDQ_MODULES, _QDQBase, op_type, quantizable_forward
from .report import REPORT_ATTR, FloatLayer, QuantizationReport, QuantizedLayer

SECTION_PATH = "compression_inference"


def quantize(model: nn.Module, config: Any, mpu: Any = None, calib_dataloader: Optional[Iterable] = None,
             eval_fn: Optional[Callable[[nn.Module], float]] = None, *,
             calib_input_fn: Optional[Callable[[Any], Any]] = None, progress: bool = True) -> nn.Module:
    """A quantized (QDQ) copy of ``model``; ``model`` itself is left exactly as it was.

    ``config``: anything :func:`slimtorch.load_config` takes, with ``compression_inference.static_quantization``
    or ``dynamic_quantization`` enabled. Static quantization needs ``calib_dataloader`` (batches fed as
    docs/conventions.md says; ``calib_input_fn(batch)`` converts a batch first). ``progress`` prints calibration (and
    accuracy search) progress to stderr. :func:`slimtorch.quantization_report` on the result lists what was
    quantized and what stayed float.

    ``eval_fn(model) -> number`` turns on accuracy-aware quantization: the section's ``accuracy_criterion`` (its
    defaults when absent: at most 1% relative loss, higher is better) is checked against ``eval_fn`` of the float
    model; while the fully quantized model misses it, the layers whose quantization changes the outputs most (ranked
    on the first calibration batches, so a loader is needed, for dynamic quantization too) go back to float, within
    ``max_trials`` eval_fn calls and ``timeout`` seconds. ``quantization_report(q).accuracy`` records the search;
    a criterion that is not met is a warning, and the best candidate found is returned. eval_fn raising, or not
    returning one finite number, is an :class:`~slimtorch.EvaluationError`.

    ``mpu``: distributed calibration (docs/quantization.md, "Distributed calibration"). None: when torch.distributed
    is initialized with more than one rank, every calibration statistic is reduced over the default group, so each
    rank, calibrating on its own shard, returns the same model; "local": no communication (quantize on one rank of a
    distributed job); a ProcessGroup, or an mpu with ``get_data_parallel_group()``: reduce over that group. Every
    rank of the group must call quantize() with the same model and config; the result is checked to be identical
    (:class:`~slimtorch.DistributedError` on every rank otherwise).
    """
    started = time.perf_counter()
    sync = resolve_sync(mpu)
    with sync.guard("checking the arguments"):  # an error on one rank is raised on every rank
        section, static, where, criterion = _checked_arguments(model, config, eval_fn, calib_dataloader)
        loader = None if calib_dataloader is None else _ReplayableLoader(calib_dataloader, calib_input_fn)
    check_same_plan(sync, model, section, {"static": static, "calib_dataloader": calib_dataloader is not None,
                                           "eval_fn": eval_fn is not None})
    progress = progress and sync.rank == 0  # one progress bar per job
    q = copy.deepcopy(model)
    if criterion is not None:  # before calibration: a broken eval_fn fails in seconds, on the untouched float copy
        baseline, baseline_seconds = evaluate_baseline(q, eval_fn, sync)
    report = QuantizationReport(mode="static" if static else "dynamic")
    if section.fold_batchnorm and loader is not None and _has_batchnorm(q):
        report.folded_batchnorm = _fold_batchnorm(q, loader, sync)
    targets, left = select_targets(q, section, where)
    report.left_float.extend(left)

    act = section.activation
    smooth_inverse, smooth_hooks, unsmoothed = {}, [], {}
    if static:
        try:
            if section.smoothquant.enabled:
                if criterion is not None and not section.smoothquant.folding:  # it scales these weights in place;
                    unsmoothed = {n: copy.deepcopy(m) for n, m in targets.items()}  # a fallback needs them as were
                report.smoothquant, smooth_inverse, smooth_hooks = _smoothquant(q, loader, section, targets, sync)
            with sync.guard("calibration"):
                observers = calibrate(
                    q, loader, num_batches=section.num_calibration_batches, module_filter=list(targets),
                    observer_factory=lambda n, m: _make_observer(act), progress=progress)
        finally:
            for h in smooth_hooks:
                h.remove()
        reduce_observers(observers, sync, model_device(q))  # distributed: the statistics of every rank's data
        report.calibration_batches = int(sync.sum_exact(torch.tensor([loader.batches_seen])))
        for name in list(targets):
            if observers[name].min_val is None:  # e.g. MultiheadAttention.out_proj: weight read, forward not called
                report.left_float.append(FloatLayer(name, op_type(targets.pop(name)),
                                                    "never called during calibration (its forward() did not run)"))
    modules = dict(q.named_modules())
    for name, float_module in targets.items():
        kind = op_type(float_module)
        qparams = observers[name].qparams() if static else None
        qdq = QDQ_MODULES[kind].from_float(
            float_module, weight_granularity=section.weight.granularity, act_dtype=act.dtype,
            act_symmetric=act.symmetric, act_qparams=qparams, dynamic=not static,
            act_granularity="tensor" if static or act.granularity == "per_tensor" else "token")
        if section.weight.observer == "mse":
            from .weight_tuning import mse_weight_scale, set_weight_scale

            axis = qdq.weight_axis if section.weight.granularity == "per_channel" else None
            set_weight_scale(qdq, float_module.weight, mse_weight_scale(float_module.weight, axis))
        if name in smooth_inverse:
            qdq.input_smooth = smooth_inverse[name].to(qdq.weight_int8.device)
        _replace(q, modules, name, qdq)
        report.quantized.append(QuantizedLayer(
            name, kind, tuple(float_module.weight.shape), _scheme_text(section, static),
            None if qparams is None else float(qparams[0]), None if qparams is None else int(qparams[1])))
    if static and section.bias_correction:
        report.bias_corrected = _correct_bias(q, loader, section, targets, sync)
    if criterion is not None:
        search_accuracy(q, report, {n: unsmoothed.get(n, m) for n, m in targets.items()}, loader, eval_fn,
                        criterion, baseline, baseline_seconds, where, progress, sync)
    check_same_model(q, sync)  # the safety net: never a silently different model per rank
    report.seconds = time.perf_counter() - started
    setattr(q, REPORT_ATTR, report)
    return q


def select_targets(model: nn.Module, section, where: str) -> Tuple[Dict[str, nn.Module], List[FloatLayer]]:
    """Layers of the configured op types, minus ``excluded_modules`` (``re.search`` on the name and its ancestors)."""
    targets: Dict[str, nn.Module] = {}
    left: List[FloatLayer] = []
    used = set()
    for name, module in model.named_modules():
        kind = op_type(module)
        if not name or kind is None:
            continue
        if kind not in section.op_types:
            left.append(FloatLayer(name, kind, f"op type {kind} is not in op_types"))
            continue
        hit = _excluded_by(section.excluded_modules, name)
        if hit is not None:
            used.add(hit)
            left.append(FloatLayer(name, kind, f"excluded_modules[{hit}] ({section.excluded_modules[hit]!r})"))
            continue
        unknown = quantizable_forward(module)
        if unknown is not None:
            left.append(FloatLayer(name, kind, unknown))
            continue
        if not getattr(module.weight, "is_floating_point", lambda: False)():
            raise ConfigError(f"{where}: module {name!r} ({kind}) has a {module.weight.dtype} weight; quantize() "
                              "takes a float model")
        targets[name] = module
    for i, pat in enumerate(section.excluded_modules):
        if i not in used:
            warnings.warn(f"{where}.excluded_modules[{i}] ({pat!r}) matches no {'/'.join(section.op_types)} layer "
                          f"of {type(model).__name__}", stacklevel=3)
    if not targets:
        raise ConfigError(f"{where}: nothing to quantize in {type(model).__name__}: no layer of op_types "
                          f"{section.op_types} is left after excluded_modules")
    return targets, left


def _excluded_by(patterns: List[str], name: str) -> Optional[int]:
    parts = name.split(".")
    chain = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for i, pat in enumerate(patterns):
        if any(re.search(pat, n) for n in chain):
            return i
    return None


def _checked_arguments(model: Any, config: Any, eval_fn: Any, calib_dataloader: Any):
    """``(section, static, where, criterion)``; every bad argument is an error here, before any work."""
    cfg = load_config(config)
    section = cfg.quantization
    if section is None:
        raise ConfigError(f"{SECTION_PATH}: no quantization section is enabled; add "
                          '{"compression_inference": {"static_quantization": {"enabled": true}}} '
                          "(or dynamic_quantization) to the config")
    static = isinstance(section, StaticQuantization)
    where = f"{SECTION_PATH}.{'static' if static else 'dynamic'}_quantization"
    _check_unsupported(section, where)
    criterion = resolve_criterion(section, where, eval_fn, calib_dataloader)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"quantize() takes a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, _QDQBase) for m in model.modules()):
        raise ConfigError(f"{type(model).__name__} already contains slimtorch QDQ layers; quantize the float model")
    if static and calib_dataloader is None:
        raise CalibrationError(f"{where}: static quantization needs calibration data: pass "
                               "calib_dataloader=<an iterable of input batches> (a few hundred samples the model "
                               "will see), or use dynamic_quantization, which needs none")
    return section, static, where, criterion


def _check_unsupported(section, where: str) -> None:
    if section.quantize_attention_matmuls:
        raise ConfigError(f"{where}.quantize_attention_matmuls: quantizing the activation x activation matmuls of "
                          "attention is not available in this slimtorch version; set it to false")


def _make_observer(act):
    kw = {"percentile": act.percentile} if act.observer == "percentile" else {}
    return OBSERVERS[act.observer](dtype=act.dtype, symmetric=act.symmetric, **kw)


def _scheme_text(section, static: bool) -> str:
    act = section.activation
    how = f"static ({act.observer})" if static else f"dynamic {act.granularity}"
    return (f"w int8 {section.weight.granularity}, a {act.dtype} "
            f"{'symmetric' if act.symmetric else 'asymmetric'} {how}")


def _replace(root: nn.Module, modules: Dict[str, nn.Module], name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(modules[parent] if parent else root, child, new)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _fold_batchnorm(model: nn.Module, loader: "_ReplayableLoader", sync: Sync) -> List[tuple]:
    from .fold import fold_batchnorm

    with sync.guard("BatchNorm folding"):
        batch = loader.first()
    device = model_device(model)
    return fold_batchnorm(model, lambda m: feed(m, to_device(batch, device)), sync=sync)


def _smoothquant(model: nn.Module, loader: "_ReplayableLoader", section: StaticQuantization,
                 targets: Dict[str, nn.Module], sync: Sync):
    from .smoothquant import smooth

    linears = [n for n, m in targets.items() if op_type(m) in ("Linear", "Conv1D")]
    sq, act = section.smoothquant, section.activation
    kw = dict(linear_names=linears, alpha=sq.alpha, num_batches=section.num_calibration_batches,
              act_dtype=act.dtype, act_symmetric=act.symmetric, sync=sync)
    if sq.folding:
        return smooth(model, loader, **kw), {}, []
    from .smooth_explicit import smooth_explicit

    inverse, hooks, report = smooth_explicit(model, loader, **kw)
    return report, inverse, hooks


def _correct_bias(model: nn.Module, loader: "_ReplayableLoader", section: StaticQuantization,
                  targets: Dict[str, nn.Module], sync: Sync) -> List[str]:
    from .weight_tuning import correct_bias

    convs_only = section.bias_correction == "auto"
    # the float weights the int8 ones were made from (targets still holds the float modules after the swap)
    weights = {n: m.weight for n, m in targets.items() if not convs_only or op_type(m) in ("Conv1d", "Conv2d")}
    if weights:
        correct_bias(model, weights, loader, num_batches=section.num_calibration_batches, sync=sync)
    return sorted(weights)


class _ReplayableLoader:
    """The user's loader, with ``calib_input_fn`` applied, iterable more than once (BN folding, SmoothQuant and
    calibration each pass over it); counts the batches the last pass yielded."""

    def __init__(self, loader: Iterable, input_fn: Optional[Callable[[Any], Any]]):
        if isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__"):
            raise CalibrationError(f"calib_dataloader must be an iterable of batches (a DataLoader, a list of "
                                   f"tensors or dicts), got {type(loader).__name__}")
        self.loader, self.input_fn = loader, input_fn
        self._one_shot = iter(loader) is loader  # a generator: keep what we read so later passes see the same data
        self._cache: List[Any] = []
        self.batches_seen = 0

    def __iter__(self):
        self.batches_seen = 0
        source = self._cached() if self._one_shot else iter(self.loader)
        for i, batch in enumerate(source):
            if self.input_fn is not None:
                try:
                    batch = self.input_fn(batch)
                except Exception as e:
                    raise CalibrationError(f"calib_input_fn raised on calibration batch {i} ({describe(batch)}): "
                                           f"{type(e).__name__}: {e}") from e
            self.batches_seen += 1
            yield batch

    def _cached(self):
        yield from self._cache
        for batch in self.loader:
            self._cache.append(batch)
            yield batch

    def __len__(self):
        return len(self.loader)  # TypeError for a generator: calibration then counts up to num_batches

    def first(self):
        for batch in self:
            return batch
        raise CalibrationError("the calibration loader yielded no batches; static quantization needs at least one "
                               "batch of representative inputs")
