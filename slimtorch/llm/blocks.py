"""The repeated blocks of a decoder LLM, and the inputs each block receives.

A causal LM from transformers is ``embeddings -> N decoder blocks -> final norm -> lm_head``. Compressing it block
by block needs two things from the model, found here:

* **the blocks**: the ``nn.ModuleList`` of N same-class children (``model.layers`` in Llama/Qwen/Gemma,
  ``transformer.h`` in GPT-2), found automatically or named by the config's ``blocks`` key;
* **what every block is called with**: every calibration batch is run through the model once; pre-hooks record
  each block's positional and keyword arguments (hidden states, attention mask, position ids, rotary embeddings,
  cache position) while stand-ins skip the work of all blocks but the first. The model's own code prepares the
  keyword arguments, so no architecture is special-cased, and blocks that get different ones (Gemma3's sliding-window
  and full-attention layers) keep their own. Block i+1 then gets block i's outputs as hidden states.

Memory: the captured hidden states of every calibration batch (samples x tokens x width floats: 32 x 512 x 576
x 4 bytes = 38 MB for SmolLM2-135M), plus every batch's keyword arguments (shared by the blocks that share them).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..batches import describe, model_device, to_device
from ..errors import CalibrationError, ConfigError, UnsupportedModelError
from ..quantization.passes import preserved_modes
from ..token_ids import check_token_ids

#: names the blocks' ModuleList has in common architectures, tried first when several lists qualify
USUAL_BLOCK_NAMES = ("layers", "h", "blocks", "block", "layer", "decoder_layers")


@dataclass
class BlockInput:
    """One calibration batch as the block sees it: positional arguments (hidden states first) and keywords."""

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]

    @property
    def hidden(self) -> Tensor:
        if self.args:
            return self.args[0]
        if "hidden_states" not in self.kwargs:
            raise UnsupportedModelError(f"a block was called with no positional argument and no hidden_states keyword "
                                        f"(keywords: {sorted(self.kwargs)}); slimtorch cannot tell which argument "
                                        "carries the hidden states")
        return self.kwargs["hidden_states"]

    def with_hidden(self, hidden: Tensor) -> "BlockInput":
        """The same call with other hidden states (the previous block's outputs)."""
        if self.args:
            return BlockInput((hidden,) + tuple(self.args[1:]), self.kwargs)
        return BlockInput((), {**self.kwargs, "hidden_states": hidden})

    def without_hidden(self) -> "BlockInput":
        """The same call with the hidden states left out (None), to be put back by :meth:`with_hidden`."""
        if self.args:
            return BlockInput((None,) + tuple(self.args[1:]), self.kwargs)
        return BlockInput((), {**self.kwargs, "hidden_states": None})


def find_blocks(model: nn.Module, path: Optional[str] = None, *, key: str = "blocks") -> Tuple[str, nn.ModuleList]:
    """``(dotted path, ModuleList)`` of the model's repeated blocks.

    ``path`` names them; None finds the ModuleList with the most children (at least 2) that all share one class,
    preferring the usual names (``layers``, ``h``, ...) on a tie. ``key`` is the config path named in errors.
    """
    if path is not None:
        try:
            found = model.get_submodule(path)
        except AttributeError as e:
            raise ConfigError(f"{key}: {type(model).__name__} has no module {path!r} ({e}); give the dotted path of "
                              "the ModuleList of decoder blocks, e.g. 'model.layers'") from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ConfigError(f"{key}: {path!r} is a {type(found).__name__}, not a non-empty ModuleList of blocks; "
                              "give the dotted path of the ModuleList of decoder blocks, e.g. 'model.layers'")
        return path, found
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            usual = name.rpartition(".")[2] in USUAL_BLOCK_NAMES
            candidates.append((len(module), usual, -name.count("."), name, module))
    if not candidates:
        raise UnsupportedModelError(
            f"no repeated blocks found in {type(model).__name__}: no ModuleList of two or more modules of one class. "
            f"Set {key} to the dotted path of the ModuleList that holds the decoder layers (e.g. 'model.layers')")
    _, _, _, name, module = max(candidates, key=lambda c: c[:3])
    return name, module


class _Captured(Exception):
    """Raised by the last block's stand-in to stop the forward once every block's call is recorded."""


@dataclass
class CapturedInputs:
    """What each block is called with, for every calibration batch.

    ``hidden[b]``: the hidden states the first block receives on batch ``b``. ``calls[b][i]``: block ``i``'s call
    on batch ``b`` with the hidden states left out (None): its keyword arguments may differ from block to block
    (Gemma3's sliding-window layers get another mask and other rotary embeddings than its full-attention layers);
    tensors shared between blocks, as the model passes them, are held once.
    """

    hidden: List[Tensor]
    calls: List[List[BlockInput]]

    def __len__(self) -> int:
        return len(self.hidden)

    def inputs_of(self, block: int, hidden: Sequence[Tensor]) -> List[BlockInput]:
        """Block ``block``'s calls on every batch, with ``hidden`` (one tensor per batch) as hidden states."""
        return [calls[block].with_hidden(h) for calls, h in zip(self.calls, hidden)]


def language_model_inputs(model: nn.Module, batch: Any) -> Dict[str, Any]:
    """A calibration batch as keyword arguments of ``model``: a tensor is ``input_ids``, a mapping is used as it is
    (a tuple or list by its first element); the KV cache is turned off where the model takes ``use_cache``."""
    while isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, Tensor):
        inputs: Dict[str, Any] = {"input_ids": batch if batch.dim() > 1 else batch[None]}
    elif isinstance(batch, Mapping):
        inputs = dict(batch)
    else:
        raise CalibrationError(f"a calibration batch for a language model must be a tensor of token ids or a dict "
                               f"of model inputs (input_ids, attention_mask), got {describe(batch)}")
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs.setdefault("use_cache", False)
    return inputs


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: Iterable, *, where: str,
                         device: Optional[torch.device] = None) -> CapturedInputs:
    """Run every batch through ``model`` and record what each of ``blocks`` is called with (moved to ``device``,
    default the model's). Train/eval modes are restored.

    Only the embeddings and the first block compute: while capturing, blocks 1..N-1 are stand-ins that record their
    call and hand the hidden states on unchanged (in the first block's output structure), and the last one stops
    the forward, so the final norm and lm_head never run. The models' own code prepares every block's keyword
    arguments (masks, positions, rotary embeddings), so no architecture is special-cased.
    """
    device = torch.device(device) if device is not None else model_device(model)
    memo: Dict[int, Tuple[Tensor, Tensor]] = {}
    hidden: List[Tensor] = []
    calls: List[List[BlockInput]] = []
    current: List[BlockInput] = []
    structure: List[Any] = []  # the first block's output, to hand on hidden states as the model expects them

    def record(module, args, kwargs):
        call = BlockInput(tuple(args), dict(kwargs))
        if not current:
            hidden.append(to_device(call.hidden, device, memo))
        rest = call.without_hidden()  # a BlockInput: its arguments are moved, not the dataclass
        current.append(BlockInput(to_device(rest.args, device, memo), to_device(rest.kwargs, device, memo)))

    def first_output(module, args, kwargs, out):
        structure[:] = [out]
        if len(blocks) == 1:
            raise _Captured

    def stand_in(index: int):
        def forward(*args, **kwargs):
            if not structure:  # block 0 never ran as a module: the model calls .forward() itself
                raise UnsupportedModelError(
                    f"{type(model).__name__} reached {where}[{index}] without calling {where}[0] as a module: its "
                    "forward() calls the blocks' forward() directly (or skips some), so their inputs cannot be "
                    "captured with hooks; name the ModuleList its forward() calls as modules in the config's blocks "
                    "key, or wrap the model so that it calls block(...) rather than block.forward(...)")
            if index == len(blocks) - 1:
                raise _Captured
            return _shaped_like(structure[0], BlockInput(args, kwargs).hidden)
        return forward

    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    handles.append(blocks[0].register_forward_hook(first_output, with_kwargs=True))
    for i, block in enumerate(blocks):
        if i > 0:
            block.forward = stand_in(i)
    try:
        with preserved_modes(model, "eval"), torch.no_grad():
            for i, batch in enumerate(batches):
                inputs = language_model_inputs(model, batch)
                check_token_ids(model, inputs.get("input_ids"), f"calibration batch {i}")
                inputs = to_device(inputs, model_device(model))
                current = []
                try:
                    model(**inputs)
                except _Captured:
                    pass
                except UnsupportedModelError:
                    raise
                except Exception as e:
                    raise CalibrationError(f"calibration batch {i} ({describe(inputs)}) could not be fed to "
                                           f"{type(model).__name__}: {type(e).__name__}: {e}") from e
                if len(current) != len(blocks):
                    raise UnsupportedModelError(
                        f"{type(model).__name__} ran calibration batch {i} calling {len(current)} of the "
                        f"{len(blocks)} blocks in {where}: its blocks are not each called once as modules in its "
                        "forward(), so their inputs cannot be captured; name the ModuleList its forward() really "
                        "calls in the config's blocks key")
                calls.append(current)
    finally:
        for handle in handles:
            handle.remove()
        for block in blocks:
            block.__dict__.pop("forward", None)
    if not calls:
        raise CalibrationError("the calibration data yielded no batches; one-shot compression needs a few hundred "
                               "thousand tokens of representative text (e.g. 128 samples of 2048 tokens)")
    return CapturedInputs(hidden, calls)


def _shaped_like(output: Any, hidden: Tensor) -> Any:
    """``hidden`` in the structure of a block's output (a tensor, or a tuple with the hidden states first)."""
    block_output(output)  # the same structure check, and its error
    if isinstance(output, Tensor):
        return hidden
    rest = [hidden, *output[1:]]
    return tuple(rest) if isinstance(output, tuple) else rest


def block_output(out: Any) -> Tensor:
    """The hidden states a block returns (a tensor, or the first item of the tuple older transformers return)."""
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(hidden, Tensor):
        raise UnsupportedModelError(f"a block returned {type(out).__name__}; slimtorch expects the hidden states, "
                                    "as a tensor or the first item of a tuple")
    return hidden
