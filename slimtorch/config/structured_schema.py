"""Typed config of DeepSpeed's structured pruning sections: ``row_pruning``, ``head_pruning``, ``channel_pruning``.

Each removes whole units that :func:`slimtorch.slim` can later cut out of the model:

| section           | unit                                   | layers            | methods (DeepSpeed's default first) |
|-------------------|----------------------------------------|-------------------|-------------------------------------|
| ``row_pruning``   | an output row of a Linear, with its bias | Linear, Conv1D  | l1, topk                            |
| ``head_pruning``  | a head's input columns of the attention output projection | Linear, Conv1D | topk  |
| ``channel_pruning`` | an output channel of a conv, with its bias | Conv2d, Conv1d | l1, topk                        |

``l1`` keeps the ``ceil(dense_ratio * units)`` units of largest L1 norm, ranked once from the weights at prepare time
and applied from ``schedule_offset`` on; ``topk`` learns one score per unit (a trainable parameter the optimizer
updates, straight-through top-k) and masks the units whose scores are not among the top ``ceil(dense_ratio *
units)`` in every forward from ``schedule_offset`` on. Semantics as DeepSpeed 0.19's compression library
(docs/config.md, "DeepSpeed's row, head and channel pruning").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Tuple

from pydantic import Field, field_validator, model_validator

from .base import PathValueError, StrictModel, check_regexes

StructuredMethod = Literal["l1", "topk"]
#: the sections, in the order DeepSpeed's redundancy_clean fixes them
STRUCTURED_SECTIONS = ("row_pruning", "head_pruning", "channel_pruning")
#: DeepSpeed's schedule_offset default for these sections (deepspeed/compression/constants.py)
DEEPSPEED_STRUCTURED_OFFSET_DEFAULT = 1000


@dataclass(frozen=True)
class Technique:
    """What one section prunes: its unit, the layer types it accepts, its default method and the score's name."""

    section: str
    unit: str                       # "row", "head" or "channel"
    layer_types: Tuple[str, ...]    # targets.LAYER_KINDS names
    default_method: str
    methods: Tuple[str, ...]        # the methods DeepSpeed implements for it
    scores_attribute: str           # DeepSpeed's name of the learned scores (topk)


TECHNIQUES: Dict[str, Technique] = {
    "row_pruning": Technique("row_pruning", "row", ("Linear", "Conv1D"), "l1", ("l1", "topk"), "row_mask_scores"),
    "head_pruning": Technique("head_pruning", "head", ("Linear", "Conv1D"), "topk", ("topk",), "head_pruning_scores"),
    "channel_pruning": Technique("channel_pruning", "channel", ("Conv2d", "Conv1d"), "l1", ("l1", "topk"),
                                 "channel_mask_scores"),
}


class StructuredShared(StrictModel):
    """``shared_parameters`` of a row/head/channel section."""

    enabled: bool = False
    method: Optional[StructuredMethod] = None  # None: the section's DeepSpeed default
    schedule_offset: Optional[int] = Field(default=None, ge=0)  # None: DeepSpeed's 1000 (the loader notes it)
    num_heads: Optional[int] = Field(default=None, ge=1)        # head_pruning only


class StructuredGroupParams(StrictModel):
    dense_ratio: float = Field(gt=0.0, le=1.0)


class StructuredGroup(StrictModel):
    """One ``different_groups`` entry: the layers it prunes and, optionally, DeepSpeed's ``related_modules``.

    ``related_modules[i]`` lists the layers that shrink with ``modules[i]`` (the next layer's inputs, a head's q/k/v).
    slimtorch's :func:`~slimtorch.slim` finds those couplings itself by tracing the model; the entries are checked
    to name modules of the model and otherwise only documented.
    """

    params: StructuredGroupParams
    modules: List[str] = Field(min_length=1)
    related_modules: Optional[List[List[str]]] = None

    @field_validator("modules")
    @classmethod
    def _valid_regexes(cls, value):
        return check_regexes(value)

    @model_validator(mode="after")
    def _related_pairs_with_modules(self):
        if self.related_modules is not None:
            if len(self.related_modules) != len(self.modules):
                raise PathValueError(
                    "related_modules",
                    f"related_modules has {len(self.related_modules)} entries but modules has {len(self.modules)}; "
                    "DeepSpeed pairs them by position (related_modules[i] lists the layers that shrink with "
                    "modules[i]), so give one list per modules entry")
            for entry in self.related_modules:
                check_regexes(entry)
        return self


class StructuredPruningSection(StrictModel):
    shared_parameters: StructuredShared = Field(default_factory=StructuredShared)
    different_groups: Dict[str, StructuredGroup] = Field(default_factory=dict)


class RowPruningConfig(StructuredPruningSection):
    @model_validator(mode="after")
    def _check(self):
        return _check_section(self, TECHNIQUES["row_pruning"])


class HeadPruningConfig(StructuredPruningSection):
    @model_validator(mode="after")
    def _check(self):
        return _check_section(self, TECHNIQUES["head_pruning"])


class ChannelPruningConfig(StructuredPruningSection):
    @model_validator(mode="after")
    def _check(self):
        return _check_section(self, TECHNIQUES["channel_pruning"])


def _check_section(section: StructuredPruningSection, technique: Technique) -> StructuredPruningSection:
    shared = section.shared_parameters
    if technique.unit != "head" and shared.num_heads is not None:
        raise PathValueError("shared_parameters.num_heads",
                             f"num_heads belongs to head_pruning; {technique.section} prunes {technique.unit}s")
    if not shared.enabled:
        return section
    method = shared.method or technique.default_method
    if method not in technique.methods:
        raise PathValueError(
            "shared_parameters.method",
            f"DeepSpeed's {technique.section} implements only method {' / '.join(map(repr, technique.methods))} "
            f"(its {technique.unit} pruning raises NotImplementedError for {method!r}); use 'topk', or prune heads "
            "by magnitude with sparse_pruning pattern 'channelx<head width>' on the output projection")
    if technique.unit == "head" and shared.num_heads is None:
        raise PathValueError("shared_parameters.num_heads",
                             "head_pruning needs num_heads, the number of attention heads of the layers it prunes "
                             "(e.g. 12 for BERT-base); each head is in_features / num_heads input columns of the "
                             "output projection")
    if not section.different_groups:
        raise PathValueError("different_groups",
                             f"{technique.section} is enabled but has no different_groups: it prunes only the layers "
                             "its groups' modules select, with each group's params.dense_ratio")
    return section


@dataclass(frozen=True)
class StructuredSettings:
    """One group of a row/head/channel section, resolved."""

    technique: Technique
    group: str
    method: str
    dense_ratio: float
    start_step: int
    num_heads: Optional[int]


def resolved_groups(name: str, section: StructuredPruningSection) -> List[StructuredSettings]:
    """Each group of an enabled section with the shared settings filled in (DeepSpeed's defaults included)."""
    technique = TECHNIQUES[name]
    shared = section.shared_parameters
    method = shared.method or technique.default_method
    offset = DEEPSPEED_STRUCTURED_OFFSET_DEFAULT if shared.schedule_offset is None else shared.schedule_offset
    return [StructuredSettings(technique, gname, method, float(group.params.dense_ratio), offset, shared.num_heads)
            for gname, group in section.different_groups.items()]
