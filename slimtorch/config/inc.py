"""Intel Neural Compressor 3.x pruning configs -> slimtorch's ``sparse_pruning`` section.

INC 3.8 removed pruning; its users' configs are the keyword arguments of INC 3.x's ``WeightPruningConfig``, as a
JSON object: global keys plus an optional ``pruning_configs`` list whose entries override them. The mapping
(docs/config.md, "Intel Neural Compressor configs"):

| INC key                               | slimtorch                                                       |
|---------------------------------------|-----------------------------------------------------------------|
| ``target_sparsity`` (0.9)             | ``dense_ratio`` = 1 - target_sparsity                           |
| ``pattern`` ("4x1")                   | ``pattern``; INC's "N:M" prunes N of M, so it becomes "(M-N):M" |
| ``pruning_type`` ("snip_momentum")    | ``method`` (snip_momentum, snip, gradient, magnitude)            |
| ``pruning_scope`` ("global")          | ``scope``                                                        |
| ``start_step``, ``end_step`` (0, 0)   | ``start_step``, ``end_step`` (INC's last mask update: start + K * frequency) |
| ``pruning_frequency`` (1)             | ``frequency``                                                    |
| ``op_names`` ([] = every layer)       | ``modules`` (shared, or each entry's group)                      |
| ``excluded_op_names``                 | ``excluded_modules`` (shared, or each entry's group)             |
| ``pruning_op_types`` (Conv, Linear)   | ``shared_parameters.op_types`` (the same for every entry)        |
| ``min/max_sparsity_ratio_per_op``     | ``min/max_sparsity_per_layer`` (global scope)                    |
| ``sparsity_decay_type`` ("exp")       | ``sparsity_decay_type``                                          |

INC's defaults (in brackets) are written out explicitly, so an INC config prunes what INC would prune with them.
Every entry of ``pruning_configs`` becomes the group ``different_groups["pruning_configs[i]"]``; as in INC, the
global ``op_names`` then select nothing of their own. Keys starting with ``_`` are comments.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, List, Tuple

from ..errors import ConfigError
from .patterns import NMPattern, parse_pattern

#: keys of INC 3.7.1's WeightPruningConfig (and of a pruning_configs entry) with INC's defaults
GLOBAL_DEFAULTS: Dict[str, Any] = {
    "target_sparsity": 0.9, "pruning_type": "snip_momentum", "pattern": "4x1", "op_names": [],
    "excluded_op_names": [], "start_step": 0, "end_step": 0, "pruning_scope": "global", "pruning_frequency": 1,
    "min_sparsity_ratio_per_op": 0.0, "max_sparsity_ratio_per_op": 0.98, "sparsity_decay_type": "exp",
    "pruning_op_types": ["Conv", "Linear"], "low_memory_usage": False, "backend": None,
}
#: keys INC reads per pruner only, with the values slimtorch's behaviour equals
LOCAL_DEFAULTS: Dict[str, Any] = {
    "resume_from_pruned_checkpoint": False, "reg_type": None, "criterion_reduce_type": "mean",
    "parameters": {"reg_coeff": 0.0}, "criterion_type": None,
}
METHODS = ("snip_momentum", "snip", "gradient", "magnitude")
# keys whose value changes nothing in slimtorch's result (memory layout, framework choice)
_NO_EFFECT = ("low_memory_usage", "backend", "resume_from_pruned_checkpoint")
# top-level keys that only an INC config has (a DeepSpeed config has none of them at its top level)
_INC_KEYS = ("pruning_configs",) + tuple(k for k in GLOBAL_DEFAULTS if k not in ("backend", "low_memory_usage"))
_SP = ("compression_training", "sparse_pruning")


def is_inc_config(doc: Dict[str, Any]) -> bool:
    """An INC WeightPruningConfig document: INC's own keys, and no DeepSpeed/slimtorch section."""
    if any(k in doc for k in ("compression_training", "compression_inference", "sparse_pruning")):
        return False
    return any(k in doc for k in _INC_KEYS)


def to_sparse_pruning(doc: Dict[str, Any], renamed: Dict[Tuple[str, ...], str], notes: List[str]) -> Dict[str, Any]:
    """The slimtorch document of an INC config; ``renamed`` maps slimtorch key paths to INC's for error messages."""
    doc = {k: v for k, v in doc.items() if not k.startswith("_")}
    _check_keys(doc, "", GLOBAL_DEFAULTS, extra=("pruning_configs",) + tuple(LOCAL_DEFAULTS))
    entries = doc.pop("pruning_configs", [{}])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("pruning_configs: INC's pruning_configs is a list of objects (one per pruner)")
    glob = {**GLOBAL_DEFAULTS, **LOCAL_DEFAULTS, **doc}
    shared: Dict[str, Any] = {"enabled": True}
    out = {"compression_training": {"sparse_pruning": {"shared_parameters": shared, "different_groups": {}}}}
    for i, own in enumerate(entries):
        _check_keys(own, f"pruning_configs[{i}].", GLOBAL_DEFAULTS, extra=tuple(LOCAL_DEFAULTS))
    shared["op_types"] = _op_types([{**glob, **own}["pruning_op_types"] for own in entries] or
                                   [glob["pruning_op_types"]])
    if len(entries) <= 1:  # one pruner: the global keys (and the entry's) go to shared_parameters
        own = entries[0] if entries else {}
        where = "pruning_configs[0]." if own else ""
        merged = {**glob, **own}
        # an entry's own excluded_op_names replace the global ones, as in INC
        excluded_at = f"{where}excluded_op_names" if "excluded_op_names" in own else "excluded_op_names"
        shared["excluded_modules"] = _regexes(merged["excluded_op_names"], excluded_at)
        renamed[_SP + ("shared_parameters", "excluded_modules")] = excluded_at
        shared.update(_params(merged, where, notes, _SP + ("shared_parameters",), renamed))
        if merged["op_names"]:
            shared["modules"] = _regexes(merged["op_names"], f"{where}op_names")
            renamed[_SP + ("shared_parameters", "modules")] = f"{where}op_names"
        return out
    # several pruners: each entry is a group; the global keys are their defaults and select no layer themselves
    shared["modules"] = []
    groups = out["compression_training"]["sparse_pruning"]["different_groups"]
    for i, own in enumerate(entries):
        where = f"pruning_configs[{i}]."
        merged = {**glob, **own}
        name = f"pruning_configs[{i}]"
        path = _SP + ("different_groups", name)
        modules = _regexes(merged["op_names"], f"{where}op_names") or [".*"]  # INC: no op_names = every layer
        excluded_at = f"{where}excluded_op_names" if "excluded_op_names" in own else "excluded_op_names"
        groups[name] = {"params": _params(merged, where, notes, path + ("params",), renamed), "modules": modules,
                        "excluded_modules": _regexes(merged["excluded_op_names"], excluded_at)}
        renamed[path + ("modules",)] = f"{where}op_names"
        renamed[path + ("excluded_modules",)] = excluded_at
    return out


def _params(cfg: Dict[str, Any], where: str, notes: List[str], path: Tuple[str, ...],
            renamed: Dict[Tuple[str, ...], str]) -> Dict[str, Any]:
    """One INC pruner's settings as slimtorch params (every value explicit: INC's defaults are not ours)."""
    method = cfg["pruning_type"]
    if method not in METHODS:
        near = difflib.get_close_matches(str(method), METHODS, n=1, cutoff=0.6)
        raise ConfigError(
            f"{where}pruning_type: INC's {method!r} is not available in slimtorch; it runs "
            f"{', '.join(METHODS)}" + (f" (did you mean {near[0]!r}?)" if near else "")
            + ". INC's *_progressive, pattern_lock, retrain_free, sparse_gpt and block_mask pruners have no "
            "slimtorch counterpart yet")
    target = cfg["target_sparsity"]
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise ConfigError(f"{where}target_sparsity: a number in [0, 1) (the fraction of weights pruned), "
                          f"got {target!r}")
    pattern = _pattern(cfg["pattern"], f"{where}pattern")
    for key, value in LOCAL_DEFAULTS.items():
        if key in _NO_EFFECT or key == "criterion_type" or cfg.get(key) == value:
            continue
        raise ConfigError(f"{where}{key}: {cfg[key]!r} is not supported (slimtorch implements INC's "
                          f"{key} = {value!r}); remove the key")
    if cfg.get("criterion_type") not in (None, method):
        raise ConfigError(f"{where}criterion_type: INC sets it from pruning_type; remove it")
    for key in _NO_EFFECT:
        if cfg.get(key) not in (None, False):
            notes.append(f"{where}{key} {cfg[key]!r} has no effect in slimtorch (masks and scores are kept as "
                         "slimtorch keeps them)")
    start, end, every = cfg["start_step"], cfg["end_step"], cfg["pruning_frequency"]
    params: Dict[str, Any] = {
        "method": method,
        "pattern": pattern,
        "dense_ratio": round(1.0 - float(target), 12),
        "scope": cfg["pruning_scope"],
        "sparsity_decay_type": cfg["sparsity_decay_type"],
        "start_step": start,
        "frequency": every,
    }
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, every)) and every >= 1 \
            and end > start and (end - start) % every:
        # INC makes (end - start) // frequency mask updates after start: its target is reached at the last one
        last = start + (end - start) // every * every
        notes.append(f"{where}end_step {end}: INC's last mask update (and full target) comes at step {last}, "
                     f"start_step + whole multiples of pruning_frequency; slimtorch ends there too")
        end = last
    params["end_step"] = end
    if cfg["pruning_scope"] == "global":
        params["min_sparsity_per_layer"] = cfg["min_sparsity_ratio_per_op"]
        params["max_sparsity_per_layer"] = min(cfg["max_sparsity_ratio_per_op"], _cap(pattern))
    elif (cfg["min_sparsity_ratio_per_op"], cfg["max_sparsity_ratio_per_op"]) != (0.0, 0.98):
        notes.append(f"{where}min/max_sparsity_ratio_per_op bound global allocations; with pruning_scope "
                     "'local' every layer gets target_sparsity, in INC and in slimtorch")
    inc_names = {"method": "pruning_type", "dense_ratio": "target_sparsity", "scope": "pruning_scope",
                 "frequency": "pruning_frequency", "min_sparsity_per_layer": "min_sparsity_ratio_per_op",
                 "max_sparsity_per_layer": "max_sparsity_ratio_per_op"}
    for key in params:
        renamed[path + (key,)] = f"{where}{inc_names.get(key, key)}"
    return params


def _pattern(value: Any, where: str) -> str:
    """INC's pattern string in slimtorch's convention (INC's "N:M" prunes N of every M; prefixes like
    ``oc_pattern_`` only name INC's layout and are dropped, as INC itself does)."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: a pattern string such as '4x1' or '2:4', got {value!r}")
    text = value.split("_")[-1]
    if "mha" in value.lower():
        raise ConfigError(f"{where}: INC's multi-head-attention pattern {value!r} is not available in slimtorch")
    if ":" in text:
        try:
            pruned, m = (int(p) for p in text.split(":"))
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not an N:M pattern") from None
        if not 0 < pruned < m:
            raise ConfigError(f"{where}: INC's {value!r} needs 0 < N < M (N = weights pruned of every M)")
        return f"{m - pruned}:{m}"
    try:
        parse_pattern(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return text


def _cap(pattern: str) -> float:
    p = parse_pattern(pattern)
    return 1.0 - p.min_dense_ratio if isinstance(p, NMPattern) else 1.0


def _regexes(value: Any, where: str) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: a list of regular expressions (module names), got {value!r}")
    return list(value)


def _op_types(per_pruner: List[Any]) -> List[str]:
    """INC's pruning_op_types (type-name substrings "Linear", "Conv") as slimtorch's shared op_types."""
    mapped = []
    for types in per_pruner:
        if not isinstance(types, list) or not types or not set(types) <= {"Conv", "Linear"}:
            raise ConfigError(f"pruning_op_types: slimtorch prunes INC's 'Linear' and 'Conv' layer types, "
                              f"got {types!r}")
        mapped.append(sorted({t for name in types for t in _INC_TYPES[name]}))
    if any(m != mapped[0] for m in mapped):
        raise ConfigError("pruning_op_types: slimtorch selects one set of layer types for every pruner; give all "
                          "pruning_configs entries the same pruning_op_types (and narrow them with op_names)")
    return mapped[0]


_INC_TYPES = {"Linear": ("Linear",), "Conv": ("Conv1d", "Conv2d", "Conv1D")}


def _check_keys(cfg: Dict[str, Any], where: str, known: Dict[str, Any], extra: Tuple[str, ...] = ()) -> None:
    valid = list(known) + list(extra)
    for key in cfg:
        if key in valid or key.startswith("_"):
            continue
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}?" if near else f"INC's keys: {', '.join(valid)}"
        raise ConfigError(f"{where}{key}: not a key of INC's WeightPruningConfig; {hint}")
