#!/usr/bin/env python
"""Reference results of Intel Neural Compressor 3.7.1 on the shared seeded tiny BERT (``tests/reference/protocol.py``).

Runs INSIDE the INC virtual environment, from the repository root:

    venv="$(PYTHON=.venv/bin/python benchmarks/peers/setup_inc.sh)"
    "$venv/bin/python" benchmarks/peers/inc_reference.py            # writes tests/reference/data/inc_3.7.1.json
    "$venv/bin/python" benchmarks/peers/inc_reference.py --check    # reruns and compares with the stored files

Which configs: ``tests/reference/configs/inc_*.json`` and ``ds_snip_*.json`` (or ``--configs``).

* ``inc_*.json`` hold the keyword arguments of INC's ``WeightPruningConfig`` (plus a ``_source`` string); they are
  passed unchanged: ``WeightPruningConfig(**config_without__source)``.
* ``ds_snip_*.json`` are whole DeepSpeed configs with ``compression_training.sparse_pruning`` and method
  ``snip_momentum``. DeepSpeed 0.19.6 hands such a config to INC in ``deepspeed/compression/compress.py`` lines
  125-140 (``init_compression``), and crashes there on ``from nc import WeightPruningConfig``; this script builds the
  ``WeightPruningConfig`` that code would build, reading the shared parameters with DeepSpeed's own defaults
  (``deepspeed/compression/config.py`` ``get_sparse_pruning_shared_parameters``): ``target_sparsity = 1 -
  dense_ratio`` (0.1), ``pattern = block_pattern`` ("4x1"), ``pruning_frequency = schedule_offset_stride`` (1),
  ``start_step = schedule_offset`` (1000), ``end_step = schedule_offset_end`` (= schedule_offset),
  ``excluded_op_names = excluded_modules`` ([]). Nothing else is passed: no ``pruning_configs`` (so INC's default
  ``[{}]``), no scope (INC's default "global"), no groups. What DeepSpeed leaves out is recorded per config under
  ``deepspeed``.

Each config runs in its OWN Python process (``--one``), because ``WeightPruningConfig``'s default arguments are
mutable and INC writes into them: ``pruning_configs=[{}]`` is filled in place by ``process_weight_config``
(``compression/pruner/utils.py`` line 278), so a second ``WeightPruningConfig(...)`` without ``pruning_configs`` in
the same process silently takes the FIRST one's values; ``parse_to_prune`` also appends the classifier head to the
default ``excluded_op_names=[]`` list (utils.py line 470). One process per config is what a DeepSpeed or INC user has.

Per config: ``model = protocol.tiny_bert(0)`` (its fingerprint is recorded), ``WeightPruningConfig``, then
``prepare_pruning(model, config, optimizer=SGD(lr=protocol.LR))`` (hands-free: INC's forward pre-hook runs
``on_step_begin``, its ``optimizer.step`` wrapper runs ``on_before_optimizer_step`` / ``on_after_optimizer_step``),
``on_train_begin``, ``protocol.train`` over ``protocol.batches(0)`` (``protocol.STEPS`` = 12 updates, no hooks of our
own but an observer after each step), ``on_train_end``. INC's ``global_step`` counts optimizer steps from 0; masks
are recomputed in the pre-hook of update t when start_step <= t <= end_step and (t - start_step) % frequency == 0.

Recorded per Linear (``protocol.linear_names``): ``zeros`` (pruned weights by INC's masks: the AND of the masks of
every pruner that hooks the layer; for a progressive pruner its applied ``progressive_masks``), ``weight_zeros``
(zero weights in the trained model; equal to ``zeros`` unless something is off), ``weights``, ``sparsity``,
``pruned_by`` (indices of the pruners = ``pruning_configs`` entries that hook the layer; [] if none), the pattern check
(``nm``: groups of M consecutive input weights with exactly N zeros, INC's N:M being N PRUNED of every M; ``blocks``:
NxM blocks wholly pruned or wholly kept) and the sha256 of the packed mask. Per pruner: the configuration INC ended up
with after filling defaults, the layers it hooks, each mask update (step and the scheduler's target) and INC's own
``current_sparsity_ratio``. Per config: ``overall_sparsity`` over the hooked layers and ``nm_valid``.

The masks themselves (keep-masks, True = weight kept, packed by ``protocol.pack_masks``) go to
``tests/reference/data/inc_3.7.1_masks.pt`` as ``{config_file: {layer: {"shape", "bits"}}}``, hooked layers only.
They are saved by the parent process, which never imports INC. (``prepare_pruning`` means to replace ``torch.save``
globally, ``compression/pruner/__init__.py`` lines 160-161, but in 3.7.1 it sets the attribute on INC's
``LazyImport("torch")`` proxy, ``utils.py`` line 31, so the real ``torch.save`` is left alone; the child restores it
anyway if it ever was replaced.)

Deterministic: one torch thread per child (``--threads``), seeded model and data, no timings in the data files;
``--check`` reruns everything and compares the JSON text and the mask bits (the .pt bytes differ between saves,
torch writes a random serialization id, so the masks are compared tensor by tensor).

INC behaviour these references show (details in the JSON): a ``pruning_configs`` entry's keys override the global
ones, missing ones are inherited (so the perchannel example's entry ``"pruning_type": "snip_momentum"`` silently
overrides the global ``snip_momentum_progressive``); the classifier head (``classifier``) is excluded automatically;
global scope ranks all hooked layers' block scores together, counts BLOCKS (not weights) and clamps a layer at
``int(blocks * max_sparsity_ratio_per_op)`` (0.98 by default: 1003 of 1024 4x1 blocks); local scope prunes
``int(blocks * target)`` blocks per layer; DeepSpeed's translation drops its groups and passes no scope, so its
configs run INC's global scope over every Linear but the excluded ones (the pooler too, unless excluded).
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "tests" / "reference" / "configs"
DATA_JSON = ROOT / "tests" / "reference" / "data" / "inc_3.7.1.json"
DATA_MASKS = ROOT / "tests" / "reference" / "data" / "inc_3.7.1_masks.pt"
CONFIG_GLOBS = ("inc_*.json", "ds_snip_*.json")

# DeepSpeed 0.19.6: deepspeed/compression/constants.py lines 106-133 (sparse pruning keys and defaults)
DS_DEFAULTS = {
    "enabled": False,
    "method": "l1",
    "schedule_offset": 1000,
    "block_pattern": "4x1",
    "dense_ratio": 0.1,
    "schedule_offset_stride": 1,
    "excluded_modules": [],
    # schedule_offset_end defaults to the schedule_offset actually read
}
# deepspeed/compression/config.py 0.19.6: each technique section present is parsed in this order, and its
# different_groups is read unguarded at this line (KeyError when the section has none)
DS_GROUPS_READ_AT = {"weight_quantization": 132, "activation_quantization": 198, "sparse_pruning": 271,
                     "row_pruning": 325, "head_pruning": 383, "channel_pruning": 437}
DS_TRANSLATED_KEYS = {"enabled", "method", "schedule_offset", "schedule_offset_end", "schedule_offset_stride",
                      "block_pattern", "dense_ratio", "excluded_modules"}


# --------------------------------------------------------------------------------------------------- translation
def deepspeed_translation(ds_config: dict):
    """(WeightPruningConfig kwargs, notes): what DeepSpeed 0.19.6's init_compression passes INC for snip_momentum."""
    sparse = ds_config.get("compression_training", {}).get("sparse_pruning", {})
    shared = dict(sparse.get("shared_parameters", {}))
    enabled = shared.get("enabled", DS_DEFAULTS["enabled"])
    method = shared.get("method", DS_DEFAULTS["method"])
    if not enabled or method != "snip_momentum":
        raise ValueError(f"not a DeepSpeed snip_momentum config (enabled={enabled}, method={method!r}): "
                         "DeepSpeed would not call INC")
    offset = shared.get("schedule_offset", DS_DEFAULTS["schedule_offset"])
    dense_ratio = shared.get("dense_ratio", DS_DEFAULTS["dense_ratio"])
    end = shared.get("schedule_offset_end", offset)
    assert 0 < dense_ratio < 1, "DeepSpeed: Invalid dense_ratio value. Must be less than 1"
    assert offset <= end, "DeepSpeed: Invalid schedule_offset and schedule_offset_end values"
    kwargs = {
        "target_sparsity": 1 - dense_ratio,
        "pattern": shared.get("block_pattern", DS_DEFAULTS["block_pattern"]),
        "pruning_frequency": shared.get("schedule_offset_stride", DS_DEFAULTS["schedule_offset_stride"]),
        "start_step": offset,
        "end_step": end,
        "excluded_op_names": list(shared.get("excluded_modules", DS_DEFAULTS["excluded_modules"])),
    }
    groups = sparse.get("different_groups")
    notes = {
        "defaults_used": sorted(k for k in ("schedule_offset", "schedule_offset_end", "schedule_offset_stride",
                                            "block_pattern", "dense_ratio", "excluded_modules") if k not in shared),
        "shared_keys_not_passed": sorted(set(shared) - DS_TRANSLATED_KEYS),
        "groups_not_passed": groups if groups else {},
        "not_passed": "pruning_configs (INC default [{}]), pruning_scope (INC default 'global'), pruning_type "
                      "(INC default 'snip_momentum'), sparsity_decay_type (INC default 'exp'), op_names, "
                      "pruning_op_types (INC default ['Conv', 'Linear']), min/max_sparsity_ratio_per_op",
        "deepspeed_itself": [],
    }
    sections = ds_config.get("compression_training", {})
    missing = [(name, line) for name, line in DS_GROUPS_READ_AT.items()
               if isinstance(sections.get(name), dict) and "different_groups" not in sections[name]]
    if missing:
        name, line = missing[0]
        notes["deepspeed_itself"].append(
            f"section {name} has no different_groups: DeepSpeed's config parser raises KeyError 'different_groups' "
            f"(config.py line {line} reads it unguarded) before anything else happens")
    elif groups:
        notes["deepspeed_itself"].append(
            "non-empty different_groups with snip_momentum: DeepSpeed's compression_preparation calls "
            "enable_sparse_pruning(dense_ratio, 'snip_momentum') on the group's modules, which raises "
            "NotImplementedError (basic_layer.py lines 147-162), before INC is reached")
    notes["deepspeed_itself"].append(
        "otherwise DeepSpeed 0.19.6 fails on 'from nc import WeightPruningConfig' (compress.py line 133; next would "
        "be 'from nc_pruner.utils import ...', helper.py line 266); this run applies the translated config to the "
        "plain model with INC's prepare_pruning instead")
    return kwargs, notes


# ------------------------------------------------------------------------------------------------ child process
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pattern_shape(pattern: str, shape):
    """("nm", N, M) | ("block", rows, cols) for a 2-D weight of ``shape``; INC drops any prefix up to the last '_'."""
    p = pattern.split("_")[-1]
    if ":" in p:
        n, m = (int(x) for x in p.split(":"))
        return ("nm", n, m)
    if "x" in p:
        r, c = p.split("x")
        rows = shape[0] if r == "channel" else int(r)
        cols = shape[1] if c == "channel" else int(c)
        return ("block", rows, cols)
    return (None, None, None)


def _pattern_check(keep, pattern: str):
    pruned = ~keep
    kind, a, b = _pattern_shape(pattern, keep.shape)
    out, inp = keep.shape
    if kind == "nm":
        n, m = a, b
        if inp % m:
            return {"pattern": pattern, "N_pruned": n, "M": m, "divisible": False}
        z = pruned.reshape(out, inp // m, m).sum(-1)
        groups = z.numel()
        exact = int((z == n).sum())
        dense = int((z == 0).sum())
        return {"pattern": pattern, "N_pruned": n, "M": m, "groups": groups, "groups_exact": exact,
                "groups_dense": dense, "groups_other": groups - exact - dense, "nm_valid": exact == groups}
    if kind == "block":
        rows, cols = a, b
        if out % rows or inp % cols:
            return {"pattern": pattern, "block": [rows, cols], "divisible": False}
        z = pruned.reshape(out // rows, rows, inp // cols, cols).sum(dim=(1, 3))
        blocks = z.numel()
        full = int((z == rows * cols).sum())
        mixed = int(((z > 0) & (z < rows * cols)).sum())
        return {"pattern": pattern, "block": [rows, cols], "blocks": blocks, "blocks_pruned": full,
                "blocks_mixed": mixed, "blocks_valid": mixed == 0}
    return {"pattern": pattern}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


PRUNER_KEYS = ("pattern", "pruning_type", "pruning_scope", "target_sparsity", "start_step", "end_step",
               "pruning_frequency", "sparsity_decay_type", "min_sparsity_ratio_per_op", "max_sparsity_ratio_per_op",
               "op_names", "excluded_op_names", "pruning_op_types", "criterion_type", "criterion_reduce_type",
               "reg_type", "progressive")


def run_one(config_path: Path, threads: int) -> dict:
    """Run one config in this process (call in a fresh interpreter); returns the result with ``_masks``."""
    os.environ.setdefault("LOGLEVEL", "WARNING")  # INC's logger reads it when first created
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from tests.reference import protocol

    raw = config_path.read_bytes()
    cfg = json.loads(raw)
    result = {"config_sha256": _sha256(raw), "source": cfg.get("_source")}
    kind = "deepspeed_snip_momentum" if "compression_training" in cfg else "inc"
    result["kind"] = kind

    captured = []

    class _Capture(logging.Handler):
        def emit(self, record):
            captured.append(f"{record.levelname}: {record.getMessage()}")

    try:
        if kind == "inc":
            kwargs = {k: v for k, v in cfg.items() if k != "_source"}
        else:
            kwargs, notes = deepspeed_translation(cfg)
            result["deepspeed"] = notes
        result["weight_pruning_config"] = copy.deepcopy(kwargs)  # before INC fills and mutates anything

        import neural_compressor
        from neural_compressor.compression.pruner import prepare_pruning
        from neural_compressor.training import WeightPruningConfig

        logging.getLogger("neural_compressor").addHandler(_Capture(level=logging.WARNING))

        model = protocol.tiny_bert(0)
        result["fingerprint"] = protocol.fingerprint(model)
        data = protocol.batches(0)
        opt = torch.optim.SGD(model.parameters(), lr=protocol.LR)
        names = protocol.linear_names(model)
        modules = dict(model.named_modules())

        config = WeightPruningConfig(**kwargs)
        pruning = prepare_pruning(model, config, optimizer=opt)
        pruners = pruning.pruners

        mask_updates = [[] for _ in pruners]
        for i, p in enumerate(pruners):  # observe the scheduler's targets (no change in behaviour)
            orig = p.scheduler.update_sparsity_ratio

            def recording(*a, _orig=orig, _i=i, _p=p, **k):
                target = _orig(*a, **k)
                mask_updates[_i].append({"step": int(_p.global_step), "target": float(target)})
                return target

            p.scheduler.update_sparsity_ratio = recording

        def effective_masks(p):
            masks = p.progressive_masks if getattr(p, "use_progressive", False) else p.masks
            return {n: (m != 0).reshape(modules[n].weight.shape) for n, m in masks.items()}

        hooked = {n: [i for i, p in enumerate(pruners) if n in p.modules] for n in names}
        pruned_layers = [n for n in names if hooked[n]]

        def layer_keep(name, per_pruner):
            keep = torch.ones_like(modules[name].weight, dtype=torch.bool)
            for i in hooked[name]:
                keep &= per_pruner[i][name]
            return keep

        trajectory = []
        pruner_trajectory = [[] for _ in pruners]

        def observe(step):
            per = [effective_masks(p) for p in pruners]
            trajectory.append(sum(int((~layer_keep(n, per)).sum()) for n in pruned_layers))
            for i, masks in enumerate(per):
                pruner_trajectory[i].append(sum(int((~m).sum()) for m in masks.values()))

        pruning.on_train_begin()
        protocol.train(model, opt, data, after_step=observe)
        pruning.on_train_end()

        if hasattr(model, "inc_hook_handle"):
            model.inc_hook_handle.remove()
        if hasattr(torch, "orig_save"):
            torch.save = torch.orig_save

        per = [effective_masks(p) for p in pruners]
        layers, packed = {}, {}
        for n in names:
            w = modules[n].weight.detach()
            keep = layer_keep(n, per)
            zeros = int((~keep).sum())
            entry = {
                "pruned_by": hooked[n],
                "zeros": zeros,
                "weight_zeros": int((w == 0).sum()),
                "weights": w.numel(),
                "sparsity": round(zeros / w.numel(), 6),
                "shape": list(w.shape),
            }
            if hooked[n]:
                checks = [_pattern_check(keep, pruners[i].config["pattern"]) for i in hooked[n]]
                entry["pattern_check"] = checks[0] if len(checks) == 1 else checks
                bits = protocol.pack_masks({n: keep})[n]["bits"].numpy().tobytes()
                entry["mask_sha256"] = _sha256(bits)
                packed[n] = {"shape": list(keep.shape), "bits_b64": base64.b64encode(bits).decode()}
            layers[n] = entry

        pruner_infos = []
        for i, p in enumerate(pruners):
            info = {"index": i, "class": type(p).__name__}
            info.update({k: _jsonable(p.config[k]) for k in PRUNER_KEYS})
            if hasattr(p, "use_progressive"):
                info["use_progressive"] = bool(p.use_progressive)
            info["modules"] = list(p.modules)
            z = sum(int((~m).sum()) for m in per[i].values())
            t = sum(modules[n].weight.numel() for n in p.modules)
            info.update({"zeros": z, "weights": t, "sparsity": round(z / t, 6) if t else None})
            info["inc_current_sparsity_ratio"] = float(p.current_sparsity_ratio)
            info["total_prune_cnt"] = int(p.total_prune_cnt)
            info["mask_updates"] = mask_updates[i]
            info["zeros_after_update"] = pruner_trajectory[i]
            pruner_infos.append(info)

        tz = sum(layers[n]["zeros"] for n in pruned_layers)
        tw = sum(layers[n]["weights"] for n in pruned_layers)
        checks = [layers[n]["pattern_check"] for n in pruned_layers]
        checks = [c for c in checks if isinstance(c, dict)]
        nm_layers = [c for c in checks if "nm_valid" in c]
        block_layers = [c for c in checks if "blocks_valid" in c]
        result.update({
            "pruners": pruner_infos,
            "pruned_layers": pruned_layers,
            "layers": layers,
            "overall_zeros": tz,
            "overall_weights": tw,
            "overall_sparsity": round(tz / tw, 6) if tw else None,
            "nm_valid": all(c["nm_valid"] for c in nm_layers) if nm_layers else None,
            "blocks_valid": all(c["blocks_valid"] for c in block_layers) if block_layers else None,
            "weights_match_masks": all(layers[n]["zeros"] == layers[n]["weight_zeros"] for n in pruned_layers),
            "zeros_after_update": trajectory,
            "_masks": packed,
        })
        versions = {"neural_compressor": neural_compressor.__version__}
    except Exception as exc:  # keep the failure as a result: it may be what a user must know
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback_tail"] = [ln.strip().split("site-packages/")[-1]
                                    for ln in traceback.format_exc().strip().splitlines()[-4:]]
        try:
            import neural_compressor

            versions = {"neural_compressor": neural_compressor.__version__}
        except Exception:  # pragma: no cover
            versions = {}
    import transformers

    versions.update({"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0], "torch_threads": threads})
    result["inc_log_warnings"] = captured
    result["_versions"] = versions
    return result


# ----------------------------------------------------------------------------------------------- parent process
def list_configs(selected):
    if selected:
        return [Path(p) if Path(p).exists() else CONFIG_DIR / p for p in selected]
    found = set()
    for pattern in CONFIG_GLOBS:
        found.update(CONFIG_DIR.glob(pattern))
    return sorted(found)


def run_child(path: Path, threads: int):
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               LOGLEVEL="WARNING", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--one", str(path), "--threads", str(threads)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{path.name}: child failed (rc {proc.returncode})\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall


def print_table(name: str, r: dict) -> None:
    print(f"\n== {name}  [{r['kind']}]")
    if "error" in r:
        print(f"   ERROR {r['error']}")
        return
    for p in r["pruners"]:
        print(f"   pruner {p['index']}: {p['pattern']} {p['pruning_type']} scope={p['pruning_scope']} "
              f"target={p['target_sparsity']:.6g} steps {p['start_step']}..{p['end_step']}/{p['pruning_frequency']} "
              f"min/max={p['min_sparsity_ratio_per_op']}/{p['max_sparsity_ratio_per_op']} -> "
              f"{p['zeros']}/{p['weights']} = {p['sparsity']} (INC: {p['inc_current_sparsity_ratio']:.6f}); "
              f"updates at {[u['step'] for u in p['mask_updates']]}")
    print(f"   {'layer':45s} {'by':>6s} {'zeros':>6s} {'weights':>7s} {'sparsity':>9s}  pattern")
    for n, e in r["layers"].items():
        chk = e.get("pattern_check")
        if isinstance(chk, dict) and "nm_valid" in chk:
            pat = f"N:M exact {chk['groups_exact']}/{chk['groups']} dense {chk['groups_dense']}"
        elif isinstance(chk, dict) and "blocks_valid" in chk:
            pat = f"blocks pruned {chk['blocks_pruned']}/{chk['blocks']} mixed {chk['blocks_mixed']}"
        else:
            pat = ""
        by = ",".join(map(str, e["pruned_by"])) or "-"
        print(f"   {n:45s} {by:>6s} {e['zeros']:6d} {e['weights']:7d} {e['sparsity']:9.4f}  {pat}")
    print(f"   overall over hooked layers: {r['overall_zeros']}/{r['overall_weights']} = {r['overall_sparsity']}"
          f"   nm_valid={r['nm_valid']} blocks_valid={r['blocks_valid']} "
          f"weights_match_masks={r['weights_match_masks']}")
    if r["inc_log_warnings"]:
        print(f"   INC warnings: {sorted(set(r['inc_log_warnings']))}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="*", help="config files (default: tests/reference/configs/inc_*.json, "
                                                 "ds_snip_*.json)")
    ap.add_argument("--out", default=str(DATA_JSON))
    ap.add_argument("--masks-out", default=str(DATA_MASKS))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per config process")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="config processes at a time")
    ap.add_argument("--check", action="store_true", help="rerun and compare with --out / --masks-out; write nothing")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.one:  # child: one config, one JSON line on stdout
        print(json.dumps(run_one(Path(args.one), args.threads)))
        return 0

    t0 = time.perf_counter()
    paths = list_configs(args.configs)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(lambda p: run_child(p, args.threads), paths))

    out, masks, versions, walls = {}, {}, None, {}
    for path, (res, wall) in zip(paths, runs):
        walls[path.name] = wall
        v = res.pop("_versions")
        if versions is None:
            versions = v
        elif v != versions:
            raise RuntimeError(f"version mismatch between config processes: {v} != {versions}")
        packed = res.pop("_masks", {})
        masks[path.name] = packed
        out[path.name] = res
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.reference import protocol

    out["versions"] = dict(versions or {}, deepspeed_translation="deepspeed 0.19.6, deepspeed/compression/compress.py "
                                                                 "lines 125-140 (rebuilt here, not imported)")
    out["protocol"] = {"model": "protocol.tiny_bert(0)", "data": "protocol.batches(0)", "steps": protocol.STEPS,
                       "optimizer": f"torch.optim.SGD(lr={protocol.LR})",
                       "driver": "prepare_pruning(model, WeightPruningConfig(...), optimizer=opt), hands-free"}
    text = json.dumps(out, indent=1) + "\n"
    def unpack(e):
        bits = np.frombuffer(base64.b64decode(e["bits_b64"]), dtype=np.uint8).copy()
        return {"shape": e["shape"], "bits": torch.from_numpy(bits)}

    mask_obj = {cfg: {n: unpack(e) for n, e in layer_masks.items()} for cfg, layer_masks in masks.items()}

    for name in (p.name for p in paths):
        print_table(name, out[name])
    print()
    for name, wall in walls.items():
        print(f"wall {name}: {wall:.1f} s")

    if args.check:
        ok = True
        old = Path(args.out).read_text() if Path(args.out).exists() else None
        if old != text:
            ok = False
            print(f"CHECK: {args.out} differs from this run")
        if Path(args.masks_out).exists():
            stored = torch.load(args.masks_out)
            same = stored.keys() == mask_obj.keys() and all(
                stored[c].keys() == mask_obj[c].keys()
                and all(torch.equal(stored[c][n]["bits"], mask_obj[c][n]["bits"])
                        and stored[c][n]["shape"] == mask_obj[c][n]["shape"] for n in mask_obj[c])
                for c in mask_obj)
            if not same:
                ok = False
                print(f"CHECK: {args.masks_out} differs from this run")
        else:
            ok = False
            print(f"CHECK: {args.masks_out} missing")
        print("CHECK:", "identical" if ok else "DIFFERENT", f"(total wall {time.perf_counter() - t0:.1f} s)")
        return 0 if ok else 1

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    torch.save(mask_obj, args.masks_out)
    print(f"wrote {args.out} and {args.masks_out} (total wall {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
