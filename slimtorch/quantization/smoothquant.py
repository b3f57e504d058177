r"""SmoothQuant: per-input-channel scales that move activation outliers into the weights, folded into the model.

``y = x W^T = (x / s) (W * s)^T`` for any s > 0: the activation range shrinks where s > 1. The ``1 / s`` is folded
into the op that makes ``x`` (a LayerNorm/RMSNorm's weight and bias, or a previous Linear's output rows and bias), so
the model keeps its structure, its module names and its float function.

| function              | what it does                                                                          |
|-----------------------|---------------------------------------------------------------------------------------|
| smoothing_scales      | s_j = max\|X_j\|^a / max\|W_j\|^(1-a); 1 for channels with zero activation or weight   |
| find_smoothing_groups | hooks: the Linears that read exactly a norm's or a Linear's output tensor, plus Linear |
|                       | -> Linear pairs through other ops (value -> attention output), tried per block          |
| search_alpha          | the grid alpha with the least int8 fake-quant output error of a group                 |
| smooth                | calibrate, pick alpha, fold, verify, report (SmoothQuantReport)                       |

"Smoothing never changes the float model" is checked, not assumed: each candidate fold is applied, the model run on
a probe batch and the fold reverted if the output moved. Hooks see module calls, not the residual add: a post-LN
block (BERT) feeds its LayerNorm's output to the next Linears *and* to the residual, so folding into it is wrong,
while a pre-LN block (LLaMA, GPT-2) feeds it to the Linears only. The check also catches norms that scale by
``1 + weight`` (Gemma) and tied weights.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import CalibrationError, ConfigError
from .calibrate import calibrate, feed, model_device, to_device
from .distributed import LOCAL, reduce_channel_stats
from .primitives import SYMMETRIC_INT8_QMAX, choose_qparams, fake_quantize
from .qdq import op_type
from .smooth_report import GroupResult, SmoothQuantReport  # noqa: F401 - re-exported: part of this module's API

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0, 0.05, ..., 1.0
Pairs = Sequence[Tuple[str, Sequence[str]]]


# -- math ---------------------------------------------------------------------------------------------------------
def smoothing_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float, eps: float = 1e-5) -> Tensor:
    """Per-input-channel scales (float32, in [eps, 1/eps]); a channel with zero activation or weight gets s = 1."""
    _check_alpha(alpha)
    a = torch.as_tensor(act_absmax, dtype=torch.float32)
    w = torch.as_tensor(weight_absmax, dtype=torch.float32, device=a.device)
    if a.dim() != 1 or a.shape != w.shape:
        raise ConfigError(f"act_absmax and weight_absmax need one entry per input channel (1-d, same length), got "
                          f"shapes {tuple(a.shape)} and {tuple(w.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(w).all()):
        raise CalibrationError("smoothing scales need finite activation and weight maxima; the statistics contain "
                               "NaN or inf (check the calibration data and the model's weights)")
    live = (a > eps) & (w > eps)  # a dead channel has nothing to migrate: leave it alone
    s = a.clamp(min=eps).pow(alpha) / w.clamp(min=eps).pow(1.0 - alpha)  # s_j = max|X_j|^a / max|W_j|^(1-a)
    return torch.where(live, s, torch.ones_like(s)).clamp(min=eps, max=1.0 / eps)  # never 0, inf or NaN


def _check_alpha(alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"smoothquant.alpha must be a number in [0, 1] or \"auto\", got {alpha!r}; 0.5 is the "
                          f"paper's default, larger values move more of the activation range into the weights")


# -- module kinds, folding ----------------------------------------------------------------------------------------
def _is_linear(m: nn.Module) -> bool:
    return op_type(m) in ("Linear", "Conv1D")


def _is_norm(m: nn.Module) -> bool:
    if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True  # without an affine weight too, so that discovery can say why it cannot fold
    w = getattr(m, "weight", None)  # LlamaRMSNorm, T5LayerNorm, ...: a per-channel weight and no other structure
    return type(m).__name__.endswith(("LayerNorm", "RMSNorm")) and isinstance(w, Tensor) and w.dim() == 1


def _w(m: nn.Module) -> Tensor:
    """A Linear's weight as [out, in] in float32 (transformers' Conv1D stores [in, out]); for reading only."""
    w = m.weight.detach().float()
    return w.t() if op_type(m) == "Conv1D" else w


def _out_ch(m: nn.Module) -> int:
    return m.weight.shape[0] if _is_norm(m) else _w(m).shape[0]


def _scale_(t: Tensor, s: Tensor, dim: int, divide: bool) -> None:
    shape = [1] * t.dim()
    shape[dim] = -1
    f = s.reshape(shape).to(t.device)
    t.data.copy_((t.data.float() / f if divide else t.data.float() * f).to(t.dtype))  # in place: same Parameter


def _fold(modules: Dict[str, nn.Module], prev: str, linears: Sequence[str], s: Tensor) -> None:
    """prev's output channels divided by s, the Linears' input columns multiplied by s: the product is unchanged."""
    p = modules[prev]
    _scale_(p.weight, s, 1 if op_type(p) == "Conv1D" else 0, divide=True)  # norm: [C]; Linear rows; Conv1D columns
    if getattr(p, "bias", None) is not None:
        _scale_(p.bias, s, 0, divide=True)
    for name in linears:
        _scale_(modules[name].weight, s, 0 if op_type(modules[name]) == "Conv1D" else 1, divide=False)


# -- the exactness check ------------------------------------------------------------------------------------------
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


class _Probe:
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
        with torch.no_grad():
            return [t.detach().float() for t in _tensors(feed(self.model, self.batch)) if t.is_floating_point()]

    def fold(self, modules: Dict[str, nn.Module], plans: Sequence[Tuple[str, Sequence[str], Tensor]],
             keep: bool) -> float:
        """Fold every (prev, linears, s), run, compare; revert bit-exactly if it moved more than tol or not keep."""
        saved = [(t, t.detach().clone()) for prev, lins, _ in plans for n in (prev, *lins)
                 for t in (modules[n].weight, getattr(modules[n], "bias", None)) if isinstance(t, Tensor)]
        for prev, lins, s in plans:
            _fold(modules, prev, lins, s)
        d = max([float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)
                 for a, b in zip(self.run(), self.ref)] or [0.0])
        d = self.sync.max_float(d if d == d else float("inf"))  # NaN means changed
        if d > self.tol or not keep:
            for t, v in saved:
                t.data.copy_(v)
        return d


@contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode (dropout off) inside; every submodule's own mode restored after, also on errors."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model.eval()
    finally:
        for m, training in modes.items():
            m.training = training


# -- discovery ----------------------------------------------------------------------------------------------------
@dataclass
class SmoothGroup:
    """``prev``'s output channels feed the input channels of ``linears``; ``skip_reason`` None means foldable.

    kind: "layernorm" (a norm), "linear" (a Linear/Conv1D) or "none" (no previous op: the Linear is reported only).
    source: "identity" (the Linears read prev's output tensor itself), "pair" (found by trying a Linear -> Linear
    pair through other ops), "explicit" (extra_pairs) or "none".
    """

    prev: str
    kind: str
    linears: List[str]
    source: str = "identity"
    skip_reason: Optional[str] = None


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

    handles = []
    try:
        for name, m in model.named_modules():
            if _is_linear(m):
                handles.append(m.register_forward_pre_hook(pre(name)))
            if _is_linear(m) or _is_norm(m):
                handles.append(m.register_forward_hook(post(name)))
        with torch.no_grad():
            feed(model, batch)
    finally:
        for h in handles:
            h.remove()
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
            if _block(a) == _block(b) and calls.get(a, 0) == 1 and _w(modules[a]).shape[0] == _w(modules[b]).shape[1]:
                groups.append(SmoothGroup(a, "linear", [b], "pair"))
    return groups


def _why(g: SmoothGroup, d: float, tol: float) -> str:
    what = ("its output also reaches other ops (e.g. the residual add of a post-LN block) or it does not scale by "
            "its weight" if g.kind == "layernorm" else
            "the path between them is not linear per channel (an activation, a softmax, other consumers)")
    return f"folding changes the float output (max relative difference {d:.1e} > {tol:.0e}): {what}"


def _check(probe: _Probe, modules: Dict[str, nn.Module], g: SmoothGroup) -> None:
    """Set ``g.skip_reason`` from static checks, then by folding probe scales in [0.5, 2] (always reverted)."""
    prev = modules[g.prev]
    if g.skip_reason is not None:
        return
    if not isinstance(getattr(prev, "weight", None), Tensor):
        g.skip_reason = f"{type(prev).__name__} has no affine weight to fold into"
    elif any(_w(modules[n]).shape[1] != _out_ch(prev) for n in g.linears):
        g.skip_reason = "the previous op's output channels and the Linears' input channels differ in number"
    else:
        gen = torch.Generator().manual_seed(1234)  # fixed: discovery is deterministic
        s = torch.exp((torch.rand(_out_ch(prev), generator=gen) * 2.0 - 1.0) * 0.7)
        d = probe.fold(modules, [(g.prev, g.linears, s)], keep=False)
        g.skip_reason = _why(g, d, probe.tol) if d > probe.tol else None


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
    with _eval_mode(model):
        with sync.guard("SmoothQuant discovery"):
            batch = to_device(input_fn(batch) if input_fn is not None else batch, model_device(model))
            probe = _Probe(model, batch, tol, probe_samples, sync)
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


# -- statistics ---------------------------------------------------------------------------------------------------
class ChannelStats:
    """Observer: per-input-channel min/max over all tokens, and a uniform seeded sample of up to ``max_rows`` rows."""

    def __init__(self, max_rows: int = 0, seed: int = 0):
        self.max_rows, self.min, self.max = max_rows, None, None
        self.rows: Optional[Tensor] = None
        self._keys: Optional[Tensor] = None
        self._gen = torch.Generator().manual_seed(seed)

    def observe(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if not bool(torch.isfinite(rows).all()):
            raise CalibrationError(f"{int(torch.isnan(rows).sum())} NaN and {int(torch.isinf(rows).sum())} inf "
                                   f"values; smoothing scales need finite activations")
        lo, hi = rows.amin(0), rows.amax(0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.max_rows > 0:  # the rows with the smallest random keys: a uniform sample, the same every run
            keys = torch.rand(rows.shape[0], generator=self._gen).to(rows.device)
            if self.rows is not None:
                rows, keys = torch.cat([self.rows, rows]), torch.cat([self._keys, keys])
            keep = torch.argsort(keys)[:self.max_rows]
            self.rows, self._keys = rows[keep], keys[keep]

    @property
    def absmax(self) -> Tensor:
        return torch.maximum(-self.min, self.max)


def _weight_absmax(mods: Sequence[nn.Module]) -> Tensor:
    """max |W_ij| over the output dim and over every Linear that shares the input."""
    return torch.stack([_w(m).abs().amax(0) for m in mods]).amax(0)


def alpha_errors(stats: ChannelStats, mods: Sequence[nn.Module], act_dtype: str = "int8",
                 act_symmetric: bool = True) -> Tensor:
    """[len(ALPHA_GRID), len(mods), 2] float64: per alpha and Linear, the sums over ``stats.rows`` of the squared
    fake-quant output error and of the squared float output (zeros without rows): sums, so ranks can add theirs."""
    out = torch.zeros(len(ALPHA_GRID), len(mods), 2, dtype=torch.float64)
    x = stats.rows
    if x is None or x.numel() == 0:
        return out
    ws = [_w(m).to(x.device) for m in mods]
    refs = [x @ w.t() for w in ws]
    wmax = _weight_absmax(mods).to(x.device)
    for i, alpha in enumerate(ALPHA_GRID):
        s = smoothing_scales(stats.absmax, wmax, alpha)
        # min/max of X_j / s_j over every calibration token, exact because s > 0: what minmax calibration will see
        sc, zp = choose_qparams((stats.min / s).amin(), (stats.max / s).amax(), dtype=act_dtype,
                                symmetric=act_symmetric)
        xq = fake_quantize(x / s, sc, zp, dtype=act_dtype)
        for k, (w, ref) in enumerate(zip(ws, refs)):
            w_s = w * s  # W_ij * s_j
            wsc, wzp = choose_qparams(w_s.amin(1), w_s.amax(1), dtype="int8", symmetric=True)
            wq = fake_quantize(w_s, wsc, wzp, axis=0, quant_min=-SYMMETRIC_INT8_QMAX)
            out[i, k, 0], out[i, k, 1] = float(((xq @ wq.t() - ref) ** 2).sum()), float((ref ** 2).sum())
    return out


def search_alpha(stats: ChannelStats, mods: Sequence[nn.Module], act_dtype: str = "int8",
                 act_symmetric: bool = True, reduce: Optional[Callable[[Tensor], Tensor]] = None
                 ) -> Tuple[float, float]:
    """The ALPHA_GRID value with the least fake-quant output error of ``mods`` on ``stats.rows``; (alpha, error).

    Error: sum over the Linears of MSE / mean square of the float output, with the activations quantized per tensor
    on the full calibration range of X / s and the weights W * s symmetric int8 per output channel (as QDQLinear).
    ``reduce`` (distributed calibration: a SUM over the ranks) combines the error sums of every rank's rows first.
    """
    e = alpha_errors(stats, mods, act_dtype, act_symmetric)
    e = reduce(e) if reduce is not None else e
    best = (ALPHA_GRID[0], float("inf"))
    for alpha, err in zip(ALPHA_GRID, (e[..., 0] / e[..., 1].clamp(min=1e-30)).sum(1).tolist()):
        if err < best[1]:  # strict: ties keep the smaller alpha
            best = (alpha, err)
    return best


# -- entry point --------------------------------------------------------------------------------------------------
def smooth(model: nn.Module, loader: Iterable, *, linear_names: Sequence[str], alpha: Union[float, str],
           num_batches: int, input_fn: Optional[Callable[[Any], Any]] = None, act_dtype: str = "int8",
           act_symmetric: bool = True, folding: bool = True, extra_pairs: Pairs = (), auto_pairs: bool = True,
           max_rows: int = 2048, tol: Optional[float] = None, probe_samples: int = 1,
           sync: Any = LOCAL) -> SmoothQuantReport:
    """Smooth ``model`` in place (pass a copy) before quantizing ``linear_names``; its float function is unchanged.

    ``alpha`` in [0, 1], or "auto": per group the ALPHA_GRID value with the least fake-quant output error on up to
    ``max_rows`` sampled input rows (``act_dtype``/``act_symmetric`` activations, int8 per-channel weights). The
    first batch drives discovery and every exactness check; up to ``num_batches`` batches feed the statistics.
    ``sync``: distributed calibration (quantization/distributed.py), every statistic reduced over the ranks.
    """
    if alpha != "auto":
        _check_alpha(alpha)
    if not folding:
        raise ConfigError("smoothquant.folding=false (an explicit Mul before each Linear) is not supported yet; set "
                          "smoothquant.folding to true, which folds the scales into the previous LayerNorm or Linear")
    if num_batches < 1:
        raise ConfigError(f"num_calibration_batches must be >= 1, got {num_batches}")
    try:
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
    rows = max_rows if alpha == "auto" else 0
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
        a = search_alpha(st, mods, act_dtype, act_symmetric, sync.sum_ordered)[0] if alpha == "auto" else float(alpha)
        plans.append((g, a, smoothing_scales(st.absmax, _weight_absmax(mods).to(st.absmax.device), a), st.absmax))
    with _eval_mode(model), sync.guard("SmoothQuant verification"):
        probe = _Probe(model, to_device(input_fn(first) if input_fn is not None else first, model_device(model)),
                       tol, probe_samples, sync)
    with _eval_mode(model):
        # all groups in one run; if that moves the output (rounding at extreme scales), one group at a time
        if probe.fold(modules, [(g.prev, g.linears, s) for g, _, s, _ in plans], keep=True) > probe.tol:
            for g, _, s, _ in plans:
                d = probe.fold(modules, [(g.prev, g.linears, s)], keep=True)
                g.skip_reason = f"with the computed scales, {_why(g, d, probe.tol)}" if d > probe.tol else None
    for g, a, s, absmax in plans:
        if g.skip_reason is not None:
            report.skipped.append(g)
        else:
            report.groups.append(GroupResult(g.prev, g.kind, g.linears, a, float(s.max()), float(s.median()),
                                             float(absmax.max()), float((absmax / s).max()), g.source))
    return report
