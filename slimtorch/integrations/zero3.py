"""DeepSpeed ZeRO stage 3: every parameter is partitioned across the data-parallel ranks.

Between forwards a ZeRO-3 parameter holds nothing (``param.shape`` is empty; ``ds_shape`` is the whole shape); each
rank keeps ``ds_tensor``, a flat slice of ``ceil(numel / world)`` elements of the flattened parameter (rank r: elements
``r * L`` to ``r * L + L``, the last one padded), the fp32 master of that slice in the optimizer, and the reduced
gradient of that slice. Pruning follows the same split as under FSDP2 (:mod:`slimtorch.pruning.fsdp`):

* scores are folded on the local slice (``ds_tensor`` and the local gradient, both flat), no communication;
* at a mask update one layer's slices of weight and scores are all-gathered, the mask is computed from them as one
  process would, and each rank keeps its slice;
* masks multiply the local slice and its fp32 master (``safe_set_local_fp32_param``), so the engine's next gather,
  ``save_16bit_model`` and ``zero_to_fp32`` all see the zeros. Small parameters that ZeRO-3 keeps whole on every rank
  (``stage3_param_persistence_threshold``) are masked in their whole copy too.

Memory during a mask update: the shard, plus one layer's whole weight, scores and mask (and the padded gather
buffer: the same size).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .deepspeed_access import DeepSpeedAccess


def is_zero3(param: Tensor) -> bool:
    """Whether ``param`` is partitioned by DeepSpeed ZeRO-3 (``deepspeed.zero.Init`` or a stage-3 engine)."""
    return hasattr(param, "ds_id")


def _split(param: Tensor) -> Tuple[int, int, int]:
    """(world, rank, slice length) of a ZeRO-3 parameter's partition group."""
    group = getattr(param, "ds_process_group", None)
    return (torch.distributed.get_world_size(group), torch.distributed.get_rank(group), param.ds_tensor.numel())


class ZeRO3Access(DeepSpeedAccess):
    """ZeRO-3 partitions: local flat slices, their gradients and fp32 masters; whole tensors gathered on demand.

    ``optimizer`` (``engine.optimizer``) may be None before the engine exists: then only the parameters are read
    (l1's prepare-time ranking of a model built under ``deepspeed.zero.Init``)."""

    handles_zero3 = True
    shards_parameters = True

    def __init__(self, optimizer: Any = None):
        super().__init__(optimizer)
        # id(persistent parameter) -> (the local keep-mask last applied, its whole mask): masks change only at mask
        # updates, so the whole mask is gathered once per change, not at every update
        self._whole_keeps: Dict[int, Tuple[Tensor, Tensor]] = {}

    def local(self, tensor: Tensor) -> Tensor:
        return tensor.ds_tensor if is_zero3(tensor) else tensor

    def full(self, weight: Tensor) -> Tensor:
        return self.gather(weight, weight.ds_tensor) if is_zero3(weight) else weight

    def shard_of(self, param: Tensor, full: Tensor) -> Tensor:
        if not is_zero3(param):
            return full
        world, rank, length = _split(param)
        flat = full.reshape(-1)
        start = min(rank * length, flat.numel())
        part = flat[start:start + length]
        if part.numel() < length:  # the last rank's padding: never read back (gather drops it)
            part = torch.cat([part, part.new_zeros(length - part.numel())])
        return part.clone()

    def gather(self, param: Tensor, local: Tensor) -> Tensor:
        if not is_zero3(param):
            return local
        world, _, length = _split(param)
        dtype = local.dtype
        sent = local.reshape(-1).to(torch.uint8) if dtype == torch.bool else local.reshape(-1).contiguous()
        # the slices land in the rows of one buffer: the whole layer once (padded), no second copy to concatenate
        buffer = sent.new_empty((world, length))
        torch.distributed.all_gather(list(buffer.unbind(0)), sent, group=getattr(param, "ds_process_group", None))
        whole = buffer.view(-1)[:param.ds_numel].view(param.ds_shape)
        return whole.to(dtype)

    def _reduced_grad(self, weight: Tensor) -> Optional[Tensor]:
        if not is_zero3(weight):
            return super()._reduced_grad(weight)
        from deepspeed.utils import safe_get_local_grad

        return safe_get_local_grad(weight)  # this rank's slice of the reduced gradient (fp32, may be loss-scaled)

    def complete_scores(self, weight: Tensor, scores: Tensor) -> Tensor:
        return self.gather(weight, scores)

    def local_scores(self, weight: Tensor, scores: Tensor) -> Tensor:
        return self.shard_of(weight, scores)

    def masks_applied(self, masked: List[Tuple[Tensor, Tensor]]) -> None:
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        with torch.no_grad():
            for param, keep in masked:
                if not is_zero3(param):
                    continue
                master = safe_get_local_fp32_param(param) if param.requires_grad else None
                if master is not None:  # the kept entries keep their fp32 values
                    safe_set_local_fp32_param(param, master.detach() * keep.to(master.device, torch.float32))
                if param.data.numel() == param.ds_numel and param.ds_numel > 0:
                    # a persistent parameter (kept whole on every rank between forwards): its whole copy is what
                    # the next forward reads
                    param.data.mul_(self._whole_keep(param, keep).to(param.data.dtype))

    def _whole_keep(self, param: Tensor, keep: Tensor) -> Tensor:
        """The whole mask of a persistent parameter; gathered (a collective: the same parameters on every rank, in
        the same order) only when its local mask is a new one."""
        cached = self._whole_keeps.get(id(param))
        if cached is None or cached[0] is not keep:
            cached = (keep, self.gather(param, keep))
            self._whole_keeps[id(param)] = cached
        return cached[1]


def access_for(optimizer: Any) -> DeepSpeedAccess:
    """The access to DeepSpeed's optimizer (``engine.optimizer``): ZeRO-3's partitions, or ZeRO 0-2's copies."""
    if any(c.__name__ == "DeepSpeedZeroOptimizer_Stage3" for c in type(optimizer).__mro__):
        return ZeRO3Access(optimizer)
    return DeepSpeedAccess(optimizer)
