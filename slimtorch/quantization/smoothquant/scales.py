"""The scale formula and how scales are applied: pure functions of tensors, plus in-place scaling of weights.

``y = x W^T = (x / s) (W * s)^T`` for any s > 0: the activation range shrinks where s > 1.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
from torch import Tensor, nn

from ...errors import CalibrationError, ConfigError
from ..qdq import op_type


def check_alpha(alpha: Any) -> None:
    """A ConfigError unless ``alpha`` is a number in [0, 1] ("auto" is the caller's to handle)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"smoothquant.alpha must be a number in [0, 1] or \"auto\", got {alpha!r}; 0.5 is the "
                          f"paper's default, larger values move more of the activation range into the weights")


def smoothing_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float, eps: float = 1e-5) -> Tensor:
    """Per-input-channel scales (float32, in [eps, 1/eps]); a channel with zero activation or weight gets s = 1."""
    check_alpha(alpha)
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


def linear_weight(m: nn.Module) -> Tensor:
    """A Linear's weight as [out, in] in float32 (transformers' Conv1D stores [in, out]); for reading only."""
    w = m.weight.detach().float()
    return w.t() if op_type(m) == "Conv1D" else w


def weight_absmax(mods: Sequence[nn.Module]) -> Tensor:
    """max |W_ij| over the output dim and over every Linear that shares the input."""
    return torch.stack([linear_weight(m).abs().amax(0) for m in mods]).amax(0)


def input_axis(m: nn.Module) -> int:
    """The axis of ``m.weight`` that indexes input channels: 0 for a Conv1D ([in, out]), 1 for a Linear."""
    return 0 if op_type(m) == "Conv1D" else 1


def scale_channels_(t: Tensor, s: Tensor, dim: int, divide: bool) -> None:
    """``t`` multiplied (or divided) by ``s`` along ``dim``, in place: the same Parameter, its dtype kept."""
    shape = [1] * t.dim()
    shape[dim] = -1
    f = s.reshape(shape).to(t.device)
    t.data.copy_((t.data.float() / f if divide else t.data.float() * f).to(t.dtype))


def fold_scales_(modules: Dict[str, nn.Module], prev: str, linears: Sequence[str], s: Tensor) -> None:
    """prev's output channels divided by s, the Linears' input columns multiplied by s: the product is unchanged."""
    p = modules[prev]
    # its output channels: a norm's [C] weight, a Linear's weight rows, a Conv1D's weight columns
    scale_channels_(p.weight, s, 1 if op_type(p) == "Conv1D" else 0, divide=True)
    if getattr(p, "bias", None) is not None:
        scale_channels_(p.bias, s, 0, divide=True)
    for name in linears:
        scale_channels_(modules[name].weight, s, input_axis(modules[name]), divide=False)
