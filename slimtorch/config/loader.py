"""``load_config``: a path, dict or JSON text -> :class:`CompressionConfig`, or a :class:`ConfigError`.

The raw document is copied (the caller's dict is never changed), DeepSpeed's key names are mapped to ours,
DeepSpeed sections slimtorch does not implement are dropped when disabled and refused when enabled, and pydantic's
errors are rewritten to name the full key path and the nearest valid key.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Type, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from . import inc
from .patterns import NMPattern, parse_pattern
from .schema import CompressionConfig, PathValueError
from .structured_schema import DEEPSPEED_STRUCTURED_OFFSET_DEFAULT, STRUCTURED_SECTIONS

ConfigSource = Union[CompressionConfig, Dict[str, Any], str, os.PathLike]

SECTIONS = ("compression_training", "compression_inference")
# DeepSpeed key -> slimtorch key, inside shared_parameters and different_groups.*.params
PARAM_ALIASES = {
    "block_pattern": "pattern",
    "schedule_offset": "start_step",
    "schedule_offset_end": "end_step",
    "schedule_offset_stride": "frequency",
}
#: DeepSpeed's default schedule_offset in its code (deepspeed/compression/constants.py); its docs say 0
DEEPSPEED_SCHEDULE_OFFSET_DEFAULT = 1000
_QAT_HINT = ("slimtorch quantizes after training instead: compression_inference.static_quantization or "
             "dynamic_quantization (docs/quantization.md)")
# DeepSpeed compression_training techniques slimtorch does not implement, with the nearest thing it has
UNSUPPORTED_TRAINING = {
    "weight_quantization": _QAT_HINT,
    "activation_quantization": _QAT_HINT,
    "layer_reduction": "not implemented (it initialises a shallower student from a teacher's layers)",
}
TOPK_MESSAGE = (
    "DeepSpeed's 'topk' in sparse_pruning learns a mask score per weight as an extra trainable parameter (movement "
    "pruning, top-k binarized); slimtorch implements topk for whole rows, heads and channels (row_pruning, "
    "head_pruning, channel_pruning), not per weight. Nearest: 'snip_momentum' (scores |w * g| accumulated from the "
    "training gradients, the first-order estimate of the same movement signal), or 'l1' for DeepSpeed's one-shot "
    "magnitude masks")
# keys that, found under an unknown top-level key, show a compression section in the wrong place
_INFERENCE_KEYS = ("static_quantization", "dynamic_quantization", "weight_only_quantization", "oneshot_pruning",
                   "w8a8_quantization")
#: the techniques compression_training may hold
TRAINING_TECHNIQUES = ("sparse_pruning",) + STRUCTURED_SECTIONS + tuple(UNSUPPORTED_TRAINING)
_SECTION_KEYS = SECTIONS + _INFERENCE_KEYS + TRAINING_TECHNIQUES


def load_config(source: ConfigSource) -> CompressionConfig:
    """Load and validate a compression config.

    ``source`` is a :class:`CompressionConfig` (returned as is), a dict, a path to a JSON file, or JSON text;
    either a whole DeepSpeed config (other top-level keys are ignored) or only its compression sections.
    """
    if isinstance(source, CompressionConfig):
        return source
    raw = _read(source)
    renamed: Dict[Tuple[str, ...], str] = {}
    notes: List[str] = []
    if inc.is_inc_config(raw):
        doc = inc.to_sparse_pruning(copy.deepcopy(raw), renamed, notes)
    else:
        doc = copy.deepcopy(raw)
    doc = _normalise(doc, renamed, notes)
    try:
        config = CompressionConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, renamed)) from None
    return config.with_notes(notes)


def read_document(source: Union[Dict[str, Any], str, os.PathLike]) -> Dict[str, Any]:
    """The raw JSON document of a config source (path, dict or JSON text), unvalidated; a dict is returned as is."""
    return _read(source)


def _read(source: Any) -> Dict[str, Any]:
    if isinstance(source, dict):
        _check_keys(source, ())
        return source
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(source, str) and text.lstrip().startswith(("{", "[")):
            where = "JSON text"
        else:
            path = Path(text)
            try:
                is_file = path.is_file()
            except OSError:
                is_file = False
            if not is_file:
                raise ConfigError(f"config file {text[:200]!r} does not exist (pass a path, a dict or JSON text)")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: cannot read the config file as UTF-8 text: {exc}") from None
            where = str(path)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        except RecursionError:
            raise ConfigError(f"{where}: the JSON is nested too deeply to be a config") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: the top level of a config must be a JSON object, got {type(doc).__name__}")
        return doc
    raise ConfigError(
        f"load_config takes a path, a dict or JSON text, got {type(source).__name__}; "
        "e.g. slimtorch.load_config('ds_config.json')"
    )


def _check_keys(node: Any, path: Tuple[str, ...], depth: int = 0) -> None:
    """JSON objects have string keys; a dict built in Python may not."""
    if depth > 64:
        raise ConfigError(f"{'.'.join(path)}: the config is nested too deeply")
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                where = ".".join(path) or "<top level>"
                raise ConfigError(f"{where}: key {key!r} is a {type(key).__name__}; config keys are strings")
            _check_keys(value, path + (key,), depth + 1)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _check_keys(item, path + (f"[{i}]",), depth + 1)


def _normalise(doc: Dict[str, Any], renamed: Dict[Tuple[str, ...], str], notes: List[str]) -> Dict[str, Any]:
    """Keep the compression sections, apply DeepSpeed aliases and defaults, refuse what looks misspelt."""
    pruning_keys = ("sparse_pruning",) + STRUCTURED_SECTIONS
    if any(k in doc for k in pruning_keys) and "compression_training" not in doc:
        # only the compression_training section's body was given
        doc = {"compression_training": {k: v for k, v in doc.items() if k in TRAINING_TECHNIQUES},
               **{k: v for k, v in doc.items() if k not in TRAINING_TECHNIQUES}}
    out: Dict[str, Any] = {}
    for key, value in doc.items():
        if key in SECTIONS:
            out[key] = value
            continue
        near = difflib.get_close_matches(key, SECTIONS, n=1, cutoff=0.75)
        if near:
            raise ConfigError(f"{key}: unknown top-level key; did you mean {near[0]!r}?")
        _refuse_misplaced(value, (key,))
    training = out.get("compression_training")
    if isinstance(training, dict):
        _refuse_unsupported(training)
        pruning = training.get("sparse_pruning")
        if isinstance(pruning, dict):
            base = ("compression_training", "sparse_pruning")
            _read_deepspeed_methods(pruning, base, notes)
            _alias_params(pruning.get("shared_parameters"), base + ("shared_parameters",), renamed)
            groups = pruning.get("different_groups")
            if isinstance(groups, dict):
                for gname, group in groups.items():
                    if isinstance(group, dict):
                        _alias_params(group.get("params"), base + ("different_groups", gname, "params"), renamed)
        for name in STRUCTURED_SECTIONS:
            _note_structured_offset(training.get(name), name, notes)
    return out


def _note_structured_offset(section: Any, name: str, notes: List[str]) -> None:
    """DeepSpeed starts row/head/channel pruning at step 1000 when schedule_offset is not set: say so."""
    shared = section.get("shared_parameters") if isinstance(section, dict) else None
    if isinstance(shared, dict) and shared.get("enabled") is True and "schedule_offset" not in shared:
        notes.append(f"compression_training.{name}.shared_parameters.schedule_offset is not set: DeepSpeed's default "
                     f"{DEEPSPEED_STRUCTURED_OFFSET_DEFAULT} applies, so {name} starts after "
                     f"{DEEPSPEED_STRUCTURED_OFFSET_DEFAULT} updates. Set schedule_offset to choose")


def _refuse_misplaced(value: Any, path: Tuple[str, ...]) -> None:
    """A compression section under a key slimtorch does not read would be silently ignored: refuse it."""
    if not isinstance(value, dict) or len(path) > 3:
        return
    for key, inner in value.items():
        where = ".".join(path + (key,))
        if key in SECTIONS:
            raise ConfigError(f"{where}: {key} must be a top-level key; it sits under {'.'.join(path)!r}, which "
                              "slimtorch (like DeepSpeed) does not read. Move it to the top level")
        if key in _SECTION_KEYS:
            parent = "compression_inference" if key in _INFERENCE_KEYS else "compression_training"
            raise ConfigError(f"{where}: {key} belongs under the top-level {parent!r}, not under {'.'.join(path)!r}, "
                              "which slimtorch (like DeepSpeed) does not read. Write "
                              f"{{\"{parent}\": {{\"{key}\": ...}}}}")
        _refuse_misplaced(inner, path + (key,))


def _refuse_unsupported(training: Dict[str, Any]) -> None:
    """Drop the disabled DeepSpeed techniques slimtorch lacks; refuse the enabled ones, all in one error."""
    enabled = []
    for name, hint in UNSUPPORTED_TRAINING.items():
        if name not in training:
            continue
        if _enabled(training[name], f"compression_training.{name}"):
            enabled.append(f"compression_training.{name}: DeepSpeed's {name} is not implemented by slimtorch; {hint}")
        else:
            training.pop(name)
    if enabled:
        head = (f"{len(enabled)} enabled DeepSpeed sections are" if len(enabled) > 1
                else "an enabled DeepSpeed section is") + " not implemented by slimtorch"
        raise ConfigError(f"{head} (set their shared_parameters.enabled to false, or remove them, to prune with "
                          "sparse_pruning alone):\n  " + "\n  ".join(enabled))


def _read_deepspeed_methods(pruning: Dict[str, Any], base: Tuple[str, ...], notes: List[str]) -> None:
    """Give a section written in DeepSpeed's words DeepSpeed's meaning (docs/config.md, "Whose semantics").

    * ``topk`` is refused with the nearest method;
    * a section spelled with DeepSpeed's keys (or its method ``l1``) that sets no schedule_offset starts where
      DeepSpeed's code starts it, at 1000 (its docs say 0);
    * DeepSpeed's l1 never reads ``block_pattern``: it is dropped, with a note (``pattern`` is slimtorch's key and
      is honoured).
    """
    shared = pruning.get("shared_parameters")
    shared = shared if isinstance(shared, dict) else None
    places: List[Tuple[str, Dict[str, Any]]] = []
    if shared is not None:
        places.append((".".join(base + ("shared_parameters",)), shared))
    groups = pruning.get("different_groups")
    if isinstance(groups, dict):
        for gname, group in groups.items():
            if isinstance(group, dict) and isinstance(group.get("params"), dict):
                places.append((".".join(base + ("different_groups", gname, "params")), group["params"]))
    for where, params in places:
        if params.get("method") == "topk":
            raise ConfigError(f"{where}.method: {TOPK_MESSAGE}")
    shared_method = shared.get("method", "magnitude") if shared is not None else "magnitude"
    deepspeed_spelled = shared_method == "l1" or any(k in params for _, params in places for k in PARAM_ALIASES)
    if shared is not None and deepspeed_spelled and "schedule_offset" not in shared and "start_step" not in shared \
            and shared.get("enabled") is True:
        shared["schedule_offset"] = DEEPSPEED_SCHEDULE_OFFSET_DEFAULT
        notes.append(f"{base[0]}.{base[1]}.shared_parameters.schedule_offset is not set: DeepSpeed's default "
                     f"{DEEPSPEED_SCHEDULE_OFFSET_DEFAULT} applies (its code's; its docs say 0), so pruning starts "
                     f"after {DEEPSPEED_SCHEDULE_OFFSET_DEFAULT} updates. Set schedule_offset to choose")
    for where, params in places:
        if params.get("method", shared_method) == "l1" and "block_pattern" in params:
            value = params.pop("block_pattern")
            notes.append(f"{where}.block_pattern {value!r} is not read: DeepSpeed's l1 ranks single weights "
                         "(unstructured), as slimtorch does for it; write 'pattern' to prune blocks with l1")


def _enabled(section: Any, where: str = "") -> bool:
    if not isinstance(section, dict):
        return False
    shared = section.get("shared_parameters")
    if isinstance(shared, dict):
        flag, where = shared.get("enabled"), f"{where}.shared_parameters.enabled"
    else:
        flag, where = section.get("enabled"), f"{where}.enabled"
    if flag is not None and not isinstance(flag, bool):
        raise ConfigError(f"{where}: Input should be a valid boolean (got {flag!r})")
    return flag is True


def _alias_params(params: Any, path: Tuple[str, ...], renamed: Dict[Tuple[str, ...], str]) -> None:
    if not isinstance(params, dict):
        return
    for ds_key, key in PARAM_ALIASES.items():
        if ds_key not in params:
            continue
        where = ".".join(path)
        if key in params:
            raise ConfigError(f"{where}: both {ds_key!r} and its alias {key!r} are set; keep one")
        value = params.pop(ds_key)
        if ds_key == "block_pattern":
            _check_deepspeed_nm(value, f"{where}.block_pattern")
        params[key] = value
        renamed[path + (key,)] = f"{where}.{ds_key} (alias of {key})"


def _check_deepspeed_nm(value: Any, where: str) -> None:
    """DeepSpeed (through Intel Neural Compressor) counts N:M's N as *pruned* weights; we count it as kept."""
    try:
        pattern = parse_pattern(value)
    except ValueError:
        return  # pydantic reports the bad pattern with its path
    if isinstance(pattern, NMPattern) and 2 * pattern.n != pattern.m:
        raise ConfigError(
            f"{where}: {value!r} is ambiguous. DeepSpeed and Intel Neural Compressor read N:M as N weights "
            f"*pruned* of every M, slimtorch (like NVIDIA and the N:M literature) as N weights *kept*; the two only "
            f"agree when N = M/2 (e.g. '2:4'). Write it as 'pattern' in slimtorch's convention: "
            f"'{pattern.n}:{pattern.m}' keeps {pattern.n} of {pattern.m}, "
            f"'{pattern.m - pattern.n}:{pattern.m}' keeps {pattern.m - pattern.n} of {pattern.m}"
        )


# ---------------------------------------------------------------- error messages
# pydantic puts union-branch tags ("str", "list[str]", "function-after[...]") into error locations
_TYPE_TAG = re.compile(r"^(str|list\[.*\]|dict\[.*\]|function-\w+\[.*\])$")
_CLASS_NAME = re.compile(r"a valid dictionary( or instance of \w+)?")
def _format_errors(exc: ValidationError, renamed: Dict[Tuple[str, ...], str]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"] if not _TYPE_TAG.match(str(p)))
        message = _CLASS_NAME.sub("a JSON object", err["msg"])
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        original = (err.get("ctx") or {}).get("error")
        if isinstance(original, PathValueError):
            loc = loc + tuple(p for p in original.subpath.split(".") if p)
            message = str(original)
        elif err["type"] == "extra_forbidden":
            message = _misplaced_key_hint(loc)
            if message is None:
                valid = _valid_keys(loc[:-1])
                near = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
                hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(sorted(valid))}"
                message = f"unknown key; {hint}"
        elif err["type"] == "literal_error":
            choices = re.findall(r"'([^']*)'", (err.get("ctx") or {}).get("expected", ""))
            near = difflib.get_close_matches(str(err.get("input")), choices, n=1, cutoff=0.6)
            message = f"{message}, got {err.get('input')!r}" + (f"; did you mean {near[0]!r}?" if near else "")
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            message = f"{message} (got {err['input']!r})"
        lines.append(f"{_display(loc, renamed) or '<top level>'}: {message}")
    head = "invalid slimtorch config" + (f" ({len(lines)} problems)" if len(lines) > 1 else "")
    return head + ":\n  " + "\n  ".join(lines)


def _display(loc: Tuple[str, ...], renamed: Dict[Tuple[str, ...], str]) -> str:
    """The key path as the user wrote it (a DeepSpeed alias, an INC key), from the longest renamed prefix."""
    for i in range(len(loc), 0, -1):
        if loc[:i] in renamed:
            return renamed[loc[:i]] + "".join(f".{p}" for p in loc[i:])
    return ".".join(loc)


_SHARED_ONLY = ("gradient_accumulation_steps", "enabled", "op_types")


def _misplaced_key_hint(loc: Tuple[str, ...]) -> Optional[str]:
    """For a key that is valid elsewhere in sparse_pruning: where it belongs (a spelling hint would mislead)."""
    if "different_groups" not in loc or len(loc) < 2:
        return None
    key, in_params = loc[-1], loc[-2] == "params"
    if key in _SHARED_ONLY:
        what = {"op_types": "the layer types pruned at all",
                "gradient_accumulation_steps": "one training loop has one accumulation",
                "enabled": "pruning is on or off as a whole"}[key]
        return (f"{key} is read from shared_parameters only ({what}); move it to "
                f"compression_training.sparse_pruning.shared_parameters.{key}")
    if in_params and key in ("modules", "related_modules", "excluded_modules"):
        return f"a group's {key} sits beside its params, not inside them: different_groups.{loc[-3]}.{key}"
    return None


def _valid_keys(loc: Tuple[str, ...]) -> List[str]:
    """The keys (and accepted aliases) valid at ``loc``, found by walking the schema."""
    model: Any = CompressionConfig
    i = 0
    while i < len(loc) and model is not None:
        field = model.model_fields.get(loc[i]) if _is_model(model) else None
        if field is None:
            return []
        model = _inner_model(field.annotation)
        if _is_dict(field.annotation):
            i += 1  # skip the user's group name
        i += 1
    if not _is_model(model):
        return []
    keys = list(model.model_fields)
    if "pattern" in keys:
        keys += [k for k, v in PARAM_ALIASES.items() if v in keys]
    return keys


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_dict(tp: Any) -> bool:
    if get_origin(tp) is Union:
        return any(_is_dict(a) for a in get_args(tp))
    return get_origin(tp) in (dict, Dict)


def _inner_model(tp: Any) -> Optional[Type[BaseModel]]:
    if _is_model(tp):
        return tp
    for arg in get_args(tp):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None
