"""Choosing alpha: the ALPHA_GRID value with the least int8 fake-quant output error of a group's Linears."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..grid import choose_qparams, fake_quantize
from .scales import linear_weight, smoothing_scales, weight_absmax
from .stats import ChannelStats

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0, 0.05, ..., 1.0


def alpha_errors(stats: ChannelStats, mods: Sequence[nn.Module], act_dtype: str = "int8",
                 act_symmetric: bool = True) -> Tensor:
    """[len(ALPHA_GRID), len(mods), 2] float64: per alpha and Linear, the sums over ``stats.rows`` of the squared
    fake-quant output error and of the squared float output (zeros without rows): sums, so ranks can add theirs."""
    out = torch.zeros(len(ALPHA_GRID), len(mods), 2, dtype=torch.float64)
    x = stats.rows
    if x is None or x.numel() == 0:
        return out
    ws = [linear_weight(m).to(x.device) for m in mods]
    refs = [x @ w.t() for w in ws]
    wmax = weight_absmax(mods).to(x.device)
    for i, alpha in enumerate(ALPHA_GRID):
        s = smoothing_scales(stats.absmax, wmax, alpha)
        # min/max of X_j / s_j over every calibration token, exact because s > 0: what minmax calibration will see
        sc, zp = choose_qparams((stats.min / s).amin(), (stats.max / s).amax(), dtype=act_dtype,
                                symmetric=act_symmetric)
        xq = fake_quantize(x / s, sc, zp, dtype=act_dtype)
        for k, (w, ref) in enumerate(zip(ws, refs)):
            w_s = w * s  # W_ij * s_j
            wsc, wzp = choose_qparams(w_s.amin(1), w_s.amax(1), dtype="int8", symmetric=True)
            wq = fake_quantize(w_s, wsc, wzp, axis=0)
            out[i, k, 0], out[i, k, 1] = float(((xq @ wq.t() - ref) ** 2).sum()), float((ref ** 2).sum())
    return out


def search_alpha(stats: ChannelStats, mods: Sequence[nn.Module], act_dtype: str = "int8",
                 act_symmetric: bool = True, reduce: Optional[Callable[[Tensor], Tensor]] = None
                 ) -> Tuple[float, float]:
    """The ALPHA_GRID value with the least fake-quant output error of ``mods`` on ``stats.rows``; (alpha, error).

    Error: sum over the Linears of MSE / mean square of the float output, with the activations quantized per tensor
    on the full calibration range of X / s and the weights W * s symmetric int8 per output channel (as QDQLinear).
    ``reduce`` (distributed calibration: a SUM over the ranks) combines the error sums of every rank's rows first.
    """
    e = alpha_errors(stats, mods, act_dtype, act_symmetric)
    e = reduce(e) if reduce is not None else e
    best = (ALPHA_GRID[0], float("inf"))
    for alpha, err in zip(ALPHA_GRID, (e[..., 0] / e[..., 1].clamp(min=1e-30)).sum(1).tolist()):
        if err < best[1]:  # strict: ties keep the smaller alpha
            best = (alpha, err)
    return best
