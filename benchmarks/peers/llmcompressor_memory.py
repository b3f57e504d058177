"""llm-compressor 0.14 on the job of benchmarks/llm_memory.py: GPTQ W4 (symmetric, group 128) in place on a
random-init Llama of TinyLlama's widths, float32, with the same random calibration sequences; peak RSS above the
loaded model and wall time, one JSON row on the last stdout line.

    venv="$(benchmarks/peers/setup_llmcompressor.sh)"
    "$venv/bin/python" benchmarks/peers/llmcompressor_memory.py --layers 8
    "$venv/bin/python" benchmarks/peers/llmcompressor_memory.py --layers 2 --samples 12   # a quick check

``python benchmarks/llm_memory.py --peers`` runs it beside slimtorch's rows. The model and the calibration are
built exactly as there (seed 0, then ``--samples`` sequences of 512 random token ids); the peak is the kernel's
high-water mark (VmHWM) reset once the model is built, so it covers llm-compressor's ``oneshot`` alone. The
sequences reach ``oneshot`` as a pre-tokenized ``datasets.Dataset`` (input_ids, attention_mask of ones), unshuffled,
batch 1; lm_head stays float on both sides. llm-compressor requires a processor whenever a dataset is given: SmolLM2's
tokenizer is passed (the ids are never decoded).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import List, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    """A module of benchmarks/ by path: llm_memory.py holds the widths and the RSS readers, and imports slimtorch
    only inside its own job (the slimtorch package is not installed in this venv)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tokenizer():
    """llm-compressor asks for a processor whenever a dataset is given, though the dataset here is already token ids
    (never decoded): SmolLM2's tokenizer from benchmarks/_smollm2.py's float32 cache (or its GGUF)."""
    from transformers import AutoTokenizer

    smollm2 = _load("_smollm2", HERE.parent / "_smollm2.py")
    cache = smollm2.cache_dir()
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache)
    return smollm2.load_smollm2()[1]


def run_one(layers: int, samples: int) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import LlamaConfig, LlamaForCausalLM

    M = _load("llm_memory", HERE.parent / "llm_memory.py")
    recipes = _load("llmcompressor_llm", HERE / "llmcompressor_llm.py")

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **M.WIDTHS)).eval()
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30
    loaded = M._rss_gb()
    M._reset_peak()
    calibration = torch.cat([torch.randint(0, M.WIDTHS["vocab_size"], (1, 512)) for _ in range(samples)])
    dataset = Dataset.from_dict({"input_ids": calibration.tolist(),
                                 "attention_mask": torch.ones_like(calibration).tolist()})
    config_dir = tempfile.TemporaryDirectory(prefix="random-llama-config-")
    model.config.save_pretrained(config_dir.name)  # oneshot rereads config.json from name_or_path
    model.config.name_or_path = config_dir.name
    processor = _tokenizer()
    start = time.perf_counter()
    oneshot(model=model, processor=processor, recipe=[recipes._gptq_int4(128)], dataset=dataset,
            max_seq_length=512, num_calibration_samples=samples, shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    return dict(layers=layers, model_gb=model_gb, loaded_gb=loaded, peak_gb=M._status_gb("VmHWM"), seconds=seconds,
                tokens=samples * 512, tool=f"llm-compressor {version('llmcompressor')}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--samples", type=int, default=12)
    args = parser.parse_args(argv)
    print(json.dumps(run_one(args.layers, args.samples)))


if __name__ == "__main__":
    sys.exit(main())
