"""The three ways to drive a :class:`~.lifecycle.PruningLifecycle` through the updates of a training loop.

* explicit hooks (:func:`explicit_before_step`, :func:`explicit_after_step`): called once per micro-batch around
  ``optimizer.step()`` by the user or the transformers Trainer callback; they count micro-batches themselves, so
  only the call that completes an update touches the lifecycle;
* optimizer hooks (:func:`attach_to_optimizer`): the optimizer's own step pre/post hooks, so a plain loop needs no
  calls; the optimizer steps once per update;
* an engine's step (:func:`wrap_step`): a training engine's per-update optimizer step replaced by one that drives
  the lifecycle around it (DeepSpeed's, which keeps the gradients only until then).
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch.utils.hooks import RemovableHandle

from .lifecycle import PruningLifecycle


def explicit_before_step(lifecycle: PruningLifecycle) -> None:
    """Before ``optimizer.step()`` of a micro-batch: the update's gradients are complete only at the boundary."""
    if lifecycle.at_boundary():
        lifecycle.before_update()


def explicit_after_step(lifecycle: PruningLifecycle, applied: Optional[bool]) -> None:
    """After ``optimizer.step()`` of a micro-batch; ``applied`` None asks the pruner's access (e.g. DeepSpeed's
    overflow flag), and an unknown answer counts as applied."""
    boundary = lifecycle.at_boundary()
    lifecycle.micro += 1
    if boundary:
        if applied is None:
            applied = lifecycle.pruner.access.update_applied()
        if applied is None or applied:
            lifecycle.after_update()
        else:
            lifecycle.skipped_update()


def attach_to_optimizer(optimizer: torch.optim.Optimizer, lifecycle: PruningLifecycle) -> List[RemovableHandle]:
    """Drive ``lifecycle`` from ``optimizer.step()``'s pre and post hooks; remove the returned handles to detach.

    An update a GradScaler skips by not calling ``step()`` never reaches the hooks; one it skips inside ``step()``
    (fused optimizers) is told apart by :func:`_skips_this_step`.
    """
    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not _skips_this_step(opt):
            lifecycle.before_update()

    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if _skips_this_step(opt):
            lifecycle.skipped_update()
        else:
            lifecycle.after_update()

    return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]


def wrap_step(step: Callable[..., Any], lifecycle: PruningLifecycle,
              skipped: Callable[[], bool]) -> Callable[..., Any]:
    """``step`` (an engine's per-update optimizer step) made to drive ``lifecycle``: observe before it, then apply
    the masks, or forget the observation when ``skipped()`` says the update was not applied. Once the lifecycle
    is finished the wrapper only calls ``step``."""
    def driven_step(*args: Any, **kwargs: Any) -> Any:
        if lifecycle.finished:
            return step(*args, **kwargs)
        lifecycle.before_update()
        result = step(*args, **kwargs)
        lifecycle.micro += lifecycle.accumulate  # the micro-batches of this update, as the explicit hooks count them
        if skipped():
            lifecycle.skipped_update()
        else:
            lifecycle.after_update()
        return result

    driven_step.__doc__ = step.__doc__
    return driven_step


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
