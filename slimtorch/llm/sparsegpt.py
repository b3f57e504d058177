r"""One-shot pruning of a Linear from its calibration inputs: SparseGPT, Wanda and magnitude. Pure functions.

Every function takes ``weight [out, in]`` and returns the pruned weight (float32, same shape) with exact zeros, and
reads the sparsity as either

* ``NMPattern(n, m)``: keep ``n`` of every ``m`` consecutive input weights of each row ("2:4" keeps 2 of 4, as
  everywhere in slimtorch), or
* an unstructured ``sparsity`` in [0, 1): that fraction of each row's weights is zeroed (``round(sparsity * in)``
  per row, so every row ends with the same count; SparseGPT: ``round(sparsity * columns)`` per row in each block of
  ``block_size`` columns).

The masks come from :mod:`slimtorch.pruning.masks` (N:M groups, per-row counts, whole columns), so rounding and ties
are the training-time pruner's: counts round to the nearest whole number (ties up), and among equal scores the
earlier input is pruned first.

Scores (lowest pruned), all compared within a row (or within each group of ``m`` for N:M):

| method    | score of weight (i, j)              | weights changed afterwards                                   |
|-----------|-------------------------------------|--------------------------------------------------------------|
| magnitude | ``|W_ij|``                          | no                                                           |
| wanda     | ``|W_ij| * ||X_j||_2``             | no (Sun et al. 2023; ``||X_j||^2`` is ``n/2 * H_jj``)        |
| sparsegpt | ``W_ij^2 / [H^-1]_jj^2`` (OBS)      | yes: each pruned column's error is pushed onto the columns   |
|           |                                     | not yet visited, as GPTQ does (Frantar & Alistarh 2023)      |

SparseGPT chooses its unstructured mask block by block (``block_size`` columns at a time, from the weights as
updated so far: the paper's adaptive mask selection; the reference ranks a block over all its rows at once, we rank
within each row so that every row keeps the same fraction, as Wanda does); with N:M it chooses each group of ``m``
when its first column is reached. Dampening, dead inputs and the
Cholesky factor are GPTQ's (slimtorch.llm.gptq); the Hessian is not modified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from ..config.patterns import BlockPattern, NMPattern
from ..errors import CalibrationError, ConfigError
from ..pruning import masks
from .gptq import prepared_hessian, upper_inverse_factor


@dataclass(frozen=True)
class Columns:
    """Whole input columns: ``sparsity`` of them (``round(sparsity * in)``) zeroed in every row."""

    sparsity: float

    def __str__(self) -> str:
        return f"{self.sparsity:.0%} of input columns"


Sparsity = Union[NMPattern, float, Columns]
WHOLE_COLUMNS = BlockPattern(rows=None, cols=1)  # "channelx1"


def check_sparsity(target: Sparsity, in_features: int, where: str = "") -> None:
    """ConfigError unless ``target`` is an N:M pattern whose ``m`` divides ``in_features`` or a fraction in [0, 1)."""
    name = where or "a Linear"
    if isinstance(target, Columns):
        target = target.sparsity
    elif isinstance(target, NMPattern):
        if in_features % target.m:
            raise ConfigError(f"{name}: in_features {in_features} is not a multiple of {target.m}, so the N:M pattern "
                              f"'{target}' cannot cover its rows; exclude the layer or pick an m that divides it")
        return
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= float(target) < 1.0:
        raise ConfigError(f"{name}: sparsity must be an N:M pattern or a fraction in [0, 1), got {target!r}")


def _pruned(scores: Tensor, target: Union[NMPattern, float]) -> Tensor:
    """True where a weight is pruned: the lowest scores of each row's groups of m, or of each row."""
    keep = masks.nm_keep(scores, target) if isinstance(target, NMPattern) else masks.row_mask(scores, float(target))
    return ~keep


def magnitude_prune(weight: Tensor, target: Sparsity, *, where: str = "") -> Tensor:
    """Zero the smallest ``|W|`` of each row (or of each group of m)."""
    check_sparsity(target, weight.shape[1], where)
    w = weight.detach().to(torch.float32)
    return w.masked_fill(_pruned(w.abs(), target), 0.0)


def wanda_prune(weight: Tensor, hessian: Tensor, target: Sparsity, *, where: str = "") -> Tensor:
    """Zero the smallest ``|W_ij| * ||X_j||`` of each row (or group of m); ``||X_j||`` from ``diag(hessian)``."""
    check_sparsity(target, weight.shape[1], where)
    w = weight.detach().to(torch.float32)
    norms = hessian.detach().diagonal().to(device=w.device, dtype=torch.float32).clamp_min(0).sqrt()
    return w.masked_fill(_pruned(w.abs() * norms, target), 0.0)


def sparsegpt_prune(weight: Tensor, hessian: Tensor, target: Sparsity, *, dampening: float = 0.01,
                    block_size: int = 128, where: str = "") -> Tensor:
    """SparseGPT: prune by the OBS score and update the remaining weights to compensate (module docstring)."""
    in_features = weight.shape[1]
    check_sparsity(target, in_features, where)
    if isinstance(target, NMPattern) and block_size % target.m:
        raise ConfigError(f"{where or 'a Linear'}: block_size {block_size} must be a multiple of the pattern's m "
                          f"({target.m}) so that no group of m straddles two blocks")
    W = weight.detach().to(torch.float32, copy=True)
    H, dead = prepared_hessian(hessian, W.device, where)
    W[:, dead] = 0.0
    U = upper_inverse_factor(H, dampening, where)
    del H
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        errors = torch.zeros_like(W1)
        mask = torch.zeros_like(W1, dtype=torch.bool)
        if not isinstance(target, NMPattern):  # the block's mask at once, from its weights as updated so far
            mask = _pruned(W1 ** 2 / d ** 2, target)
        for i in range(i2 - i1):
            if isinstance(target, NMPattern) and i % target.m == 0:
                group = slice(i, i + target.m)
                mask[:, group] = _pruned(W1[:, group] ** 2 / d[group] ** 2, target)
            w = W1[:, i]
            q = w.masked_fill(mask[:, i], 0.0)
            e = (w - q) / U1[i, i]
            W1[:, i:] -= torch.outer(e, U1[i, i:])
            W1[:, i] = q  # exactly q (the update leaves w - e * U_ii = q up to rounding): pruned weights exactly 0
            errors[:, i] = e
        W[:, i1:i2] = W1
        if i2 < in_features:
            W[:, i2:] -= errors @ U[i1:i2, i2:]
    if not bool(torch.isfinite(W).all()):
        raise CalibrationError(f"{where or 'a Linear'}: SparseGPT produced NaN or inf weights; raise dampening")
    return W


def column_scores(weight: Tensor, hessian: Tensor, method: str) -> Tensor:
    """One score per input column (lowest pruned): magnitude ``||W_:j||``, wanda ``||W_:j|| * ||X_j||``."""
    w = weight.detach().to(torch.float32)
    norms = w.norm(dim=0)
    if method == "magnitude":
        return norms
    return norms * hessian.detach().diagonal().to(device=w.device, dtype=torch.float32).clamp_min(0).sqrt()


def prune_columns(weight: Tensor, hessian: Tensor, target: Columns, method: str, *, dampening: float = 0.01,
                  where: str = "") -> Tensor:
    """Zero ``round(target.sparsity * in)`` whole input columns (the same ones in every row).

    magnitude / wanda: the lowest :func:`column_scores`, other weights unchanged. sparsegpt: structured OBS
    (Kurtic et al. 2023, ZipLM; Frantar & Alistarh's OBC for one column), greedy: the column whose removal raises the
    layer's output error least, ``||W_:j||^2 / [H^-1]_jj``, goes; the remaining columns absorb it,
    ``W -= W_:j [H^-1]_j: / [H^-1]_jj``; ``H^-1`` is downdated to forget column j; repeat. float64 for ``H^-1``.
    """
    in_features = weight.shape[1]
    check_sparsity(target, in_features, where)
    k = masks.pruned_count(target.sparsity, in_features)
    W = weight.detach().to(torch.float32, copy=True)
    if k == 0:
        return W
    if method != "sparsegpt":  # whole columns: "channelx1" blocks of a one-row score matrix
        keep = masks.block_mask(column_scores(W, hessian, method).unsqueeze(0), WHOLE_COLUMNS, target.sparsity)
        W[:, ~keep[0]] = 0.0
        return W
    H, dead = prepared_hessian(hessian, W.device, where)
    H = H.to(torch.float64)
    H.diagonal().add_(dampening * float(H.diagonal().mean()))
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    del H
    W64 = W.to(torch.float64)
    gone = torch.zeros(in_features, dtype=torch.bool, device=W.device)
    for j in dead.nonzero().flatten().tolist()[:k]:  # inputs that never fire go first, at no cost
        gone[j] = True
    W64[:, gone] = 0.0
    for _ in range(k - int(gone.sum())):
        d = Hinv.diagonal()
        scores = (W64 ** 2).sum(dim=0) / d.clamp_min(1e-30)
        scores[gone] = float("inf")
        j = int(torch.argmin(scores))
        W64 -= torch.outer(W64[:, j], Hinv[j]) / Hinv[j, j]
        Hinv -= torch.outer(Hinv[:, j], Hinv[j]) / Hinv[j, j]
        gone[j] = True
        W64[:, gone] = 0.0  # exact zeros (the update leaves them at rounding level)
    W = W64.to(torch.float32)
    if not bool(torch.isfinite(W).all()):
        raise CalibrationError(f"{where or 'a Linear'}: structured SparseGPT produced NaN or inf weights; raise "
                               "dampening")
    return W
