"""Post-training quantization: ``quantize()`` builds a QDQ copy of a model (static or dynamic, int8)."""
from .api import quantize
from .report import QuantizationReport, quantization_report

__all__ = ["quantize", "quantization_report", "QuantizationReport"]
