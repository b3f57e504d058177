"""The tables of ``benchmarks/adaptive.py``: methods, metrics, the comparisons and their verdicts.

Split from adaptive.py so the runner stays short; plain Python (no torch), also used by ``--merge``.
"""
from __future__ import annotations

import re
import statistics

TASKS = ("digits", "minilm")
DEFAULT_PATTERNS = ("4x1=0.2", "2:4=0.6")

METHODS = {  # key: (library, scope, criterion, label); the order is the tables' order
    "uniform": ("slimtorch", "local", "snip_momentum", "slimtorch uniform (local) snip_momentum"),
    "global": ("slimtorch", "global", "snip_momentum", "slimtorch global snip_momentum"),
    "global_magnitude": ("slimtorch", "global", "magnitude", "slimtorch global magnitude"),
    "uniform_magnitude": ("slimtorch", "local", "magnitude", "slimtorch uniform (local) magnitude"),
    "inc_global": ("inc", "global", "snip_momentum", "INC 3.7.1 global snip_momentum"),
    "inc_local": ("inc", "local", "snip_momentum", "INC 3.7.1 local snip_momentum"),
}
DEFAULT_METHODS = {"digits": ["uniform", "global", "global_magnitude", "inc_global"],
                   "minilm": ["uniform", "global", "inc_global"]}
METRIC = {  # task: (record key, name in the table, scale for printing, unit of differences, decimals)
    "digits": ("accuracy", "test accuracy %", 100.0, "pp", 2),
    "minilm": ("cos_mean", "held-out cosine", 1.0, "", 4),
}
COMPARISONS = [  # (a, b): a - b, printed when both are present; the first is the acceptance verdict
    ("global", "uniform"),
    ("global_magnitude", "uniform"),
    ("global", "global_magnitude"),
    ("inc_global", "uniform"),
    ("inc_global", "global"),
    ("inc_global", "inc_local"),
]



def parse_pattern(spec: str):
    """"4x1=0.2" -> ("4x1", 0.2)."""
    if "=" not in spec:
        raise SystemExit(f"--patterns takes PATTERN=DENSE_RATIO (e.g. 4x1=0.2 or 2:4=0.6), got {spec!r}")
    pattern, ratio = spec.split("=", 1)
    return pattern, float(ratio)



# --------------------------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------------------------
def _stats(values):
    return {"mean": statistics.mean(values), "spread": max(values) - min(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def build_tables(runs: dict) -> list:
    """One table per (task, pattern, dense_ratio): rows per method and the comparisons."""
    groups: dict = {}
    for r in runs.values():
        groups.setdefault((r["task"], r["pattern"], r["dense_ratio"]), {}).setdefault(r["method"], []).append(r)
    tables = []
    task_order = {t: i for i, t in enumerate(TASKS)}
    pattern_order = {parse_pattern(p)[0]: i for i, p in enumerate(DEFAULT_PATTERNS)}
    for (task, pattern, ratio) in sorted(groups, key=lambda k: (task_order.get(k[0], 9),
                                                                 pattern_order.get(k[1], 9), k[1], k[2])):
        key = METRIC[task][0]
        rows = {}
        for method in [m for m in METHODS if m in groups[(task, pattern, ratio)]]:
            rs = sorted(groups[(task, pattern, ratio)][method], key=lambda r: r["seed"])
            vals = [r[key] for r in rs]
            seed0 = rs[0]
            rows[method] = {
                "method": method, "label": METHODS[method][3], "seeds": [r["seed"] for r in rs],
                "per_seed": vals, **_stats(vals),
                "overall_sparsity": statistics.mean(r["overall_sparsity"] for r in rs),
                "overall_sparsity_range": [min(r["overall_sparsity"] for r in rs),
                                           max(r["overall_sparsity"] for r in rs)],
                "layer_sparsity_min": min(r["layer_sparsity_min"] for r in rs),
                "layer_sparsity_max": max(r["layer_sparsity_max"] for r in rs),
                "n_layers": seed0["n_layers"],
                "checks_ok": all(r["checks"]["ok"] for r in rs),
                "pattern_valid": all(r["checks"]["pattern_valid"] for r in rs),
                "overall_within_one_unit": all(r["checks"]["overall_within_one_unit"] for r in rs),
                "layers_ok": all(r["checks"].get("layers_within_bounds", r["checks"].get("layers_at_target"))
                                 for r in rs),
                "max_abs_deviation_weights": max(abs(r["checks"]["deviation_weights"]) for r in rs),
                "layers_seed": seed0["seed"],
                "layers": {n: l["zeros"] / l["weights"] for n, l in seed0["layers"].items()},
            }
            aux = [r["test_loss"] if task == "digits" else r["cos_min"] for r in rs]
            rows[method].update(aux_per_seed=aux, aux_mean=statistics.mean(aux),
                                aux_spread=max(aux) - min(aux))
            if task == "digits":
                rows[method]["dense"] = [r["dense_accuracy"] for r in rs]
        comps = []
        for a, b in COMPARISONS:
            if a not in rows or b not in rows:
                continue
            seeds = sorted(set(rows[a]["seeds"]) & set(rows[b]["seeds"]))
            if not seeds:
                continue
            va = [rows[a]["per_seed"][rows[a]["seeds"].index(s)] for s in seeds]
            vb = [rows[b]["per_seed"][rows[b]["seeds"].index(s)] for s in seeds]
            sa, sb = _stats(va), _stats(vb)
            diff = sa["mean"] - sb["mean"]
            threshold = 2 * max(sa["spread"], sb["spread"])
            std_threshold = 2 * max(sa["std"], sb["std"])
            comp = {"a": a, "b": b, "seeds": seeds, "difference": diff,
                    "paired": [x - y for x, y in zip(va, vb)], "spread_a": sa["spread"],
                    "spread_b": sb["spread"], "threshold": threshold,
                    "beats": bool(diff > threshold), "acceptance": (a, b) == ("global", "uniform"),
                    # "spread" read as the sample standard deviation instead of max - min
                    "std_threshold": std_threshold, "beats_std": bool(diff > std_threshold)}
            if task == "digits":  # the held-out loss too (lower is better): accuracy moves in steps of 1/450
                la = [rows[a]["aux_per_seed"][rows[a]["seeds"].index(s)] for s in seeds]
                lb = [rows[b]["aux_per_seed"][rows[b]["seeds"].index(s)] for s in seeds]
                la_s, lb_s = _stats(la), _stats(lb)
                comp["test_loss"] = {"difference": la_s["mean"] - lb_s["mean"],
                                     "paired": [x - y for x, y in zip(la, lb)],
                                     "threshold": 2 * max(la_s["spread"], lb_s["spread"]),
                                     "beats": bool(lb_s["mean"] - la_s["mean"] > 2 * max(la_s["spread"],
                                                                                          lb_s["spread"]))}
            comps.append(comp)
        tables.append({"task": task, "pattern": pattern, "dense_ratio": ratio, "target_sparsity": 1 - ratio,
                       "metric": METRIC[task][1], "rows": list(rows.values()), "comparisons": comps})
    return tables


def _layer_line(task: str, layers: dict) -> str:
    if task == "digits":
        return "  ".join(f"{n} {100 * s:.1f}" for n, s in layers.items())
    kinds = {"q": r"attention\.self\.query$", "k": r"attention\.self\.key$", "v": r"attention\.self\.value$",
             "attn_out": r"attention\.output\.dense$", "ffn_in": r"intermediate\.dense$",
             "ffn_out": r"(?<!attention\.)output\.dense$"}
    parts = []
    for kind, pat in kinds.items():
        vals = [s for n, s in layers.items() if re.search(pat, n)]
        if vals:
            parts.append(f"{kind} {100 * min(vals):.0f}-{100 * max(vals):.0f}")
    by_depth = {}
    for n, s in layers.items():
        m = re.search(r"layer\.(\d+)\.", n)
        if m:
            by_depth.setdefault(int(m.group(1)), []).append(s)
    depth = " ".join(f"{100 * statistics.mean(v):.0f}" for _, v in sorted(by_depth.items()))
    return "  ".join(parts) + (f"  | mean by depth: {depth}" if depth else "")


def print_tables(tables: list) -> None:
    for t in tables:
        task = t["task"]
        _, name, scale, unit, dec = METRIC[task]
        desc = ("digits CNN (sklearn digits), 300 dense + 60 pruning + 20 updates, Adam" if task == "digits" else
                "all-MiniLM-L6-v2 distillation, 60 pruning + 20 updates, AdamW")
        print(f"\n== {task}: {t['pattern']} at dense_ratio {t['dense_ratio']:g} (target sparsity "
              f"{100 * t['target_sparsity']:.0f}%), {desc}; metric: {name}")
        dense_row = next((r for r in t["rows"] if "dense" in r), None)
        if dense_row:
            d = [scale * v for v in dense_row["dense"]]
            print(f"   dense model before pruning: mean {statistics.mean(d):.{dec}f}  per seed "
                  + " ".join(f"{v:.{dec}f}" for v in d))
        aux = "test loss" if task == "digits" else "cos min"
        head = (f"{'method':<40} {'mean':>8} {'spread':>7} {'std':>7}  {'per seed':<24} {'sparsity':>9} "
                f"{'layer min..max':>15} {'layers':>6} {aux:>9}  checks")
        print(head)
        print("-" * len(head))
        for r in t["rows"]:
            seeds = " ".join(f"{scale * v:.{dec}f}" for v in r["per_seed"])
            lo, hi = r["overall_sparsity_range"]
            sp = f"{100 * lo:.3f}%" if abs(hi - lo) < 5e-6 else f"{100 * lo:.2f}-{100 * hi:.2f}%"
            if METHODS[r["method"]][0] == "slimtorch":
                chk = "ok" if r["checks_ok"] else "FAIL"
                if not r["overall_within_one_unit"]:
                    chk += f" (overall off by up to {r['max_abs_deviation_weights']:g} weights)"
            else:
                off = [x for x, ok in (("pattern", r["pattern_valid"]), ("overall", r["overall_within_one_unit"]),
                                       ("bounds" if METHODS[r["method"]][1] == "global" else "per-layer",
                                        r["layers_ok"])) if not ok]
                chk = "(info) " + (", ".join(off) + " off" if off else "ok")
            print(f"{r['label']:<40} {scale * r['mean']:>8.{dec}f} {scale * r['spread']:>7.{dec}f} "
                  f"{scale * r['std']:>7.{dec}f}  {seeds:<24} {sp:>9} "
                  f"{100 * r['layer_sparsity_min']:>6.1f}..{100 * r['layer_sparsity_max']:<5.1f}%"
                  f" {r['n_layers']:>6} {r['aux_mean']:>9.4f}  {chk}")
        print(f"   per-layer sparsity % (seed {t['rows'][0]['layers_seed']}):")
        for r in t["rows"]:
            print(f"     {r['method']:<18} {_layer_line(task, r['layers'])}")
        for c in t["comparisons"]:
            paired = " ".join(f"{scale * p:+.{dec}f}" for p in c["paired"])
            line = (f"{c['a']} - {c['b']} = {scale * c['difference']:+.{dec}f}{unit} (per seed {paired}); "
                    f"beats by {scale * c['difference']:.{dec}f} > 2 x spread {scale * c['threshold']:.{dec}f}"
                    f" (max of {scale * c['spread_a']:.{dec}f}, {scale * c['spread_b']:.{dec}f}): "
                    f"{'yes' if c['beats'] else 'no'}")
            print(("   VERDICT " if c["acceptance"] else "   also    ") + line)
            if c["acceptance"]:
                print(f"   (spread as sample std: beats by {scale * c['difference']:.{dec}f} > 2 x std "
                      f"{scale * c['std_threshold']:.{dec}f}: {'yes' if c['beats_std'] else 'no'})")
            if c["acceptance"] and "test_loss" in c:
                tl = c["test_loss"]
                print(f"   (test loss, lower is better: {c['a']} - {c['b']} = {tl['difference']:+.4f}, per seed "
                      + " ".join(f"{p:+.4f}" for p in tl["paired"])
                      + f"; lower by {-tl['difference']:.4f} > 2 x spread {tl['threshold']:.4f}: "
                      + f"{'yes' if tl['beats'] else 'no'})")


