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
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

# fold(buf, state, beta, weight, grad): write the new state into the float32 ``buf`` (``state`` is the previous one)
Fold = Callable[[Tensor, Optional[Tensor], float, Tensor, Tensor], None]


@dataclass(frozen=True)
class Criterion:
    """One method: how many updates before a pruning step matter, how an update's gradient is folded into the
    state (None: gradients are not observed) and how weights are scored from the state."""

    window: Callable[[float], Optional[int]]
    fold: Optional[Fold]
    score: Callable[[Tensor, Optional[Tensor]], Tensor]


def _magnitude(weight: Tensor, state: Optional[Tensor]) -> Tensor:
    return weight.detach().abs().float()


def _observed(weight: Tensor, state: Optional[Tensor]) -> Tensor:
    # no gradient seen yet (e.g. pruning at step 0 before any backward): fall back to magnitude
    return _magnitude(weight, None) if state is None else state


def _abs_grad(buf: Tensor, state: Optional[Tensor], beta: float, weight: Tensor, grad: Tensor) -> None:
    torch.abs(grad.detach(), out=buf)                     # |g|


def _abs_weight_times_grad(buf: Tensor, state: Optional[Tensor], beta: float, weight: Tensor, grad: Tensor) -> None:
    torch.mul(weight.detach(), grad.detach(), out=buf)    # |w * g|
    buf.abs_()


def _momentum(buf: Tensor, state: Optional[Tensor], beta: float, weight: Tensor, grad: Tensor) -> None:
    _abs_weight_times_grad(buf, state, beta, weight, grad)
    if state is not None:
        buf.add_(state.to(buf.device), alpha=beta)        # S <- beta * S + |w * g|


def _momentum_window(beta: float) -> Optional[int]:
    # the updates whose weight beta^k is above 1e-3 of the newest one
    return 0 if beta == 0 else int(math.ceil(math.log(1e-3) / math.log(beta)))


def _no_observations(beta: float) -> Optional[int]:
    return None


def _latest_update(beta: float) -> Optional[int]:
    return 0


#: method name (the config's ``method``) -> its criterion
CRITERIA: Dict[str, Criterion] = {
    "magnitude": Criterion(_no_observations, None, _magnitude),
    # l1 ranks once, at prepare time (pruner.rank_at_prepare); without observations its score is |w| too
    "l1": Criterion(_no_observations, None, _observed),
    "gradient": Criterion(_latest_update, _abs_grad, _observed),
    "snip": Criterion(_latest_update, _abs_weight_times_grad, _observed),
    "snip_momentum": Criterion(_momentum_window, _momentum, _observed),
}


def _criterion(method: str) -> Criterion:
    try:
        return CRITERIA[method]
    except KeyError:
        raise ValueError(f"unknown pruning method {method!r}; use one of {', '.join(CRITERIA)}") from None


def observation_window(method: str, beta: float) -> Optional[int]:
    """How many updates before a pruning step still matter to its score.

    ``None``: no observations (magnitude); 0: only the pruning step's own gradient (gradient, snip);
    for snip_momentum the updates whose weight beta^k is above 1e-3 of the newest one.
    """
    return _criterion(method).window(beta)


def observe(method: str, beta: float, state: Optional[Tensor], spare: Optional[Tensor], weight: Tensor,
            grad: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """Fold one update's gradient into a layer's state -> (new state, spare buffer for the next call).

    The new state is written into a float32 buffer that is reused update after update (the previous state becomes
    the next call's spare), so the per-update cost is three passes over the weight and no allocation: on CPU,
    allocating and page-faulting fresh buffers every update cost more than the arithmetic itself.
    """
    fold = _criterion(method).fold
    if fold is None:
        raise ValueError(f"method {method!r} takes no observations")
    buf = spare
    if buf is None or buf.shape != weight.shape or buf.device != weight.device:
        buf = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    fold(buf, state, beta, weight, grad)
    return buf, state


def score(method: str, weight: Tensor, state: Optional[Tensor]) -> Tensor:
    """Element-wise importance of ``weight`` (same shape, float32)."""
    return _criterion(method).score(weight, state)
