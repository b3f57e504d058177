"""The ``slimtorch`` command.

    slimtorch check ds_config.json     validate a config; print the resolved settings
    slimtorch quantize ds_config.json --model DIR|module:fn [--calib FILE|module:fn] --output model.int8.onnx
                                       quantize a model, export it to ONNX, print a summary
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import load_config
from .errors import ConfigError


def _check(path: str) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    q = cfg.quantization
    if q is not None:
        kind = "static" if hasattr(q, "num_calibration_batches") else "dynamic"
        act = q.activation
        extra = f", observer {act.observer}, {q.num_calibration_batches} calibration batches" if kind == "static" \
            else f", {act.granularity}"
        print(f"{path}: valid; {kind}_quantization enabled: weights int8 {q.weight.granularity}, activations "
              f"{act.dtype} {'symmetric' if act.symmetric else 'asymmetric'}{extra}; op_types {q.op_types}")
    sp = cfg.sparse_pruning
    if sp is None:
        if q is None:
            print(f"{path}: valid; no compression_training.sparse_pruning or compression_inference section enabled")
        return 0
    state = "enabled" if cfg.pruning_enabled else "DISABLED (shared_parameters.enabled is false)"
    print(f"{path}: valid; sparse_pruning {state}")
    rows = [("shared_parameters", sp.settings_for(None), sp.shared_parameters.modules)]
    rows += [(f"different_groups.{name}", sp.settings_for(name), g.modules) for name, g in sp.different_groups.items()]
    for where, s, modules in rows:
        selected = "default targets" if modules is None else ", ".join(map(repr, modules)) or "(none)"
        allocation = (f"global: layers between {s.min_sparsity:.0%} and {s.max_sparsity:.0%}" if s.is_global
                      else "local: every layer")
        print(f"  {where}: {s.method} {s.pattern} dense_ratio {s.dense_ratio:g} (sparsity {s.target_sparsity:.1%}; "
              f"{allocation}), {s.decay} decay, steps {s.start_step}..{s.end_step} every {s.frequency}; "
              f"modules: {selected}")
    if sp.shared_parameters.excluded_modules:
        print(f"  excluded_modules: {', '.join(map(repr, sp.shared_parameters.excluded_modules))}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtorch", description="slimtorch: model compression for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a (DeepSpeed) config and print the resolved settings")
    check.add_argument("config", help="path to the JSON config")
    from .quantize_cli import add_quantize_parser, run_quantize

    add_quantize_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.config)
    if args.command == "quantize":
        return run_quantize(args)
    return 1  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
