#!/usr/bin/env python
"""Global (adaptive) vs uniform per-layer sparsity, at the same overall sparsity and the same training budget.

For each task and pattern it runs, for every seed:

* ``uniform``          slimtorch, scope "local" (every layer exactly the target), snip_momentum;
* ``global``           slimtorch, scope "global" (one ranking of the scores across the layers, default bounds:
                       0..0.98 per layer for block patterns, 0..(M-N)/M for N:M), snip_momentum;
* ``global_magnitude`` slimtorch, scope "global", magnitude (one global |w| threshold): does the data-measured
                       sensitivity (snip_momentum's |w * g|) beat a plain magnitude threshold? (digits by default);
* ``inc_global``       Intel Neural Compressor 3.7.1, pruning_scope "global", snip_momentum, same pattern, target
                       and schedule, in its own venv (``peers/inc_digits.py``, ``peers/inc_pruning.py``);
* ``inc_local`` (``--inc-local``) and ``uniform_magnitude`` (``--methods``) on request.

Tasks (the protocol files pin everything else, for both libraries):

* ``digits``: a 4-conv/linear CNN trained on scikit-learn's digits (``_digits.py``): 300 dense updates, then
  60 pruning + 20 updates (masks every 5, exp decay), Adam; metric: held-out test accuracy (%). Seconds per run.
* ``minilm``: all-MiniLM-L6-v2 distilled from itself while pruned (``_distill.py``, as ``pruning.py``): 60
  pruning + 20 updates, masks every 5, exp decay, AdamW; metric: held-out embedding cosine. ~1.5-3 min per run.

Patterns: ``PATTERN=DENSE_RATIO``; default ``4x1=0.2`` (80% sparse) and ``2:4=0.6`` (40% sparse: only a share of
each layer's groups becomes 2:4; with scope global that share varies per layer).

Every run is written to ``--json-out`` as soon as it ends (per-layer sparsities of every run included); runs already
there are skipped, so an interrupted sweep resumes, and parts can be run separately and merged:

    python benchmarks/adaptive.py --tasks digits --inc-local --patterns 4x1=0.2 2:4=0.6 4x1=0.1 \
        --methods uniform global global_magnitude uniform_magnitude inc_global inc_local \
        --json-out benchmarks/results/adaptive_digits.json                      # 54 runs, ~6 min
    python benchmarks/adaptive.py --tasks minilm --patterns 4x1=0.2 --json-out benchmarks/results/adaptive_m4x1.json
    python benchmarks/adaptive.py --tasks minilm --patterns 4x1=0.2 --methods global_magnitude \
        --json-out benchmarks/results/adaptive_m4x1.json                        # adds global magnitude
    python benchmarks/adaptive.py --tasks minilm --patterns 2:4=0.6 --json-out benchmarks/results/adaptive_m24.json
    python benchmarks/adaptive.py --merge benchmarks/results/adaptive_*.json     # the tables of BENCHMARKS.md
    python benchmarks/adaptive.py --tasks minilm --seeds 0 --methods global     # smoke run of one method

Intel Neural Compressor's venv comes from ``peers/setup_inc.sh`` (built or reused; ``--inc-venv DIR`` or
$SLIMTORCH_INC_VENV says where it is). Each table prints method, metric mean over seeds, spread (max - min over
seeds), sample std, per-seed values, achieved sparsity of the pruned layers, min/max per-layer sparsity, the checks,
and the verdict: global - uniform against 2 x max(spread_uniform, spread_global), and the same with spread read as
the sample standard deviation.

Checks (every slimtorch run; recorded in the JSON, "ok"/"FAIL" in the table): the pruned layers' overall sparsity
is the target within one pruning unit (4 weights for 4x1, M-N = 2 for 2:4), counted on the masks; with scope
global every layer's sparsity is inside [min, max] exactly; with scope local every layer is within half a unit of
the target (so local's overall can be off by up to half a unit per layer; on 36 MiniLM layers that is more than one
unit, which is what "local" means, not a fault); the pattern holds on every layer (blocks whole; N:M groups at most
N kept, or whole when the density is above N/M). The same checks are computed for INC's runs for information.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _digits as G  # noqa: E402
import torch  # noqa: E402
from _adaptive_tables import (  # noqa: E402
    DEFAULT_METHODS,
    DEFAULT_PATTERNS,
    METHODS,
    METRIC,
    TASKS,
    build_tables,
    parse_pattern,
    print_tables,
)

DEFAULT_JSON = HERE / "results" / "adaptive.json"
MINILM_MODULES = [r"encoder\.layer\.\d+\."]
# --------------------------------------------------------------------------------------------------------------------
# patterns, configs, checks
# --------------------------------------------------------------------------------------------------------------------
def unit_weights(pattern: str) -> int:
    """Weights one pruning unit removes: a whole RxC block, or the M-N dropped weights of an N:M group."""
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        return m - n
    r, c = (int(v) for v in pattern.split("x"))
    return r * c


def default_bounds(pattern: str):
    """slimtorch's (and INC's) default per-layer bounds of scope global."""
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        return 0.0, (m - n) / m
    return 0.0, 0.98


def protocol_module(task: str):
    if task == "digits":
        return G
    import _distill as D

    return D


def slimtorch_config(task: str, pattern: str, dense_ratio: float, scope: str, criterion: str) -> dict:
    P = protocol_module(task)
    shared = {"enabled": True, "method": criterion, "pattern": pattern, "dense_ratio": dense_ratio, "scope": scope,
              "start_step": P.START_STEP, "end_step": P.END_STEP, "frequency": P.FREQUENCY,
              "sparsity_decay_type": P.DECAY}
    if task == "minilm":
        shared["modules"] = MINILM_MODULES
    return {"compression_training": {"sparse_pruning": {"shared_parameters": shared}}}


def checks(layers: dict, pattern: str, target: float, scope: str, bounds) -> dict:
    """The checks of the module docstring on per-layer {"weights", "zeros", "violations"}."""
    unit = unit_weights(pattern)
    total = sum(l["weights"] for l in layers.values())
    zeros = sum(l["zeros"] for l in layers.values())
    deviation = zeros - target * total
    out = {"unit_weights": unit, "target_zeros": target * total, "zeros": zeros,
           "deviation_weights": round(deviation, 3), "overall_within_one_unit": abs(deviation) <= unit + 1e-6,
           "pattern_valid": all(l.get("violations", 0) == 0 for l in layers.values())}
    if scope == "global":
        low, high = Fraction(repr(float(bounds[0]))), Fraction(repr(float(bounds[1])))
        bad = [n for n, l in layers.items() if not low <= Fraction(l["zeros"], l["weights"]) <= high]
        out.update(bounds=list(bounds), layers_within_bounds=not bad, layers_outside_bounds=bad)
    else:
        bad = [n for n, l in layers.items() if abs(l["zeros"] - target * l["weights"]) > unit / 2 + 1e-6]
        out.update(layers_at_target=not bad, layers_off_target=bad)
    out["ok"] = bool(out["pattern_valid"] and
                     (out.get("layers_within_bounds", False) and out["overall_within_one_unit"]
                      if scope == "global" else out.get("layers_at_target", False)))
    return out


def summary_fields(layers: dict) -> dict:
    total = sum(l["weights"] for l in layers.values())
    zeros = sum(l["zeros"] for l in layers.values())
    sp = [l["zeros"] / l["weights"] for l in layers.values()]
    return {"overall_sparsity": zeros / total, "zeros": zeros, "weights": total,
            "layer_sparsity_min": min(sp), "layer_sparsity_max": max(sp), "n_layers": len(layers)}


def slimtorch_layers(cb, model, pattern: str) -> dict:
    """Per pruned layer, from the live masks (before finalize): weights, zeros, pattern check, bounds."""
    state = cb.state_dict()["pruner"]["layers"]
    settings = {t.name: t.settings for t in cb.plan.layers}
    mods = dict(model.named_modules())
    layers = {}
    for name in cb.layers:
        mask, w = state[name]["mask"], mods[name].weight.detach()
        zeros = 0 if mask is None else int((~mask.bool()).sum())
        layers[name] = {"shape": list(w.shape), "weights": w.numel(), "zeros": zeros,
                        "sparsity": round(zeros / w.numel(), 6), "weight_zeros": int((w == 0).sum()),
                        "min_sparsity": getattr(settings[name], "min_sparsity", None),
                        "max_sparsity": getattr(settings[name], "max_sparsity", None),
                        **G.pattern_check(w, pattern)}
    return layers


def slimtorch_prepare(model, opt, task, pattern, dense_ratio, scope, criterion):
    import slimtorch as st

    cb = st.prepare_pruning(model, slimtorch_config(task, pattern, dense_ratio, scope, criterion), optimizer=opt)
    left_out = [{"name": lo.name, "reason": lo.reason} for lo in cb.plan.left_out]
    return cb, left_out


def slimtorch_finish(cb, model, task, pattern, dense_ratio, scope) -> dict:
    """Checks on the live masks, slimtorch's own report, then finalize."""
    import slimtorch as st

    layers = slimtorch_layers(cb, model, pattern)
    report = st.sparsity_report(model)
    report_valid = all(r.pattern_valid for r in report.pruned)
    first = next(iter(layers.values()))
    bounds = (first["min_sparsity"], first["max_sparsity"]) if scope == "global" else (0.0, 1.0)
    if scope == "global" and None in bounds:
        bounds = default_bounds(pattern)
    ch = checks(layers, pattern, 1.0 - dense_ratio, scope, bounds)
    ch["report_pattern_valid"] = report_valid
    ch["ok"] = ch["ok"] and report_valid
    cb.finalize()
    return {"layers": layers, "checks": ch, **summary_fields(layers)}


# --------------------------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------------------------
def run_digits_slimtorch(seed, pattern, dense_ratio, scope, criterion) -> dict:
    threads = torch.get_num_threads()
    try:
        t0 = time.perf_counter()
        model, opt, data, batches, dense, _ = G.pretrain(seed)
        cb, left_out = slimtorch_prepare(model, opt, "digits", pattern, dense_ratio, scope, criterion)
        seen, handle = G.track_sparsity(model, cb.layers)
        losses = G.train(model, opt, data, batches, G.PRETRAIN, G.TOTAL_UPDATES)
        handle.remove()
        final = slimtorch_finish(cb, model, "digits", pattern, dense_ratio, scope)
        metrics = G.evaluate(model, data)
        import slimtorch as st

        return {"accuracy": metrics["accuracy"], "test_loss": metrics["test_loss"],
                "dense_accuracy": dense["accuracy"], "dense_test_loss": dense["test_loss"], **final,
                "left_out": left_out, "seen_sparsity": seen, "loss_last": losses[-1],
                "protocol": G.protocol(), "env": {**G.environment(), "slimtorch": getattr(st, "__version__", "?")},
                "wall_s": time.perf_counter() - t0}
    finally:
        torch.set_num_threads(threads)


def run_minilm_slimtorch(seed, pattern, dense_ratio, scope, criterion) -> dict:
    import _distill as D

    t0 = time.perf_counter()
    teacher, student, tok, heldout, batches, teacher_emb, opt = D.prepare_run(seed)
    D.warmup(student, teacher, batches[0])
    cb, left_out = slimtorch_prepare(student, opt, "minilm", pattern, dense_ratio, scope, criterion)
    hist = D.run_distillation(student, teacher, batches, opt, time_updates=False)
    final = slimtorch_finish(cb, student, "minilm", pattern, dense_ratio, scope)
    cos_mean, cos_min = D.heldout_cosine(student, teacher, tok, heldout, teacher_emb=teacher_emb)
    untargeted = [n for n in D.encoder_linears(student) if n not in final["layers"]]
    return {"cos_mean": cos_mean, "cos_min": cos_min, **final, "left_out": left_out,
            "untargeted_encoder_linears": untargeted, "loss_last": hist["loss"][-1],
            "protocol": {"steps": D.PRUNING_STEPS, "extra_steps": D.EXTRA_STEPS, "frequency": D.FREQUENCY,
                         "decay": D.DECAY, "lr": D.LR, "batch": [D.BATCH_SIZE, D.SEQ_LEN]},
            "env": D.environment(), "wall_s": time.perf_counter() - t0}


_INC_PYTHON = None


def inc_python(args) -> str:
    global _INC_PYTHON
    if _INC_PYTHON is None:
        if args.inc_venv:
            os.environ["SLIMTORCH_INC_VENV"] = str(Path(args.inc_venv).resolve())
        from pruning import inc_python as setup  # builds or reuses the venv through peers/setup_inc.sh

        _INC_PYTHON = setup()
    return _INC_PYTHON


def _run_peer(cmd, log: Path) -> None:
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text().splitlines()[-40:]
        raise RuntimeError(f"INC run failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))


def slimtorch_targets(task: str, pattern: str, dense_ratio: float):
    """The layers slimtorch prunes for this task and pattern (planned on a fresh model, nothing trained)."""
    if task != "digits":
        return None
    import slimtorch as st

    model = G.DigitsCNN()
    cb = st.prepare_pruning(model, slimtorch_config(task, pattern, dense_ratio, "local", "snip_momentum"))
    names = list(cb.layers)
    cb.finalize()
    return names


def run_inc(task, seed, pattern, dense_ratio, scope, criterion, args) -> dict:
    python = inc_python(args)
    target = 1.0 - dense_ratio
    if ":" in pattern and pattern != "2:4":
        raise SystemExit("only 2:4 means the same to INC (N pruned of M) and slimtorch (N kept of M)")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "inc.json", Path(tmp) / "inc.log"
        if task == "digits":
            wanted = slimtorch_targets(task, pattern, dense_ratio)  # INC prunes exactly what slimtorch prunes
            cmd = [python, str(HERE / "peers" / "inc_digits.py"), "--seed", str(seed), "--pattern", pattern,
                   "--target-sparsity", repr(target), "--scope", scope, "--pruning-type", criterion,
                   "--layers", *wanted, "--json-out", str(out)]
        else:
            cmd = [python, str(HERE / "peers" / "inc_pruning.py"), "--seed", str(seed), "--pattern", pattern,
                   "--target-sparsity", repr(target), "--scope", scope, "--pruning-type", criterion,
                   "--no-timing", "--json-out", str(out)]
        _run_peer(cmd, log)
        raw = json.loads(out.read_text())
    nm = ":" in pattern
    if task == "digits":
        layers = raw["layers"]
        if set(raw["targeted_layers"]) != set(wanted) or raw["invalid_layers"]:
            print(f"  note: INC pruned {raw['targeted_layers']} (invalid for its pattern: {raw['invalid_layers']}), "
                  f"slimtorch prunes {wanted}", flush=True)
        rec = {"accuracy": raw["accuracy"], "test_loss": raw["test_loss"], "dense_accuracy": raw["dense_accuracy"],
               "dense_test_loss": raw["dense_test_loss"], "seen_sparsity": raw["seen_sparsity"],
               "invalid_layers": raw["invalid_layers"]}
    else:
        layers = {}
        for n, l in raw["layers"].items():
            weights = l.get("weights") or (l["shape"][0] * l["shape"][1])
            zeros = l["zeros"] if "zeros" in l else round(l["sparsity"] * weights)
            viol = l.get("partial_nm_violations") if nm else l.get("pattern_violations", 0)
            layers[n] = {"shape": l["shape"], "weights": weights, "zeros": zeros, "sparsity": l["sparsity"],
                         "violations": 0 if viol is None else viol}
        rec = {"cos_mean": raw["heldout_cosine_mean"], "cos_min": raw["heldout_cosine_min"],
               "untargeted_encoder_linears": raw.get("untargeted_encoder_linears")}
    bounds = default_bounds(pattern)  # INC's defaults: min/max_sparsity_ratio_per_op 0 / 0.98 (N:M: at most 0.5)
    ch = checks(layers, pattern, target, scope, bounds)
    ch["informational"] = "INC run: the checks slimtorch must pass, computed for comparison"
    raw_small = {k: v for k, v in raw.items() if k not in ("layers", "losses")}
    return {**rec, **summary_fields(layers), "layers": layers, "checks": ch, "inc": raw_small,
            "env": raw.get("env"), "wall_s": time.perf_counter() - t0}


def run_one(task, method, seed, pattern, dense_ratio, args) -> dict:
    lib, scope, criterion, label = METHODS[method]
    if lib == "inc":
        rec = run_inc(task, seed, pattern, dense_ratio, scope, criterion, args)
    elif task == "digits":
        rec = run_digits_slimtorch(seed, pattern, dense_ratio, scope, criterion)
    else:
        rec = run_minilm_slimtorch(seed, pattern, dense_ratio, scope, criterion)
    return {"task": task, "method": method, "label": label, "library": lib, "scope": scope,
            "criterion": criterion, "seed": seed, "pattern": pattern, "dense_ratio": dense_ratio,
            "target_sparsity": 1.0 - dense_ratio, **rec}


def run_key(task, pattern, dense_ratio, method, seed) -> str:
    return f"{task}/{pattern}/{dense_ratio:g}/{method}/seed{seed}"


# --------------------------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------------------------
def load_runs(path: Path) -> dict:
    if not path.exists():
        return {}
    return json.loads(path.read_text()).get("runs", {})


def save_runs(path: Path, runs: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "benchmarks/adaptive.py", "runs": dict(sorted(runs.items())),
           "tables": [t for t in build_tables(runs)]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--patterns", nargs="+", default=list(DEFAULT_PATTERNS), help="PATTERN=DENSE_RATIO ...")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                    help="the methods to run for every task (default: per task, see the docstring)")
    ap.add_argument("--inc-local", action="store_true", help="add INC local scope")
    ap.add_argument("--minilm-magnitude", action="store_true", help="add slimtorch global magnitude for MiniLM")
    ap.add_argument("--json-out", default=None, help=f"results JSON, read to resume and rewritten after every run "
                                                     f"(default {DEFAULT_JSON.relative_to(HERE.parent)})")
    ap.add_argument("--rerun", action="store_true", help="run again what the JSON already holds")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="print the tables of these result files together (and write them to --json-out if given)")
    ap.add_argument("--inc-venv", default=None, help="the INC venv (else $SLIMTORCH_INC_VENV / setup_inc.sh default)")
    args = ap.parse_args(argv)

    if args.merge:
        runs = {}
        for f in args.merge:
            for k, v in load_runs(Path(f)).items():
                if k in runs:
                    print(f"note: {k} is in more than one file; keeping the one from {f}", file=sys.stderr)
                runs[k] = v
        if args.json_out:
            save_runs(Path(args.json_out), runs)
        print_tables(build_tables(runs))
        return

    out = Path(args.json_out) if args.json_out else DEFAULT_JSON
    runs = load_runs(out)
    todo = []
    for task in args.tasks:
        methods = list(args.methods) if args.methods else list(DEFAULT_METHODS[task])
        if args.inc_local and "inc_local" not in methods:
            methods.append("inc_local")
        if task == "minilm" and args.minilm_magnitude and "global_magnitude" not in methods:
            methods.append("global_magnitude")
        for spec in args.patterns:
            pattern, ratio = parse_pattern(spec)
            for seed in args.seeds:
                for method in [m for m in METHODS if m in methods]:
                    key = run_key(task, pattern, ratio, method, seed)
                    if key in runs and not args.rerun:
                        continue
                    todo.append((key, task, method, seed, pattern, ratio))
    print(f"{len(todo)} runs to do, results in {out}", flush=True)
    t_all = time.perf_counter()
    for i, (key, task, method, seed, pattern, ratio) in enumerate(todo, 1):
        rec = run_one(task, method, seed, pattern, ratio, args)
        runs[key] = rec
        save_runs(out, runs)
        metric = METRIC[task][0]
        print(f"[{i}/{len(todo)}] {key}: {metric} {rec[metric]:.4f}, sparsity {rec['overall_sparsity']:.5f} "
              f"(layers {rec['layer_sparsity_min']:.3f}..{rec['layer_sparsity_max']:.3f}), checks "
              f"{'ok' if rec['checks']['ok'] else 'NOT ok'}, {rec['wall_s']:.1f} s", flush=True)
    if todo:
        print(f"done in {time.perf_counter() - t_all:.0f} s", flush=True)
    elif runs:
        save_runs(out, runs)  # refresh the stored tables
    selected = {k: v for k, v in runs.items()
                if v["task"] in args.tasks and f"{v['pattern']}={v['dense_ratio']:g}" in
                {f"{p}={r:g}" for p, r in map(parse_pattern, args.patterns)}}
    print_tables(build_tables(selected))


if __name__ == "__main__":
    main()
