"""Rebuild a quantized model from its state_dict (or a safetensors file) and the float model: no calibration data.

Every QDQ layer writes ``weight_int8``, ``weight_scale``, ``qdq_spec`` (activation scheme) and, when static,
``input_scale``/``input_zero_point`` into the state_dict, so the file alone says which layers are quantized and how.
"""
from __future__ import annotations

import copy
import os
from typing import Dict, Mapping, Union

import torch
from torch import Tensor, nn

from ..errors import StateDictError
from .qdq import decode_spec, qdq_class_for

_SUFFIX = ".weight_int8"


def load_quantized(model: nn.Module, state_dict: Union[Mapping[str, Tensor], str, os.PathLike]) -> nn.Module:
    """A QDQ copy of the float ``model`` holding exactly the tensors of ``state_dict`` (``model`` is unchanged).

    ``state_dict``: what ``quantize(...).state_dict()`` returned, or a path to a ``torch.save``/safetensors file.
    """
    sd = _read(state_dict)
    layers = sorted(k[: -len(_SUFFIX)] for k in sd if k.endswith(_SUFFIX))
    if not layers:
        raise StateDictError("the state_dict holds no slimtorch QDQ layer (no '*.weight_int8' key); it is not the "
                             "state_dict of a model returned by slimtorch.quantize()")
    q = copy.deepcopy(model)
    modules = dict(q.named_modules())
    for name in layers:
        float_module = modules.get(name)
        cls = None if float_module is None else qdq_class_for(float_module)
        if cls is None:
            found = "no such module" if float_module is None else type(float_module).__name__
            raise StateDictError(f"state_dict layer {name!r} is quantized, but {type(model).__name__} has {found} "
                                 "there; pass the float model the quantized one was made from")
        if f"{name}.qdq_spec" not in sd:
            raise StateDictError(f"state_dict layer {name!r} has no qdq_spec (saved by an older slimtorch?)")
        spec = decode_spec(sd[f"{name}.qdq_spec"])
        qparams = None
        if not spec["dynamic"]:
            qparams = (sd[f"{name}.input_scale"], sd[f"{name}.input_zero_point"])
        granularity = "per_channel" if sd[f"{name}.weight_scale"].dim() == 1 else "per_tensor"
        qdq = cls.from_float(float_module, weight_granularity=granularity, act_qparams=qparams, **spec)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else q, child, qdq)
    for name, module in list(modules.items()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{name}.running_mean" not in sd:
            parent, _, child = name.rpartition(".")  # folded into its conv by quantize()
            setattr(modules[parent] if parent else q, child, nn.Identity())
        elif (name not in layers and qdq_class_for(module) is not None and getattr(module, "bias", 0) is None
              and f"{name}.bias" in sd):  # a float (accuracy fallback) conv that BN folding gave a bias
            module.bias = nn.Parameter(torch.empty_like(sd[f"{name}.bias"]), requires_grad=module.weight.requires_grad)
    try:
        q.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise StateDictError(f"the state_dict does not fit {type(model).__name__} once quantized: {e}") from e
    return q


def _read(source) -> Dict[str, Tensor]:
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise StateDictError(f"{path!r} does not exist")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise StateDictError("reading a .safetensors file needs the safetensors package") from e
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
