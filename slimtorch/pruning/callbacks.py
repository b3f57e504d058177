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
"""
from __future__ import annotations

import logging
import warnings
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import CompressionConfig, load_config
from ..config.loader import ConfigSource
from ..errors import ConfigError, LifecycleError, SlimError, StateDictError
from .access import ParamAccess
from .distributed import active_world, check_same_masks, check_same_plan, mask_fingerprint, refuse_sharded, unwrap
from .pruner import Pruner
from .targets import TargetPlan, describe_plan, plan_targets

logger = logging.getLogger("slimtorch")

HISTORY_EVENTS_PER_LAYER = 64  # cb.history keeps the last 64 mask recomputations of each layer

# model -> its active callbacks, so sparsity_report(model) can show patterns, targets and exclusions
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, PruningCallbacks]" = weakref.WeakKeyDictionary()


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
    ``hands_free`` marks callbacks that the engine drives, so the explicit hooks refuse to be called as well;
    ``ranked`` holds prepare-time rankings made before the engine cast the weights (``pruner.rank_at_prepare``)."""
    model = unwrap(model)  # a torch.compile'd model shares its parameters with the original module
    refuse_sharded(model)
    cfg = load_config(config)
    if cfg.sparse_pruning is None:
        raise ConfigError("compression_training.sparse_pruning: the config has no sparse_pruning section to prepare")
    if model in _ACTIVE:
        raise LifecycleError("prepare_pruning: this model already has active pruning callbacks; call finalize() on "
                             "them before preparing again")
    failure: Optional[SlimError] = None
    try:
        if cfg.pruning_enabled:
            plan = plan_targets(model, cfg.sparse_pruning)
        else:
            warnings.warn("slimtorch: compression_training.sparse_pruning.shared_parameters.enabled is false; the "
                          "model will not be pruned", stacklevel=2)
            plan = TargetPlan([], [])
    except SlimError as e:  # under torch.distributed the other ranks must hear of it, not wait for this one
        failure, plan = e, TargetPlan([], [])
    check_same_plan(plan.layers, failure)  # under torch.distributed: every rank must prune the same layers alike
    if failure is not None:
        raise failure
    for line in cfg.notes + tuple(describe_plan(plan, cfg.sparse_pruning) if plan.layers else ()):
        logger.info("slimtorch prepare_pruning: %s", line)
    callbacks = PruningCallbacks(model, cfg, plan, optimizer, access=access, accumulate=accumulate, driver=driver,
                                 hands_free=hands_free, ranked=ranked)
    _ACTIVE[model] = callbacks
    return callbacks


class PruningCallbacks:
    """Training-loop hooks that prune progressively; see the module docstring for what each one does."""

    def __init__(self, model: nn.Module, config: CompressionConfig, plan: TargetPlan,
                 optimizer: Optional[torch.optim.Optimizer] = None, *, access: Optional[ParamAccess] = None,
                 accumulate: Optional[int] = None,
                 driver: Tuple[str, str] = ("optimizer.step()", "prepare without optimizer="),
                 hands_free: bool = False, ranked: Optional[Dict[str, torch.Tensor]] = None):
        self.config = config
        self.plan = plan
        self.pruner = Pruner(plan.layers, access, ranked)
        self.step = 0          # applied updates so far
        self.history: List[Dict[str, Any]] = []  # recent mask recomputations: step, layer, target, sparsity
        self._micro = 0        # on_after_optimizer_step calls so far (micro-batches when accumulating)
        self._masks_for = -1   # the pruning step whose masks were last computed
        self._accumulate = accumulate or config.sparse_pruning.shared_parameters.gradient_accumulation_steps
        # what drives the hooks in hands-free mode, and how to drive them yourself instead (named in errors)
        self._driver = driver
        self._model_ref = weakref.ref(model)
        self._finalized = False
        self._handles = []
        self._hands_free = hands_free or optimizer is not None  # optimizer hooks, or an engine drives the steps
        if optimizer is not None:
            self._handles = [
                optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_hooked_step(opt)),
                optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_hooked_step(opt)),
            ]

    # ------------------------------------------------------------ properties
    @property
    def hands_free(self) -> bool:
        return self._hands_free

    @property
    def finalized(self) -> bool:
        """True after :meth:`finalize`: the masks and scores are gone, the hooks detached."""
        return self._finalized

    @property
    def layers(self) -> List[str]:
        """Names of the layers being pruned."""
        return [t.name for t in self.plan.layers]

    # ------------------------------------------------------------ lifecycle hooks
    def on_train_begin(self) -> None:
        self._check_alive("on_train_begin")
        self.pruner.apply_masks()  # after a resume the restored masks hold from the first forward on

    def on_epoch_begin(self, epoch: Optional[int] = None) -> None:
        self._check_alive("on_epoch_begin")

    def on_step_begin(self, step: Optional[int] = None) -> None:
        """Marks the start of a (micro-)batch; ``step`` is informational: slimtorch counts updates itself."""
        self._check_alive("on_step_begin")

    def on_before_optimizer_step(self) -> None:
        self._check_explicit("on_before_optimizer_step")
        if self._at_boundary():
            self._before_update()

    def on_after_optimizer_step(self, applied: Optional[bool] = None) -> None:
        """Call after ``optimizer.step()``; pass ``applied=False`` when the update was skipped (AMP overflow).

        Left out, ``applied`` is True, or what the training engine reports (DeepSpeed's ``was_step_applied()``).
        """
        self._check_explicit("on_after_optimizer_step")
        boundary = self._at_boundary()
        self._micro += 1
        if boundary:
            if applied is None:
                applied = self.pruner.access.update_applied()
            if applied is None or applied:
                self._after_update()
            else:
                self._skipped_update()

    def on_step_end(self) -> None:
        self._check_alive("on_step_end")

    def on_epoch_end(self, epoch: Optional[int] = None) -> None:
        self._check_alive("on_epoch_end")

    def on_train_end(self) -> None:
        self._check_alive("on_train_end")
        self.pruner.apply_masks()

    # ------------------------------------------------------------ the work
    def _before_update(self) -> None:
        self._check_alive("optimizer.step")
        self.pruner.observe(self.step)
        if self.pruner.due(self.step) and self._masks_for != self.step:
            self._update_masks()  # only when no earlier update could prepare them (the very first one)

    def _after_update(self) -> None:
        self.pruner.keep_last_observation()
        self.pruner.apply_masks()
        self.step += 1
        if self.pruner.due(self.step):
            # prune now, before the next forward, so that update's gradient already sees the pruned network
            self._update_masks()

    def _before_hooked_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not _skips_this_step(optimizer):
            self._before_update()

    def _after_hooked_step(self, optimizer: torch.optim.Optimizer) -> None:
        if _skips_this_step(optimizer):
            self._skipped_update()
        else:
            self._after_update()

    def _wrap_step(self, step: Callable[..., Any], skipped: Callable[[], bool]) -> Callable[..., Any]:
        """``step`` (an engine's per-update optimizer step) made to drive these callbacks: observe before it, then
        apply the masks, or forget the observation when ``skipped()`` says the update was not applied."""
        def driven_step(*args: Any, **kwargs: Any) -> Any:
            if self._finalized:
                return step(*args, **kwargs)
            self._before_update()
            result = step(*args, **kwargs)
            self._micro += self._accumulate  # the micro-batches of this update, as explicit mode counts them
            if skipped():
                self._skipped_update()
            else:
                self._after_update()
            return result

        driven_step.__doc__ = step.__doc__
        return driven_step

    def _skipped_update(self) -> None:
        # the gradients the criteria saw were not applied (inf/NaN under AMP): forget them too
        self.pruner.forget_last_observation()
        self.pruner.apply_masks()

    def _update_masks(self) -> None:
        events = self.pruner.update_masks(self.step)
        self.history.extend(events)
        if events and active_world() is not None:
            updated = {e["layer"] for e in events}
            layers = [l for l in self.pruner.layers if l.name in updated]
            check_same_masks([l.name for l in layers], [mask_fingerprint(l.mask) for l in layers], self.step)
        # the recent recomputations are for inspection; a long schedule must not grow checkpoints without bound
        limit = HISTORY_EVENTS_PER_LAYER * max(1, len(self.pruner.layers))
        if len(self.history) > limit:
            del self.history[:-limit]
        self._masks_for = self.step

    def _at_boundary(self) -> bool:
        return (self._micro + 1) % self._accumulate == 0

    # ------------------------------------------------------------ checkpoints and the end
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume mid-schedule: step counters, masks and criterion scores.

        Under DeepSpeed ZeRO 1/2 each rank keeps its share of the scores, so this is a collective: call it on every
        rank (``engine.save_checkpoint`` does, as DeepSpeed requires), then write it from one."""
        return {"step": self.step, "micro": self._micro, "masks_for": self._masks_for, "history": list(self.history),
                "pruner": self.pruner.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._check_alive("load_state_dict")
        if not isinstance(state, dict) or not {"step", "micro", "pruner"} <= set(state):
            raise StateDictError("load_state_dict expects the dict PruningCallbacks.state_dict() returned")
        self.pruner.load_state_dict(state["pruner"])
        self.step = int(state["step"])
        self._micro = int(state["micro"])
        self._masks_for = int(state.get("masks_for", -1))
        self.history = list(state.get("history", []))

    def finalize(self) -> nn.Module:
        """Apply the masks a last time, detach from the optimizer and drop masks and scores; zeros stay."""
        self._check_alive("finalize")
        self.pruner.apply_masks()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hands_free = False
        self._finalized = True
        model = self._model_ref()
        if model is not None:
            _ACTIVE.pop(model, None)
            _FINALIZED[model] = self.plan
        self.pruner = Pruner([])
        return model

    def report(self):
        """Shorthand for :func:`slimtorch.sparsity_report` of this model."""
        from .report import sparsity_report
        return sparsity_report(self._model_ref())

    # ------------------------------------------------------------ misuse
    def _check_alive(self, what: str) -> None:
        if self._finalized:
            raise LifecycleError(f"{what}: these callbacks were finalized; prepare_pruning again to prune more")

    def _check_explicit(self, what: str) -> None:
        self._check_alive(what)
        if self.hands_free:
            raise LifecycleError(
                f"{what}: the callbacks were prepared hands-free, so {self._driver[0]} already drives pruning; don't "
                f"call it as well, or {self._driver[1]} to drive it yourself"
            )


def _skips_this_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a GradScaler is stepping ``optimizer`` over inf/NaN gradients that the optimizer itself will skip.

    For optimizers that unscale inside ``step()`` (fused or capturable Adam/AdamW/SGD) the GradScaler calls
    ``step()`` even on an overflow, with ``optimizer.found_inf`` set for the duration of the call; the step hooks
    fire, but no update is applied. (Other optimizers are simply not stepped on an overflow.)
    """
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return False
    return bool(found_inf.item() > 0) if isinstance(found_inf, torch.Tensor) else bool(found_inf)


# model -> plan of finalized callbacks: the report still knows each layer's pattern after finalize()
_FINALIZED: "weakref.WeakKeyDictionary[nn.Module, TargetPlan]" = weakref.WeakKeyDictionary()


def plan_of(model: nn.Module) -> Optional[TargetPlan]:
    """The target plan of ``model``'s active or finalized callbacks, if any."""
    model = unwrap(model)
    active = _ACTIVE.get(model)
    return active.plan if active is not None else _FINALIZED.get(model)


def is_active(model: nn.Module) -> bool:
    """Whether ``model`` has callbacks that have not been finalized."""
    return unwrap(model) in _ACTIVE


def masks_of(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Current keep-masks of ``model``'s active callbacks by layer name (empty when none)."""
    active = _ACTIVE.get(unwrap(model))
    if active is None:
        return {}
    return {l.name: l.mask for l in active.pruner.layers if l.mask is not None}
