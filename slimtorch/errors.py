"""Every error slimtorch raises on purpose derives from :class:`SlimtorchError`.

A message always says what is wrong, where (config path, module name, shape) and how to fix it. ``SlimError`` is
the base's former name, kept as an alias of the same class, so ``except SlimError`` still catches every error.
"""
from __future__ import annotations


class SlimtorchError(Exception):
    """Base class of slimtorch's own errors."""


#: the former name of :class:`SlimtorchError` (the same class object), kept so ``except SlimError`` still works
SlimError = SlimtorchError


class ConfigError(SlimtorchError, ValueError):
    """A config, or a config that does not fit the model it is applied to."""


class NothingToPruneError(ConfigError):
    """A valid config that selects no layer of the model it is applied to (``slimtorch check`` exits 1 on it)."""


class PatternShapeError(ConfigError):
    """A layer the user named explicitly cannot hold its sparsity pattern (shape does not divide)."""


class LifecycleError(SlimtorchError, RuntimeError):
    """Callbacks used out of order (e.g. after ``finalize()``, or twice per update in hands-free mode)."""


class StateDictError(SlimtorchError, ValueError):
    """A callbacks state_dict that does not belong to these callbacks' model or config."""


class CalibrationError(SlimtorchError, ValueError):
    """Quantization parameters cannot be computed: NaN/inf reached an observer, nothing was observed, bad range."""


class ExportError(SlimtorchError, RuntimeError):
    """A model that cannot be exported to ONNX, or an exported file that fails onnx.checker or ONNX Runtime."""


class EvaluationError(SlimtorchError, RuntimeError):
    """``eval_fn`` raised, or returned something other than one finite number, during accuracy-aware quantization."""


class DistributedError(SlimtorchError, RuntimeError):
    """Ranks that disagree: another pruning plan, masks that drifted apart, or a quantization (config, model,
    calibration error, final state) that differs on one rank; raised on every rank instead of a hang."""


class UnsupportedModelError(SlimtorchError, TypeError):
    """A model wrapper slimtorch cannot prune correctly yet (e.g. FSDP's sharded parameters)."""


class SaturationWarning(UserWarning):
    """An exported int8 model that ONNX Runtime runs inexactly on this CPU (uint8 x int8 kernels without VNNI
    saturate); the file itself is right (``slimtorch.export.cpu_int8``)."""
