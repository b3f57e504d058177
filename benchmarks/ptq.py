#!/usr/bin/env python
"""Issue 3 acceptance benchmark: post-training int8 quantization of all-MiniLM-L6-v2, exported to ONNX and run in
ONNX Runtime, side by side with ONNX Runtime's own ``quantize_static`` and ``quantize_dynamic``.

    python benchmarks/ptq.py                        # ~6-9 min on 2 cores
    python benchmarks/ptq.py --rounds 30 --json-out benchmarks/results/ptq.json
    python benchmarks/ptq.py --variant 'mine={"compression_inference": {"static_quantization": {"enabled": true}}}'

Protocol (one run, everything side by side):

* Model: all-MiniLM-L6-v2 (``_distill.load_minilm``: eval, dropout off). The ONNX graphs take ``input_ids``,
  ``attention_mask``, ``token_type_ids`` (batch and sequence axes dynamic) and return ``last_hidden_state``.
* Float reference: the float PyTorch model. Float ONNX: ``slimtorch.export_onnx`` when it exists (the same function
  then exports the quantized models: a fair comparison), else ``torch.onnx.export`` with the legacy TorchScript
  exporter (``dynamo=False``, opset 17, constant folding).
* Data: ``_distill.paragraphs()``; calibration = the first ``--calib-batches`` x 8 training paragraphs (up to 128
  tokens, padded per batch); evaluation = the ``--held-out`` held-out paragraphs (disjoint), batches of 8, up to
  128 tokens, padded per batch.
* Accuracy: sentence embeddings (mean pooling over the attention mask, L2-normalised) of each held-out paragraph,
  cosine to the float PyTorch model's: mean and min. slimtorch variants also report the PyTorch QDQ model's cosine
  (before export).
* Speed: ONNX Runtime, CPUExecutionProvider, intra_op_num_threads 2, inter_op_num_threads 1, default graph
  optimizations (ORT_ENABLE_ALL), one fixed batch of 8 x 128 tokens. Every session is warmed up 3 times, then all
  variants run round-robin for ``--rounds`` rounds (start rotated each round, Python GC paused) so that the
  machine's noise hits them alike; an untimed ``--pause-ms`` sleep (50) precedes each timed run, so that the
  previous session's spinning worker threads do not run on top of it (see ``interleaved_latency``). Reported:
  median latency, speed-up = float median / variant median, the median over rounds of the per-round ratio
  float / variant, and that median over the quiet rounds only (see ``speed_stats``).
* Quantize wall time: from the float model (PyTorch for slimtorch, float ONNX for ONNX Runtime's tools) to the
  quantized ONNX file, calibration included.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")  # slimtorch's calibration progress bars

import _distill as D  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
BATCH = 8
MAX_LEN = 128
THREADS = 2
WARMUP = 3

SLIMTORCH_VARIANTS: List[Tuple[str, dict]] = [
    ("slimtorch static (defaults)",
     {"compression_inference": {"static_quantization": {"enabled": True}}}),
    ("slimtorch static int8 symmetric act",
     {"compression_inference": {"static_quantization": {
         "enabled": True, "activation": {"dtype": "int8", "scheme": "symmetric"}}}}),
    ("slimtorch static uint8 asymmetric act",
     {"compression_inference": {"static_quantization": {
         "enabled": True, "activation": {"dtype": "uint8", "scheme": "asymmetric"}}}}),
    ("slimtorch static + smoothquant",
     {"compression_inference": {"static_quantization": {
         "enabled": True, "smoothquant": {"enabled": True, "alpha": 0.5}}}}),
    ("slimtorch dynamic",
     {"compression_inference": {"dynamic_quantization": {"enabled": True}}}),
]


# --------------------------------------------------------------------------------------------------------------------
# seeds, data, reference
# --------------------------------------------------------------------------------------------------------------------
def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class HiddenOnly(torch.nn.Module):
    """Positional (input_ids, attention_mask, token_type_ids) -> last_hidden_state, for the exporters."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def tokenize(tok, texts: Sequence[str], *, pad_to_max: bool = False) -> Dict[str, torch.Tensor]:
    enc = tok(list(texts), padding="max_length" if pad_to_max else True, truncation=True, max_length=MAX_LEN,
              return_tensors="pt")
    return {k: enc[k] for k in INPUT_NAMES}


def load_data(calib_batches: int = 32, held_out: int = 256):
    """-> (model, tok, calib [dicts], held [dicts], timing_feed dict). Calibration and held-out paragraphs are
    disjoint (``_distill.paragraphs``)."""
    model, tok = D.load_minilm(train=False)
    train, held = D.paragraphs()
    if calib_batches * BATCH > len(train):
        raise SystemExit(f"--calib-batches {calib_batches} needs {calib_batches * BATCH} paragraphs; "
                         f"only {len(train)} training paragraphs")
    if held_out > len(held):
        raise SystemExit(f"--held-out {held_out}: only {len(held)} held-out paragraphs")
    calib = [tokenize(tok, train[i:i + BATCH]) for i in range(0, calib_batches * BATCH, BATCH)]
    held_batches = [tokenize(tok, held[i:i + BATCH]) for i in range(0, held_out, BATCH)]
    # the timing batch: 8 held-out paragraphs, truncated / padded to exactly 128 tokens
    timing = tokenize(tok, held[:BATCH], pad_to_max=True)
    return model, tok, calib, held_batches, timing


def set_attention(model: torch.nn.Module, impl: str) -> None:
    """Switch the attention implementation ("sdpa", transformers' default, or "eager") before export. Both compute
    the same function; the legacy exporter writes sdpa with per-layer IsNaN/Where guards around the softmax."""
    if getattr(model.config, "_attn_implementation", None) == impl:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.normalize(D.mean_pool(hidden.float(), mask).float(), dim=-1)


@torch.no_grad()
def torch_embed(model: torch.nn.Module, batches: Sequence[Dict[str, torch.Tensor]]) -> torch.Tensor:
    out = []
    for b in batches:
        o = model(**b)
        hidden = o.last_hidden_state if hasattr(o, "last_hidden_state") else (o[0] if isinstance(o, (tuple, list))
                                                                               else o)
        out.append(pooled(hidden, b["attention_mask"]))
    return torch.cat(out)


def cos_stats(emb: torch.Tensor, ref: torch.Tensor) -> Tuple[float, float]:
    c = (emb * ref).sum(-1)
    return float(c.mean()), float(c.min())


# --------------------------------------------------------------------------------------------------------------------
# ONNX Runtime
# --------------------------------------------------------------------------------------------------------------------
def session_options(optimized_model_filepath: Optional[str] = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    # graph_optimization_level left at the Python default (ORT_ENABLE_ALL)
    if optimized_model_filepath:
        so.optimized_model_filepath = optimized_model_filepath
    so.log_severity_level = 3
    return so


def make_session(path: str, optimized_model_filepath: Optional[str] = None):
    import onnxruntime as ort

    return ort.InferenceSession(path, session_options(optimized_model_filepath), providers=["CPUExecutionProvider"])


def feed_for(sess, batch: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """Map a tokenizer batch onto the session's inputs: by name, else by position."""
    names = [i.name for i in sess.get_inputs()]
    if all(n in batch for n in names):
        return {n: batch[n].numpy() for n in names}
    vals = [batch[k] for k in INPUT_NAMES]
    return {n: v.numpy() for n, v in zip(names, vals)}


def ort_embed(sess, batches: Sequence[Dict[str, torch.Tensor]]) -> torch.Tensor:
    out = []
    for b in batches:
        hidden = torch.from_numpy(sess.run(None, feed_for(sess, b))[0])
        out.append(pooled(hidden, b["attention_mask"]))
    return torch.cat(out)


PAUSE_S = 0.05


def interleaved_latency(sessions: Dict[str, object], batch: Dict[str, torch.Tensor], rounds: int,
                        warmup: int = WARMUP, pause_s: float = PAUSE_S) -> Dict[str, List[float]]:
    """Warm every session ``warmup`` times, then ``rounds`` rounds in which each session runs once, the starting
    session rotating each round. -> {name: [seconds per round]}.

    Each timed run is preceded by a ``pause_s`` sleep (untimed): ONNX Runtime's intra-op worker threads spin for a
    while after a run (allow_spinning, on by default), so a session started right after another one shares the 2
    cores with the other session's spinning threads. Measured on this machine, back-to-back interleaving slowed
    every run by ~30 ms (float 130 -> 165 ms, int8 57 -> 89 ms) and compressed the int8 speed-ups from ~2.2x to
    ~1.8x; with a 50 ms pause interleaved timings equal timings of each session alone."""
    names = list(sessions)
    feeds = {n: feed_for(sessions[n], batch) for n in names}
    for n in names:
        for _ in range(warmup):
            sessions[n].run(None, feeds[n])
    times: Dict[str, List[float]] = {n: [] for n in names}
    gc_on = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                if pause_s:
                    time.sleep(pause_s)
                t0 = time.perf_counter()
                sessions[n].run(None, feeds[n])
                times[n].append(time.perf_counter() - t0)
    finally:
        if gc_on:
            gc.enable()
    return times


def speed_stats(times: Dict[str, List[float]], base: str) -> Dict[str, Dict[str, float]]:
    """Per variant: median latency, speed-up (ratio of medians), median over rounds of the per-round ratio, and
    the same median over the "quiet" rounds only (the float run within 1.25x of its fastest round: the machine is
    shared, and a round where the baseline itself was slowed down measures the neighbours, not the model)."""
    b = times[base]
    quiet = [i for i, x in enumerate(b) if x <= 1.25 * min(b)]
    out = {}
    for n, t in times.items():
        out[n] = {
            "median_ms": 1e3 * statistics.median(t),
            "min_ms": 1e3 * min(t),
            "speedup": statistics.median(b) / statistics.median(t),
            "median_round_ratio": statistics.median(x / y for x, y in zip(b, t)),
            "quiet_round_ratio": statistics.median(b[i] / t[i] for i in quiet),
            "n_quiet": len(quiet),
            "times_ms": [round(1e3 * x, 2) for x in t],
        }
    return out


def op_counts(path: str) -> Dict[str, int]:
    import collections

    import onnx

    m = onnx.load(path, load_external_data=False)
    return dict(sorted(collections.Counter(n.op_type for n in m.graph.node).items()))


# --------------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------------
def legacy_export(model: torch.nn.Module, example: Dict[str, torch.Tensor], path: str, opset: int = 17) -> None:
    """torch.onnx.export with the legacy TorchScript exporter (dynamo=False), batch and sequence axes dynamic."""
    axes = {n: {0: "batch", 1: "sequence"} for n in (*INPUT_NAMES, OUTPUT_NAME)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(HiddenOnly(model).eval(), tuple(example[k] for k in INPUT_NAMES), path, dynamo=False,
                          opset_version=opset, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          dynamic_axes=axes, do_constant_folding=True)


def export(model: torch.nn.Module, example: Dict[str, torch.Tensor], path: str, *, prefer_slimtorch: bool = True
           ) -> str:
    """Export with slimtorch.export_onnx when available (and asked for), else the legacy exporter.
    -> 'slimtorch.export_onnx' or 'torch.onnx.export(dynamo=False)'."""
    import slimtorch

    if prefer_slimtorch and hasattr(slimtorch, "export_onnx"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slimtorch.export_onnx(HiddenOnly(model).eval(), tuple(example[k] for k in INPUT_NAMES), path, opset=17)
        return "slimtorch.export_onnx"
    legacy_export(model, example, path)
    return "torch.onnx.export(dynamo=False)"


# --------------------------------------------------------------------------------------------------------------------
# ONNX Runtime's own quantizers
# --------------------------------------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, input_names: Sequence[str], calib: Sequence[Dict[str, torch.Tensor]]):
        self.feeds = [{n: b[k].numpy() for n, k in zip(input_names, INPUT_NAMES)} for b in calib]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


ORT_PEERS = ("static_default", "static_u8s8", "dynamic")


def ort_peers(float_path: str, calib, tmp: str, which: Sequence[str] = ORT_PEERS
              ) -> List[Tuple[str, str, float, str]]:
    # ONNX Runtime's quantizer writes uuid-named external-data files into the working directory: keep them in tmp
    import contextlib
    with contextlib.chdir(tmp):
        return _ort_peers(float_path, calib, tmp, which)


def _ort_peers(float_path: str, calib, tmp: str, which: Sequence[str]) -> List[Tuple[str, str, float, str]]:
    """Run ONNX Runtime's quantizers on the float ONNX file. -> [(label, path, wall_s, note)].
    which: any of "static_default" (QDQ, all op types, S8S8), "static_u8s8" (QDQ, MatMul only, U8S8, per-channel
    weights), "dynamic" (quantize_dynamic, int8 weights, defaults)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_names = [i.name for i in onnx.load(float_path, load_external_data=False).graph.input]

    class Reader(_Reader, CalibrationDataReader):
        pass

    out = []
    # ORT's docs recommend quant_pre_process (symbolic shape inference + ORT basic optimizations) before static
    # quantization; its time is counted in the static variants' wall time.
    t0 = time.perf_counter()
    pre = os.path.join(tmp, "float_pre.onnx")
    pre_note = ""
    try:
        quant_pre_process(float_path, pre, skip_symbolic_shape=False)
    except Exception as e:  # noqa: BLE001
        try:
            quant_pre_process(float_path, pre, skip_symbolic_shape=True)
            pre_note = "pre_process without symbolic shape inference"
        except Exception as e2:  # noqa: BLE001
            pre, pre_note = float_path, f"no pre_process ({type(e).__name__}: {e}; {type(e2).__name__})"
    pre_s = time.perf_counter() - t0

    specs = [
        ("static_default", "ORT quantize_static QDQ (defaults)", {}),
        ("static_u8s8", "ORT quantize_static QDQ MatMul U8S8 per-channel",
         dict(op_types_to_quantize=["MatMul"], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
              per_channel=True)),
    ]
    specs = [(label, kw) for key, label, kw in specs if key in which]
    for label, kw in specs:
        path = os.path.join(tmp, f"ort_static_{len(out)}.onnx")
        t0 = time.perf_counter()
        try:
            quantize_static(pre, path, Reader(input_names, calib), quant_format=QuantFormat.QDQ, **kw)
            out.append((label, path, pre_s + time.perf_counter() - t0, pre_note))
        except Exception as e:  # noqa: BLE001
            print(f"  {label}: FAILED {type(e).__name__}: {e}")
    if "dynamic" not in which:
        return out
    path = os.path.join(tmp, "ort_dynamic.onnx")
    t0 = time.perf_counter()
    try:
        quantize_dynamic(float_path, path, weight_type=QuantType.QInt8)
        out.append(("ORT quantize_dynamic int8 (defaults)", path, time.perf_counter() - t0, ""))
    except Exception as e:  # noqa: BLE001
        print(f"  ORT quantize_dynamic: FAILED {type(e).__name__}: {e}")
    return out


# --------------------------------------------------------------------------------------------------------------------
# slimtorch
# --------------------------------------------------------------------------------------------------------------------
def slimtorch_variant(model, cfg: dict, calib, held, ref, example, path: str):
    """quantize + export one slimtorch config. -> (wall_s, torch cosine (mean, min), note)."""
    import slimtorch

    t0 = time.perf_counter()
    config = slimtorch.load_config(cfg)
    q = slimtorch.quantize(copy.deepcopy(model), config, calib_dataloader=calib)
    q.eval()
    export(q, example, path, prefer_slimtorch=True)
    wall = time.perf_counter() - t0
    torch_cos = cos_stats(torch_embed(q, held), ref)
    return wall, torch_cos


# --------------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------------
def fmt_table(rows: List[dict]) -> str:
    head = ("| variant | cosine mean | cosine min | PyTorch QDQ cosine mean (min) | median ms | speed-up | "
            "median round ratio | quiet-round ratio | quantize s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        tq = r.get("torch_cosine")
        tq_s = f"{tq[0]:.4f} ({tq[1]:.4f})" if tq else ""
        lines.append(f"| {r['variant']} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {tq_s} | "
                     f"{r['median_ms']:.1f} | {r['speedup']:.2f}x | {r['median_round_ratio']:.2f}x | "
                     f"{r['quiet_round_ratio']:.2f}x ({r['n_quiet']}) | "
                     f"{'' if r.get('quantize_s') is None else format(r['quantize_s'], '.1f')} |")
    return "\n".join(lines)


def parse_variant(text: str) -> Tuple[str, dict]:
    name, sep, js = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError("--variant takes name=JSON")
    try:
        return name.strip(), json.loads(js)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--variant {name}: bad JSON: {e}") from e


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calib-batches", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--pause-ms", type=float, default=1e3 * PAUSE_S,
                    help="untimed sleep before each timed run (lets the previous session's spinning threads stop)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--variant", action="append", type=parse_variant, default=[],
                    help="extra slimtorch variant: name=JSON config (repeatable)")
    ap.add_argument("--no-default-variants", action="store_true", help="run only the --variant configs")
    ap.add_argument("--no-ort-peers", action="store_true")
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                    help="attention implementation for every export (sdpa: as loaded, transformers' default; "
                         "eager: no per-layer IsNaN/Where guards). The float reference is computed before the switch")
    args = ap.parse_args(argv)

    seed_everything(0)
    torch.set_num_threads(THREADS)
    import onnxruntime as ort

    import slimtorch

    t_start = time.perf_counter()
    model, tok, calib, held, timing = load_data(args.calib_batches, args.held_out)
    ref = torch_embed(model, held)
    set_attention(model, args.attn)
    n_held = sum(b["input_ids"].shape[0] for b in held)
    print(f"all-MiniLM-L6-v2; calibration {len(calib)} x {BATCH} paragraphs, held-out {n_held} paragraphs "
          f"(<= {MAX_LEN} tokens); ORT {ort.__version__}, torch {torch.__version__}; timing batch "
          f"{BATCH} x {MAX_LEN}, {args.rounds} interleaved rounds, {THREADS} threads, {args.attn} attention")

    rows: Dict[str, dict] = {}
    paths: Dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="slimtorch_ptq_") as tmp:
        float_path = os.path.join(tmp, "float.onnx")
        t0 = time.perf_counter()
        try:
            how = export(model, timing, float_path)
        except Exception as e:  # noqa: BLE001
            print(f"note: slimtorch.export_onnx failed on the float model ({type(e).__name__}: {e}); "
                  "legacy exporter used")
            how = export(model, timing, float_path, prefer_slimtorch=False)
        print(f"float ONNX: {how}, {time.perf_counter() - t0:.1f} s")
        paths["float ONNX"] = float_path
        rows["float ONNX"] = {"quantize_s": None}

        if not args.no_ort_peers:
            for label, path, wall, note in ort_peers(float_path, calib, tmp):
                paths[label] = path
                rows[label] = {"quantize_s": wall, "note": note}
                print(f"{label}: {wall:.1f} s {note}")

        variants = ([] if args.no_default_variants else list(SLIMTORCH_VARIANTS)) + list(args.variant)
        if variants and not hasattr(slimtorch, "quantize"):
            print("note: slimtorch.quantize does not exist yet; slimtorch variants skipped")
            variants = []
        if variants and not hasattr(slimtorch, "export_onnx"):
            print("note: slimtorch.export_onnx does not exist yet; slimtorch variants exported with the legacy "
                  "exporter (QDQ modules may not export)")
        for i, (label, cfg) in enumerate(variants):
            path = os.path.join(tmp, f"slim_{i}.onnx")
            try:
                wall, tcos = slimtorch_variant(model, cfg, calib, held, ref, timing, path)
            except Exception as e:  # noqa: BLE001
                print(f"{label}: FAILED {type(e).__name__}: {e}")
                traceback.print_exc(limit=3)
                continue
            paths[label] = path
            rows[label] = {"quantize_s": wall, "torch_cosine": tcos, "config": cfg}
            print(f"{label}: {wall:.1f} s, PyTorch QDQ cosine {tcos[0]:.4f} ({tcos[1]:.4f})")

        sessions = {}
        for label in list(paths):
            try:
                sessions[label] = make_session(paths[label])
            except Exception as e:  # noqa: BLE001
                print(f"{label}: ONNX Runtime cannot open it: {type(e).__name__}: {e}")
                rows.pop(label)
                continue
            rows[label]["cos_mean"], rows[label]["cos_min"] = cos_stats(ort_embed(sessions[label], held), ref)
            rows[label]["file_mb"] = os.path.getsize(paths[label]) / 2**20
            rows[label]["ops"] = op_counts(paths[label])

        times = interleaved_latency(sessions, timing, args.rounds, pause_s=args.pause_ms / 1e3)
        for label, s in speed_stats(times, "float ONNX").items():
            rows[label].update(s)

    table = fmt_table([{"variant": k, **v} for k, v in rows.items()])
    print()
    print(table)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json_out:
        rec = {
            "benchmark": "ptq", "model": "all-MiniLM-L6-v2", "float_export": how, "attn": args.attn,
            "calib_batches": len(calib), "held_out": n_held, "batch": BATCH, "max_len": MAX_LEN,
            "rounds": args.rounds, "pause_ms": args.pause_ms, "threads": THREADS,
            "environment": {**D.environment(), "onnxruntime": ort.__version__, "python": platform.python_version()},
            "variants": rows,
        }
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(rec, indent=1))
        print(f"saved {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
