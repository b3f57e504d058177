"""How much a short recovery fine-tune gives back after one-shot 2:4 pruning of SmolLM2-135M-Instruct.

    python benchmarks/llm_recovery.py                    # 200 updates (about 20 min on 2 CPU cores)
    python benchmarks/llm_recovery.py --steps 20 --method wanda

1. one-shot 2:4 (SparseGPT by default) with slimtorch.oneshot on the 32 calibration samples of benchmarks/_smollm2.py;
2. recovery: the existing training-time pruning keeps the masks (``sparse_pruning`` with method magnitude, pattern
   2:4, ranked at update 0: on weights that are already 2:4 it keeps exactly their non-zeros), while the pruned
   model is distilled from the float model (KL divergence of the next-token distributions, temperature 1) with
   AdamW (lr ``--lr``, no weight decay) on 512-token windows of the calibration text (its 162 windows in turn, one
   per update), lm_head and embeddings trainable too;
3. held-out perplexity (the protocol of benchmarks/_smollm2.py) of float, one-shot and recovered models, and the
   check that every pruned Linear is still exactly 2:4.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import _smollm2 as S

    import slimtorch as st
    from slimtorch.llm.evaluation import token_windows

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    args = parser.parse_args()

    torch.manual_seed(0)
    teacher, tokenizer = S.load_smollm2()
    calibration_ids, held_out = S.pydoc_split(tokenizer)
    samples = S.calibration_samples(tokenizer)
    cfg = {"compression_inference": {"oneshot_pruning": {"enabled": True, "method": args.method, "pattern": "2:4"}}}
    start = time.perf_counter()
    student = st.oneshot(teacher, cfg, [samples[i:i + 1] for i in range(len(samples))], progress=False)
    oneshot_s = time.perf_counter() - start
    pruned = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]

    def ppl(model):
        return st.perplexity(model, held_out, window=S.WINDOW).perplexity

    float_ppl, oneshot_ppl = ppl(teacher), ppl(student)

    keep = {"compression_training": {"sparse_pruning": {"shared_parameters": {
        "enabled": True, "method": "magnitude", "pattern": "2:4", "start_step": 0, "end_step": 0, "frequency": 1,
        "excluded_modules": ["lm_head"]}}}}
    student.train()
    teacher.eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    callbacks = st.prepare_pruning(student, keep, optimizer=optimizer)
    windows = token_windows(calibration_ids, S.WINDOW)
    start = time.perf_counter()
    losses = []
    for step in range(args.steps):
        ids = windows[step % len(windows)][None]
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        logits = student(input_ids=ids, use_cache=False).logits.float()
        loss = F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="batchmean") / ids.shape[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f"update {step + 1}/{args.steps}: KL {sum(losses[-20:]) / len(losses[-20:]):.4f}", file=sys.stderr)
    callbacks.finalize()
    recovery_s = time.perf_counter() - start
    student.eval()
    recovered_ppl = ppl(student)
    modules = dict(student.named_modules())
    exact = all(bool(((modules[n].weight.reshape(modules[n].weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
                for n in pruned)

    print(f"SmolLM2-135M-Instruct, one-shot 2:4 {args.method} then {args.steps} distillation updates (AdamW lr "
          f"{args.lr}, one 512-token window each); held-out perplexity over "
          f"{token_windows(held_out, S.WINDOW).shape[0]} windows of 512\n")
    print("| model | perplexity | vs float | seconds |")
    print("|---|---|---|---|")
    for name, value, seconds in (("float32", float_ppl, 0.0), (f"one-shot 2:4 {args.method}", oneshot_ppl, oneshot_s),
                                 (f"+ {args.steps} recovery updates", recovered_ppl, recovery_s)):
        print(f"| {name} | {value:.3f} | {100 * (value / float_ppl - 1):+.1f}% | {seconds:.0f} |")
    print(f"\nevery one of the {len(pruned)} pruned Linears still exactly 2:4 after recovery: {exact}")


if __name__ == "__main__":
    main()
