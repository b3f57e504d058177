"""SmoothQuant folded into the model: ``smooth()`` calibrates, picks alpha, folds, verifies and reports.

The ``1 / s`` is folded into the op that makes ``x`` (a LayerNorm/RMSNorm's weight and bias, or a previous Linear's
output rows and bias), so the model keeps its structure, its module names and its float function.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ...batches import model_device, to_device
from ...errors import CalibrationError, ConfigError
from ..calibrate import calibrate
from ..distributed import LOCAL, reduce_channel_stats
from ..grid import choose_qparams
from ..passes import preserved_modes
from .alpha import search_alpha
from .discovery import Pairs, find_smoothing_groups
from .exactness import ExactnessProbe, fold_change_reason
from .report import GroupResult, SmoothQuantReport
from .scales import check_alpha, smoothing_scales, weight_absmax
from .stats import ChannelStats

#: (a group's input statistics, its Linears) -> (per-input-channel scales, the number reported as its alpha)
ScalesFn = Callable[[ChannelStats, Sequence[nn.Module]], Tuple[Tensor, float]]

ACT_DTYPES = ("int8", "uint8")


def smooth(model: nn.Module, loader: Iterable, *, linear_names: Sequence[str], alpha: Union[float, str],
           num_batches: int, input_fn: Optional[Callable[[Any], Any]] = None, act_dtype: str = "int8",
           act_symmetric: bool = True, extra_pairs: Pairs = (), auto_pairs: bool = True, max_rows: int = 2048,
           tol: Optional[float] = None, probe_samples: int = 1, sync: Any = LOCAL,
           scales_fn: Optional[ScalesFn] = None) -> SmoothQuantReport:
    """Smooth ``model`` in place (pass a copy) before quantizing ``linear_names``; its float function is unchanged.

    ``alpha`` in [0, 1], or "auto": per group the ALPHA_GRID value with the least fake-quant output error on up to
    ``max_rows`` sampled input rows (``act_dtype``/``act_symmetric`` activations, int8 per-channel weights). The
    first batch drives discovery and every exactness check; up to ``num_batches`` batches feed the statistics.
    ``sync``: distributed calibration (quantization/distributed.py), every statistic reduced over the ranks.
    Without folding (an explicit multiply on each Linear's input) is :func:`~.explicit.smooth_explicit`.
    ``scales_fn(stats, linears) -> (scales, number)`` replaces the SmoothQuant formula (AWQ's search: the number is
    reported as the group's alpha); its stats then hold ``max_rows`` sampled rows.
    """
    if alpha != "auto" and scales_fn is None:
        check_alpha(alpha)
    if num_batches < 1:
        raise ConfigError(f"num_calibration_batches must be >= 1, got {num_batches}")
    try:
        if act_dtype not in ACT_DTYPES:  # the grid has more dtypes; activations here are 8-bit integers
            raise CalibrationError(f"activation dtype must be one of {ACT_DTYPES}, got {act_dtype!r}")
        choose_qparams(torch.tensor(0.0), torch.tensor(0.0), dtype=act_dtype, symmetric=act_symmetric)
    except CalibrationError as e:
        raise ConfigError(f"smoothquant activation scheme: {e}") from e
    if isinstance(loader, Iterator):  # one pass only: keep the batches for discovery and calibration
        loader = [b for _, b in zip(range(num_batches), loader)]
    with sync.guard("SmoothQuant"):
        first = next(iter(loader), None)
        if first is None:
            raise CalibrationError("the calibration loader yielded no batches; SmoothQuant needs representative inputs")
    found = find_smoothing_groups(model, first, linear_names=linear_names, input_fn=input_fn, tol=tol, sync=sync,
                                  extra_pairs=extra_pairs, auto_pairs=auto_pairs, probe_samples=probe_samples)
    report = SmoothQuantReport(alpha, skipped=[g for g in found if g.skip_reason is not None])
    groups = [g for g in found if g.skip_reason is None]
    if not groups:
        return report
    modules = dict(model.named_modules())
    rows = max_rows if alpha == "auto" or scales_fn is not None else 0
    with sync.guard("SmoothQuant calibration"):
        stats = calibrate(model, loader, observer_factory=lambda n, m: ChannelStats(rows), num_batches=num_batches,
                          input_fn=input_fn, module_filter=[g.linears[0] for g in groups], progress=False)
    reduce_channel_stats(stats, sync, model_device(model))
    plans = []  # all scales from the unsmoothed model: a fold may change another group's weight columns
    for g in groups:
        st = stats[g.linears[0]]
        if st.min is None:
            g.skip_reason = f"{g.linears[0]!r} was not called during calibration"
            report.skipped.append(g)
            continue
        mods = [modules[n] for n in g.linears]
        if scales_fn is not None:
            s, a = scales_fn(st, mods)
            plans.append((g, a, s, st.absmax))
            continue
        a = search_alpha(st, mods, act_dtype, act_symmetric, sync.sum_ordered)[0] if alpha == "auto" else float(alpha)
        plans.append((g, a, smoothing_scales(st.absmax, weight_absmax(mods).to(st.absmax.device), a), st.absmax))
    with preserved_modes(model, "eval"), sync.guard("SmoothQuant verification"):
        probe_batch = to_device(input_fn(first) if input_fn is not None else first, model_device(model))
        probe = ExactnessProbe(model, probe_batch, tol, probe_samples, sync)
    with preserved_modes(model, "eval"):
        # all groups in one run; if that moves the output (rounding at extreme scales), one group at a time
        if probe.fold(modules, [(g.prev, g.linears, s) for g, _, s, _ in plans], keep=True) > probe.tol:
            for g, _, s, _ in plans:
                d = probe.fold(modules, [(g.prev, g.linears, s)], keep=True)
                g.skip_reason = (f"with the computed scales, {fold_change_reason(g.kind, d, probe.tol)}"
                                 if d > probe.tol else None)
    for g, a, s, absmax in plans:
        if g.skip_reason is not None:
            report.skipped.append(g)
        else:
            report.groups.append(GroupResult(g.prev, g.kind, g.linears, a, float(s.max()), float(s.median()),
                                             float(absmax.max()), float((absmax / s).max()), g.source))
    return report
