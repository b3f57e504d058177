"""Where the pruner reads a weight's gradient and where masked weights must also be written.

In plain PyTorch (and DDP) the gradient is ``weight.grad`` and the parameter is the only copy of the weight. A
training engine may keep them elsewhere: DeepSpeed ZeRO 1/2 holds the reduced gradients in flat partitions and an
fp32 master copy of every weight that its optimizer steps and copies back. An engine integration passes its own
:class:`ParamAccess` so the same pruner works unchanged on top of it.
"""
from __future__ import annotations

from typing import List, Optional

from torch import Tensor


class ParamAccess:
    """Plain PyTorch: ``weight.grad``, and nothing to do after the pruner zeroed weights in place."""

    # A sharded engine (FSDP2) keeps only some rows of each parameter per rank: element-wise work (scores, applying
    # masks) runs on ``local`` tensors; a mask is computed from the ``full`` weight and scores and each rank keeps
    # its ``shard_of`` it. Unsharded parameters are their own local and full tensors.
    def local(self, tensor: Tensor) -> Tensor:
        """The part of a parameter (or its gradient) this rank holds and updates in place."""
        return tensor

    def full(self, weight: Tensor) -> Tensor:
        """The whole parameter (a collective where it is sharded)."""
        return weight

    def shard_of(self, param: Tensor, full: Tensor) -> Tensor:
        """This rank's part of a tensor shaped like the whole ``param`` (a mask)."""
        return full

    def gather(self, param: Tensor, local: Tensor) -> Tensor:
        """The whole tensor from each rank's part shaped like ``param``'s shard (a collective where sharded)."""
        return local

    def grad(self, weight: Tensor) -> Optional[Tensor]:
        """The gradient of the update about to be applied (already reduced across data-parallel ranks)."""
        return weight.grad

    def update_applied(self) -> Optional[bool]:
        """Whether the last optimizer step changed the weights (False: skipped on overflow); None: unknown."""
        return None

    def masks_applied(self, params: List[Tensor]) -> None:
        """Called after pruned entries of ``params`` (weights, biases of pruned rows) were zeroed in place: write
        them to any other copy of those parameters."""

    # An engine that partitions gradients (DeepSpeed ZeRO 1/2) may hand out only this rank's share of each gradient,
    # zeros elsewhere. Scores are element-wise, so each rank then keeps a *partial* score that is exact where it owns
    # the gradient and zero elsewhere, and the shares add up to the full score exactly (x + 0 == x). The pruner
    # completes them only when it needs them: at a mask update and for a state_dict.
    def complete_scores(self, weight: Tensor, scores: Tensor) -> Tensor:
        """The full scores of ``weight`` from this rank's share (a collective where shares are partial)."""
        return scores

    def local_scores(self, weight: Tensor, scores: Tensor) -> Tensor:
        """This rank's share of full ``scores`` (e.g. loaded from a checkpoint): the inverse of complete_scores."""
        return scores
