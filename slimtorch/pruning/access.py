"""Where the pruner reads a weight's gradient and where masked weights must also be written.

In plain PyTorch (and DDP) the gradient is ``weight.grad`` and the parameter is the only copy of the weight. A
training engine may keep them elsewhere: DeepSpeed ZeRO 1/2 holds the reduced gradients in flat partitions and an
fp32 master copy of every weight that its optimizer steps and copies back; FSDP2 and ZeRO-3 also shard the
parameters themselves (rows of a DTensor; flat slices). An engine integration passes its own :class:`ParamAccess`
so the same pruner works unchanged on top of it: ``pruning/fsdp.py``, ``integrations/deepspeed_access.py``,
``integrations/zero3.py``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor


def full_shape(param: Tensor) -> torch.Size:
    """The shape of the whole parameter: a DeepSpeed ZeRO-3 parameter's own ``shape`` is empty between forwards
    (``ds_shape`` holds it); a DTensor's ``shape`` is already the global one."""
    return getattr(param, "ds_shape", None) or param.shape


def shape_only(param: Tensor) -> Tensor:
    """A meta tensor shaped like the whole ``param``: for planning, which needs shapes, never values."""
    return torch.empty(full_shape(param), device="meta")


def whole(param: Tensor) -> Tensor:
    """The whole parameter's values, detached: gathered where it is sharded (a collective under FSDP2 and ZeRO-3:
    every rank must call it)."""
    if type(param).__name__ == "DTensor":
        return param.full_tensor().detach()
    if hasattr(param, "ds_id"):
        import deepspeed  # only a ZeRO-3 parameter gets here, so DeepSpeed is installed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone()
    return param.detach()


class ParamAccess:
    """Plain PyTorch: ``weight.grad``, and nothing to do after the pruner zeroed weights in place."""

    #: whether the access reads DeepSpeed ZeRO-3's partitioned parameters (refused without one)
    handles_zero3 = False
    #: whether parameters are sharded, so topk's scores (new parameters) cannot be added to a layer
    shards_parameters = False

    # A sharded engine (FSDP2: rows; ZeRO-3: a flat slice) keeps only part of each parameter per rank: element-wise
    # work (scores, applying masks) runs on ``local`` tensors; a mask is computed from the ``full`` weight and scores
    # and each rank keeps its ``shard_of`` it. Unsharded parameters are their own local and full tensors.
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

    def masks_applied(self, masked: List[Tuple[Tensor, Tensor]]) -> None:
        """Called after the pruned entries of parameters (weights, biases of pruned rows, followers' scales) were
        zeroed in place, with each parameter and its keep-mask (shaped like its ``local`` part): zero the same
        entries in any other copy of those parameters (an engine's fp32 master), keeping the others' values."""

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
