"""DeepSpeed's ``topk`` for rows, heads and channels: one trainable score per unit, a straight-through top-k mask.

The score tensor has DeepSpeed's name and shape (``row_mask_scores`` ``[out, 1]``, ``head_pruning_scores``
``[1, heads]``, ``channel_mask_scores`` ``[out, 1, 1, 1]``) and DeepSpeed's initialisation (``kaiming_uniform_`` with
``a = sqrt(5)`` from the global RNG); it is registered on the layer as a parameter so the optimizer trains it and
the model's checkpoints hold it. Where DeepSpeed multiplies the weight by the mask inside its own layer class, this
module masks the layer's output (rows, channels) or input (a head's columns of the output projection) with forward
hooks, so the user's module class and weights stay as they are. The two are the same function with the same
gradients: masking row i of ``W`` and ``b`` zeroes exactly output i, and ``d loss / d mask_i`` is ``sum_j g_ij
W_ij + g_i b_i = sum over positions of (d loss / d y_i) * y_i`` either way; the weights' gradients are ``mask *``
the unmasked ones in both. The top-k keeps ``ceil(dense_ratio * units)`` units (DeepSpeed's ``TopKBinarizer``) and
passes the gradient straight through to the scores.

Memory: one score per unit and, in each forward, a mask of the output's (or input's) width.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import masks

ROW, HEAD, CHANNEL = "row", "head", "channel"


class _TopKStraightThrough(torch.autograd.Function):
    """Forward: 1 for the ``kept`` largest scores, 0 elsewhere; backward: the identity (straight-through)."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, kept: int) -> Tensor:
        flat = scores.detach().flatten().float()
        keep = ~masks.lowest_k(flat, flat.numel() - kept)
        return keep.reshape(scores.shape).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        return grad, None


def topk_mask(scores: Tensor, dense_ratio: float) -> Tensor:
    """The float 0/1 mask of ``scores`` keeping ``ceil(dense_ratio * n)`` (ties: the lower index is pruned first)."""
    return _TopKStraightThrough.apply(scores, masks.kept_ceil_count(dense_ratio, scores.numel()))


def scores_shape(unit: str, weight: Tensor, layout: str, units: int) -> Tuple[int, ...]:
    """DeepSpeed's shape of the scores of one layer."""
    if unit == HEAD:
        return (1, units)
    if unit == CHANNEL:
        return (units,) + (1,) * (weight.dim() - 1)
    return (units, 1)


class LearnedMask:
    """The scores and forward hook of one layer under ``topk``; inactive (no masking) until :meth:`activate`."""

    def __init__(self, module: nn.Module, layout: str, unit: str, attribute: str, dense_ratio: float,
                 head_width: Optional[int] = None, followers: Sequence[nn.Module] = ()):
        self.module, self.layout, self.unit, self.attribute = module, layout, unit, attribute
        self.followers = list(followers)  # BatchNorms whose channels go with these output channels
        self.dense_ratio, self.head_width = dense_ratio, head_width
        weight = module.weight
        out = weight.shape[1] if layout == masks.TRANSPOSED else weight.shape[0]
        self.units = out if unit != HEAD else _in_features(weight, layout) // head_width
        shape = scores_shape(unit, weight, layout, self.units)
        existing = getattr(module, attribute, None)
        if isinstance(existing, nn.Parameter) and tuple(existing.shape) == shape:
            self.scores = existing  # created before an engine built its optimizer (attach_scores)
        else:
            scores = torch.empty(shape, dtype=torch.float32, device=weight.device)
            nn.init.kaiming_uniform_(scores, a=math.sqrt(5))  # DeepSpeed's initialisation, from the global RNG
            self.scores = nn.Parameter(scores.to(weight.dtype) if weight.is_floating_point() else scores)
            module.register_parameter(attribute, self.scores)
        self.active = False
        self._handles: List[Any] = []
        self._at_activation: Optional[Tensor] = None  # scores when masking began, to see whether they train

    # ------------------------------------------------------------ masking
    def activate(self) -> None:
        if self.active:
            return
        if self.unit == HEAD:
            self._handles = [self.module.register_forward_pre_hook(self._mask_input)]
        else:
            self._handles = [m.register_forward_hook(self._mask_output) for m in [self.module] + self.followers]
        self.active = True
        self._at_activation = self.scores.detach().clone()

    def deactivate(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.active = [], False

    def _mask_output(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        m = topk_mask(self.scores, self.dense_ratio).reshape(-1).to(output.dtype)
        if self.unit == CHANNEL:  # [N, C, *spatial] (the conv's output, or its BatchNorm's)
            m = m.reshape((-1,) + (1,) * (output.dim() - 2))
        return output * m

    def _mask_input(self, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        x = args[0]
        m = topk_mask(self.scores, self.dense_ratio).reshape(-1).repeat_interleave(self.head_width).to(x.dtype)
        return (x * m,) + tuple(args[1:])

    # ------------------------------------------------------------ the current mask
    def keep(self) -> Tensor:
        """bool ``[units]``: the units the current scores keep."""
        with torch.no_grad():
            return topk_mask(self.scores.detach(), self.dense_ratio).reshape(-1).bool()

    def weight_mask(self) -> Tensor:
        """The current keep-mask in the weight's shape (rows / channels / a head's input columns)."""
        keep = self.keep().to(self.module.weight.device)
        weight = self.module.weight
        if self.unit == HEAD:
            cols = keep.repeat_interleave(self.head_width)
            matrix = cols.unsqueeze(0).expand(_out_features(weight, self.layout), -1)
        else:
            matrix = keep.unsqueeze(1).expand(-1, masks.to_matrix(weight, self.layout).shape[1])
        return masks.from_matrix(matrix.contiguous(), weight.shape, self.layout)

    def bias_mask(self) -> Optional[Tensor]:
        """The bias keep-mask (rows and channels take their bias along; a head's columns do not)."""
        return None if self.unit == HEAD else self.keep()

    def stuck(self) -> bool:
        """Whether the scores have not moved since masking began (they are in no optimizer)."""
        if self._at_activation is None:
            return False
        moved = not torch.equal(self._at_activation.to(self.scores.device), self.scores.detach())
        if moved:
            self._at_activation = None  # trained: no need to look again
        return not moved

    def remove(self) -> None:
        """Detach the hook and delete the scores from the module (the zeros are applied by the pruner)."""
        self.deactivate()
        if getattr(self.module, self.attribute, None) is self.scores:
            delattr(self.module, self.attribute)


def for_target(target: Any) -> LearnedMask:
    """The learned mask of a :class:`~.targets.TargetLayer` whose settings are topk (reusing scores already there)."""
    s = target.settings
    head_width = s.pattern.cols if s.unit == HEAD else None
    return LearnedMask(target.module, target.layout, s.unit, s.scores_attribute, s.dense_ratio, head_width,
                       [norm for _, norm in target.followers])


def _in_features(weight: Tensor, layout: str) -> int:
    return weight.shape[0] if layout == masks.TRANSPOSED else weight.shape[1]


def _out_features(weight: Tensor, layout: str) -> int:
    return weight.shape[1] if layout == masks.TRANSPOSED else weight.shape[0]
