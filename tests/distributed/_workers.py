"""Process bodies for the torch.distributed tests (importable by spawned children)."""
from __future__ import annotations

import datetime
import functools
import traceback

import torch
import torch.distributed as dist
from torch import nn

import slimtorch as st

GLOBAL_BATCH = 32
UPDATES = 10


def digits_tensors():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:GLOBAL_BATCH * UPDATES], dtype=torch.float32) / 8.0 - 1.0
    y = torch.tensor(d.target[:GLOBAL_BATCH * UPDATES], dtype=torch.int64)
    return x, y


def mlp(with_middle: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(64, 64), nn.ReLU()]
    if with_middle:
        layers += [nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)]
    else:
        layers += [nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def digits_cnn() -> nn.Sequential:
    """Conv-ReLU twice, Linear-ReLU, head; 2:4 fits conv 2 (16 inputs) and Linear 5 (512), not the 1-channel stem."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def config(**extra):
    shared = {"enabled": True, "method": "snip_momentum", "pattern": "2:4", "start_step": 0, "end_step": 6,
              "frequency": 2, **extra}
    return {"compression_training": {"sparse_pruning": {"shared_parameters": shared}}}


def train(model, opt, x, y, on_update=None):
    for step in range(UPDATES):
        xb, yb = x[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH], y[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH]
        if on_update is not None:
            xb, yb = on_update(step, xb, yb)
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield step


@functools.lru_cache(maxsize=None)
def one_process():
    """One process, plain PyTorch, the whole global batch of 32 per update: every update's masks and the final
    weights, the reference of the DDP and DeepSpeed runs (computed once per process; callers only read it)."""
    x, y = digits_tensors()
    model = digits_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cb = st.prepare_pruning(model, config(), optimizer=opt)
    masks = []
    for _ in train(model, opt, x, y):
        masks.append({l.name: l.mask.clone() for l in cb.pruner.layers if l.mask is not None})
    cb.finalize()
    return masks, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _close() -> None:
    # every rank reaches this point; a barrier first, so no rank tears gloo down while another still talks to it
    # (otherwise the process can abort at exit: "terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


def ddp_pruning(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """DDP training with hands-free 2:4 snip_momentum; saves every step's masks and weights of this rank."""
    _init(rank, world, init_file)
    try:
        x, y = digits_tensors()
        model = digits_cnn()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        cb = st.prepare_pruning(ddp, config(), optimizer=opt)
        share = GLOBAL_BATCH // world
        steps = []
        for _ in train(ddp, opt, x, y, lambda s, xb, yb: (xb[rank * share:(rank + 1) * share],
                                                         yb[rank * share:(rank + 1) * share])):
            steps.append({"masks": {l.name: l.mask.clone() for l in cb.pruner.layers if l.mask is not None},
                          "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}})
        cb.finalize()
        torch.save(steps, f"{out_dir}/rank{rank}.pt")
    finally:
        _close()


def mismatched_plan(rank: int, world: int, init_file: str, out_dir: str, case: str) -> None:
    """Rank 1 builds another model; records the error each rank raised at prepare_pruning."""
    _init(rank, world, init_file)
    try:
        model = mlp(with_middle=(rank == 0))
        cfg = config(modules=["^4$"]) if case == "named_module" else config()
        try:
            st.prepare_pruning(model, cfg)
            outcome = "no error"
        except st.SlimError as e:
            outcome = f"{type(e).__name__}: {e}"
        except Exception:
            outcome = "unexpected: " + traceback.format_exc()
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(outcome)
    finally:
        _close()


def unsynchronised_gradients(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """No DDP: each rank steps on its own data, so the scores differ; the mask check must say so."""
    _init(rank, world, init_file)
    try:
        x, y = digits_tensors()
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        st.prepare_pruning(model, config(), optimizer=opt)
        outcome = "no error"
        try:
            for _ in train(model, opt, x, y, lambda s, xb, yb: (xb[rank::world], yb[rank::world])):
                pass
        except st.DistributedError as e:
            outcome = f"DistributedError: {e}"
        with open(f"{out_dir}/rank{rank}.txt", "w") as f:
            f.write(outcome)
    finally:
        _close()
