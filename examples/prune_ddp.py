#!/usr/bin/env python
"""Prune while training with DistributedDataParallel: 2 CPU processes (gloo), hands-free 2:4 snip_momentum.

    torchrun --standalone --nproc_per_node 2 examples/prune_ddp.py    # or: python -m torch.distributed.run ...

Install (in the slimtorch checkout, after torch): pip install -e ".[examples]"

Each rank trains on its half of every global batch of sklearn digits; DDP all-reduces the gradients, so every
rank's snip_momentum scores, and therefore its masks, are the same. slimtorch checks that at prepare_pruning (same
layers on every rank) and after every mask update (same masks), and raises DistributedError on every rank
otherwise. Rank 0 prints the report and a checksum that every rank agrees with.
"""
import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

import slimtorch as st

CONFIG = {"compression_training": {"sparse_pruning": {"shared_parameters": {
    "enabled": True, "method": "snip_momentum", "pattern": "2:4", "start_step": 0, "end_step": 40, "frequency": 5}}}}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 8.0 - 1.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    callbacks = st.prepare_pruning(ddp, CONFIG, optimizer=opt)  # hands-free; layers named as in `model`
    g = torch.Generator().manual_seed(0)  # the same global batches on every rank; each takes its slice
    for _ in range(4):
        for idx in torch.randperm(len(y), generator=g).split(64 * world):
            mine = idx[rank::world]
            loss = nn.functional.cross_entropy(ddp(x[mine]), y[mine])
            opt.zero_grad()
            loss.backward()
            opt.step()
    callbacks.finalize()
    checksum = torch.tensor([float(sum(p.detach().double().sum() for p in model.parameters()))], dtype=torch.float64)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(st.sparsity_report(model))
        with torch.no_grad():
            accuracy = float((model(x).argmax(1) == y).float().mean())
        print(f"train accuracy {accuracy:.4f}; weights identical on all {world} ranks: {bool(low == high)}")
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
