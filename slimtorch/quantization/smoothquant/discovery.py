"""Discovery: which Linears read exactly the output of a norm or a Linear, so that scales can be folded into it.

One traced forward finds the Linears whose input tensor *is* a norm's or a Linear's output (identity groups); Linear
-> Linear pairs through other ops (value -> attention output) are tried inside each repeated block. Every candidate
is then checked by folding probe scales into it (exactness.py) and skipped, with a reason, if the output moved.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...batches import model_device, to_device
from ...errors import CalibrationError, ConfigError
from ..distributed import LOCAL
from ..passes import feed_batches, preserved_modes
from ..qdq import op_type
from .exactness import ExactnessProbe, fold_change_reason
from .report import SmoothGroup
from .scales import linear_weight

#: ``extra_pairs``: (previous Linear, [Linears that read its output through other ops])
Pairs = Sequence[Tuple[str, Sequence[str]]]


def _is_linear(m: nn.Module) -> bool:
    return op_type(m) in ("Linear", "Conv1D")


def _is_norm(m: nn.Module) -> bool:
    if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True  # without an affine weight too, so that discovery can say why it cannot fold
    w = getattr(m, "weight", None)  # LlamaRMSNorm, T5LayerNorm, ...: a per-channel weight and no other structure
    return type(m).__name__.endswith(("LayerNorm", "RMSNorm")) and isinstance(w, Tensor) and w.dim() == 1


def _out_ch(m: nn.Module) -> int:
    return m.weight.shape[0] if _is_norm(m) else linear_weight(m).shape[0]


def _block(name: str) -> str:
    """The repeated block a module lives in: its name through the last numeric part (a ModuleList index)."""
    parts = name.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[:idx[-1] + 1]) if idx else ""


def _trace(model: nn.Module, batch: Any) -> Tuple[Dict[str, str], Dict[str, int], List[str]]:
    """One forward -> ({linear: module whose output tensor is its input, or ""}, call counts, linears in call order)."""
    produced: Dict[int, Tuple[str, Any]] = {}  # id -> (module, weak ref): proves the id is still that tensor
    source: Dict[str, str] = {}
    calls: Dict[str, int] = {}
    order: List[str] = []

    def post(name):
        def hook(module, args, out):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, Tensor):
                produced[id(out)] = (name, weakref.ref(out))
        return hook

    def pre(name):
        def hook(module, args):
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise CalibrationError(f"the input of module {name!r} ({type(module).__name__}) contains NaN or inf "
                                       f"on the first calibration batch; smoothing needs finite activations")
            hit = produced.get(id(x)) if x is not None else None
            source.setdefault(name, hit[0] if hit is not None and hit[1]() is x else "")
            order.extend([] if name in order else [name])
        return hook

    modules = list(model.named_modules())
    pre_hooks = [(m, pre(name)) for name, m in modules if _is_linear(m)]
    post_hooks = [(m, post(name)) for name, m in modules if _is_linear(m) or _is_norm(m)]
    feed_batches(model, [batch], what="SmoothQuant discovery", pre=pre_hooks, post=post_hooks)
    return source, calls, order


def _candidates(modules: Dict[str, nn.Module], wanted: set, source: Dict[str, str], calls: Dict[str, int],
                order: List[str], extra_pairs: Pairs, auto_pairs: bool) -> List[SmoothGroup]:
    """Groups to check, in this order: explicit pairs, identity groups, Linear -> Linear pairs (nearest first)."""
    groups = [SmoothGroup(p, "linear", list(ls), "explicit") for p, ls in extra_pairs]
    claimed = {n for g in groups for n in g.linears}
    by_prev: Dict[str, List[str]] = {}
    for lin in order:  # every Linear reading that tensor, quantized or not: all must be scaled to stay exact
        if source.get(lin):
            by_prev.setdefault(source[lin], []).append(lin)
    for prev, lins in by_prev.items():
        if not wanted.intersection(lins):
            continue
        g = SmoothGroup(prev, "layernorm" if _is_norm(modules[prev]) else "linear", lins)
        if claimed.intersection(lins):
            g.skip_reason = f"{sorted(claimed.intersection(lins))} already smoothed through extra_pairs"
        elif any(calls.get(n, 0) > 1 for n in [prev, *lins]):
            g.skip_reason = "a module of this group runs more than once per forward (shared weights)"
        groups.append(g)
        claimed.update(lins)
    pos = {n: i for i, n in enumerate(order)}
    for b in order if auto_pairs else ():  # inputs made by other ops: attention matmul, act(gate) * up
        if b in claimed or b not in wanted or source.get(b) or calls.get(b, 0) != 1:
            continue
        for a in reversed(order[:pos[b]]):  # nearest first: value before key and query
            if (_block(a) == _block(b) and calls.get(a, 0) == 1
                    and linear_weight(modules[a]).shape[0] == linear_weight(modules[b]).shape[1]):
                groups.append(SmoothGroup(a, "linear", [b], "pair"))
    return groups


def _check(probe: ExactnessProbe, modules: Dict[str, nn.Module], g: SmoothGroup) -> None:
    """Set ``g.skip_reason`` from static checks, then by folding probe scales in [0.5, 2] (always reverted)."""
    prev = modules[g.prev]
    if g.skip_reason is not None:
        return
    if not isinstance(getattr(prev, "weight", None), Tensor):
        g.skip_reason = f"{type(prev).__name__} has no affine weight to fold into"
    elif any(linear_weight(modules[n]).shape[1] != _out_ch(prev) for n in g.linears):
        g.skip_reason = "the previous op's output channels and the Linears' input channels differ in number"
    else:
        gen = torch.Generator().manual_seed(1234)  # fixed: discovery is deterministic
        s = torch.exp((torch.rand(_out_ch(prev), generator=gen) * 2.0 - 1.0) * 0.7)
        d = probe.fold(modules, [(g.prev, g.linears, s)], keep=False)
        g.skip_reason = fold_change_reason(g.kind, d, probe.tol) if d > probe.tol else None


def find_smoothing_groups(model: nn.Module, batch: Any, *, linear_names: Optional[Sequence[str]] = None,
                          input_fn: Optional[Callable[[Any], Any]] = None, extra_pairs: Pairs = (),
                          auto_pairs: bool = True, tol: Optional[float] = None,
                          probe_samples: int = 1, sync: Any = LOCAL) -> List[SmoothGroup]:
    """Smoothing groups for ``linear_names`` (default all Linears/Conv1Ds; other module types are ignored).

    A group is foldable (``skip_reason`` None) only if folding probe scales into it keeps the float output on the
    first ``probe_samples`` samples of ``batch`` within ``tol`` (relative); the model is left bit-for-bit as it was.
    Linear -> Linear pairs through other ops are tried inside each repeated block if ``auto_pairs``;
    ``extra_pairs=[(prev_linear, [linears])]`` names more. A wanted Linear in no foldable group is in a skipped
    group that says why.
    """
    modules = dict(model.named_modules())
    names = list(linear_names) if linear_names is not None else list(modules)
    bad = [n for n in names if n not in modules] + [
        n for p, ls in extra_pairs for n in [p, *ls] if n not in modules or not _is_linear(modules[n])]
    if bad:
        raise ConfigError(f"smoothquant: {bad} are not Linear/Conv1D modules of {type(model).__name__}; "
                          f"linear_names and extra_pairs take qualified names from model.named_modules()")
    wanted = {n for n in names if _is_linear(modules[n])}
    with preserved_modes(model, "eval"):
        with sync.guard("SmoothQuant discovery"):
            batch = to_device(input_fn(batch) if input_fn is not None else batch, model_device(model))
            probe = ExactnessProbe(model, batch, tol, probe_samples, sync)
            source, calls, order = _trace(model, probe.batch)  # the structure does not depend on the batch size
            probe.check_finite()  # after the trace, which names the first module that sees a NaN
            candidates = _candidates(modules, wanted, source, calls, order, extra_pairs, auto_pairs)
        sync.check_same([(g.prev, g.linears, g.skip_reason) for g in candidates], "the SmoothQuant candidate groups")
        groups: List[SmoothGroup] = []
        tried: Dict[str, List[str]] = {}  # consumer -> previous Linears whose pair did not fold
        for g in candidates:
            if g.source == "pair" and any(g.linears[0] in h.linears for h in groups if h.skip_reason is None):
                continue  # a nearer Linear already folds into this consumer
            _check(probe, modules, g)
            if g.source == "pair" and g.skip_reason is not None:
                tried.setdefault(g.linears[0], []).append(g.prev)
            else:
                groups.append(g)
    covered = {n for g in groups for n in g.linears}
    for lin in sorted(wanted - covered, key=lambda n: order.index(n) if n in order else len(order)):
        why = ("it was not called on the first calibration batch" if lin not in order else
               f"no earlier Linear of its block folds into it exactly (tried {', '.join(tried[lin])}: an activation, "
               f"a softmax or another consumer sits between)" if lin in tried else
               "its input is not the output of a norm or Linear module, and no earlier Linear of its block matches")
        groups.append(SmoothGroup("", "none", [lin], "none", why))
    return groups
