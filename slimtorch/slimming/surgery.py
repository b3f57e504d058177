"""Pure layer surgery for slimming: smaller dense copies of Linear, Conv and BatchNorm layers that keep chosen
output and input channels, and the bias folding that makes removing a unit exact.

Every function returns a new module (same dtype, device and training mode) and leaves its argument unchanged.
Index tensors are 1-D ``long`` tensors of the channels *kept*, in increasing order.

Why folding: a pruned unit whose weights are zero can still carry a constant. An FFN unit with zero weights but a
bias ``b`` outputs ``act(b)`` for every token; an attention head whose value rows are zero outputs its value bias
(the attention weights sum to one). Removing such a unit is exact only once the consumer absorbs the constant:
``consumer.bias += W[:, dropped] @ constant`` (:func:`fold_constant_inputs`).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn


def _index(keep: Optional[Tensor], size: int, what: str) -> Tensor:
    if keep is None:
        return torch.arange(size)
    keep = torch.as_tensor(keep).to(torch.long).flatten().cpu()
    if keep.numel() == 0:
        raise ValueError(f"{what}: keeping no channel would leave a layer of width 0")
    if bool((keep < 0).any()) or bool((keep >= size).any()) or bool((keep[1:] <= keep[:-1]).any()):
        raise ValueError(f"{what}: kept channels must be increasing indices below {size}, got {keep.tolist()[:8]}...")
    return keep


def _skeleton(module: nn.Module, tensors) -> nn.Module:
    """A copy of ``module`` (its class, hooks, submodules such as a conv's static padding, attributes) without
    copying the named parameters / buffers, which the caller sets: subclasses with their own constructor
    arguments (EfficientNet's Conv2dStaticSamePadding) narrow like plain layers."""
    saved = {}
    for name in tensors:
        table = module._parameters if name in module._parameters else module._buffers
        saved[name] = (table, table[name])
        table[name] = None
    try:
        new = copy.deepcopy(module)
    finally:
        for name, (table, value) in saved.items():
            table[name] = value
    return new


def _parameter(value: Tensor, like: Optional[nn.Parameter]) -> Optional[nn.Parameter]:
    return None if like is None else nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad)


def shrink_linear(linear: nn.Linear, keep_out: Optional[Tensor] = None, keep_in: Optional[Tensor] = None) -> nn.Linear:
    """A Linear with only the rows ``keep_out`` (and their biases) and the columns ``keep_in`` of ``linear``."""
    rows = _index(keep_out, linear.out_features, "keep_out").to(linear.weight.device)
    cols = _index(keep_in, linear.in_features, "keep_in").to(linear.weight.device)
    new = _skeleton(linear, ("weight", "bias"))
    new.weight = _parameter(linear.weight[rows][:, cols], linear.weight)
    new.bias = _parameter(linear.bias[rows], linear.bias) if linear.bias is not None else None
    new.in_features, new.out_features = cols.numel(), rows.numel()
    return new


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def shrink_transposed_linear(module: nn.Module, keep_out: Optional[Tensor] = None,
                             keep_in: Optional[Tensor] = None) -> nn.Module:
    """A transformers ``Conv1D`` with only the outputs ``keep_out`` and the inputs ``keep_in``."""
    weight = module.weight
    rows = _index(keep_in, weight.shape[0], "keep_in").to(weight.device)
    cols = _index(keep_out, weight.shape[1], "keep_out").to(weight.device)
    new = _skeleton(module, ("weight", "bias"))
    new.weight = _parameter(weight[rows][:, cols], weight)
    new.bias = _parameter(module.bias[cols], module.bias) if module.bias is not None else None
    new.nf = cols.numel()
    if hasattr(new, "nx"):
        new.nx = rows.numel()
    return new


def input_width(module: nn.Module) -> int:
    """Input channels of a Linear, a conv or transformers' Conv1D (weight ``[in, out]``)."""
    if is_transposed_linear(module):
        return int(module.weight.shape[0])
    return int(getattr(module, "in_features", None) or getattr(module, "in_channels"))


def linear_view(module: nn.Module) -> Tensor:
    """The weight as a Linear's ``[out, in]`` (a transposed view for transformers' Conv1D)."""
    return module.weight.t() if is_transposed_linear(module) else module.weight


def shrink_conv(conv: nn.Conv2d, keep_out: Optional[Tensor] = None, keep_in: Optional[Tensor] = None) -> nn.Conv2d:
    """A Conv1d/2d with the output channels ``keep_out`` and the input channels ``keep_in``.

    Grouped convolutions: a depthwise conv (groups == in == out channels) keeps its channels together, so
    ``keep_in`` must equal ``keep_out`` (either may be given); other grouped convs are refused.
    """
    groups = conv.groups
    depthwise = groups > 1 and groups == conv.in_channels == conv.out_channels
    if depthwise:
        keep = keep_out if keep_out is not None else keep_in
        if keep_out is not None and keep_in is not None and not torch.equal(torch.as_tensor(keep_out).cpu(),
                                                                             torch.as_tensor(keep_in).cpu()):
            raise ValueError("a depthwise conv keeps the same channels on both sides: keep_out must equal keep_in")
        rows = _index(keep, conv.out_channels, "keep_out")
        cols = torch.zeros(1, dtype=torch.long)
    elif groups > 1:
        raise ValueError(f"grouped conv with {groups} groups ({conv.in_channels} -> {conv.out_channels} channels): "
                         "only depthwise grouped convs are slimmed")
    else:
        rows = _index(keep_out, conv.out_channels, "keep_out")
        cols = _index(keep_in, conv.in_channels, "keep_in")
    device = conv.weight.device
    new = _skeleton(conv, ("weight", "bias"))
    new.weight = _parameter(conv.weight[rows.to(device)][:, cols.to(device)], conv.weight)
    new.bias = _parameter(conv.bias[rows.to(device)], conv.bias) if conv.bias is not None else None
    new.out_channels = rows.numel()
    new.in_channels = rows.numel() if depthwise else cols.numel()
    new.groups = rows.numel() if depthwise else 1
    return new


def shrink_batchnorm(norm: nn.modules.batchnorm._BatchNorm, keep: Tensor) -> nn.modules.batchnorm._BatchNorm:
    """A BatchNorm over the channels ``keep`` only: affine parameters and running statistics follow them."""
    channels = _index(keep, norm.num_features, "keep")
    new = _skeleton(norm, [n for n in ("weight", "bias", "running_mean", "running_var")
                           if getattr(norm, n, None) is not None])
    for name in ("weight", "bias"):
        source = getattr(norm, name)
        if source is not None:
            setattr(new, name, _parameter(source[channels.to(source.device)], source))
    for name in ("running_mean", "running_var"):
        source = getattr(norm, name)
        if source is not None:
            new._buffers[name] = source[channels.to(source.device)].clone()
    new.num_features = channels.numel()
    return new


def fold_constant_inputs(consumer: nn.Linear, dropped: Tensor, constant: Tensor) -> None:
    """Add to ``consumer``'s bias what its dropped input columns contributed: ``bias += W[:, dropped] @ constant``
    (``constant``: the value, the same for every token, that each dropped input carried). Creates the bias when
    the consumer has none and the contribution is not zero. Changes ``consumer`` in place (it is about to be
    replaced by its shrunk copy)."""
    dropped = torch.as_tensor(dropped, dtype=torch.long).flatten().to(consumer.weight.device)
    if dropped.numel() == 0:
        return
    constant = constant.to(device=consumer.weight.device, dtype=torch.float32).flatten()
    if constant.numel() != dropped.numel():
        raise ValueError(f"{dropped.numel()} dropped inputs but {constant.numel()} constants")
    weight = linear_view(consumer)
    with torch.no_grad():
        shift = weight[:, dropped].to(torch.float32) @ constant
        if not bool(shift.any()):
            return
        if consumer.bias is None:
            consumer.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype))
        consumer.bias.add_(shift.to(consumer.bias.dtype))


def zero_rows(weight: Tensor) -> Tensor:
    """Bool ``[out]``: the output rows of a ``[out, ...]`` weight that are entirely zero."""
    return ~weight.detach().reshape(weight.shape[0], -1).ne(0).any(dim=1)
