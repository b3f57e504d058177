r"""Importance criteria: what ranks weights before a mask is computed.

| method        | score of weight w with gradient g             | needs gradients |
|---------------|-----------------------------------------------|-----------------|
| magnitude     | \|w\|  (DeepSpeed's "l1")                     | no              |
| gradient      | \|g\| of the latest update                    | yes             |
| snip          | \|w * g\| of the latest update                | yes             |
| snip_momentum | S <- beta * S + \|w * g\| every update        | yes             |

Scores are element-wise; masks.py reduces them per block (mean) before ranking. State (the accumulated S) is
kept in float32 whatever the parameters' dtype, on the parameters' device.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

METHODS = ("magnitude", "gradient", "snip", "snip_momentum")


def needs_gradients(method: str) -> bool:
    return method != "magnitude"


def observation_window(method: str, beta: float) -> Optional[int]:
    """How many updates before a pruning step still matter to its score.

    ``None``: no observations (magnitude); 0: only the pruning step's own gradient (gradient, snip);
    for snip_momentum the updates whose weight beta^k is above 1e-3 of the newest one.
    """
    if method == "magnitude":
        return None
    if method == "snip_momentum":
        return 0 if beta == 0 else int(math.ceil(math.log(1e-3) / math.log(beta)))
    return 0


def observe(method: str, beta: float, states: List[Optional[Tensor]], weights: List[Tensor],
            grads: List[Tensor]) -> List[Tensor]:
    """Fold one update's gradients into the layers' states; returns the new states (updated in place where
    possible). Batched over layers with ``torch._foreach_*`` so the per-update cost is a few fused passes."""
    if method == "gradient":
        return [g.detach().abs().float() for g in grads]
    # |w * g|
    products = torch._foreach_mul([w.detach() for w in weights], [g.detach() for g in grads])
    torch._foreach_abs_(products)
    if method == "snip":
        return [p.float() for p in products]
    if method != "snip_momentum":
        raise ValueError(f"method {method!r} takes no observations")
    fresh = [s is None for s in states]
    if all(fresh):
        return [p.float() for p in products]
    kept = [s for s in states if s is not None]
    incoming = [p for p, f in zip(products, fresh) if not f]
    torch._foreach_mul_(kept, beta)  # S <- beta * S + |w * g|
    torch._foreach_add_(kept, incoming)
    it = iter(kept)
    return [p.float() if f else next(it) for p, f in zip(products, fresh)]


def score(method: str, weight: Tensor, state: Optional[Tensor]) -> Tensor:
    """Element-wise importance of ``weight`` (same shape, float32)."""
    if method == "magnitude":
        return weight.detach().abs().float()
    if state is None:
        # no gradient seen yet (e.g. pruning at step 0 before any backward): fall back to magnitude
        return weight.detach().abs().float()
    return state
