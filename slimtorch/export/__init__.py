"""Export: float and QDQ models to ONNX (QuantizeLinear/DequantizeLinear) for ONNX Runtime and TensorRT."""
from .onnx import export_onnx

__all__ = ["export_onnx"]
