"""What ``quantize()`` did: one row per supported layer (quantized, or left in float and why)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from torch import nn

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


@dataclass
class QuantizationReport:
    """Returned by :func:`slimtorch.quantization_report`; ``str()`` gives a table."""

    mode: str                                   # "static" or "dynamic"
    quantized: List[QuantizedLayer] = field(default_factory=list)
    left_float: List[FloatLayer] = field(default_factory=list)
    folded_batchnorm: List[tuple] = field(default_factory=list)
    smoothquant: Any = None                     # SmoothQuantReport when SmoothQuant ran
    calibration_batches: int = 0
    bias_corrected: List[str] = field(default_factory=list)  # layers whose bias absorbed E[(W - W_q) x]
    seconds: float = 0.0

    def __str__(self) -> str:
        head = (f"slimtorch {self.mode} quantization: {len(self.quantized)} layers quantized, "
                f"{len(self.left_float)} left in float")
        if self.mode == "static":
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
        return "\n".join(lines)


def quantization_report(model: nn.Module) -> QuantizationReport:
    """The report ``quantize()`` attached to ``model`` (the quantized copy it returned)."""
    from ..errors import ConfigError

    report = getattr(model, REPORT_ATTR, None)
    if report is None:
        raise ConfigError(f"{type(model).__name__} was not returned by slimtorch.quantize(); there is no "
                          "quantization report to show")
    return report
