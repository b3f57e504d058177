"""The observer SmoothQuant calibrates with: per-input-channel ranges and a seeded sample of input rows."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...errors import CalibrationError


class ChannelStats:
    """Observer: per-input-channel min/max and mean |x| over all tokens, and a uniform seeded sample of up to
    ``max_rows`` rows."""

    def __init__(self, max_rows: int = 0, seed: int = 0):
        self.max_rows, self.min, self.max = max_rows, None, None
        self.abs_sum: Optional[Tensor] = None  # float64: a sum over many tokens
        self.tokens = 0
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
        abs_sum = rows.abs().sum(0, dtype=torch.float64)
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.tokens += rows.shape[0]
        if self.max_rows > 0:  # the rows with the smallest random keys: a uniform sample, the same every run
            keys = torch.rand(rows.shape[0], generator=self._gen).to(rows.device)
            if self.rows is not None:
                rows, keys = torch.cat([self.rows, rows]), torch.cat([self._keys, keys])
            keep = torch.argsort(keys)[:self.max_rows]
            self.rows, self._keys = rows[keep], keys[keep]

    @property
    def absmax(self) -> Tensor:
        return torch.maximum(-self.min, self.max)

    @property
    def absmean(self) -> Tensor:
        """mean |x_j| over every token seen, float32 [channels]."""
        return (self.abs_sum / max(self.tokens, 1)).to(torch.float32)
