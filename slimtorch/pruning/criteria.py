r"""Importance criteria: what ranks weights before a mask is computed.

| method        | score of weight w with gradient g             | needs gradients |
|---------------|-----------------------------------------------|-----------------|
| magnitude     | \|w\| at each pruning step                    | no              |
| l1            | \|w\| once, at prepare time (DeepSpeed's l1)  | no              |
| gradient      | \|g\| of the latest update                    | yes             |
| snip          | \|w * g\| of the latest update                | yes             |
| snip_momentum | S <- beta * S + \|w * g\| every update        | yes             |

Scores are element-wise; masks.py reduces them per block (mean) before ranking. State (the accumulated S) is
kept in float32 whatever the parameters' dtype, on the parameters' device.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

METHODS = ("magnitude", "l1", "gradient", "snip", "snip_momentum")


def needs_gradients(method: str) -> bool:
    return method not in ("magnitude", "l1")


def observation_window(method: str, beta: float) -> Optional[int]:
    """How many updates before a pruning step still matter to its score.

    ``None``: no observations (magnitude); 0: only the pruning step's own gradient (gradient, snip);
    for snip_momentum the updates whose weight beta^k is above 1e-3 of the newest one.
    """
    if method in ("magnitude", "l1"):
        return None
    if method == "snip_momentum":
        return 0 if beta == 0 else int(math.ceil(math.log(1e-3) / math.log(beta)))
    return 0


def observe(method: str, beta: float, state: Optional[Tensor], spare: Optional[Tensor], weight: Tensor,
            grad: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """Fold one update's gradient into a layer's state -> (new state, spare buffer for the next call).

    The new state is written into a float32 buffer that is reused update after update (the previous state becomes
    the next call's spare), so the per-update cost is three passes over the weight and no allocation: on CPU,
    allocating and page-faulting fresh buffers every update cost more than the arithmetic itself.
    """
    if method not in ("gradient", "snip", "snip_momentum"):
        raise ValueError(f"method {method!r} takes no observations")
    buf = spare
    if buf is None or buf.shape != weight.shape or buf.device != weight.device:
        buf = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    if method == "gradient":
        torch.abs(grad.detach(), out=buf)                     # |g|
    else:
        torch.mul(weight.detach(), grad.detach(), out=buf)    # |w * g|
        buf.abs_()
        if method == "snip_momentum" and state is not None:
            buf.add_(state.to(buf.device), alpha=beta)        # S <- beta * S + |w * g|
    return buf, state


def score(method: str, weight: Tensor, state: Optional[Tensor]) -> Tensor:
    """Element-wise importance of ``weight`` (same shape, float32)."""
    if method == "magnitude":
        return weight.detach().abs().float()
    if state is None:
        # no gradient seen yet (e.g. pruning at step 0 before any backward): fall back to magnitude
        return weight.detach().abs().float()
    return state
