"""``export_onnx``: a float or QDQ model to an ONNX file that onnx.checker accepts and ONNX Runtime runs.

Uses torch's TorchScript-based exporter (``dynamo=False``): its custom-op ``symbolic`` hook is how the QDQ modules
write QuantizeLinear/DequantizeLinear (see :mod:`slimtorch.quantization.qdq_onnx`). Before returning, the file is
checked with ``onnx.checker`` and run in ONNX Runtime on ``example_inputs``; its outputs must agree with PyTorch's.
"""
from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..batches import describe, model_device
from ..errors import ExportError, SaturationWarning
from ..quantization.passes import preserved_modes
from ..quantization.qdq import QDQModule
from .cpu_int8 import int8_dot_saturates

# How closely ONNX Runtime must reproduce PyTorch. A float model: relative L2 error 1e-4 (round-off). A QDQ model's
# activations sit on an int8 grid: where round-off (another summation order in ONNX Runtime's kernels) lands a value
# on the other side of a rounding boundary it moves by a whole step, and later layers carry that on. In
# all-MiniLM-L6-v2 a 1e-6 relative change of the embeddings alone moves the int8 model's token states by 4.6%
# (relative L2), so QDQ outputs are compared by the mean cosine of their rows (last axis), which a wrong graph
# (a scale on the wrong axis, a lost zero point) drops far below 0.99 and round-off does not.
QDQ_MIN_MEAN_COSINE = 0.99
FLOAT_TOLERANCE = 1e-4


def export_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, opset: int = 17,
                dynamic_axes: Optional[Dict[str, Dict[int, str]]] = None, input_names: Optional[List[str]] = None,
                output_names: Optional[List[str]] = None, verify: bool = True) -> str:
    """Export ``model`` (float or returned by :func:`slimtorch.quantize`) to ``path``; returns the path.

    ``example_inputs``: a tensor, a tuple (positional inputs) or a dict (keyword inputs). By default the first axis
    of every input is dynamic ("batch"), and the second too ("sequence") for 2-D integer inputs such as token ids.
    ``verify`` runs onnx.checker and ONNX Runtime on the file and compares with PyTorch (:class:`ExportError` if
    they disagree). The model is exported in eval mode; its train/eval state is restored afterwards.
    """
    onnx, ort = _import_onnx()
    if any(getattr(m, "act_granularity", None) == "token" and getattr(m, "dynamic", False) for m in model.modules()):
        warnings.warn("per-token dynamic activations are written as float ops (ONNX QuantizeLinear has no per-row "
                      "scale for 3-D inputs before opset 21): the file is exact but ONNX Runtime runs it no faster "
                      "than the float model; use activation granularity 'per_tensor' for int8 kernels", stacklevel=2)
    if opset < 13:
        raise ExportError(f"opset {opset} is too old: per-channel DequantizeLinear needs opset >= 13 (default 17)")
    args, kwargs, names = _normalise_inputs(model, example_inputs, input_names)
    constants = _cache_off(model, kwargs)
    path = os.fspath(path)
    with preserved_modes(model, "eval"):  # exported in eval mode; every submodule's mode restored after
        with torch.no_grad():
            try:
                expected = model(*args, **kwargs, **constants)
            except Exception as e:
                raise ExportError(f"{type(model).__name__} cannot run on example_inputs {describe(example_inputs)}: "
                                  f"{type(e).__name__}: {e}") from e
        out_names = output_names or _output_names(expected)
        axes = dynamic_axes if dynamic_axes is not None else _default_axes(names, args, kwargs, out_names)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            try:
                target = _Adapter(model, len(args), list(kwargs), constants)
                flat = tuple(args) + tuple(kwargs.values())
                torch.onnx.export(target, flat, path, dynamo=False,
                                  opset_version=opset, input_names=names, output_names=out_names,
                                  dynamic_axes=axes, do_constant_folding=True)
            except Exception as e:
                raise ExportError(f"torch.onnx.export failed for {type(model).__name__} with inputs "
                                  f"{describe(example_inputs)}: {type(e).__name__}: {e}"
                                  f"{_mask_hint(model, kwargs)}") from e
    quantized = any(isinstance(m, QDQModule) for m in model.modules())
    if quantized:
        _share_identical_qdq(onnx, path)
    if verify:
        verify_onnx(path, quantized, args, kwargs, names, expected, onnx=onnx, ort=ort)
    return path


def verify_onnx(path: str, quantized: bool, args, kwargs, names, expected, *, onnx, ort) -> None:
    """onnx.checker, then ONNX Runtime on the example inputs, compared with PyTorch's outputs.

    A QDQ model that differs only with ONNX Runtime's graph optimizations on, on a CPU whose fused uint8 x int8
    kernels saturate (cpu_int8.py), is a warning: the file is right (checked with the optimizations off), this CPU's
    kernels are not exact."""
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as e:
        raise ExportError(f"{path}: onnx.checker rejected the exported model: {e}") from e
    want = _flatten(expected)
    problem = _compare(path, _run_ort(path, names, args, kwargs, ort, optimize=True), want, quantized)
    if problem is None:
        return
    if quantized and int8_dot_saturates():
        exact = _compare(path, _run_ort(path, names, args, kwargs, ort, optimize=False), want, quantized)
        if exact is None:
            warnings.warn(f"{path}: {problem} with ONNX Runtime's graph optimizations on, and agrees with them off. "
                          "This CPU has AVX2/AVX-512 without VNNI: ONNX Runtime's fused uint8 x int8 kernels add "
                          "products in int16 with saturation here, so large activations next to large weights are "
                          "clipped. The file is right and runs as exported on CPUs with VNNI (AVX512-VNNI, AVX-VNNI, "
                          "AMX). To run it exactly on this CPU, quantize activations as int8 (\"activation\": "
                          "{\"dtype\": \"int8\"}), which takes a kernel that does not saturate.", SaturationWarning,
                          stacklevel=3)
            return
        problem = exact
    raise ExportError(f"{path}: {problem}; the file does not compute what the model does. Report this with the model "
                      "and inputs.")


def _run_ort(path: str, names, args, kwargs, ort, *, optimize: bool) -> List[Any]:
    try:
        options = ort.SessionOptions()
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return session.run(None, _feeds(session, names, args, kwargs))
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"{path}: ONNX Runtime cannot run the exported model: {type(e).__name__}: {e}") from e


def _compare(path: str, got: List[Any], want: List[Tensor], quantized: bool) -> Optional[str]:
    """None when ONNX Runtime's outputs ``got`` reproduce PyTorch's ``want``, else what differs."""
    if len(got) != len(want):
        raise ExportError(f"{path}: ONNX Runtime returned {len(got)} outputs, PyTorch {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        w = w.detach().float().cpu()
        g = torch.as_tensor(g).float()
        if g.shape != w.shape:
            raise ExportError(f"{path}: output {i} has shape {tuple(g.shape)} in ONNX Runtime, {tuple(w.shape)} in "
                              "PyTorch")
        if quantized and w.dim() >= 1 and w.shape[-1] > 1:
            cos = float(torch.nn.functional.cosine_similarity(g.reshape(-1, w.shape[-1]), w.reshape(-1, w.shape[-1]),
                                                              dim=1).mean())
            ok, what = cos >= QDQ_MIN_MEAN_COSINE, f"mean cosine {cos:.4f} of its rows (at least {QDQ_MIN_MEAN_COSINE})"
        else:
            err = float(torch.linalg.vector_norm(g - w)) / max(float(torch.linalg.vector_norm(w)), 1e-30)
            ok, what = err <= FLOAT_TOLERANCE, f"relative L2 error {err:.3g} (at most {FLOAT_TOLERANCE})"
        if not ok:
            return f"output {i} differs between ONNX Runtime and PyTorch: {what}"
    return None


class _Adapter(nn.Module):
    """Positional graph inputs -> the model's positional and keyword arguments, plus constant keywords that are not
    graph inputs (``use_cache=False``); the TorchScript exporter traces positionally."""

    def __init__(self, model: nn.Module, positional: int, names: List[str], constants: Dict[str, Any]):
        super().__init__()
        self.model, self.positional, self.names, self.constants = model, positional, names, constants

    def forward(self, *values):
        args, keywords = values[:self.positional], values[self.positional:]
        return self.model(*args, **dict(zip(self.names, keywords)), **self.constants)


def _mask_hint(model: nn.Module, kwargs: Dict[str, Tensor]) -> str:
    """A causal LM exported without an attention mask makes transformers build one with ops the exporter lacks
    (aten::diff, in its packed-sequence check); passing the mask as an input avoids them."""
    if not _cache_off(model, kwargs) or "attention_mask" in kwargs:
        return ""
    return (". A transformers causal LM exports with its attention mask as an input: pass example_inputs="
            "{'input_ids': ids, 'attention_mask': torch.ones_like(ids)}")


def _cache_off(model: nn.Module, kwargs: Dict[str, Tensor]) -> Dict[str, Any]:
    """``{"use_cache": False}`` for a model whose forward takes ``use_cache`` (a transformers causal LM), so that it
    returns no KV-cache object, which an ONNX graph cannot carry; {} otherwise."""
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"use_cache": False} if takes and "use_cache" not in kwargs else {}


def _share_identical_qdq(onnx, path: str) -> None:
    from .graph import drop_identity_casts, share_identical_qdq

    proto = onnx.load(path)
    if drop_identity_casts(proto) + share_identical_qdq(proto):
        onnx.save(proto, path)


def _import_onnx():
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("export_onnx needs the onnx and onnxruntime packages: pip install -e '.[onnx]' in the "
                          "slimtorch checkout (slimtorch is not on PyPI), or pip install onnx onnxruntime") from e
    return onnx, ort


def _normalise_inputs(model: nn.Module, example_inputs: Any,
                      input_names: Optional[List[str]]) -> Tuple[List[Tensor], Dict[str, Tensor], List[str]]:
    device = model_device(model)
    if isinstance(example_inputs, Tensor):
        args, kwargs = [example_inputs], {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = [], dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = list(example_inputs), {}
    else:
        raise ExportError(f"example_inputs must be a tensor, a tuple of tensors (positional) or a dict (keyword), "
                          f"got {type(example_inputs).__name__}")
    for where, value in [(f"example_inputs[{i}]", v) for i, v in enumerate(args)] + \
                        [(f"example_inputs[{k!r}]", v) for k, v in kwargs.items()]:
        if not isinstance(value, Tensor):
            raise ExportError(f"{where} is a {type(value).__name__}; every example input must be a tensor")
    args = [a.to(device) for a in args]
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    if kwargs:
        kwargs = _in_signature_order(model, kwargs)
        names = list(kwargs)
    else:
        names = _positional_names(model, len(args))
    if input_names is not None:
        if len(input_names) != len(names):
            raise ExportError(f"input_names has {len(input_names)} names for {len(names)} example inputs")
        names = list(input_names)
    return args, kwargs, names


def _in_signature_order(model: nn.Module, kwargs: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The exporter feeds keyword inputs in forward()'s parameter order; name the graph inputs in that order."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return kwargs
    unknown = [k for k in kwargs if k not in params]
    if unknown and not any(inspect.signature(model.forward).parameters[p].kind == inspect.Parameter.VAR_KEYWORD
                           for p in params):
        raise ExportError(f"example_inputs has keys {unknown} that {type(model).__name__}.forward() does not take "
                          f"(it takes {params})")
    ordered = [p for p in params if p in kwargs] + [k for k in kwargs if k not in params]
    return {k: kwargs[k] for k in ordered}


def _positional_names(model: nn.Module, n: int) -> List[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) >= n:
        return [p.name for p in params[:n]]
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


def _flatten(out: Any) -> List[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):  # dicts and transformers' ModelOutput: the exporter keeps the non-None values
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    return []


def _output_names(out: Any) -> List[str]:
    if isinstance(out, Mapping):
        names = []
        for k, v in out.items():
            n = len(_flatten(v))
            names += [k] if n == 1 else [f"{k}_{i}" for i in range(n)]
        return names
    n = len(_flatten(out))
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _default_axes(names: Sequence[str], args, kwargs, out_names: Sequence[str]) -> Dict[str, Dict[int, str]]:
    axes: Dict[str, Dict[int, str]] = {}
    for name, t in zip(names, list(args) + list(kwargs.values())):
        if t.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if t.dim() == 2 and not t.is_floating_point():
            axes[name][1] = "sequence"  # token ids, attention masks
    for name in out_names:
        axes[name] = {0: "batch"}
    return axes


def _feeds(session, names, args, kwargs) -> Dict[str, Any]:
    values = list(args) + list(kwargs.values())
    graph_inputs = [i.name for i in session.get_inputs()]
    feeds = {}
    for name, t in zip(names, values):
        if name in graph_inputs:  # an input the graph does not use is dropped by the exporter
            feeds[name] = t.detach().cpu().numpy()
    missing = [n for n in graph_inputs if n not in feeds]
    if missing:
        raise ExportError(f"the exported graph expects inputs {missing} that example_inputs does not give")
    return feeds
