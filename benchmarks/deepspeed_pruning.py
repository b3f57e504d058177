#!/usr/bin/env python
"""Pruning through ``slimtorch.deepspeed.initialize`` on DeepSpeed's engine: correctness and overhead per ZeRO
stage and precision. Meant for GPU machines (NCCL); runs on CPU (gloo) too.

    torchrun --standalone --nproc_per_node 2 benchmarks/deepspeed_pruning.py          # 2 GPUs (or 2 CPU ranks)
    python benchmarks/deepspeed_pruning.py --stages 0 1 2 3 --dtypes fp32 bf16 fp16   # 1 process, 1 GPU

For each (stage, precision) a BERT-shaped encoder (random weights, random tokens: the checks need no data
quality) trains ``--updates`` updates with snip_momentum 2:4 on the default targets (every Linear but the
tied decoder head), pruned every 2 updates
until half-way. Checked, per row: every pruned weight holds 2:4; the pruned zeros are also in DeepSpeed's fp32
master copy (what ZeRO checkpoints and zero_to_fp32 keep); masks identical on every rank (MIN/MAX reduce of a
fingerprint); under fp16 the snip_momentum scores are those of unscaled gradients (their norm relative to the fp32
run's). Timed: median ms per update with pruning and, in the same process, of the same engine config without the
compression section; their ratio is the overhead (the median over all updates, mask updates included).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.extensions_dir import own_extensions_dir  # noqa: E402

own_extensions_dir()  # DeepSpeed's CPU op compiles into a folder of its own version (tests/extensions_dir.py)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import slimtorch as st  # noqa: E402


def build_model(hidden: int, layers: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=8192, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                     intermediate_size=4 * hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg)


def ds_config(stage: int, dtype: str, micro: int, updates: int, prune: bool) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10 ** 9, "gradient_clipping": 1.0}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 12}
    elif dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if prune:
        cfg["compression_training"] = {"sparse_pruning": {"shared_parameters": {
            "enabled": True, "method": "snip_momentum", "pattern": "2:4", "start_step": 0,
            "end_step": updates // 2, "frequency": 2}}}
    return cfg


def batches(rank: int, updates: int, micro: int, seq: int, device: torch.device):
    g = torch.Generator().manual_seed(1000 + rank)
    for _ in range(updates):
        ids = torch.randint(5, 8192, (micro, seq), generator=g)
        yield ids.to(device), ids.clone().to(device)


def run(stage: int, dtype: str, args, device: torch.device, prune: bool) -> dict:
    model = build_model(args.hidden, args.layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, _, _, _, cb = st.deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config(stage, dtype, args.micro, args.updates, prune),
        dist_init_required=False)
    times, losses, score_norm = [], [], None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for ids, labels in batches(dist.get_rank(), args.updates, args.micro, args.seq, device):
            sync(device)
            t0 = time.perf_counter()
            loss = engine(input_ids=ids, labels=labels).loss
            engine.backward(loss)
            engine.step()
            sync(device)
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            if prune and args.trace:
                norm = scores_norm(cb)  # every rank: a collective at ZeRO 1/2
                if dist.get_rank() == 0:
                    print(f"trace zero{stage} {dtype}: update {len(times)} step {cb.step} loss {losses[-1]:.3f} "
                          f"scale {engine._get_optimizer_loss_scale()} applied {engine.was_step_applied()} "
                          f"score norm {norm:.4g}", flush=True)
            if prune and cb.step == args.updates // 4:  # mid-window: the running snip_momentum scores
                score_norm = scores_norm(cb)
    row = {"ms": statistics.median(times[2:]) * 1e3, "loss_first": losses[0], "loss_last": losses[-1],
           "skipped": engine.skipped_steps}
    if prune:
        row.update(check(engine, cb), score_norm=score_norm,
                   no_grad_warnings=sum("has no gradient" in str(w.message) for w in caught))
    return row


def check(engine, cb) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param

    from slimtorch.pruning.access import whole

    valid, master_ok, fingerprint = True, True, 0.0
    for layer in cb.pruner.layers:  # whole masks and weights: collectives under ZeRO-3, which partitions them
        mask, weight = layer.full_mask(), whole(layer.weight)
        groups = mask.reshape(-1, 4).sum(dim=1)
        valid &= bool((groups == 2).all()) and bool(weight[~mask].eq(0).all())
        master = safe_get_full_fp32_param(layer.weight)
        if master is None:  # ZeRO 0: fp16 optimizer's flat master, or none (fp32/bf16 keep no separate copy)
            master = cb.pruner.access._fp16_masters().get(id(layer.weight))
        if master is not None:
            master_ok &= bool(master.reshape(mask.shape)[~mask].eq(0).all())
        fingerprint += float(mask.nonzero()[:, -1].double().sum())
    lo = torch.tensor([fingerprint], dtype=torch.float64, device=weight.device)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    report = st.sparsity_report(engine)
    pruned = [r for r in report if r.pattern]
    return {"layers": len(pruned), "sparsity": statistics.mean(r.sparsity for r in pruned), "pattern_ok": valid,
            "master_zeros": master_ok, "ranks_equal": bool(lo.item() == hi.item())}


def scores_norm(cb) -> float:
    """L2 norm of all running scores, complete (under ZeRO 1-3 each rank keeps its share: a collective)."""
    access = cb.pruner.access
    return sum(float(access.complete_scores(l.weight, l.state).double().norm() ** 2)
               for l in cb.pruner.layers if l.state is not None) ** 0.5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def init() -> torch.device:
    if "RANK" not in os.environ:  # plain python: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--updates", type=int, default=40)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--trace", action="store_true", help="print every update's loss scale and score norm")
    p.add_argument("--out", type=Path, help="write the rows as JSON here (rank 0)")
    args = p.parse_args()
    device = init()
    if device.type == "cpu":
        args.hidden, args.layers, args.seq = min(args.hidden, 256), min(args.layers, 2), min(args.seq, 32)
    rows = []
    for stage in args.stages:
        fp32_norm = None
        for dtype in args.dtypes:
            if device.type == "cpu" and dtype == "fp16":
                continue  # DeepSpeed's fp16 optimizers need an accelerator
            pruned = run(stage, dtype, args, device, prune=True)
            dense = run(stage, dtype, args, device, prune=False)
            if dtype == "fp32":
                fp32_norm = pruned["score_norm"]
            rows.append({"stage": stage, "dtype": dtype, **pruned, "dense_ms": dense["ms"],
                         "dense_loss_last": dense["loss_last"],
                         "overhead": pruned["ms"] / dense["ms"],
                         "score_vs_fp32": pruned["score_norm"] / fp32_norm if fp32_norm else None})
    if dist.get_rank() == 0:
        print(f"\ndevice: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, ranks "
              f"{dist.get_world_size()}, BERT {args.layers}x{args.hidden}, micro-batch {args.micro}x{args.seq}, "
              f"{args.updates} updates, DeepSpeed {__import__('deepspeed').__version__}, torch {torch.__version__}")
        print("| ZeRO | dtype | pruned layers | sparsity | 2:4 ok | master zeros | ranks equal | score norm / fp32 "
              "| skipped (no-grad warnings) | loss first -> last (dense last) | ms/update pruned | dense | ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ratio = "-" if r["score_vs_fp32"] is None else f"{r['score_vs_fp32']:.3f}"
            print(f"| {r['stage']} | {r['dtype']} | {r['layers']} | {r['sparsity']:.4f} | {r['pattern_ok']} | "
                  f"{r['master_zeros']} | {r['ranks_equal']} | {ratio} | {r['skipped']} ({r['no_grad_warnings']}) | "
                  f"{r['loss_first']:.3f} -> "
                  f"{r['loss_last']:.3f} ({r['dense_loss_last']:.3f}) | {r['ms']:.1f} | {r['dense_ms']:.1f} | "
                  f"{r['overhead']:.2f} |")
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
