"""Which layers ``quantize()`` quantizes: the configured op types, minus ``excluded_modules``, minus layers whose
forward() a QDQ module would not reproduce; every layer left in float gets its reason."""
from __future__ import annotations

import re
import warnings
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..errors import ConfigError
from .qdq import op_type, quantizable_forward
from .report import FloatLayer


def select_targets(model: nn.Module, section, where: str) -> Tuple[Dict[str, nn.Module], List[FloatLayer]]:
    """Layers of the configured op types, minus ``excluded_modules`` (``re.search`` on the name and its ancestors)."""
    targets: Dict[str, nn.Module] = {}
    left: List[FloatLayer] = []
    used = set()
    for name, module in model.named_modules():
        kind = op_type(module)
        if not name or kind is None:
            continue
        if kind not in section.op_types:
            left.append(FloatLayer(name, kind, f"op type {kind} is not in op_types"))
            continue
        hit = excluded_by(section.excluded_modules, name)
        if hit is not None:
            used.add(hit)
            left.append(FloatLayer(name, kind, f"excluded_modules[{hit}] ({section.excluded_modules[hit]!r})"))
            continue
        unknown = quantizable_forward(module)
        if unknown is not None:
            left.append(FloatLayer(name, kind, unknown))
            continue
        if not getattr(module.weight, "is_floating_point", lambda: False)():
            raise ConfigError(f"{where}: module {name!r} ({kind}) has a {module.weight.dtype} weight; quantize() "
                              "takes a float model")
        targets[name] = module
    for i, pat in enumerate(section.excluded_modules):
        if i not in used:
            warnings.warn(f"{where}.excluded_modules[{i}] ({pat!r}) matches no {'/'.join(section.op_types)} layer "
                          f"of {type(model).__name__}", stacklevel=4)
    if not targets:
        raise ConfigError(f"{where}: nothing to quantize in {type(model).__name__}: no layer of op_types "
                          f"{section.op_types} is left after excluded_modules")
    return targets, left


def excluded_by(patterns: List[str], name: str) -> Optional[int]:
    """Index of the first pattern that ``re.search``-matches ``name`` or one of its ancestors, or None."""
    parts = name.split(".")
    chain = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for i, pat in enumerate(patterns):
        if any(re.search(pat, n) for n in chain):
            return i
    return None
