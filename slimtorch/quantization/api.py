"""``quantize()``: a QDQ copy of a model, from a config and (for static quantization) a calibration loader.

Order of work on the copy (the caller's model is never touched), one named step each (steps.py):
1. fold BatchNorm into the preceding conv (eval statistics), so the int8 conv weight already holds the BN scale;
2. SmoothQuant (static, optional): migrate activation outliers into the weights, folded into the previous op;
3. calibrate: one observer on the input of every target layer over ``num_calibration_batches`` batches;
4. swap every target layer for its QDQ module (int8 weight buffer + activation QuantizeLinear/DequantizeLinear);
5. correct bias (static; convolutions by default): each layer's bias absorbs E[(W - W_q) x];
6. with ``eval_fn``: put the most sensitive layers back in float until the accuracy criterion holds (accuracy.py).
Under torch.distributed every statistic of steps 1-6 is reduced across the data-parallel ranks (distributed.py).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

from torch import Tensor, nn

from ..batches import describe
from ..config import load_config
from ..config.quant_schema import StaticQuantization
from ..errors import CalibrationError, ConfigError
from .accuracy import resolve_criterion
from .distributed import check_same_model, check_same_plan
from .distributed import resolve as resolve_sync
from .passes import ReplayableLoader
from .qdq import QDQModule
from .report import REPORT_ATTR
from .steps import STEPS, QuantizeRun

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
    _check_not_data(mpu)
    return quantize_model(model, config, mpu, calib_dataloader, eval_fn, calib_input_fn=calib_input_fn,
                          progress=progress, inplace=False)


def quantize_model(model: nn.Module, config: Any, mpu: Any, calib_dataloader: Optional[Iterable],
                   eval_fn: Optional[Callable[[nn.Module], float]], *, calib_input_fn: Optional[Callable[[Any], Any]],
                   progress: bool, inplace: bool) -> nn.Module:
    """:func:`quantize`'s work; ``inplace`` quantizes ``model`` itself (slimtorch.compress, on its own copy)."""
    started = time.perf_counter()
    sync = resolve_sync(mpu)
    with sync.guard("checking the arguments"):  # an error on one rank is raised on every rank
        section, static, where, criterion = checked_arguments(model, config, eval_fn, calib_dataloader)
        loader = None if calib_dataloader is None else ReplayableLoader(calib_dataloader, calib_input_fn)
    check_same_plan(sync, model, section, {"static": static, "calib_dataloader": calib_dataloader is not None,
                                           "eval_fn": eval_fn is not None})
    run = QuantizeRun(model if inplace else copy.deepcopy(model), section, where, sync, loader, eval_fn, criterion,
                      progress=progress and sync.rank == 0)  # one progress bar per job
    try:
        for step in STEPS:
            step(run)
    finally:
        run.release()
    check_same_model(run.model, sync)  # the safety net: never a silently different model per rank
    run.report.seconds = time.perf_counter() - started
    setattr(run.model, REPORT_ATTR, run.report)
    return run.model


def _check_not_data(mpu: Any) -> None:
    """Calibration batches passed third, where ``mpu`` goes (``quantize(model, cfg, batches)``): say so, with the
    fix, rather than an error about mpu."""
    if mpu is None or isinstance(mpu, str) or callable(getattr(mpu, "get_data_parallel_group", None)):
        return
    if isinstance(mpu, (Tensor, Mapping)) or hasattr(mpu, "__iter__") or hasattr(mpu, "__len__"):
        raise ConfigError(f"quantize(model, config, mpu=None, calib_dataloader=None): the third argument is mpu (the "
                          f"distributed process group), but it got calibration data ({describe(mpu)}); pass the "
                          "batches by keyword: quantize(model, config, calib_dataloader=batches), or call "
                          "slimtorch.compress(model, config, calib_data), whose third argument is the data")


def checked_arguments(model: Any, config: Any, eval_fn: Any, calib_dataloader: Any):
    """``(section, static, where, criterion)``; every bad argument is an error here, before any work."""
    cfg = load_config(config)
    section = cfg.quantization
    oneshot_sections = list(cfg.compression_inference.oneshot_sections())
    if section is None and oneshot_sections:
        raise ConfigError(f"{SECTION_PATH}.{oneshot_sections[0]} runs block by block on a decoder LLM: call "
                          "slimtorch.compress(model, config, calib_data) instead of quantize() (or slimtorch.oneshot, "
                          "which compress() runs for these sections)")
    if section is not None and oneshot_sections:
        raise ConfigError(f"{SECTION_PATH}.{oneshot_sections[0]} is enabled too, and quantize() runs static/dynamic "
                          "quantization only: call slimtorch.compress(model, config, calib_data), which runs every "
                          "enabled section in order (one-shot pruning, then quantization)")
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
    if any(isinstance(m, QDQModule) for m in model.modules()):
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
