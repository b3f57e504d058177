"""The ``slimtorch`` command.

    slimtorch check ds_config.json [--model DIR|module:fn]
                                       validate a config; print the resolved settings (and, with --model, the
                                       layers each group prunes); exit 0 valid, 1 nothing to do, 2 invalid
    slimtorch compress ds_config.json --model DIR|module:fn [--calib FILE|module:fn] --output DIR
                                       run every post-training section (one-shot pruning, then quantization),
                                       save the result with slimtorch.save, print a summary
    slimtorch quantize ds_config.json --model DIR|module:fn [--calib FILE|module:fn] --output model.int8.onnx
                                       quantize a model, export it to ONNX, print a summary
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import load_config
from .config.patterns import NMPattern
from .errors import ConfigError

#: measured by benchmarks/pruning.py (BENCHMARKS.md, "Scope under N:M"); docs/config.md quotes the same figures
NM_GLOBAL_COST = ("all-MiniLM-L6-v2 2:4, 80 distillation updates, held-out cosine 0.8377 in global scope against "
                  "0.8506 in local scope")


def _full_nm_in_global_scope(settings) -> bool:
    """An N:M group in global scope whose target is the pattern's own sparsity: every layer must end at N:M."""
    pattern = settings.pattern
    return (settings.is_global and isinstance(pattern, NMPattern)
            and abs(settings.dense_ratio - pattern.min_dense_ratio) < 1e-9)


def _check(path: str, model_spec: Optional[str] = None) -> int:
    """0: valid and it prunes or quantizes something; 1: valid but nothing to do; 2: invalid."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    for note in cfg.notes:
        print(f"{path}: note: {note}")
    q = cfg.quantization
    if q is not None:
        kind = "static" if hasattr(q, "num_calibration_batches") else "dynamic"
        act = q.activation
        extra = f", observer {act.observer}, {q.num_calibration_batches} calibration batches" if kind == "static" \
            else f", {act.granularity}"
        print(f"{path}: valid; {kind}_quantization enabled: weights int8 {q.weight.granularity}, activations "
              f"{act.dtype} {'symmetric' if act.symmetric else 'asymmetric'}{extra}; op_types {q.op_types}")
    inference = cfg.compression_inference
    for key, section in inference.oneshot_sections().items():
        print(f"{path}: valid; {key} enabled (slimtorch.oneshot): {_oneshot_summary(section)}")
    oneshot = bool(inference.oneshot_sections())
    sp = cfg.sparse_pruning
    structured = cfg.structured_groups
    for g in structured:
        unit = g.technique.unit + ("s" if g.technique.unit != "head" else "s of num_heads " + str(g.num_heads))
        how = ("ranked once at prepare (L1 norm, ceil(dense_ratio * n) kept)" if g.method == "l1"
               else "learned top-k scores, masking in forward")
        print(f"{path}: valid; {g.technique.section}.different_groups.{g.group}: {g.method} {unit}, dense_ratio "
              f"{g.dense_ratio:g}, {how}, from step {g.start_step}")
    if not cfg.pruning_enabled:
        if q is None and not oneshot and not structured:
            where = ("compression_training.sparse_pruning.shared_parameters.enabled is false" if sp is not None
                     else "no compression_training pruning section or compression_inference section")
            print(f"{path}: nothing to do: {where}; a compression section sits at the top level of the config, "
                  "or under compression_training / compression_inference, with enabled true", file=sys.stderr)
            return 1
        return _check_on_model(cfg, model_spec) if structured and model_spec is not None else 0
    print(f"{path}: valid; sparse_pruning enabled")
    unlisted = sp.unlisted_rule()
    rows = [(f"different_groups.{name}", sp.settings_for(name), g.modules) for name, g in sp.different_groups.items()]
    if unlisted is None:
        rows.insert(0, ("shared_parameters", sp.settings_for(None), sp.shared_parameters.modules))
    for where, s, modules in rows:
        selected = "default targets" if modules is None else ", ".join(map(repr, modules)) or "(none)"
        allocation = (f"global: layers between {s.min_sparsity:.0%} and {s.max_sparsity:.0%}" if s.is_global
                      else "local: every layer")
        when = (f"ranked once at prepare (|w|, ceil(dense_ratio * n) kept), applied at step {s.start_step}"
                if s.ranks_at_prepare else f"{s.decay} decay, steps {s.start_step}..{s.end_step} every {s.frequency}")
        print(f"  {where}: {s.method} {s.pattern} dense_ratio {s.dense_ratio:g} (sparsity {s.target_sparsity:.1%}; "
              f"{allocation}), {when}; modules: {selected}")
        if _full_nm_in_global_scope(s):
            print(f"  note: {where}: {s.pattern} at its full sparsity in global scope: every layer ends exactly "
                  f"{s.pattern} either way, so the one ranking only changes which groups become {s.pattern} first, "
                  f"and that costs quality ({NM_GLOBAL_COST}); add \"scope\": \"local\" to "
                  f"{'shared_parameters' if where == 'shared_parameters' else where + '.params'} to rank each layer "
                  "on its own (global scope is DeepSpeed's hand-off to INC, kept as the default)")
    if unlisted is not None:
        print(f"  layers {unlisted}: left dense")
    if sp.shared_parameters.excluded_modules:
        print(f"  excluded_modules: {', '.join(map(repr, sp.shared_parameters.excluded_modules))}")
    if model_spec is None:
        if not rows:
            print(f"{path}: nothing to do: no layer is pruned (layers {unlisted}); give shared_parameters a "
                  "dense_ratio or add different_groups", file=sys.stderr)
            return 1
        print("  (pass --model to list the layers each group prunes)")
        return 0
    return _check_on_model(cfg, model_spec)


def _oneshot_summary(section) -> str:
    if hasattr(section, "bits"):
        group = "per channel" if section.group_size == -1 else f"group {section.group_size}"
        return (f"int{section.bits} {'symmetric' if section.symmetric else 'asymmetric'} {group}, "
                f"{'awq + ' if section.awq.enabled else ''}{section.algorithm}")
    if hasattr(section, "activations"):
        smooth = f", smoothquant alpha {section.smoothquant.alpha:g}" if section.smoothquant.enabled else ""
        return f"{section.format} weights per channel ({section.algorithm}), activations {section.activations}{smooth}"
    amount = section.pattern if section.pattern is not None else f"dense_ratio {section.dense_ratio:g}"
    return f"{section.method} {amount}"


def _check_on_model(cfg, model_spec: str) -> int:
    from .errors import NothingToPruneError, SlimtorchError
    from .pruning.structured_targets import describe_training, plan_training
    from .quantize_cli import load_model

    try:
        model, _ = load_model(model_spec)
        plan = plan_training(model, cfg)
    except SlimtorchError as err:
        print(err, file=sys.stderr)
        return 1 if isinstance(err, NothingToPruneError) else 2
    for line in describe_training(plan, cfg):
        print(f"  {line}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtorch", description="slimtorch: model compression for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a (DeepSpeed) config and print the resolved settings")
    check.add_argument("config", help="path to the JSON config (DeepSpeed-style, or an INC WeightPruningConfig)")
    check.add_argument("--model", help="Hugging Face model directory, or package.module:function: list the layers "
                                       "each group prunes and those left dense")
    from .compress_cli import add_compress_parser, run_compress
    from .quantize_cli import add_quantize_parser, run_quantize
    from .slim_cli import add_slim_parser, run_slim

    add_compress_parser(sub)
    add_quantize_parser(sub)
    add_slim_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.config, args.model)
    if args.command == "compress":
        return run_compress(args)
    if args.command == "quantize":
        return run_quantize(args)
    if args.command == "slim":
        return run_slim(args)
    return 1  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
