"""``prepare_pruning`` and :class:`PruningCallbacks`: the training-loop side of pruning.

A *step* is one applied optimizer update; ``cb.step`` counts them. Per update the work is:

1. ``on_before_optimizer_step``: fold the update's gradients into the criteria (snip_momentum's score);
2. the optimizer steps;
3. ``on_after_optimizer_step``: zero the pruned weights again (momentum and weight decay would revive them),
   count the update, and when the new count t is a pruning step, recompute the masks for step t from the scores
   so far and zero the newly pruned weights. The next forward therefore runs the pruned network, its gradient
   already sees it, and "after t updates the sparsity is the schedule's value at t" holds exactly.

Pruning at step 0 (before any update) happens in the first ``on_before_optimizer_step``, with the first gradient.
Hands-free mode (``optimizer=`` given) runs 1 and 3 from the optimizer's own step pre/post hooks, so a plain loop
needs no calls, and an update skipped by a GradScaler overflow (no ``optimizer.step()``) does not count.

The per-update work itself is :class:`~.lifecycle.PruningLifecycle`; :mod:`.drivers` holds the ways to drive it.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import CompressionConfig, load_config
from ..config.loader import ConfigSource
from ..errors import ConfigError, LifecycleError, UnsupportedModelError
from . import drivers, registry
from .access import ParamAccess
from .distributed import agree, check_same_plan, refuse_sharded, unwrap
from .fsdp import FSDP2Access, is_fsdp2
from .lifecycle import PruningLifecycle
from .pruner import Pruner
from .report import SparsityReport, sparsity_report
from .structured_targets import describe_training, plan_training
from .targets import TargetPlan

logger = logging.getLogger("slimtorch")


def prepare_pruning(model: nn.Module, config: ConfigSource,
                    optimizer: Optional[torch.optim.Optimizer] = None) -> "PruningCallbacks":
    """Plan which layers of ``model`` the config prunes and return the callbacks that prune them.

    ``config`` is anything :func:`slimtorch.load_config` takes. With ``optimizer`` the callbacks attach to its
    ``step()`` and need no calls from the training loop; without it, call the hooks yourself.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prepare_pruning: model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"prepare_pruning: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return prepare_for_engine(model, config, optimizer=optimizer)


def prepare_for_engine(model: nn.Module, config: ConfigSource, *, optimizer: Optional[torch.optim.Optimizer] = None,
                       access: Optional[ParamAccess] = None, accumulate: Optional[int] = None,
                       driver: Tuple[str, str] = ("optimizer.step()", "prepare without optimizer="),
                       hands_free: bool = False, ranked: Optional[Dict[str, torch.Tensor]] = None
                       ) -> "PruningCallbacks":
    """:func:`prepare_pruning` for engine integrations: ``access`` says where gradients and weight copies live,
    ``accumulate`` overrides the config's gradient_accumulation_steps (the engine knows its own), and ``driver``
    names what drives the callbacks in hands-free mode and how to drive them yourself instead (for errors);
    ``hands_free`` marks callbacks that the engine drives (:func:`.drivers.wrap_step` on ``callbacks.lifecycle``),
    so the explicit hooks refuse to be called as well; ``ranked`` holds prepare-time rankings made before the
    engine cast the weights (``pruner.rank_at_prepare``)."""
    model = unwrap(model)  # a torch.compile'd model shares its parameters with the original module
    with agree("prepare_pruning"):  # under torch.distributed a check failing on one rank raises on every rank
        cfg, plan, access = _checked_plan(model, config, access)
    check_same_plan(plan.layers, cfg)  # under torch.distributed: every rank must prune the same layers alike
    for line in cfg.notes + tuple(describe_training(plan, cfg) if plan.layers else ()):
        logger.info("slimtorch prepare_pruning: %s", line)
    callbacks = PruningCallbacks(model, cfg, plan, optimizer, access=access, accumulate=accumulate, driver=driver,
                                 hands_free=hands_free, ranked=ranked)
    registry.register(model, callbacks.plan, callbacks.pruner)
    return callbacks


def _checked_plan(model: nn.Module, config: ConfigSource,
                  access: Optional[ParamAccess]) -> Tuple[CompressionConfig, TargetPlan, Optional[ParamAccess]]:
    """The per-rank checks of :func:`prepare_for_engine` (no collective): the config, the model's layout, the plan."""
    refuse_sharded(model, zero3=access is not None and access.handles_zero3)
    if access is None and is_fsdp2(model):
        access = FSDP2Access()
    cfg = load_config(config)
    if not cfg.has_training_pruning:
        raise ConfigError("compression_training: the config has no sparse_pruning, row_pruning, head_pruning or "
                          "channel_pruning section to prepare")
    if registry.is_active(model):
        raise LifecycleError("prepare_pruning: this model already has active pruning callbacks; call finalize() on "
                             "them before preparing again")
    if not cfg.prunes_in_training:
        warnings.warn("slimtorch: no compression_training pruning section is enabled (shared_parameters.enabled "
                      "is false); the model will not be pruned", stacklevel=3)
        return cfg, TargetPlan([], []), access
    plan = plan_training(model, cfg)
    learned = [t.name for t in plan.layers if t.settings.learned]
    if learned and access is not None and access.shards_parameters:
        raise UnsupportedModelError(
            f"prepare_pruning: {learned[0]!r} uses topk, whose scores would be new parameters of a layer "
            "whose parameters are already sharded (FSDP2, ZeRO-3); there use l1 or a sparse_pruning method "
            "(topk runs under DDP and DeepSpeed ZeRO 0-2)")
    return cfg, plan, access


def _train_learned_scores(optimizer: torch.optim.Optimizer, pruner: Pruner) -> None:
    """topk's scores must be trained: give the optimizer those it does not hold yet, as one new parameter group
    with the optimizer's defaults (DeepSpeed's scores sit among the model's parameters, under the same optimizer)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    new = [l.learned.scores for l in pruner.layers if l.learned is not None and id(l.learned.scores) not in held]
    if new:
        optimizer.add_param_group({"params": new})


class PruningCallbacks:
    """Training-loop hooks that prune progressively; see the module docstring for what each one does."""

    def __init__(self, model: nn.Module, config: CompressionConfig, plan: TargetPlan,
                 optimizer: Optional[torch.optim.Optimizer] = None, *, access: Optional[ParamAccess] = None,
                 accumulate: Optional[int] = None,
                 driver: Tuple[str, str] = ("optimizer.step()", "prepare without optimizer="),
                 hands_free: bool = False, ranked: Optional[Dict[str, torch.Tensor]] = None):
        self.config = config
        self.plan = plan
        self._lifecycle = PruningLifecycle(
            Pruner(plan.layers, access, ranked),
            accumulate or config.gradient_accumulation_steps)
        # what drives the hooks in hands-free mode, and how to drive them yourself instead (named in errors)
        self._driver = driver
        self._model_ref = weakref.ref(model)
        self._hands_free = hands_free or optimizer is not None  # optimizer hooks, or an engine drives the steps
        if optimizer is not None:
            _train_learned_scores(optimizer, self.pruner)
        self._handles = [] if optimizer is None else drivers.attach_to_optimizer(optimizer, self._lifecycle)

    # ------------------------------------------------------------ state
    @property
    def lifecycle(self) -> PruningLifecycle:
        """The state machine these callbacks drive (an engine integration wraps its step with it:
        :func:`.drivers.wrap_step`)."""
        return self._lifecycle

    @property
    def pruner(self) -> Pruner:
        return self._lifecycle.pruner

    @property
    def step(self) -> int:
        """Applied updates so far."""
        return self._lifecycle.step

    @step.setter
    def step(self, value: int) -> None:
        self._lifecycle.step = value

    @property
    def history(self) -> List[Dict[str, Any]]:
        """Recent mask recomputations (step, layer, target, sparsity), the last 64 of each layer."""
        return self._lifecycle.history

    @history.setter
    def history(self, value: List[Dict[str, Any]]) -> None:
        self._lifecycle.history = value

    @property
    def hands_free(self) -> bool:
        return self._hands_free

    @property
    def finalized(self) -> bool:
        """True after :meth:`finalize`: the masks and scores are gone, the hooks detached."""
        return self._lifecycle.finished

    @property
    def layers(self) -> List[str]:
        """Names of the layers being pruned."""
        return [t.name for t in self.plan.layers]

    # ------------------------------------------------------------ lifecycle hooks
    def on_train_begin(self) -> None:
        self._lifecycle.check_alive("on_train_begin")
        self.pruner.apply_masks()  # after a resume the restored masks hold from the first forward on

    def on_epoch_begin(self, epoch: Optional[int] = None) -> None:
        self._lifecycle.check_alive("on_epoch_begin")

    def on_step_begin(self, step: Optional[int] = None) -> None:
        """Marks the start of a (micro-)batch; ``step`` is informational: slimtorch counts updates itself."""
        self._lifecycle.check_alive("on_step_begin")

    def on_before_optimizer_step(self) -> None:
        self._check_explicit("on_before_optimizer_step")
        drivers.explicit_before_step(self._lifecycle)

    def on_after_optimizer_step(self, applied: Optional[bool] = None) -> None:
        """Call after ``optimizer.step()``; pass ``applied=False`` when the update was skipped (AMP overflow).

        Left out, ``applied`` is True, or what the training engine reports (DeepSpeed's ``was_step_applied()``).
        """
        self._check_explicit("on_after_optimizer_step")
        drivers.explicit_after_step(self._lifecycle, applied)

    def on_step_end(self) -> None:
        self._lifecycle.check_alive("on_step_end")

    def on_epoch_end(self, epoch: Optional[int] = None) -> None:
        self._lifecycle.check_alive("on_epoch_end")

    def on_train_end(self) -> None:
        self._lifecycle.check_alive("on_train_end")
        self.pruner.apply_masks()

    # ------------------------------------------------------------ checkpoints and the end
    def state_dict(self, sharded: bool = False) -> Dict[str, Any]:
        """Everything needed to resume mid-schedule: step counters, masks and criterion scores.

        Under DeepSpeed ZeRO 1-3 and FSDP2 each rank keeps its share of the scores (and under FSDP2 and ZeRO-3 its
        part of the masks), so this is a collective: call it on every rank (``engine.save_checkpoint`` does, as
        DeepSpeed requires), then write it from one. It gathers one layer at a time onto the host.

        ``sharded=True`` (FSDP2, ZeRO-3): this rank's parts only, no collective and nothing whole; every rank writes
        its own, and loads its own with the same world size (``slimtorch.deepspeed.initialize`` does so under
        ZeRO-3). Elsewhere the same as ``state_dict()``."""
        return self._lifecycle.state_dict(sharded)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._lifecycle.check_alive("load_state_dict")
        self._lifecycle.load_state_dict(state)

    def finalize(self) -> nn.Module:
        """Apply the masks a last time, detach from the optimizer and drop masks and scores; zeros stay."""
        self._lifecycle.check_alive("finalize")
        self._lifecycle.finish()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hands_free = False
        model = self._model_ref()
        if model is not None:
            registry.unregister(model, self.plan)
        return model

    def report(self) -> SparsityReport:
        """Shorthand for :func:`slimtorch.sparsity_report` of this model."""
        return sparsity_report(self._model_ref())

    # ------------------------------------------------------------ misuse
    def _check_explicit(self, what: str) -> None:
        self._lifecycle.check_alive(what)
        if self.hands_free:
            raise LifecycleError(
                f"{what}: the callbacks were prepared hands-free, so {self._driver[0]} already drives pruning; don't "
                f"call it as well, or {self._driver[1]} to drive it yourself"
            )
