"""Batch helpers shared by calibration, export and the accuracy search: how a batch is fed to a model, moved to a
device and described in an error message.

Feeding rules (docs/conventions.md, "Calibration batches"): a tensor is fed as ``model(b)``, a mapping as
``model(**b)``, a tuple or list by its first element (the inputs of an (inputs, labels...) pair) under the same
rules.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); cpu for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device,
              memo: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = None) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples, nested) moved to ``device``.

    ``memo`` (id -> (tensor, moved tensor)), shared across calls, moves a tensor met several times once: it stays one
    tensor on ``device`` as it was one before (e.g. the attention mask every decoder block receives). The memo
    holds the original too, so its id cannot be reused by another tensor while the memo lives."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))
        return memo[id(obj)][1]
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, memo) for v in obj) if not hasattr(obj, "_fields") else \
            type(obj)(*(to_device(v, device, memo) for v in obj))  # namedtuples take positional fields
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
    """Call ``model`` on ``batch`` by the feeding rules (tensor, mapping, or a tuple/list's first item)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)) and len(batch) > 0:
        return feed(model, batch[0])
    raise TypeError(f"a calibration batch must be a tensor, a dict or a non-empty tuple/list (inputs first), got "
                    f"{describe(batch)}; pass calib_input_fn=... to convert it")


def first_tensor(args: tuple, kwargs: Optional[dict] = None) -> Optional[torch.Tensor]:
    """The first tensor among a module call's positional, then keyword, arguments (what a pre-hook observes)."""
    for v in list(args) + list((kwargs or {}).values()):
        if isinstance(v, torch.Tensor):
            return v
    return None
