r"""The integer grid of weight-only quantization: bits, symmetric or not, one scale per group of input columns.

Pure functions on plain tensors; they follow the input's device and compute in float32 whatever the weight's dtype
(a bf16/fp16 weight gives exactly the scales of its float32 copy).

A weight ``[out, in]`` is cut into groups of ``group_size`` consecutive input columns (``group_size=None``: one group
per output channel, i.e. per channel). Each (output row, group) gets a scale ``s`` and an integer zero point ``z``:

| grid       | integer range           | scale s                                   | zero point z                  |
|------------|-------------------------|-------------------------------------------|-------------------------------|
| symmetric  | [-2^(b-1), 2^(b-1) - 1] | max\|w\| / ((qmax - qmin) / 2)            | 0                             |
| asymmetric | [0, 2^b - 1]            | (max(w, 0) - min(w, 0)) / (qmax - qmin)   | qmin - round(min(w, 0) / s) * |

(* clamped to [qmin, qmax]; min(w, 0) / s lies in [-(qmax - qmin), 0], so the clamp only guards float rounding.)

``q = clamp(round(w / s) + z, qmin, qmax)`` and ``w' = (q - z) * s``. This is the convention of the GPTQ reference
implementation and of compressed-tensors: int4 symmetric divides by 7.5 (= 15 / 2), so +amax lands on 7.5, rounds
to 8 and is clipped to 7 (an error of s/2, no worse than any other rounding), and -amax is exactly -8. The range
always contains 0 and z is an integer, so a zero weight (a pruned one) dequantizes to exactly 0.0.
``torch.round`` rounds half to even. A group whose range is 0 (all zeros) gets the smallest scale ``SCALE_EPS``
instead of 0, so nothing is ever NaN.

The asymmetric range [0, 2^b - 1] is the GPTQ reference's; compressed-tensors writes the same grid shifted by
2^(b-1) ([-8, 7] with z - 8): the dequantized values are identical. int8 asymmetric (q up to 255) is returned as
uint8, every other grid as int8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import CalibrationError, ConfigError

#: smallest scale (float32 machine epsilon, as compressed-tensors and slimtorch.quantization use): a group of zeros
#: must never get s = 0 (division by zero, NaN)
SCALE_EPS = torch.finfo(torch.float32).eps
SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class WeightGrid:
    """``bits`` (4 or 8), ``symmetric`` and ``group_size`` (input columns per scale; None: per output channel)."""

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
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """int8, or uint8 where the range does not fit int8 (8-bit asymmetric: [0, 255])."""
        return torch.int8 if self.qmax <= 127 else torch.uint8


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


def _qparams_from_range(lo: Tensor, hi: Tensor, grid: WeightGrid) -> Tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) for float32 ranges ``lo <= hi`` of any (same) shape."""
    lo = torch.clamp(lo, max=0.0)  # the range contains 0, so 0.0 is on the grid
    hi = torch.clamp(hi, min=0.0)
    if grid.symmetric:
        scale = torch.maximum(-lo, hi) / ((grid.qmax - grid.qmin) / 2)  # s = amax / 7.5 for int4
        scale = torch.clamp(scale, min=SCALE_EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((hi - lo) / (grid.qmax - grid.qmin), min=SCALE_EPS)  # s = (max - min) / (qmax - qmin)
    # z = qmin - round(min / s): the integer 0.0 maps to; the clamp only guards float rounding at the range ends
    zero = torch.clamp(grid.qmin - torch.round(lo / scale), grid.qmin, grid.qmax)
    return scale, zero.to(torch.int32)


def qparams(w_block: Tensor, grid: WeightGrid) -> Tuple[Tensor, Tensor]:
    """``(scale float32 [out], zero int32 [out])`` of one group of columns ``w_block [out, k]`` (float32 math)."""
    w = w_block.detach().to(torch.float32)
    return _qparams_from_range(w.amin(dim=1), w.amax(dim=1), grid)


def quantize_to_grid(w: Tensor, scale: Tensor, zero: Tensor, grid: WeightGrid) -> Tensor:
    """``clamp(round(w / s) + z, qmin, qmax)`` as float32 integers (``scale``/``zero`` broadcast against ``w``)."""
    q = torch.round(w.to(torch.float32) / scale) + zero.to(torch.float32)
    return torch.clamp(q, grid.qmin, grid.qmax)


def _check_finite(weight: Tensor, where: str) -> None:
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
    _check_finite(weight, where)
    out_features, in_features = weight.shape
    groups = group_count(in_features, grid, where=where)
    w = weight.detach().to(torch.float32).reshape(out_features, groups, in_features // groups)
    scale, zero = _qparams_from_range(w.amin(dim=2), w.amax(dim=2), grid)
    q = quantize_to_grid(w, scale.unsqueeze(2), zero.unsqueeze(2), grid)
    return q.reshape(out_features, in_features).to(grid.storage_dtype), scale, zero


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, group_size: Optional[int],
               g_idx: Optional[Tensor] = None) -> Tensor:
    """``w' = (q - z) * s`` as float32 ``[out, in]``.

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
