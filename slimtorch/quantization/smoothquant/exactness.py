"""The float-exactness check: fold scales, run the model on a probe batch, compare with its float output, revert.

"Smoothing never changes the float model" is checked, not assumed: hooks see module calls, not the residual add, so
a fold that looks right from the call graph (a post-LN block's LayerNorm, a norm that scales by ``1 + weight``, a
tied weight) is only kept if the model's output does not move.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...batches import feed
from ...errors import CalibrationError
from ..distributed import LOCAL
from .scales import fold_scales_

#: (previous op, Linears reading its output, scales): one fold
FoldPlan = Tuple[str, Sequence[str], Tensor]


def _tensors(obj: Any) -> List[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    return [t for v in items for t in _tensors(v)]


def _head(obj: Any, n: int, k: int) -> Any:
    """``obj`` with every tensor whose first axis has length n cut to its first k entries."""
    if isinstance(obj, Tensor):
        return obj[:k] if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, Mapping):
        return {key: _head(v, n, k) for key, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_head(v, n, k) for v in obj)
    return obj


def fold_change_reason(kind: str, d: float, tol: float) -> str:
    """Why a fold into a ``kind`` previous op ("layernorm" or "linear") that moved the output by ``d`` is skipped."""
    what = ("its output also reaches other ops (e.g. the residual add of a post-LN block) or it does not scale by "
            "its weight" if kind == "layernorm" else
            "the path between them is not linear per channel (an activation, a softmax, other consumers)")
    return f"folding changes the float output (max relative difference {d:.1e} > {tol:.0e}): {what}"


class ExactnessProbe:
    """The model's float output on a probe batch, and how far a fold moves it (max |diff| / max |ref|).

    The probe is the first ``samples`` samples of the batch: exactness is structural, so one sample tells what a
    large batch would, at a fraction of the cost (the whole batch is used if the model rejects the cut one).
    """

    def __init__(self, model: nn.Module, batch: Any, tol: Optional[float], samples: int, sync: Any = LOCAL):
        self.sync = sync  # distributed: the worst rank's output change decides, so all ranks fold alike
        p = next(iter(model.parameters()), None)
        exact = p is None or p.dtype in (torch.float32, torch.float64)
        self.model, self.tol = model, tol if tol is not None else (1e-4 if exact else 2e-2)  # half rounds the fold
        first = next(iter(_tensors(batch)), None)
        self.batch, self.ref = batch, None
        if first is not None and first.dim() and first.shape[0] > samples:
            self.batch = _head(batch, first.shape[0], samples)
            try:
                self.ref = self.run()
            except Exception:  # noqa: BLE001 - inputs that do not all share the batch axis
                self.batch = batch
        self.ref = self.ref if self.ref is not None else self.run()

    def check_finite(self) -> None:
        if not all(bool(torch.isfinite(t).all()) for t in self.ref):
            raise CalibrationError("the model's output on the first calibration batch contains NaN or inf; "
                                   "smoothing needs a model and data that give finite outputs")

    def run(self) -> List[Tensor]:
        # feed, not passes.feed_batches: that would wrap the model's own errors in a new message
        with torch.no_grad():
            return [t.detach().float() for t in _tensors(feed(self.model, self.batch)) if t.is_floating_point()]

    def fold(self, modules: Dict[str, nn.Module], plans: Sequence[FoldPlan], keep: bool) -> float:
        """Fold every (prev, linears, s), run, compare; revert bit-exactly if it moved more than tol or not keep."""
        saved = [(t, t.detach().clone()) for prev, lins, _ in plans for n in (prev, *lins)
                 for t in (modules[n].weight, getattr(modules[n], "bias", None)) if isinstance(t, Tensor)]
        for prev, lins, s in plans:
            fold_scales_(modules, prev, lins, s)
        d = max([float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)
                 for a, b in zip(self.run(), self.ref)] or [0.0])
        d = self.sync.max_float(d if d == d else float("inf"))  # NaN means changed
        if d > self.tol or not keep:
            for t, v in saved:
                t.data.copy_(v)
        return d
