"""Every error slimtorch raises on purpose derives from :class:`SlimError`.

A message always says what is wrong, where (config path, module name, shape) and how to fix it.
"""
from __future__ import annotations


class SlimError(Exception):
    """Base class of slimtorch's own errors."""


class ConfigError(SlimError, ValueError):
    """A config, or a config that does not fit the model it is applied to."""


class NothingToPruneError(ConfigError):
    """A valid config that selects no layer of the model it is applied to (``slimtorch check`` exits 1 on it)."""


class PatternShapeError(ConfigError):
    """A layer the user named explicitly cannot hold its sparsity pattern (shape does not divide)."""


class LifecycleError(SlimError, RuntimeError):
    """Callbacks used out of order (e.g. after ``finalize()``, or twice per update in hands-free mode)."""


class StateDictError(SlimError, ValueError):
    """A callbacks state_dict that does not belong to these callbacks' model or config."""


class CalibrationError(SlimError, ValueError):
    """Quantization parameters cannot be computed: NaN/inf reached an observer, nothing was observed, bad range."""


class ExportError(SlimError, RuntimeError):
    """A model that cannot be exported to ONNX, or an exported file that fails onnx.checker or ONNX Runtime."""


class EvaluationError(SlimError, RuntimeError):
    """``eval_fn`` raised, or returned something other than one finite number, during accuracy-aware quantization."""


class DistributedError(SlimError, RuntimeError):
    """Ranks that disagree: another pruning plan, masks that drifted apart, or a quantization (config, model,
    calibration error, final state) that differs on one rank; raised on every rank instead of a hang."""


class UnsupportedModelError(SlimError, TypeError):
    """A model wrapper slimtorch cannot prune correctly yet (e.g. FSDP's sharded parameters)."""
