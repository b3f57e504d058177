"""What ``quantize()`` did: one row per supported layer (quantized, or left in float and why), and what the
accuracy-aware search tried (``report.accuracy``, with ``report.save_plot(path)``: an SVG of layer sensitivities)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

from torch import nn

from .. import plot

REPORT_ATTR = "_slimtorch_quantization_report"


@dataclass(frozen=True)
class QuantizedLayer:
    name: str
    op_type: str
    weight_shape: tuple
    scheme: str          # e.g. "w int8 per_channel, a uint8 asymmetric static (minmax)"
    input_scale: Optional[float] = None
    input_zero_point: Optional[int] = None


@dataclass(frozen=True)
class FloatLayer:
    name: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class LayerSensitivity:
    """How much one layer's quantization costs the model's outputs on the first calibration batches."""

    name: str
    rank: int             # 1 = the most sensitive layer
    sensitivity: float    # error(all quantized) - error(all quantized but this layer)
    error_without: float  # relative output error with only this layer in float


@dataclass(frozen=True)
class Trial:
    """One ``eval_fn`` call on a candidate: the layers it kept in float (most sensitive first) and the metric."""

    float_layers: Tuple[str, ...]
    metric: float
    passed: bool


@dataclass
class AccuracySearch:
    """What the accuracy-aware search did (``report.accuracy``)."""

    criterion: str                  # e.g. "metric >= 0.9405 (baseline 0.95 - 1% relative; higher is better)"
    criterion_source: str           # "config", or the default used because only eval_fn was given
    baseline: float                 # eval_fn(float model)
    threshold: float                # the metric the criterion needs
    final: float                    # eval_fn(returned model)
    met: bool
    eval_calls: int                 # every eval_fn call, the baseline included
    trials: int                     # eval_fn calls on candidates (what max_trials bounds)
    seconds: float                  # baseline + ranking + search
    ranking_seconds: float          # the sensitivity ranking alone (forward passes on calibration batches)
    stopped_because: str            # "criterion met", "max_trials", "timeout" or why no candidate can meet it
    error_quantized: Optional[float] = None  # relative output error of the fully quantized model (ranking batches)
    ranking: List[LayerSensitivity] = field(default_factory=list)   # every quantized layer, model order
    fallback: List[LayerSensitivity] = field(default_factory=list)  # layers put back in float, most sensitive first
    log: List[Trial] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "met" if self.met else f"NOT met (stopped: {self.stopped_because})"
        if self.met and self.stopped_because != "criterion met":  # a bound cut the refinement short
            verdict += f" (search stopped early: {self.stopped_because})"
        return (f"accuracy: {self.criterion}: baseline {self.baseline:.6g}, final {self.final:.6g}, {verdict}; "
                f"{_count(len(self.fallback), 'layer')} in float, {_count(self.eval_calls, 'eval_fn call')}, "
                f"{self.seconds:.1f} s ({self.ranking_seconds:.1f} s ranking)")


@dataclass
class QuantizationReport:
    """Returned by :func:`slimtorch.quantization_report`; ``str()`` gives a table."""

    mode: str                                   # "static", "dynamic" or "weight-only" (slimtorch.oneshot)
    quantized: List[QuantizedLayer] = field(default_factory=list)
    left_float: List[FloatLayer] = field(default_factory=list)
    folded_batchnorm: List[tuple] = field(default_factory=list)
    smoothquant: Any = None                     # SmoothQuantReport when SmoothQuant ran
    calibration_batches: int = 0
    bias_corrected: List[str] = field(default_factory=list)  # layers whose bias absorbed E[(W - W_q) x]
    seconds: float = 0.0
    accuracy: Optional[AccuracySearch] = None   # set when quantize() got eval_fn

    def __str__(self) -> str:
        head = (f"slimtorch {self.mode} quantization: {len(self.quantized)} layers quantized, "
                f"{len(self.left_float)} left in float")
        if self.mode != "dynamic":
            head += f", {self.calibration_batches} calibration batches"
        head += f", {self.seconds:.1f} s"
        rows = [("layer", "op", "weight", "scheme / reason")]
        rows += [(q.name, q.op_type, "x".join(map(str, q.weight_shape)), q.scheme) for q in self.quantized]
        rows += [(f.name, f.op_type, "-", f"float: {f.reason}") for f in self.left_float]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        if self.folded_batchnorm:
            lines.append(f"  BatchNorm folded into the preceding conv: {len(self.folded_batchnorm)}")
        if self.bias_corrected:
            lines.append(f"  bias correction: {len(self.bias_corrected)} layers")
        if self.smoothquant is not None:
            lines.append(str(self.smoothquant))
        if self.accuracy is not None:
            lines.append("  " + self.accuracy.summary())
        return "\n".join(lines)

    def save_plot(self, path: Union[str, os.PathLike]) -> str:
        """Write an SVG bar chart of the per-layer sensitivities (float fallbacks highlighted); returns the path."""
        if self.accuracy is None:
            from ..errors import ConfigError
            raise ConfigError("save_plot(): this report has no accuracy search to plot; call quantize() with "
                              "eval_fn=... (and an accuracy_criterion) to rank layers by sensitivity")
        return os.fspath(plot.write(path, sensitivity_svg(self.accuracy)))


def sensitivity_svg(acc: AccuracySearch) -> str:
    """One bar per ranked layer, in model order: output error(all quantized) - error(this layer in float)."""
    fallback = {r.name for r in acc.fallback}
    bars = [plot.Bar(r.name, r.sensitivity, "#e8710a" if r.name in fallback else "#4e79a7",
                     f"(#{r.rank}){'  float' if r.name in fallback else ''}",
                     f"{r.name}: rank {r.rank}, sensitivity {r.sensitivity:.3g}",
                     "fallback" if r.name in fallback else "")
            for r in acc.ranking]
    verdict = "met" if acc.met else f"not met ({acc.stopped_because})"
    subtitle = (f"{acc.criterion}; baseline {acc.baseline:.6g}, final {acc.final:.6g}; {len(acc.fallback)} of "
                f"{_count(len(acc.ranking), 'layer')} in float; {_count(acc.eval_calls, 'eval_fn call')}; bar: "
                "sensitivity = output error(all quantized) - error(this layer in float); orange = back in float")
    empty = ("no ranking was needed: the fully quantized model meets the criterion" if acc.log and acc.log[0].passed
             else f"no ranking: the search stopped before it was complete ({acc.stopped_because})")
    return plot.bar_chart_svg(f"slimtorch accuracy-aware quantization: criterion {verdict}", bars,
                              value_format="{:.2g}", subtitle=subtitle, empty_text=empty)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def quantization_report(model: nn.Module) -> QuantizationReport:
    """The report ``quantize()`` attached to ``model`` (the quantized copy it returned)."""
    from ..errors import ConfigError

    report = getattr(model, REPORT_ATTR, None)
    if report is None:
        raise ConfigError(f"{type(model).__name__} was not returned by slimtorch.quantize(); there is no "
                          "quantization report to show")
    return report
