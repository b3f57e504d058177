"""Save a model compressed by :func:`slimtorch.oneshot` as a Hugging Face directory in the compressed-tensors format,
which transformers loads (with the ``compressed-tensors`` package installed; vLLM reads the same format but is not
tested here); :func:`load_compressed` reads such a directory back as slimtorch modules (the integers stay
integers).

What is written, per quantized Linear (the ``pack-quantized`` format, packed by the ``compressed-tensors`` library):

| tensor              | dtype / shape                            | holds                                              |
|---------------------|------------------------------------------|----------------------------------------------------|
| ``weight_packed``   | int32 [out, in * bits / 32]              | the integers, ``32 / bits`` per int32              |
| ``weight_scale``    | float32 [out, groups]                    | one scale per (output row, group)                  |
| ``weight_shape``    | int64 [2]                                | ``[out, in]``                                      |

W8A8 layers (:class:`~slimtorch.llm.modules.W8A8Linear`) are written in the ``int-quantized`` (int8) or
``float-quantized`` (FP8 E4M3) format: ``weight`` (int8 / float8_e4m3fn [out, in]), ``weight_scale`` (float32
[out, 1]) and, for static activations, ``input_scale`` (float32 [1]); the config group's ``input_activations`` say
per token and dynamic, or per tensor and static. These are the layer's own buffers, written as they are.

Every other tensor (embeddings, norms, lm_head, biases) is written as the model holds it, and ``config.json`` gains a
``quantization_config`` (``quant_method: "compressed-tensors"``) built with the library's own pydantic models: one
config group targeting ``Linear``, the Linears left float listed in ``ignore``.

compressed-tensors stores signed integers (int4 in [-8, 7]); slimtorch's symmetric grid is the same grid, so the
integers are written unchanged and the loaded model computes exactly what the slimtorch model computes.

Not written (each an error that says so): asymmetric grids (compressed-tensors 0.20 packs their zero points on save,
but transformers 5.25 expects them unpacked on load and refuses the checkpoint), GPT-2's Conv1D layers
(compressed-tensors compresses ``nn.Linear`` only), and column permutations (``weight_g_idx``).

Memory: the model's tensors are referenced, not copied; the packed integers add ``bits / 32`` of an int32 per weight.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..loaded_quantizer import saving_as_float
from ..quantization.grid import WeightGrid
from .modules import W8A8Linear, WeightOnlyLinear

#: the tensors of WeightOnlyLinear that compressed-tensors' tensors replace
_SLIMTORCH_TENSORS = ("weight_int", "weight_scale", "weight_zero", "weight_g_idx")


def save_compressed(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write ``model`` (a transformers model returned by :func:`slimtorch.oneshot`) to ``directory`` with
    ``save_pretrained``, its quantized Linears in compressed-tensors' ``pack-quantized`` format; returns the path.

    ``AutoModelForCausalLM.from_pretrained(directory)`` loads it back where ``compressed-tensors`` is installed.
    The model is not changed.
    """
    try:
        import compressed_tensors
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise ConfigError("save_compressed needs the compressed-tensors package: pip install -e '.[llm]' in the "
                          "slimtorch checkout, or pip install compressed-tensors") \
            from None
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        raise ConfigError(f"save_compressed writes a transformers model (with save_pretrained and a config); got "
                          f"{type(model).__name__}")
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, (WeightOnlyLinear, W8A8Linear))}
    if not quantized:
        raise ConfigError(f"{type(model).__name__} holds no quantized layer; compress it with slimtorch.oneshot "
                          "first (model.save_pretrained saves a float model)")
    scheme = _one_scheme(quantized)
    if isinstance(next(iter(quantized.values())), W8A8Linear):
        return _save(model, model.state_dict(), quantized, scheme, directory, compressed_tensors.__version__)
    _check_writable(model, quantized)

    state = {}
    for key, tensor in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf in _SLIMTORCH_TENSORS:
            continue
        state[key] = tensor
    for name, layer in quantized.items():
        state[f"{name}.weight_packed"] = pack_to_int32(layer.weight_int.to(torch.int8), layer.bits)
        state[f"{name}.weight_scale"] = layer.weight_scale
        state[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
    return _save(model, state, quantized, scheme, directory, compressed_tensors.__version__)


def _save(model: nn.Module, state: Dict[str, torch.Tensor], quantized: Dict[str, nn.Module], scheme: tuple,
          directory: Union[str, Path], version: str) -> Path:
    directory = Path(directory)
    with saving_as_float(model):
        model.save_pretrained(directory, state_dict=state)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = _quantization_config(model, quantized, scheme, version)
    config["quantization_config"]["sparsity_config"] = _sparsity_config(config["quantization_config"]["ignore"],
                                                                        quantized)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def _stored_weight(m: nn.Module) -> torch.Tensor:
    return m.weight if isinstance(m, W8A8Linear) else m.weight_int


def _sparsity_config(ignore: List[str], quantized: Dict[str, nn.Module]) -> dict:
    """compressed-tensors' sparsity metadata (format "dense": the zeros are stored as they are) when every quantized
    layer holds exact 2:4 zeros, the structure runtimes accelerate; else {} (no claim)."""
    from compressed_tensors.config import SparsityCompressionConfig

    zeros = total = 0
    for m in quantized.values():
        nonzero = _stored_weight(m).to(torch.float32) != 0  # the zero point is 0: symmetric grids only are written
        if nonzero.shape[1] % 4 or not bool((nonzero.reshape(nonzero.shape[0], -1, 4).sum(-1) <= 2).all()):
            return {}
        zeros += int((~nonzero).sum())
        total += nonzero.numel()
    config = SparsityCompressionConfig.load_from_registry("dense", sparsity_structure="2:4", targets=["Linear"],
                                                          ignore=ignore, global_sparsity=zeros / max(total, 1))
    return config.model_dump(exclude={"registry_requires_subclass"})


def _scheme_of(m: nn.Module) -> tuple:
    if isinstance(m, W8A8Linear):
        return ("w8a8", m.format, m.dynamic)
    return (m.bits, m.symmetric, m.group_size)


def _one_scheme(quantized: Dict[str, nn.Module]):
    schemes = {_scheme_of(m) for m in quantized.values()}
    if len(schemes) > 1:
        raise ConfigError(f"the model mixes weight schemes {sorted(schemes, key=str)} (bits, symmetric, group); "
                          "save_compressed writes one config group: compress the model with one scheme")
    return schemes.pop()


def _check_writable(model: nn.Module, quantized: Dict[str, nn.Module]) -> None:
    first, layer = next(iter(quantized.items()))
    if isinstance(layer, W8A8Linear):
        _check_linear_only(model, quantized)
        return
    if not layer.symmetric:
        raise ConfigError(
            f"{first}: asymmetric weights cannot be saved in the compressed-tensors format yet: compressed-tensors "
            "0.20 packs their zero points on save and transformers 5.25 refuses them on load; quantize with "
            "symmetric: true, or keep the model in memory")
    permuted = [name for name, m in quantized.items() if m.weight_g_idx is not None]
    if permuted:
        raise ConfigError(f"{permuted[0]} holds a column permutation (weight_g_idx); save_compressed writes groups of "
                          "consecutive columns only")
    _check_linear_only(model, quantized)


def _check_linear_only(model: nn.Module, quantized: Dict[str, nn.Module]) -> None:
    conv1d = [name for name, m in quantized.items() if m.source_op == "Conv1D"]
    if conv1d:
        raise UnsupportedModelError(
            f"{conv1d[0]} was a transformers Conv1D (GPT-2 style, weight stored [in, out]); compressed-tensors "
            f"saves nn.Linear only, so {type(model).__name__} cannot be written in its format")


def _quantization_config(model: nn.Module, quantized: Dict[str, nn.Module], scheme, version: str) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    activations = None
    if scheme[0] == "w8a8":
        _, fmt, dynamic = scheme
        kind = "float" if fmt == "fp8_e4m3" else "int"
        weights = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="channel")
        activations = QuantizationArgs(num_bits=8, type=kind, symmetric=True, dynamic=dynamic,
                                       strategy="token" if dynamic else "tensor")
        format_name = f"{kind}-quantized"
    else:
        bits, symmetric, group_size = scheme
        weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                                   strategy="channel" if group_size is None else "group", group_size=group_size)
        format_name = "pack-quantized"
    ignore: List[str] = [name for name, m in model.named_modules()
                         if isinstance(m, nn.Linear) and name not in quantized]
    group = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
    config = QuantizationConfig(config_groups={"group_0": group}, format=format_name,
                                quantization_status="compressed", ignore=ignore)
    return {"version": version, "quant_method": "compressed-tensors", "sparsity_config": {}, "transform_config": {},
            **config.model_dump(exclude={"quant_method"})}


def load_compressed(directory: Union[str, Path], *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM saved in ``directory`` by :func:`save_compressed` (or any compressed-tensors checkpoint with one
    config group of symmetric int4/int8 pack-quantized weights, or of int8/FP8 W8A8), its quantized Linears rebuilt
    as :class:`~slimtorch.llm.modules.WeightOnlyLinear` / :class:`~slimtorch.llm.modules.W8A8Linear` holding the
    saved integers (FP8 values) and scales; the other tensors in ``dtype``. Memory: the float model is built first
    (random init), then the quantized layers replace its Linears.
    """
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    grid = _saved_grid(raw.get("quantization_config"), directory)  # a format name for W8A8 checkpoints
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    state: Dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    if isinstance(grid, str):
        _rebuild_w8a8(model, state, grid)
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        shape = [int(v) for v in state.pop(f"{name}.weight_shape")]
        q = unpack_from_int32(state.pop(key), grid.bits, torch.Size(shape))
        scale = state.pop(f"{name}.weight_scale").to(torch.float32)
        bias = state.pop(f"{name}.bias", None)
        layer = WeightOnlyLinear(q, scale, torch.zeros_like(scale, dtype=torch.int32), bias, grid)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied and not k.startswith(tuple(f"{n}." for n in _quantized(model)))]
    if missing or unexpected:
        raise ConfigError(f"{directory}: the checkpoint does not match {type(model).__name__}: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model


def _rebuild_w8a8(model: nn.Module, state: Dict[str, torch.Tensor], fmt: str) -> None:
    """Every Linear saved with a ``weight_scale`` becomes a W8A8Linear of its saved tensors (popped from ``state``)."""
    for key in [k for k in state if k.endswith(".weight_scale")]:
        name = key[: -len(".weight_scale")]
        layer = W8A8Linear(state.pop(f"{name}.weight"), state.pop(key), state.pop(f"{name}.bias", None), fmt,
                           state.pop(f"{name}.input_scale", None))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def _quantized(model: nn.Module) -> List[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (WeightOnlyLinear, W8A8Linear))]


def _saved_w8a8(group: dict, format_name: str, directory: Path) -> str:
    weights, activations = group.get("weights") or {}, group.get("input_activations") or {}
    kind = "float" if format_name == "float-quantized" else "int"
    expected = (8, kind, True, "channel")
    found = (weights.get("num_bits"), weights.get("type"), weights.get("symmetric"), weights.get("strategy"))
    if found != expected or activations.get("num_bits") != 8 or activations.get("type") != kind or (
            activations.get("strategy"), activations.get("dynamic")) not in (("token", True), ("tensor", False)):
        raise ConfigError(f"{directory}: load_compressed reads {format_name} checkpoints with 8-bit {kind} weights per "
                          f"channel and 8-bit activations per token (dynamic) or per tensor (static); this one has "
                          f"weights {weights} and input_activations {activations}")
    return "fp8_e4m3" if kind == "float" else "int8"


def _saved_grid(quantization: Optional[dict], directory: Path) -> Union[WeightGrid, str]:
    """The weight grid (or the W8A8 format) a compressed-tensors ``quantization_config`` describes, or a ConfigError
    saying what it holds that load_compressed does not read."""
    if not quantization or quantization.get("quant_method") != "compressed-tensors":
        raise ConfigError(f"{directory}/config.json has no compressed-tensors quantization_config; load a float "
                          "checkpoint with transformers' from_pretrained")
    groups = quantization.get("config_groups") or {}
    if quantization.get("format") in ("int-quantized", "float-quantized") and len(groups) == 1:
        return _saved_w8a8(next(iter(groups.values())), quantization["format"], directory)
    if quantization.get("format") != "pack-quantized" or len(groups) != 1:
        raise ConfigError(f"{directory}: load_compressed reads the pack-quantized, int-quantized and float-quantized "
                          f"formats with one config group; this checkpoint has format "
                          f"{quantization.get('format')!r} and {len(groups)} groups")
    weights = next(iter(groups.values())).get("weights") or {}
    if weights.get("type") != "int" or not weights.get("symmetric", False) or weights.get("actorder") == "group":
        raise ConfigError(f"{directory}: load_compressed reads symmetric integer weights without a column "
                          f"permutation; this checkpoint's weights are {weights}")
    group = weights.get("group_size") if weights.get("strategy") == "group" else None
    return WeightGrid(int(weights["num_bits"]), True, group)
