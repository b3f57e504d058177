"""``sparsity_report(model)``: a per-layer table of shape, pattern, sparsity and whether the pattern holds."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from torch import nn

from ..config.patterns import NMPattern
from . import masks
from .access import whole
from .distributed import unwrap
from .registry import is_active, learned_masks_of, plan_of, pruned_layers_of
from .targets import layer_layout, supported_layers


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple
    pattern: Optional[str]          # None: not pruned by slimtorch
    target_sparsity: Optional[float]
    sparsity: float                 # fraction of exact zeros in the weight
    pattern_valid: Optional[bool]   # None: no pattern to check
    note: str                       # group, or why the layer is left dense
    scope: Optional[str] = None     # "local" / "global" for pruned layers
    bounds: Optional[tuple] = None  # (min, max) per-layer sparsity of a global group


class SparsityReport:
    """Rows of :class:`LayerReport`; ``str()`` gives a table, ``rows`` / ``as_dicts()`` the data."""

    def __init__(self, rows: List[LayerReport]):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> LayerReport:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def as_dicts(self) -> List[Dict]:
        return [asdict(r) for r in self.rows]

    @property
    def pruned(self) -> List[LayerReport]:
        return [r for r in self.rows if r.pattern is not None]

    def overall_sparsity(self) -> float:
        """Zeros over weights, across the pruned layers."""
        total = sum(_numel(r.shape) for r in self.pruned)
        zeros = sum(r.sparsity * _numel(r.shape) for r in self.pruned)
        return zeros / total if total else 0.0

    def __str__(self) -> str:
        header = ("layer", "shape", "pattern", "target", "sparsity", "valid", "note")
        body = [
            (r.name, "x".join(map(str, r.shape)), r.pattern or "-",
             "-" if r.target_sparsity is None else f"{r.target_sparsity:.1%}" + (" (group)" if r.bounds else ""),
             f"{r.sparsity:.1%}",
             "-" if r.pattern_valid is None else ("yes" if r.pattern_valid else "NO"), r.note)
            for r in self.rows
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        lines.append(f"overall sparsity of pruned layers: {self.overall_sparsity():.1%} "
                     f"({len(self.pruned)} of {len(self.rows)} layers pruned)")
        return "\n".join(lines)

    __repr__ = __str__

    def save_plot(self, path) -> "Path":
        """Write an SVG bar chart of each layer's sparsity (target and per-layer bounds marked); returns the path."""
        from .. import plot

        colors = {"global": "#4C78A8", "local": "#72B7B2", None: "#BBBBBB"}
        bars = [plot.Bar(r.name, r.sparsity, colors[r.scope],
                         "" if r.bounds is None else f"bounds {r.bounds[0]:.0%}-{r.bounds[1]:.0%}")
                for r in self.rows]
        targets = sorted({r.target_sparsity for r in self.pruned if r.target_sparsity is not None})
        markers = [plot.Marker(t, f"target {t:.1%}") for t in targets[:3]]
        scopes = sorted({r.scope for r in self.pruned})
        subtitle = (f"overall {self.overall_sparsity():.1%} of the pruned layers' weights; scope "
                    f"{'/'.join(scopes) or '-'}; grey: not pruned")
        return plot.write(path, plot.bar_chart_svg("slimtorch sparsity per layer", bars, x_max=1.0,
                                                   markers=markers, subtitle=subtitle))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Per-layer sparsity of every Linear / Conv1d / Conv2d / Conv1D of ``model`` (under FSDP2 and ZeRO-3 a
    collective: call it on every rank).

    For layers pruned by slimtorch (active or finalized callbacks) it also gives the pattern, the final target and
    whether the pattern holds: on the live mask while callbacks are active, else on the weights' zeros (a kept
    block then must hold no exact zero). Layers left dense say why.
    """
    model = unwrap(model)
    plan = plan_of(model)
    targets = {t.name: t for t in plan.layers} if plan else {}
    left_out = {lo.name: lo.reason for lo in plan.left_out} if plan else {}
    live = pruned_layers_of(model)  # whole masks fetched per layer below: one layer whole at a time
    learned = learned_masks_of(model)
    plan_is_active = is_active(model)
    rows = []
    for name, module in supported_layers(model):
        weight = whole(module.weight)  # FSDP2, ZeRO-3: gathered (every rank must call the report)
        sparsity = (weight == 0).sum().item() / weight.numel() if weight.numel() else 0.0
        target = targets.get(name)
        if target is None:
            rows.append(LayerReport(name, tuple(weight.shape), None, None, sparsity, None,
                                    left_out.get(name, "not targeted")))
            continue
        layout, _ = layer_layout(module)
        if name in learned:  # topk: masked in forward, so the report shows the mask's sparsity, not the weights'
            kept = learned[name]
            rows.append(LayerReport(name, tuple(weight.shape), str(target.settings.pattern),
                                    target.settings.target_sparsity, 1.0 - kept.sum().item() / kept.numel(),
                                    masks.pattern_holds(masks.to_matrix(kept, layout), target.settings.pattern),
                                    f"{_note(target)}; topk mask applied in forward, zeros written at finalize()",
                                    target.settings.scope, None))
            continue
        mask = live[name].full_mask() if name in live else None
        if mask is None and plan_is_active:
            rows.append(LayerReport(name, tuple(weight.shape), str(target.settings.pattern),
                                    target.settings.target_sparsity, sparsity, None,
                                    f"not pruned yet (schedule starts at step {target.settings.start_step})",
                                    target.settings.scope, _bounds(target.settings)))
            continue
        kept = (weight != 0) if mask is None else mask.to(weight.device)
        settings = target.settings
        partial_nm = isinstance(settings.pattern, NMPattern) and settings.dense_ratio > settings.pattern.min_dense_ratio
        valid = masks.pattern_holds(masks.to_matrix(kept, layout), settings.pattern, dense_groups_allowed=partial_nm)
        if mask is not None:  # the live mask must also be what the weights show
            valid = valid and not bool((weight[~kept] != 0).any())
        rows.append(LayerReport(name, tuple(weight.shape), str(target.settings.pattern),
                                target.settings.target_sparsity, sparsity, valid, _note(target),
                                settings.scope, _bounds(settings)))
    return SparsityReport(rows)


def _note(target) -> str:
    where = f"group {target.group}" if target.group else "shared_parameters"
    s = target.settings
    if not s.is_global:
        return where
    return f"{where}, global (layer bounds {s.min_sparsity:.0%}-{s.max_sparsity:.0%})"


def _bounds(settings) -> Optional[tuple]:
    return (settings.min_sparsity, settings.max_sparsity) if settings.is_global else None
