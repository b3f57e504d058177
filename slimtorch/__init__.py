"""slimtorch: device-agnostic model compression for PyTorch, configured by DeepSpeed-style JSON."""
from . import deepspeed
from .config import CompressionConfig, load_config
from .errors import (
                     CalibrationError,
                     ConfigError,
                     DistributedError,
                     EvaluationError,
                     ExportError,
                     LifecycleError,
                     PatternShapeError,
                     SaturationWarning,
                     SlimError,
                     SlimtorchError,
                     StateDictError,
                     UnsupportedModelError,
)
from .export import export_onnx
from .llm import load_compressed, oneshot, perplexity, save_compressed
from .posttraining import compress
from .pruning import PruningCallbacks, SparsityReport, prepare_pruning, sparsity_report, whole_parameter
from .quantization import QuantizationReport, load_quantized, quantization_report, quantize
from .saving import load, save
from .slimming import SlimReport, load_slim, save_slim, slim, slim_report

__version__ = "0.1.0"

__all__ = [
    "load_config", "CompressionConfig",
    "prepare_pruning", "PruningCallbacks", "sparsity_report", "SparsityReport", "whole_parameter",
    "compress", "save", "load",
    "quantize", "load_quantized", "quantization_report", "QuantizationReport", "export_onnx",
    "oneshot", "save_compressed", "load_compressed", "perplexity",
    "slim", "slim_report", "SlimReport", "save_slim", "load_slim",
    "SlimtorchError", "SlimError", "ConfigError", "PatternShapeError", "LifecycleError", "StateDictError",
    "CalibrationError", "ExportError", "EvaluationError", "DistributedError", "UnsupportedModelError",
    "SaturationWarning",
    "deepspeed", "__version__",
]
