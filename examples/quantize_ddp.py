#!/usr/bin/env python
"""Calibrate all-MiniLM-L6-v2 on several ranks at once: each rank sees its own shard, all build the same model.

    torchrun --standalone --nproc_per_node 2 examples/quantize_ddp.py [--observer percentile]

Install (in the slimtorch checkout, after torch): pip install -e ".[examples]"

Every rank tokenizes the same 128 paragraphs of the Python documentation and calibrates on its share of them;
``quantize`` reduces the observers' statistics across the ranks (the default process group: ``mpu=None``), so the
int8 models are identical on every rank and equal to one process calibrating on all 128 paragraphs. Rank 0 prints
the cosine of the sentence embeddings to the float model on 128 held-out paragraphs (fewer with ``--held-out``), and
whether all ranks agree.
"""
import argparse
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.distributed as dist
import torch.nn.functional as F

import slimtorch as st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prune_minilm import load_minilm, paragraphs  # noqa: E402
from quantize_minilm import embed_torch, tokenize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--observer", default="minmax", help="activation observer: minmax, percentile, entropy, mse")
    parser.add_argument("--held-out", type=int, default=128, help="held-out paragraphs rank 0 evaluates (at most 128)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model, tok = load_minilm()
    model.eval()
    texts = paragraphs()
    random.Random(0).shuffle(texts)  # the same order on every rank
    calib = tokenize(tok, texts[:128], 8)
    held = tokenize(tok, texts[128:128 + min(args.held_out, 128)], 16)
    config = {"compression_inference": {"static_quantization": {
        "enabled": True, "activation": {"observer": args.observer}}}}
    q = st.quantize(model, config, calib_dataloader=calib[rank::world], progress=False)  # this rank's shard
    state = q.state_dict()
    checksum = torch.tensor([float(sum(v.double().sum() for v in state.values() if v.is_floating_point()))],
                            dtype=torch.float64)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if rank == 0:
        cosine = F.cosine_similarity(embed_torch(q, held), embed_torch(model, held))
        print(f"{args.observer}: {st.quantization_report(q).calibration_batches} calibration batches over {world} "
              f"ranks; held-out cosine to float: mean {cosine.mean():.4f} min {cosine.min():.4f}; quantized models "
              f"identical on all {world} ranks: {bool(low == high)}")
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
