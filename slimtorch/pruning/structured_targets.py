"""Which layers DeepSpeed's ``row_pruning``, ``head_pruning`` and ``channel_pruning`` sections prune, and how.

Module selection is DeepSpeed's: each ``modules`` entry is a regular expression searched (``re.search``) in every
layer's full name; a layer matched by two groups of one section is an error (DeepSpeed raises too), and so is a
layer claimed by two sections (slimtorch keeps one mask per layer). Each selected layer becomes a
:class:`~.targets.TargetLayer` whose settings say what DeepSpeed does:

| section / method  | pattern                    | mask, from ``schedule_offset`` on                              |
|-------------------|----------------------------|----------------------------------------------------------------|
| row, channel l1   | ``1xchannel`` (whole rows) | the largest L1 norms of the weights at prepare time            |
| row, channel topk | ``1xchannel``              | the top-k of learned scores, in every forward                  |
| head topk         | ``channelx<in/num_heads>`` | a head's input columns of the output projection, learned       |
"""
from __future__ import annotations

import re
from typing import Dict, List

from torch import nn

from ..config.patterns import BlockPattern
from ..config.schema import CompressionConfig, PruningSettings
from ..config.structured_schema import StructuredSettings
from ..errors import ConfigError, PatternShapeError, SlimError
from . import learned
from .access import full_shape, shape_only
from .targets import (
    LeftOut,
    TargetLayer,
    TargetPlan,
    check_patterns_match,
    describe_plan,
    layer_layout,
    layer_type,
    masks,
    plan_targets,
)


def plan_structured(model: nn.Module, config: CompressionConfig) -> TargetPlan:
    """The layers of the enabled row/head/channel sections (none when no such section is enabled)."""
    plan = TargetPlan([], [])
    all_names = [n for n, _ in model.named_modules() if n]
    modules = dict(model.named_modules())
    for settings in config.structured_groups:
        section = getattr(config.compression_training, settings.technique.section)
        group = section.different_groups[settings.group]
        where = f"compression_training.{settings.technique.section}.different_groups.{settings.group}"
        check_patterns_match(group.modules, all_names, f"{where}.modules")
        for i, related in enumerate(group.related_modules or []):
            check_patterns_match(related, all_names, f"{where}.related_modules[{i}]")
        chosen = [n for n in all_names if any(re.search(p, n) for p in group.modules)]
        selected = 0
        for name in chosen:
            module = modules[name]
            kind = layer_type(module)
            if kind is None:
                continue  # a container whose name matches (DeepSpeed skips them too); its layers match on their own
            if kind not in settings.technique.layer_types:
                other = "channel_pruning" if kind in ("Conv2d", "Conv1d") else "row_pruning or head_pruning"
                raise ConfigError(f"{where}.modules: {name!r} is a {kind}; {settings.technique.section} prunes "
                                  f"{' / '.join(settings.technique.layer_types)} layers. Use {other} for it, or "
                                  "narrow the modules pattern")
            plan.layers.append(_target(name, module, settings, where))
            selected += 1
        if not selected:
            raise ConfigError(f"{where}.modules: the group selects no "
                              f"{' / '.join(settings.technique.layer_types)} layer of the model")
        if settings.technique.unit == "channel":
            _pair_batchnorms(plan.layers[-selected:], group, modules, all_names, where)
    _refuse_claimed_twice(plan.layers)
    return plan


def _pair_batchnorms(targets: List[TargetLayer], group, modules: Dict[str, nn.Module], all_names: List[str],
                     where: str) -> None:
    """The BatchNorms of ``related_modules`` follow the pruned convs' channels. DeepSpeed pairs them by position:
    ``related_modules[i]`` goes with ``modules[i]``, and the j-th BatchNorm a related pattern matches takes the
    mask of the j-th layer ``modules[i]`` matches (one BatchNorm per conv, or one pattern for all of them in
    order); the widths must agree."""
    for i, related in enumerate(group.related_modules or []):
        entry = [t for t in targets if re.search(group.modules[i], t.name)]
        for j, pattern in enumerate(related):
            norms = [n for n in all_names
                     if re.search(pattern, n) and isinstance(modules[n], nn.modules.batchnorm._BatchNorm)]
            if not norms:
                continue  # convs and linears reading the channels: slim() finds and narrows them itself
            if len(norms) != len(entry):
                raise ConfigError(
                    f"{where}.related_modules[{i}][{j}]: {pattern!r} matches {len(norms)} BatchNorm layers "
                    f"({', '.join(norms[:4])}) but modules[{i}] {group.modules[i]!r} prunes {len(entry)} "
                    f"({', '.join(t.name for t in entry[:4])}); DeepSpeed pairs related_modules[i] with modules[i] "
                    "by position, so they must match one to one (give one modules entry per conv with its "
                    "BatchNorm, or patterns that match the convs and their BatchNorms in the same order)")
            for target, name in zip(entry, norms):
                conv, norm = target.module, modules[name]
                channels = full_shape(conv.weight)[0]
                if norm.num_features != channels:
                    raise ConfigError(
                        f"{where}.related_modules[{i}][{j}]: {name!r} ({norm.num_features} channels) is paired with "
                        f"{target.name!r} ({channels} output channels) by position; they must have the "
                        "same width. Reorder or narrow the patterns")
                target.followers.append((name, norm))


def _target(name: str, module: nn.Module, s: StructuredSettings, where: str) -> TargetLayer:
    layout, in_per_group = layer_layout(module)
    if s.technique.unit == "head":
        width = masks.to_matrix(shape_only(module.weight), layout).shape[1]
        if width % s.num_heads:
            raise PatternShapeError(
                f"{where}: {name!r} has {width} input features, not a multiple of num_heads {s.num_heads}; "
                "head_pruning's modules are the attention output projections (whose inputs are the heads side by "
                "side); check num_heads and the modules pattern")
        pattern = BlockPattern(None, width // s.num_heads)
    else:
        pattern = BlockPattern(1, None)
    settings = PruningSettings(
        method=s.method, pattern=pattern, dense_ratio=s.dense_ratio, decay="exp", start_step=s.start_step,
        end_step=s.start_step, frequency=1, beta=0.9, unit=s.technique.unit,
        scores_attribute=s.technique.scores_attribute if s.method == "topk" else None)
    return TargetLayer(name, module, layout, in_per_group, f"{s.technique.section}.{s.group}", settings)


def _refuse_claimed_twice(layers: List[TargetLayer]) -> None:
    seen: Dict[str, str] = {}
    for t in layers:
        if t.name in seen:
            raise ConfigError(
                f"compression_training: layer {t.name!r} is selected by {seen[t.name]} and by {t.group}; slimtorch "
                "keeps one pruning mask per layer, so make the modules patterns disjoint")
        seen[t.name] = t.group


def merge_plans(sparse: TargetPlan, structured: TargetPlan) -> TargetPlan:
    """sparse_pruning's plan plus the structured sections' layers; a layer in both is an error."""
    taken = {t.name: t.group or "sparse_pruning.shared_parameters" for t in sparse.layers}
    for t in structured.layers:
        if t.name in taken:
            raise ConfigError(
                f"compression_training: layer {t.name!r} is pruned by sparse_pruning ({taken[t.name]}) and by "
                f"{t.group}; slimtorch keeps one pruning mask per layer: exclude it from one of them "
                "(sparse_pruning's excluded_modules, or the other section's modules)")
    names = {t.name for t in structured.layers}
    left_out = [lo for lo in sparse.left_out if lo.name not in names]
    return TargetPlan(sparse.layers + structured.layers, left_out)


def attach_learned_scores(model: nn.Module, config: CompressionConfig) -> List[nn.Parameter]:
    """Register the topk scores on their layers now, before an engine or the Trainer builds its optimizer from
    ``model.parameters()`` (DeepSpeed's ``init_compression`` also runs before its engine); prepare finds and uses
    them. Returns them; an invalid plan returns none (prepare raises the error later, on every rank)."""
    try:
        plan = plan_structured(model, config)
    except SlimError:
        return []
    return [learned.for_target(t).scores for t in plan.layers if t.settings.learned]


def plan_training(model: nn.Module, config: CompressionConfig) -> TargetPlan:
    """Every layer the enabled pruning-during-training sections prune (sparse_pruning and row/head/channel)."""
    sparse = plan_targets(model, config.sparse_pruning) if config.pruning_enabled else TargetPlan([], [])
    return merge_plans(sparse, plan_structured(model, config))


def describe_training(plan: TargetPlan, config: CompressionConfig) -> List[str]:
    """What :func:`plan_training` chose, one line per group, then the layers left dense."""
    lines = describe_plan(plan, config.sparse_pruning) if config.pruning_enabled else []
    structured = describe_structured(plan)
    dense_at = next((i for i, line in enumerate(lines) if line.startswith("dense: ")), len(lines))
    return lines[:dense_at] + structured + lines[dense_at:]


def describe_structured(plan: TargetPlan) -> List[str]:
    """One line per structured group: its method, unit and layers."""
    by_group: Dict[str, List[TargetLayer]] = {}
    for t in plan.layers:
        if t.settings.unit is not None:
            by_group.setdefault(t.group, []).append(t)
    lines = []
    for group, layers in by_group.items():
        s = layers[0].settings
        lines.append(f"{group} prunes {len(layers)} layer{'s' * (len(layers) != 1)} ({s.method} {s.unit}s, keeping "
                     f"{s.dense_ratio:g} of them from step {s.start_step}): {', '.join(t.name for t in layers)}")
    return lines


__all__ = ["plan_structured", "plan_training", "merge_plans", "describe_training", "describe_structured", "LeftOut"]
