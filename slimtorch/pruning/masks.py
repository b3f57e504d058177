"""Pure mask math: importance scores -> keep-masks for block ("NxM", rows, columns) and N:M patterns.

Everything works on the *matrix view* of a weight, ``[out, reduction]``:

| layer            | stored weight          | matrix view                                   |
|------------------|------------------------|-----------------------------------------------|
| nn.Linear        | ``[out, in]``          | as is                                         |
| transformers Conv1D | ``[in, out]``       | transposed                                    |
| nn.Conv1d/2d     | ``[out, in/g, *k]``    | ``[out, *k, in/g]`` flattened to ``[out, k*in/g]`` |

so N:M groups and NxM blocks run along input channels at a fixed kernel position.

This module is slimtorch's one implementation of mask selection: training-time pruning (``pruner``,
``allocation``, ``learned``) and one-shot pruning of LLMs (``llm.sparsegpt``: SparseGPT, Wanda, magnitude) choose
their N:M groups, blocks, columns and per-row counts here. Two rules hold everywhere:

* **Rounding**: ``round(sparsity x units)`` units are pruned, ties up (:func:`pruned_count`); only DeepSpeed's own
  methods (``l1``, ``topk``) keep ``ceil(dense_ratio x units)`` (:func:`kept_ceil_count`), as DeepSpeed does.
* **Ties**: among equal scores the earlier position is pruned first (:func:`lowest_k`, also inside N:M groups), and
  NaN counts as +inf, so the same scores give the same mask on every run, rank and device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..config.patterns import BlockPattern, NMPattern, Pattern

LINEAR, TRANSPOSED, CONV = "linear", "transposed", "conv"


def to_matrix(weight: Tensor, layout: str) -> Tensor:
    """The ``[out, reduction]`` view of ``weight`` (a copy only for transposed/conv layouts)."""
    if layout == LINEAR:
        return weight
    if layout == TRANSPOSED:
        return weight.t()
    # conv: [out, in_g, *k] -> [out, *k, in_g] -> [out, k * in_g]
    return weight.movedim(1, -1).reshape(weight.shape[0], -1)


def from_matrix(matrix: Tensor, shape: torch.Size, layout: str) -> Tensor:
    """Inverse of :func:`to_matrix`: a ``[out, reduction]`` tensor back in the stored weight's shape."""
    if layout == LINEAR:
        return matrix.reshape(shape)
    if layout == TRANSPOSED:
        return matrix.t().reshape(shape)
    out, in_g, *kernel = shape
    return matrix.reshape(out, *kernel, in_g).movedim(-1, 1).contiguous()


def block_sides(pattern: BlockPattern, out_features: int, reduction: int) -> tuple[int, int]:
    """Block height and width in the matrix view (``channel`` spans the whole dimension)."""
    return (pattern.rows or out_features, pattern.cols or reduction)


def pruned_count(sparsity: float, total: int) -> int:
    """How many of ``total`` units to prune for ``sparsity``: the nearest whole number (ties round up)."""
    return min(total, max(0, int(math.floor(sparsity * total + 0.5))))


def kept_ceil_count(dense_ratio: float, total: int) -> int:
    """DeepSpeed's rounding: ``ceil(dense_ratio * total)`` units are kept (computed exactly as DeepSpeed does)."""
    return min(total, max(0, math.ceil(dense_ratio * total)))


def lowest_k(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` smallest entries along the last dimension; ties broken by position (lowest index first).

    A 1-D tensor is one ranking; ``[..., n]`` ranks every row on its own (``k`` in each). The same selection as
    ``argsort(values, dim=-1, stable=True)[..., :k]`` at a fraction of the cost (a k-th value search and a
    cumulative sum instead of a full sort). NaN counts as +inf (never among the lowest).
    """
    n = values.shape[-1] if values.dim() else 1
    if k <= 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    values = torch.nan_to_num(values, nan=float("inf"))
    threshold = torch.kthvalue(values, k, dim=-1, keepdim=True).values
    below = values < threshold
    ties = values == threshold
    room = k - below.sum(dim=-1, keepdim=True)
    return below | (ties & (torch.cumsum(ties, dim=-1) <= room))


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep-mask dropping the ``round(sparsity * columns)`` lowest scores of every row (unstructured, per row)."""
    return ~lowest_k(scores, pruned_count(sparsity, scores.shape[-1]))


def _groups_of(scores: Tensor, m: int) -> Tensor:
    """``[..., k * m] -> [..., k, m]``: the consecutive groups of ``m`` along the last dimension."""
    return scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)


def _nm_choice(groups: Tensor, pattern: NMPattern) -> tuple[Tensor, Tensor]:
    """(keep-mask of the ``N`` best of each group, the group's scores ascending) for ``groups [..., M]``.

    A stable ascending sort, so of equal scores the earlier is dropped first (as :func:`lowest_k` does); NaN counts
    as +inf. The sorted scores are the values ``topk`` would give, in the same order, so sums of them are unchanged.
    """
    ascending, order = torch.sort(torch.nan_to_num(groups, nan=math.inf), dim=-1, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., pattern.m - pattern.n:], True)
    return keep, ascending


def nm_keep(scores: Tensor, pattern: NMPattern) -> Tensor:
    """Keep-mask (same shape as ``scores``) keeping the ``N`` best scores of every group of ``M`` along the last
    dimension: every group made N:M. Ties: the earlier position is pruned first.

    ``scores`` may be any slice whose last dimension is a multiple of M (SparseGPT passes one group's columns at a
    time, as its updates reach them).
    """
    return _nm_choice(_groups_of(scores, pattern.m), pattern)[0].reshape(scores.shape)


def nm_dropped_mean(scores: Tensor, pattern: NMPattern) -> Tensor:
    """Mean score of the ``M - N`` weights each group of ``M`` would drop, one value per group (flattened)."""
    ascending = _nm_choice(_groups_of(scores.float(), pattern.m), pattern)[1]
    return ascending[..., :pattern.m - pattern.n].mean(dim=-1).flatten()


def block_mean(scores: Tensor, rows: int, cols: int) -> Tensor:
    """Mean score of each ``rows x cols`` block: ``[O, I] -> [O/rows, I/cols]``."""
    out, red = scores.shape
    return scores.reshape(out // rows, rows, red // cols, cols).mean(dim=(1, 3))


def block_mask(scores: Tensor, pattern: BlockPattern, sparsity: float,
               kept_ratio_ceil: Optional[float] = None) -> Tensor:
    """Keep-mask (bool, same shape as ``scores``) dropping the lowest-scoring blocks.

    The number of dropped blocks is ``round(sparsity * n_blocks)``, so the result is within half a block of
    ``sparsity``; with ``kept_ratio_ceil`` = d it is ``n_blocks - ceil(d * n_blocks)`` instead (DeepSpeed's rounding,
    from the dense ratio itself so that no float round trip moves a boundary). Blocks are ranked by their mean score.
    """
    rows, cols = block_sides(pattern, *scores.shape)
    per_block = block_mean(scores.float(), rows, cols)
    flat = per_block.flatten()
    n = flat.numel()
    pruned = pruned_count(sparsity, n) if kept_ratio_ceil is None else n - kept_ceil_count(kept_ratio_ceil, n)
    keep = ~lowest_k(flat, pruned)
    keep = keep.reshape(per_block.shape)
    return keep.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)


def nm_mask(scores: Tensor, pattern: NMPattern, sparsity: float, choose: str = "clearest") -> Tensor:
    """Keep-mask with at most N non-zeros in each group of M consecutive inputs (the N best-scoring weights).

    A fully N:M layer has sparsity ``(M - N) / M``; a lower ``sparsity`` (along a progressive schedule, or a final
    dense_ratio above N/M) makes only ``round(sparsity / ((M - N) / M) * n_groups)`` groups N:M. Those are the
    groups whose choice is clearest: the lowest ratio of the best dropped score to the worst kept one. Groups whose
    weights score alike wait, so their choice is made later, on scores that have seen more training (on the MiniLM
    benchmark this beat choosing the groups whose dropped weights score least in total by +0.008 to +0.015
    held-out cosine; see BENCHMARKS.md).
    """
    n, m = pattern.n, pattern.m
    groups = scores.float().reshape(-1, m)
    n_sparse = pruned_count(min(sparsity / ((m - n) / m), 1.0), groups.shape[0])
    if n_sparse == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    nm_kept, ascending = _nm_choice(groups, pattern)
    if choose == "cheapest":  # the groups whose dropped weights score least (the global ranking's units)
        cost = groups.sum(dim=1) - ascending[:, m - n:].flip(1).sum(dim=1)  # kept best first, as summed before
        chosen = lowest_k(cost, n_sparse)
    else:  # ambiguity of a group's N:M choice: best dropped score / worst kept score (0 = clear, 1 = a tie)
        ambiguity = ascending[:, m - n - 1] / ascending[:, m - n].clamp_min(torch.finfo(torch.float32).tiny)
        chosen = lowest_k(ambiguity, n_sparse)
    keep = torch.where(chosen.unsqueeze(1), nm_kept, torch.ones_like(nm_kept))
    return keep.reshape(scores.shape)


def compute_mask(scores: Tensor, pattern: Pattern, sparsity: float, nm_choose: str = "clearest",
                 kept_ratio_ceil: Optional[float] = None) -> Tensor:
    """Dispatch on the pattern's type; ``scores`` is a ``[out, reduction]`` matrix.

    ``kept_ratio_ceil`` switches block patterns to DeepSpeed's rounding (see :func:`block_mask`); N:M patterns
    count whole groups either way.
    """
    if isinstance(pattern, NMPattern):
        return nm_mask(scores, pattern, sparsity, nm_choose)
    return block_mask(scores, pattern, sparsity, kept_ratio_ceil)


def fit_problem(pattern: Pattern, out_features: int, reduction: int, in_per_group: int) -> Optional[str]:
    """Why a ``[out, reduction]`` matrix cannot hold ``pattern`` (``None`` when it can).

    ``in_per_group`` is the number of input channels at one kernel position (``reduction`` for linear layers);
    groups and blocks must not straddle two kernel positions.
    """
    if isinstance(pattern, NMPattern):
        if in_per_group % pattern.m:
            return f"{in_per_group} input channels (per group) are not a multiple of M={pattern.m} of '{pattern}'"
        return None
    if pattern.rows is not None and out_features % pattern.rows:
        return f"{out_features} output channels are not a multiple of the block height {pattern.rows} of '{pattern}'"
    if pattern.cols is not None and in_per_group % pattern.cols:
        return (f"{in_per_group} input channels (per group) are not a multiple of the block width {pattern.cols} "
                f"of '{pattern}'")
    return None


def pattern_holds(nonzero: Tensor, pattern: Pattern, dense_groups_allowed: bool = False) -> bool:
    """Whether a ``[out, reduction]`` boolean map of kept/non-zero weights obeys ``pattern``.

    N:M: every group of M holds at most N (or, with ``dense_groups_allowed``, is left whole: the state of a
    layer whose dense_ratio is above N/M). Blocks: every block is wholly zero or wholly kept.
    """
    if isinstance(pattern, NMPattern):
        counts = nonzero.reshape(-1, pattern.m).sum(dim=1)
        ok = counts <= pattern.n
        if dense_groups_allowed:
            ok |= counts == pattern.m
        return bool(ok.all())
    rows, cols = block_sides(pattern, *nonzero.shape)
    counts = nonzero.reshape(nonzero.shape[0] // rows, rows, -1, cols).sum(dim=(1, 3))
    return bool(((counts == 0) | (counts == rows * cols)).all())
