#!/usr/bin/env python
"""Prune while training with DeepSpeed's engine: ZeRO 2 (or 3), gradient accumulation, hands-free 2:4 snip_momentum.

    torchrun --standalone --nproc_per_node 2 examples/prune_deepspeed.py [examples/configs/deepspeed_zero2_2to4.json]
    torchrun --standalone --nproc_per_node 2 examples/prune_deepspeed.py examples/configs/deepspeed_zero3_2to4.json

Install (in the slimtorch checkout, after torch): DS_BUILD_OPS=0 pip install -e ".[examples,deepspeed]"

The config is an ordinary DeepSpeed config with a ``compression_training`` section: slimtorch reads that section
and passes the rest to ``deepspeed.initialize``. Every ``engine.step()`` drives pruning; the gradients come from
DeepSpeed's reduced partitions and the masked weights go to its fp32 master copy too, so a ZeRO checkpoint holds
the pruned zeros. Under ZeRO-3 each rank holds a slice of every weight: the report, the checksum and the accuracy
below read whole weights, so every rank takes part. Runs on CPU (gloo) or GPUs (NCCL). Rank 0 prints the report and
whether all ranks agree.
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

import slimtorch as st

CONFIG = Path(__file__).resolve().parent / "configs" / "deepspeed_zero2_2to4.json"


def main(config: str) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    engine, _, _, _, callbacks = st.deepspeed.initialize(model=model, optimizer=opt, config=config,
                                                         dist_init_required=False)
    digits = load_digits()
    x = (torch.tensor(digits.data, dtype=torch.float32) / 8.0 - 1.0).to(engine.device)
    y = torch.tensor(digits.target).to(engine.device)
    micro = engine.train_micro_batch_size_per_gpu()
    g = torch.Generator().manual_seed(0)  # the same order on every rank; each takes its own micro-batches
    for _ in range(4):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y) - micro * world + 1, micro * world):
            mine = order[start + rank * micro: start + (rank + 1) * micro].to(engine.device)
            loss = nn.functional.cross_entropy(engine(x[mine]), y[mine])
            engine.backward(loss)
            engine.step()  # pruning happens in here, once per update (every 2 micro-batches)
    callbacks.finalize()
    # every rank: under ZeRO-3 these gather the partitioned weights (collectives)
    report = st.sparsity_report(engine)
    checksum = torch.tensor([float(sum(st.whole_parameter(p).double().sum() for p in model.parameters()))],
                            dtype=torch.float64, device=engine.device)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    with torch.no_grad():
        accuracy = float((engine(x).argmax(1) == y).float().mean())
    if rank == 0:
        print(report)
        print(f"{callbacks.step} updates; train accuracy {accuracy:.4f}; weights identical on all {world} ranks: "
              f"{bool(low == high)}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1] if len(sys.argv) > 1 else str(CONFIG))
