"""The ``"head"`` pattern on one layer: how many input columns one removable head unit spans, read from the model.

A head unit of an attention output projection is one head's columns; under grouped-query attention it is a
key/value head with the query heads that share it (``in_features / num_key_value_heads`` columns), the unit
:func:`slimtorch.slim` can remove. The head count comes from the attention module that owns the projection: the
nearest parent, grandparent or one of their children whose class name says attention and which holds a head count
(``num_heads``, ``num_attention_heads``, ``n_heads``, ``n_head``, or its ``config``'s ``num_attention_heads``), as
BERT, GPT-2, Llama-style and most transformers attention modules do. Where the module also says its head width
(``head_dim``, ``attention_head_size``), the layer must read exactly heads x width features, so that ``"head"`` on
an MLP projection beside the attention is an error, not a wrong block size.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import nn

_HEADS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_HEAD_DIM = ("head_dim", "attention_head_size")


def _count(module: nn.Module, names: Tuple[str, ...]) -> Optional[int]:
    for source in (module, getattr(module, "config", None)):
        for name in names:
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _is_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name or "attn" in name


def head_unit_width(model: nn.Module, layer_name: str, in_features: int) -> Tuple[Optional[int], str]:
    """(columns per head unit, where the count was read) for the layer ``layer_name``; (None, why) if not found."""
    parts = layer_name.split(".")
    for depth in (len(parts) - 1, len(parts) - 2):
        if depth < 0:
            break
        ancestor = model.get_submodule(".".join(parts[:depth]))
        for name, module in [(".".join(parts[:depth]), ancestor)] + [
                (".".join(parts[:depth] + [child]), m) for child, m in ancestor.named_children()]:
            if not _is_attention(module):
                continue
            heads = _count(module, _HEADS)
            if heads is None:
                continue
            units = _count(module, _KV_HEADS) or heads
            head_dim = _count(module, _HEAD_DIM)
            if head_dim is not None and heads * head_dim != in_features:
                return None, (f"its {in_features} input features are not the {heads} heads x {head_dim} of "
                              f"{name} ({type(module).__name__}): it does not read the heads")
            if in_features % units:
                return None, (f"{in_features} input features are not a multiple of the {units} key/value heads of "
                              f"{name or type(model).__name__} ({type(module).__name__})")
            return in_features // units, f"{name} ({type(module).__name__}: {heads} heads, {units} key/value heads)"
    return None, ("no attention module with a head count (num_heads, num_attention_heads, n_head or its config's) "
                  "is its parent, grandparent or one of their children; 'head' is for attention output projections "
                  "(or write 'channelx<head width>')")
