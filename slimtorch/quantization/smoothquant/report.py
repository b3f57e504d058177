"""SmoothQuant's result types: a group found by discovery (SmoothGroup), one smoothed (GroupResult), and the report
of a run: the groups smoothed (alpha, scales, activation range before and after) and those skipped."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union


@dataclass
class SmoothGroup:
    """``prev``'s output channels feed the input channels of ``linears``; ``skip_reason`` None means foldable.

    kind: "layernorm" (a norm), "linear" (a Linear/Conv1D) or "none" (no previous op: the Linear is reported only).
    source: "identity" (the Linears read prev's output tensor itself), "pair" (found by trying a Linear -> Linear
    pair through other ops), "explicit" (extra_pairs) or "none".
    """

    prev: str
    kind: str
    linears: List[str]
    source: str = "identity"
    skip_reason: Optional[str] = None


@dataclass
class GroupResult:
    """One smoothed group: the alpha used, the scales and the largest activation |x| before and after."""

    prev: str
    kind: str
    linears: List[str]
    alpha: float
    scale_max: float
    scale_median: float
    act_absmax_before: float
    act_absmax_after: float
    source: str = "identity"


def _short(name: str, ref: str) -> str:
    """``name`` without the dotted prefix it shares with ``ref``."""
    a, b = name.split("."), ref.split(".")
    i = 0
    while i < min(len(a), len(b)) - 1 and a[i] == b[i]:
        i += 1
    return ".".join(a[i:])


@dataclass
class SmoothQuantReport:
    """What one SmoothQuant run did; ``str()`` is a table of the groups smoothed and the reasons others were not."""

    alpha: Union[float, str]
    groups: List[GroupResult] = field(default_factory=list)
    skipped: List[SmoothGroup] = field(default_factory=list)

    def __str__(self) -> str:
        out = [f"SmoothQuant (alpha={self.alpha}): {len(self.groups)} groups smoothed, {len(self.skipped)} skipped"]
        if self.groups:
            w = max(len(g.prev) for g in self.groups)
            out.append(f"{'previous op':<{w}}  {'kind':<9}  {'alpha':>5}  {'s max':>7}  {'s median':>8}  "
                       f"{'act absmax before -> after':>26}  linears")
            out += [f"{g.prev:<{w}}  {g.kind:<9}  {g.alpha:>5.2f}  {g.scale_max:>7.3g}  {g.scale_median:>8.3g}  "
                    f"{g.act_absmax_before:>12.4g} -> {g.act_absmax_after:<10.4g}  "
                    f"{', '.join(_short(n, g.prev) for n in g.linears)}" for g in self.groups]
        if self.skipped:
            out.append("skipped:")
            out += [f"  {g.prev or '(no previous op)'} -> [{', '.join(_short(n, g.prev) for n in g.linears)}]: "
                    f"{g.skip_reason}" for g in self.skipped]
        return "\n".join(out)
