#!/usr/bin/env python
"""Peers' own pruning configs through slimtorch, beside the peers' recorded results on the same run.

The peers ran in their own virtual environments (``benchmarks/peers/deepspeed_compression.py`` for DeepSpeed
0.19.6, ``benchmarks/peers/inc_reference.py`` for INC 3.7.1) on the shared protocol of
``tests/reference/protocol.py`` (seeded tiny BERT, 12 SGD updates at lr 0.5); their results are in
``tests/reference/data/``. This script runs every config file of ``tests/reference/configs/`` through slimtorch
unchanged and prints one table (a few seconds):

    python benchmarks/peer_configs.py

Columns: the layers each side prunes (same set?), the overall sparsity of the pruned layers on each side, the gap in
pruning units (a 4x1 block, an N:M group's pruned weights, a row), the largest per-layer sparsity difference, and
for DeepSpeed's l1 configs how many Linear masks equal DeepSpeed's bit for bit.
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import slimtorch as st  # noqa: E402
from slimtorch.pruning.registry import masks_of  # noqa: E402
from tests.reference import compare as C  # noqa: E402
from tests.reference import protocol as P  # noqa: E402

L1 = ["ds_docs_l1.json", "ds_examples_bert_pruning_sparse.json", "ds_unit_test.json"]
#: the other sections DeepSpeed's unit-test config enables: quantization-aware training (refused by slimtorch) and
#: row/head pruning (run by slimtorch, compared with DeepSpeed in tests/pruning/test_structured_sections.py)
OTHER_SECTIONS = ("weight_quantization", "activation_quantization", "row_pruning", "head_pruning")


def deepspeed_l1_rows():
    reference = torch.load(C.HERE / "data" / "deepspeed_0.19.6_l1_masks.pt")
    rows = []
    for name in L1:
        doc = C.config_document(name)
        for section in OTHER_SECTIONS:  # the reference masks come from sparse_pruning alone
            if section in doc["compression_training"]:
                doc["compression_training"][section]["shared_parameters"]["enabled"] = False
        model = P.tiny_bert(0)
        opt = torch.optim.SGD(model.parameters(), lr=P.LR)
        cb = st.prepare_pruning(model, doc, optimizer=opt)
        P.train(model, opt, P.batches(0))
        ours = masks_of(model)
        theirs = P.unpack_masks(reference[name]["masks"])
        equal = sum(torch.equal(ours.get(n, torch.ones_like(m)), m) for n, m in theirs.items())
        rows.append((name, sorted(cb.layers) == sorted(reference[name]["pruned_layers"]), len(cb.layers),
                     len(reference[name]["pruned_layers"]), equal, len(theirs)))
    return rows


def main() -> None:
    warnings.filterwarnings("ignore")
    print("DeepSpeed 0.19.6 l1 example configs (masks of every Linear, after 12 updates):")
    print(f"{'config':<40} {'same layers':>11} {'pruned ours/DS':>15} {'masks equal':>12}")
    for name, same, ours, theirs, equal, total in deepspeed_l1_rows():
        print(f"{name:<40} {str(same):>11} {f'{ours}/{theirs}':>15} {f'{equal}/{total}':>12}")
    data = json.loads(C.INC_DATA.read_text())
    print("\nINC 3.7.1 (its own configs, and DeepSpeed's snip_momentum configs as DeepSpeed translates them):")
    print(f"{'config':<30} {'scope':<13} {'pattern':<9} {'same layers':>11} {'ours':>8} {'INC':>8} "
          f"{'gap units':>9} {'max layer diff':>14} {'N:M exact':>9}")
    for name in sorted(k for k in data if k.endswith(".json")):
        c = C.run_slimtorch(name, data[name])
        largest = c.largest_layer_gap() if c.same_layers else math.nan
        nm = "-" if c.nm_exact is None else str(c.nm_exact)
        print(f"{name:<30} {c.scope:<13} {c.pattern:<9} {str(c.same_layers):>11} {c.overall('ours'):>8.4f} "
              f"{c.overall('theirs'):>8.4f} {c.overall_gap_in_units():>9.1f} {largest:>14.4f} {nm:>9}")


if __name__ == "__main__":
    main()
