"""The layers a quantized Linear becomes: :class:`WeightOnlyLinear` (int4/int8 weights, float activations) and
:class:`W8A8Linear` (8-bit weights and activations).

The layer a weight-only quantized Linear becomes: integer weights on a group grid, float activations.

``WeightOnlyLinear`` stores what a checkpoint needs and nothing more: ``weight_int`` ([out, in]: int8 holding int4
or int8 values, uint8 for 8-bit asymmetric), ``weight_scale`` (float32 [out, groups]), ``weight_zero`` (int32
[out, groups], zeros when symmetric) and ``weight_g_idx`` (int32 [in], each input column's group) where groups are
not runs of consecutive columns, else None. Its forward dequantizes the weight (``w = scale * (q - zero)``, per
group of input columns) into the input's dtype and runs ``F.linear``: plain PyTorch on any device, as exact as the
stored grid. Every tensor is a buffer, so ``state_dict()`` is the quantized layer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..quantization.grid import (
    WeightGrid,
    dequantize,
    dequantize_groups,
    fake_quantize,
    fake_quantize_dynamic,
    storage_dtype,
)

#: the 8-bit formats of W8A8Linear, as quantization/grid.py names their grids
W8A8_FORMATS = ("int8", "fp8_e4m3")


class WeightOnlyLinear(nn.Module):
    """A Linear whose weight is stored as ``bits``-bit integers with per-group scales (and zero points)."""

    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor, bias: Optional[Tensor], grid: WeightGrid,
                 g_idx: Optional[Tensor] = None, source_op: str = "Linear"):
        super().__init__()
        self.source_op = source_op  # "Linear" or "Conv1D" (GPT-2): what the layer was, for checkpoint writers
        self.out_features, self.in_features = q.shape
        self.bits, self.symmetric, self.group_size = grid.bits, grid.symmetric, grid.group_size
        self.register_buffer("weight_int", q.to(grid.storage_dtype))
        self.register_buffer("weight_scale", scale.to(torch.float32))
        self.register_buffer("weight_zero", zero.to(torch.int32))
        self.register_buffer("weight_g_idx", None if g_idx is None else g_idx.to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def grid(self) -> WeightGrid:
        return WeightGrid(self.bits, self.symmetric, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight the integers stand for, [out, in]."""
        return dequantize_groups(self.weight_int, self.weight_scale, self.weight_zero, self.group_size,
                                 g_idx=self.weight_g_idx).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # scales stay float32 under .half()/.to(bfloat16): the checkpoint format and the dequantization want them so
        scale = self._buffers["weight_scale"]
        super()._apply(fn, recurse)
        self._buffers["weight_scale"] = scale.to(device=self._buffers["weight_int"].device)
        return self

    def extra_repr(self) -> str:
        group = "per channel" if self.group_size is None else f"group {self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} "
                f"{'symmetric' if self.symmetric else 'asymmetric'}, {group}"
                f"{', act order' if self.weight_g_idx is not None else ''}")


class W8A8Linear(nn.Module):
    """A Linear with 8-bit weights (int8 or FP8 E4M3, one scale per output channel) and 8-bit activations (a scale
    per token at run time, or one calibrated ``input_scale``).

    Buffers, named as in compressed-tensors' int-quantized / float-quantized checkpoints: ``weight`` ([out, in] int8
    or float8_e4m3fn), ``weight_scale`` (float32 [out, 1]), ``input_scale`` (float32 [1], static activations only),
    ``bias``. The forward quantizes the input, dequantizes both and runs ``F.linear`` in the input's dtype: plain
    PyTorch on any device, numerically what an int8 / FP8 GEMM with float32 accumulation computes (no speed-up: the
    integer kernels belong to the runtime that loads the checkpoint).
    """

    def __init__(self, q: Tensor, scale: Tensor, bias: Optional[Tensor], fmt: str,
                 input_scale: Optional[Tensor] = None, source_op: str = "Linear"):
        super().__init__()
        if fmt not in W8A8_FORMATS:
            raise ConfigError(f"8-bit format must be one of {W8A8_FORMATS}, got {fmt!r}")
        self.source_op = source_op
        self.out_features, self.in_features = q.shape
        self.format = fmt
        self.register_buffer("weight", q.to(storage_dtype(fmt)))
        self.register_buffer("weight_scale", scale.to(torch.float32).reshape(-1, 1))
        self.register_buffer("input_scale", None if input_scale is None else
                             input_scale.to(torch.float32).reshape(1))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def dynamic(self) -> bool:
        """Activations quantized per token at run time (no ``input_scale``)."""
        return self.input_scale is None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.weight, self.weight_scale.reshape(-1), axis=0).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic:  # a scale per token, from the token itself (what the runtime computes)
            xq = fake_quantize_dynamic(x, self.format, True, "token")
        else:
            xq = fake_quantize(x, self.input_scale, dtype=self.format)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(xq.to(x.dtype), self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # .half()/.to(bfloat16) must not touch the 8-bit weight (an FP8 tensor is floating point) or the scales;
        # device moves apply to them too
        kept = {k: self._buffers[k] for k in ("weight", "weight_scale", "input_scale")}
        device = fn(torch.zeros(1, device=kept["weight"].device)).device
        super()._apply(fn, recurse)
        for k, v in kept.items():
            self._buffers[k] = None if v is None else v.to(device=device)
        return self

    def extra_repr(self) -> str:
        act = "activations per token (dynamic)" if self.dynamic else "activations per tensor (static)"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.format} weights per "
                f"channel, {act}")
