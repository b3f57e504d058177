r"""AWQ (Lin et al. 2023, arXiv:2306.00978): activation-aware scales searched before weight-only rounding. Pure
functions: no model, no hooks (migration.py folds the scales into the block).

For a group of Linears that read one input ``x`` (q/k/v, gate/up, or down after up), every input channel ``j`` gets
a scale ``s_j``; ``y = x W^T = (x / s) (W * s)^T``, and the ``1 / s`` is folded into the op that makes ``x``. Only
the weights are rounded: ``W' = Q(W * s) / s``, so channels with ``s_j > 1`` (large activations) are rounded on a
finer grid relative to their weights. The search, as in the reference and llm-compressor:

* ``mean|x_j|`` over every calibration token; ``mean|w~_j|``, the weights' magnitudes normalized by their group's
  max (per output row and group of the grid), averaged over every output row of the group's Linears;
* for ``r = 0, 1/grid, ..., (grid-1)/grid``: ``s = mean|x|^r / (mean|w~|^(1-r) + 1e-4)`` (``duo_scaling``; else
  ``mean|x|^r``), clamped to >= 1e-4 and divided by ``sqrt(max(s) * min(s))`` so the scales centre on 1;
* the candidate with the least output error ``sum ||x W^T - x W'^T||^2`` over the sampled calibration tokens wins.

Our choices, documented because implementations differ: the error is that of the group's Linears' outputs (the
reference compares the output of the enclosing module, e.g. the attention block, which costs one module forward
per candidate); and ``s = 1`` (no scaling, plain rounding) is always a candidate, so AWQ never makes a group's
output error worse than round-to-nearest on the sampled tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..errors import CalibrationError
from ..quantization.grid import WeightGrid, dequantize_groups, group_count, quantize_rtn

SCALE_FLOOR = 1e-4


@dataclass
class AWQResult:
    """``scales`` (float32 [in]), the winning ``ratio`` (None: no scaling won), and the output error (sum of
    squares over the sampled tokens) with the scales and without (``rtn_error``)."""

    scales: Tensor
    ratio: Optional[float]
    error: float
    rtn_error: float


def weight_magnitude(weights: Sequence[Tensor], grid: WeightGrid) -> Tensor:
    """mean over output rows of ``|w| / max|w|`` within each (row, group) of ``grid``: float32 [in]."""
    W = torch.cat([w.detach().to(torch.float32) for w in weights], dim=0).abs()
    out_features, in_features = W.shape
    groups = group_count(in_features, grid)
    Wg = W.reshape(out_features, groups, in_features // groups)
    normalized = Wg / Wg.amax(dim=2, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return normalized.reshape(out_features, in_features).mean(dim=0)


def candidate_scales(act_mean: Tensor, weight_mean: Tensor, ratio: float, duo_scaling: bool) -> Tensor:
    """The scales of one grid point (see the module docstring), float32 [in], centred on 1."""
    a = act_mean.to(torch.float32)
    s = a.pow(ratio) / (weight_mean.to(a.device).pow(1.0 - ratio) + SCALE_FLOOR) if duo_scaling else a.pow(ratio)
    s = s.clamp(min=SCALE_FLOOR)
    return s / torch.sqrt(s.max() * s.min())


def _fake_quantized(weight: Tensor, grid: WeightGrid) -> Tensor:
    q, scale, zero = quantize_rtn(weight, grid)
    return dequantize_groups(q, scale, zero, grid.group_size)


def awq_search(rows: Tensor, act_mean: Tensor, weights: Sequence[Tensor], grid: WeightGrid, *, grid_points: int = 20,
               duo_scaling: bool = True, where: str = "") -> AWQResult:
    """The AWQ scales of a group of Linears (``weights``: each [out_k, in], float) that read the inputs whose
    sampled tokens are ``rows`` ([n, in]) and whose mean |x| per channel over all tokens is ``act_mean`` ([in])."""
    if rows.dim() != 2 or rows.shape[0] == 0:
        raise CalibrationError(f"{where or 'an AWQ group'}: no calibration token was sampled for the scale search "
                               f"(rows {tuple(rows.shape)})")
    x = rows.to(torch.float32)
    W = torch.cat([w.detach().to(device=x.device, dtype=torch.float32) for w in weights], dim=0)
    if W.shape[1] != x.shape[1] or act_mean.shape != (x.shape[1],):
        raise CalibrationError(f"{where or 'an AWQ group'}: weights {tuple(W.shape)}, sampled inputs "
                               f"{tuple(x.shape)} and mean |x| {tuple(act_mean.shape)} disagree on the input width")
    reference = x @ W.t()
    weight_mean = weight_magnitude([W], grid)

    def error(s: Tensor) -> float:
        return float(((x @ (_fake_quantized(W * s, grid) / s).t() - reference) ** 2).sum())

    ones = torch.ones(W.shape[1], dtype=torch.float32, device=x.device)
    best = AWQResult(ones, None, error(ones), 0.0)
    best.rtn_error = best.error
    for i in range(grid_points):
        ratio = i / grid_points
        s = candidate_scales(act_mean.to(x.device), weight_mean, ratio, duo_scaling)
        e = error(s)
        if e < best.error:
            best = AWQResult(s, ratio, e, best.rtn_error)
    return best
