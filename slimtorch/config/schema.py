"""Typed config: pydantic v2 models with ``extra="forbid"`` and strict types.

Validation lives here and in :mod:`slimtorch.config.loader` (aliases, DeepSpeed sections, error messages);
nothing else in the library re-checks user input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Union

from pydantic import Field, PrivateAttr, field_validator, model_validator

from .base import PathValueError, StrictModel, check_regexes  # noqa: F401  (PathValueError re-exported)
from .patterns import NMPattern, Pattern, parse_pattern
from .quant_schema import CompressionInference
from .structured_schema import (
    STRUCTURED_SECTIONS,
    ChannelPruningConfig,
    HeadPruningConfig,
    RowPruningConfig,
    StructuredSettings,
    resolved_groups,
)

Method = Literal["magnitude", "gradient", "snip", "snip_momentum", "l1"]
DecayType = Literal["exp", "cos", "linear", "cube"]
Scope = Literal["local", "global"]
LayerType = Literal["Linear", "Conv1d", "Conv2d", "Conv1D"]

#: dense_ratio used when neither the group nor shared_parameters sets one and the pattern is a block pattern
#: (DeepSpeed's default). For "N:M" the default is N/M.
DEFAULT_BLOCK_DENSE_RATIO = 0.1

#: methods that follow DeepSpeed's own semantics (docs/config.md, "Whose semantics"): only the modules of
#: different_groups are pruned, unstructured unless ``pattern`` is given, the mask is ranked once at prepare time and
#: applied from start_step, and ``ceil(dense_ratio * n)`` units are kept.
DEEPSPEED_METHODS = ("l1",)

#: max_sparsity_per_layer used by scope "global" with a block pattern when the config sets none: a layer pruned
#: to 100% passes nothing on (its output is its bias), which a global ranking by magnitude can otherwise reach.
DEFAULT_BLOCK_MAX_SPARSITY_PER_LAYER = 0.98


def default_pattern(method: str) -> str:
    """The pattern of a layer whose config states none: DeepSpeed's l1 is unstructured, the others use 4x1 blocks."""
    return "1x1" if method in DEEPSPEED_METHODS else "4x1"


def default_scope(method: str) -> str:
    """snip_momentum ranks globally by default, as DeepSpeed hands it to INC (INC's default); the others locally."""
    return "global" if method == "snip_momentum" else "local"


def _check_pattern(text: Optional[str]) -> Optional[str]:
    if text is not None:
        parse_pattern(text)  # raises ValueError with the accepted forms
    return text


class GroupParams(StrictModel):
    """Keys a ``different_groups`` entry may override; unset keys come from ``shared_parameters``."""

    method: Optional[Method] = None
    pattern: Optional[str] = None
    dense_ratio: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    sparsity_decay_type: Optional[DecayType] = None
    start_step: Optional[int] = Field(default=None, ge=0)
    end_step: Optional[int] = Field(default=None, ge=0)
    frequency: Optional[int] = Field(default=None, ge=1)
    beta: Optional[float] = Field(default=None, ge=0.0, lt=1.0)
    scope: Optional[Scope] = None
    min_sparsity_per_layer: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    max_sparsity_per_layer: Optional[float] = Field(default=None, ge=0.0, le=1.0)

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value):
        return _check_pattern(value)


class SharedPruningParams(GroupParams):
    """``sparse_pruning.shared_parameters``: defaults for every pruned layer."""

    enabled: bool = False
    method: Method = "magnitude"
    # pattern and scope default by method (default_pattern / default_scope), so they stay None when not stated
    sparsity_decay_type: DecayType = "exp"
    start_step: int = Field(default=0, ge=0)
    frequency: int = Field(default=1, ge=1)
    beta: float = Field(default=0.9, ge=0.0, lt=1.0)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    modules: Optional[List[str]] = None
    excluded_modules: List[str] = Field(default_factory=list)
    #: the layer types pruned at all (INC's pruning_op_types); None: every supported type
    op_types: Optional[List[LayerType]] = Field(default=None, min_length=1)

    @field_validator("modules", "excluded_modules")
    @classmethod
    def _valid_regexes(cls, value):
        return check_regexes(value)


class PruningGroup(StrictModel):
    """One ``different_groups`` entry: its own params for the layers its ``modules`` select."""

    params: GroupParams = Field(default_factory=GroupParams)
    modules: List[str] = Field(min_length=1)
    #: layers the group's modules would select but it leaves to shared_parameters (like any layer in no group)
    excluded_modules: List[str] = Field(default_factory=list)
    related_modules: Optional[List[Union[str, List[str]]]] = None

    @field_validator("modules", "excluded_modules")
    @classmethod
    def _valid_regexes(cls, value):
        return check_regexes(value)


@dataclass(frozen=True)
class PruningSettings:
    """The resolved settings of one layer (group keys merged over shared ones, defaults filled in)."""

    method: str
    pattern: Pattern
    dense_ratio: float
    decay: str
    start_step: int
    end_step: int
    frequency: int
    beta: float
    scope: str = "local"
    #: per-layer bounds of a "global" group (final sparsity of each layer); (0, 1) for "local"
    min_sparsity: float = 0.0
    max_sparsity: float = 1.0
    #: DeepSpeed's row/head/channel sections: the unit ("row", "head", "channel") and, for topk, the name of the
    #: learned scores on the layer; None for sparse_pruning
    unit: Optional[str] = None
    scores_attribute: Optional[str] = None

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.dense_ratio

    @property
    def is_global(self) -> bool:
        return self.scope == "global"

    @property
    def learned(self) -> bool:
        """DeepSpeed's topk for rows, heads and channels: the mask is the top-k of trained scores, in forward."""
        return self.method == "topk"

    @property
    def ranks_at_prepare(self) -> bool:
        """DeepSpeed's l1: one mask from the weights at prepare time, keeping ``ceil(dense_ratio * units)``."""
        return self.method in DEEPSPEED_METHODS


class SparsePruningConfig(StrictModel):
    """``compression_training.sparse_pruning``."""

    shared_parameters: SharedPruningParams = Field(default_factory=SharedPruningParams)
    different_groups: Dict[str, PruningGroup] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_resolved(self) -> "SparsePruningConfig":
        self.settings_for(None, "shared_parameters")
        for name in self.different_groups:
            self.settings_for(name, f"different_groups.{name}.params")
        return self

    def unlisted_rule(self) -> Optional[str]:
        """``None`` when shared_parameters prunes the layers that no group selects; else why they stay dense.

        They are pruned only where shared_parameters says how much itself: a ``dense_ratio``, an "N:M" pattern (its
        N/M) or ``modules``. A fallback ratio never prunes a layer nobody listed (DeepSpeed's l1 prunes only its
        groups' modules, and its example configs set dense_ratio in the groups alone).
        """
        shared = self.shared_parameters
        if shared.modules is not None:
            return None
        if shared.method in DEEPSPEED_METHODS:
            return (f"in no different_groups entry: DeepSpeed's '{shared.method}' prunes only the groups' modules "
                    "(set shared_parameters.modules to prune more)")
        if shared.dense_ratio is not None:
            return None
        if shared.pattern is not None and isinstance(parse_pattern(shared.pattern), NMPattern):
            return None
        return ("in no different_groups entry, and shared_parameters states no dense_ratio (or N:M pattern, or "
                "modules) of its own")

    def settings_for(self, group: Optional[str], where: str = "") -> PruningSettings:
        """Merge a group's params over the shared ones and check the combination."""
        shared = self.shared_parameters
        own = self.different_groups[group].params if group is not None else GroupParams()

        def pick(key):
            value = getattr(own, key)
            return getattr(shared, key) if value is None else value

        def origin(key):
            if group is not None and getattr(own, key) is None:
                return f" (inherited from shared_parameters.{key}; set {key} in the group to override it)"
            return ""

        method = pick("method")
        pattern = parse_pattern(pick("pattern") or default_pattern(method))
        dense_ratio = pick("dense_ratio")
        if dense_ratio is None:
            dense_ratio = pattern.min_dense_ratio if isinstance(pattern, NMPattern) else DEFAULT_BLOCK_DENSE_RATIO
        start = pick("start_step")
        end = pick("end_step")
        end = start if end is None else end
        if isinstance(pattern, NMPattern) and dense_ratio < pattern.min_dense_ratio - 1e-12:
            raise PathValueError(
                f"{where}.dense_ratio",
                f"dense_ratio {dense_ratio}{origin('dense_ratio')} is impossible with pattern '{pattern}': it keeps "
                f"{pattern.n} of every {pattern.m} weights, so at least {pattern.min_dense_ratio:g} of them stay. "
                f"Set dense_ratio >= {pattern.min_dense_ratio:g} (a larger value makes only part of the groups "
                f"{pattern}-sparse), or use a block pattern such as '4x1' for higher sparsity",
            )
        if end < start:
            raise PathValueError(
                f"{where}.end_step",
                f"end_step {end}{origin('end_step')} is before start_step {start}{origin('start_step')}; the "
                "schedule runs from start_step to end_step (equal values prune once)",
            )
        if method in DEEPSPEED_METHODS:
            end = start  # DeepSpeed's l1 prunes once, at schedule_offset, with a mask ranked at prepare time
        scope = pick("scope") or default_scope(method)
        if method in DEEPSPEED_METHODS and scope == "global":
            raise PathValueError(
                f"{where}.scope",
                f"method '{method}'{origin('method')} is DeepSpeed's per-layer magnitude pruning, ranked once at "
                "prepare time; it has no global scope. For one magnitude ranking across layers use method "
                "'magnitude' with scope 'global'")
        low, high = self._bounds(scope, pattern, 1.0 - float(dense_ratio), group, where, pick, origin)
        return PruningSettings(
            method=method,
            pattern=pattern,
            dense_ratio=float(dense_ratio),
            decay=pick("sparsity_decay_type"),
            start_step=start,
            end_step=end,
            frequency=pick("frequency"),
            beta=float(pick("beta")),
            scope=scope,
            min_sparsity=low,
            max_sparsity=high,
        )

    def _bounds(self, scope, pattern, target, group, where, pick, origin):
        """(min, max) per-layer sparsity of a group, checked against its target and pattern."""
        own = self.different_groups[group].params if group is not None else self.shared_parameters
        if scope == "local":
            for key in ("min_sparsity_per_layer", "max_sparsity_per_layer"):
                if getattr(own, key) is not None:
                    raise PathValueError(
                        f"{where}.{key}",
                        f"{key} bounds the per-layer sparsity that scope 'global' allocates; with scope 'local'"
                        f"{origin('scope')} every layer gets exactly the target. Set scope to 'global' or remove {key}")
            return 0.0, 1.0
        cap = 1.0 - pattern.min_dense_ratio if isinstance(pattern, NMPattern) else 1.0
        low, high = pick("min_sparsity_per_layer"), pick("max_sparsity_per_layer")
        low = 0.0 if low is None else float(low)
        if high is None:
            high = cap if isinstance(pattern, NMPattern) else DEFAULT_BLOCK_MAX_SPARSITY_PER_LAYER
            note = " (the default)"
        else:
            high, note = float(high), origin("max_sparsity_per_layer")
        if high > cap + 1e-12:
            raise PathValueError(
                f"{where}.max_sparsity_per_layer",
                f"max_sparsity_per_layer {high:g}{note} is above what pattern '{pattern}' can prune in one layer "
                f"({cap:g}: it keeps {pattern.n} of every {pattern.m}); set it to at most {cap:g}")
        if low > high:
            raise PathValueError(
                f"{where}.min_sparsity_per_layer",
                f"min_sparsity_per_layer {low:g}{origin('min_sparsity_per_layer')} is above max_sparsity_per_layer "
                f"{high:g}{note}; no layer can satisfy both")
        if not low - 1e-12 <= target <= high + 1e-12:
            side, key, value = ("below", "min_sparsity_per_layer", low) if target < low else \
                ("above", "max_sparsity_per_layer", high)
            raise PathValueError(
                f"{where}.{key}",
                f"the target sparsity {target:g} (1 - dense_ratio {1 - target:g}) is {side} {key} {value:g}"
                f"{note if key.startswith('max') else origin(key)}: if every layer keeps within the bounds, the "
                f"group cannot reach its target. Move the bound past {target:g} or change dense_ratio")
        return low, high


class CompressionTraining(StrictModel):
    sparse_pruning: Optional[SparsePruningConfig] = None
    row_pruning: Optional[RowPruningConfig] = None
    head_pruning: Optional[HeadPruningConfig] = None
    channel_pruning: Optional[ChannelPruningConfig] = None


class CompressionConfig(StrictModel):
    """What :func:`slimtorch.load_config` returns: the compression sections of a (DeepSpeed) config."""

    compression_training: CompressionTraining = Field(default_factory=CompressionTraining)
    compression_inference: CompressionInference = Field(default_factory=CompressionInference)
    # what the loader read differently from how it was written (a DeepSpeed default, an ignored DeepSpeed key, an
    # INC key's mapping); `slimtorch check` prints them and prepare_pruning logs them
    _notes: tuple = PrivateAttr(default=())

    @property
    def notes(self) -> tuple:
        """Lines saying how the loader read the source where that is not obvious (DeepSpeed defaults, INC keys)."""
        return self._notes

    def with_notes(self, notes) -> "CompressionConfig":
        """This config, carrying ``notes`` (set once, by the loader that read it)."""
        self._notes = tuple(notes)
        return self

    @property
    def sparse_pruning(self) -> Optional[SparsePruningConfig]:
        return self.compression_training.sparse_pruning

    @property
    def pruning_enabled(self) -> bool:
        sp = self.sparse_pruning
        return sp is not None and sp.shared_parameters.enabled

    @property
    def structured_groups(self) -> List[StructuredSettings]:
        """The groups of the enabled row/head/channel pruning sections, resolved."""
        out: List[StructuredSettings] = []
        for name in STRUCTURED_SECTIONS:
            section = getattr(self.compression_training, name)
            if section is not None and section.shared_parameters.enabled:
                out.extend(resolved_groups(name, section))
        return out

    @property
    def has_training_pruning(self) -> bool:
        """Whether the config has any pruning-during-training section (enabled or not)."""
        t = self.compression_training
        return any(getattr(t, name) is not None for name in ("sparse_pruning",) + STRUCTURED_SECTIONS)

    @property
    def prunes_in_training(self) -> bool:
        """Whether an enabled section prunes during training."""
        return self.pruning_enabled or bool(self.structured_groups)

    @property
    def gradient_accumulation_steps(self) -> int:
        """sparse_pruning's gradient_accumulation_steps (1 without that section)."""
        sp = self.sparse_pruning
        return 1 if sp is None else sp.shared_parameters.gradient_accumulation_steps

    @property
    def quantization(self):
        """The enabled quantization section (static or dynamic), or None."""
        return self.compression_inference.active
