"""Pruning under torch.distributed: every rank must hold the same plan and compute the same masks.

With DDP (and DeepSpeed ZeRO 1/2) the gradients are all-reduced before the optimizer steps, so the scores and the
masks computed from them are the same on every rank by construction. What can still go wrong is caught here, on
every rank at once, so that no rank waits forever in a collective the others never reach:

* at ``prepare_pruning``: the checks run on every rank and the ranks agree on their outcome before anything else
  is collective (a config or model that fails on one rank raises on every rank: :func:`agree`); then the configs
  (setting by setting) and the plans (a missing module, another shape) are gathered and compared;
* after every mask update: a fingerprint of the masks (kept weights per layer) is reduced with MIN and MAX; any
  difference means the replicas drifted (e.g. scores built from unsynchronised gradients) and is an error.

FSDP2's sharded parameters (:mod:`.fsdp`) and DeepSpeed ZeRO-3's partitions (:mod:`slimtorch.integrations.zero3`)
are scored on each rank's shard and masked from whole layers gathered one at a time; FSDP1 is refused at prepare
time.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import ranks
from ..errors import DistributedError, UnsupportedModelError
from .access import full_shape


def active_world() -> Optional[int]:
    """The world size when torch.distributed is initialized with more than one rank, else None."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world = torch.distributed.get_world_size()
    return world if world > 1 else None


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameters are pruned, under the wrappers that share them: a ``torch.compile``d model's
    original module and DistributedDataParallel's ``.module`` (so layer names, reports and checkpoints of the
    callbacks are the same as in a single-process run, and masks applied in place reach the wrapper too)."""
    while True:
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or _is_deepspeed_engine(model):
            model = model.module
        else:
            return model


def _is_deepspeed_engine(model: nn.Module) -> bool:
    # by class name, so slimtorch never imports deepspeed unless the user does
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__) and isinstance(
        getattr(model, "module", None), nn.Module)


def refuse_sharded(model: nn.Module, zero3: bool = False) -> None:
    """Refuse the sharded layouts slimtorch does not handle: FSDP1, DTensors other than FSDP2's, and DeepSpeed ZeRO-3
    parameters unless ``zero3`` (the engine's own access reads them: :mod:`slimtorch.integrations.zero3`).

    FSDP2 (``fully_shard``: DTensor parameters sharded on dim 0 of a 1-D mesh) is handled by :mod:`.fsdp`."""
    for name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise UnsupportedModelError(
                f"prepare_pruning: module {name or type(model).__name__!r} is wrapped by FSDP1 "
                "(FullyShardedDataParallel), whose flat parameters mix layers; slimtorch supports FSDP2: shard the "
                "model with torch.distributed.fsdp.fully_shard instead, or prune with DDP or ZeRO stage 0-2")
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") and not zero3:  # deepspeed.zero.Init / ZeRO stage 3 partitions every parameter
            raise UnsupportedModelError(
                f"prepare_pruning: parameter {name!r} is partitioned by DeepSpeed ZeRO stage 3, and only DeepSpeed's "
                "optimizer knows where its gradient and fp32 master live. Prune through the engine: "
                "slimtorch.deepspeed.initialize(model=..., config=...) (or the Trainer's PruningCallback), which "
                "reads them")
    from .fsdp import check_fsdp2_layout

    check_fsdp2_layout(model)


def failed_on(what: str) -> Callable[[int, str], str]:
    """The message of a DistributedError raised on the ranks that did not fail (:func:`slimtorch.ranks.guard`)."""
    return lambda rank, message: f"{what} failed on rank {rank}: {message}"


def agree(what: str):
    """``with agree("prepare_pruning"): <per-rank checks>``: an error on one rank is raised on every rank, the
    failing rank's own there and a DistributedError carrying its message on the others (no-op on one rank)."""
    return ranks.guard(failed_on(what))


def plan_signature(layers) -> List[Tuple[str, Tuple[int, ...], str]]:
    """What must agree across ranks: each pruned layer's name, weight shape and resolved settings."""
    return [(t.name, tuple(full_shape(t.module.weight)), repr(t.settings)) for t in layers]


def check_same_plan(layers, config: Any, what: str = "prepare_pruning") -> None:
    """Raise on every rank if any rank's config (named setting by setting) or plan differs from rank 0's."""
    if active_world() is None:
        return
    ranks.check_same_config(config.model_dump(mode="json"), f"{what}: the compression config")
    gathered = ranks.gather(plan_signature(layers))
    reference = gathered[0]
    for rank, theirs in enumerate(gathered):
        if theirs == reference:
            continue
        ours_names, their_names = [s[0] for s in reference], [s[0] for s in theirs]
        missing = [n for n in ours_names if n not in their_names]
        extra = [n for n in their_names if n not in ours_names]
        changed = [_layer_difference(a, b, rank) for a, b in zip(reference, theirs) if a[0] == b[0] and a != b]
        raise DistributedError(
            f"{what}: rank {rank} would prune other layers than rank 0 ({len(theirs)} layers against "
            f"{len(reference)}; missing on rank {rank}: {missing[:5]}, only on rank {rank}: {extra[:5]}, other shape "
            f"or settings: {changed[:5]}). Every rank must build the same model and load the same config before "
            "prepare_pruning, or the replicas would drift apart")


def _layer_difference(ours: Tuple[str, Tuple[int, ...], str], theirs: Tuple[str, Tuple[int, ...], str],
                      rank: int) -> str:
    name, shape, settings = ours
    if shape != theirs[1]:
        return f"{name}: shape {shape} on rank 0, {theirs[1]} on rank {rank}"
    return f"{name}: {settings} on rank 0, {theirs[2]} on rank {rank}"


def mask_fingerprint(mask: torch.Tensor) -> Tuple[float, float]:
    """(kept weights, sum of their flat positions): equal masks give equal pairs; different ones almost never do.
    Both are exact in float64 (positions below 2**26 in layers of up to 2**26 weights stay under 2**53)."""
    positions = mask.flatten().nonzero().flatten()
    return float(positions.numel()), float(positions.sum().item())


def check_same_masks(names: Sequence[str], fingerprints: Sequence[Tuple[float, float]], step: int) -> None:
    """Raise on every rank when the ranks' masks differ (fingerprints compared by a MIN and a MAX all-reduce)."""
    if active_world() is None or not fingerprints:
        return
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    counts = torch.tensor(list(fingerprints), dtype=torch.float64, device=device)
    low, high = counts.clone(), counts.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    differ = (low != high).any(dim=1).nonzero().flatten().tolist()
    if differ:
        layers = [names[i] for i in differ[:5]]
        raise DistributedError(
            f"mask update at step {step}: the ranks' masks differ on {len(differ)} layers ({layers}): their scores "
            "were not the same. Under torch.distributed the gradients must be all-reduced before optimizer.step() "
            "(wrap the model in DistributedDataParallel, or use DeepSpeed ZeRO 0-2) so every rank prunes alike")
