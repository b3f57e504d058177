r"""8-bit weights and activations for decoder LLMs (``w8a8_quantization``): int8 or FP8 E4M3. Pure functions.

Both formats are symmetric (zero point 0, so a pruned zero stays 0) with ``scale = amax / half_range``:

| format   | stored as           | values                     | half_range | rounding                          |
|----------|---------------------|----------------------------|------------|-----------------------------------|
| int8     | torch.int8          | integers in [-128, 127]    | 127.5      | round half to even, then clamp    |
| fp8_e4m3 | torch.float8_e4m3fn | E4M3 floats in [-448, 448] | 448        | clamp to +-448, then cast         |

``half_range = (qmax - qmin) / 2`` is compressed-tensors' rule (and that of slimtorch's int4/int8 weight grid), so
a checkpoint computes in transformers exactly what the slimtorch model computes: int8's +amax lands on 127.5 and
is clipped to 127 (an error of s/2, no worse than any rounding). The clamp before the FP8 cast matters: E4M3 has
no infinity and a value beyond 448 would cast to NaN.

Weights: one scale per output channel (``[out, 1]``). Activations: per token at run time (``dynamic_per_token``: a
scale per row of the last dimension) or one calibrated scale per Linear input (``static_per_tensor``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from ..errors import CalibrationError, ConfigError
from .grid import SCALE_EPS

FORMATS = ("int8", "fp8_e4m3")
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def float8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``, or a ConfigError when this torch build has none."""
    dtype = getattr(torch, "float8_e4m3fn", None)
    if dtype is None:
        raise ConfigError(f"torch {torch.__version__} has no float8_e4m3fn dtype, which FP8 E4M3 quantization "
                          "stores its weights in; install torch >= 2.1, or set w8a8_quantization.format to 'int8'")
    return dtype


@dataclass(frozen=True)
class EightBit:
    """One 8-bit format: ``int8`` or ``fp8_e4m3`` (see the module docstring)."""

    name: str

    def __post_init__(self):
        if self.name not in FORMATS:
            raise ConfigError(f"8-bit format must be one of {FORMATS}, got {self.name!r}")

    @property
    def is_float(self) -> bool:
        return self.name == "fp8_e4m3"

    @property
    def qmin(self) -> float:
        return -FP8_MAX if self.is_float else -128.0

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.is_float else 127.0

    @property
    def half_range(self) -> float:
        return (self.qmax - self.qmin) / 2

    @property
    def storage_dtype(self) -> torch.dtype:
        return float8_dtype() if self.is_float else torch.int8

    def scale(self, amax: Tensor) -> Tensor:
        """float32 ``amax / half_range``, never below SCALE_EPS (an all-zero row or token gets no NaN)."""
        return torch.clamp(amax.to(torch.float32) / self.half_range, min=SCALE_EPS)

    def quantize(self, x: Tensor, scale: Tensor) -> Tensor:
        """``x / scale`` on the grid, in :attr:`storage_dtype` (``scale`` broadcasts against ``x``)."""
        y = torch.clamp(x.to(torch.float32) / scale, self.qmin, self.qmax)
        return y.to(self.storage_dtype) if self.is_float else torch.round(y).to(torch.int8)

    def fake_quantize(self, x: Tensor, scale: Tensor) -> Tensor:
        """``dequantize(quantize(x))`` in float32: what the 8-bit tensor stands for (the int8 values are kept in
        float32, which holds them exactly: one cast less per call on the forward's hot path)."""
        y = x.to(torch.float32) / scale
        if self.is_float:
            return y.clamp_(self.qmin, self.qmax).to(self.storage_dtype).to(torch.float32).mul_(scale)
        return y.round_().clamp_(self.qmin, self.qmax).mul_(scale)


def quantize_weight(weight: Tensor, fmt: EightBit, *, where: str = "") -> Tuple[Tensor, Tensor]:
    """Round to nearest, one scale per output channel: ``(q [out, in], fmt.storage_dtype; scale float32 [out, 1])``."""
    if weight.dim() != 2:
        raise CalibrationError(f"{where or 'the weight'}: expected a 2-d [out, in] weight, got {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise CalibrationError(f"{where or 'the weight'} (shape {tuple(w.shape)}) has "
                               f"{int((~torch.isfinite(w)).sum())} NaN/inf values; a weight must be finite to be "
                               "quantized")
    scale = fmt.scale(w.abs().amax(dim=1, keepdim=True))
    return fmt.quantize(w, scale), scale


def per_token_fake_quantize(x: Tensor, fmt: EightBit) -> Tensor:
    """``x`` with each token (row of the last dimension) on its own 8-bit grid, float32."""
    scale = fmt.scale(x.detach().abs().amax(dim=-1, keepdim=True))
    return fmt.fake_quantize(x, scale)


def per_tensor_fake_quantize(x: Tensor, scale: Tensor, fmt: EightBit) -> Tensor:
    """``x`` on the 8-bit grid of one calibrated ``scale``, float32 (values beyond the range clip)."""
    return fmt.fake_quantize(x, scale.to(device=x.device, dtype=torch.float32))
