"""Reference masks from DeepSpeed 0.19.6's compression library (``sparse_pruning``, ``method: "l1"``).

Runs inside the venv that ``benchmarks/peers/setup_deepspeed_compression.sh`` builds, from the repository root:

    venv="$(benchmarks/peers/setup_deepspeed_compression.sh)"
    "$venv/bin/python" benchmarks/peers/deepspeed_compression.py

For each real DeepSpeed config in ``tests/reference/configs/`` (see each file's ``"_source"``), on the shared run of
``tests/reference/protocol.py``:

1. ``model = protocol.tiny_bert(0)``; its fingerprint is taken BEFORE DeepSpeed touches it.
2. Only the ``sparse_pruning`` section is left on: every other section of ``compression_training`` (weight and
   activation quantization, row/head/channel pruning, layer reduction) gets ``enabled: false``. Their masks and
   quantizers are not what is compared, and they would change the training dynamics.
3. ``torch.manual_seed(0)``, then ``init_compression(model, config)``. (DeepSpeed draws from the global RNG there:
   every nn.Linear/nn.Embedding is rebuilt as its ``*_Compress`` twin, whose constructor runs the default init before
   the old weights are copied in, and ``method: "topk"`` draws its scores with ``kaiming_uniform_``.)
4. ``sched = compression_scheduler(model, get_compression_config(config))``. WORKAROUND: the scheduler's
   ``check_sparse_pruning`` reads ``shared_parameters["schedule_offset_end"]``, which the config parser only fills for
   ``snip_momentum``; for ``l1``/``topk`` it raises KeyError. This script therefore puts
   ``schedule_offset_end = SCHEDULE_OFFSET_END_FILL`` (a number far past any run) into the scheduler's
   shared-parameters dict, so that the window is [schedule_offset, infinity), as the docs describe it.
5. A plain ``torch.optim.SGD(model.parameters(), lr=protocol.LR)`` created AFTER ``init_compression`` (so it holds
   the compressed modules' parameters, and topk's scores), and ``protocol.train`` for ``protocol.STEPS`` updates on
   ``protocol.batches(0)``, driving the scheduler as DeepSpeed's engine does: ``sched.step(step_zero_check=True)``
   before the forward while no step has been taken yet (engine.py ``_forward_prologue``), ``sched.step()`` after each
   applied optimizer step (engine.py ``_take_model_step``). No DeepSpeed engine is built.
6. For every nn.Linear of the ORIGINAL model (``protocol.linear_names`` of a fresh tiny BERT): its final mask, i.e.
   DeepSpeed's ``sparse_pruning_mask`` buffer (l1) or ``get_mask("sparse")`` (topk: top-k of the learned scores)
   where the layer has sparse pruning, all-True elsewhere.

It checks and prints whether each l1 mask is exactly the ``ceil(dense_ratio * n)`` largest ``|w|`` of the INITIAL
weights, and also runs config (a) with ``method: "topk"`` for the record (key ``"ds_docs_topk"``).

Output: ``tests/reference/data/deepspeed_0.19.6_l1_masks.pt`` (``torch.save``), a dict
``{config_file_name: {"fingerprint", "masks" (protocol.pack_masks), "pruned_layers", "sparsity", ...},
"ds_docs_topk": {...}, "versions": {...}}``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.extensions_dir import own_extensions_dir  # noqa: E402

own_extensions_dir()  # DeepSpeed's CPU op compiles into a folder of its own version (tests/extensions_dir.py)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tests.reference import protocol  # noqa: E402

CONFIG_DIR = REPO / "tests" / "reference" / "configs"
CONFIG_FILES = ["ds_docs_l1.json", "ds_examples_bert_pruning_sparse.json", "ds_unit_test.json"]
DEFAULT_OUT = REPO / "tests" / "reference" / "data" / "deepspeed_0.19.6_l1_masks.pt"
SCHEDULE_OFFSET_END_FILL = 1 << 62
SEED = 0


def load_config(name: str) -> dict:
    with open(CONFIG_DIR / name) as f:
        cfg = json.load(f)
    cfg.pop("_source", None)
    return cfg


def only_sparse_pruning(cfg: dict, method: str | None = None):
    """A copy of ``cfg`` with every compression section but sparse_pruning switched off (and its method replaced
    when ``method`` is given). Returns (config, names of the sections switched off)."""
    cfg = copy.deepcopy(cfg)
    switched_off = []
    for section, body in cfg.get("compression_training", {}).items():
        if section == "sparse_pruning":
            continue
        holder = body.get("shared_parameters", body)  # layer_reduction keeps "enabled" at its top level
        if holder.get("enabled"):
            switched_off.append(section)
        holder["enabled"] = False
    if method is not None:
        cfg["compression_training"]["sparse_pruning"]["shared_parameters"]["method"] = method
    return cfg, switched_off


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def ceil_topk_l1(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Our own statement of what DeepSpeed's l1 should give: the ceil(ratio * n) largest |w| kept."""
    n = weight.numel()
    k = math.ceil(ratio * n)
    flat = weight.detach().abs().flatten()
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.topk(flat, k, largest=True, sorted=False).indices] = True
    return keep.view_as(weight)


def is_threshold_mask(weight: torch.Tensor, mask: torch.Tensor, ratio: float) -> bool:
    """Tie-proof check: exactly ceil(ratio*n) kept, and every kept |w| >= every pruned |w|."""
    a = weight.detach().abs()
    k = math.ceil(ratio * weight.numel())
    if int(mask.sum()) != k:
        return False
    if k in (0, weight.numel()):
        return True
    return bool(a[mask].min() >= a[~mask].max())


def run_one(cfg_name: str, cfg: dict, method: str | None = None) -> dict:
    from deepspeed.compression.basic_layer import LinearLayer_Compress
    from deepspeed.compression.compress import init_compression
    from deepspeed.compression.config import get_compression_config
    from deepspeed.compression.scheduler import compression_scheduler

    ds_cfg, switched_off = only_sparse_pruning(cfg, method)
    names = protocol.linear_names(protocol.tiny_bert(0))

    model = protocol.tiny_bert(0)
    fp = protocol.fingerprint(model)
    initial = {n: get_module(model, n).weight.detach().clone() for n in names}

    torch.manual_seed(SEED)
    init_compression(model, copy.deepcopy(ds_cfg))
    sched = compression_scheduler(model, get_compression_config(copy.deepcopy(ds_cfg)))
    sp_shared = sched.different_compression_methods["sparse_pruning"]["shared_parameters"]
    end_was_missing = "schedule_offset_end" not in sp_shared
    sp_shared.setdefault("schedule_offset_end", SCHEDULE_OFFSET_END_FILL)

    optimizer = torch.optim.SGD(model.parameters(), lr=protocol.LR)
    masked_forwards = []  # forward indices at which at least one layer applied its sparse mask

    def before_forward(i):
        if i == 0:  # engine: global_steps == 0
            sched.step(step_zero_check=True)
        if any(getattr(get_module(model, n), "sparse_pruning_enabled", False) for n in names):
            masked_forwards.append(i)

    def after_step(i):
        sched.step()

    protocol.train(model, optimizer, protocol.batches(0), after_step=after_step, before_forward=before_forward)

    masks, sparsity, pruned, ratios, checks, table = {}, {}, [], {}, {}, []
    for n in names:
        m = get_module(model, n)
        assert isinstance(m, LinearLayer_Compress), (n, type(m))
        w0 = initial[n]
        if m.sparse_pruning_method is not None:
            mask = m.get_mask(pruning_type="sparse").detach().bool().view_as(m.weight)
            pruned.append(n)
            ratios[n] = float(m.sparse_pruning_ratio)
            if m.sparse_pruning_method == "l1":
                checks[n] = bool(torch.equal(mask, ceil_topk_l1(w0, ratios[n]))) and is_threshold_mask(
                    w0, mask, ratios[n])
            else:
                checks[n] = None
        else:
            mask = torch.ones_like(m.weight, dtype=torch.bool)
        masks[n] = mask.clone()
        sparsity[n] = 1.0 - float(mask.sum()) / mask.numel()
        table.append((n, m.sparse_pruning_method is not None, bool(m.sparse_pruning_enabled), int(mask.sum()),
                      mask.numel(), sparsity[n], checks.get(n)))

    method_used = ds_cfg["compression_training"]["sparse_pruning"]["shared_parameters"]["method"]
    print(f"\n== {cfg_name} (method {method_used}) ==")
    print(f"fingerprint before init_compression: {fp}")
    print(f"sections switched off: {switched_off or 'none'}; schedule_offset_end missing for the scheduler: "
          f"{end_was_missing} (filled with {SCHEDULE_OFFSET_END_FILL})")
    print(f"schedule_offset {sp_shared['schedule_offset']}; first masked forward: "
          f"{masked_forwards[0] if masked_forwards else None} of {protocol.STEPS}")
    print(f"{'layer':45s} {'pruned':6s} {'on':3s} {'kept/total':>12s} {'sparsity':>9s} {'=ceil-top|w0|':>14s}")
    for n, p, on, kept, total, s, ok in table:
        print(f"{n:45s} {'yes' if p else 'no':6s} {'yes' if on else 'no':3s} {kept:>5d}/{total:<6d} {s:9.6f} "
              f"{'' if ok is None else ('yes' if ok else 'NO'):>14s}")
    if method_used == "l1":
        print(f"all l1 masks == ceil(dense_ratio*n) top-|w| of the initial weights: {all(checks.values())}")

    return {
        "fingerprint": fp,
        "masks": protocol.pack_masks(masks),
        "pruned_layers": pruned,
        "sparsity": sparsity,
        "dense_ratio": ratios,
        "method": method_used,
        "equals_ceil_topk_of_initial_weights": checks,
        "sections_switched_off": switched_off,
        "first_masked_forward": masked_forwards[0] if masked_forwards else None,
        "config": json.dumps(ds_cfg, sort_keys=True),
    }


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def versions() -> dict:
    import deepspeed
    import numpy
    import transformers

    return {  # plain str: torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses
        "deepspeed": str(deepspeed.__version__),
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
        "protocol.py sha256": file_sha256(REPO / "tests" / "reference" / "protocol.py"),
        "configs sha256": {name: file_sha256(CONFIG_DIR / name) for name in CONFIG_FILES},
        "seed": SEED,
        "steps": protocol.STEPS,
        "lr": protocol.LR,
        "schedule_offset_end filled in": SCHEDULE_OFFSET_END_FILL,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to torch.save the result")
    args = ap.parse_args()

    result = {}
    ok = True
    for name in CONFIG_FILES:
        result[name] = run_one(name, load_config(name))
        ok &= all(result[name]["equals_ceil_topk_of_initial_weights"].values())

    try:  # for the record: config (a) with topk (learned scores, kaiming-uniform init from the global RNG)
        topk = run_one("ds_docs_l1.json with method topk", load_config("ds_docs_l1.json"), method="topk")
        topk["status"] = "ran"
    except Exception as e:  # record where it fails instead of stopping
        tb = traceback.format_exc()
        print(f"\n== ds_docs_topk: CRASHED: {e!r}\n{tb}")
        topk = {"status": f"crashed: {e!r}", "traceback": tb}
    result["ds_docs_topk"] = topk

    result["versions"] = versions()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out)
    print(f"\nsaved {args.out} (sha256 {file_sha256(args.out)})")
    print(f"l1 masks all equal ceil-top-|w| of the initial weights: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
