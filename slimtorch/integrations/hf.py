"""Hugging Face ``transformers`` integration: :class:`PruningCallback` prunes during ``Trainer.train()``.

::

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PruningCallback("ds_config.json")])
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

How the Trainer's events map onto :class:`slimtorch.PruningCallbacks` (transformers 5.24, ``Trainer._run_epoch``):
once per *update*, after the micro-batches' gradients are accumulated (and all-reduced under DDP), the Trainer
clips them (``_clip_grad_norm``; with ``max_grad_norm=0`` it still calls ``accelerator.clip_grad_norm_(..., inf)``
for the logged norm, which unscales fp16 gradients), then calls ``on_pre_optimizer_step``, ``optimizer.step()``
and ``on_optimizer_step``. So the scores see the accumulated, unscaled, clipped gradient: the one the optimizer
applies. Checkpoints hold the callbacks' state in ``checkpoint-N/slimtorch_pruning.pt``.
"""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Dict, Optional, Union

import torch
from transformers import TrainerCallback

from ..config import load_config
from ..config.loader import ConfigSource
from ..errors import ConfigError, LifecycleError, StateDictError, UnsupportedModelError
from ..pruning.callbacks import PruningCallbacks, prepare_for_engine
from ..pruning.distributed import agree
from ..pruning.structured_targets import attach_learned_scores

#: file written next to each Trainer checkpoint (``<output_dir>/checkpoint-N/``)
STATE_FILE = "slimtorch_pruning.pt"
_STATE_VERSION = 1

PathLike = Union[str, os.PathLike]


class PruningCallback(TrainerCallback):
    """Prune the Trainer's model on a slimtorch config's schedule while ``Trainer.train()`` runs.

    ``config``: anything :func:`slimtorch.load_config` takes; it is validated here, before any training.
    ``finalize_at_end``: at ``on_train_end`` detach and drop masks and scores (the zeros stay); with False the
    masks stay active (``.callbacks.state_dict()`` still works) until you call ``.callbacks.finalize()``.
    ``resume_from``: where the pruning state of a resumed run is; None finds it in the checkpoint the Trainer
    resumes from, a path names a checkpoint folder (or the file itself), False starts the schedule afresh.
    """

    def __init__(self, config: ConfigSource, finalize_at_end: bool = True,
                 resume_from: Union[None, bool, PathLike] = None):
        # under torch.distributed already (TrainingArguments made first): a check failing on one rank fails on all
        with agree("PruningCallback"):
            if not hasattr(TrainerCallback, "on_pre_optimizer_step"):
                raise UnsupportedModelError(
                    f"PruningCallback: transformers {_transformers_version()} has no on_pre_optimizer_step event, "
                    "which the callback needs to read each update's gradients; use transformers 4.45 or later")
            self.config = load_config(config)  # a bad config is an error now, before the Trainer touches the model
            if not self.config.has_training_pruning:
                raise ConfigError("PruningCallback: the config has no compression_training pruning section "
                                  "(sparse_pruning, row_pruning, head_pruning or channel_pruning); add one (see "
                                  "docs/config.md) or leave the callback out")
            if resume_from is True:
                raise ConfigError("PruningCallback(resume_from=True): pass None (find the state in the checkpoint "
                                  "the Trainer resumes from), a checkpoint folder, or False (start the schedule "
                                  "afresh)")
        self.finalize_at_end = finalize_at_end
        self.resume_from = resume_from
        self.callbacks: Optional[PruningCallbacks] = None  # set at on_train_begin
        self._scale: Optional[float] = None  # fp16 GradScaler's scale before the current update
        self._pre_step_seen = False           # on_pre_optimizer_step ran for the current update
        self._ranked = None  # DeepSpeed's l1 rankings of the float model, made before DeepSpeed casts it

    # ------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if not isinstance(model, torch.nn.Module):
            return
        # topk's scores are trained: they must exist before the Trainer builds its optimizer in train()
        attach_learned_scores(model, self.config)
        # DeepSpeed's init_compression ranks l1 masks before its engine exists; under a DeepSpeed Trainer the engine
        # casts the model to bf16/fp16 before on_train_begin, so rank the float weights now, as DeepSpeed would
        if getattr(args, "deepspeed", None):
            from .deepspeed import rank_before_the_engine
            self._ranked = rank_before_the_engine(model, self.config)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        deepspeed_optimizer = _deepspeed_optimizer(args, optimizer)
        self._check_accumulation(args)
        if optimizer is None and getattr(args, "fp16", False):
            # fp16 skips are seen through the optimizer's GradScaler; without it a skipped update (inf gradients)
            # would be counted and scored. transformers 4.49.0 passed no optimizer to callbacks (fixed in 4.50).
            raise UnsupportedModelError(
                f"PruningCallback.on_train_begin: transformers {_transformers_version()} passed no optimizer to the "
                "callback, so under fp16 it cannot tell which updates the GradScaler skips; use transformers 4.50 "
                "or later (4.49.0 has this bug), or train in bf16 or fp32")
        if not isinstance(model, torch.nn.Module):
            raise LifecycleError("PruningCallback.on_train_begin: no model was passed; add the callback to a "
                                 "transformers Trainer (callbacks=[...]) instead of calling it yourself")
        if self.callbacks is not None and not self.callbacks.finalized:
            self.callbacks.finalize()  # an earlier train() with finalize_at_end=False: this run starts over
        # prepare_pruning in explicit-callbacks mode, except that the Trainer calls the hooks once per *update*
        # (accumulation already folded in), so one call is one update whatever the config's accumulation says
        if deepspeed_optimizer is None:
            self.callbacks = prepare_for_engine(model, self.config, accumulate=1)
        else:
            # DeepSpeed's engine steps inside accelerator.backward(), before the Trainer's optimizer events, and
            # keeps the reduced gradients (ZeRO 1/2: in partitions) only until then: pruning rides on the DeepSpeed
            # optimizer's own step, as in slimtorch.deepspeed.initialize (ZeRO-3: its partitions, zero3.py)
            from .deepspeed import access_for, drive_from_optimizer_step
            self.callbacks = prepare_for_engine(
                model, self.config, access=access_for(deepspeed_optimizer), accumulate=1, hands_free=True,
                driver=("DeepSpeed's optimizer step (Trainer with DeepSpeed)", "train without DeepSpeed"),
                ranked=self._ranked)
            drive_from_optimizer_step(deepspeed_optimizer, self.callbacks)
        if state.global_step > 0 and self.resume_from is not False:
            try:
                self._resume(args, state)
            except Exception:
                self.callbacks.finalize()  # release the model, so a corrected retry can prepare it again
                self.callbacks = None
                raise
        self.callbacks.on_train_begin()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._live("on_epoch_begin").on_epoch_begin(int(state.epoch or 0))

    def on_step_begin(self, args, state, control, **kwargs):
        self._live("on_step_begin").on_step_begin(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        callbacks = self._live("on_pre_optimizer_step")
        if callbacks.hands_free:  # DeepSpeed: its optimizer step already drove this update
            return
        self._scale = _loss_scale(optimizer)
        self._pre_step_seen = True
        callbacks.on_before_optimizer_step()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        callbacks = self._live("on_optimizer_step")
        if callbacks.hands_free:
            return
        # An fp16 update with inf/NaN gradients is skipped by the GradScaler; the Trainer still counts it in
        # global_step, slimtorch does not (a step is an applied update). accelerate's step_was_skipped misses the
        # skips of fused optimizers (the Trainer's default adamw_torch_fused: GradScaler calls their step(), which
        # skips internally), but the scaler backs its scale off on every skip: check both.
        if not self._pre_step_seen:  # e.g. a Trainer subclass whose loop skips the event: the scores saw nothing
            raise LifecycleError("PruningCallback.on_optimizer_step: the Trainer did not call on_pre_optimizer_step "
                                 "before this update, so the pruning scores cannot see its gradients; call "
                                 "callback_handler.on_pre_optimizer_step before optimizer.step() in a custom loop")
        self._pre_step_seen = False
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        if self._scale is not None:
            skipped = skipped or _loss_scale(optimizer) < self._scale
        callbacks.on_after_optimizer_step(applied=not skipped)

    def on_step_end(self, args, state, control, **kwargs):
        self._live("on_step_end").on_step_end()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._live("on_epoch_end").on_epoch_end(int(state.epoch or 0))

    def on_save(self, args, state, control, **kwargs):
        if self.callbacks is None or self.callbacks.finalized:
            return
        # every rank: under DeepSpeed ZeRO 1/2 state_dict() sums the ranks' score shares (a collective); the
        # result is the same everywhere, and the main process writes it
        pruning_state = self.callbacks.state_dict()
        if not args.should_save:
            return
        # Trainer._save_checkpoint writes to os.path.join(run_dir, f"checkpoint-{global_step}") just before on_save
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(f"slimtorch: checkpoint folder {folder} not found (a hyperparameter-search run?); the "
                          "pruning state was not saved, so resuming from this checkpoint needs "
                          "PruningCallback(resume_from=False) and restarts the schedule", stacklevel=2)
            return
        torch.save({"version": _STATE_VERSION, "global_step": state.global_step,
                    "callbacks": pruning_state}, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        callbacks = self._live("on_train_end")
        if getattr(args, "load_best_model_at_end", False) and state.best_model_checkpoint:
            self._match_best_model(state)
        callbacks.on_train_end()
        if self.finalize_at_end:
            callbacks.finalize()

    # ------------------------------------------------------------ helpers
    @property
    def step(self) -> int:
        """Applied updates the pruning schedule has counted (0 before training)."""
        return 0 if self.callbacks is None else self.callbacks.step

    def _live(self, event: str) -> PruningCallbacks:
        if self.callbacks is None:
            raise LifecycleError(f"PruningCallback.{event}: called before on_train_begin; the Trainer calls the "
                                 "events in order when the callback is passed as Trainer(callbacks=[...])")
        return self.callbacks

    def _check_accumulation(self, args) -> None:
        ours = self.config.gradient_accumulation_steps
        theirs = int(getattr(args, "gradient_accumulation_steps", 1))
        if ours not in (1, theirs):
            raise ConfigError(
                f"compression_training.sparse_pruning.shared_parameters.gradient_accumulation_steps is {ours} but "
                f"TrainingArguments.gradient_accumulation_steps is {theirs}. Under the transformers Trainer the "
                "Trainer's own gradient_accumulation_steps governs (it calls the pruning hooks once per update): "
                f"set the config's value to 1 or to {theirs}")

    def _resume(self, args, state) -> None:
        path = self._state_path(args, state)
        if not os.path.isfile(path):
            raise StateDictError(
                f"PruningCallback: the Trainer resumes at global step {state.global_step}, but {path} does not "
                "exist, so the pruning schedule cannot resume. Resume from a checkpoint saved by a Trainer with "
                "this callback, name it with PruningCallback(resume_from='.../checkpoint-N'), or pass "
                "resume_from=False to start the schedule afresh from this point")
        saved = _load(path)
        if saved.get("global_step") != state.global_step:
            raise StateDictError(
                f"PruningCallback: {path} was saved at global step {saved.get('global_step')}, but the Trainer "
                f"resumes at step {state.global_step}; point resume_from at the checkpoint the Trainer resumes from")
        self.callbacks.load_state_dict(saved["callbacks"])

    def _state_path(self, args, state) -> str:
        where = self.resume_from if self.resume_from is not None else _resumed_checkpoint()
        if where is None and isinstance(getattr(args, "resume_from_checkpoint", None), str):
            where = args.resume_from_checkpoint
        if where is None:  # the Trainer's own naming of the checkpoint it saved at this step
            where = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        where = os.fspath(where)
        return where if where.endswith(".pt") else os.path.join(where, STATE_FILE)

    def _match_best_model(self, state) -> None:
        """load_best_model_at_end reloaded an earlier checkpoint's weights: use that checkpoint's masks too."""
        path = os.path.join(state.best_model_checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            warnings.warn(f"slimtorch: the Trainer loaded the best model from {state.best_model_checkpoint}, which "
                          f"has no {STATE_FILE}; the final masks are applied to its weights", stacklevel=3)
            return
        saved = _load(path)
        if saved.get("global_step") == state.global_step:
            return
        self.callbacks.load_state_dict(saved["callbacks"])
        warnings.warn(f"slimtorch: load_best_model_at_end restored {state.best_model_checkpoint} (global step "
                      f"{saved.get('global_step')}); its masks, of pruning step {self.callbacks.step}, are kept, so "
                      "the model may be less sparse than the schedule's final target", stacklevel=3)


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def _loss_scale(optimizer) -> Optional[float]:
    """The loss scale of the GradScaler accelerate gave ``optimizer`` (fp16), or None without one."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None
    return float(scaler.get_scale())  # one host sync per update, only under fp16


def _load(path: str) -> Dict[str, Any]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("version") != _STATE_VERSION or "callbacks" not in saved:
        raise StateDictError(f"{path} is not a pruning state saved by slimtorch's PruningCallback")
    return saved


def _resumed_checkpoint() -> Optional[str]:
    """The checkpoint ``Trainer.train(resume_from_checkpoint=...)`` resumes from.

    The Trainer tells callbacks neither the path nor whether it resumes (TrainerCallback events get args, state and
    control only); it holds the resolved path as the ``resume_from_checkpoint`` argument of
    ``Trainer._inner_training_loop``, which is on the stack while on_train_begin runs. None when not found
    (another transformers version): the caller then falls back to ``<output_dir>/checkpoint-<global_step>``.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "_inner_training_loop" and "resume_from_checkpoint" in frame.f_locals:
                path = frame.f_locals["resume_from_checkpoint"]
                return os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold references to their locals: don't keep the Trainer alive through a cycle


def _deepspeed_optimizer(args, optimizer) -> Any:
    """DeepSpeed's optimizer (``engine.optimizer``) when the Trainer runs under DeepSpeed, else None."""
    # args.deepspeed: TrainingArguments(deepspeed=...); args.deepspeed_plugin: also set by `accelerate launch`
    # with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED); the optimizer: accelerate's DeepSpeedOptimizerWrapper
    wrapper = type(optimizer).__name__
    under_deepspeed = bool(getattr(args, "deepspeed", None)) or getattr(args, "deepspeed_plugin", None) is not None \
        or getattr(args, "hf_deepspeed_config", None) is not None or "DeepSpeed" in wrapper
    if not under_deepspeed:
        return None
    if optimizer is None:
        raise UnsupportedModelError(
            f"PruningCallback.on_train_begin: this Trainer runs under DeepSpeed, but transformers "
            f"{_transformers_version()} passed no optimizer to the callback, so it cannot reach DeepSpeed's optimizer; "
            "use transformers 4.50 or later (4.49.0 has this bug)")
    inner = getattr(optimizer, "optimizer", None)  # DeepSpeedOptimizerWrapper.optimizer is engine.optimizer
    if "DeepSpeed" not in wrapper or inner is None or not callable(getattr(inner, "step", None)):
        raise UnsupportedModelError(
            f"PruningCallback: this Trainer runs under DeepSpeed, but its optimizer is a {wrapper}, not accelerate's "
            "DeepSpeedOptimizerWrapper around DeepSpeed's optimizer, so the callback cannot reach the gradients "
            "DeepSpeed keeps. Use slimtorch.deepspeed.initialize(...) in your own loop, or train without DeepSpeed")
    return inner
