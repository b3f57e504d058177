r"""Pure affine-quantization math, plain torch ops only, so it runs wherever the tensors live.

| function          | formula                                                        | output          |
|-------------------|----------------------------------------------------------------|-----------------|
| choose_qparams    | symmetric int8: s = max(\|min\|, \|max\|) / 127, z = 0          | (s f32, z i32)  |
|                   | asymmetric:     s = (max - min) / (qmax - qmin), z = qmin - round(min / s) |  |
| quantize          | q = clamp(round(x / s) + z, qmin, qmax)                        | int8 / uint8    |
| dequantize        | x' = (q - z) * s                                               | float32         |
| fake_quantize     | dequantize(quantize(x)), computed in float, bit-identical      | x.dtype         |

The range [min, max] is first widened to include 0, so 0.0 is always exactly representable (padding, ReLU zeros,
pruned weights). Scalars (0-d) give per-tensor params; 1-d tensors give per-channel params, and ``axis`` names the
channel axis of ``x`` (0 for a Linear weight ``[out, in]``).

Symmetric int8 uses the *restricted* range [-127, 127] to pick the scale (what TensorRT expects, and it keeps the
grid symmetric so -x quantizes to -q). ``quantize`` itself saturates to the full dtype range ([-128, 127]), exactly
like ONNX QuantizeLinear, so the PyTorch QDQ model and the exported ONNX graph agree bit for bit; pass
``quant_min=-127`` to clamp to the restricted range as well. ``torch.round`` rounds half to even, as QuantizeLinear.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import CalibrationError

DTYPES = {"int8": (torch.int8, -128, 127), "uint8": (torch.uint8, 0, 255)}
SYMMETRIC_INT8_QMAX = 127  # restricted range [-127, 127]
DEFAULT_EPS = torch.finfo(torch.float32).eps  # smallest scale: a zero range must never give s = 0 (division by 0)


def _dtype_info(dtype: str) -> Tuple[torch.dtype, int, int]:
    if dtype not in DTYPES:
        raise CalibrationError(f"quantization dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def choose_qparams(min_val: Tensor, max_val: Tensor, *, dtype: str = "int8", symmetric: bool = True,
                   eps: float = DEFAULT_EPS) -> Tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) for the observed range [min_val, max_val], 0-d or 1-d (per channel)."""
    _, qmin, qmax = _dtype_info(dtype)
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32, device=min_val.device)
    if min_val.shape != max_val.shape or min_val.dim() > 1:
        raise CalibrationError(f"min_val and max_val must have the same 0-d or 1-d shape, got {tuple(min_val.shape)} "
                         f"and {tuple(max_val.shape)}")
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise CalibrationError(f"cannot choose quantization parameters from a non-finite range "
                               f"(min={min_val.tolist()}, max={max_val.tolist()}); the observed values contain NaN or "
                               "inf")
    if (min_val > max_val).any():
        raise CalibrationError(f"min_val > max_val: min={min_val.tolist()}, max={max_val.tolist()}")
    min_neg = torch.clamp(min_val, max=0.0)  # the range always includes 0
    max_pos = torch.clamp(max_val, min=0.0)
    if symmetric:
        if dtype != "int8":
            raise CalibrationError("symmetric quantization needs dtype 'int8' (zero point 0); use 'uint8' with "
                             "symmetric=False for asymmetric activations")
        scale = torch.maximum(-min_neg, max_pos) / SYMMETRIC_INT8_QMAX  # s = amax / 127
        scale = torch.clamp(scale, min=eps)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (max_pos - min_neg) / float(qmax - qmin)  # s = (max - min) / (qmax - qmin)
        scale = torch.clamp(scale, min=eps)
        # z = qmin - round(min / s): 0.0 maps to the integer z exactly, so it dequantizes to exactly 0.0
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def _broadcast(param: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    """Reshape a 0-d or 1-d qparam so it broadcasts against ``x`` along ``axis``."""
    param = torch.as_tensor(param, device=x.device)
    if axis is None:
        if param.numel() != 1:
            raise CalibrationError(f"per-channel qparams of shape {tuple(param.shape)} need axis=<channel axis>")
        return param.reshape(())
    axis = axis % x.dim() if x.dim() else 0
    if param.dim() != 1 or param.numel() != x.shape[axis]:
        raise CalibrationError(f"per-channel qparams of shape {tuple(param.shape)} do not match axis {axis} of a "
                               f"tensor of shape {tuple(x.shape)}")
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def _quantize_float(x: Tensor, scale: Tensor, zero_point: Tensor, dtype: str, axis: Optional[int],
                    quant_min: Optional[int], quant_max: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    _, qmin, qmax = _dtype_info(dtype)
    qmin = qmin if quant_min is None else quant_min
    qmax = qmax if quant_max is None else quant_max
    s = _broadcast(scale, x, axis).to(torch.float32)
    z = _broadcast(zero_point, x, axis).to(torch.float32)
    # q = clamp(round(x / s) + z, qmin, qmax), in float32 (ints up to 255 are exact there); division as QuantizeLinear
    q = torch.clamp(torch.round(x.to(torch.float32) / s) + z, qmin, qmax)
    return q, s, z


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, *, dtype: str = "int8", axis: Optional[int] = None,
             quant_min: Optional[int] = None, quant_max: Optional[int] = None) -> Tensor:
    """Integer tensor ``clamp(round(x / s) + z, qmin, qmax)`` of ``dtype``; ``axis`` for per-channel params."""
    q, _, _ = _quantize_float(x, scale, zero_point, dtype, axis, quant_min, quant_max)
    return q.to(_dtype_info(dtype)[0])


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, *, axis: Optional[int] = None) -> Tensor:
    """Float32 tensor ``(q - z) * s``."""
    s = _broadcast(scale, q, axis).to(torch.float32)
    z = _broadcast(zero_point, q, axis).to(torch.float32)
    return (q.to(torch.float32) - z) * s  # x' = (q - z) * s


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, *, dtype: str = "int8", axis: Optional[int] = None,
                  quant_min: Optional[int] = None, quant_max: Optional[int] = None) -> Tensor:
    """``dequantize(quantize(x))`` without an integer tensor, returned in ``x.dtype`` (bit-identical in float32)."""
    q, s, z = _quantize_float(x, scale, zero_point, dtype, axis, quant_min, quant_max)
    out = (q - z) * s  # same ops, same order as dequantize: identical result
    return out if not x.is_floating_point() or x.dtype == torch.float32 else out.to(x.dtype)


def fake_quantize_dynamic(x: Tensor, dtype: str, symmetric: bool, granularity: str) -> Tensor:
    """Quantize-dequantize with qparams from ``x`` itself: one range per tensor, or per token (row of the last axis)."""
    xd = x.detach()
    if granularity == "tensor":
        s, z = choose_qparams(xd.amin(), xd.amax(), dtype=dtype, symmetric=symmetric)
        return fake_quantize(x, s, z, dtype=dtype)
    rows = x.reshape(-1, x.shape[-1])
    s, z = choose_qparams(rows.detach().amin(1), rows.detach().amax(1), dtype=dtype, symmetric=symmetric)
    return fake_quantize(rows, s, z, dtype=dtype, axis=0).reshape(x.shape)
