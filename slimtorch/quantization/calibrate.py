"""Calibration: run batches through the model with an observer on the input of each selected module.

Batches are fed as docs/conventions.md says: a tensor as ``model(b)``, a mapping as ``model(**b)``, a tuple or list
by its first element (the inputs of an (inputs, labels...) pair) under the same rules; ``input_fn(batch)`` overrides
all of that and returns what the model takes (fed by the same rules). Tensors are moved to the model's device. Hooks are
always removed and every submodule's train/eval mode restored, even when calibration fails.
"""
from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
from torch import nn

from ..errors import CalibrationError, ConfigError

ModuleFilter = Union[Callable[[str, nn.Module], bool], Iterable[str]]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); cpu for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples, nested) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj) if not hasattr(obj, "_fields") else \
            type(obj)(*(to_device(v, device) for v in obj))  # namedtuples take positional fields
    return obj


def describe(obj: Any, depth: int = 0) -> str:
    """Short structure of a batch, e.g. ``dict(input_ids=Tensor[2, 7] int64)``, for error messages."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor{list(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if depth > 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        items = [f"{k}={describe(v, depth + 1)}" for k, v in list(obj.items())[:8]]
        return f"{type(obj).__name__}({', '.join(items)}{', ...' if len(obj) > 8 else ''})"
    if isinstance(obj, (list, tuple)):
        items = [describe(v, depth + 1) for v in list(obj)[:8]]
        return f"{type(obj).__name__}({', '.join(items)}{', ...' if len(obj) > 8 else ''})"
    return type(obj).__name__


def feed(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on ``batch`` by docs/conventions.md's rules (tensor, mapping, or a tuple/list's first item)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)) and len(batch) > 0:
        return feed(model, batch[0])
    raise TypeError(f"a calibration batch must be a tensor, a dict or a non-empty tuple/list (inputs first), got "
                    f"{describe(batch)}; pass input_fn=... to convert it")


def _select(model: nn.Module, module_filter: ModuleFilter) -> Dict[str, nn.Module]:
    named = dict(model.named_modules())
    if callable(module_filter):
        return {n: m for n, m in named.items() if module_filter(n, m)}
    names = [module_filter] if isinstance(module_filter, str) else list(module_filter)
    missing = [n for n in names if n not in named]
    if missing:
        raise ConfigError(f"calibration modules not found in {type(model).__name__}: {missing}")
    return {n: named[n] for n in names}


def _first_tensor(args, kwargs):
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


class _TextProgress:
    """Progress lines on stderr, every tenth of the run, where tqdm is not installed."""

    def __init__(self, total: int):
        self.total, self.n, self.every = total, 0, max(1, total // 10)

    def update(self, k: int) -> None:
        self.n += k
        if self.n % self.every == 0 or self.n == self.total:
            print(f"slimtorch calibration: {self.n}/{self.total} batches", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextProgress(total)
    return tqdm(total=total, desc="slimtorch calibration", unit="batch", file=sys.stderr, leave=False)


def calibrate(model: nn.Module, loader: Iterable, *, observer_factory: Callable[[str, nn.Module], Any],
              num_batches: int, input_fn: Optional[Callable[[Any], Any]] = None, module_filter: ModuleFilter,
              progress: bool = True) -> Dict[str, Any]:
    """Observe the input of each selected module over up to ``num_batches`` batches; ``{name: observer}``.

    ``observer_factory(name, module)`` makes one observer per module; ``module_filter`` is ``f(name, module) ->
    bool`` or a list of qualified module names. An observer that stays empty means its module was never called.
    """
    if num_batches < 1:
        raise ConfigError(f"num_calibration_batches must be >= 1, got {num_batches}")
    selected = _select(model, module_filter)
    if not selected:
        raise CalibrationError(f"no module of {type(model).__name__} was selected for calibration; check op_types "
                               f"and excluded_modules")
    observers = {n: observer_factory(n, m) for n, m in selected.items()}
    state = {"batch": -1}

    def make_hook(name):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            if x is None:
                return None
            try:
                observers[name].observe(x)
            except CalibrationError as e:  # say which module and batch; the observer only knows the tensor
                raise CalibrationError(f"calibration batch {state['batch']}: input of module {name!r} "
                                       f"({type(module).__name__}): {e}") from e
            return None
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = []
    device = model_device(model)
    try:
        total = min(num_batches, len(loader))  # type: ignore[arg-type]
    except TypeError:  # a generator, or a loader whose length is unknown
        total = num_batches
    bar = _progress_bar(total) if progress else None
    seen = 0
    try:
        for n, m in selected.items():
            handles.append(m.register_forward_pre_hook(make_hook(n), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(itertools.islice(loader, num_batches)):  # never reads a batch too many
                state["batch"] = i
                inputs = input_fn(batch) if input_fn is not None else batch
                try:
                    feed(model, to_device(inputs, device))
                except CalibrationError:
                    raise
                except Exception as e:  # the model (or the feeding rules) rejected this batch
                    raise CalibrationError(f"calibration batch {i} ({describe(inputs)}) could not be fed to "
                                           f"{type(model).__name__}: {type(e).__name__}: {e}") from e
                seen += 1
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training  # per module: a model with a frozen (eval) part keeps it
    if seen == 0:
        raise CalibrationError("the calibration loader yielded no batches; static quantization needs at least one "
                               "batch of representative inputs")
    return observers
