"""Process body of tests/distributed/test_rank_errors.py: configs that differ between the 2 ranks (gloo), given to
prepare_pruning on an FSDP2 model, to slimtorch.deepspeed.initialize under ZeRO-3 and to the Trainer callback
(importable by spawned children). Each rank records, per case, the error it raised and how long after the case
began."""
from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist

import slimtorch as st
from tests.distributed import _workers as W


def cases(rank: int):
    """(name, config of this rank): a dense_ratio that 2:4 cannot hold on rank 1 only, then a different_groups
    setting valid on both ranks but not the same."""
    groups = W.config(pattern="4x1", dense_ratio=0.5)
    groups["compression_training"]["sparse_pruning"]["different_groups"] = {
        "sp1": {"params": {"dense_ratio": 0.5 if rank == 0 else 0.25}, "modules": ["^0$"]}}
    return [("invalid_on_one_rank", W.config(dense_ratio=0.5 if rank == 0 else 0.25)),
            ("different_groups_differ", groups)]


def _outcomes(rank: int, prepare) -> dict:
    """Run ``prepare(config)`` for every case, all ranks starting each case together: what each raised, and when."""
    outcomes = {}
    for name, cfg in cases(rank):
        dist.barrier()
        started = time.monotonic()
        try:
            prepare(cfg)
            outcome = "no error"
        except Exception as e:  # noqa: BLE001  (any exception is recorded: the test says which one was expected)
            outcome = f"{type(e).__name__}: {e}"
        outcomes[name] = {"error": outcome, "seconds": time.monotonic() - started}
    return outcomes


def _fsdp2_model(world: int):
    """The digits MLP with fully_shard on every Linear and the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = W.mlp()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _zero3_initialize(cfg) -> None:
    from tests.integrations import _ds_workers as D

    model = W.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    st.deepspeed.initialize(model=model, optimizer=opt, config={**D.ds_config(3), **cfg}, dist_init_required=False)


def entry_points(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Every case through prepare_pruning on an FSDP2 model, slimtorch.deepspeed.initialize at ZeRO stage 3 (when
    DeepSpeed is installed) and the Trainer callback's constructor (the first case only: the second is caught when
    training begins, by prepare_pruning)."""
    import importlib.util

    from tests.integrations import _ds_workers as D

    D._init(rank, world, init_file)  # torch.distributed (gloo), and the variables DeepSpeed reads
    try:
        model = _fsdp2_model(world)
        found = {"prepare_pruning": _outcomes(rank, lambda cfg: st.prepare_pruning(model, cfg))}
        if importlib.util.find_spec("deepspeed") is not None:
            import deepspeed  # noqa: F401  (imported before the cases: the seconds they take are not the import's)

            found["slimtorch.deepspeed.initialize"] = _outcomes(rank, _zero3_initialize)
        if importlib.util.find_spec("transformers") is not None:
            from slimtorch.integrations.hf import PruningCallback

            found["PruningCallback"] = {k: v for k, v in _outcomes(rank, PruningCallback).items()
                                        if k == "invalid_on_one_rank"}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(found, f)
    finally:
        W._close()
