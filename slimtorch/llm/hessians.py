"""The Hessians GPTQ needs for every Linear of one block, one per distinct input.

Linears that read the same tensor (q/k/v read the normed hidden states, gate/up the normed attention output) have the
same Hessian ``2/n X^T X``: they share one :class:`~slimtorch.llm.gptq.HessianAccumulator`, found by tensor identity
on each calibration batch, so a Llama-style block accumulates 4 Hessians instead of 7 (the accumulation is the
dominant cost of GPTQ on long calibration sets: ``tokens x in^2`` multiply-adds each).

Memory: one [in, in] float32 matrix per distinct input; each is freed once every Linear sharing it has taken it.
"""
from __future__ import annotations

from typing import Dict, List, Set, Tuple

from torch import Tensor

from ..batches import first_tensor
from ..errors import CalibrationError
from .gptq import HessianAccumulator


class BlockHessians:
    """Accumulates, through :meth:`hook` (a forward pre-hook with kwargs per Linear), one Hessian per distinct input
    of a block's Linears; :meth:`take` hands each Linear its Hessian."""

    def __init__(self, where: str):
        self.where = where
        self._owner: Dict[str, str] = {}  # Linear -> the Linear whose accumulator it shares (itself if none)
        self._accumulators: Dict[str, HessianAccumulator] = {}
        # this batch's inputs with the Linear that took each: held, so no other tensor can reuse their ids
        self._batch: List[Tuple[Tensor, str]] = []
        self._called: Set[str] = set()

    def hook(self, name: str):
        def pre_hook(module, args, kwargs):
            x = first_tensor(args, kwargs)
            if x is not None:
                self.add(name, x)  # not detached here: detach() makes a new tensor, and sharing goes by identity
        return pre_hook

    def add(self, name: str, x: Tensor) -> None:
        if name in self._called:  # every Linear runs once per batch: a second call starts the next batch
            self._batch.clear()
            self._called.clear()
        self._called.add(name)
        owner = next((taker for seen, taker in self._batch if seen is x), name)
        first = self._owner.setdefault(name, owner)
        if first != owner:
            raise CalibrationError(f"{self.where}.{name} read the same input as {self.where}.{first} on the first "
                                   f"calibration batch but not on a later one; the block computes differently from "
                                   "batch to batch, which GPTQ's per-layer Hessians cannot follow")
        if owner == name:
            self._batch.append((x, name))
            if name not in self._accumulators:
                self._accumulators[name] = HessianAccumulator(where=f"{self.where}.{name}")
            self._accumulators[name].add(x.detach())

    def take(self, name: str) -> HessianAccumulator:
        """``name``'s Hessian; freed here once every Linear sharing it has taken it."""
        owner = self._owner.get(name)
        if owner is None:
            raise CalibrationError(f"{self.where}.{name} received no input while its block ran on the calibration "
                                   "data: it is not used by the block's forward, so GPTQ has no Hessian for it; "
                                   "exclude it with excluded_modules")
        accumulator = self._accumulators[owner]
        del self._owner[name]
        if owner not in self._owner.values():
            del self._accumulators[owner]
        self._batch.clear()
        return accumulator

    def shared(self) -> Dict[str, List[str]]:
        """Owner -> the Linears sharing its Hessian (owner first), for reports and tests."""
        groups: Dict[str, List[str]] = {}
        for name, owner in self._owner.items():
            groups.setdefault(owner, []).append(name)
        return groups
