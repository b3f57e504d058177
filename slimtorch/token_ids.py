"""Token ids checked against the model's vocabulary before they reach its embedding.

An id outside ``[0, vocabulary)`` otherwise ends in torch's "IndexError: index out of range in self" (a device-side
assert on CUDA), which names neither the id nor the vocabulary. The usual cause is a tokenizer that is not the
model's (or a vocabulary resized after tokenizing), so the error says that.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from .errors import CalibrationError


def vocabulary_size(model: nn.Module) -> Optional[int]:
    """``num_embeddings`` of the model's input embedding (transformers' ``get_input_embeddings``); None where the
    model names none or it is not an ``nn.Embedding``."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):  # transformers' default for models without one
        return None
    return embedding.num_embeddings if isinstance(embedding, nn.Embedding) else None


def token_ids_of(inputs: Any) -> Optional[torch.Tensor]:
    """The token ids of a batch as fed to a model (the feeding rules: a tuple or list by its first element):
    ``input_ids`` of a mapping, or an integer tensor itself; None where there are none."""
    while isinstance(inputs, (list, tuple)) and inputs:
        inputs = inputs[0]
    ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
    if isinstance(ids, torch.Tensor) and not (ids.dtype.is_floating_point or ids.dtype.is_complex
                                              or ids.dtype == torch.bool):
        return ids
    return None


def check_token_ids(model: nn.Module, ids: Optional[torch.Tensor], where: str) -> None:
    """Raise :class:`~slimtorch.CalibrationError` when ``ids`` hold an id outside the model's vocabulary, naming
    ``where`` (e.g. "calibration batch 3"), the first such id and its [row, position], and the vocabulary size."""
    vocabulary = vocabulary_size(model)
    if ids is None or vocabulary is None or ids.numel() == 0:
        return
    outside = (ids < 0) | (ids >= vocabulary)
    if not bool(outside.any()):
        return
    first = [int(i) for i in outside.nonzero()[0]]
    place = f"[row, position] {first}" if len(first) == 2 else f"index {first}"
    raise CalibrationError(
        f"{where}: token id {int(ids[tuple(first)])} at {place} is outside the vocabulary of "
        f"{type(model).__name__} ({vocabulary} embeddings, ids 0..{vocabulary - 1}; {int(outside.sum())} of "
        f"{ids.numel()} ids are outside, largest {int(ids.max())}); the ids come from another tokenizer than the "
        "model's (or the vocabulary was resized): tokenize with the model's own tokenizer, e.g. "
        "AutoTokenizer.from_pretrained of the same checkpoint")
