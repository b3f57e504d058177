"""``slimtorch.oneshot``: compress a decoder LLM block by block, on calibration text, without training: prune
(``oneshot_pruning``), quantize the weights (``weight_only_quantization``) or weights and activations
(``w8a8_quantization``), or prune and quantize (recipe.py says what each Linear gets).

1. find the repeated blocks and capture what each of them is called with, for every calibration batch (blocks.py);
   check every layer's shapes and the token count before anything changes;
2. for each block in turn: move it to the compute device; with AWQ or SmoothQuant, fold per-channel scales into
   the block, searched on its inputs (migration.py); run it on its inputs with a hook on every target Linear that
   accumulates the Hessian ``2/n X^T X`` of its inputs when GPTQ, SparseGPT or Wanda needs it (hessians.py) and
   observes its inputs' range for static activation scales (quantize's observers, reduced across ranks); prune
   and/or quantize each Linear (recipe.py); run the compressed block again: its outputs are the next block's
   inputs, so every block is calibrated on what the already-compressed blocks before it produce, and errors are
   corrected rather than compounded; move the block back where it was. Every pass over a block's inputs is
   quantize()'s calibration loop (quantization/passes.py).

Memory: the model (copied unless ``inplace``; each block's replaced float Linears are freed once it is done), the
captured hidden states of the calibration batches (two sets while a block's outputs replace its inputs), and for the
block being compressed one [in, in] float32 Hessian per distinct Linear input (1.3 MB for SmolLM2's 576-wide
projections, 268 MB for an 8192-wide down projection). With ``device`` given, only the block being compressed and
the hidden states are on that device.
"""
from __future__ import annotations

import copy
import re
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..batches import model_device
from ..config import load_config
from ..errors import CalibrationError, ConfigError
from ..quantization.calibrate import observer_hooks
from ..quantization.distributed import LOCAL, Sync, reduce_observers, resolve
from ..quantization.passes import Hook, feed_batches, progress_bar
from ..quantization.qdq import op_type
from ..quantization.report import REPORT_ATTR, FloatLayer, QuantizationReport, QuantizedLayer
from .blocks import BlockCall, BlockInput, block_call, capture_block_inputs, find_blocks
from .hessians import BlockHessians
from .migration import awq_block, folded_groups, smoothquant_block
from .modules import W8A8Linear, WeightOnlyLinear
from .recipe import Recipe

SECTION_PATH = "compression_inference"


def oneshot(model: nn.Module, config: Any, calib_data: Optional[Iterable], *, inplace: bool = False,
            device: Union[str, torch.device, None] = None, progress: bool = True) -> nn.Module:
    """The model with the Linears of its repeated blocks pruned and/or quantized as the config's
    ``oneshot_pruning``, ``weight_only_quantization`` and ``w8a8_quantization`` sections say; ``model`` itself is
    left as it was unless ``inplace`` (then it is returned, changed).

    ``calib_data``: an iterable of batches of token ids (``LongTensor [batch, tokens]``) or of dicts of model
    inputs (``input_ids``, ``attention_mask``); 128 samples of 512 to 2048 tokens is typical. A config that reads no
    activations (RTN, dynamic W8A8/FP8 with RTN, magnitude pruning) never runs the model: ``calib_data`` is unused
    and may be None. ``device``: where each
    block is compressed (e.g. "cuda"); the model may stay on the CPU, and only one block visits the device at a
    time. :func:`slimtorch.quantization_report` of the result lists every layer.
    """
    started = time.perf_counter()
    recipe = _checked_recipe(model, config)
    target = model if inplace else copy.deepcopy(model)
    blocks_path, blocks = find_blocks(target, recipe.blocks, key=recipe.blocks_key)
    report = QuantizationReport(mode=recipe.report_mode)
    plan = [_targets(block, f"{blocks_path}.{i}", recipe, report) for i, block in enumerate(blocks)]
    for i, linears in enumerate(plan):  # every shape error before any work
        for name, linear in linears.items():
            recipe.check_shapes(f"{blocks_path}.{i}.{name}", linear)
    report.left_float += _outside_blocks(target, blocks_path)
    compute = torch.device(device) if device is not None else model_device(target)
    if not recipe.needs_data:  # nothing reads activations: no capture, no block runs
        return _data_free(target, blocks, blocks_path, plan, recipe, report, compute, progress, started)
    if calib_data is None:
        raise CalibrationError(f"{SECTION_PATH}: this config needs calibration data (GPTQ, SparseGPT, Wanda, AWQ, "
                               "SmoothQuant or static activation scales read the blocks' inputs); pass calib_data")
    captured = capture_block_inputs(target, blocks, calib_data, where=blocks_path, device=compute)
    report.calibration_batches = len(captured)
    tokens = sum(h.shape[:-1].numel() for h in captured.hidden)
    for i, linears in enumerate(plan):  # every layer sees every token: too few is an error before any change
        for name, linear in linears.items():
            recipe.check_tokens(f"{blocks_path}.{i}.{name}", linear, tokens)
    hidden = captured.hidden
    sync = resolve(None)  # torch.distributed initialized with several ranks: static ranges of every rank's data
    # blocks after the last one with a layer to compress are neither run nor moved: nothing reads their inputs
    last = max((i for i, linears in enumerate(plan) if linears), default=-1)
    for i, block in _blocks_in_turn(blocks[:last + 1], compute, progress):
        where = f"{blocks_path}.{i}"
        inputs = captured.inputs_of(i, hidden)
        _compress_block(block, plan[i], inputs, recipe, where, report, sync)
        plan[i] = {}  # the replaced float Linears are freed now, not after the last block
        if i < last:  # the next block's inputs come from the compressed block
            hidden = _run(block, inputs, where)
        del inputs
    return _finished(target, report, started)


def _data_free(target: nn.Module, blocks: List[nn.Module], blocks_path: str, plan: List[Dict[str, nn.Module]],
               recipe: Recipe, report: QuantizationReport, compute: torch.device, progress: bool,
               started: float) -> nn.Module:
    """Round (or prune by magnitude) every block's Linears from their weights alone, one block on the device at a
    time: the same layers the data path gives, without running the model."""
    for i, block in _blocks_in_turn(blocks, compute, progress):
        _compress_block(block, plan[i], [], recipe, f"{blocks_path}.{i}", report)
        plan[i] = {}
    return _finished(target, report, started)


def _blocks_in_turn(blocks: List[nn.Module], compute: torch.device, progress: bool):
    """Each block in turn on the compute device (and back where it was after its turn), with the progress bar."""
    bar = progress_bar(len(blocks), "slimtorch oneshot", unit="block") if progress else None
    try:
        for i, block in enumerate(blocks):
            home = model_device(block)
            block.to(compute)
            yield i, block
            block.to(home)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _finished(target: nn.Module, report: QuantizationReport, started: float) -> nn.Module:
    report.seconds = time.perf_counter() - started
    setattr(target, REPORT_ATTR, report)
    return target


# -- one block ------------------------------------------------------------------------------------------------
def _compress_block(block: nn.Module, linears: Dict[str, nn.Module], inputs: List[BlockInput], recipe: Recipe,
                    where: str, report: QuantizationReport, sync: Sync = LOCAL) -> None:
    """Fold AWQ / SmoothQuant scales, accumulate the Hessians and observe the input ranges the recipe needs (one
    pass over the block's inputs; the ranges reduced over the ranks under torch.distributed), then compress each
    Linear."""
    folded: Dict[str, str] = {}
    quantized = [n for n in linears if recipe.quantizes(f"{where}.{n}")]
    if recipe.awq:
        folded = folded_groups(awq_block(block, quantized, inputs, recipe.grid, recipe.quantization.awq, where))
    elif recipe.smoothquant:
        folded = folded_groups(smoothquant_block(block, quantized, inputs, recipe.w8a8.smoothquant))
    hessians = BlockHessians(where) if recipe.needs_hessian else None
    observers = {n: recipe.input_observer() for n in linears} if recipe.needs_input_ranges else {}
    batch = [-1]  # the batch being fed, for an observer's error
    hooks = [(linear, hessians.hook(name)) for name, linear in linears.items()] if hessians is not None else []
    hooks += observer_hooks(linears, observers, lambda: batch[0], prefix=f"{where}.")
    if hooks:
        with sync.guard(f"calibration of {where}"):
            _run(block, inputs, where, pre=hooks, on_batch=lambda i: batch.__setitem__(0, i))
        reduce_observers(observers, sync, model_device(block))
    with torch.no_grad():
        for name, linear in linears.items():
            full = f"{where}.{name}"
            hessian = hessians.take(name) if hessians is not None else None
            observer = observers.get(name)
            absmax = observer.absmax() if observer is not None and observer.min_val is not None else None
            replacement = recipe.compress(full, linear, hessian, absmax)
            if replacement is not None:
                _replace(block, name, replacement)
            scheme = recipe.scheme(full)
            if name in folded:
                scheme += f"; {'AWQ' if recipe.awq else 'SmoothQuant'} scales folded into {folded[name]}"
            report.quantized.append(QuantizedLayer(full, op_type(linear), tuple(linear.weight.shape), scheme))


def _run(block: nn.Module, inputs: List[BlockInput], where: str, pre: Sequence[Hook] = (),
         on_batch: Optional[Callable[[int], None]] = None) -> List[Tensor]:
    """The block's outputs on its captured inputs, fed by the calibration loop with ``pre`` hooks attached."""
    outputs: List[Tensor] = []

    def keep(i: int, out: Tensor) -> None:
        if not bool(torch.isfinite(out).all()):
            raise CalibrationError(f"{where} returned NaN or inf on calibration batch {i}; the block (or the "
                                   "blocks compressed before it) diverged: check the float model on this text, "
                                   "or exclude the block's layers with excluded_modules")
        outputs.append(out)

    feed_batches(BlockCall(block), inputs, what=f"{where}: calibration", input_fn=block_call, on_batch=on_batch,
                 on_output=keep, pre=pre, hook_kwargs=True)
    return outputs


# -- what is compressed ---------------------------------------------------------------------------------------
def _targets(block: nn.Module, prefix: str, recipe: Recipe, report: QuantizationReport) -> Dict[str, nn.Module]:
    """The block's Linear (and transformers Conv1D) layers by name inside the block that some section compresses
    (excluded_modules match full names); a subclass with its own forward() is left float, with the reason."""
    out = {}
    for name, module in block.named_modules():
        kind = op_type(module)
        if kind not in ("Linear", "Conv1D"):
            continue
        full = f"{prefix}.{name}"
        excluded = recipe.excluded(full)
        if excluded is not None:
            report.left_float.append(FloatLayer(full, kind, excluded))
        elif kind == "Linear" and type(module).forward is not nn.Linear.forward:
            report.left_float.append(FloatLayer(full, kind, f"{type(module).__name__} overrides forward()"))
        else:
            out[name] = module
    return out


def _outside_blocks(model: nn.Module, blocks_path: str) -> List[FloatLayer]:
    inside = re.compile(re.escape(blocks_path) + r"\.")
    return [FloatLayer(n, op_type(m), "outside the repeated blocks (lm_head and other heads stay float)")
            for n, m in model.named_modules() if op_type(m) in ("Linear", "Conv1D") and not inside.match(n)]


def _checked_recipe(model: Any, config: Any) -> Recipe:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"oneshot() takes a torch.nn.Module, got {type(model).__name__}")
    inference = load_config(config).compression_inference
    if not inference.oneshot_sections():
        raise ConfigError(f"{SECTION_PATH}: none of weight_only_quantization, w8a8_quantization and oneshot_pruning "
                          'is enabled; oneshot() needs e.g. {"compression_inference": {"weight_only_quantization": '
                          '{"enabled": true}}} in the config')
    if inference.active is not None:
        raise ConfigError(f"{SECTION_PATH}: static/dynamic_quantization is enabled too, and oneshot() runs the block "
                          "pipeline's sections only: call slimtorch.compress(model, config, calib_data), which runs "
                          "every enabled section in order (one-shot pruning, then quantization)")
    if any(isinstance(m, (WeightOnlyLinear, W8A8Linear)) for m in model.modules()):
        raise ConfigError(f"{type(model).__name__} already holds quantized layers; compress the float model")
    recipe = Recipe(quantization=inference.weight_only, pruning=inference.pruning, w8a8=inference.w8a8)
    recipe.check_runtime()
    return recipe


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
