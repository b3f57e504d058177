"""The layer a weight-only quantized Linear becomes: integer weights on a group grid, float activations.

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

from .grid import WeightGrid, dequantize


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
        return dequantize(self.weight_int, self.weight_scale, self.weight_zero, self.group_size,
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
