"""``slim()``: a pruned model's removed rows, channels and heads cut out, leaving a smaller dense model whose outputs
equal the masked model's.

1. trace the model on the example input (:mod:`.trace`): the coupled groups and what cannot be removed, and why;
2. read each removable group's pruned units from its producers' zero rows (:mod:`.units`);
3. measure, on the example input, what each removed unit still carries into its consumers (a bias through an
   activation, a BatchNorm shift): it must be the same for every token and position; it is folded into the
   consumer's bias, so removing the unit is exact;
4. cut the producers' rows, the followers' channels and the consumers' columns (:mod:`.surgery`); attention
   modules get their new head counts;
5. check the slim model's outputs against the masked model's on the example input, then measure both.

Memory: the user's model is deep-copied (twice its size held) unless ``inplace``; the trace holds the exported
graph's metadata (shapes, not activations); the constants are measured in one forward pass that keeps each
consumer's input (one activation per consumer call, on the example input).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..errors import LifecycleError, SlimtorchError, UnsupportedModelError
from ..pruning import registry
from . import measure, surgery
from .trace import Analysis, Group, analyze
from .units import UnitPlan, pruned_units, rounded, zero_inputs

REPORT_ATTR = "_slimtorch_slim_report"

#: attributes of attention modules that count heads, or query/key/value widths, updated when heads go
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KV_HEAD_COUNTS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_HEAD_WIDTHS = ("all_head_size", "inner_dim")


@dataclass
class SlimmedGroup:
    producers: List[str]
    consumers: List[str]
    followers: List[str]
    unit: str            # "channel" or "head of N" / "key/value group of N heads x D"
    units_before: int
    units_after: int


@dataclass
class SlimReport:
    """What ``slim()`` removed and what it gained, measured on the example input."""

    groups: List[SlimmedGroup] = field(default_factory=list)
    refused: Dict[str, str] = field(default_factory=dict)   # a producer with zero rows -> why they stay
    parameters_before: int = 0
    parameters_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    latency_before_s: Optional[float] = None
    latency_after_s: Optional[float] = None
    max_relative_difference: float = 0.0
    slower_layers: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"slimtorch slim: {len(self.groups)} group(s) cut; outputs vs the masked model: max relative "
                 f"difference {self.max_relative_difference:.2e}",
                 "| | before | after | ratio |", "|---|---|---|---|",
                 f"| parameters | {self.parameters_before:,} | {self.parameters_after:,} | "
                 f"{self.parameters_after / max(1, self.parameters_before):.3f} |",
                 f"| MACs | {self.macs_before:,} | {self.macs_after:,} | "
                 f"{self.macs_after / max(1, self.macs_before):.3f} |"]
        if self.latency_before_s is not None and self.latency_after_s is not None:
            lines.append(f"| latency ms (median) | {1e3 * self.latency_before_s:.2f} | "
                         f"{1e3 * self.latency_after_s:.2f} | {self.latency_after_s / self.latency_before_s:.3f} |")
        lines += ["", "| producers | unit | before | after |", "|---|---|---|---|"]
        lines += [f"| {', '.join(g.producers)} | {g.unit} | {g.units_before} | {g.units_after} |"
                  for g in self.groups]
        for name, why in self.refused.items():
            lines.append(f"kept: {name} has zero rows, not removable: {why}")
        for name in self.slower_layers:
            lines.append(f"slower after slimming: {name}")
        return "\n".join(lines)


def slim(model: nn.Module, example_inputs: Any, *, round_to: int = 1, rtol: float = 1e-5,
         measure_latency: bool = True) -> nn.Module:
    """A smaller dense copy of ``model`` with its pruned output channels, FFN units and attention heads removed
    (and what reads them narrowed), computing what ``model`` computes on ``example_inputs`` within ``rtol``.

    ``example_inputs``: a tensor, a tuple of positional arguments or a dict of keyword arguments; the trace, the
    check and the latency use it. ``round_to``: keep channel widths at a multiple of this many channels (some
    pruned channels then stay, as zeros). ``model`` is not changed; finalize its pruning callbacks first.
    :func:`slim_report` of the result tells what was cut and what it gained.
    """
    if registry.is_active(model):
        raise LifecycleError(f"{type(model).__name__} is still being pruned: its masks may change and its zeros "
                             "are not final; call finalize() on its PruningCallbacks before slim()")
    if round_to < 1:
        raise SlimtorchError(f"round_to must be a positive number of channels, got {round_to}")
    example_inputs = _without_cache(model, example_inputs)
    target = copy.deepcopy(model).eval()
    with torch.no_grad():
        reference = measure.output_tensors(measure.call(target, example_inputs))
    analysis = analyze(target, example_inputs)
    modules = dict(target.named_modules())
    report = SlimReport(parameters_before=measure.parameters(target), macs_before=measure.macs(target, example_inputs))
    plans = _plans(analysis, modules, round_to, report)
    if not plans:
        raise UnsupportedModelError(_nothing_removable(analysis, modules, report))
    _fold_constants(target, plans, example_inputs)
    for plan in plans:
        _cut(target, plan)
        report.groups.append(_summary(plan))
    with torch.no_grad():
        result = measure.output_tensors(measure.call(target, example_inputs))
    report.max_relative_difference = _difference(result, reference)
    if report.max_relative_difference > rtol:
        raise SlimtorchError(f"the slim model's outputs differ from the masked model's by "
                             f"{report.max_relative_difference:.2e} (relative, more than rtol {rtol:g}) on the example "
                             "input: a coupling slimtorch did not see; the model is left as it was")
    report.parameters_after = measure.parameters(target)
    report.macs_after = measure.macs(target, example_inputs)
    if measure_latency:
        report.latency_before_s = measure.median_seconds(lambda: measure.call(model, example_inputs))
        report.latency_after_s = measure.median_seconds(lambda: measure.call(target, example_inputs))
        report.slower_layers = _slower_layers(model, target, plans, example_inputs)
    setattr(target, REPORT_ATTR, report)
    return target


def _without_cache(model: nn.Module, example_inputs: Any) -> Any:
    """Keyword inputs with ``use_cache=False`` where the forward takes it and it is not set: a KV cache in the
    outputs would carry the key and value projections out of the model, and their heads could not go."""
    if isinstance(example_inputs, dict) and "use_cache" not in example_inputs and \
            "use_cache" in inspect.signature(model.forward).parameters:
        return {**example_inputs, "use_cache": False}
    return example_inputs


def slim_report(model: nn.Module) -> SlimReport:
    """The report :func:`slim` attached to the model it returned."""
    report = getattr(model, REPORT_ATTR, None)
    if report is None:
        raise SlimtorchError(f"{type(model).__name__} was not returned by slimtorch.slim(): no slimming report")
    return report


# -- steps ----------------------------------------------------------------------------------------------------
def _plans(analysis: Analysis, modules: Dict[str, nn.Module], round_to: int, report: SlimReport) -> List[UnitPlan]:
    plans = []
    for group in analysis.groups:
        if group.reason is not None:
            for space in group.producers:
                if bool(surgery.zero_rows(surgery.linear_view(modules[space.module])).any()):
                    report.refused[space.module] = group.reason
            continue
        plan = pruned_units(group, modules)
        if plan.refused is not None:
            for space in group.producers:
                if bool(surgery.zero_rows(surgery.linear_view(modules[space.module])).any()):
                    report.refused[space.module] = plan.refused
            continue
        if group.head_dim is None:
            plan = rounded(plan, round_to)
        if plan.removed and not plan.kept:  # keep one unit: a width-0 layer exports and runs nowhere well
            plan = UnitPlan(group, plan.removed[:-1])
        if plan.removed:
            plans.append(plan)
    return plans


def _nothing_removable(analysis: Analysis, modules: Dict[str, nn.Module], report: SlimReport) -> str:
    refused = "; ".join(f"{name}: {why}" for name, why in list(report.refused.items())[:4])
    removable = [g for g in analysis.groups if g.reason is None]
    return ("nothing to remove: no removable group has a pruned unit (a unit goes when its rows are zero in every "
            "layer of its group, or its input columns in every layer that reads it; "
            f"{len(removable)} removable groups, e.g. "
            f"{', '.join(s.module for s in removable[0].producers) if removable else 'none'})"
            + (f". Zero rows that cannot go: {refused}" if refused else "")
            + ". Prune whole units on the layers that read them (sparse_pruning pattern 'channelx1' on FFN output "
              "projections and convs, 'head' on attention output projections; or DeepSpeed's row_pruning, "
              "head_pruning, channel_pruning), then finalize() the callbacks")


def _consumer_channel_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.modules.conv._ConvNd) else -1


def _fold_constants(target: nn.Module, plans: List[UnitPlan], example_inputs: Any) -> None:
    """Fold what the removed units carry into each consumer's bias (measured: it must not vary)."""
    names = sorted({name for plan in plans for name, _ in plan.group.consumers})
    with measure.captured_inputs(target, names) as seen, torch.no_grad():
        measure.call(target, example_inputs)
    for plan in plans:
        for name, _ in plan.group.consumers:
            consumer = target.get_submodule(name)
            width = surgery.input_width(consumer)
            dropped = plan.channels(width, keep=False)
            dropped = dropped[~zero_inputs(consumer)[dropped]]  # columns the consumer never reads carry nothing
            if dropped.numel() == 0:
                continue
            values, spread = measure.constant_channels(seen[name], dropped, _consumer_channel_dim(consumer))
            if spread > 1e-5:
                raise UnsupportedModelError(
                    f"{name}: the {len(plan.removed)} pruned units of {plan.group.producers[0].module} still carry "
                    f"values that vary with the input into it (relative spread {spread:.1e}), so removing them would "
                    "change the outputs; the layers between them (a BatchNorm, a bias) must be pruned with them")
            if not bool(values.any()):
                continue
            if isinstance(consumer, nn.modules.conv._ConvNd):
                if any(p != 0 for p in _padding(consumer)) and consumer.weight[0, 0].numel() > 1:
                    raise UnsupportedModelError(
                        f"{name}: the pruned channels carry a constant into a padded convolution, whose zero padding "
                        "makes the constant's effect position-dependent; prune the BatchNorm before it with them")
                weight = consumer.weight.detach().flatten(2).sum(-1)  # a constant input sees every kernel weight
                shift = weight[:, dropped.to(weight.device)].float() @ values.to(weight.device)
                with torch.no_grad():
                    if consumer.bias is None:
                        consumer.bias = nn.Parameter(torch.zeros(consumer.out_channels, dtype=consumer.weight.dtype,
                                                                 device=consumer.weight.device))
                    consumer.bias.add_(shift.to(consumer.bias.dtype))
            else:
                surgery.fold_constant_inputs(consumer, dropped, values)


def _narrowed(module: nn.Module, keep_out=None, keep_in=None) -> nn.Module:
    if surgery.is_transposed_linear(module):
        return surgery.shrink_transposed_linear(module, keep_out=keep_out, keep_in=keep_in)
    if isinstance(module, nn.Linear):
        return surgery.shrink_linear(module, keep_out=keep_out, keep_in=keep_in)
    return surgery.shrink_conv(module, keep_out=keep_out, keep_in=keep_in)


def _padding(conv: nn.modules.conv._ConvNd):
    padding = conv.padding
    if isinstance(padding, str):
        return (0,) if padding == "valid" else (1,)
    return padding


def _cut(target: nn.Module, plan: UnitPlan) -> None:
    group = plan.group
    for space in group.producers:
        module = target.get_submodule(space.module)
        target.set_submodule(space.module, _narrowed(module, keep_out=plan.channels(space.channels)))
    for name, op in group.followers:
        module = target.get_submodule(name)
        width = module.num_features if op == "batch_norm" else module.out_channels
        keep = plan.channels(width)
        target.set_submodule(name, surgery.shrink_batchnorm(module, keep) if op == "batch_norm"
                             else surgery.shrink_conv(module, keep_out=keep))
    for name, _ in group.consumers:
        module = target.get_submodule(name)
        target.set_submodule(name, _narrowed(module, keep_in=plan.channels(surgery.input_width(module))))
    if group.head_dim is not None:
        _update_head_counts(target, plan)


def _update_head_counts(target: nn.Module, plan: UnitPlan) -> None:
    """Set the head counts and widths stored on the attention module (the producers' common parent)."""
    group = plan.group
    ratio_kept = len(plan.kept) / group.units
    # the projections' parent (BERT's self-attention) and the parent of projections and output (Llama's attention)
    parents = {_common_parent([s.module for s in group.producers]),
               _common_parent([s.module for s in group.producers] + [m for m, _ in group.consumers])}
    for parent in parents:
        module = target.get_submodule(parent)
        for attr in _HEAD_COUNTS + _KV_HEAD_COUNTS + _HEAD_WIDTHS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(module, attr, round(value * ratio_kept))


def _common_parent(names: List[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _slower_layers(model: nn.Module, target: nn.Module, plans: List[UnitPlan], example_inputs: Any) -> List[str]:
    """The narrowed layers that run slower than before on their own inputs from the example (median of timed
    runs; 5% and 5 microseconds of slack for the machine's noise), each with both timings."""
    names = sorted({n for p in plans for n in [s.module for s in p.group.producers] +
                    [m for m, _ in p.group.consumers] + [m for m, _ in p.group.followers]})
    with measure.captured_inputs(model, names) as before, measure.captured_inputs(target, names) as after, \
            torch.no_grad():
        measure.call(model, example_inputs)
        measure.call(target, example_inputs)
    slower = []
    for name in names:
        if not before[name] or not after[name]:
            continue
        old, new = model.get_submodule(name), target.get_submodule(name)
        t_old = measure.median_seconds(lambda: old(before[name][0]), repeats=10, warmup=2)
        t_new = measure.median_seconds(lambda: new(after[name][0]), repeats=10, warmup=2)
        if t_new > 1.05 * t_old + 5e-6:
            slower.append(f"{name}: {1e6 * t_old:.0f} -> {1e6 * t_new:.0f} us")
    return slower


def _summary(plan: UnitPlan) -> SlimmedGroup:
    group = plan.group
    if group.head_dim is None:
        unit = "channel"
    else:
        q_heads = max(s.channels for s in group.producers) // group.head_dim
        per = q_heads // group.units
        unit = f"head of {group.head_dim}" if per == 1 else f"key/value head + {per} query heads of {group.head_dim}"
    return SlimmedGroup([s.module for s in group.producers], [m for m, _ in group.consumers],
                        [m for m, _ in group.followers], unit, group.units, len(plan.kept))


def _difference(result: List[torch.Tensor], reference: List[torch.Tensor]) -> float:
    if len(result) != len(reference):
        return float("inf")
    worst = 0.0
    for a, b in zip(result, reference):
        if a.shape != b.shape:
            return float("inf")
        scale = float(b.abs().max()) or 1.0
        worst = max(worst, float((a.float() - b.float()).abs().max()) / scale)
    return worst


__all__ = ["slim", "slim_report", "SlimReport", "SlimmedGroup", "Group"]
