"""Which models are being pruned: the plan and pruner of each model's active callbacks, and the plan of finalized ones.

``prepare_pruning`` registers a model and ``finalize()`` unregisters it; :func:`slimtorch.sparsity_report` reads
the registry, so it can show patterns, targets and exclusions without a reference to the callbacks. Models are
held weakly: a registered model can still be garbage collected.
"""
from __future__ import annotations

import weakref
from typing import Dict, NamedTuple, Optional

import torch
from torch import nn

from .distributed import unwrap
from .pruner import LayerState, Pruner
from .targets import TargetPlan


class _Active(NamedTuple):
    plan: TargetPlan
    pruner: Pruner


# model -> its active callbacks' plan and pruner, so the report shows live masks
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, _Active]" = weakref.WeakKeyDictionary()
# model -> plan of finalized callbacks: the report still knows each layer's pattern after finalize()
_FINALIZED: "weakref.WeakKeyDictionary[nn.Module, TargetPlan]" = weakref.WeakKeyDictionary()


def register(model: nn.Module, plan: TargetPlan, pruner: Pruner) -> None:
    """Record that callbacks with ``plan`` and ``pruner`` now prune ``model``."""
    _ACTIVE[unwrap(model)] = _Active(plan, pruner)


def unregister(model: nn.Module, plan: TargetPlan) -> None:
    """Record that ``model``'s callbacks were finalized; ``plan`` stays known to the report."""
    model = unwrap(model)
    _ACTIVE.pop(model, None)
    _FINALIZED[model] = plan


def is_active(model: nn.Module) -> bool:
    """Whether ``model`` has callbacks that have not been finalized."""
    return unwrap(model) in _ACTIVE


def plan_of(model: nn.Module) -> Optional[TargetPlan]:
    """The target plan of ``model``'s active or finalized callbacks, if any."""
    model = unwrap(model)
    active = _ACTIVE.get(model)
    return active.plan if active is not None else _FINALIZED.get(model)


def pruned_layers_of(model: nn.Module) -> Dict[str, LayerState]:
    """The layers of ``model``'s active callbacks that hold a mask, by name (their whole masks are
    ``layer.full_mask()``: a collective where the weights are sharded, so fetch them in the same order on every
    rank)."""
    active = _ACTIVE.get(unwrap(model))
    if active is None:
        return {}
    return {l.name: l for l in active.pruner.layers if l.mask is not None}


def masks_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Current keep-masks of ``model``'s active callbacks by layer name (empty when none)."""
    active = _ACTIVE.get(unwrap(model))
    if active is None:
        return {}
    # whole masks: a collective where the weights are sharded (FSDP2), so call it on every rank there
    return {l.name: l.full_mask() for l in active.pruner.layers if l.mask is not None}


def learned_masks_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Current top-k keep-masks of the topk layers whose forward masking has begun (the weights keep their values
    until ``finalize()``), by layer name."""
    active = _ACTIVE.get(unwrap(model))
    if active is None:
        return {}
    return {l.name: l.learned.weight_mask() for l in active.pruner.layers
            if l.learned is not None and l.learned.active}
