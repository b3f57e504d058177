#!/usr/bin/env python
"""Accuracy-aware post-training quantization of all-MiniLM-L6-v2: how many Linears must stay float for the
sentence embeddings to keep a mean cosine of at least 1 - tolerable_loss to the float model's, and what the search
costs; then an impossible criterion (tolerable_loss 0), to show the bound and the warning.

    python benchmarks/ptq_accuracy.py                          # ~5 min on 2 cores
    python benchmarks/ptq_accuracy.py --tolerable-loss 0.003 --json-out benchmarks/results/ptq_accuracy.json

Protocol (that of ``benchmarks/ptq.py``): all-MiniLM-L6-v2 (``_distill.load_minilm``: eval, dropout off);
paragraphs from ``_distill.paragraphs()``; calibration = the first ``--calib-batches`` x 8 training paragraphs,
held out = the first ``--held-out`` held-out paragraphs (disjoint), batches of 8, up to 128 tokens, padded per
batch. ``eval_fn`` = mean over the held-out paragraphs of the cosine between the candidate's and the float model's
sentence embeddings (mean pooling over the attention mask); the float baseline is 1. Criterion: absolute,
higher is better. Config: the default static section (uint8 asymmetric activations, minmax) plus the criterion.
Wall time = the whole ``quantize()`` call (calibration included); torch runs on ``--threads`` threads (1: on a
shared 2-core machine two threads spin-wait on each other).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")

import _distill as D  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import slimtorch as st  # noqa: E402

BATCH, MAX_LEN = 8, 128


def tokenize(tok, texts: Sequence[str]) -> List[Dict[str, torch.Tensor]]:
    return [dict(tok(list(texts[i:i + BATCH]), padding=True, truncation=True, max_length=MAX_LEN,
                     return_tensors="pt")) for i in range(0, len(texts), BATCH)]


@torch.no_grad()
def embed(model: torch.nn.Module, batches: Sequence[Dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([F.normalize(D.mean_pool(model(**b).last_hidden_state, b["attention_mask"]), dim=-1)
                      for b in batches])


def run_case(model, calib, held, ref, tolerable_loss: float, max_trials: int) -> dict:
    calls = {"n": 0}

    def mean_cosine(m: torch.nn.Module) -> float:
        calls["n"] += 1
        return float((embed(m, held) * ref).sum(-1).mean())

    cfg = {"compression_inference": {"static_quantization": {"enabled": True, "accuracy_criterion": {
        "tolerable_loss": tolerable_loss, "relative": False, "max_trials": max_trials}}}}
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = st.quantize(model, cfg, calib_dataloader=calib, eval_fn=mean_cosine, progress=False)
    wall = time.perf_counter() - started
    acc = st.quantization_report(q).accuracy
    assert calls["n"] == acc.eval_calls, (calls["n"], acc.eval_calls)
    return {"criterion": acc.criterion, "baseline": acc.baseline, "fully_quantized": acc.log[0].metric,
            "final": acc.final, "met": acc.met, "stopped_because": acc.stopped_because,
            "float_layers": [r.name for r in acc.fallback], "eval_calls": acc.eval_calls, "trials": acc.trials,
            "ranking_s": acc.ranking_seconds, "search_s": acc.seconds, "quantize_s": wall,
            "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)]}


def table(rows: List[dict]) -> str:
    head = ("criterion", "baseline", "int8 all", "final", "met", "float layers", "eval calls", "trials",
            "ranking s", "search s", "quantize() s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        names = ", ".join(r["float_layers"]) or "-"
        lines.append(f"| {r['criterion']} | {r['baseline']:.6f} | {r['fully_quantized']:.5f} | {r['final']:.5f} | "
                     f"{'yes' if r['met'] else 'no (' + r['stopped_because'] + ')'} | {len(r['float_layers'])}: "
                     f"{names} | {r['eval_calls']} | {r['trials']} | {r['ranking_s']:.1f} | {r['search_s']:.1f} | "
                     f"{r['quantize_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tolerable-loss", type=float, default=0.005, help="mean cosine >= 1 - this (default 0.005)")
    p.add_argument("--impossible-max-trials", type=int, default=5,
                   help="max_trials of the tolerable_loss 0 case (0 skips it)")
    p.add_argument("--calib-batches", type=int, default=32)
    p.add_argument("--held-out", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tok = D.load_minilm(train=False)
    train, held_texts = D.paragraphs()
    calib = tokenize(tok, train[:args.calib_batches * BATCH])
    held = tokenize(tok, held_texts[:args.held_out])
    ref = embed(model, held)

    rows = [run_case(model, calib, held, ref, args.tolerable_loss, 100)]
    if args.impossible_max_trials > 0:
        rows.append(run_case(model, calib, held, ref, 0.0, args.impossible_max_trials))
    print(f"all-MiniLM-L6-v2, static int8 (defaults), {len(calib)} calibration batches of {BATCH}, "
          f"{args.held_out} held-out paragraphs, torch threads {args.threads}")
    print(table(rows))
    for r in rows:
        for w in r["warnings"]:
            print(f"warning ({r['criterion']}): {w}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                             "environment": D.environment()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
