"""Global scope: how much of a group's target sparsity each of its layers gives, from one ranking across them.

A layer is a list of *units*, the smallest thing its pattern prunes: a block for "NxM" (``rows * cols`` weights,
ranked by mean score) or a group of M for "N:M" (making it N:M prunes ``M - N`` weights, ranked by the mean score
of the ``M - N`` it would drop). All units of a group are ranked together, counted in weights, so that the group
prunes ``target * weights`` (to the nearest unit) and each layer gives what its scores say it can spare:

1. each layer first gives its ``min_sparsity`` (its lowest-scoring units, rounded up to whole units);
2. the remaining units up to each layer's ``max_sparsity`` (rounded down) compete in one ranking; the lowest
   go until the group's target is met.

Bounds therefore hold exactly and the group's total is within one unit of its target. The result is a unit count
per layer; :func:`masks.compute_mask` then picks which units inside the layer, so the per-layer choice (lowest
blocks, or the clearest N:M groups) is the same code as for scope "local". Scores of different layers are compared
as they are: snip_momentum's ``|w * g|`` estimates the loss each weight carries, measured on the training data, so
sensitive layers keep more; magnitude compares raw ``|w|`` (global magnitude pruning).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import List, Sequence

import torch
from torch import Tensor

from ..config.patterns import NMPattern, Pattern
from . import masks

_EPS = 1e-9


@dataclass(frozen=True)
class Units:
    """A layer's prunable units: one score each, ``size`` weights each, out of ``weights`` in the layer."""

    scores: Tensor  # 1-D float32
    size: int
    weights: int

    @property
    def count(self) -> int:
        return self.scores.numel()

    def sparsity(self, pruned_units: int) -> float:
        return pruned_units * self.size / self.weights


def layer_units(matrix_scores: Tensor, pattern: Pattern) -> Units:
    """The units of one layer from its ``[out, reduction]`` element scores."""
    scores = matrix_scores.float()
    if isinstance(pattern, NMPattern):
        return Units(masks.nm_dropped_mean(scores, pattern), pattern.m - pattern.n, scores.numel())
    rows, cols = masks.block_sides(pattern, *scores.shape)
    return Units(masks.block_mean(scores, rows, cols).flatten(), rows * cols, scores.numel())


def unit_bounds(units: Units, low: float, high: float) -> tuple[int, int]:
    """(fewest, most) units a layer may prune so that its sparsity stays within ``[low, high]`` exactly."""
    per_unit = units.size / units.weights
    fewest = min(units.count, math.ceil(low / per_unit - _EPS))
    most = min(units.count, math.floor(high / per_unit + _EPS))
    return fewest, max(fewest, most)


def allocate(layers: Sequence[Units], target: float, low: Sequence[float], high: Sequence[float]) -> List[int]:
    """Units each layer prunes so the group reaches ``target`` (fraction of all its weights) within one unit.

    ``low`` / ``high`` bound each layer's sparsity. Deterministic: ties go to the earlier layer, then the earlier
    unit, as everywhere in :mod:`masks`.
    """
    # ranked on the CPU: layers on different devices rank together, and a GPU run allocates exactly as a CPU run
    layers = [replace(u, scores=u.scores.detach().cpu()) for u in layers]
    bounds = [unit_bounds(u, lo, hi) for u, lo, hi in zip(layers, low, high)]
    counts = [fewest for fewest, _ in bounds]
    need = target * sum(u.weights for u in layers) - sum(c * u.size for c, u in zip(counts, layers))
    candidates, owner = [], []
    for i, (u, (fewest, most)) in enumerate(zip(layers, bounds)):
        if most == fewest:
            continue
        # units ranked fewest..most-1 in the layer: the layer's lowest `most` minus its lowest `fewest`
        free = masks.lowest_k(u.scores, most)
        if fewest:
            free &= ~masks.lowest_k(u.scores, fewest)
        candidates.append(u.scores[free])  # boolean indexing keeps unit order: ties still go to the earlier unit
        owner.append(torch.full((most - fewest,), i, dtype=torch.long))
    if need <= 0 or not candidates:
        return counts
    scores, owner_t = torch.cat(candidates), torch.cat(owner)
    sizes = torch.tensor([u.size for u in layers], dtype=torch.float64)[owner_t]
    if bool((sizes == sizes[0]).all()):
        taken = masks.lowest_k(scores, min(scores.numel(), _nearest_whole(need / float(sizes[0]))))
    else:  # blocks of different sizes (e.g. "1xchannel" across layers of different widths): a sorted prefix
        order = torch.sort(torch.nan_to_num(scores, nan=math.inf), stable=True).indices
        total = torch.cumsum(sizes[order], 0)
        gap = torch.cat([torch.tensor([need], dtype=torch.float64), (total - need).abs()])
        length = int(torch.argmin(gap))  # first of the closest: fewer weights on a tie
        taken = torch.zeros_like(scores, dtype=torch.bool)
        taken[order[:length]] = True
    extra = torch.bincount(owner_t[taken], minlength=len(layers))
    return [c + int(e) for c, e in zip(counts, extra)]


def _nearest_whole(x: float) -> int:
    return max(0, int(math.floor(x + 0.5)))


def scaled_low(low: float, target: float, final_target: float) -> float:
    """A layer's lower bound at an intermediate step: the final ``low`` scaled by the schedule's progress.

    The upper bound holds at every step; the lower one grows with the group's target, so every step's bounds are
    feasible whenever the final ones are (the config checks ``low <= final_target <= high``).
    """
    if final_target <= 0:
        return 0.0
    return low * min(1.0, target / final_target)
