#!/usr/bin/env python
"""Side-by-side pruning benchmark: slimtorch vs Intel Neural Compressor 3.7.1 vs one-shot magnitude.

all-MiniLM-L6-v2 is pruned to 2:4 with snip_momentum while distilling from the dense model on real text
(``_distill.py`` pins the protocol for both sides: data, batches 8 x 64, loss, AdamW, 60 pruning + 20 updates,
masks updated every 5 updates with exp decay, held-out embedding cosine). Prints one table:

    python benchmarks/pruning.py                    # 3 seeds, both libraries (~40 min on 2 cores)
    python benchmarks/pruning.py --seeds 0 --no-inc # slimtorch only, one seed

Quality is the held-out cosine to the dense model (mean over seeds, +- sample std over seeds, and the min over
paragraphs); overhead is the median, over the updates inside the pruning window, of the per-update time ratio
pruned / dense, the two updates run alternately (``_distill.interleaved_updates``); seed 0 is timed.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _distill as D  # noqa: E402
import torch  # noqa: E402

import slimtorch as st  # noqa: E402


def slimtorch_config(pattern: str, dense_ratio: float, attn_dense_ratio: float | None = None,
                     scope: str = "local") -> dict:
    shared = {"enabled": True, "method": "snip_momentum", "pattern": pattern, "dense_ratio": dense_ratio,
              "scope": scope,
              "sparsity_decay_type": D.DECAY, "start_step": D.START_STEP, "end_step": D.END_STEP,
              "frequency": D.FREQUENCY, "modules": [r"encoder\.layer\.\d+\."]}
    groups = {}
    if attn_dense_ratio is not None:
        groups["attn"] = {"params": {"dense_ratio": attn_dense_ratio}, "modules": [r"attention\.self\."]}
    return {"compression_training": {"sparse_pruning": {"shared_parameters": shared, "different_groups": groups}}}


def run_slimtorch(seed: int, pattern: str, dense_ratio: float, attn_dense_ratio: float | None, timed: bool,
                  scope: str = "local") -> dict:
    teacher, student, tok, heldout, batches, teacher_emb, opt = D.prepare_run(seed)
    dense = dense_opt = None
    if timed:
        _, dense, _ = D.load_teacher_and_student()
        dense_opt = D.make_optimizer(dense)
        D.warmup(dense, teacher, batches[0])
    D.warmup(student, teacher, batches[0])
    cb = st.prepare_pruning(student, slimtorch_config(pattern, dense_ratio, attn_dense_ratio, scope), optimizer=opt)
    start = time.time()
    if timed:
        res = D.interleaved_updates(lambda i: D.distill_update(student, teacher, batches[i], opt),
                                    lambda i: D.distill_update(dense, teacher, batches[i], dense_opt),
                                    len(batches))
        overhead = res.overhead()
    else:
        D.run_distillation(student, teacher, batches, opt, time_updates=False)
        overhead = {}
    wall = time.time() - start
    cb.finalize()
    mean, low = D.heldout_cosine(student, teacher, tok, heldout, teacher_emb=teacher_emb)
    report = st.sparsity_report(student)
    return {"seed": seed, "cos_mean": mean, "cos_min": low, "overhead": overhead, "wall_s": wall,
            "sparsity": report.overall_sparsity(), "pattern_valid": all(r.pattern_valid for r in report.pruned),
            "layers": len(report.pruned)}


def run_oneshot() -> dict:
    teacher, student, tok = D.load_teacher_and_student()
    _, heldout = D.paragraphs()
    D.oneshot_magnitude_nm(student, D.encoder_linears(student))
    mean, low = D.heldout_cosine(student, teacher, tok, heldout)
    return {"cos_mean": mean, "cos_min": low}


@functools.lru_cache(maxsize=1)
def inc_python() -> str:
    """setup_inc.sh builds (or reuses) the peer's venv, matching our transformers version; once per run."""
    venv = subprocess.run(["bash", str(HERE / "peers" / "setup_inc.sh")], check=True, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHON": sys.executable}).stdout.strip().splitlines()[-1]
    return str(Path(venv) / "bin" / "python")


def run_inc(seed: int, args, timed: bool, scope: str = "local") -> dict:
    python = inc_python()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "inc.json"
        # INC reads "N:M" as N pruned of M: the same as ours for 2:4 (the only N:M this driver passes through)
        if ":" in args.pattern and args.pattern != "2:4":
            raise SystemExit("only 2:4 means the same to INC and slimtorch; compare other N:M by hand")
        cmd = [python, str(HERE / "peers" / "inc_pruning.py"), "--seed", str(seed), "--pattern", args.pattern,
               "--target-sparsity", str(1 - args.dense_ratio), "--scope", scope, "--json-out", str(out)]
        if args.attn_dense_ratio is not None:
            cmd += ["--attn-sparsity", str(1 - args.attn_dense_ratio)]
        if not timed:
            cmd.append("--no-timing")
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def summarise(name: str, runs: list, key_overhead=("overhead", "median_ratio")) -> dict:
    means = [r["cos_mean"] for r in runs]
    timed = [r for r in runs if r.get(key_overhead[0])]
    overhead = timed[0][key_overhead[0]].get(key_overhead[1]) if timed else None
    return {"name": name, "cos_mean": statistics.mean(means),
            "cos_std": statistics.stdev(means) if len(means) > 1 else 0.0,
            "cos_min": min(r["cos_min"] for r in runs), "overhead": overhead,
            "per_seed": [round(m, 4) for m in means]}


def print_table(rows: list, args) -> None:
    print(f"\nall-MiniLM-L6-v2, snip_momentum {args.pattern} (dense_ratio {args.dense_ratio}), distillation on "
          f"pydoc_data, {D.PRUNING_STEPS} pruning + {D.EXTRA_STEPS} updates, batch {D.BATCH_SIZE}x{D.SEQ_LEN}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'method':<34} {'cosine mean +- std':>20} {'min':>7} {'per seed':>26} {'overhead':>9}")
    for r in rows:
        std = f"{r['cos_mean']:.4f} +- {r['cos_std']:.4f}" if r["cos_std"] else f"{r['cos_mean']:.4f}"
        over = f"{r['overhead']:.3f}x" if r.get("overhead") else "-"
        seeds = ", ".join(f"{x:.4f}" for x in r.get("per_seed", [])) or "-"
        print(f"{r['name']:<34} {std:>20} {r['cos_min']:>7.4f} {seeds:>26} {over:>9}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(D.SEEDS))
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--dense-ratio", type=float, default=0.5)
    ap.add_argument("--attn-dense-ratio", type=float, default=None)
    ap.add_argument("--scopes", nargs="+", default=["local"], choices=["local", "global"],
                    help="scope(s) of both libraries; snip_momentum's default is global, the 2:4 rows are local")
    ap.add_argument("--inc-scopes", nargs="+", default=None, choices=["local", "global"],
                    help="scope(s) of INC's runs (default: --scopes)")
    ap.add_argument("--no-inc", action="store_true", help="skip Intel Neural Compressor")
    ap.add_argument("--no-timing", action="store_true", help="time no seed (no interleaved dense student: half the "
                    "run time; the overhead column stays empty)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    args.inc_scopes = args.inc_scopes or args.scopes
    results = {"slimtorch": [], "inc": [], "oneshot": None, "env": D.environment(), "args": vars(args)}
    for seed in args.seeds:
        timed = seed == args.seeds[0] and not args.no_timing
        for scope in args.scopes:
            run = run_slimtorch(seed, args.pattern, args.dense_ratio, args.attn_dense_ratio, timed, scope)
            results["slimtorch"].append({**run, "scope": scope})
            print("slimtorch", json.dumps(results["slimtorch"][-1]), flush=True)
        if not args.no_inc:
            for scope in args.inc_scopes:
                results["inc"].append({**run_inc(seed, args, timed, scope), "scope": scope})
                print("inc", json.dumps({k: v for k, v in results["inc"][-1].items() if k != "layers"}), flush=True)
    rows = [summarise(f"slimtorch snip_momentum, {scope}", [r for r in results["slimtorch"] if r["scope"] == scope])
            for scope in args.scopes]
    for scope in args.inc_scopes if results["inc"] else ():
        rows.append(summarise(f"Intel Neural Compressor 3.7.1, {scope}",
                              [r for r in results["inc"] if r["scope"] == scope]))
    if args.pattern == "2:4":
        results["oneshot"] = run_oneshot()
        rows.append({"name": "one-shot magnitude 2:4, no training", "cos_std": 0.0, "per_seed": [],
                     **results["oneshot"]})
    print_table(rows, args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, **results}, indent=1))


if __name__ == "__main__":
    main()
