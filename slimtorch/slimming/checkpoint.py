"""Saving a slim model so that it loads back.

- A transformers model whose layers all kept the same widths (every FFN the same units, every attention the same
  heads) is saved with ``save_pretrained`` and a config that says so (``intermediate_size``,
  ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``): ``from_pretrained`` builds it as it is. The config
  is accepted only when a model built from it (on the meta device, no memory) has exactly the slim model's shapes.
- Anything else (widths that differ from layer to layer, a config without a ``head_dim`` to keep the head width,
  a plain ``nn.Module``) is saved as the float architecture's config (or none) plus the weights and a manifest of
  every narrowed layer's shape and head counts (``slimtorch_slim.json``); :func:`load_slim` rebuilds it.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..errors import SlimtorchError
from ..loaded_quantizer import saving_as_float
from . import surgery

MANIFEST = "slimtorch_slim.json"
WEIGHTS = "slim_model.safetensors"
#: written beside the weights of the slimtorch format: transformers' from_pretrained on the folder fails with "no file
#: named model.safetensors" and does not say why, so the folder itself says how to load it
README = "README.md"
_README_TEXT = """# A slim model saved by slimtorch.save_slim (slimtorch format)

Load it with slimtorch, not with transformers' `from_pretrained` (which finds no `model.safetensors` here):

```python
import slimtorch
model = slimtorch.load_slim("{directory}"{model_argument})
```

Why this format: {why} `{weights}` holds the weights, `{manifest}` the shape of every narrowed layer and the head
counts of the attention modules; `config.json` (if present) is the float architecture's config, which `load_slim`
narrows. A model whose layers all keep the same widths, in a config that can say so (Llama, Qwen, Gemma, Mistral),
is saved as a plain transformers checkpoint instead: prune with `"scope": "local"` for equal widths
(docs/slimming.md, "Saving and loading").
"""
_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_key_value_heads", "num_kv_heads",
               "n_kv_heads", "all_head_size", "inner_dim")


def _shapes(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """Every Linear, Conv and BatchNorm's constructor shape, and the head counts stored on modules."""
    out: Dict[str, Dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = {"kind": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
        elif isinstance(m, nn.modules.conv._ConvNd):
            out[name] = {"kind": "conv", "in": m.in_channels, "out": m.out_channels, "groups": m.groups,
                         "bias": m.bias is not None}
        elif surgery.is_transposed_linear(m):
            out[name] = {"kind": "conv1d", "in": int(m.weight.shape[0]), "out": int(m.weight.shape[1]),
                         "bias": m.bias is not None}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[name] = {"kind": "batch_norm", "features": m.num_features}
        heads = {a: getattr(m, a) for a in _ATTRIBUTES if isinstance(getattr(m, a, None), int)}
        if heads:
            out.setdefault(name, {})["attributes"] = heads
    return out


def uniform_config(model: nn.Module):
    """A copy of the transformers config that builds exactly ``model``'s shapes, or None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        return None
    shapes = _shapes(model)
    target = {k: v for k, v in shapes.items() if "kind" in v}
    candidate = copy.deepcopy(config)
    # the FFN's inner width: Llama-style gate/up projections, BERT's intermediate.dense
    widths = {v["out"] for k, v in target.items() if v["kind"] == "linear" and
              k.endswith(("mlp.gate_proj", "mlp.up_proj", "intermediate.dense"))}
    if len(widths) == 1 and hasattr(candidate, "intermediate_size"):
        candidate.intermediate_size = widths.pop()
    heads = {v["attributes"].get("num_attention_heads", v["attributes"].get("num_heads"))
             for v in shapes.values() if "attributes" in v} - {None}
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // config.num_attention_heads
                                                     if hasattr(config, "num_attention_heads") else None)
    q_rows = {v["out"] for k, v in target.items() if k.endswith(("q_proj", "self.query"))}
    kv_rows = {v["out"] for k, v in target.items() if k.endswith(("k_proj", "self.key"))}
    if head_dim and len(q_rows) == 1 and hasattr(candidate, "num_attention_heads"):
        candidate.num_attention_heads = q_rows.pop() // head_dim
        candidate.head_dim = head_dim
        if len(kv_rows) == 1 and hasattr(candidate, "num_key_value_heads"):
            candidate.num_key_value_heads = kv_rows.pop() // head_dim
    elif heads:
        return None
    try:
        with torch.device("meta"):
            fresh = type(model)(candidate)
    except Exception:
        return None
    if {k: v for k, v in _shapes(fresh).items() if "kind" in v} != target:
        return None
    return candidate


def save_slim(model: nn.Module, directory: str | os.PathLike) -> str:
    """Save the slim model to ``directory``; returns ``"transformers"`` when ``from_pretrained`` loads it as it is
    (uniform widths, updated config), ``"slimtorch"`` when :func:`load_slim` is needed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = uniform_config(model)
    if config is not None:
        original = model.config
        model.config = config
        try:
            with saving_as_float(model):  # a model loaded from a GGUF file: its weights are float
                model.save_pretrained(directory)
        finally:
            model.config = original
        return "transformers"
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(untied(state), str(directory / WEIGHTS))
    manifest: Dict[str, Any] = {"format": "slimtorch-slim/1", "shapes": _shapes(model)}
    if getattr(model, "config", None) is not None and hasattr(model.config, "to_dict"):
        with saving_as_float(model):  # no GGUF quantization_config in the float architecture's config
            model.config.save_pretrained(directory)
        manifest["architecture"] = type(model).__name__
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (directory / README).write_text(_README_TEXT.format(
        directory=directory.name, weights=WEIGHTS, manifest=MANIFEST, why=_why_not_transformers(model),
        model_argument="" if "architecture" in manifest else ", model=fresh_float_model"))
    return "slimtorch"


def _why_not_transformers(model: nn.Module) -> str:
    if getattr(model, "config", None) is None or not hasattr(model, "save_pretrained"):
        return "a plain PyTorch model has no config to rebuild it from: pass a fresh float instance as model=."
    return (f"the widths of {type(model).__name__}'s layers differ from layer to layer, or its config cannot "
            "express them (BERT derives its head width from the head count).")


def untied(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): clone the repeats."""
    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def load_slim(directory: str | os.PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """The slim model saved by :func:`save_slim`. A directory ``from_pretrained`` loads as it is is loaded so (with
    the class named in its config); otherwise ``model`` is the float architecture to narrow (a fresh, unpruned
    instance: it is changed), or, for a transformers model, None to build it from the saved config."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        if not (directory / "config.json").is_file():
            raise SlimtorchError(f"{directory} holds neither {MANIFEST} nor config.json: not saved by save_slim()")
        import transformers

        config = transformers.AutoConfig.from_pretrained(directory)
        cls = getattr(transformers, (config.architectures or ["AutoModel"])[0])
        return cls.from_pretrained(directory)
    manifest = json.loads(manifest_path.read_text())
    if model is None:
        model = saved_architecture(directory, manifest, "pass a fresh instance of its float architecture as model= "
                                                        "to narrow and load")
    _narrow(model, manifest["shapes"])
    from safetensors.torch import load_file

    state = load_file(str(directory / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("weight")} if getattr(model, "_tied_weights_keys", None) else set()
    if set(missing) - tied or unexpected:
        raise SlimtorchError(f"{directory}: the weights do not fit the narrowed model (missing {sorted(missing)[:4]}, "
                             f"unexpected {sorted(unexpected)[:4]}); was it saved from another architecture?")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def saved_architecture(directory: Path, manifest: Dict[str, Any], fix: str) -> nn.Module:
    """A fresh (random-init) instance of the transformers class ``manifest["architecture"]`` names, built from the
    directory's config.json; a plain PyTorch model (no architecture recorded) is an error that says ``fix``."""
    if "architecture" not in manifest:
        raise SlimtorchError(f"{directory} holds a plain PyTorch model: {fix}")
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    return getattr(transformers, manifest["architecture"])(config)


def _narrow(model: nn.Module, shapes: Dict[str, Dict[str, Any]]) -> None:
    for name, spec in shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SlimtorchError(f"the saved slim model has a layer {name!r} that the given architecture "
                                 "lacks") from None
        kind = spec.get("kind")
        if kind == "linear" and (module.in_features, module.out_features) != (spec["in"], spec["out"]):
            model.set_submodule(name, surgery.shrink_linear(module, keep_out=torch.arange(spec["out"]),
                                                            keep_in=torch.arange(spec["in"])))
        elif kind == "conv" and (module.in_channels, module.out_channels) != (spec["in"], spec["out"]):
            if module.groups > 1:
                model.set_submodule(name, surgery.shrink_conv(module, keep_out=torch.arange(spec["out"])))
            else:
                model.set_submodule(name, surgery.shrink_conv(module, keep_out=torch.arange(spec["out"]),
                                                              keep_in=torch.arange(spec["in"])))
        elif kind == "conv1d" and tuple(module.weight.shape) != (spec["in"], spec["out"]):
            model.set_submodule(name, surgery.shrink_transposed_linear(module, keep_out=torch.arange(spec["out"]),
                                                                       keep_in=torch.arange(spec["in"])))
        elif kind == "batch_norm" and module.num_features != spec["features"]:
            model.set_submodule(name, surgery.shrink_batchnorm(module, torch.arange(spec["features"])))
        for attr, value in spec.get("attributes", {}).items():
            setattr(model.get_submodule(name), attr, value)
