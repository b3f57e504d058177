"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): each rank holds rows of every parameter (a DTensor
sharded on dim 0 over a 1-D mesh), its gradient's shard after the reduce-scatter, and the optimizer state of that
shard. The sharded parameters are the ones the optimizer steps (with a mixed-precision policy too), so zeros written
into them are the zeros of every copy.

Element-wise work stays on the shard: the criteria fold each rank's gradient shard into that rank's share of the
scores, and masks are applied to the local rows. A mask needs whole N:M groups, blocks, rows and columns, which a
shard boundary can cut, so at a mask update the layer's weight and scores are gathered (one layer at a time, for
local scope), the mask is computed from them as one process would on every rank alike, and each rank keeps its rows.
Memory during a mask update: the shard, plus one layer's full weight, scores and mask.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .access import ParamAccess


def _is_dtensor(t: Optional[Tensor]) -> bool:
    return t is not None and type(t).__name__ == "DTensor"


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule) was wrapped by ``fully_shard``: its parameters are DTensors."""
    return any(_is_dtensor(p) for p in model.parameters())


def check_fsdp2_layout(model: nn.Module) -> None:
    """FSDP2's layout is one dim-0 shard per rank of a 1-D mesh; anything else (tensor parallel, HSDP) is refused."""
    from torch.distributed.tensor import Shard

    for name, p in model.named_parameters():
        if not _is_dtensor(p):
            continue
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise UnsupportedModelError(
                f"prepare_pruning: parameter {name!r} is a DTensor with placements {tuple(p.placements)} on a "
                f"{p.device_mesh.ndim}-D mesh; slimtorch supports FSDP2's layout (Shard(0) on a 1-D mesh), not tensor "
                "parallel or hybrid sharding yet")


class FSDP2Access(ParamAccess):
    """Shards of DTensor parameters: local gradients, local scores, full weights and scores gathered on demand."""

    shards_parameters = True

    def local(self, tensor: Tensor) -> Tensor:
        return tensor.to_local() if _is_dtensor(tensor) else tensor

    def full(self, weight: Tensor) -> Tensor:
        return weight.full_tensor() if _is_dtensor(weight) else weight

    def shard_of(self, param: Tensor, full: Tensor) -> Tensor:
        if not _is_dtensor(param):
            return full
        world = param.device_mesh.size()
        rank = param.device_mesh.get_local_rank()
        chunks = torch.chunk(full, world, dim=0)  # DTensor's Shard(0) split: torch.chunk's sizes
        if rank < len(chunks):
            return chunks[rank].contiguous()
        return full.new_empty((0,) + tuple(full.shape[1:]))

    def gather(self, param: Tensor, local: Tensor) -> Tensor:
        if not _is_dtensor(param):
            return local
        from torch.distributed.tensor import DTensor

        dtype = local.dtype
        if dtype == torch.bool:  # gathered as bytes: collectives of bool tensors are not supported everywhere
            local = local.to(torch.uint8)
        full = DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride()).full_tensor()
        return full.to(dtype)

    def grad(self, weight: Tensor) -> Optional[Tensor]:
        return None if weight.grad is None else self.local(weight.grad)

    def complete_scores(self, weight: Tensor, scores: Tensor) -> Tensor:
        return self.gather(weight, scores)

    def local_scores(self, weight: Tensor, scores: Tensor) -> Tensor:
        return self.shard_of(weight, scores)

    def masks_applied(self, masked: List[Tuple[Tensor, Tensor]]) -> None:
        """The sharded parameters are the optimizer's: nothing else to write."""
