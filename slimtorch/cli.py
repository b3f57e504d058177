"""The ``slimtorch`` command.

    slimtorch check ds_config.json     validate a config; print the resolved settings of every group
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
    sp = cfg.sparse_pruning
    if sp is None:
        print(f"{path}: valid; no compression_training.sparse_pruning section")
        return 0
    state = "enabled" if cfg.pruning_enabled else "DISABLED (shared_parameters.enabled is false)"
    print(f"{path}: valid; sparse_pruning {state}")
    rows = [("shared_parameters", sp.settings_for(None), sp.shared_parameters.modules)]
    rows += [(f"different_groups.{name}", sp.settings_for(name), g.modules) for name, g in sp.different_groups.items()]
    for where, s, modules in rows:
        scope = "default targets" if modules is None else ", ".join(map(repr, modules)) or "(none)"
        print(f"  {where}: {s.method} {s.pattern} dense_ratio {s.dense_ratio:g} (sparsity {s.target_sparsity:.1%}), "
              f"{s.decay} decay, steps {s.start_step}..{s.end_step} every {s.frequency}; modules: {scope}")
    if sp.shared_parameters.excluded_modules:
        print(f"  excluded_modules: {', '.join(map(repr, sp.shared_parameters.excluded_modules))}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtorch", description="slimtorch: model compression for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a (DeepSpeed) config and print the resolved settings")
    check.add_argument("config", help="path to the JSON config")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.config)
    return 1  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
