"""Process bodies for the DeepSpeed tests: 2 CPU ranks (gloo) training the digits CNN through
``slimtorch.deepspeed.initialize`` (importable by spawned children)."""
from __future__ import annotations

import os
import zlib

import torch
from torch import nn

import slimtorch as st
from tests.distributed import _workers as W

MICRO_BATCH = 16  # per rank and micro-batch: 2 ranks x 16 = the 32 of the single-process run


def ds_config(stage: int, accumulate: int = 1, **pruning):
    return {"train_micro_batch_size_per_gpu": MICRO_BATCH // accumulate, "gradient_accumulation_steps": accumulate,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 6, "wall_clock_breakdown": False,
            **W.config(**pruning)}


def _init(rank: int, world: int, init_file: str) -> None:
    # DeepSpeed's CPU shared-memory comm names its segments after MASTER_ADDR/PORT: unique per run, so runs side by
    # side (or a stale segment of a killed run) never meet
    port = 20000 + zlib.crc32(init_file.encode()) % 20000
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    W._init(rank, world, init_file)  # torch.distributed (gloo) first: DeepSpeed's comm then uses it


def _close() -> None:
    """``W._close`` through DeepSpeed's comm once it took over: it drops the process groups DeepSpeed keeps (a clone
    of the world group) with the group, so a next case in the same process builds its own."""
    from deepspeed.comm import comm

    if comm.cdb is None:
        W._close()
        return
    torch.distributed.barrier()
    comm.destroy_process_group()


def _engine(stage: int, accumulate: int = 1, hands_free: bool = True, **pruning):
    model = W.digits_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # elementwise: ZeRO's partitions step alike
    return model, st.deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, accumulate, **pruning),
                                          dist_init_required=False, hands_free=hands_free)


def _snapshot(model, cb):
    return {"masks": {l.name: l.mask.clone() for l in cb.pruner.layers if l.mask is not None},
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "step": cb.step}


def _micro_batches(rank, world, accumulate, update, x, y):
    """This rank's micro-batches of update ``update``: its share of the same global batch of 32."""
    lo = update * W.GLOBAL_BATCH
    share = W.GLOBAL_BATCH // world
    xb, yb = x[lo + rank * share: lo + (rank + 1) * share], y[lo + rank * share: lo + (rank + 1) * share]
    size = share // accumulate
    return [(xb[i * size:(i + 1) * size], yb[i * size:(i + 1) * size]) for i in range(accumulate)]


def train(rank: int, world: int, init_file: str, out_dir: str, stage: int, accumulate: int = 1,
          hands_free: bool = True, resume_at: int = -1) -> None:
    """Train UPDATES updates; save every update's masks and weights. With ``resume_at`` >= 0 the run saves a
    DeepSpeed checkpoint after that many updates, builds a fresh engine, loads it and goes on."""
    _init(rank, world, init_file)
    try:
        x, y = W.digits_tensors()
        model, (engine, _, _, _, cb) = _engine(stage, accumulate, hands_free)
        sizes = [layer.weight.numel() for layer in cb.pruner.layers]
        reductions, stop_counting = _count_weight_sized_all_reduces(sizes)
        steps = []
        for update in range(W.UPDATES):
            if update == resume_at:
                engine.save_checkpoint(f"{out_dir}/ckpt", tag="mid", client_state={"epoch": 3})
                model, (engine, _, _, _, cb) = _engine(stage, accumulate, hands_free)
                _, client = engine.load_checkpoint(f"{out_dir}/ckpt", tag="mid")
                assert client["epoch"] == 3 and st.deepspeed.CLIENT_STATE_KEY not in client
            for xb, yb in _micro_batches(rank, world, accumulate, update, x, y):
                loss = nn.functional.cross_entropy(engine(xb), yb)
                engine.backward(loss)
                if not hands_free:
                    cb.on_before_optimizer_step()
                engine.step()
                if not hands_free:
                    cb.on_after_optimizer_step()
            steps.append(_snapshot(model, cb))
        report = st.sparsity_report(engine)
        steps.append({"weight_sized_all_reduces": list(reductions),
                      "report": [(r.name, r.pattern, r.sparsity, r.pattern_valid) for r in report],
                      "master": _master_weights(engine, model),
                      "deepspeed_keys": sorted(engine._config._param_dict)})
        stop_counting()
        torch.save(steps, f"{out_dir}/rank{rank}.pt")
    finally:
        _close()


def _count_weight_sized_all_reduces(sizes):
    """Record the size of every float32 all-reduce through deepspeed.comm as large as a pruned weight (gradient
    gathers and score sums; DeepSpeed's own reductions are flat buckets or scalars); returns the live list and a
    function that stops the counting (the next case in the same process counts its own)."""
    from deepspeed import comm

    seen, original = [], comm.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        if tensor.dtype == torch.float32 and tensor.numel() in sizes:
            seen.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    def stop():
        comm.all_reduce = original

    comm.all_reduce = all_reduce
    return seen, stop


def _master_weights(engine, model):
    """The fp32 master copy DeepSpeed would save and step (ZeRO 1/2), gathered; empty at stage 0 (fp32)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is not None:
            out[name] = full.clone()
    return out


def gradient_accumulation_mismatch(rank: int, world: int, init_file: str, out_dir: str) -> None:
    _init(rank, world, init_file)
    try:
        try:
            _engine(1, accumulate=2, gradient_accumulation_steps=4)
            outcome = "no error"
        except st.ConfigError as e:
            outcome = f"ConfigError: {e}"
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(outcome)
    finally:
        _close()


def l1_in_bf16(rank: int, world: int, init_file: str, out_dir: str, stage: int) -> None:
    """DeepSpeed's l1 config under a bf16 engine: save the whole mask of the digits CNN's hidden Linear, the float
    weights it started from (the engine casts the model to bf16 before any step) and the fp32 master after 2
    updates (masks applied at the first)."""
    _init(rank, world, init_file)
    try:
        x, y = W.digits_tensors()
        model = W.digits_cnn()
        start = model.get_submodule("6").weight.detach().clone()
        config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "zero_optimization": {"stage": stage},
                  "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6,
                  "compression_training": {"sparse_pruning": {
                      "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 1},
                      "different_groups": {"fc": {"params": {"dense_ratio": 0.3}, "modules": ["^6$"]}}}}}
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine, _, _, _, cb = st.deepspeed.initialize(model=model, optimizer=opt, config=config,
                                                      dist_init_required=False)
        for update in range(2):
            xb, yb = _micro_batches(rank, world, 1, update, x, y)[0]
            engine.backward(nn.functional.cross_entropy(engine(xb.to(torch.bfloat16)).float(), yb))
            engine.step()
        from deepspeed.utils import safe_get_full_fp32_param

        layer = cb.pruner.layers[0]
        torch.save({"mask": layer.full_mask().cpu(), "start": start,  # whole mask: a collective under ZeRO-3
                    "master": safe_get_full_fp32_param(layer.weight).cpu(),  # a collective too
                    "dtype": str(engine.module.get_submodule("6").weight.dtype)}, f"{out_dir}/rank{rank}.pt")
    finally:
        _close()


TOPK = {"compression_training": {
    "row_pruning": {"shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": 2},
                    "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["^6$"],
                                                 "related_modules": [["^8$"]]}}},
    "channel_pruning": {"shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": 2},
                        "different_groups": {"cp1": {"params": {"dense_ratio": 0.5}, "modules": ["^3$"]}}}}}


def topk_sections(rank: int, world: int, init_file: str, out_dir: str, stage: int) -> None:
    """DeepSpeed's topk row and channel pruning of the digits CNN through the engine: every update's unit masks,
    then the finalized weights and the fp32 master copy."""
    _init(rank, world, init_file)
    try:
        x, y = W.digits_tensors()
        model = W.digits_cnn()
        torch.manual_seed(1)  # the scores' initialisation
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        config = {"train_micro_batch_size_per_gpu": MICRO_BATCH, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6, **TOPK}
        engine, _, _, _, cb = st.deepspeed.initialize(model=model, optimizer=opt, config=config,
                                                      dist_init_required=False)
        steps = []
        for update in range(W.UPDATES):
            for xb, yb in _micro_batches(rank, world, 1, update, x, y):
                engine.backward(nn.functional.cross_entropy(engine(xb), yb))
                engine.step()
            steps.append({l.name: l.learned.keep().clone() for l in cb.pruner.layers})
        cb.finalize()
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"steps": steps, "final": final, "master": _master_weights(engine, model)},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        _close()
