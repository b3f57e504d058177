#!/usr/bin/env python
"""What slimming gains: the dense model, its masked twin and the slim model (``slimtorch.slim``) timed side by side.

    python benchmarks/slimming.py                     # both models, ~4 min on 2 cores
    python benchmarks/slimming.py --only minilm --rounds 30 --json-out benchmarks/results/slimming.json
    python benchmarks/slimming.py --peers             # + Torch-Pruning 1.6.1's MiniLM at the same structure
    python benchmarks/slimming.py --only smollm2      # SmolLM2-135M: 25% FFN width one-shot, perplexity, latency
    python benchmarks/slimming.py --only minilm --train --peers   # pruned while distilling, beside Torch-Pruning
    python benchmarks/slimming.py --only round_to     # uneven FFN widths slimmed with round_to 1..64, timed

all-MiniLM-L6-v2, ONNX Runtime (the protocol of benchmarks/ptq.py: CPUExecutionProvider, 2 intra-op threads, one
batch of 8 x 128 tokens, sessions warmed up then run round-robin with a 50 ms untimed pause, medians):

* structure: half of every layer's FFN units (``output.dense`` input columns, the lowest L2 norms) and half of
  its heads (``attention.output.dense`` column blocks of 32, the lowest norms) zeroed at once, *without* training
  (this measures speed; accuracy needs the fine-tuning protocol of examples/prune_minilm.py);
* files: dense fp32, slim fp32, dense static int8 and slim static int8 (``slimtorch.quantize`` defaults, 8 x 8
  calibration paragraphs), all exported by ``slimtorch.export_onnx``;
* ``--train``: the same structure pruned progressively while distilling from the dense model (benchmarks/_distill.py:
  80 AdamW updates on real text, snip_momentum masks every 5 updates from 0 to 60 on a linear schedule, every layer
  alike), then finalized and slimmed; with ``--peers`` Torch-Pruning 1.6.1 prunes the same units in the same
  protocol, iteratively at the same updates and one-shot before it; held-out cosine over the protocol's 256
  paragraphs;
* reported: median latency and speed-up over dense fp32; the slim model's largest output difference from the masked
  model (``slim_report``), and sentence-embedding cosines to the dense model on 64 held-out paragraphs.
* ``--peers``: Torch-Pruning 1.6.1 prunes the same structure (half the FFN units, half the heads, its own magnitude
  importance; benchmarks/peers/torch_pruning_minilm.py in the venv of benchmarks/peers/setup_torch_pruning.sh); its
  pruned module is loaded here and exported by the same exporter, so the ONNX files differ only in which units
  each tool kept.

EfficientNet-lite0, PyTorch eager on the CPU (2 threads, batch 32 x 3 x 224 x 224, round-robin, medians): 30% of
every MBConv block's expansion channels (lowest L2 norms) zeroed with their BatchNorm, then slimmed; top-1 agreement
of the slim model with the masked one on sklearn's sample-image crops.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import ptq as P  # noqa: E402

import slimtorch as st  # noqa: E402


def mask_minilm(model: torch.nn.Module, ffn_keep: float = 0.5, heads_keep: float = 0.5, head_dim: int = 32) -> None:
    """Zero the lowest-norm FFN units and heads of every layer, through the consumers' columns (in place)."""
    with torch.no_grad():
        for layer in model.encoder.layer:
            down = layer.output.dense.weight
            drop = down.norm(dim=0).argsort()[: int(round((1 - ffn_keep) * down.shape[1]))]
            down[:, drop] = 0
            out = layer.attention.output.dense.weight
            heads = out.shape[1] // head_dim
            norms = out.reshape(out.shape[0], heads, head_dim).norm(dim=(0, 2))
            for h in norms.argsort()[: int(round((1 - heads_keep) * heads))].tolist():
                out[:, h * head_dim:(h + 1) * head_dim] = 0


#: slimtorch's side of ``--train``: the units of the untrained structure, pruned progressively by snip_momentum while
#: distilling (benchmarks/_distill.py's protocol: 80 updates, masks every 5 from 0 to 60), every layer alike (local
#: scope) and on a linear schedule, so that Torch-Pruning's iterative run removes the same units at the same updates
TRAIN_CONFIG = {"compression_training": {"sparse_pruning": {
    "shared_parameters": {"enabled": True, "method": "snip_momentum", "scope": "local", "sparsity_decay_type": "linear",
                          "start_step": 0, "end_step": 60, "frequency": 5},
    "different_groups": {
        "ffn_units": {"params": {"pattern": "channelx1", "dense_ratio": 0.5},
                      "modules": ["layer\\.\\d+\\.output\\.dense"]},
        "heads": {"params": {"pattern": "channelx32", "dense_ratio": 0.5},
                  "modules": ["attention\\.output\\.dense"]}}}}}


def onnx_latency(variants: Dict[str, torch.nn.Module], timing, rounds: int, tmp: str) -> Dict[str, List[float]]:
    """Each model exported by slimtorch.export_onnx into ``tmp`` and timed in ONNX Runtime, round-robin."""
    sessions = {}
    for name, m in variants.items():
        path = f"{tmp}/{name.replace(' ', '_')}.onnx"
        P.export(m.eval(), timing, path)
        sessions[name] = P.make_session(path)
    return P.interleaved_latency(sessions, timing, rounds)


def trained_minilm(seed: int = 0):
    """slimtorch's progressive pruning with distillation -> (finalized student, teacher, tokenizer, held-out texts)."""
    import _distill as D

    run = D.prepare_run(seed)
    cb = st.prepare_pruning(run.student, TRAIN_CONFIG, optimizer=run.optimizer)
    start = time.perf_counter()
    D.run_distillation(run.student, run.teacher, run.batches, run.optimizer, time_updates=False)
    print(f"slimtorch: 80 distillation updates with progressive pruning in {time.perf_counter() - start:.0f} s")
    cb.finalize()
    return run.student.eval(), run


def torch_pruning_model(tmp: str, train: Optional[str] = None, seed: int = 0) -> Optional[torch.nn.Module]:
    """Torch-Pruning's pruned MiniLM, built in its own venv and loaded whole (the same transformers version);
    ``train``: pruned inside the distillation protocol (``iterative`` or ``oneshot``). None when Torch-Pruning
    itself failed (printed)."""
    import subprocess

    setup = subprocess.run(["bash", str(HERE / "peers" / "setup_torch_pruning.sh")], capture_output=True, text=True,
                           env={**os.environ, "PYTHON": sys.executable})
    if setup.returncode != 0:
        raise SystemExit(f"could not set up the Torch-Pruning venv:\n{setup.stderr[-2000:]}")
    venv = setup.stdout.strip().splitlines()[-1]
    out = f"{tmp}/tp_minilm_{train or 'untrained'}.pt"
    extra = ["--train", train, "--seed", str(seed)] if train else []
    done = subprocess.run([f"{venv}/bin/python", str(HERE / "peers" / "torch_pruning_minilm.py"), "--output", out,
                           *extra], capture_output=True, text=True)
    if done.returncode == 3:  # the peer script reports a failure of Torch-Pruning itself as one JSON line
        print("torch-pruning FAILED:", done.stdout.strip().splitlines()[-1])
        return None
    if done.returncode != 0:
        raise SystemExit(f"Torch-Pruning failed:\n{done.stderr[-2000:]}")
    print("torch-pruning:", done.stdout.strip().splitlines()[-1])
    return torch.load(out, weights_only=False).eval()


def minilm(rounds: int, peers: bool = False, train: bool = False, seed: int = 0) -> Dict[str, object]:
    model, tok, calib, held, timing = P.load_data(calib_batches=8, held_out=64)
    reference = P.torch_embed(model, held)
    if train:
        masked, run = trained_minilm(seed)
    else:
        masked = copy.deepcopy(model)
        mask_minilm(masked)
    small = st.slim(masked, dict(timing), measure_latency=False)
    report = st.slim_report(small)
    cfg = {"compression_inference": {"static_quantization": {"enabled": True}}}
    variants = {"dense fp32": model, "slim fp32": small,
                "dense int8": st.quantize(copy.deepcopy(model), cfg, calib_dataloader=calib),
                "slim int8": st.quantize(copy.deepcopy(small), cfg, calib_dataloader=calib)}
    with tempfile.TemporaryDirectory() as tmp:
        if peers and train:
            for schedule in ("iterative", "oneshot"):
                peer = torch_pruning_model(tmp, schedule, seed)
                if peer is not None:
                    variants[f"torch-pruning {schedule} fp32"] = peer
        elif peers:
            variants["torch-pruning fp32"] = torch_pruning_model(tmp)
        if train:  # the protocol's metric: 256 held-out paragraphs, embedded as sentence-transformers does
            import _distill as D

            cosines = {name: D.heldout_cosine(m.eval(), run.teacher, run.tokenizer, run.heldout,
                                              teacher_emb=run.teacher_emb)[0] for name, m in variants.items()}
            cosines["masked fp32"] = D.heldout_cosine(masked, run.teacher, run.tokenizer, run.heldout,
                                                      teacher_emb=run.teacher_emb)[0]
        else:
            cosines = {name: P.cos_stats(P.torch_embed(m, held), reference)[0] for name, m in variants.items()}
            cosines["masked fp32"] = P.cos_stats(P.torch_embed(masked, held), reference)[0]
        times = onnx_latency(variants, timing, rounds, tmp)
    stats = P.speed_stats(times, "dense fp32")
    return dict(model="all-MiniLM-L6-v2", trained=train, seed=seed,
                max_relative_difference=report.max_relative_difference,
                parameters=(report.parameters_before, report.parameters_after),
                macs=(report.macs_before, report.macs_after), cosine=cosines,
                latency={k: {m: v[m] for m in ("median_ms", "speedup", "median_round_ratio")}
                         for k, v in stats.items()})


#: EfficientNet-lite0 ``--train``: DeepSpeed's channel_pruning (l1, ranked at prepare) of every MBConv expansion conv
#: to 70% of its channels, with its BatchNorm (related_modules, paired by position as DeepSpeed pairs them)
EFFICIENTNET_CONFIG = {"compression_training": {"channel_pruning": {
    "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0},
    "different_groups": {"expansion": {"params": {"dense_ratio": 0.7},
                                       "modules": ["_blocks\\.\\d+\\._expand_conv"],
                                       "related_modules": [["_blocks\\.\\d+\\._bn0"]]}}}}}


def distilled_efficientnet(model: torch.nn.Module, updates: int, batch: int = 16, lr: float = 1e-4):
    """Prune the expansion channels while distilling from ``model`` on crops of sklearn's two sample photos (seed 1;
    the evaluation crops are seed 0): KL divergence to the dense model's softmax, AdamW, BatchNorm statistics frozen
    (eval mode: a short fine-tune on two photos must not re-estimate them)."""
    import torch.nn.functional as F

    from tests.quantization.cnn_data import image_crops

    student = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    cb = st.prepare_pruning(student, EFFICIENTNET_CONFIG, optimizer=optimizer)
    crops = image_crops(n=updates * batch, seed=1)
    start = time.perf_counter()
    for x in crops.split(batch):
        with torch.no_grad():
            target = F.softmax(model(x), dim=-1)
        loss = F.kl_div(F.log_softmax(student(x), dim=-1), target, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    cb.finalize()
    print(f"EfficientNet-lite0: {updates} distillation updates of {batch} crops with channel pruning in "
          f"{time.perf_counter() - start:.0f} s, last loss {loss.item():.4f}")
    return student


#: FFN units kept per layer in the round_to study: uneven widths, as a global ranking leaves them
ROUND_TO_WIDTHS = (753, 781, 722, 815, 768, 737)


def round_to_study(rounds: int) -> Dict[str, object]:
    """What ``round_to`` buys: all-MiniLM-L6-v2 with uneven FFN widths (ROUND_TO_WIDTHS units kept, lowest L2 norms
    zeroed), slimmed with round_to 1, 8, 16, 32 and 64; ONNX Runtime fp32 and static int8, interleaved."""
    model, tok, calib, held, timing = P.load_data(calib_batches=8, held_out=64)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for layer, keep in zip(masked.encoder.layer, ROUND_TO_WIDTHS):
            down = layer.output.dense.weight
            down[:, down.norm(dim=0).argsort()[: down.shape[1] - keep]] = 0
    cfg = {"compression_inference": {"static_quantization": {"enabled": True}}}
    variants, widths = {}, {}
    for r in (1, 8, 16, 32, 64):
        small = st.slim(masked, dict(timing), round_to=r, measure_latency=False)
        widths[r] = [layer.intermediate.dense.out_features for layer in small.encoder.layer]
        variants[f"round_to {r} fp32"] = small
        variants[f"round_to {r} int8"] = st.quantize(copy.deepcopy(small), cfg, calib_dataloader=calib)
    with tempfile.TemporaryDirectory() as tmp:
        times = onnx_latency(variants, timing, rounds, tmp)
    stats = P.speed_stats(times, "round_to 1 fp32")
    return dict(model="all-MiniLM-L6-v2", study="round_to", widths=widths,
                latency={k: {m: v[m] for m in ("median_ms", "speedup", "median_round_ratio")}
                         for k, v in stats.items()})


def efficientnet(rounds: int, train_updates: int = 0) -> Dict[str, object]:
    from tests.quantization.cnn_data import image_crops, load_efficientnet_lite0, predict, zero_expansion_channels

    torch.set_num_threads(2)
    model = load_efficientnet_lite0().eval()
    if train_updates:
        masked = distilled_efficientnet(model, train_updates)
    else:
        masked = copy.deepcopy(model)
        zero_expansion_channels(masked, 0.3)
    batch = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    small = st.slim(masked, batch[:2], measure_latency=False)
    report = st.slim_report(small)
    crops = image_crops()
    with torch.no_grad():
        top = {name: predict(m, crops).argmax(-1) for name, m in (("dense", model), ("masked", masked),
                                                                   ("slim", small))}
    agree = float((top["slim"] == top["masked"]).float().mean())
    dense_agree = float((top["masked"] == top["dense"]).float().mean())
    times: Dict[str, List[float]] = {"dense": [], "slim": []}
    with torch.no_grad():
        for m in (model, small):
            for _ in range(2):
                m(batch)
        for r in range(rounds):
            for name, m in (("dense", model), ("slim", small))[::1 if r % 2 == 0 else -1]:
                start = time.perf_counter()
                m(batch)
                times[name].append(time.perf_counter() - start)
    ratios = [d / s for d, s in zip(times["dense"], times["slim"])]
    return dict(model="EfficientNet-lite0", train_updates=train_updates,
                max_relative_difference=report.max_relative_difference,
                parameters=(report.parameters_before, report.parameters_after),
                macs=(report.macs_before, report.macs_after), top1_slim_vs_masked=agree,
                top1_masked_vs_dense=dense_agree, crops=len(crops),
                latency_ms={k: 1e3 * statistics.median(v) for k, v in times.items()},
                speedup=statistics.median(times["dense"]) / statistics.median(times["slim"]),
                median_round_ratio=statistics.median(ratios))


def smollm2(rounds: int) -> Dict[str, object]:
    """A quarter of SmolLM2-135M's FFN width pruned one-shot (oneshot_pruning 'channelx1' on the down projections,
    structured OBS on the 32 x 512 calibration windows), slimmed, saved with save_slim and loaded by transformers;
    held-out perplexity (58 windows of 512) and the latency of decoding one token with the KV cache (batch 1, 128
    tokens of context), dense and slim alternating."""
    import _smollm2 as S
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model, tokenizer = S.load_smollm2()
    calibration = S.calibration_samples(tokenizer)
    _, held_out = S.pydoc_split(tokenizer)
    cfg = {"compression_inference": {"oneshot_pruning": {
        "enabled": True, "method": "sparsegpt", "pattern": "channelx1", "dense_ratio": 0.75,
        "modules": ["mlp.down_proj"]}}}
    start = time.perf_counter()
    pruned = st.oneshot(model, cfg, [calibration[i:i + 1] for i in range(len(calibration))], progress=False)
    prune_s = time.perf_counter() - start
    example = {"input_ids": calibration[:1, :64], "use_cache": False}
    small = st.slim(pruned, example, measure_latency=False)
    report = st.slim_report(small)
    with tempfile.TemporaryDirectory() as tmp:
        how = st.save_slim(small, tmp)
        loaded = AutoModelForCausalLM.from_pretrained(tmp).eval() if how == "transformers" else st.load_slim(tmp)
        intermediate = getattr(loaded.config, "intermediate_size", None)
    ppl = {name: st.perplexity(m, held_out, window=S.WINDOW).perplexity for name, m in (("dense", model),
                                                                                      ("slim", loaded))}
    context = calibration[:1, :128]
    times: Dict[str, List[float]] = {"dense": [], "slim": []}
    with torch.no_grad():
        caches = {}
        for name, m in (("dense", model), ("slim", loaded)):
            out = m(input_ids=context, use_cache=True)
            caches[name] = (m, out.past_key_values, out.logits[:, -1:].argmax(-1))
        for r in range(rounds * 5):
            for name in (("dense", "slim") if r % 2 == 0 else ("slim", "dense")):
                m, cache, token = caches[name]
                step_cache = copy.deepcopy(cache)
                start = time.perf_counter()
                m(input_ids=token, past_key_values=step_cache, use_cache=True)
                times[name].append(time.perf_counter() - start)
    return dict(model="SmolLM2-135M-Instruct", prune_s=prune_s, saved_as=how, intermediate_size=intermediate,
                max_relative_difference=report.max_relative_difference,
                parameters=(report.parameters_before, report.parameters_after), perplexity=ppl,
                token_ms={k: 1e3 * statistics.median(v) for k, v in times.items()},
                speedup=statistics.median(times["dense"]) / statistics.median(times["slim"]))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["minilm", "efficientnet", "smollm2", "round_to"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--peers", action="store_true", help="time Torch-Pruning's MiniLM beside slimtorch's")
    parser.add_argument("--train", action="store_true",
                        help="prune while distilling: MiniLM progressively over 80 updates (Torch-Pruning likewise), "
                             "EfficientNet-lite0 with channel_pruning l1")
    parser.add_argument("--seed", type=int, default=0, help="MiniLM --train: the distillation protocol's seed")
    parser.add_argument("--efficientnet-updates", type=int, default=40,
                        help="EfficientNet-lite0 --train: distillation updates of 16 crops")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    P.seed_everything(0)
    results = []
    if args.only in (None, "minilm"):
        r = minilm(args.rounds, args.peers, args.train, args.seed)
        results.append(r)
        how = ("pruned progressively while distilling (80 updates)" if args.train else "zeroed (no training)")
        print(f"all-MiniLM-L6-v2, 50% FFN units + 50% heads {how}, slimmed: outputs vs masked "
              f"{r['max_relative_difference']:.1e}; parameters {r['parameters'][0]:,} -> {r['parameters'][1]:,}; "
              f"MACs {r['macs'][0]:,} -> {r['macs'][1]:,}")
        print("ONNX Runtime, CPU, 2 threads, batch 8 x 128\n")
        metric = "held-out cosine (256)" if args.train else "cosine to dense (64)"
        print(f"| model | median ms | speed-up vs dense fp32 | median per-round ratio | {metric} |")
        print("|---|---|---|---|---|")
        for name, s in r["latency"].items():
            print(f"| {name} | {s['median_ms']:.1f} | {s['speedup']:.2f} | {s['median_round_ratio']:.2f} | "
                  f"{r['cosine'][name]:.4f} |")
        print(f"(masked fp32, before slimming: cosine {r['cosine']['masked fp32']:.4f})\n")
    if args.only in (None, "efficientnet"):
        r = efficientnet(args.rounds, args.efficientnet_updates if args.train else 0)
        results.append(r)
        how = (f"pruned by channel_pruning l1 while distilling ({r['train_updates']} updates)" if args.train
               else "zeroed with their BatchNorm")
        print(f"EfficientNet-lite0, 30% of the expansion channels {how}, slimmed: outputs vs "
              f"masked {r['max_relative_difference']:.1e}; parameters {r['parameters'][0]:,} -> "
              f"{r['parameters'][1]:,}; MACs {r['macs'][0]:,} -> {r['macs'][1]:,}")
        print(f"PyTorch CPU, 2 threads, batch 32 x 224 x 224: dense {r['latency_ms']['dense']:.0f} ms, slim "
              f"{r['latency_ms']['slim']:.0f} ms: speed-up {r['speedup']:.2f} (median per-round ratio "
              f"{r['median_round_ratio']:.2f}); top-1 slim = masked on {100 * r['top1_slim_vs_masked']:.1f}% of "
              f"{r['crops']} crops (masked = dense: {100 * r['top1_masked_vs_dense']:.1f}%)")
    if args.only in (None, "smollm2"):
        r = smollm2(args.rounds)
        results.append(r)
        print(f"\nSmolLM2-135M-Instruct, 25% of the FFN units pruned one-shot (structured OBS, 32 x 512 calibration "
              f"tokens, {r['prune_s']:.0f} s), slimmed: outputs vs pruned {r['max_relative_difference']:.1e}; "
              f"parameters {r['parameters'][0]:,} -> {r['parameters'][1]:,}; saved as {r['saved_as']} "
              f"(intermediate_size {r['intermediate_size']})")
        print(f"held-out perplexity (58 x 512): dense {r['perplexity']['dense']:.3f}, slim (as loaded back) "
              f"{r['perplexity']['slim']:.3f}; one decoded token (batch 1, 128 tokens of cache), PyTorch CPU 2 "
              f"threads: dense {r['token_ms']['dense']:.2f} ms, slim {r['token_ms']['slim']:.2f} ms: speed-up "
              f"{r['speedup']:.2f}")
    if args.only == "round_to":
        r = round_to_study(args.rounds)
        results.append(r)
        print("all-MiniLM-L6-v2, uneven FFN widths, slimmed with each round_to; ONNX Runtime, CPU, 2 threads, "
              "batch 8 x 128\n")
        print("| round_to | FFN widths | fp32 median ms | int8 median ms | fp32 / int8 per-round ratio vs round_to 1 |")
        print("|---|---|---|---|---|")
        for k, w in r["widths"].items():
            fp, q = r["latency"][f"round_to {k} fp32"], r["latency"][f"round_to {k} int8"]
            base_q = r["latency"]["round_to 1 int8"]["median_ms"]
            print(f"| {k} | {', '.join(map(str, w))} | {fp['median_ms']:.1f} | {q['median_ms']:.1f} | "
                  f"{fp['median_round_ratio']:.3f} / {base_q / q['median_ms']:.3f} |")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
