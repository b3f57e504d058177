"""Process bodies for the DeepSpeed ZeRO-3 tests: 2 CPU ranks (gloo) training the tiny Llama or all-MiniLM-L6-v2
through ``slimtorch.deepspeed.initialize`` with ``zero_optimization.stage`` 3, hands-free (importable by spawned
children). The models, batches, losses and the one-process reference are the FSDP2 tests' (``_fsdp_workers``)."""
from __future__ import annotations

import os

import torch

import slimtorch as st
from tests.distributed import _fsdp_workers as F
from tests.integrations import _ds_workers as D

GLOBAL = 8  # sequences per update (F.batches)


def ds_config(micro_batch: int, offload: bool = False, **zero):
    # offload: the fp32 masters, their gradients and the optimizer's state in host memory, stepped by a torch optimizer
    extra = {"zero_force_ds_cpu_optimizer": False} if offload else {}
    if offload:
        zero = {**zero, "offload_optimizer": {"device": "cpu"}}
    return {**extra, "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            # memory_efficient_linear (DeepSpeed's default: on) computes Linear layers with a bias as a matmul then an
            # add, whose rounding differs from F.linear's fused addmm: off, the forward is one process's
            "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                  "memory_efficient_linear": False, **zero},
            "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told; one process does not
            "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6, "wall_clock_breakdown": False}


def engine(arch: str, pattern: str, micro_batch: int, scope: str = "local", offload: bool = False, **zero):
    """The seeded model under a ZeRO-3 engine with SGD (elementwise: the partitions step as one process does)."""
    torch.manual_seed(0)
    model = F.build(arch)
    opt = torch.optim.SGD(model.parameters(), lr=F.LR, momentum=0.9)
    config = {**ds_config(micro_batch, offload, **zero), **F.config(pattern, scope=scope)}
    eng, _, _, _, cb = st.deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    return eng, cb


def _whole_masks(cb):
    return {l.name: l.full_mask().clone() for l in cb.pruner.layers if l.mask is not None}  # a collective


def train(rank: int, world: int, init_file: str, out_dir: str, arch: str, pattern: str, same_batch: bool,
          persistence: int = 100000, scope: str = "local", offload: bool = False) -> None:
    """UPDATES updates; whole masks after every one; the engine's checkpoint, its 16-bit model and the report.

    ``same_batch``: every rank takes the whole global batch, so ZeRO-3's averaged gradient is one process's
    ((g + g) / 2 == g); otherwise each rank takes its half. ``persistence``: ZeRO-3 keeps parameters below this many
    elements whole on every rank between forwards (100000 is DeepSpeed's default: the tiny Llama's all are)."""
    D._init(rank, world, init_file)
    try:
        eng, cb = engine(arch, pattern, GLOBAL if same_batch else GLOBAL // world, scope, offload,
                         stage3_param_persistence_threshold=persistence)
        steps = []
        for batch in F.batches(arch):
            loss = F.loss_of(eng, batch if same_batch else F.share(batch, rank, world), arch)
            eng.backward(loss)
            eng.step()
            steps.append(_whole_masks(cb))
        local = {l.name: (l.mask.numel(), l.access.full(l.weight).numel()) for l in cb.pruner.layers}
        report = [(r.name, r.pattern, r.sparsity, r.pattern_valid) for r in st.sparsity_report(eng)]
        eng.save_checkpoint(f"{out_dir}/ckpt", tag="end")
        eng.save_16bit_model(f"{out_dir}/16bit", "model.bin")
        cb.finalize()
        torch.save({"steps": steps, "local": local, "report": report}, f"{out_dir}/rank{rank}.pt")
    finally:
        D._close()


def resume(rank: int, world: int, init_file: str, out_dir: str, resume_at: int) -> None:
    """An uninterrupted run, then one checkpointed by the engine after ``resume_at`` updates (the pruning state in
    its client_state), rebuilt from scratch, loaded and continued: whole masks and the 16-bit weights of both."""
    D._init(rank, world, init_file)
    try:
        data = F.batches("llama")
        outcome = {}
        for mode in ("straight", "resumed"):
            eng, cb = engine("llama", "2:4", GLOBAL // world, stage3_param_persistence_threshold=0)
            for i, batch in enumerate(data):
                if mode == "resumed" and i == resume_at:
                    eng.save_checkpoint(f"{out_dir}/mid", tag="mid")
                    outcome["rank_file"] = os.path.isfile(f"{out_dir}/mid/mid/slimtorch_pruning_rank{rank}.pt")
                    cb.finalize()
                    eng, cb = engine("llama", "2:4", GLOBAL // world, stage3_param_persistence_threshold=0)
                    eng.load_checkpoint(f"{out_dir}/mid", tag="mid")
                eng.backward(F.loss_of(eng, F.share(batch, rank, world), "llama"))
                eng.step()
            masks = _whole_masks(cb)
            cb.finalize()
            outcome[mode] = {"masks": masks, "weights": eng._zero3_consolidated_16bit_state_dict()}
        torch.save(outcome, f"{out_dir}/rank{rank}.pt")
    finally:
        D._close()


def memory(rank: int, world: int, init_file: str, out_dir: str, num_layers: int, scope: str = "local") -> None:
    """A tiny Llama of ``num_layers`` layers under ZeRO-3 (every parameter partitioned): how many layers' whole
    tensors (gathered weights, scores, masks) are alive at once during the mask updates, and the most bytes they
    hold."""
    from slimtorch.integrations.zero3 import ZeRO3Access

    peak, stop_tracking = F.track_whole_tensors(ZeRO3Access)
    D._init(rank, world, init_file)
    try:
        torch.manual_seed(0)
        from tests.llm.tiny_models import tiny_llama

        model = tiny_llama(0, num_hidden_layers=num_layers).train()
        opt = torch.optim.SGD(model.parameters(), lr=F.LR, momentum=0.9)
        config = {**ds_config(GLOBAL // world, stage3_param_persistence_threshold=0), **F.config("2:4", scope=scope)}
        eng, _, _, _, cb = st.deepspeed.initialize(model=model, optimizer=opt, config=config,
                                                   dist_init_required=False)
        for batch in F.batches("llama")[:5]:
            eng.backward(F.loss_of(eng, F.share(batch, rank, world), "llama"))
            eng.step()
        state = cb.state_dict()  # a checkpoint's pruning state: gathered one layer at a time, kept on the host
        assert state
        largest = max(l.mask.numel() * world * 4 for l in cb.pruner.layers)  # one layer's float32 weight (padded)
        shard = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
        torch.save({"peak_layers": peak["layers"], "peak_bytes": peak["bytes"], "largest_layer_bytes": largest,
                    "shard_bytes": shard, "layers": len(cb.pruner.layers)}, f"{out_dir}/rank{rank}.pt")
        cb.finalize()
    finally:
        stop_tracking()
        D._close()


def refusals(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """What ZeRO-3 setups are refused, on every rank alike and without hanging: topk's learned scores, a plain
    prepare_pruning on partitioned parameters, and ranks whose configs differ."""
    import deepspeed

    D._init(rank, world, init_file)
    outcomes = []
    try:
        model = F.build("bert")
        topk = {**ds_config(4), **F.TOPK}
        try:
            st.deepspeed.initialize(model=model, config=topk, dist_init_required=False)
        except st.SlimError as e:
            outcomes.append(f"{type(e).__name__}: {e}")
        model = F.build("bert")
        eng, _, _, _ = deepspeed.initialize(model=model, config=ds_config(4), dist_init_required=False,
                                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        try:
            st.prepare_pruning(eng.module, F.config("2:4"))
        except st.SlimError as e:
            outcomes.append(f"{type(e).__name__}: {e}")
        model = F.build("bert")
        mismatched = F.config("2:4" if rank == 0 else "4x1")
        try:
            st.deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                    config={**ds_config(4), **mismatched}, dist_init_required=False)
        except st.SlimError as e:
            outcomes.append(f"{type(e).__name__}: {e}")
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write("\n".join(outcomes))
    finally:
        D._close()


L1 = {"compression_training": {"sparse_pruning": {
    "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 1},
    "different_groups": {"mlp": {"params": {"dense_ratio": 0.5}, "modules": ["mlp.up_proj"]}}}}}


def zero_init(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """The tiny Llama partitioned by ``deepspeed.zero.Init`` before slimtorch sees it (as ``from_pretrained`` does
    under a ZeRO-3 Trainer), pruned by DeepSpeed's l1: the whole weights it started from, the whole masks after 3
    updates and the engine's 16-bit model."""
    import deepspeed

    from slimtorch.pruning.access import whole
    from tests.llm.tiny_models import tiny_llama

    D._init(rank, world, init_file)
    try:
        config = {**ds_config(GLOBAL // world), **L1}
        torch.manual_seed(0)
        model = tiny_llama(0, num_hidden_layers=4).train()
        start = {n: p.detach().clone() for n, p in model.named_parameters() if "up_proj" in n}
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_config(GLOBAL // world))  # partitions in place
        partitioned = all(p.shape.numel() == 0 for p in model.parameters())
        gathered = {n: whole(p).clone() for n, p in model.named_parameters() if "up_proj" in n}  # collectives
        assert all(torch.equal(gathered[n], w) for n, w in start.items())
        opt = torch.optim.SGD(model.parameters(), lr=F.LR)
        eng, _, _, _, cb = st.deepspeed.initialize(model=model, optimizer=opt, config=config,
                                                   dist_init_required=False)
        for batch in F.batches("llama")[:3]:
            eng.backward(F.loss_of(eng, F.share(batch, rank, world), "llama"))
            eng.step()
        masks = _whole_masks(cb)
        eng.save_16bit_model(f"{out_dir}/16bit", "model.bin")
        cb.finalize()
        torch.save({"partitioned": partitioned, "start": start, "masks": masks}, f"{out_dir}/rank{rank}.pt")
    finally:
        D._close()
