"""Calibration: run batches through the model with an observer on the input of each selected module.

Batches are fed as docs/conventions.md says (:func:`slimtorch.batches.feed`); ``input_fn(batch)`` overrides the
rules and returns what the model takes (fed by the same rules). Tensors are moved to the model's device. Hooks are
always removed and every submodule's train/eval mode restored, even when calibration fails (:mod:`.passes`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from torch import nn

from ..batches import first_tensor
from ..errors import CalibrationError, ConfigError
from .passes import Hook, feed_batches

ModuleFilter = Union[Callable[[str, nn.Module], bool], Iterable[str]]


def select_modules(model: nn.Module, module_filter: ModuleFilter) -> Dict[str, nn.Module]:
    """``{name: module}`` for a ``f(name, module) -> bool`` filter or a list of qualified names (all must exist)."""
    named = dict(model.named_modules())
    if callable(module_filter):
        return {n: m for n, m in named.items() if module_filter(n, m)}
    names = [module_filter] if isinstance(module_filter, str) else list(module_filter)
    missing = [n for n in names if n not in named]
    if missing:
        raise ConfigError(f"calibration modules not found in {type(model).__name__}: {missing}")
    return {n: named[n] for n in names}


def calibrate(model: nn.Module, loader: Iterable, *, observer_factory: Callable[[str, nn.Module], Any],
              num_batches: int, input_fn: Optional[Callable[[Any], Any]] = None, module_filter: ModuleFilter,
              progress: bool = True) -> Dict[str, Any]:
    """Observe the input of each selected module over up to ``num_batches`` batches; ``{name: observer}``.

    ``observer_factory(name, module)`` makes one observer per module; ``module_filter`` is ``f(name, module) ->
    bool`` or a list of qualified module names. An observer that stays empty means its module was never called.
    """
    if num_batches < 1:
        raise ConfigError(f"num_calibration_batches must be >= 1, got {num_batches}")
    selected = select_modules(model, module_filter)
    if not selected:
        raise CalibrationError(f"no module of {type(model).__name__} was selected for calibration; check op_types "
                               f"and excluded_modules")
    observers = {n: observer_factory(n, m) for n, m in selected.items()}
    current = {"batch": -1}
    seen = feed_batches(model, loader, what="calibration", num_batches=num_batches, input_fn=input_fn,
                        on_batch=lambda i: current.__setitem__("batch", i),
                        progress="slimtorch calibration" if progress else None,
                        pre=observer_hooks(selected, observers, lambda: current["batch"]), hook_kwargs=True)
    if seen == 0:
        raise CalibrationError("the calibration loader yielded no batches; static quantization needs at least one "
                               "batch of representative inputs")
    return observers


def observer_hooks(modules: Dict[str, nn.Module], observers: Dict[str, Any], batch: Callable[[], int],
                   prefix: str = "") -> List[Hook]:
    """Forward pre-hooks (with kwargs) that hand each module's first input tensor to ``observers[name]``; an
    observer's CalibrationError gains the batch (``batch()``), the module's name (after ``prefix``) and type."""

    def observe_input(name: str):
        def hook(module, args, kwargs):
            x = first_tensor(args, kwargs)
            if x is None:
                return None
            try:
                observers[name].observe(x)
            except CalibrationError as e:  # say which module and batch; the observer only knows the tensor
                raise CalibrationError(f"calibration batch {batch()}: input of module {prefix + name!r} "
                                       f"({type(module).__name__}): {e}") from e
            return None
        return hook

    return [(modules[n], observe_input(n)) for n in observers]
