"""Which layers a config prunes, with which settings, and why the others are left alone.

Rules (docs/config.md, "Which layers are pruned"): every nn.Linear, nn.Conv1d, nn.Conv2d and transformers Conv1D
is a default target, except the last supported layer in registration order (the head) and layers whose weight is
tied to an embedding. ``modules`` / ``excluded_modules`` entries are regular expressions applied with ``re.search`` to a
layer's full dotted name and to its ancestors' names (a matched module selects its supported descendants);
``excluded_modules`` wins over everything; a layer two groups claim is an error. A layer that no group selects is
pruned only when shared_parameters states its own ``dense_ratio`` (or an "N:M" pattern, or ``modules``), and never
under DeepSpeed's l1, which prunes its groups' modules alone.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..config.patterns import HeadBlocks, HeadPattern
from ..config.schema import PruningSettings, SparsePruningConfig
from ..errors import ConfigError, NothingToPruneError, PatternShapeError
from . import masks
from .access import full_shape, shape_only
from .heads import head_unit_width

SP_PATH = "compression_training.sparse_pruning"


@dataclass
class TargetLayer:
    """A layer that will be pruned: where it is, how to view its weight, and its resolved settings."""

    name: str
    module: nn.Module
    layout: str
    in_per_group: int
    group: Optional[str]
    settings: PruningSettings
    #: BatchNorms whose channels go with this layer's output channels (channel_pruning's related_modules): masked
    #: with them (scale and shift zeroed; topk: outputs masked in forward), as DeepSpeed's redundancy_clean removes them
    followers: List[Tuple[str, nn.Module]] = field(default_factory=list)


@dataclass(frozen=True)
class LeftOut:
    """A supported layer that is not pruned, and the reason."""

    name: str
    reason: str


@dataclass
class TargetPlan:
    layers: List[TargetLayer]
    left_out: List[LeftOut]


@dataclass(frozen=True)
class LayerKind:
    """A supported layer type: which modules it is, how its weight is viewed, and its input channels per group."""

    matches: Callable[[nn.Module], bool]
    layout: str
    in_per_group: Callable[[nn.Module], int]


def _is_transformers_conv1d(module: nn.Module) -> bool:
    # by name, so slimtorch never imports transformers unless the user does
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


#: ``op_types`` name -> the layer type it names
LAYER_KINDS: Dict[str, LayerKind] = {
    "Linear": LayerKind(lambda m: isinstance(m, nn.Linear), masks.LINEAR, lambda m: m.in_features),
    "Conv1d": LayerKind(lambda m: isinstance(m, nn.Conv1d), masks.CONV, lambda m: m.in_channels // m.groups),
    "Conv2d": LayerKind(lambda m: isinstance(m, nn.Conv2d), masks.CONV, lambda m: m.in_channels // m.groups),
    # Conv1D stores [in, out]
    "Conv1D": LayerKind(_is_transformers_conv1d, masks.TRANSPOSED, lambda m: full_shape(m.weight)[0]),
}


def layer_type(module: nn.Module) -> Optional[str]:
    """The ``op_types`` name of a supported layer, ``None`` for anything else."""
    return next((name for name, kind in LAYER_KINDS.items() if kind.matches(module)), None)


def layer_layout(module: nn.Module) -> Optional[Tuple[str, int]]:
    """(layout, input channels per group) for a supported layer, ``None`` for anything else."""
    name = layer_type(module)
    if name is None:
        return None
    kind = LAYER_KINDS[name]
    return kind.layout, kind.in_per_group(module)


def supported_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(name, mod) for name, mod in model.named_modules() if name and layer_layout(mod) is not None]


def _ancestry(name: str) -> List[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _matches(patterns: Sequence[str], name: str) -> Optional[int]:
    """Index of the first pattern that selects ``name`` (itself or an ancestor), else ``None``."""
    chain = _ancestry(name)
    for i, pat in enumerate(patterns):
        if any(re.search(pat, n) for n in chain):
            return i
    return None


def _names_exactly(patterns: Sequence[str], name: str) -> bool:
    """Whether an entry is the layer's literal full name (or that name anchored): a regex such as ``.*`` that merely
    matches everything does not name the head or a tied layer, as INC's ``op_names: [".*"]`` does not either."""
    literal = re.escape(name)
    return any(pat in (name, literal, f"^{name}$", f"^{literal}$") for pat in patterns)


def _default_exclusions(model: nn.Module, layers: List[Tuple[str, nn.Module]]) -> Dict[str, str]:
    reasons: Dict[str, str] = {}
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    for name, mod in layers:
        if id(mod.weight) in embedding_weights:
            reasons[name] = "weight tied to an embedding (name it exactly in a group's modules to prune it)"
    if layers:
        head = layers[-1][0]
        reasons.setdefault(head, "output head: last supported layer (name it exactly in a group's modules to prune it)")
    return reasons


def check_patterns_match(patterns: Sequence[str], all_names: List[str], where: str, warn_only: bool = False) -> None:
    """A ConfigError (or warning) at ``where[i]`` for a pattern that matches no module name, with the closest names."""
    for i, pat in enumerate(patterns):
        if any(re.search(pat, n) for n in all_names):
            continue
        short = sorted({".".join(n.split(".")[-k:]) for n in all_names for k in (1, 2, 3)})
        near = difflib.get_close_matches(pat, short, n=3, cutoff=0.5) or difflib.get_close_matches(
            pat, all_names, n=3, cutoff=0.3)
        hint = (f"closest module names: {', '.join(near)}" if near
                else f"module names look like: {', '.join(all_names[:3])}")
        message = f"{where}[{i}]: {pat!r} matches no module of the model; {hint}"
        if warn_only:
            warnings.warn(f"slimtorch: {message}", stacklevel=4)
        else:
            raise ConfigError(message)


def plan_targets(model: nn.Module, config: SparsePruningConfig) -> TargetPlan:
    """Resolve the config against ``model``: the layers to prune and the supported layers left out."""
    shared = config.shared_parameters
    groups = config.different_groups
    all_names = [n for n, _ in model.named_modules() if n]
    # an exclusion that matches nothing is harmless (DeepSpeed's stock ["classifier", "pooler"] on a model without
    # a pooler): warn with the closest names instead of refusing an existing DeepSpeed config
    check_patterns_match(shared.excluded_modules, all_names, f"{SP_PATH}.shared_parameters.excluded_modules",
                          warn_only=True)
    if shared.modules is not None:
        check_patterns_match(shared.modules, all_names, f"{SP_PATH}.shared_parameters.modules")
    for gname, group in groups.items():
        check_patterns_match(group.modules, all_names, f"{SP_PATH}.different_groups.{gname}.modules")
        check_patterns_match(group.excluded_modules, all_names,
                              f"{SP_PATH}.different_groups.{gname}.excluded_modules", warn_only=True)

    layers = supported_layers(model)
    defaults_out = _default_exclusions(model, layers)
    unlisted = config.unlisted_rule()  # why layers in no group stay dense (None: shared prunes them)
    plan = TargetPlan([], [])
    for name, module in layers:
        excluded = _matches(shared.excluded_modules, name)
        if excluded is not None:
            plan.left_out.append(LeftOut(name, f"excluded_modules[{excluded}] {shared.excluded_modules[excluded]!r}"))
            continue
        if shared.op_types is not None and layer_type(module) not in shared.op_types:
            plan.left_out.append(LeftOut(name, f"{layer_type(module)} is not in shared_parameters.op_types"))
            continue
        claimed = [g for g, grp in groups.items()
                   if _matches(grp.modules, name) is not None and _matches(grp.excluded_modules, name) is None]
        if len(claimed) > 1:
            raise ConfigError(
                f"{SP_PATH}.different_groups: layer {name!r} is matched by groups {claimed[0]!r} and {claimed[1]!r}; "
                "a layer belongs to one group: make their modules patterns disjoint"
            )
        group = claimed[0] if claimed else None
        chosen_by = groups[group].modules if group else shared.modules
        if group is None and shared.modules is not None and _matches(shared.modules, name) is None:
            plan.left_out.append(LeftOut(name, "not selected by shared_parameters.modules"))
            continue
        if name in defaults_out and not (chosen_by and _names_exactly(chosen_by, name)):
            plan.left_out.append(LeftOut(name, defaults_out[name]))
            continue
        if group is None and unlisted is not None:
            plan.left_out.append(LeftOut(name, unlisted))
            continue
        settings = config.settings_for(group)
        layout, in_per_group = layer_layout(module)
        matrix = masks.to_matrix(shape_only(module.weight), layout)  # shapes only: the weight may be sharded
        if isinstance(settings.pattern, HeadPattern):
            width, why = head_unit_width(model, name, matrix.shape[1])
            if width is None:
                where = f"different_groups.{group}" if group else "shared_parameters"
                raise PatternShapeError(f"{SP_PATH}.{where}.pattern: 'head' on {name!r} (weight "
                                        f"{tuple(full_shape(module.weight))}): {why}")
            settings = dataclasses.replace(settings, pattern=HeadBlocks(None, width))
        problem = masks.fit_problem(settings.pattern, matrix.shape[0], matrix.shape[1], in_per_group)
        if problem:
            where = f"different_groups.{group}.modules" if group else "shared_parameters.modules"
            if chosen_by and _names_exactly(chosen_by, name):
                raise PatternShapeError(
                    f"{SP_PATH}.{where}: layer {name!r} (weight {tuple(full_shape(module.weight))}) cannot hold its "
                    f"pattern: {problem}. Choose a pattern that divides its shape or remove it from {where}"
                )
            plan.left_out.append(LeftOut(name, f"shape does not fit: {problem}"))
            continue
        plan.layers.append(TargetLayer(name, module, layout, in_per_group, group, settings))
    _check_groups_used(plan, config)
    if not plan.layers:
        reasons = sorted({lo.reason for lo in plan.left_out}) or ["the model has no Linear, Conv1d, Conv2d or Conv1D"]
        raise NothingToPruneError(f"{SP_PATH}: the config prunes no layer of this model ({'; '.join(reasons)}). Give "
                          "shared_parameters a dense_ratio to prune the default targets, or list layers in "
                          "different_groups")
    return plan


def describe_plan(plan: TargetPlan, config: SparsePruningConfig) -> List[str]:
    """Lines saying which layers each group prunes and which supported layers stay dense, and why."""
    lines = []
    owners = [None] + list(config.different_groups)
    for owner in owners:
        chosen = [t.name for t in plan.layers if t.group == owner]
        if owner is None and not chosen:
            continue
        label = "shared_parameters" if owner is None else f"different_groups.{owner}"
        s = config.settings_for(owner)
        lines.append(f"{label} prunes {len(chosen)} layer{'s' * (len(chosen) != 1)} ({s.method} {s.pattern}, "
                     f"sparsity {s.target_sparsity:.1%}, {s.scope}): {', '.join(chosen)}")
    for lo in plan.left_out:
        lines.append(f"dense: {lo.name}: {lo.reason}")
    return lines


def _check_groups_used(plan: TargetPlan, config: SparsePruningConfig) -> None:
    used = {layer.group for layer in plan.layers}
    for gname, group in config.different_groups.items():
        if gname in used:
            continue
        why = [f"{lo.name}: {lo.reason}" for lo in plan.left_out if _matches(group.modules, lo.name) is not None]
        detail = "; ".join(why) if why else "its modules contain no Linear, Conv1d, Conv2d or Conv1D layer"
        raise ConfigError(f"{SP_PATH}.different_groups.{gname}.modules: the group selects no layer to prune ({detail})")
