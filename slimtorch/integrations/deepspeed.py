"""``slimtorch.deepspeed.initialize``: DeepSpeed's own engine, with slimtorch's pruning driven by ``engine.step()``.

The real ``deepspeed.initialize`` builds the engine from the user's DeepSpeed config minus the compression sections
(slimtorch reads those; DeepSpeed never sees them). Hands-free, DeepSpeed's optimizer step (one per update, called
by ``engine.step()``) drives the callbacks, which read gradients and write masked weights where the engine keeps
them:

| ZeRO stage | gradient the scores see                          | weights the masks are applied to              |
|------------|--------------------------------------------------|-----------------------------------------------|
| 0          | ``param.grad`` after the engine's all-reduce     | the parameters (+ fp16 optimizer's fp32 master)|
| 1, 2       | this rank's fragment of the reduced partitions:  | the parameters and their fp32 master fragment |
|            | partial scores, summed only at a mask update     | (``safe_set_full_fp32_param``)                |
| 3          | refused: parameters are partitioned              |                                               |

At ZeRO 1/2 no update communicates for pruning: scores are element-wise, so each rank scores the gradient
fragment it owns, and the shares are summed (one all-reduce per layer, exact) only when a mask is computed and in
``state_dict``. Gathering each layer's full gradient every update, as ``safe_get_full_grad`` does, would add an
all-reduce of every pruned weight per update, more traffic than ZeRO's own gradient reduction.

Gradients are read at the accumulation boundary, after ``engine.backward`` reduced them and before DeepSpeed's
optimizer unscales and applies them (where clipping happens differs per stage: docs/deepspeed.md); under fp16,
gradients that carry the loss scale are divided by it here so that snip_momentum's running score does not jump with
the dynamic scale. The masked weights are written to the fp32 master copy too:
otherwise the optimizer would copy the pruned values back into the model at the next step, and a ZeRO checkpoint
(or ``zero_to_fp32``) would hold the dense weights.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import load_config
from ..config.loader import SECTIONS, read_document
from ..errors import ConfigError, SlimError, UnsupportedModelError
from ..pruning.access import ParamAccess
from ..pruning.callbacks import PruningCallbacks, prepare_for_engine
from ..pruning.distributed import refuse_sharded
from ..pruning.drivers import wrap_step
from ..pruning.pruner import rank_at_prepare
from ..pruning.structured_targets import attach_learned_scores, plan_training

#: key of the pruning state inside the ``client_state`` of DeepSpeed checkpoints
CLIENT_STATE_KEY = "slimtorch_pruning"


def initialize(args: Any = None, model: Optional[nn.Module] = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Any = None, lr_scheduler: Any = None, mpu: Any = None,
               dist_init_required: Optional[bool] = None, collate_fn: Optional[Callable] = None,
               config: Any = None, config_params: Any = None, *, hands_free: bool = True,
               **deepspeed_kwargs: Any) -> Tuple[Any, Any, Any, Any, Optional[PruningCallbacks]]:
    """``deepspeed.initialize`` plus pruning -> ``(engine, optimizer, dataloader, lr_scheduler, callbacks)``.

    Takes DeepSpeed's arguments (the config as ``config``, ``config_params`` or ``args.deepspeed_config``: a path
    or a dict holding DeepSpeed's keys and slimtorch's ``compression_training`` section). With ``hands_free`` (the
    default) every ``engine.step()`` drives pruning, and ``engine.save_checkpoint`` / ``load_checkpoint`` carry
    the pruning state in the checkpoint's ``client_state``; with ``hands_free=False`` call the callbacks' hooks
    around ``engine.step()`` yourself (once per micro-batch, like the engine). ``callbacks`` is None when the
    config has no pruning section (sparse_pruning, row_pruning, head_pruning, channel_pruning).
    """
    deepspeed = _import_deepspeed()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"slimtorch.deepspeed.initialize: model must be a torch.nn.Module, got "
                          f"{type(model).__name__}")
    source, args = _config_source(args, config, config_params)
    document = read_document(source)
    compression = load_config(document)  # a bad compression section fails before DeepSpeed builds anything
    deepspeed_config = {k: v for k, v in document.items() if k not in SECTIONS}
    pruning = compression.has_training_pruning
    ranked = None
    if pruning:
        _check_supported(deepspeed_config, model)
        ranked = rank_before_the_engine(model, compression)
        _learned_scores_before_the_engine(model, compression, model_parameters, optimizer)
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn,
        config=deepspeed_config, **deepspeed_kwargs)
    if not pruning:
        return engine, ds_optimizer, dataloader, scheduler, None
    accumulate = _accumulation_steps(engine, compression.gradient_accumulation_steps)
    callbacks = prepare_for_engine(
        engine.module, compression, access=DeepSpeedAccess(engine.optimizer), accumulate=accumulate,
        driver=("engine.step()", "pass hands_free=False to slimtorch.deepspeed.initialize"), hands_free=hands_free,
        ranked=ranked)
    if hands_free:
        drive_from_optimizer_step(engine.optimizer, callbacks)  # engine.step() steps it once per update
        _keep_in_checkpoints(engine, callbacks)
    return engine, ds_optimizer, dataloader, scheduler, callbacks


def rank_before_the_engine(model: nn.Module, compression: Any) -> Optional[Dict[str, Tensor]]:
    """DeepSpeed's l1 ranks |w| in ``init_compression``, before the engine casts the model to fp16/bf16: rank the
    float weights here too, so half-precision rounding cannot reorder near-equal weights."""
    if not compression.prunes_in_training:
        return None
    sp = compression.sparse_pruning
    settings = [g.method for g in compression.structured_groups]
    if compression.pruning_enabled:
        settings += [sp.settings_for(None).method] + [sp.settings_for(g).method for g in sp.different_groups]
    if "l1" not in settings:
        return None
    try:
        return rank_at_prepare(plan_training(model, compression).layers)
    except SlimError:
        return None  # prepare_for_engine raises the same error, on every rank, after the engine exists


def _learned_scores_before_the_engine(model: nn.Module, compression: Any, model_parameters: Any,
                                     optimizer: Any) -> None:
    """topk's scores are parameters the engine's optimizer must hold: create them before the engine exists (as
    DeepSpeed's init_compression does); a torch optimizer built before gets them as a new parameter group, and
    explicit ``model_parameters`` must include them."""
    scores = attach_learned_scores(model, compression)
    if scores and isinstance(optimizer, torch.optim.Optimizer):
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [p for p in scores if id(p) not in held]
        if new:
            optimizer.add_param_group({"params": new})
        return
    if not scores or model_parameters is None:
        return
    given = set()
    for item in model_parameters:
        params = item.get("params", []) if isinstance(item, dict) else [item]
        given.update(id(p) for p in ([params] if isinstance(params, torch.Tensor) else params))
    missing = [name for name, p in model.named_parameters() if any(p is s for s in scores) and id(p) not in given]
    if missing:
        raise ConfigError(
            f"slimtorch.deepspeed.initialize: model_parameters leaves out the topk scores {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''} that the row/head/channel pruning sections train; they are created "
            "on the model before the engine is built: pass model_parameters=None (DeepSpeed then takes "
            "model.parameters()), or build it after slimtorch.deepspeed.attach_learned_scores(model, config)")


class DeepSpeedAccess(ParamAccess):
    """Gradients and fp32 master weights behind DeepSpeed's optimizer (``engine.optimizer``: ZeRO 0-2, fp32 /
    fp16 / bf16). Only the optimizer is needed, so the same access serves the Trainer, which keeps the engine."""

    def __init__(self, optimizer: Any):
        from deepspeed.utils import safe_get_full_grad, safe_set_full_fp32_param
        self._get_grad, self._set_master = safe_get_full_grad, safe_set_full_fp32_param
        self._optimizer = optimizer
        self._flat_masters: Optional[Dict[int, Tensor]] = None

    def grad(self, weight: Tensor) -> Optional[Tensor]:
        # ZeRO 1/2 (and the bf16 optimizer): only this rank's share of the reduced gradient, zeros elsewhere, so the
        # scores are partial (see ParamAccess.complete_scores) and no update pays a collective for its gradients
        try:
            grad = _gradient_share(weight) if _partitioned(weight) else self._get_grad(weight)
        except ValueError as exc:  # DeepSpeed's "only available immediately after backward and before step"
            raise ConfigError(
                "slimtorch.deepspeed: gradients were read outside the engine's accumulation boundary "
                f"({exc}); with hands_free=False call callbacks.on_before_optimizer_step() after engine.backward() "
                "and before engine.step(), once per micro-batch") from None
        if grad is not None and _grads_are_loss_scaled(self._optimizer):
            scale = _loss_scale(self._optimizer)
            if scale and scale != 1.0:
                grad = grad.float() / scale  # the scores must not move with the dynamic loss scale
        return grad

    def complete_scores(self, weight: Tensor, scores: Tensor) -> Tensor:
        if not _partitioned(weight):
            return scores
        from deepspeed import comm
        full = scores.clone()
        # the ranks' shares are disjoint and zero elsewhere: the sum is exact, so every rank gets the same bits
        comm.all_reduce(full, group=getattr(weight, "_dp_group", None))
        return full

    def local_scores(self, weight: Tensor, scores: Tensor) -> Tensor:
        return _share_of(weight, scores) if _partitioned(weight) else scores

    def update_applied(self) -> Optional[bool]:
        # what engine.was_step_applied() reports: DeepSpeed's fp16 optimizers set overflow on a skipped update
        return not bool(getattr(self._optimizer, "overflow", False))

    def masks_applied(self, params: List[Tensor]) -> None:
        with torch.no_grad():
            for param in params:
                if getattr(param, "_hp_mapping", None) is not None:  # ZeRO 1/2, bf16 optimizer
                    self._set_master(param, param.detach().float())
                else:
                    master = self._fp16_masters().get(id(param))  # ZeRO 0 fp16 optimizer
                    if master is not None:
                        master.copy_(param.detach().reshape(master.shape))

    def _fp16_masters(self) -> Dict[int, Tensor]:
        """id(fp16 parameter) -> its view in the fp32 master of DeepSpeed's (ZeRO 0) FP16 optimizers."""
        if self._flat_masters is None:
            self._flat_masters = {}
            optimizer = self._optimizer
            groups = getattr(optimizer, "fp16_groups", None)
            if groups is not None and hasattr(optimizer, "fp32_groups_flat"):   # fused: one flat tensor per group
                for params, flat in zip(groups, optimizer.fp32_groups_flat):
                    offset = 0
                    for p in params:
                        self._flat_masters[id(p)] = flat.data.narrow(0, offset, p.numel()).view(p.shape)
                        offset += p.numel()
            elif groups is not None and hasattr(optimizer, "fp32_groups"):    # unfused: one fp32 copy per param
                for params, masters in zip(groups, optimizer.fp32_groups):
                    for p, m in zip(params, masters):
                        self._flat_masters[id(p)] = m.data
        return self._flat_masters


def _partitioned(weight: Tensor) -> bool:
    """Whether DeepSpeed linked ``weight`` to a partitioned fp32 master (ZeRO 1/2, the bf16 optimizer): each rank
    then owns a fragment of the flattened weight (``_hp_mapping.lp_fragment_address``; None: no fragment here)."""
    return hasattr(weight, "_hp_mapping")


def _placed(weight: Tensor, fragment: Callable[[int, int], Tensor]) -> Tensor:
    """A float32 tensor shaped like ``weight``: ``fragment(start, numel)`` (flat) where this rank owns the weight's
    fragment, zeros elsewhere."""
    share = torch.zeros(weight.numel(), dtype=torch.float32, device=weight.device)
    mapping = weight._hp_mapping
    if mapping is not None:
        start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
        share.narrow(0, start, numel).copy_(fragment(start, numel))
    return share.view(weight.shape)


def _share_of(weight: Tensor, full: Tensor) -> Tensor:
    """This rank's share of a full weight-shaped tensor (e.g. loaded scores)."""
    return _placed(weight, lambda start, numel: full.reshape(-1).narrow(0, start, numel))


def _gradient_share(weight: Tensor) -> Tensor:
    """This rank's share of ``weight``'s reduced gradient: what ``safe_get_full_grad`` all-reduces, before the
    all-reduce (its fragment of DeepSpeed's reduced partition; a ``.grad`` already full is cut to the fragment)."""
    if getattr(weight, "_hp_grad", None) is None and weight.grad is not None:
        return _share_of(weight, weight.grad)

    def fragment(start: int, numel: int) -> Tensor:
        values = weight._hp_mapping.get_lp_grad_fragment(weight._index_in_param_group).reshape(-1)
        # the bf16 optimizer keeps the whole gradient on every rank: take this rank's fragment of it
        return values.narrow(0, start, numel) if values.numel() == weight.numel() else values

    return _placed(weight, fragment)


def _loss_scale(optimizer: Any) -> Optional[float]:
    """The current loss scale of a DeepSpeed optimizer (1.0 without fp16), as ``engine._get_optimizer_loss_scale``."""
    config = getattr(optimizer, "loss_scale_config", None)
    return getattr(config, "cur_scale", None) if config is not None else getattr(optimizer, "cur_scale", None)


def _grads_are_loss_scaled(optimizer: Any) -> bool:
    """Whether the gradients at the boundary still carry the fp16 loss scale.

    ZeRO optimizers scale the loss in ``engine.backward``. DeepSpeed's stage-0 fp16 optimizers scaled it in their
    own ``backward`` in older releases; since ``ZeROOptimizer.scale_if_loss`` exists (0.19.8 here) the engine
    scales only through ZeRO optimizers, and the H100 run of benchmarks/deepspeed_pruning.py measured unscaled
    stage-0 fp16 gradients (scores 1/4096 of the fp32 run's when divided by the scale).
    """
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    if isinstance(optimizer, ZeROOptimizer):
        return True
    return not hasattr(ZeROOptimizer, "scale_if_loss")


def drive_from_optimizer_step(optimizer: Any, callbacks: PruningCallbacks) -> None:
    """Hands-free pruning driven by DeepSpeed's optimizer (``engine.optimizer``), which is all the transformers
    Trainer lets a callback reach.

    ``engine.step()`` calls ``engine.optimizer.step()`` once per update, at the accumulation boundary, before the
    reduced gradients are released; this instance's ``step`` is wrapped (:func:`slimtorch.pruning.drivers.wrap_step`)
    so the callbacks observe before it and apply the masks after it. An fp16 overflow sets ``optimizer.overflow``:
    that update is not counted.
    """
    access = callbacks.pruner.access  # a DeepSpeedAccess of this optimizer: it knows when DeepSpeed skipped
    optimizer.step = wrap_step(optimizer.step, callbacks.lifecycle, skipped=lambda: access.update_applied() is False)


def _keep_in_checkpoints(engine: Any, callbacks: PruningCallbacks) -> None:
    """Carry the pruning state in every DeepSpeed checkpoint's ``client_state``, and restore it on load."""
    save, load = engine.save_checkpoint, engine.load_checkpoint

    def save_checkpoint(save_dir: str, tag: Any = None, client_state: Optional[Dict[str, Any]] = None,
                        *args: Any, **kwargs: Any) -> Any:
        state = dict(client_state or {})
        if not callbacks.finalized:
            state[CLIENT_STATE_KEY] = callbacks.state_dict()
        return save(save_dir, tag, state, *args, **kwargs)

    def load_checkpoint(load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        path, client_state = load(load_dir, tag, *args, **kwargs)
        if path is None or callbacks.finalized:
            return path, client_state
        state = (client_state or {}).pop(CLIENT_STATE_KEY, None)
        if state is None:
            warnings.warn(f"slimtorch: the DeepSpeed checkpoint {path} holds no pruning state (saved without "
                          "slimtorch?); the pruning schedule starts again at step 0", stacklevel=2)
        else:
            callbacks.load_state_dict(state)
        return path, client_state

    save_checkpoint.__doc__, load_checkpoint.__doc__ = save.__doc__, load.__doc__
    engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            "slimtorch.deepspeed needs DeepSpeed: pip install 'slimtorch[deepspeed]' (DS_BUILD_OPS=0 installs it "
            f"without building CUDA ops) ({exc})") from None
    return deepspeed


def _config_source(args: Any, config: Any, config_params: Any) -> Tuple[Any, Any]:
    """The one DeepSpeed config among ``config``, ``config_params`` and ``args.deepspeed_config``, and ``args``
    with its ``deepspeed_config`` cleared (the filtered dict is passed as ``config`` instead)."""
    given = [(name, value) for name, value in (("config", config), ("config_params", config_params),
                                               ("args.deepspeed_config", getattr(args, "deepspeed_config", None)))
             if value is not None]
    if not given:
        raise ConfigError("slimtorch.deepspeed.initialize: no DeepSpeed config; pass config= (a path or a dict), "
                          "or args with deepspeed_config")
    if len(given) > 1:
        raise ConfigError(f"slimtorch.deepspeed.initialize: the DeepSpeed config was given twice "
                          f"({' and '.join(n for n, _ in given)}); pass it once")
    if getattr(args, "deepspeed_config", None) is not None:
        args = copy.copy(args)
        args.deepspeed_config = None
    return given[0][1], args


def _check_supported(deepspeed_config: Dict[str, Any], model: nn.Module) -> None:
    zero = deepspeed_config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage == 3:
        raise UnsupportedModelError(
            "zero_optimization.stage: 3 partitions the parameters across ranks, so slimtorch would compute each "
            "rank's masks from its own partition; ZeRO-3 is not supported with pruning yet. Use stage 0, 1 or 2")
    if deepspeed_config.get("managed_gradient_accumulation", True) is False:
        raise UnsupportedModelError(
            "managed_gradient_accumulation: false makes engine.step() reduce the gradients, after the point where "
            "slimtorch reads them; pruning needs the engine-managed accumulation (the default)")
    refuse_sharded(model)


def _accumulation_steps(engine: Any, configured: int) -> int:
    engine_steps = int(engine.gradient_accumulation_steps())
    if configured not in (1, engine_steps):
        raise ConfigError(
            f"compression_training.sparse_pruning.shared_parameters.gradient_accumulation_steps is {configured} but "
            f"the DeepSpeed engine accumulates {engine_steps} micro-batches per update; under DeepSpeed the engine's "
            "gradient_accumulation_steps governs: remove the key or set it to the same value")
    return engine_steps
