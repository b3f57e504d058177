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
from typing import List, Optional, Tuple

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


def observe(method: str, beta: float, states: List[Optional[Tensor]], spares: List[Optional[Tensor]],
            weights: List[Tensor], grads: List[Tensor]) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """Fold one update's gradients into the layers' states -> (new states, spare buffers).

    Each new state is written into a float32 buffer that is reused update after update (the previous state
    becomes the next update's spare), so the per-update cost is three passes over the weights and no allocation:
    on CPU, allocating and page-faulting fresh buffers every update cost more than the arithmetic itself.
    """
    if method not in ("gradient", "snip", "snip_momentum"):
        raise ValueError(f"method {method!r} takes no observations")
    new_states, new_spares = [], []
    for state, spare, w, g in zip(states, spares, weights, grads):
        buf = spare
        if buf is None or buf.shape != w.shape or buf.device != w.device:
            buf = torch.empty(w.shape, dtype=torch.float32, device=w.device)
        if method == "gradient":
            torch.abs(g.detach(), out=buf)                    # |g|
        else:
            torch.mul(w.detach(), g.detach(), out=buf)        # |w * g|
            buf.abs_()
            if method == "snip_momentum" and state is not None:
                buf.add_(state, alpha=beta)                   # S <- beta * S + |w * g|
        new_states.append(buf)
        new_spares.append(state)
    return new_states, new_spares


def score(method: str, weight: Tensor, state: Optional[Tensor]) -> Tensor:
    """Element-wise importance of ``weight`` (same shape, float32)."""
    if method == "magnitude":
        return weight.detach().abs().float()
    if state is None:
        # no gradient seen yet (e.g. pruning at step 0 before any backward): fall back to magnitude
        return weight.detach().abs().float()
    return state
