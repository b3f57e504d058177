"""SmoothQuant without folding (``smoothquant.folding: false``): an explicit per-channel multiply before each Linear.

Folding needs an operation whose output feeds only the smoothed Linears; in post-LN BERT no LayerNorm qualifies
(its output is also the residual) and GELU sits between the FFN's Linears, so folding smooths 6 of MiniLM's 36
Linears. Without folding every Linear can be smoothed: its QDQ layer multiplies the input by ``1/s`` before the
QuantizeLinear and its weight columns carry ``s``, so the float product is unchanged and the exported graph gains
one Mul per input tensor (shared by the Linears that read it, e.g. query, key and value).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ...batches import model_device
from ...errors import CalibrationError
from ..calibrate import calibrate
from ..distributed import LOCAL, reduce_channel_stats
from .alpha import search_alpha
from .discovery import find_smoothing_groups
from .report import GroupResult, SmoothQuantReport
from .scales import check_alpha, input_axis, scale_channels_, smoothing_scales, weight_absmax
from .stats import ChannelStats


def input_groups(model: nn.Module, first_batch: Any, linear_names: Sequence[str],
                 input_fn: Optional[Callable[[Any], Any]], sync: Any = LOCAL) -> List[List[str]]:
    """The Linears to smooth, grouped by the tensor they read (one scale per group, so one Mul in the graph)."""
    found = find_smoothing_groups(model, first_batch, linear_names=linear_names, input_fn=input_fn, auto_pairs=False,
                                  sync=sync)
    wanted = set(linear_names)
    groups, seen = [], set()
    for g in found:
        members = [n for n in g.linears if n in wanted and n not in seen]
        if members and len(members) == len(g.linears):  # a shared input is smoothed only if every reader is ours
            groups.append(members)
            seen.update(members)
    groups += [[n] for n in linear_names if n not in seen]
    return groups


def smooth_explicit(model: nn.Module, loader: Iterable, *, linear_names: Sequence[str], alpha: Union[float, str],
                    num_batches: int, input_fn: Optional[Callable[[Any], Any]] = None, act_dtype: str = "int8",
                    act_symmetric: bool = True, max_rows: int = 2048, sync: Any = LOCAL
                    ) -> Tuple[Dict[str, Tensor], List[Any], SmoothQuantReport]:
    """Scale the input columns of every Linear in ``linear_names`` by ``s`` (in place) and return
    ``({name: 1/s}, hook handles, report)``: the hooks divide each Linear's input by ``s`` so calibration sees
    what the QDQ layer will quantize; the caller removes them and gives each QDQ layer its ``1/s``."""
    if alpha != "auto":
        check_alpha(alpha)
    with sync.guard("SmoothQuant"):
        first = next(iter(loader), None)
        if first is None:
            raise CalibrationError("the calibration loader yielded no batches; SmoothQuant needs representative inputs")
    modules = dict(model.named_modules())
    groups = input_groups(model, first, linear_names, input_fn, sync)
    rows = max_rows if alpha == "auto" else 0
    with sync.guard("SmoothQuant calibration"):
        stats = calibrate(model, loader, observer_factory=lambda n, m: ChannelStats(rows), num_batches=num_batches,
                          input_fn=input_fn, module_filter=[g[0] for g in groups], progress=False)
    reduce_channel_stats(stats, sync, model_device(model))
    report = SmoothQuantReport(alpha)
    inverse: Dict[str, Tensor] = {}
    handles = []
    for names in groups:
        st = stats[names[0]]
        if st.min is None:
            continue  # never called: quantize() leaves it in float anyway
        mods = [modules[n] for n in names]
        a = search_alpha(st, mods, act_dtype, act_symmetric, sync.sum_ordered)[0] if alpha == "auto" else float(alpha)
        # s_j = max|X_j|^a / max|W_j|^(1-a)
        s = smoothing_scales(st.absmax, weight_absmax(mods).to(st.absmax.device), a)
        inv = (1.0 / s).to(torch.float32)
        for n, m in zip(names, mods):
            scale_channels_(m.weight, s, input_axis(m), divide=False)  # W[:, j] * s_j
            inverse[n] = inv
            handles.append(m.register_forward_pre_hook(_divide_input(inv)))
        report.groups.append(GroupResult("(explicit Mul)", "mul", list(names), a, float(s.max()), float(s.median()),
                                         float(st.absmax.max()), float((st.absmax / s).max()), "explicit"))
    return inverse, handles, report


def _divide_input(inv: Tensor):
    """A pre-hook that multiplies a module's first input by ``inv`` (1/s), its other inputs passed through."""
    def hook(module, args):
        x = args[0]
        return (x * inv.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])
    return hook
