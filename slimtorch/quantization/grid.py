r"""The quantization grid of every slimtorch path: PTQ/QDQ (encoders, CNNs), weight-only int4/int8 (RTN, GPTQ, AWQ),
W8A8 int8, FP8 E4M3 and quantization-aware training. Pure functions on plain tensors (any device); the math runs in
float32 whatever the input's dtype, so a bf16/fp16 tensor gets exactly the qparams of its float32 copy.

A grid is named by its dtype: ``int4`` [-8, 7], ``uint4`` [0, 15], ``int8`` [-128, 127], ``uint8`` [0, 255]
(integers) or ``fp8_e4m3`` (the E4M3 floats in [-448, 448]). The range [lo, hi] is first widened to contain 0, so
0.0 is always exactly on the grid (padding, ReLU zeros, pruned weights):

| function            | formula                                                                  | output          |
|---------------------|--------------------------------------------------------------------------|-----------------|
| qparams (symmetric) | s = max(\|lo\|, \|hi\|) / ((qmax - qmin) / 2), z = 0                      | (s f32, z i32)  |
|                     | int8: amax / 127.5; int4: amax / 7.5; fp8_e4m3: amax / 448              |                 |
| qparams (asymmetric)| s = (hi - lo) / (qmax - qmin), z = clamp(qmin - round(lo / s), qmin, qmax) | (s f32, z i32) |
| round_to_grid       | integers: clamp(round(x / s) + z, qmin, qmax); fp8: cast(clamp(x / s))   | float32         |
| quantize            | round_to_grid, stored as int8 / uint8 / float8_e4m3fn                    | storage dtype   |
| dequantize          | x' = (q - z) * s                                                         | float32         |
| fake_quantize       | dequantize(quantize(x)) in float, bit-identical; ``ste``: gradient 1     | x.dtype         |
|                     | where x is inside the grid's range, 0 where it clips (straight through)  |                 |
| fake_quantize_dynamic | qparams from x itself: one range per tensor, or per token (row of the last axis) | x.dtype |

Every scale is clamped to at least ``EPS`` (float32 machine epsilon), so a zero range never divides by 0.
``torch.round`` rounds half to even, like ONNX QuantizeLinear, and ``quantize`` saturates to the dtype's range, like
QuantizeLinear, so a PyTorch QDQ model and its exported ONNX graph agree bit for bit.

**One int8 rule** (docs/conventions.md has the measurements): symmetric grids divide amax by half the integer span,
(qmax - qmin) / 2, and use the full range. That is compressed-tensors' rule, which transformers applies at run time
to dynamic per-token activations, so a saved W8A8 checkpoint computes what slimtorch computed; int4 (7.5) follows
the same formula (the GPTQ reference's). +amax lands on qmax + 1/2, rounds up and clips to qmax (an error of s/2, no
worse than any rounding); -amax is exactly qmin. TensorRT takes it as is: zero point 0, signed int8.

Layouts: :func:`quantize` and friends take 0-d (per-tensor) or 1-d (per-channel, ``axis`` names the channel axis)
qparams; :func:`round_to_grid` takes qparams that already broadcast against ``x`` (GPTQ's columns, groups).
:class:`WeightGrid` cuts a weight ``[out, in]`` into groups of ``group_size`` consecutive input columns (per group;
``None``: one group per output row, i.e. per channel) for :func:`quantize_rtn` and :func:`dequantize_groups`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import CalibrationError, ConfigError

#: smallest scale (float32 machine epsilon, as compressed-tensors uses): a zero range must never give s = 0
EPS = torch.finfo(torch.float32).eps
FP8_E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
#: grid dtype -> (qmin, qmax)
RANGES = {"int4": (-8, 7), "uint4": (0, 15), "int8": (-128, 127), "uint8": (0, 255),
          "fp8_e4m3": (-FP8_E4M3_MAX, FP8_E4M3_MAX)}
FLOAT_DTYPES = ("fp8_e4m3",)


def float8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``, or a ConfigError when this torch build has none."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise ConfigError(f"torch {torch.__version__} has no float8_e4m3fn dtype, which FP8 E4M3 quantization "
                          "stores its weights in; install torch >= 2.1, or set w8a8_quantization.format to 'int8'")
    return dtype


def grid_range(dtype: str) -> Tuple[float, float]:
    """``(qmin, qmax)`` of a grid dtype (a CalibrationError naming the valid ones otherwise)."""
    if dtype not in RANGES:
        raise CalibrationError(f"quantization dtype must be one of {sorted(RANGES)}, got {dtype!r}")
    return RANGES[dtype]


def storage_dtype(dtype: str) -> torch.dtype:
    """What the grid's values are stored in: float8_e4m3fn, int8, or uint8 where qmax does not fit int8."""
    qmin, qmax = grid_range(dtype)
    if dtype in FLOAT_DTYPES:
        return float8_dtype()
    return torch.int8 if qmax <= 127 else torch.uint8


def half_range(dtype: str) -> float:
    """``(qmax - qmin) / 2``, the divisor of the symmetric scale: 127.5 for int8, 7.5 for int4, 448 for FP8."""
    qmin, qmax = grid_range(dtype)
    return (qmax - qmin) / 2


def check_scheme(dtype: str, symmetric: bool) -> None:
    """A CalibrationError unless ``dtype`` is a grid and the pair makes sense (symmetric needs a signed grid,
    asymmetric an integer one)."""
    qmin, _ = grid_range(dtype)
    if symmetric and qmin >= 0:
        raise CalibrationError(f"symmetric quantization needs a signed dtype (zero point 0), got {dtype!r}; use "
                               f"symmetric=False for asymmetric {dtype}")
    if not symmetric and dtype in FLOAT_DTYPES:
        raise CalibrationError(f"{dtype} is symmetric only (no zero point); use symmetric=True")


def symmetric_scale(amax: Tensor, dtype: str = "int8", eps: float = EPS) -> Tensor:
    """float32 ``amax / half_range(dtype)``, at least ``eps``: the one symmetric rule (module docstring)."""
    return torch.clamp(torch.as_tensor(amax, dtype=torch.float32) / half_range(dtype), min=eps)


def qparams_from_range(lo: Tensor, hi: Tensor, *, dtype: str = "int8", symmetric: bool = True,
                       eps: float = EPS) -> Tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) for ranges ``lo <= hi`` of any (same) shape, element by element.

    No checks (the callers' inputs are finite by construction); :func:`choose_qparams` checks them first.
    """
    check_scheme(dtype, symmetric)
    qmin, qmax = grid_range(dtype)
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float32), max=0.0)  # the range contains 0
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float32, device=lo.device), min=0.0)
    if symmetric:
        scale = symmetric_scale(torch.maximum(-lo, hi), dtype, eps)  # s = amax / ((qmax - qmin) / 2)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=eps)  # s = (max - min) / (qmax - qmin)
    # z = qmin - round(min / s): the integer 0.0 maps to, so it dequantizes to exactly 0.0; the clamp only guards
    # float rounding at the range ends
    zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero.to(torch.int32)


def choose_qparams(min_val: Tensor, max_val: Tensor, *, dtype: str = "int8", symmetric: bool = True,
                   eps: float = EPS) -> Tuple[Tensor, Tensor]:
    """:func:`qparams_from_range` of an observed range, 0-d (per tensor) or 1-d (per channel), checked first:
    same shapes, finite, ``min_val <= max_val`` (CalibrationError otherwise, with the values)."""
    check_scheme(dtype, symmetric)
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
    return qparams_from_range(min_val, max_val, dtype=dtype, symmetric=symmetric, eps=eps)


def round_to_grid(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], dtype: str = "int8", *,
                  quant_min: Optional[float] = None, quant_max: Optional[float] = None) -> Tensor:
    """The grid values of ``x`` as float32 (qparams broadcast against ``x``): ``clamp(round(x / s) + z, qmin,
    qmax)`` for integers (exact in float32), the E4M3 value of ``clamp(x / s, -448, 448)`` for FP8 (E4M3 has no
    infinity: a value beyond 448 would cast to NaN). ``zero_point`` None: 0 (symmetric; no addition, so -0.0 stays
    -0.0). ``quant_min``/``quant_max`` narrow the clamp."""
    qmin, qmax = grid_range(dtype)
    qmin = qmin if quant_min is None else quant_min
    qmax = qmax if quant_max is None else quant_max
    y = x.to(torch.float32) / scale.to(torch.float32)  # division, as QuantizeLinear
    if dtype in FLOAT_DTYPES:
        return torch.clamp(y, qmin, qmax).to(float8_dtype()).to(torch.float32)
    if y.requires_grad:  # autograd records each step
        q = torch.round(y) if zero_point is None else torch.round(y) + zero_point.to(torch.float32)
        return torch.clamp(q, qmin, qmax)
    # the same steps in place on the fresh quotient: one tensor allocated instead of three (activations are large)
    y.round_()
    if zero_point is not None:
        y.add_(zero_point.to(torch.float32))
    return y.clamp_(qmin, qmax)


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


def _grid_values(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], dtype: str, axis: Optional[int],
                 quant_min: Optional[float], quant_max: Optional[float]
                 ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    s = _broadcast(scale, x, axis).to(torch.float32)
    z = None if zero_point is None else _broadcast(zero_point, x, axis).to(torch.float32)
    return round_to_grid(x, s, z, dtype, quant_min=quant_min, quant_max=quant_max), s, z


def quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None, *, dtype: str = "int8",
             axis: Optional[int] = None, quant_min: Optional[float] = None,
             quant_max: Optional[float] = None) -> Tensor:
    """:func:`round_to_grid` stored in :func:`storage_dtype`; ``axis`` for per-channel qparams; ``zero_point``
    None: 0 (symmetric)."""
    q, _, _ = _grid_values(x, scale, zero_point, dtype, axis, quant_min, quant_max)
    return q.to(storage_dtype(dtype))


def dequantize(q: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None, *,
               axis: Optional[int] = None) -> Tensor:
    """Float32 tensor ``(q - z) * s`` (``zero_point`` None: 0)."""
    s = _broadcast(scale, q, axis).to(torch.float32)
    if zero_point is None:
        return q.to(torch.float32) * s
    z = _broadcast(zero_point, q, axis).to(torch.float32)
    return (q.to(torch.float32) - z) * s  # x' = (q - z) * s


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized values (computed by the caller). Backward: the gradient passes where ``x`` was
    inside the grid's range and is 0 where it clipped (PyTorch's FakeQuantize convention)."""

    @staticmethod
    def forward(ctx, x, fake, inside):  # noqa: D102
        ctx.save_for_backward(inside)
        return fake

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None, *, dtype: str = "int8",
                  axis: Optional[int] = None, quant_min: Optional[float] = None, quant_max: Optional[float] = None,
                  ste: bool = False) -> Tensor:
    """``dequantize(quantize(x))`` without an integer tensor, in ``x.dtype`` (bit-identical in float32).

    ``ste``: a straight-through gradient for quantization-aware training (1 inside the range, 0 where ``x`` clips);
    without it the gradient is torch's own (0 almost everywhere: round has no slope).
    """
    q, s, z = _grid_values(x, scale, zero_point, dtype, axis, quant_min, quant_max)
    if q.requires_grad:
        out = q * s if z is None else (q - z) * s  # same ops, same order as dequantize: identical result
    else:  # in place on q (a fresh tensor): the same values without two more allocations
        out = q.mul_(s) if z is None else q.sub_(z).mul_(s)
    out = out if not x.is_floating_point() or x.dtype == torch.float32 else out.to(x.dtype)
    if not ste:
        return out
    qmin, qmax = grid_range(dtype)
    shift = 0.0 if z is None else z
    lo = (qmin if quant_min is None else quant_min) - shift
    hi = (qmax if quant_max is None else quant_max) - shift
    margin = 0.0 if dtype in FLOAT_DTYPES else 0.5  # integers: what rounds onto the range's ends is inside
    y = x.detach().to(torch.float32) / s
    inside = (y >= lo - margin) & (y <= hi + margin)
    return _StraightThrough.apply(x, out.detach(), inside)


def fake_quantize_dynamic(x: Tensor, dtype: str = "int8", symmetric: bool = True, granularity: str = "tensor", *,
                          ste: bool = False) -> Tensor:
    """Quantize-dequantize with qparams from ``x`` itself: one range for the tensor (``granularity="tensor"``), or
    one per token (``"token"``: each row of the last axis), in ``x.dtype``."""
    xd = x.detach()
    if granularity == "tensor":
        s, z = qparams_from_range(xd.amin(), xd.amax(), dtype=dtype, symmetric=symmetric)
        return fake_quantize(x, s, None if symmetric else z, dtype=dtype, ste=ste)
    if granularity != "token":
        raise CalibrationError(f"dynamic quantization granularity must be 'tensor' or 'token', got {granularity!r}")
    rows = x.reshape(-1, x.shape[-1])
    s, z = qparams_from_range(rows.detach().amin(1), rows.detach().amax(1), dtype=dtype, symmetric=symmetric)
    return fake_quantize(rows, s, None if symmetric else z, dtype=dtype, axis=0, ste=ste).reshape(x.shape)


# -- weights in groups of input columns (weight-only int4/int8, W8A8 weights) -----------------------------------
SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class WeightGrid:
    """``bits`` (4 or 8), ``symmetric`` and ``group_size`` (input columns per scale; None: per output channel).

    Symmetric grids are signed (``int4``/``int8``); asymmetric ones unsigned (``uint4``/``uint8``, the GPTQ
    reference's; compressed-tensors writes the same grid shifted by 2^(b-1), which dequantizes identically).
    """

    bits: int
    symmetric: bool
    group_size: Optional[int]

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"weight bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ConfigError(f"group_size must be a positive number of input columns, or None for one group per "
                              f"output channel (the config's -1), got {self.group_size!r}")

    @property
    def dtype(self) -> str:
        return f"{'' if self.symmetric else 'u'}int{self.bits}"

    @property
    def qmin(self) -> int:
        return int(RANGES[self.dtype][0])

    @property
    def qmax(self) -> int:
        return int(RANGES[self.dtype][1])

    @property
    def storage_dtype(self) -> torch.dtype:
        """int8, or uint8 where the range does not fit int8 (8-bit asymmetric: [0, 255])."""
        return storage_dtype(self.dtype)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _suggested_group_sizes(in_features: int, group_size: int, count: int = 5) -> List[int]:
    """The ``count`` divisors of ``in_features`` nearest ``group_size`` (by ratio), multiples of 16 where there are
    any (int4 packs 8 values per int32 and kernels like 16-aligned groups), ascending."""
    divisors = _divisors(in_features)
    aligned = [d for d in divisors if d % 16 == 0] or divisors
    nearest = sorted(aligned, key=lambda d: (abs(math.log(d / group_size)), d))[:count]
    return sorted(nearest)


def _or_list(values: List[int]) -> str:
    text = [str(v) for v in values]
    return text[0] if len(text) == 1 else f"{', '.join(text[:-1])} or {text[-1]}"


def check_group_size(in_features: int, grid: WeightGrid, where: str) -> None:
    """Raise :class:`ConfigError` unless ``grid.group_size`` divides ``in_features`` (per channel always fits).

    The message names ``where``, the width, the group size and the divisors of the width nearest it.
    """
    size = grid.group_size
    if size is None or in_features % size == 0:
        return
    suggestions = _or_list(_suggested_group_sizes(in_features, size))
    raise ConfigError(f"{where or 'a Linear'}: in_features {in_features} is not a multiple of group_size {size}; "
                      f"use {suggestions}, or -1 (per channel). A smaller last group is not an option: the checkpoint "
                      f"format and the int4 runtime kernels need equal groups")


def group_count(in_features: int, grid: WeightGrid, *, where: str = "") -> int:
    """Groups per output row: ``in_features // group_size``, or 1 per channel (raises as :func:`check_group_size`)."""
    check_group_size(in_features, grid, where)
    return 1 if grid.group_size is None else in_features // grid.group_size


def row_qparams(w_block: Tensor, grid: WeightGrid) -> Tuple[Tensor, Tensor]:
    """``(scale float32 [out], zero int32 [out])`` of one group of columns ``w_block [out, k]`` (float32 math)."""
    w = w_block.detach().to(torch.float32)
    return qparams_from_range(w.amin(dim=1), w.amax(dim=1), dtype=grid.dtype, symmetric=grid.symmetric)


def check_finite_weight(weight: Tensor, where: str) -> None:
    """A CalibrationError naming ``where`` when ``weight`` holds NaN/inf."""
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise CalibrationError(f"{where or 'the weight'} (shape {tuple(weight.shape)}, {weight.dtype}) has {bad} "
                               f"NaN/inf values; a weight must be finite to be quantized")


def quantize_rtn(weight: Tensor, grid: WeightGrid, *, where: str = "") -> Tuple[Tensor, Tensor, Tensor]:
    """Round to nearest: ``(q [out, in], scale float32 [out, groups], zero int32 [out, groups])``.

    ``q`` is ``grid.storage_dtype`` (int8; uint8 for 8-bit asymmetric). Raises :class:`ConfigError` when the group
    size does not divide ``in``, :class:`CalibrationError` on NaN/inf, both naming ``where``.
    """
    if weight.dim() != 2:
        raise CalibrationError(f"{where or 'the weight'}: expected a 2-d [out, in] weight, got {tuple(weight.shape)}")
    check_finite_weight(weight, where)
    out_features, in_features = weight.shape
    groups = group_count(in_features, grid, where=where)
    w = weight.detach().to(torch.float32).reshape(out_features, groups, in_features // groups)
    scale, zero = qparams_from_range(w.amin(dim=2), w.amax(dim=2), dtype=grid.dtype, symmetric=grid.symmetric)
    q = round_to_grid(w, scale.unsqueeze(2), zero.unsqueeze(2), grid.dtype)
    return q.reshape(out_features, in_features).to(grid.storage_dtype), scale, zero


def quantize_per_channel(weight: Tensor, dtype: str, *, where: str = "") -> Tuple[Tensor, Tensor]:
    """Round to nearest on the symmetric grid ``dtype`` (W8A8's "int8" or "fp8_e4m3"), one scale per output
    channel: ``(q [out, in] in storage_dtype(dtype), scale float32 [out, 1])``. For int8 this is
    :func:`quantize_rtn` with ``WeightGrid(8, True, None)``."""
    if weight.dim() != 2:
        raise CalibrationError(f"{where or 'the weight'}: expected a 2-d [out, in] weight, got {tuple(weight.shape)}")
    check_finite_weight(weight, where)
    w = weight.detach().to(torch.float32)
    scale, _ = qparams_from_range(w.amin(dim=1), w.amax(dim=1), dtype=dtype)
    return quantize(w, scale, dtype=dtype, axis=0), scale.reshape(-1, 1)


def dequantize_groups(q: Tensor, scale: Tensor, zero: Tensor, group_size: Optional[int],
                      g_idx: Optional[Tensor] = None) -> Tensor:
    """``w' = (q - z) * s`` as float32 ``[out, in]`` with ``scale``, ``zero`` ``[out, groups]``.

    Column ``j`` uses group ``j // group_size`` (``group_size=None``: the single group of its row), or ``g_idx[j]``
    when given (act-order GPTQ, whose groups are not runs of consecutive columns).
    """
    if q.dim() != 2 or scale.dim() != 2 or zero.shape != scale.shape or scale.shape[0] != q.shape[0]:
        raise CalibrationError(f"dequantize needs q [out, in] and scale, zero [out, groups]; got q "
                               f"{tuple(q.shape)}, scale {tuple(scale.shape)}, zero {tuple(zero.shape)}")
    out_features, in_features = q.shape
    groups = scale.shape[1]
    qf, zf, sf = q.to(torch.float32), zero.to(torch.float32), scale.to(torch.float32)
    if g_idx is not None:
        if g_idx.shape != (in_features,) or (in_features and not (0 <= int(g_idx.min()) and int(g_idx.max()) < groups)):
            raise CalibrationError(f"g_idx must give each of the {in_features} input columns a group in "
                                   f"[0, {groups}), got shape {tuple(g_idx.shape)}")
        index = g_idx.to(device=q.device, dtype=torch.long)
        return (qf - zf[:, index]) * sf[:, index]
    expected = 1 if group_size is None else in_features // group_size
    if (group_size is not None and in_features % group_size) or groups != expected:
        raise CalibrationError(f"q [out, {in_features}] with group_size {group_size} needs {expected} groups of "
                               f"scales, got scale {tuple(scale.shape)}")
    qg = qf.reshape(out_features, groups, in_features // groups)
    return ((qg - zf.unsqueeze(2)) * sf.unsqueeze(2)).reshape(out_features, in_features)
