r"""Fold eval-mode BatchNorm into the Conv1d/Conv2d/Linear that produces its input, in place.

    BN(conv(x)) = gamma * (W x + b - mean) / sqrt(var + eps) + beta
                = (s * W) x + (s * (b - mean) + beta),        s = gamma / sqrt(var + eps), per output channel

Quantization then sees the weights inference really uses: calibrating and quantizing the unfolded conv would quantize
``W`` and ``W x`` while the deployed graph (ONNX Runtime and TensorRT fold BN first) multiplies both by ``s``.

Pairs are found on one example forward, not from module order: forward hooks see which conv output tensor each BN
receives (the same tensor object), and a ``TorchFunctionMode`` sees every other op that reads that tensor (a residual
add of the pre-BN value, a second consumer module), since folding would change what that op reads. After folding, the
model's output is compared with the unfolded one; if they differ, the folds are redone one at a time and each fold that
changes the output is reverted. Every BN left in place is reported with the reason in ``FoldResult.skipped``.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..batches import model_device, to_device
from ..errors import ConfigError
from .distributed import LOCAL
from .passes import hooks_attached, preserved_modes

FOLDABLE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Linear)
FOLDABLE_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)
Inputs = Union[Tensor, tuple, list, Mapping, Callable[[nn.Module], Any]]

# Tensor methods and attributes that only read metadata: they do not consume the values a fold would change
_METADATA_OPS = {"size", "dim", "numel", "ndimension", "nelement", "is_contiguous", "is_floating_point",
                 "is_complex", "element_size", "get_device", "__len__", "stride", "storage_offset"}
_VALUE_ATTRS = {"T", "mT", "H", "mH", "data", "real", "imag", "grad"}  # attribute reads that alias the values


class FoldResult(list):
    """The folded ``(conv_name, bn_name)`` pairs (a plain list); ``skipped`` maps each BN left in place to why."""

    def __init__(self, pairs=(), skipped: Optional[Dict[str, str]] = None):
        super().__init__(pairs)
        self.skipped: Dict[str, str] = dict(skipped or {})


def fold_conv_bn_weights(w: Tensor, b: Optional[Tensor], bn_mean: Tensor, bn_var: Tensor, bn_eps: float,
                         bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Weight and bias of the conv/linear ``w`` (output channels on axis 0) with the following BN folded in.

    ``b``, ``bn_weight`` and ``bn_bias`` may be None (no bias, ``affine=False``). Computed in float64 and returned in
    ``w``'s dtype and device, so folding adds no rounding beyond the final cast.
    """
    dev, dt = w.device, w.dtype
    f64 = dict(dtype=torch.float64, device=dev)
    mean, var = bn_mean.to(**f64), bn_var.to(**f64)
    gamma = torch.ones_like(mean) if bn_weight is None else bn_weight.detach().to(**f64)
    beta = torch.zeros_like(mean) if bn_bias is None else bn_bias.detach().to(**f64)
    bias = torch.zeros_like(mean) if b is None else b.detach().to(**f64)
    if not (w.shape[0] == mean.numel() == var.numel() == gamma.numel() == beta.numel() == bias.numel()):
        raise ConfigError(f"cannot fold a BatchNorm of {mean.numel()} channels into a weight of shape "
                          f"{tuple(w.shape)} (output channels on axis 0); the channel counts must match")
    s = gamma / torch.sqrt(var + bn_eps)  # s = gamma / sqrt(var + eps)
    w_fold = w.detach().to(**f64) * s.reshape([-1] + [1] * (w.dim() - 1))  # W' = s * W, per output channel
    b_fold = (bias - mean) * s + beta  # b' = s * (b - mean) + beta
    return w_fold.to(dt), b_fold.to(dt)


# -- running the example forward ----------------------------------------------------------------------------------
def _runner(model: nn.Module, inputs: Inputs) -> Callable[[], Any]:
    """A no-argument function that runs ``model`` once on ``inputs``.

    A callable is called as ``inputs(model)``; a tensor as ``model(x)``; a tuple or list positionally; a mapping as
    keywords (the ``example_inputs`` rules of ``export_onnx``). Tensors are moved to the model's device.
    """
    if callable(inputs) and not isinstance(inputs, Tensor):
        return lambda: inputs(model)
    moved = to_device(inputs, model_device(model))
    if isinstance(moved, Tensor):
        return lambda: model(moved)
    if isinstance(moved, Mapping):
        return lambda: model(**moved)
    if isinstance(moved, (tuple, list)):
        return lambda: model(*moved)
    raise TypeError(f"fold_batchnorm needs example inputs (a tensor, a tuple of positional inputs or a dict of keyword "
                    f"inputs) or a run_once(model) callable, got {type(inputs).__name__}")


def _tensors(out: Any) -> List[Tensor]:
    leaves, _ = tree_flatten(dict(out) if isinstance(out, Mapping) else out)  # ModelOutput-style mappings too
    return [t for t in leaves if isinstance(t, Tensor)]


def _output_error(out: Any, ref: Any) -> float:
    """Largest |out - ref| relative to max |ref|, over every tensor of the output (inf if the structure differs)."""
    a, b = _tensors(out), _tensors(ref)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        if not y.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        diff = float((x.double() - y.double()).abs().max()) if y.numel() else 0.0
        worst = max(worst, diff / max(float(y.double().abs().max()) if y.numel() else 0.0, 1e-12))
    return worst


def _default_tol(ref: Any) -> float:
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in _tensors(ref))
    return 1e-2 if low else 1e-4  # a correct fold changes float32 outputs by ~1e-6 of their range


# -- discovery ----------------------------------------------------------------------------------------------------
class _ConsumerTrace(TorchFunctionMode):
    """Records, for each tracked tensor, which module (or op outside any BN) reads its values."""

    def __init__(self, tracked: Dict[int, Tuple[weakref.ref, str]], consumers: Dict[str, Set[str]], stack: List[str]):
        super().__init__()
        self.tracked, self.consumers, self.stack = tracked, consumers, stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_metadata(func):
            leaves, _ = tree_flatten((args, kwargs))
            for t in leaves:
                hit = _lookup(self.tracked, t)
                if hit is not None:
                    where = self.stack[-1] if self.stack else "the model's forward"
                    self.consumers[hit].add(where if where.startswith("bn:")
                                            else f"{getattr(func, '__name__', func)} in {where}")
        return func(*args, **kwargs)


def _lookup(tracked: Dict[int, Tuple[weakref.ref, str]], t: Any) -> Optional[str]:
    """The conv that produced tensor ``t`` (the same object, not an equal one), or None."""
    hit = tracked.get(id(t)) if isinstance(t, Tensor) else None
    return hit[1] if hit is not None and hit[0]() is t else None


def _is_metadata(func) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # attribute read: .shape/.dtype are metadata, .T/.data alias the values
        return getattr(getattr(func, "__self__", None), "__name__", "") not in _VALUE_ATTRS
    return name in _METADATA_OPS


def _discover(model: nn.Module, run: Callable[[], Any]) -> Tuple[Any, List[Tuple[str, str]], Dict[str, str]]:
    """Run the example forward once; its output, the foldable (conv, bn) pairs and the reason for each other BN."""
    named = dict(model.named_modules())
    convs = {n: m for n, m in named.items() if isinstance(m, FOLDABLE_CONVS)}
    bns = {n: m for n, m in named.items() if isinstance(m, FOLDABLE_BNS)}
    # id -> (weak reference, conv name): a freed output's id can be reused, the reference then no longer matches;
    # weak, so tracking keeps no activation alive (the example batch of a big CNN would double its memory)
    tracked: Dict[int, Tuple[weakref.ref, str]] = {}
    consumers: Dict[str, Set[str]] = defaultdict(set)  # conv name -> who read any of its outputs
    producers: Dict[str, Set[Optional[str]]] = defaultdict(set)  # bn name -> conv whose output it got (None: other)
    bn_ndim: Dict[str, Set[int]] = defaultdict(set)
    stack: List[str] = []

    def push(label):
        def hook(module, args):
            stack.append(label)
        return hook

    def pop(module, args, out):
        stack.pop()

    def conv_out(name):
        def hook(module, args, out):
            if isinstance(out, Tensor):
                tracked[id(out)] = (weakref.ref(out), name)
        return hook

    def bn_in(name):
        def hook(module, args):
            x = args[0] if args else None
            producers[name].add(_lookup(tracked, x))
            if isinstance(x, Tensor):
                bn_ndim[name].add(x.dim())
            stack.append(f"bn:{name}")  # pushed last: reads of x inside the BN count as the BN's
        return hook

    pre = [(m, bn_in(n) if n in bns else push(n or "the model's forward")) for n, m in named.items()]
    # pop before conv_out: the conv's own frame is off the stack when its output is tracked
    post = [(m, hook) for n, m in named.items() for hook in ([pop, conv_out(n)] if n in convs else [pop])]
    with hooks_attached(pre, post), _ConsumerTrace(tracked, consumers, stack):
        out = run()
    for t in _tensors(out):  # a pre-BN value returned by the model is read by the caller
        conv = _lookup(tracked, t)
        if conv is not None:
            consumers[conv].add("the model's output")

    pairs: List[Tuple[str, str]] = []
    skipped: Dict[str, str] = {}
    for name, bn in bns.items():
        reason = _why_not(name, bn, producers.get(name), convs, consumers, bn_ndim[name])
        if reason is None:
            pairs.append((next(iter(producers[name])), name))
        else:
            skipped[name] = reason
    return out, pairs, skipped


def _why_not(name: str, bn: nn.Module, prods: Optional[Set[Optional[str]]], convs: Dict[str, nn.Module],
             consumers: Dict[str, Set[str]], ndims: Set[int]) -> Optional[str]:
    """Why BN ``name`` cannot be folded, or None if it can."""
    if not prods:
        return "not called by the example forward"
    if bn.running_mean is None or bn.running_var is None:
        return "track_running_stats=False: it normalizes with batch statistics, which no fold can reproduce"
    if None in prods:
        return ("its input is not the direct output of a Conv1d/Conv2d/Linear (e.g. an activation or a view sits "
                "between)")
    if len(prods) > 1:
        return f"it is called on the outputs of several modules ({sorted(prods)})"
    conv_name = next(iter(prods))
    conv = convs[conv_name]
    others = sorted(c for c in consumers[conv_name] if c != f"bn:{name}")
    if others:
        return f"the output of {conv_name!r} is also read by {others[:3]}; folding would change what they see"
    if conv.weight.shape[0] != bn.num_features:
        return f"{conv_name!r} has {conv.weight.shape[0]} output channels, the BN {bn.num_features}"
    if isinstance(conv, nn.Linear) and ndims != {2}:
        return (f"the BN normalizes axis 1 of a {sorted(ndims)}-D output of Linear {conv_name!r}, whose features are "
                f"on the last axis")
    if parametrize.is_parametrized(conv):
        return f"{conv_name!r} has a parametrized weight (e.g. a pruning mask); remove the parametrization first"
    return None


# -- folding and reverting ----------------------------------------------------------------------------------------
class _Fold:
    """One applied fold, with what is needed to undo it."""

    def __init__(self, model: nn.Module, named: Dict[str, nn.Module], conv_name: str, bn_name: str):
        self.conv, self.bn = named[conv_name], named[bn_name]
        self.names = (conv_name, bn_name)
        self.old_w = self.conv.weight.detach().clone()
        self.old_b = None if self.conv.bias is None else self.conv.bias.detach().clone()
        # every slot that holds this BN (a module can be registered under several names)
        self.slots = [(p, k) for p in model.modules() for k, c in p._modules.items() if c is self.bn]

    def apply(self) -> None:
        bn, conv = self.bn, self.conv
        w, b = fold_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight if bn.affine else None, bn.bias if bn.affine else None)
        with torch.no_grad():
            conv.weight.copy_(w)  # in place: the Parameter object (and any optimizer reference) stays
            if conv.bias is None:
                conv.bias = nn.Parameter(b, requires_grad=conv.weight.requires_grad)
            else:
                conv.bias.copy_(b)
        for parent, key in self.slots:
            parent._modules[key] = nn.Identity()

    def revert(self) -> None:
        with torch.no_grad():
            self.conv.weight.copy_(self.old_w)
            if self.old_b is None:
                self.conv.bias = None
            else:
                self.conv.bias.copy_(self.old_b)
        for parent, key in self.slots:
            parent._modules[key] = self.bn


def fold_batchnorm(model: nn.Module, inputs: Inputs, *, tol: Optional[float] = None, sync: Any = None) -> FoldResult:
    """Fold every eval-mode BatchNorm1d/2d into the Conv1d/Conv2d/Linear feeding it, IN PLACE; the folded pairs.

    ``inputs``: example inputs for one forward (tensor, tuple of positional inputs, dict of keyword inputs; moved to
    the model's device) or a ``run_once(model)`` callable. Each folded BN is replaced by ``nn.Identity`` and its conv
    gets a bias if it had none. The output is checked against the unfolded model (max |diff| / max |ref| <= ``tol``,
    default 1e-4, 1e-2 for half precision); a fold that breaks it is reverted and listed in ``result.skipped``.
    Train/eval modes are restored. Pass your own copy: the model is changed in place. ``sync`` (a
    :class:`~slimtorch.quantization.distributed.Sync`): every rank folds the same pairs, each checked on the rank's
    own inputs; a fold is kept only if it holds on every rank.
    """
    if not any(isinstance(m, FOLDABLE_BNS) for m in model.modules()):
        return FoldResult()  # nothing to fold: no forward needed
    # eval statistics are what is folded; a train-mode forward would also update them
    with preserved_modes(model, "eval"), torch.no_grad():
        return _fold_verified(model, _runner(model, inputs), tol, sync if sync is not None else LOCAL)


def _fold_verified(model: nn.Module, run: Callable[[], Any], tol: Optional[float], sync) -> FoldResult:
    with sync.guard("BatchNorm folding"):
        try:
            ref, pairs, skipped = _discover(model, run)
        except (TypeError, RuntimeError, ValueError) as e:
            raise ConfigError(f"fold_batchnorm: the example forward of {type(model).__name__} failed "
                              f"({type(e).__name__}: {e}); pass inputs it accepts, or a run_once(model) "
                              "callable") from e
    if sync.active:  # fold only what every rank can fold, in rank 0's order
        everyone = sync.gather(pairs)
        common = [p for p in everyone[0] if all(p in theirs for theirs in everyone)]
        skipped.update({b: "foldable on some data-parallel ranks only (their example forwards differ)"
                        for c, b in pairs if (c, b) not in common})
        pairs = common
    tol = _default_tol(ref) if tol is None else tol
    err_of = lambda: sync.max_float(_output_error(run(), ref))  # noqa: E731 - the worst rank decides
    named = dict(model.named_modules())
    folds = [_Fold(model, named, c, b) for c, b in pairs]
    for f in folds:
        f.apply()
    if not folds or err_of() <= tol:
        return FoldResult(pairs, skipped)
    # some fold changed the output (a consumer the trace could not see): redo them one at a time, keep the good ones
    for f in reversed(folds):
        f.revert()
    err = err_of()
    if err > tol:
        raise ConfigError(f"fold_batchnorm cannot verify folds: two eval-mode forwards of the unfolded "
                          f"{type(model).__name__} differ (max relative difference {err:.2e}); make the forward "
                          f"deterministic in eval mode, or fold with a run_once(model) callable that is")
    kept = []
    for f in folds:
        f.apply()
        err = err_of()
        if err <= tol:
            kept.append(f.names)
        else:
            f.revert()
            skipped[f.names[1]] = (f"folding it into {f.names[0]!r} changed the model output (max relative difference "
                                   f"{err:.2e}); the conv output is probably read by an op the trace cannot see")
    return FoldResult(kept, skipped)
