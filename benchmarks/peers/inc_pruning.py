#!/usr/bin/env python
"""Intel Neural Compressor 3.7.1 peer: progressive snip_momentum pruning of all-MiniLM-L6-v2 while distilling.

Runs INSIDE the INC virtual environment (``benchmarks/peers/setup_inc.sh`` builds it), never in slimtorch's:

    "$(benchmarks/peers/setup_inc.sh)"/bin/python benchmarks/peers/inc_pruning.py --seed 0 --json-out inc_s0.json

The protocol (model, data, batches, loss, optimizer, schedule, evaluation, timing) is ``benchmarks/_distill.py``,
the same file the slimtorch side uses. INC is driven through its current PyTorch pruning API,
``neural_compressor.compression.pruner.prepare_pruning(model, WeightPruningConfig, optimizer=opt)``, which is
hands-free: it registers a forward pre-hook on the model that calls ``on_step_begin`` (mask update at pruning
steps) and replaces ``optimizer.step`` by a wrapper that calls ``on_before_optimizer_step`` (snip_momentum score
accumulation) before and ``on_after_optimizer_step`` (re-apply masks, ``global_step += 1``) after the real step.
The training loop therefore calls no hook itself; ``on_train_begin`` / ``on_train_end`` are called once around it.

The update with pruning is timed against the same update of a dense student, alternately, update by update
(``_distill.interleaved_updates``); ``--no-timing`` skips the dense student (half the run time).

Patterns are passed to INC verbatim: INC's "N:M" counts the PRUNED weights (N of every M), so "2:4" keeps 2 of 4
as in NVIDIA's convention; the script's check uses M - N kept of M. "NxM" is a block of N output rows x M input
columns. ``--attn-sparsity`` puts the ``attention.self`` Linears (q, k, v) in their own INC pruner with that target
(e.g. ``--pattern 4x1 --target-sparsity 0.9 --attn-sparsity 0.5``).

INC behaviour worth knowing when reading the JSON:
* Steps: INC's ``global_step`` is the number of optimizer steps taken; masks are recomputed in ``on_step_begin``
  (i.e. before the forward of update t) when start_step <= t <= end_step and (t - start_step) % frequency == 0;
  the k-th of the K = (end - start) // frequency mask updates after the first sets sparsity 1 - d**(k/K) (exp).
  The update at t = start_step prunes nothing (its target is 0), so the target is reached at update end_step.
* Any extra forward of the hooked model counts: the pre-hook runs ``on_step_begin`` on every forward (it is
  idempotent within one global_step, so it only matters for evaluation after training, which is why the script
  removes ``model.inc_hook_handle`` before evaluating). INC also replaces ``torch.save`` globally; restored here.
* The final 2:4 masks are not quite 2:4: for the exp decay INC computes the last target as
  1 - (0.5 ** (1/K)) ** K = 0.4999999999999998, and ``int(n_groups * target * M / N)`` then leaves ONE group of 4
  dense in every layer (36 of 2,654,208 groups; ``pattern_valid`` false, ``pattern_violations`` 36). Reported as it
  is, not patched; its effect on quality is nil.
* A 2:4 target below 0.5 (e.g. 0.4) makes INC prune only a share of the groups 2:4 and leave the rest dense;
  ``pattern_violations`` then counts those dense groups too. ``partial_pattern_violations`` (and each layer's
  ``partial_nm_violations``) counts only groups that are neither 2:4 nor wholly dense; ``zeros`` / ``weights`` per
  layer are exact counts (``sparsity`` is rounded).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ for _distill

import _distill as D  # noqa: E402
import torch  # noqa: E402

ENCODER = r"encoder\.layer\.\d+\."
ATTN_SELF = r"attention\.self\."


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=D.PRUNING_STEPS,
                    help="pruning updates: INC start_step=0, end_step=STEPS (target reached at update STEPS)")
    ap.add_argument("--extra-steps", type=int, default=D.EXTRA_STEPS, help="updates after the pruning ones")
    ap.add_argument("--frequency", type=int, default=D.FREQUENCY, help="INC pruning_frequency (updates)")
    ap.add_argument("--pattern", default="2:4", help='INC pattern, e.g. "2:4" (N pruned of M) or "4x1"')
    ap.add_argument("--target-sparsity", type=float, default=0.5)
    ap.add_argument("--attn-sparsity", type=float, default=None,
                    help="separate target for the attention.self Linears (own INC pruner)")
    ap.add_argument("--pruning-type", default="snip_momentum")
    ap.add_argument("--scope", default="local", choices=["local", "global"], help="INC pruning_scope")
    ap.add_argument("--decay", default=D.DECAY, choices=["exp", "cos", "linear", "cube"])
    ap.add_argument("--lr", type=float, default=D.LR, help="AdamW learning rate (keep equal to the other side)")
    ap.add_argument("--no-timing", action="store_true", help="skip the interleaved dense student")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json-out", default=None, help="write the result JSON here (also printed to stdout)")
    return ap.parse_args(argv)


def inc_config(args):
    """The WeightPruningConfig for the run (local scope: each layer reaches the target on its own)."""
    from neural_compressor.training import WeightPruningConfig

    common = dict(
        pruning_type=args.pruning_type,
        pattern=args.pattern,
        start_step=0,
        end_step=args.steps,
        pruning_frequency=args.frequency,
        pruning_scope=args.scope,
        sparsity_decay_type=args.decay,
        pruning_op_types=["Linear"],
    )
    if args.attn_sparsity is None:
        groups = [{}]  # one pruner with the global values below
    else:
        groups = [
            {"op_names": [ATTN_SELF], "target_sparsity": args.attn_sparsity, "excluded_op_names": ["pooler"]},
            {"op_names": [ENCODER], "target_sparsity": args.target_sparsity,
             "excluded_op_names": [ATTN_SELF, "pooler"]},
        ]
    return WeightPruningConfig(
        pruning_configs=groups,
        target_sparsity=args.target_sparsity,
        op_names=[ENCODER],
        excluded_op_names=["pooler"],
        **common,
    )


def pattern_violations(weight: torch.Tensor, pattern: str) -> int:
    """Groups/blocks of a [out, in] weight that break INC's pattern: "N:M" -> groups of M along the input
    dimension with more than M-N non-zeros; "NxM" -> N x M blocks neither all zero nor all kept."""
    if ":" in pattern:
        n, m = (int(x) for x in pattern.split(":"))
        return D.nm_violations(weight, m - n, m)
    if "x" in pattern and "channel" not in pattern:
        bh, bw = (int(x) for x in pattern.split("x"))
        return D.block_violations(weight, bh, bw)
    return 0


def partial_nm_violations(weight: torch.Tensor, pattern: str):
    """For "N:M" (N pruned of M): groups of M along the input dimension that are neither pruned to at most M-N
    non-zeros nor left wholly dense (the valid states when the target is below N/M and only a share of the groups
    becomes N:M); None for other patterns. Used by benchmarks/adaptive.py (2:4 at a target of 0.4)."""
    if ":" not in pattern:
        return None
    n, m = (int(x) for x in pattern.split(":"))
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.shape[1] % m:
        return -1
    kept = (w.reshape(-1, m) != 0).sum(-1)
    return int(((kept > m - n) & (kept < m)).sum())


def pattern_group_count(mods, pattern: str) -> int:
    """How many groups (N:M) or blocks (NxM) the targeted weights hold in all."""
    if ":" in pattern:
        m = int(pattern.split(":")[1])
        return sum(mod.weight.numel() // m for mod in mods.values())
    if "x" in pattern and "channel" not in pattern:
        bh, bw = (int(x) for x in pattern.split("x"))
        return sum(mod.weight.numel() // (bh * bw) for mod in mods.values())
    return 0


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    import neural_compressor
    from neural_compressor.compression.pruner import prepare_pruning

    total = args.steps + args.extra_steps
    train_texts, heldout = D.paragraphs()
    teacher, student, tok = D.load_teacher_and_student(device)
    batches = D.make_batches(tok, train_texts, args.seed, total, device=device)
    teacher_emb = D.embed(teacher, tok, heldout)

    dense = None
    if not args.no_timing:
        dense, _ = D.load_minilm(device, train=True)
        D.warmup(dense, teacher, batches[0])
    D.warmup(student, teacher, batches[0])  # before INC hooks the model: a hooked forward counts as a step

    opt = D.make_optimizer(student, args.lr)
    opt_dense = D.make_optimizer(dense, args.lr) if dense is not None else None

    pruning = prepare_pruning(student, inc_config(args), optimizer=opt)
    pruners = pruning.pruners
    targeted = [name for p in pruners for name in p.modules]
    encoder = list(D.encoder_linears(student))
    targeted_mods = {n: m for n, m in student.named_modules() if n in set(targeted)}
    n_targeted_weights = sum(m.weight.numel() for m in targeted_mods.values())

    def weight_sparsity() -> float:
        with torch.no_grad():
            return sum(int((m.weight == 0).sum()) for m in targeted_mods.values()) / n_targeted_weights

    trajectory, inc_trajectory = [], []

    def observe(i: int) -> None:  # untimed
        trajectory.append(round(weight_sparsity(), 6))
        inc_trajectory.append([round(float(p.current_sparsity_ratio), 6) for p in pruners])

    pruning.on_train_begin()
    t_train = time.perf_counter()
    # no explicit hooks: INC's forward pre-hook and optimizer.step wrapper do it all
    pruned_update = lambda i: D.distill_update(student, teacher, batches[i], opt)  # noqa: E731
    if dense is not None:
        dense_update = lambda i: D.distill_update(dense, teacher, batches[i], opt_dense)  # noqa: E731
        timing = D.interleaved_updates(pruned_update, dense_update, total, device, observe=observe)
        losses = timing.pruned_loss
        overhead = timing.overhead(0, min(args.steps, total - 1))
        overhead_all = timing.overhead(0, total - 1)
    else:
        timing, overhead, overhead_all, losses = None, {}, {}, []
        for i in range(total):
            losses.append(pruned_update(i))
            observe(i)
    train_wall = time.perf_counter() - t_train
    pruning.on_train_end()

    # stop INC counting steps on evaluation forwards, and give torch.save back
    if hasattr(student, "inc_hook_handle"):
        student.inc_hook_handle.remove()
    if hasattr(torch, "orig_save"):
        torch.save = torch.orig_save

    cos_mean, cos_min = D.heldout_cosine(student, teacher, tok, heldout, teacher_emb=teacher_emb)
    layers = D.layer_report(student, targeted)
    bad = {n: pattern_violations(targeted_mods[n].weight, args.pattern) for n in targeted}
    for n in targeted:
        layers[n]["pattern_violations"] = bad[n]
        w = targeted_mods[n].weight
        layers[n]["zeros"] = int((w == 0).sum())
        layers[n]["weights"] = w.numel()
        layers[n]["partial_nm_violations"] = partial_nm_violations(w, args.pattern)
    pattern_groups = pattern_group_count(targeted_mods, args.pattern)
    attn = [n for n in targeted if re.search(ATTN_SELF, n)]
    rest = [n for n in targeted if n not in attn]

    def group_sparsity(names):
        if not names:
            return None
        tot = sum(targeted_mods[n].weight.numel() for n in names)
        with torch.no_grad():
            return sum(int((targeted_mods[n].weight == 0).sum()) for n in names) / tot

    result = {
        "peer": "intel-neural-compressor",
        "peer_version": neural_compressor.__version__,
        "api": "neural_compressor.compression.pruner.prepare_pruning(model, WeightPruningConfig(...), optimizer=opt)",
        "hooks": "hands-free: INC's forward pre-hook on the model runs on_step_begin (mask update), its "
                 "optimizer.step wrapper runs on_before_optimizer_step (scores) and on_after_optimizer_step "
                 "(re-mask, step += 1); the script calls only on_train_begin/on_train_end",
        "seed": args.seed,
        "pattern": args.pattern,
        "pattern_convention": "INC N:M = N pruned of every M along the input dim; NxM = N out rows x M in cols",
        "pruning_type": args.pruning_type,
        "pruning_scope": args.scope,
        "target_sparsity": args.target_sparsity,
        "attn_sparsity": args.attn_sparsity,
        "decay": args.decay,
        "start_step": 0,
        "end_step": args.steps,
        "frequency": args.frequency,
        "steps": args.steps,
        "extra_steps": args.extra_steps,
        "total_updates": total,
        "batch": [D.BATCH_SIZE, D.SEQ_LEN],
        "lr": args.lr,
        "heldout_n": len(heldout),
        "heldout_cosine_mean": cos_mean,
        "heldout_cosine_min": cos_min,
        "cos_mean": cos_mean,  # short aliases, the names benchmarks/pruning.py reads
        "cos_min": cos_min,
        "targeted_layers": len(targeted),
        "untargeted_encoder_linears": [n for n in encoder if n not in targeted],
        "targeted_sparsity": weight_sparsity(),
        "attn_self_sparsity": group_sparsity(attn) if args.attn_sparsity is not None else None,
        "other_sparsity": group_sparsity(rest) if args.attn_sparsity is not None else None,
        "layer_sparsity_min": min(l["sparsity"] for l in layers.values()),
        "layer_sparsity_max": max(l["sparsity"] for l in layers.values()),
        "pattern_valid": all(v == 0 for v in bad.values()),
        "pattern_violations": sum(bad.values()),
        "pattern_groups": pattern_groups,
        "layers_with_violations": sum(v != 0 for v in bad.values()),
        "partial_pattern_violations": (None if ":" not in args.pattern else
                                       sum(layers[n]["partial_nm_violations"] for n in targeted)),
        "sparsity_trajectory": trajectory,
        "inc_sparsity_trajectory": inc_trajectory,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": [round(x, 6) for x in losses],
        "overhead_ratio": overhead.get("median_ratio"),
        "timing_window": overhead,
        "overhead": overhead,  # alias of timing_window ({} with --no-timing)
        "timing_all_updates": overhead_all,
        "pruned_update_s": [round(x, 5) for x in timing.pruned_s] if timing else [],
        "dense_update_s": [round(x, 5) for x in timing.dense_s] if timing else [],
        "train_wall_s": train_wall,
        "wall_s": time.perf_counter() - t_start,
        "layers": layers,
        "env": D.environment(),
    }
    text = json.dumps(result, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    summary = {k: result[k] for k in ("seed", "pattern", "heldout_cosine_mean", "heldout_cosine_min",
                                      "targeted_sparsity", "pattern_valid", "pattern_violations", "overhead_ratio",
                                      "wall_s")}
    print(json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
