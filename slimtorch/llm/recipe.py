"""What :func:`slimtorch.oneshot` does to each Linear, read from the config: prune it (SparseGPT, Wanda, magnitude),
quantize it (weight-only int4/int8 by RTN or GPTQ; or W8A8 int8/FP8), or both, in that order, so that pruned zeros
stay zeros (GPTQ leaves them out of its updates and every grid maps 0 to exactly 0).

:class:`Recipe` holds the enabled sections; :meth:`Recipe.compress` turns one Linear's float weight and (when an
algorithm needs them) its inputs' Hessian and range into the layer that replaces it. The scale migration that runs
before (AWQ, SmoothQuant) is migration.py's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config.patterns import parse_pattern
from ..config.quant_schema import OneShotPruning, W8A8Quantization, WeightOnlyQuantization
from ..errors import CalibrationError
from ..quantization.grid import (
    WeightGrid,
    check_group_size,
    float8_dtype,
    quantize_per_channel,
    quantize_rtn,
    symmetric_scale,
)
from ..quantization.observers import Observer, observer_for
from ..quantization.qdq import op_type
from ..quantization.selection import excluded_by
from ..quantization.smoothquant.scales import linear_weight
from .gptq import HessianAccumulator, check_enough_tokens, gptq_quantize
from .modules import W8A8Linear, WeightOnlyLinear
from .sparsegpt import (
    Columns,
    Sparsity,
    check_sparsity,
    magnitude_prune,
    prune_columns,
    sparsegpt_prune,
    wanda_prune,
)

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
    if isinstance(target, Columns):
        return prune_columns(weight, hessian.hessian, target, "sparsegpt", dampening=section.sparsegpt.dampening,
                             where=where)
    return sparsegpt_prune(weight, hessian.hessian, target, dampening=section.sparsegpt.dampening,
                           block_size=section.sparsegpt.block_size, where=where)


def _wanda(weight: Tensor, hessian: Optional[HessianAccumulator], target: Sparsity, section: OneShotPruning,
           where: str) -> Tensor:
    if isinstance(target, Columns):
        return prune_columns(weight, hessian.hessian, target, "wanda", where=where)
    return wanda_prune(weight, hessian.hessian, target, where=where)


def _magnitude(weight: Tensor, hessian: Optional[HessianAccumulator], target: Sparsity, section: OneShotPruning,
               where: str) -> Tensor:
    if isinstance(target, Columns):
        return prune_columns(weight, None, target, "magnitude", where=where)
    return magnitude_prune(weight, target, where=where)


#: weight-only algorithm -> (needs the inputs' Hessian, quantize one weight)
QUANTIZERS: Dict[str, Tuple[bool, Callable[..., Quantized]]] = {"rtn": (False, _rtn), "gptq": (True, _gptq)}
#: one-shot pruning method -> (needs the inputs' Hessian, prune one weight)
PRUNERS: Dict[str, Tuple[bool, Callable[..., Tensor]]] = {
    "sparsegpt": (True, _sparsegpt), "wanda": (True, _wanda), "magnitude": (False, _magnitude)}


#: int8 W8A8 weights for GPTQ: the grid's int8, one scale per output channel (what RTN's W8A8 weights get too)
INT8_PER_CHANNEL = WeightGrid(8, True, None)


@dataclass
class Recipe:
    """The enabled ``oneshot_pruning``, ``weight_only_quantization`` and ``w8a8_quantization`` sections (at least
    one; weight-only and W8A8 exclude each other)."""

    quantization: Optional[WeightOnlyQuantization]
    pruning: Optional[OneShotPruning]
    w8a8: Optional[W8A8Quantization] = None

    @property
    def sections(self) -> Dict[str, object]:
        """Config key -> enabled section, in the order they act on a Linear."""
        pairs = (("oneshot_pruning", self.pruning), ("weight_only_quantization", self.quantization),
                 ("w8a8_quantization", self.w8a8))
        return {k: v for k, v in pairs if v is not None}

    @property
    def blocks(self) -> Optional[str]:
        return next((s.blocks for s in self.sections.values() if s.blocks), None)

    @property
    def blocks_key(self) -> str:
        """The config path of the ``blocks`` key errors should name: the one set, else the first enabled section's."""
        sections = self.sections
        key = next((k for k, s in sections.items() if s.blocks), next(iter(sections)))
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
        if p.columns:
            return Columns(1.0 - p.dense_ratio)
        return parse_pattern(p.pattern) if p.pattern is not None else 1.0 - p.dense_ratio

    @property
    def needs_hessian(self) -> bool:
        return ((self.quantization is not None and QUANTIZERS[self.quantization.algorithm][0])
                or (self.pruning is not None and PRUNERS[self.pruning.method][0])
                or (self.w8a8 is not None and self.w8a8.algorithm == "gptq"))

    @property
    def needs_input_ranges(self) -> bool:
        """Static activations: each Linear's input max |x| over the calibration tokens gives its scale."""
        return self.w8a8 is not None and self.w8a8.activations == "static_per_tensor"

    def input_observer(self) -> Observer:
        """A fresh observer of one Linear's inputs for static activation scales (``w8a8_quantization.observer``)."""
        return observer_for(self.w8a8.observer, percentile=self.w8a8.percentile)

    @property
    def needs_data(self) -> bool:
        """Whether any step reads calibration activations (Hessians, input ranges, AWQ or SmoothQuant scales);
        RTN, dynamic W8A8/FP8 with RTN, and magnitude pruning do not."""
        return self.needs_hessian or self.needs_input_ranges or self.awq or self.smoothquant

    @property
    def awq(self) -> bool:
        return self.quantization is not None and self.quantization.awq.enabled

    @property
    def smoothquant(self) -> bool:
        return self.w8a8 is not None and self.w8a8.smoothquant.enabled

    @property
    def report_mode(self) -> str:
        if self.w8a8 is not None:
            return f"w8a8 {self.w8a8.format}"
        return "weight-only" if self.quantization is not None else "one-shot pruning"

    def check_runtime(self) -> None:
        """What the torch build must offer (a float8 dtype for FP8), before any work."""
        if self.w8a8 is not None and self.w8a8.format == "fp8_e4m3":
            float8_dtype()

    def excluded(self, name: str) -> Optional[str]:
        """Why every enabled section leaves layer ``name`` alone, or None when one of them compresses it."""
        reasons = []
        for key, section in self.sections.items():
            if self._applies(section, name):
                return None
            hit = excluded_by(section.excluded_modules, name)
            reasons.append(f"{key}.excluded_modules[{hit}] ({section.excluded_modules[hit]!r})" if hit is not None
                           else f"not in {key}.modules")
        return ", ".join(reasons)

    def quantizes(self, name: str) -> bool:
        """Whether a quantization section (weight-only or W8A8) rounds layer ``name``."""
        section = self.quantization or self.w8a8
        return section is not None and self._applies(section, name)

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
        p = self.pruning
        if p is not None and p.method == "sparsegpt" and self._applies(p, name):
            check_enough_tokens(tokens, in_features, name, algorithm="SparseGPT", fallback="use method 'wanda'")
        for section in (self.quantization, self.w8a8):
            if section is not None and section.algorithm == "gptq" and self._applies(section, name):
                check_enough_tokens(tokens, in_features, name)

    def compress(self, name: str, module: nn.Module, hessian: Optional[HessianAccumulator],
                 input_absmax: Optional[Tensor] = None) -> Optional[nn.Module]:
        """Prune and/or quantize ``module`` (layer ``name``): the WeightOnlyLinear or W8A8Linear that replaces it,
        or None when it was only pruned (its weight then holds the zeros, in its own dtype and layout).
        ``input_absmax``: the largest |x| of its calibration inputs the observer keeps (static W8A8 activations)."""
        weight = linear_weight(module)
        pruned = self.pruning is not None and self._applies(self.pruning, name)
        if pruned:
            weight = PRUNERS[self.pruning.method][1](weight, hessian, self.sparsity, self.pruning, name)
        if self.w8a8 is not None and self._applies(self.w8a8, name):
            return self._w8a8(name, module, weight, hessian, input_absmax, pruned)
        if self.quantization is None or not self._applies(self.quantization, name):
            if pruned:
                with torch.no_grad():
                    module.weight.copy_(weight.t() if op_type(module) == "Conv1D" else weight)
            return None
        q, scale, zero, g_idx = QUANTIZERS[self.quantization.algorithm][1](
            weight, hessian, self.grid, self.quantization, pruned, name)
        return WeightOnlyLinear(q, scale, zero, module.bias, self.grid, g_idx, op_type(module))

    def _w8a8(self, name: str, module: nn.Module, weight: Tensor, hessian: Optional[HessianAccumulator],
              input_absmax: Optional[Tensor], pruned: bool) -> W8A8Linear:
        section = self.w8a8
        fmt = section.format
        if section.algorithm == "gptq":
            q, scale, _, _ = _gptq(weight, hessian, INT8_PER_CHANNEL, section, pruned, name)
        else:
            q, scale = quantize_per_channel(weight, fmt, where=name)
        input_scale = None
        if section.activations == "static_per_tensor":
            if input_absmax is None:
                raise CalibrationError(f"{name} received no calibration input, so its static activation scale is "
                                       "unknown; exclude it with excluded_modules")
            input_scale = symmetric_scale(input_absmax.reshape(1), fmt)
        return W8A8Linear(q, scale, module.bias, fmt, input_scale, op_type(module))

    def scheme(self, name: str) -> str:
        """What happens to layer ``name``, for the report."""
        parts = []
        if self.pruning is not None and self._applies(self.pruning, name):
            p = self.pruning
            amount = (str(self.sparsity) if p.columns else p.pattern if p.pattern is not None
                      else f"{1.0 - p.dense_ratio:.0%} unstructured")
            parts.append(f"pruned {amount} ({p.method})")
        if self.quantization is not None and self._applies(self.quantization, name):
            q = self.quantization
            group = "per channel" if q.group_size == -1 else f"group {q.group_size}"
            parts.append(f"w int{q.bits} {'symmetric' if q.symmetric else 'asymmetric'} {group} "
                         f"({'awq + ' if q.awq.enabled else ''}{q.algorithm}), a float")
        if self.w8a8 is not None and self._applies(self.w8a8, name):
            w = self.w8a8
            act = "per token, dynamic" if w.activations == "dynamic_per_token" else f"per tensor, static ({w.observer})"
            parts.append(f"w {w.format} per channel ({w.algorithm}), a {w.format} {act}")
        return " + ".join(parts)

    @staticmethod
    def _applies(section, name: str) -> bool:
        if excluded_by(section.excluded_modules, name) is not None:
            return False
        modules = getattr(section, "modules", None)  # oneshot_pruning may name the layers it prunes
        return not modules or excluded_by(modules, name) is not None
