"""Pure schedule functions: the sparsity a layer should have at a given step.

With f = (t - start) / (end - start) clipped to [0, 1] and d = dense_ratio:

| kind   | sparsity s(t)                   | shape                                  |
|--------|---------------------------------|----------------------------------------|
| exp    | 1 - d ** f                      | density decays geometrically           |
| cos    | (1 - d) * (1 - cos(pi * f / 2)) | slow start, fast finish                |
| linear | (1 - d) * f                     | even steps                             |
| cube   | (1 - d) * (1 - (1 - f) ** 3)    | fast start, slow finish (Zhu & Gupta)  |

``start == end`` prunes once, to the full target, at ``start``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict

#: sparsity_decay_type -> s(f, d), the sparsity at fraction f of the window for dense_ratio d
DECAYS: Dict[str, Callable[[float, float], float]] = {
    "exp": lambda f, d: 1.0 - d ** f,
    "cos": lambda f, d: (1.0 - d) * (1.0 - math.cos(math.pi * f / 2.0)),
    "linear": lambda f, d: (1.0 - d) * f,
    "cube": lambda f, d: (1.0 - d) * (1.0 - (1.0 - f) ** 3),
}


def schedule_fraction(step: int, start: int, end: int) -> float:
    """f: how far ``step`` is through the window [start, end], clipped to [0, 1]."""
    if end <= start:
        return 1.0 if step >= start else 0.0
    return min(1.0, max(0.0, (step - start) / (end - start)))


def sparsity_at(step: int, start: int, end: int, dense_ratio: float, kind: str) -> float:
    """Target sparsity at ``step`` for a schedule that reaches ``1 - dense_ratio`` at ``end``."""
    decay = DECAYS.get(kind)
    if decay is None:
        raise ValueError(f"unknown sparsity_decay_type {kind!r}; use one of {', '.join(DECAYS)}")
    return decay(schedule_fraction(step, start, end), dense_ratio)


def is_pruning_step(step: int, start: int, end: int, frequency: int) -> bool:
    """Masks are recomputed at ``start``, every ``frequency`` steps after it, and at ``end``."""
    if step < start or step > end:
        return False
    return step == end or (step - start) % frequency == 0
