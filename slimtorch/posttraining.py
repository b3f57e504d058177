"""``slimtorch.compress``: the one post-training entry point. It reads the config and runs every enabled
``compression_inference`` section in order, one-shot pruning first, then quantization, on the pipeline that fits
the model:

| pipeline      | chosen for                                       | sections it runs                                  |
|---------------|--------------------------------------------------|---------------------------------------------------|
| ``blocks``    | a decoder LLM: a transformers model that         | ``oneshot_pruning`` with ``weight_only_``/``w8a8_ |
|               | generates text (``can_generate()``), not         | quantization`` per Linear, block by block         |
|               | encoder-decoder, whose repeated blocks are found | (:func:`slimtorch.oneshot`); then static/dynamic  |
| ``whole_model`` | every other model (encoders, CNNs)             | ``oneshot_pruning`` on the repeated blocks'       |
|               |                                                  | Linears (the same block machinery, batches fed    |
|               |                                                  | by the calibration feeding rules), then           |
|               |                                                  | ``static_``/``dynamic_quantization``              |
|               |                                                  | (:func:`slimtorch.quantize`'s steps)              |

``compression_inference.pipeline`` ("auto", "blocks", "whole_model") forces one. Weight-only and W8A8/FP8 exist on
the block pipeline only; on the whole-model path they are a ConfigError.

Copy rule: ``model`` is never changed unless ``inplace=True``; then ``model`` itself is the result. The calibration
data is read through one replayable loader (a generator is cached as it is read), so every stage sees the same
batches.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .batches import describe
from .config import load_config
from .config.schema import CompressionConfig
from .errors import CalibrationError, ConfigError, SlimtorchError
from .llm.blocks import find_blocks
from .llm.oneshot import oneshot
from .quantization.api import checked_arguments as quantize_arguments
from .quantization.api import quantize_model
from .quantization.passes import ReplayableLoader
from .quantization.report import REPORT_ATTR, QuantizationReport

SECTION_PATH = "compression_inference"
BLOCK_SECTIONS = ("weight_only_quantization", "w8a8_quantization")
WHOLE_MODEL_SECTIONS = ("static_quantization", "dynamic_quantization")


def compress(model: nn.Module, config: Any, calib_data: Optional[Iterable] = None, *, inplace: bool = False,
             device: Union[str, torch.device, None] = None, eval_fn: Optional[Callable[[nn.Module], float]] = None,
             calib_input_fn: Optional[Callable[[Any], Any]] = None, progress: bool = True,
             mpu: Any = None) -> nn.Module:
    """``model`` compressed as the config's ``compression_inference`` sections say: every enabled section, in order
    (``oneshot_pruning`` first, then ``weight_only_quantization``, ``w8a8_quantization`` or
    ``static``/``dynamic_quantization``), on the block pipeline for a decoder LLM and the whole-model path otherwise
    (module docstring; ``compression_inference.pipeline`` forces one).

    Copy rule: ``model`` is left exactly as it was and a compressed copy is returned, unless ``inplace=True``: then
    ``model`` itself is compressed and returned.

    ``calib_data``: the calibration batches, one name for every section (an iterable: list, DataLoader, generator).
    A decoder LLM takes token ids (``LongTensor [batch, tokens]``) or dicts of model inputs; other models take what
    :func:`slimtorch.quantize` takes (a tensor is ``model(b)``, a dict ``model(**b)``, a tuple by its first item).
    ``calib_input_fn(batch)`` converts each batch first. Sections that read no activations (RTN, magnitude pruning,
    dynamic quantization) need none. ``device``: where the block pipeline compresses each block (e.g. "cuda"); the
    whole-model path runs where the model is. ``eval_fn`` and ``mpu``: static/dynamic quantization's accuracy
    search and distributed calibration (as :func:`slimtorch.quantize`'s); the block pipeline runs on one process.

    :func:`slimtorch.quantization_report` of the result lists every layer (pruned layers' schemes say so).
    """
    cfg = load_config(config)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"compress() takes a torch.nn.Module, got {type(model).__name__}")
    inference = cfg.compression_inference
    pruning, block_quant, whole_quant = _enabled(inference)
    if not (pruning or block_quant or whole_quant):
        raise ConfigError(f"{SECTION_PATH}: no section is enabled; compress() runs oneshot_pruning, "
                          f"{', '.join(BLOCK_SECTIONS + WHOLE_MODEL_SECTIONS)} (e.g. "
                          '{"compression_inference": {"static_quantization": {"enabled": true}}})')
    blocks_pipeline = _blocks_pipeline(model, inference)
    if block_quant and not blocks_pipeline:
        raise ConfigError(f"{SECTION_PATH}.{block_quant}: runs block by block on a decoder LLM, and "
                          f"{type(model).__name__} is not one ({_why_not_llm(model, inference)}); quantize it with "
                          "static_quantization or dynamic_quantization, or set compression_inference.pipeline to "
                          '"blocks" to force the block pipeline')
    if eval_fn is not None and not whole_quant:
        enabled = ", ".join(filter(None, (pruning, block_quant)))
        raise ConfigError("compress(eval_fn=...): eval_fn drives the accuracy search of static/dynamic_quantization, "
                          f"and the config enables neither (enabled: {enabled})")
    if device is not None and not (pruning or block_quant):
        raise ConfigError(f"compress(device={str(device)!r}): device is where the block pipeline compresses each "
                          f"block, and {whole_quant} runs on the whole model where it is; move the model there "
                          "first (model.to(device)) and leave device out")
    if pruning and not blocks_pipeline:
        _check_prunable(model, inference)
    data = None if calib_data is None else ReplayableLoader(calib_data, calib_input_fn)
    if whole_quant:  # every quantization argument error before the pruning stage changes anything
        if whole_quant == "static_quantization" and calib_data is None:
            raise CalibrationError(f"{SECTION_PATH}.static_quantization needs calibration data: pass calib_data=<an "
                                   "iterable of input batches> (a few hundred samples the model will see), or use "
                                   "dynamic_quantization, which needs none")
        quantize_arguments(model, _only(cfg, keep=WHOLE_MODEL_SECTIONS), eval_fn, data)
    target = model if inplace else copy.deepcopy(model)
    pruned: Dict[str, str] = {}
    if pruning or block_quant:
        stage = _only(cfg, keep=("oneshot_pruning",) + BLOCK_SECTIONS)
        batches = data if blocks_pipeline or data is None else _KeywordBatches(target, data)
        oneshot(target, stage, batches, inplace=True, device=device, progress=progress)
        pruned = {row.name: row.scheme for row in getattr(target, REPORT_ATTR).quantized}
    if whole_quant:
        stage = _only(cfg, keep=WHOLE_MODEL_SECTIONS)
        # inplace: quantize's steps swap layers inside the model, never the model itself, so target is the result
        quantize_model(target, stage, mpu, data, eval_fn, calib_input_fn=None, progress=progress, inplace=True)
        if pruned:
            _note_pruning(getattr(target, REPORT_ATTR), pruned)
    return target


def _enabled(inference) -> tuple:
    """(the pruning key or None, the enabled block-pipeline quantization key or None, the enabled whole-model key
    or None)."""
    sections = inference.oneshot_sections()
    pruning = "oneshot_pruning" if "oneshot_pruning" in sections else None
    block_quant = next((k for k in BLOCK_SECTIONS if k in sections), None)
    whole = next((k for k in WHOLE_MODEL_SECTIONS
                  if getattr(inference, k) is not None and getattr(inference, k).enabled), None)
    return pruning, block_quant, whole


def _blocks_key(inference) -> Optional[str]:
    return next((s.blocks for s in inference.oneshot_sections().values() if s.blocks), None)


def is_decoder_llm(model: nn.Module, blocks: Optional[str] = None) -> bool:
    """Whether ``model`` is a decoder LLM for the block pipeline: a transformers model that generates text
    (``can_generate()``: a causal LM head), is not an encoder-decoder, and whose repeated blocks are found."""
    return _why_not_llm(model, blocks_path=blocks) is None


def _why_not_llm(model: nn.Module, inference=None, *, blocks_path: Optional[str] = None) -> Optional[str]:
    """Why ``model`` is not a decoder LLM (for the message), or None when it is one."""
    if inference is not None:
        blocks_path = _blocks_key(inference)
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if config is None or not callable(can_generate):
        return "not a transformers model"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    try:
        generates = bool(can_generate())
    except Exception:  # a model class whose can_generate() needs what this instance lacks
        generates = False
    if not generates:
        return "it has no text-generation (causal LM) head"
    try:
        find_blocks(model, blocks_path)
    except SlimtorchError as e:
        return f"its repeated blocks are not found: {e}"
    return None


def _blocks_pipeline(model: nn.Module, inference) -> bool:
    if inference.pipeline != "auto":
        return inference.pipeline == "blocks"
    return _why_not_llm(model, inference) is None


def _check_prunable(model: nn.Module, inference) -> None:
    """One-shot pruning on the whole-model path prunes the Linears of the model's repeated blocks (transformer
    layers): a model without them (a CNN) is a ConfigError that says what to use instead."""
    where = f"{SECTION_PATH}.oneshot_pruning"
    try:
        path, blocks = find_blocks(model, _blocks_key(inference), key=f"{where}.blocks")
    except ConfigError:
        raise
    except SlimtorchError as e:
        raise ConfigError(f"{where}: one-shot pruning prunes the Linear layers of a model's repeated blocks "
                          f"(transformer layers), and {type(model).__name__} has none ({e}). Prune convolutions "
                          "during training (compression_training.sparse_pruning), or set oneshot_pruning.blocks to "
                          "the ModuleList of blocks") from None
    if not any(isinstance(m, nn.Linear) for m in blocks.modules()):
        raise ConfigError(f"{where}: one-shot pruning prunes Linear layers, and {path} ({type(blocks[0]).__name__} "
                          f"blocks of {type(model).__name__}) holds none; prune convolutions during training "
                          "(compression_training.sparse_pruning)")


def _only(cfg: CompressionConfig, keep: tuple) -> CompressionConfig:
    """``cfg`` with only the ``keep`` sections of compression_inference (the others left out), for one stage."""
    inference = cfg.compression_inference
    dropped = {k: None for k in ("oneshot_pruning",) + BLOCK_SECTIONS + WHOLE_MODEL_SECTIONS if k not in keep}
    return cfg.model_copy(update={"compression_inference": inference.model_copy(update=dropped)})


class _KeywordBatches:
    """Calibration batches for the block machinery on a model that is not a decoder LLM: each batch as the keyword
    arguments the feeding rules mean (a tensor is the model's first argument, a mapping its keywords, a tuple or
    list its first item), since the block capture calls ``model(**batch)`` and reads a bare tensor as token ids."""

    def __init__(self, model: nn.Module, batches: Iterable):
        self.batches = batches
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.first = params[0].name if params else None
        self.model_name = type(model).__name__

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            while isinstance(batch, (list, tuple)) and batch:
                batch = batch[0]
            if isinstance(batch, Mapping):
                yield dict(batch)
            elif isinstance(batch, Tensor) and self.first is not None:
                yield {self.first: batch}
            else:
                raise CalibrationError(f"calibration batch {i} ({describe(batch)}) cannot be fed to {self.model_name}: "
                                       "give tensors (the model's first argument), dicts of keyword arguments, or "
                                       "tuples with the inputs first; calib_input_fn= converts other batches")


def _note_pruning(report: QuantizationReport, pruned: Dict[str, str]) -> None:
    """Prefix the quantization report's rows of pruned layers with how they were pruned."""
    report.quantized = [dataclasses.replace(r, scheme=f"{pruned[r.name]} + {r.scheme}") if r.name in pruned else r
                        for r in report.quantized]
    report.left_float = [dataclasses.replace(r, reason=f"{r.reason}; {pruned[r.name]}") if r.name in pruned else r
                         for r in report.left_float]
