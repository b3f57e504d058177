"""Where DeepSpeed ZeRO 0-2 keeps what pruning reads and writes: the reduced gradients (ZeRO 1/2: in flat partitions,
each rank owning a fragment of every weight) and the fp32 master copy its optimizer steps and copies back.
:class:`DeepSpeedAccess` reads and writes them through DeepSpeed's optimizer alone (``engine.optimizer``), so the
same access serves ``slimtorch.deepspeed.initialize`` and the Trainer, which keeps the engine; ZeRO-3's partitioned
parameters are :mod:`.zero3`'s.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError
from ..pruning.access import ParamAccess


class DeepSpeedAccess(ParamAccess):
    """Gradients and fp32 master weights behind DeepSpeed's optimizer (``engine.optimizer``: ZeRO 0-2, fp32 /
    fp16 / bf16). Only the optimizer is needed, so the same access serves the Trainer, which keeps the engine."""

    def __init__(self, optimizer: Any):
        from deepspeed.utils import safe_get_full_grad
        self._get_grad = safe_get_full_grad
        self._optimizer = optimizer
        self._flat_masters: Optional[Dict[int, Tensor]] = None

    def grad(self, weight: Tensor) -> Optional[Tensor]:
        try:
            grad = self._reduced_grad(weight)
        except ValueError as exc:  # DeepSpeed's "only available immediately after backward and before step"
            raise ConfigError(
                "slimtorch.deepspeed: gradients were read outside the engine's accumulation boundary "
                f"({exc}); with hands_free=False call callbacks.on_before_optimizer_step() after engine.backward() "
                "and before engine.step(), once per micro-batch") from None
        if grad is not None and _grads_are_loss_scaled(self._optimizer):
            scale = _loss_scale(self._optimizer)
            if scale and scale != 1.0:
                grad = grad.float() / scale  # the scores must not move with the dynamic loss scale
        return grad

    def _reduced_grad(self, weight: Tensor) -> Optional[Tensor]:
        # ZeRO 1/2 (and the bf16 optimizer): only this rank's share of the reduced gradient, zeros elsewhere, so the
        # scores are partial (see ParamAccess.complete_scores) and no update pays a collective for its gradients
        return _gradient_share(weight) if _partitioned(weight) else self._get_grad(weight)

    def complete_scores(self, weight: Tensor, scores: Tensor) -> Tensor:
        if not _partitioned(weight):
            return scores
        from deepspeed import comm
        full = scores.clone()
        # the ranks' shares are disjoint and zero elsewhere: the sum is exact, so every rank gets the same bits
        comm.all_reduce(full, group=getattr(weight, "_dp_group", None))
        return full

    def local_scores(self, weight: Tensor, scores: Tensor) -> Tensor:
        return _share_of(weight, scores) if _partitioned(weight) else scores

    def update_applied(self) -> Optional[bool]:
        # what engine.was_step_applied() reports: DeepSpeed's fp16 optimizers set overflow on a skipped update
        return not bool(getattr(self._optimizer, "overflow", False))

    def masks_applied(self, masked: List[Tuple[Tensor, Tensor]]) -> None:
        # the fp32 master is multiplied by the mask, not overwritten by the bf16/fp16 weights: the kept entries keep
        # the precision the optimizer accumulated in them
        with torch.no_grad():
            for param, keep in masked:
                if _partitioned(param):  # ZeRO 1/2, bf16 optimizer: this rank's fragment of the flat fp32 master
                    mapping = param._hp_mapping  # None: no fragment on this rank
                    if mapping is not None:
                        address = mapping.lp_fragment_address
                        master = mapping.get_hp_fragment()
                        master.mul_(keep.reshape(-1).narrow(0, address.start, address.numel).to(master.dtype))
                    continue
                master = self._fp16_masters().get(id(param))  # ZeRO 0 fp16 optimizer
                if master is not None:
                    master.mul_(keep.reshape(master.shape).to(master.dtype))

    def _fp16_masters(self) -> Dict[int, Tensor]:
        """id(fp16 parameter) -> its view in the fp32 master of DeepSpeed's (ZeRO 0) FP16 optimizers."""
        if self._flat_masters is None:
            self._flat_masters = {}
            optimizer = self._optimizer
            groups = getattr(optimizer, "fp16_groups", None)
            if groups is not None and hasattr(optimizer, "fp32_groups_flat"):   # fused: one flat tensor per group
                for params, flat in zip(groups, optimizer.fp32_groups_flat):
                    offset = 0
                    for p in params:
                        self._flat_masters[id(p)] = flat.data.narrow(0, offset, p.numel()).view(p.shape)
                        offset += p.numel()
            elif groups is not None and hasattr(optimizer, "fp32_groups"):    # unfused: one fp32 copy per param
                for params, masters in zip(groups, optimizer.fp32_groups):
                    for p, m in zip(params, masters):
                        self._flat_masters[id(p)] = m.data
        return self._flat_masters


def _partitioned(weight: Tensor) -> bool:
    """Whether DeepSpeed linked ``weight`` to a partitioned fp32 master (ZeRO 1/2, the bf16 optimizer): each rank
    then owns a fragment of the flattened weight (``_hp_mapping.lp_fragment_address``; None: no fragment here)."""
    return hasattr(weight, "_hp_mapping")


def _placed(weight: Tensor, fragment: Callable[[int, int], Tensor]) -> Tensor:
    """A float32 tensor shaped like ``weight``: ``fragment(start, numel)`` (flat) where this rank owns the weight's
    fragment, zeros elsewhere."""
    share = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)
    mapping = weight._hp_mapping
    if mapping is not None:
        start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        share.narrow(0, start, numel).copy_(fragment(start, numel))
    return share.view(weight.shape)


def _share_of(weight: Tensor, full: Tensor) -> Tensor:
    """This rank's share of a full weight-shaped tensor (e.g. loaded scores)."""
    return _placed(weight, lambda start, numel: full.reshape(-1).narrow(0, start, numel))


def _gradient_share(weight: Tensor) -> Tensor:
    """This rank's share of ``weight``'s reduced gradient: what ``safe_get_full_grad`` all-reduces, before the
    all-reduce (its fragment of DeepSpeed's reduced partition; a ``.grad`` already full is cut to the fragment)."""
    if getattr(weight, "_hp_grad", None) is None and weight.grad is not None:
        return _share_of(weight, weight.grad)

    def fragment(start: int, numel: int) -> Tensor:
        values = weight._hp_mapping.get_lp_grad_fragment(weight._index_in_param_group).reshape(-1)
        # the bf16 optimizer keeps the whole gradient on every rank: take this rank's fragment of it
        return values.narrow(0, start, numel) if values.numel() == weight.numel() else values

    return _placed(weight, fragment)


def _loss_scale(optimizer: Any) -> Optional[float]:
    """The current loss scale of a DeepSpeed optimizer (1.0 without fp16), as ``engine._get_optimizer_loss_scale``."""
    config = getattr(optimizer, "loss_scale_config", None)
    return getattr(config, "cur_scale", None) if config is not None else getattr(optimizer, "cur_scale", None)


def _grads_are_loss_scaled(optimizer: Any) -> bool:
    """Whether the gradients at the boundary still carry the fp16 loss scale.

    ZeRO optimizers scale the loss in ``engine.backward``. DeepSpeed's stage-0 fp16 optimizers scaled it in their
    own ``backward`` in older releases; since ``ZeROOptimizer.scale_if_loss`` exists (0.19.8 here) the engine
    scales only through ZeRO optimizers, and the H100 run of benchmarks/deepspeed_pruning.py measured unscaled
    stage-0 fp16 gradients (scores 1/4096 of the fp32 run's when divided by the scale).
    """
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    if isinstance(optimizer, ZeROOptimizer):
        return True
    return not hasattr(ZeROOptimizer, "scale_if_loss")
