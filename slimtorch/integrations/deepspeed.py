"""``slimtorch.deepspeed.initialize``: DeepSpeed's own engine, with slimtorch's pruning driven by ``engine.step()``.

The real ``deepspeed.initialize`` builds the engine from the user's DeepSpeed config minus the compression sections
(slimtorch reads those; DeepSpeed never sees them). Hands-free, DeepSpeed's optimizer step (one per update, called
by ``engine.step()``) drives the callbacks, which read gradients and write masked weights where the engine keeps
them:

| ZeRO stage | gradient the scores see                          | weights the masks are applied to              |
|------------|--------------------------------------------------|-----------------------------------------------|
| 0          | ``param.grad`` after the engine's all-reduce     | the parameters (+ fp16 optimizer's fp32 master)|
| 1, 2       | this rank's fragment of the reduced partitions:  | the parameters and their fp32 master fragment |
|            | partial scores, summed only at a mask update     | (their fragment of it, multiplied by the mask) |
| 3          | this rank's slice of the reduced gradient        | the local slice and its fp32 master           |
|            | (local scores; :mod:`.zero3`)                    | (``safe_set_local_fp32_param``)               |

At ZeRO 1-3 no update communicates for pruning: scores are element-wise, so each rank scores the gradient
fragment it owns, and the shares are summed (ZeRO 1/2: one all-reduce per layer, exact) or gathered (ZeRO-3, with
the layer's weight) only when a mask is computed and in ``state_dict``. Gathering each layer's full gradient every
update, as ``safe_get_full_grad`` does, would add an all-reduce of every pruned weight per update, more traffic than
ZeRO's own gradient reduction.

Gradients are read at the accumulation boundary, after ``engine.backward`` reduced them and before DeepSpeed's
optimizer unscales and applies them (where clipping happens differs per stage: docs/deepspeed.md); under fp16,
gradients that carry the loss scale are divided by it here so that snip_momentum's running score does not jump with
the dynamic scale. The masked weights are written to the fp32 master copy too:
otherwise the optimizer would copy the pruned values back into the model at the next step, and a ZeRO checkpoint
(or ``zero_to_fp32``) would hold the dense weights.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..config import load_config
from ..config.loader import SECTIONS, read_document
from ..errors import ConfigError, SlimError, StateDictError, UnsupportedModelError
from ..pruning.callbacks import PruningCallbacks, prepare_for_engine
from ..pruning.distributed import check_same_plan, failed_on, refuse_sharded
from ..pruning.drivers import wrap_step
from ..pruning.pruner import rank_at_prepare
from ..pruning.structured_targets import attach_learned_scores, plan_training
from ..ranks import raise_everywhere
from .zero3 import ZeRO3Access, access_for

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
    failure: Optional[Exception] = None
    try:  # the checks of this rank, none collective; the ranks agree on their outcome below
        args, compression, deepspeed_config, plan = _checked_arguments(args, model, config, config_params)
        pruning = compression.has_training_pruning
        if pruning:
            _learned_scores_before_the_engine(model, compression, model_parameters, optimizer)
    except Exception as error:  # noqa: BLE001  (whatever fails here, the other ranks must hear of it)
        failure = error
    _init_distributed(deepspeed, dist_init_required, deepspeed_kwargs, failure)
    raise_everywhere(failure, failed_on("slimtorch.deepspeed.initialize"))  # a hang inside DeepSpeed otherwise
    if failure is not None:
        raise failure
    ranked = None
    if pruning:
        check_same_plan([] if plan is None else plan.layers, compression, "slimtorch.deepspeed.initialize")
        ranked = rank_before_the_engine(model, compression)
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required, collate_fn=collate_fn,
        config=deepspeed_config, **deepspeed_kwargs)
    if not pruning:
        return engine, ds_optimizer, dataloader, scheduler, None
    accumulate = _accumulation_steps(engine, compression.gradient_accumulation_steps)
    callbacks = prepare_for_engine(
        engine.module, compression, access=access_for(engine.optimizer), accumulate=accumulate,
        driver=("engine.step()", "pass hands_free=False to slimtorch.deepspeed.initialize"), hands_free=hands_free,
        ranked=ranked)
    if hands_free:
        drive_from_optimizer_step(engine.optimizer, callbacks)  # engine.step() steps it once per update
        _keep_in_checkpoints(engine, callbacks)
    return engine, ds_optimizer, dataloader, scheduler, callbacks


def _checked_arguments(args: Any, model: Any, config: Any, config_params: Any) -> Tuple[Any, Any, Dict[str, Any], Any]:
    """``(args, compression config, DeepSpeed's own config, pruning plan or None)``, or the error of a bad argument,
    config or model: every check that needs no communication, so that a bad compression section fails before
    DeepSpeed builds anything."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"slimtorch.deepspeed.initialize: model must be a torch.nn.Module, got "
                          f"{type(model).__name__}")
    source, args = _config_source(args, config, config_params)
    document = read_document(source)
    compression = load_config(document)
    deepspeed_config = {k: v for k, v in document.items() if k not in SECTIONS}
    plan = None
    if compression.has_training_pruning:
        _check_supported(deepspeed_config, model, compression)
        if compression.prunes_in_training:
            plan = plan_training(model, compression)
    return args, compression, deepspeed_config, plan


def _init_distributed(deepspeed: Any, dist_init_required: Optional[bool], deepspeed_kwargs: Dict[str, Any],
                      failure: Optional[Exception]) -> None:
    """What ``deepspeed.initialize`` does first (``deepspeed.init_distributed``), done before the ranks agree on
    their checks; nothing when torch.distributed is initialized already, or when this rank failed and no launcher
    started other ranks that would wait for it. When it fails, this rank's own failure is the error the user needs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if failure is not None and _launched_world() <= 1:
        return
    from deepspeed.accelerator import get_accelerator

    try:
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   distributed_port=deepspeed_kwargs.get("distributed_port", 29500),
                                   dist_init_required=dist_init_required)
    except Exception:
        if failure is not None:
            raise failure from None
        raise


def _launched_world() -> int:
    """How many ranks the launcher started (torchrun's and DeepSpeed's WORLD_SIZE, Open MPI's, PMI's); 1 if none."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def rank_before_the_engine(model: nn.Module, compression: Any) -> Optional[Dict[str, Tensor]]:
    """DeepSpeed's l1 ranks |w| in ``init_compression``, before the engine casts the model to fp16/bf16: rank the
    float weights here too, so half-precision rounding cannot reorder near-equal weights."""
    if not compression.prunes_in_training:
        return None
    access = None
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # built under deepspeed.zero.Init: partitioned already
        access = ZeRO3Access()
    sp = compression.sparse_pruning
    settings = [g.method for g in compression.structured_groups]
    if compression.pruning_enabled:
        settings += [sp.settings_for(None).method] + [sp.settings_for(g).method for g in sp.different_groups]
    if "l1" not in settings:
        return None
    try:
        return rank_at_prepare(plan_training(model, compression).layers, access)
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
    """Carry the pruning state in every DeepSpeed checkpoint and restore it on load.

    ZeRO 0-2: in the checkpoint's ``client_state`` (whole masks and summed scores; DeepSpeed writes rank 0's). ZeRO-3:
    each rank writes its own parts beside ZeRO's partitions (``slimtorch_pruning_rank{r}.pt`` in the tag's folder),
    so no rank gathers a whole layer to save; ``client_state`` records that, and loading needs the same world size,
    as ZeRO's own partitioned files do."""
    save, load = engine.save_checkpoint, engine.load_checkpoint
    per_rank = callbacks.pruner.access.shards_parameters

    def save_checkpoint(save_dir: str, tag: Any = None, client_state: Optional[Dict[str, Any]] = None,
                        *args: Any, **kwargs: Any) -> Any:
        state = dict(client_state or {})
        pruning = None
        if not callbacks.finalized:
            pruning = callbacks.state_dict(sharded=per_rank)
            state[CLIENT_STATE_KEY] = {SHARDED_KEY: _world()} if per_rank else pruning
        tag = f"global_step{engine.global_steps}" if tag is None else tag  # DeepSpeed's default tag
        saved = save(save_dir, tag, state, *args, **kwargs)
        if per_rank and pruning is not None:
            torch.save(pruning, os.path.join(save_dir, str(tag), _rank_file()))
        return saved

    def load_checkpoint(load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        path, client_state = load(load_dir, tag, *args, **kwargs)
        if path is None or callbacks.finalized:
            return path, client_state
        state = (client_state or {}).pop(CLIENT_STATE_KEY, None)
        if isinstance(state, dict) and SHARDED_KEY in state:
            state = _read_rank_file(os.path.dirname(path), state[SHARDED_KEY])
        if state is None:
            warnings.warn(f"slimtorch: the DeepSpeed checkpoint {path} holds no pruning state (saved without "
                          "slimtorch?); the pruning schedule starts again at step 0", stacklevel=2)
        else:
            callbacks.load_state_dict(state)
        return path, client_state

    save_checkpoint.__doc__, load_checkpoint.__doc__ = save.__doc__, load.__doc__
    engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint


#: marks a ``client_state`` whose pruning state is in per-rank files (ZeRO-3), with the world size that wrote them
SHARDED_KEY = "per_rank_files_of_world"


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _rank_file() -> str:
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return f"slimtorch_pruning_rank{rank}.pt"


def _read_rank_file(folder: str, world: int) -> Dict[str, Any]:
    if world != _world():
        raise StateDictError(
            f"the DeepSpeed checkpoint in {folder} holds the pruning state of {world} ranks, one file each (ZeRO-3); "
            f"this run has {_world()}. Resume with {world} ranks, as ZeRO-3's own partitioned files require")
    path = os.path.join(folder, _rank_file())
    if not os.path.isfile(path):
        raise StateDictError(f"{path} is missing: under ZeRO-3 every rank writes its pruning state beside the "
                             "checkpoint's partitions; copy the whole checkpoint folder")
    return torch.load(path, map_location="cpu", weights_only=True)


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError(
            "slimtorch.deepspeed needs DeepSpeed: DS_BUILD_OPS=0 pip install -e '.[deepspeed]' in the slimtorch "
            f"checkout (slimtorch is not on PyPI; DS_BUILD_OPS=0 builds no CUDA ops) ({exc})") from None
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


def _check_supported(deepspeed_config: Dict[str, Any], model: nn.Module, compression: Any) -> None:
    zero = deepspeed_config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    topk = [f"{g.technique.section}.different_groups.{g.group}" for g in compression.structured_groups
            if g.method == "topk"]
    if stage == 3 and topk:
        raise UnsupportedModelError(
            f"compression_training.{topk[0]}: method topk trains a score per row, head or channel as a new "
            "parameter of the layer, which ZeRO-3 would partition and gather with the layer; topk runs under ZeRO "
            "stage 0-2 and DDP. Under ZeRO-3 use l1 or a sparse_pruning method (snip_momentum with the 'channelx1' "
            "or 'head' pattern prunes whole rows or heads)")
    if deepspeed_config.get("managed_gradient_accumulation", True) is False:
        raise UnsupportedModelError(
            "managed_gradient_accumulation: false makes engine.step() reduce the gradients, after the point where "
            "slimtorch reads them; pruning needs the engine-managed accumulation (the default)")
    refuse_sharded(model, zero3=stage == 3)


def _accumulation_steps(engine: Any, configured: int) -> int:
    engine_steps = int(engine.gradient_accumulation_steps())
    if configured not in (1, engine_steps):
        raise ConfigError(
            f"compression_training.sparse_pruning.shared_parameters.gradient_accumulation_steps is {configured} but "
            f"the DeepSpeed engine accumulates {engine_steps} micro-batches per update; under DeepSpeed the engine's "
            "gradient_accumulation_steps governs: remove the key or set it to the same value")
    return engine_steps
