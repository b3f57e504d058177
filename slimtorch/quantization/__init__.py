"""Post-training quantization: ``quantize()`` builds a QDQ copy of a model (static or dynamic, int8)."""
from .api import quantize
from .qdq import QDQ_MODULES, QDQModule
from .report import QuantizationReport, quantization_report
from .serialization import load_quantized

__all__ = ["quantize", "load_quantized", "quantization_report", "QuantizationReport", "QDQModule", "QDQ_MODULES"]
