"""Reference runs of DeepSpeed 0.19.6's ``row_pruning`` / ``head_pruning`` / ``channel_pruning`` (l1 and topk).

Runs inside the venv that ``benchmarks/peers/setup_deepspeed_compression.sh`` builds, from the repository root:

    venv="$(benchmarks/peers/setup_deepspeed_compression.sh)"
    "$venv/bin/python" benchmarks/peers/deepspeed_structured.py

Each case takes DeepSpeed's own unit-test config (``tests/reference/configs/ds_unit_test.json``: row pruning of
``intermediate.dense``, head pruning of ``attention.output.dense``) with every other section switched off,
``schedule_offset`` 2 (so masking starts inside the 12-update run) and ``num_heads`` 4 (the tiny BERT's), on the
shared run of ``tests/reference/protocol.py``:

1. ``model = protocol.tiny_bert(0)``; ``torch.manual_seed(0)``; ``init_compression(model, config)``;
2. the initial topk scores are recorded (slimtorch's test loads them into its own scores: DeepSpeed draws them from
   the global RNG after rebuilding every layer, an order slimtorch does not reproduce);
3. ``torch.optim.SGD(model.parameters(), lr=protocol.LR)`` and ``protocol.train``, driving the scheduler as
   DeepSpeed's engine does (``sched.step(step_zero_check=True)`` before the first forward, ``sched.step()`` after
   every optimizer step);
4. recorded: each pruned layer's unit mask (``get_mask``), the final weights of the pruned layers, and the logits
   on the first batch in eval mode.

Output: ``tests/reference/data/deepspeed_0.19.6_structured.pt``: ``{case: {"fingerprint", "initial_scores",
"unit_masks", "weights", "logits", "config"}, "versions": {...}}``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.extensions_dir import own_extensions_dir  # noqa: E402

own_extensions_dir()  # DeepSpeed's CPU op compiles into a folder of its own version (tests/extensions_dir.py)

import torch  # noqa: E402

from tests.reference import protocol  # noqa: E402

CONFIG = REPO / "tests" / "reference" / "configs" / "ds_unit_test.json"
DEFAULT_OUT = REPO / "tests" / "reference" / "data" / "deepspeed_0.19.6_structured.pt"
SEED = 0
OFFSET = 2
SCORES = {"row": "row_mask_scores", "head": "head_pruning_scores"}


def case_config(row_method: str) -> dict:
    """DeepSpeed's unit-test config with only row and head pruning on, as the protocol's tiny BERT needs them."""
    cfg = json.loads(CONFIG.read_text())
    cfg.pop("_source", None)
    training = cfg["compression_training"]
    for name, body in training.items():
        holder = body.get("shared_parameters", body)
        holder["enabled"] = name in ("row_pruning", "head_pruning")
    training["row_pruning"]["shared_parameters"].update(schedule_offset=OFFSET, method=row_method)
    training["head_pruning"]["shared_parameters"].update(schedule_offset=OFFSET, num_heads=4)
    return cfg


def run(cfg: dict) -> dict:
    from deepspeed.compression.compress import init_compression
    from deepspeed.compression.config import get_compression_config
    from deepspeed.compression.scheduler import compression_scheduler

    model = protocol.tiny_bert(0)
    fp = protocol.fingerprint(model)
    torch.manual_seed(SEED)
    init_compression(model, copy.deepcopy(cfg))
    sched = compression_scheduler(model, get_compression_config(copy.deepcopy(cfg)))
    pruned = {}
    for name, module in model.named_modules():
        if getattr(module, "row_pruning_method", None):
            pruned[name] = "row"
        elif getattr(module, "head_pruning_method", None):
            pruned[name] = "head"
    initial = {n: getattr(model.get_submodule(n), SCORES[u]).detach().clone()
               for n, u in pruned.items() if hasattr(model.get_submodule(n), SCORES[u])}
    optimizer = torch.optim.SGD(model.parameters(), lr=protocol.LR)

    def before_forward(i):
        if i == 0:
            sched.step(step_zero_check=True)

    protocol.train(model, optimizer, protocol.batches(0), after_step=lambda i: sched.step(),
                   before_forward=before_forward)
    unit_masks = {n: model.get_submodule(n).get_mask(pruning_type=u).detach().reshape(-1).bool().clone()
                  for n, u in pruned.items()}
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in pruned}
    model.eval()
    batch = {k: v for k, v in protocol.batches(0)[0].items() if k != "labels"}
    with torch.no_grad():
        logits = model(**batch).logits.clone()
    for n, m in unit_masks.items():
        print(f"{n:45s} {pruned[n]:4s} kept {int(m.sum())}/{m.numel()}: {m.int().tolist()}")
    return {"fingerprint": fp, "initial_scores": initial, "unit_masks": unit_masks, "units": pruned,
            "weights": weights, "logits": logits, "config": json.dumps(cfg, sort_keys=True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    import deepspeed
    import transformers

    result = {}
    for row_method in ("topk", "l1"):
        print(f"\n== row_pruning {row_method} + head_pruning topk ==")
        result[f"row_{row_method}_head_topk"] = run(case_config(row_method))
    result["versions"] = {"deepspeed": str(deepspeed.__version__), "torch": str(torch.__version__),
                          "transformers": str(transformers.__version__), "python": platform.python_version(),
                          "protocol.py sha256": hashlib.sha256(
                              (REPO / "tests" / "reference" / "protocol.py").read_bytes()).hexdigest(),
                          "seed": SEED, "schedule_offset": OFFSET}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out)
    print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
