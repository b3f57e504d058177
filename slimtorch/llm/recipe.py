"""What :func:`slimtorch.oneshot` does to each Linear, read from the config: prune it (SparseGPT, Wanda, magnitude),
quantize its weight (RTN, GPTQ), or both, in that order, so that pruned zeros stay zeros (GPTQ leaves them out of
its updates and both grids map 0 to exactly 0).

:class:`Recipe` holds the two enabled sections; :meth:`Recipe.compress` turns one Linear's float weight and (when an
algorithm needs it) its inputs' Hessian into the layer that replaces it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config.patterns import parse_pattern
from ..config.quant_schema import OneShotPruning, WeightOnlyQuantization
from ..quantization.qdq import op_type
from ..quantization.selection import excluded_by
from ..quantization.smoothquant.scales import linear_weight
from .gptq import HessianAccumulator, check_enough_tokens, gptq_quantize
from .grid import WeightGrid, check_group_size, quantize_rtn
from .modules import WeightOnlyLinear
from .sparsegpt import Sparsity, check_sparsity, magnitude_prune, sparsegpt_prune, wanda_prune

SECTIONS = "compression_inference.{}"
Quantized = Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]  # (q, scale, zero, g_idx)


def _rtn(weight: Tensor, hessian: Optional[HessianAccumulator], grid: WeightGrid, section: WeightOnlyQuantization,
         pruned: bool, where: str) -> Quantized:
    q, scale, zero = quantize_rtn(weight, grid)
    return q, scale, zero, None


def _gptq(weight: Tensor, hessian: Optional[HessianAccumulator], grid: WeightGrid, section: WeightOnlyQuantization,
          pruned: bool, where: str) -> Quantized:
    s = section.gptq
    r = gptq_quantize(weight, hessian.hessian, grid, dampening=s.dampening, block_size=s.block_size,
                      act_order=s.act_order, static_groups=s.static_groups, preserve_zeros=pruned, where=where,
                      tokens=hessian.tokens)
    return r.q, r.scale, r.zero, r.g_idx


def _sparsegpt(weight: Tensor, hessian: Optional[HessianAccumulator], target: Sparsity, section: OneShotPruning,
               where: str) -> Tensor:
    return sparsegpt_prune(weight, hessian.hessian, target, dampening=section.sparsegpt.dampening,
                           block_size=section.sparsegpt.block_size, where=where)


def _wanda(weight: Tensor, hessian: Optional[HessianAccumulator], target: Sparsity, section: OneShotPruning,
           where: str) -> Tensor:
    return wanda_prune(weight, hessian.hessian, target, where=where)


def _magnitude(weight: Tensor, hessian: Optional[HessianAccumulator], target: Sparsity, section: OneShotPruning,
               where: str) -> Tensor:
    return magnitude_prune(weight, target, where=where)


#: weight-only algorithm -> (needs the inputs' Hessian, quantize one weight)
QUANTIZERS: Dict[str, Tuple[bool, Callable[..., Quantized]]] = {"rtn": (False, _rtn), "gptq": (True, _gptq)}
#: one-shot pruning method -> (needs the inputs' Hessian, prune one weight)
PRUNERS: Dict[str, Tuple[bool, Callable[..., Tensor]]] = {
    "sparsegpt": (True, _sparsegpt), "wanda": (True, _wanda), "magnitude": (False, _magnitude)}


@dataclass
class Recipe:
    """The enabled ``weight_only_quantization`` and ``oneshot_pruning`` sections (at least one)."""

    quantization: Optional[WeightOnlyQuantization]
    pruning: Optional[OneShotPruning]

    @property
    def blocks(self) -> Optional[str]:
        return next((s.blocks for s in (self.quantization, self.pruning) if s is not None and s.blocks), None)

    @property
    def blocks_key(self) -> str:
        """The config path of the ``blocks`` key errors should name: the one set, else the first enabled section's."""
        sections = [(k, s) for k, s in (("weight_only_quantization", self.quantization),
                                         ("oneshot_pruning", self.pruning)) if s is not None]
        key = next((k for k, s in sections if s.blocks), sections[0][0])
        return SECTIONS.format(f"{key}.blocks")

    @property
    def grid(self) -> Optional[WeightGrid]:
        q = self.quantization
        return None if q is None else WeightGrid(q.bits, q.symmetric, None if q.group_size == -1 else q.group_size)

    @property
    def sparsity(self) -> Optional[Sparsity]:
        p = self.pruning
        if p is None:
            return None
        return parse_pattern(p.pattern) if p.pattern is not None else 1.0 - p.dense_ratio

    @property
    def needs_hessian(self) -> bool:
        return ((self.quantization is not None and QUANTIZERS[self.quantization.algorithm][0])
                or (self.pruning is not None and PRUNERS[self.pruning.method][0]))

    @property
    def report_mode(self) -> str:
        return "weight-only" if self.quantization is not None else "one-shot pruning"

    def excluded(self, name: str) -> Optional[str]:
        """Why every enabled section leaves layer ``name`` alone, or None when one of them compresses it."""
        reasons = []
        for key, section in (("weight_only_quantization", self.quantization), ("oneshot_pruning", self.pruning)):
            if section is None:
                continue
            hit = excluded_by(section.excluded_modules, name)
            if hit is None:
                return None
            reasons.append(f"{key}.excluded_modules[{hit}] ({section.excluded_modules[hit]!r})")
        return ", ".join(reasons)

    def check_shapes(self, name: str, module: nn.Module) -> None:
        """Every shape error for layer ``name`` (group size, N:M m), before any work."""
        in_features = linear_weight(module).shape[1]
        if self.quantization is not None and self._applies(self.quantization, name):
            check_group_size(in_features, self.grid, f"{SECTIONS.format('weight_only_quantization.group_size')} "
                                                      f"for {name}")
        if self.pruning is not None and self._applies(self.pruning, name):
            check_sparsity(self.sparsity, in_features, f"{SECTIONS.format('oneshot_pruning.pattern')} for {name}")

    def check_tokens(self, name: str, module: nn.Module, tokens: int) -> None:
        """CalibrationError when GPTQ or SparseGPT would run on layer ``name`` with fewer calibration tokens than
        its input width (a rank-deficient Hessian), before any layer is changed."""
        in_features = linear_weight(module).shape[1]
        q, p = self.quantization, self.pruning
        if p is not None and p.method == "sparsegpt" and self._applies(p, name):
            check_enough_tokens(tokens, in_features, name, algorithm="SparseGPT", fallback="use method 'wanda'")
        if q is not None and q.algorithm == "gptq" and self._applies(q, name):
            check_enough_tokens(tokens, in_features, name)

    def compress(self, name: str, module: nn.Module, hessian: Optional[HessianAccumulator]) -> Optional[nn.Module]:
        """Prune and/or quantize ``module`` (layer ``name``): the WeightOnlyLinear that replaces it, or None when it
        was only pruned (its weight then holds the zeros, in its own dtype and layout)."""
        weight = linear_weight(module)
        pruned = self.pruning is not None and self._applies(self.pruning, name)
        if pruned:
            weight = PRUNERS[self.pruning.method][1](weight, hessian, self.sparsity, self.pruning, name)
        if self.quantization is None or not self._applies(self.quantization, name):
            if pruned:
                with torch.no_grad():
                    module.weight.copy_(weight.t() if op_type(module) == "Conv1D" else weight)
            return None
        q, scale, zero, g_idx = QUANTIZERS[self.quantization.algorithm][1](
            weight, hessian, self.grid, self.quantization, pruned, name)
        return WeightOnlyLinear(q, scale, zero, module.bias, self.grid, g_idx, op_type(module))

    def scheme(self, name: str) -> str:
        """What happens to layer ``name``, for the report."""
        parts = []
        if self.pruning is not None and self._applies(self.pruning, name):
            p = self.pruning
            amount = p.pattern if p.pattern is not None else f"{1.0 - p.dense_ratio:.0%} unstructured"
            parts.append(f"pruned {amount} ({p.method})")
        if self.quantization is not None and self._applies(self.quantization, name):
            q = self.quantization
            group = "per channel" if q.group_size == -1 else f"group {q.group_size}"
            parts.append(f"w int{q.bits} {'symmetric' if q.symmetric else 'asymmetric'} {group} ({q.algorithm}), "
                         "a float")
        return " + ".join(parts)

    @staticmethod
    def _applies(section, name: str) -> bool:
        return excluded_by(section.excluded_modules, name) is None
