"""``slimtorch.save`` / ``slimtorch.load``: one save/load pair for every post-training result, in the format its
layers need; :func:`load` always returns the ``nn.Module``.

| the model holds                                | format written                       | readers                    |
|------------------------------------------------|--------------------------------------|----------------------------|
| weight-only / W8A8 / FP8 layers (block         | compressed-tensors (save_compressed) | transformers, load()       |
| pipeline)                                      |                                      |                            |
| QDQ layers (static/dynamic quantization)       | slimtorch's QDQ state: int8 weights, | load() (load_quantized)    |
|                                                | scales, ``qdq_spec`` per layer       |                            |
| float layers only (pruned, slimmed or neither) | save_slim's: ``save_pretrained`` when| transformers when the      |
|                                                | the config builds the shapes, else   | config builds it, load()   |
|                                                | weights + a manifest of the shapes   |                            |

The older functions stay, for what only they do: :func:`~slimtorch.save_compressed` / :func:`~slimtorch.load_compressed`
(``dtype=`` of the loaded float tensors), :func:`~slimtorch.load_quantized` (a state_dict in memory, no directory),
:func:`~slimtorch.save_slim` (returns which reader the directory needs) / :func:`~slimtorch.load_slim`.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional, Union

from torch import nn

from .errors import StateDictError
from .llm.checkpoint import load_compressed, save_compressed
from .llm.modules import W8A8Linear, WeightOnlyLinear
from .quantization.qdq import QDQModule
from .quantization.serialization import load_quantized
from .slimming.checkpoint import MANIFEST as SLIM_MANIFEST
from .slimming.checkpoint import load_slim, save_slim, saved_architecture, untied

QDQ_MANIFEST = "slimtorch_qdq.json"
QDQ_WEIGHTS = "qdq_model.safetensors"
QDQ_FORMAT = "slimtorch-qdq/1"

PathLike = Union[str, os.PathLike]


def save(model: nn.Module, directory: PathLike) -> Path:
    """Write the post-training result ``model`` to ``directory`` (created if needed) in the format its layers need
    (module docstring); returns the directory. The model is not changed; :func:`load` reads every format back."""
    directory = Path(directory)
    if any(isinstance(m, (WeightOnlyLinear, W8A8Linear)) for m in model.modules()):
        return save_compressed(model, directory)
    if any(isinstance(m, QDQModule) for m in model.modules()):
        return _save_qdq(model, directory)
    save_slim(model, directory)
    return directory


def load(directory: PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """The model :func:`save` (or save_compressed, save_slim, a QDQ state written by save) wrote to ``directory``.

    ``model``: a float instance of the architecture (left unchanged: the result is a new module). A transformers
    model is built from the saved config when ``model`` is None; a plain ``nn.Module`` saved with QDQ layers or as a
    weights + manifest directory needs it. Compressed-tensors checkpoints are always built from their config.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StateDictError(f"{directory} is not a directory; slimtorch.load reads what slimtorch.save wrote")
    if (directory / QDQ_MANIFEST).is_file():
        return _load_qdq(directory, model)
    config = directory / "config.json"
    if config.is_file() and _is_compressed_tensors(config):
        return load_compressed(directory)
    if (directory / SLIM_MANIFEST).is_file() or config.is_file():
        return load_slim(directory, None if model is None else copy.deepcopy(model))
    raise StateDictError(f"{directory} holds none of what slimtorch.save writes ({QDQ_MANIFEST}, {SLIM_MANIFEST} or a "
                         "config.json): save the model with slimtorch.save(model, directory)")


def _is_compressed_tensors(config_path: Path) -> bool:
    quantization = json.loads(config_path.read_text()).get("quantization_config") or {}
    return quantization.get("quant_method") == "compressed-tensors"


def _save_qdq(model: nn.Module, directory: Path) -> Path:
    """The QDQ model's state_dict (what load_quantized rebuilds it from) and a manifest; a transformers model's
    config too, so that load() can build the float architecture."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(untied(state), str(directory / QDQ_WEIGHTS))
    manifest = {"format": QDQ_FORMAT}
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
        manifest["architecture"] = type(model).__name__
    (directory / QDQ_MANIFEST).write_text(json.dumps(manifest, indent=1))
    return directory


def _load_qdq(directory: Path, model: Optional[nn.Module]) -> nn.Module:
    manifest = json.loads((directory / QDQ_MANIFEST).read_text())
    if manifest.get("format") != QDQ_FORMAT:
        raise StateDictError(f"{directory / QDQ_MANIFEST}: format {manifest.get('format')!r}, this slimtorch reads "
                             f"{QDQ_FORMAT!r}")
    if model is None:
        model = saved_architecture(directory, manifest, "pass a float instance of its architecture: "
                                                        "slimtorch.load(directory, model=...)")
    return load_quantized(model, directory / QDQ_WEIGHTS).eval()
