"""Memory and time of slimtorch.oneshot (GPTQ W4, group 128, in place) on random-init Llamas of TinyLlama's widths:
peak RSS above the loaded model, and whether wall time grows linearly with the number of blocks.

    python benchmarks/llm_memory.py                      # 8 and 16 layers (about 10 min on 2 CPU cores)
    python benchmarks/llm_memory.py --layers 4 8 --samples 12
    python benchmarks/llm_memory.py --peers              # each size's llm-compressor 0.14 run beside it

Each size runs in its own subprocess; the peak RSS is the kernel's high-water mark (VmHWM), reset once the model is
built, so it covers ``oneshot`` alone. The model: hidden 2048,
intermediate 5632, 32 query heads and 4 KV heads, vocabulary 32,000, untied lm_head, float32, weights drawn with
seed 0 (16 layers: 0.84 B parameters, 3.4 GB). Calibration: ``--samples`` random sequences of 512 tokens (GPTQ
needs at least as many tokens as a layer's input width: 5,632 for down_proj). What the pipeline holds besides the
model is in docs/llm.md: the hidden states of the calibration set (twice), every block's keyword arguments, and the
Hessians of one block (down_proj's 5632 x 5632 float32 is 127 MB).

``--peers`` runs llm-compressor's GPTQModifier on the same job after each size (benchmarks/peers/
llmcompressor_memory.py, in the venv of benchmarks/peers/setup_llmcompressor.sh), one process at a time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

WIDTHS = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
              num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=2048)


def _status_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def _rss_gb() -> float:
    return _status_gb("VmRSS")


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_one(layers: int, samples: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import slimtorch

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **WIDTHS)).eval()
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30
    loaded = _rss_gb()
    _reset_peak()  # building the model (random init) is not part of what is measured
    calibration = [torch.randint(0, WIDTHS["vocab_size"], (1, 512)) for _ in range(samples)]
    config = {"compression_inference": {"weight_only_quantization": {"enabled": True, "bits": 4, "group_size": 128,
                                                                     "algorithm": "gptq"}}}
    start = time.perf_counter()
    slimtorch.oneshot(model, config, calibration, inplace=True, progress=False)
    seconds = time.perf_counter() - start
    peak = _status_gb("VmHWM")
    return dict(layers=layers, model_gb=model_gb,
                loaded_gb=loaded, peak_gb=peak, seconds=seconds, tokens=samples * 512)


def _job(command: List[str], what: str) -> dict:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--peers", action="store_true", help="run llm-compressor's GPTQ on each size too")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.samples)))
        return
    venv = None
    if args.peers:
        from llm import _peer_venv  # benchmarks/llm.py builds (or reuses) the llm-compressor venv

        venv = _peer_venv()
    rows, peers = [], []
    for layers in args.layers:
        rows.append(_job([sys.executable, __file__, "--one", str(layers), "--samples", str(args.samples)],
                         f"{layers} layers"))
        if venv is not None:
            peers.append(_job([f"{venv}/bin/python", str(Path(__file__).parent / "peers" / "llmcompressor_memory.py"),
                               "--layers", str(layers), "--samples", str(args.samples)],
                              f"llm-compressor, {layers} layers"))
    print(f"oneshot GPTQ W4 group 128 in place, {rows[0]['tokens']} calibration tokens, random-init Llama "
          "(TinyLlama widths), float32, 2 CPU cores, one process at a time\n")
    print("| tool | layers | float32 weights GB | RSS loaded GB | peak RSS GB | peak - loaded GB | wall s | "
          "s per layer |")
    print("|---|---|---|---|---|---|---|---|")
    for r in [dict(tool="slimtorch", **r) for r in rows] + peers:
        print(f"| {r['tool']} | {r['layers']} | {r['model_gb']:.2f} | {r['loaded_gb']:.2f} | {r['peak_gb']:.2f} | "
              f"{r['peak_gb'] - r['loaded_gb']:.2f} | {r['seconds']:.0f} | {r['seconds'] / r['layers']:.1f} |")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"\nwall time ratio {b['layers']} / {a['layers']} layers: {b['seconds'] / a['seconds']:.2f} "
              f"(linear: {b['layers'] / a['layers']:.2f})")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(dict(slimtorch=rows, peers=peers), indent=2))


if __name__ == "__main__":
    main()
