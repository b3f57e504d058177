"""``slimtorch quantize``: config + model + calibration data -> an ONNX QDQ file and a printed summary.

The model is a Hugging Face model directory (loaded with ``transformers.AutoModel``) or ``package.module:function``
returning an ``nn.Module``. Calibration data is a text file (paragraphs separated by blank lines, tokenized with the
model directory's tokenizer), a ``torch.save``d list of batches, or ``package.module:function`` returning an
iterable of batches.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

from .errors import SlimtorchError


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and export it to ONNX (QuantizeLinear/DequantizeLinear)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="JSON config with compression_inference.static_quantization (or dynamic_...)")
    p.add_argument("--model", required=True, help="Hugging Face model directory, or package.module:function")
    p.add_argument("--calib", help="calibration data: a .txt file, a torch.save'd list of batches, or "
                                   "package.module:function (static quantization needs it)")
    p.add_argument("--output", required=True, help="path of the ONNX file to write")
    p.add_argument("--eval", help="package.module:function taking the candidate model and returning a number: turns "
                                  "on accuracy-aware fallback (the config's accuracy_criterion, or its defaults)")
    p.add_argument("--batch-size", type=int, default=8, help="texts per calibration batch (text files)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (text files)")
    p.add_argument("--save-state-dict", help="also save the quantized model's state_dict here (.pt)")
    p.add_argument("--opset", type=int, default=17)


def run_quantize(args) -> int:
    import torch

    from . import export_onnx, load_config, quantization_report, quantize

    try:
        model, tokenizer = load_model(args.model)
        batches = load_calibration(args.calib, tokenizer, args.batch_size, args.max_length)
        example = batches[0] if batches else _default_example(tokenizer)
        started = time.perf_counter()
        eval_fn = _import_callable(args.eval, "--eval") if args.eval else None
        section = load_config(args.config).quantization
        if eval_fn is None and section is not None and section.accuracy_criterion is not None:
            raise SlimtorchError("the config sets accuracy_criterion, which needs an evaluation function: pass "
                                 "--eval package.module:function (it takes the candidate model and returns a number), "
                                 "or remove accuracy_criterion")
        q = quantize(model, args.config, calib_dataloader=batches if args.calib else None, eval_fn=eval_fn)
        seconds = time.perf_counter() - started
        path = export_onnx(q, example, args.output, opset=args.opset)
        if args.save_state_dict:
            torch.save(q.state_dict(), args.save_state_dict)
    except SlimtorchError as err:
        print(f"slimtorch quantize: {err}", file=sys.stderr)
        return 2
    report = quantization_report(q)
    print(f"{len(report.quantized)} layers quantized, {len(report.left_float)} left in float "
          f"({seconds:.1f} s)")
    for f in report.left_float:
        print(f"  float: {f.name} ({f.op_type}): {f.reason}")
    if report.smoothquant is not None:
        print(str(report.smoothquant))
    if report.accuracy is not None:
        print(report.accuracy.summary())
    size = os.path.getsize(path) / 2**20
    print(f"wrote {path} ({size:.1f} MiB), checked with onnx.checker and ONNX Runtime")
    return 0


def load_model(spec: str, *, architecture: bool = False) -> Tuple[Any, Any]:
    """``(model, tokenizer or None)`` from a model directory or ``package.module:function``. A directory is loaded
    with ``AutoModel``, or with ``architecture`` as the class its config names (a causal LM keeps its head)."""
    if os.path.isdir(spec):
        try:
            import transformers
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise SlimtorchError(f"--model {spec}: a model directory needs the transformers package: pip install -e "
                                 "'.[onnx,hf]' in the slimtorch checkout, or pip install transformers") from e
        cls = AutoModel
        if architecture:
            names = transformers.AutoConfig.from_pretrained(spec).architectures or []
            cls = getattr(transformers, names[0], AutoModel) if names else AutoModel
        model = cls.from_pretrained(spec).eval()
        tokenizer = AutoTokenizer.from_pretrained(spec) if any(
            (Path(spec) / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")) else None
        return model, tokenizer
    obj = _import_callable(spec, "--model")()
    import torch.nn as nn

    if not isinstance(obj, nn.Module):
        raise SlimtorchError(f"--model {spec}: the function returned {type(obj).__name__}, not a torch.nn.Module")
    return obj.eval(), None


def load_calibration(spec: Optional[str], tokenizer, batch_size: int, max_length: int) -> List[Any]:
    if spec is None:
        return []
    if spec.endswith(".txt"):
        if tokenizer is None:
            raise SlimtorchError(f"--calib {spec}: a text file needs a model directory with a tokenizer (--model DIR)")
        try:
            text = Path(spec).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SlimtorchError(f"--calib {spec}: cannot read the text file: {e}") from e
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
        if not paragraphs:
            raise SlimtorchError(f"--calib {spec}: no text in the file")
        return [dict(tokenizer(paragraphs[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")) for i in range(0, len(paragraphs), batch_size)]
    if os.path.isfile(spec):
        import torch

        try:
            data = torch.load(spec, map_location="cpu", weights_only=True)
        except Exception as e:  # a pickle, zip or format error: the file is not what --calib reads
            raise SlimtorchError(f"--calib {spec}: not a torch.save'd tensor or list of batches "
                                 f"({type(e).__name__}); a text file must end in .txt (paragraphs separated by blank "
                                 "lines)") from e
        return list(data) if not isinstance(data, torch.Tensor) else [data]
    return list(_import_callable(spec, "--calib")())


def _import_callable(spec: str, flag: str):
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SlimtorchError(f"{flag} {spec!r}: not a directory or file; give package.module:function")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise SlimtorchError(f"{flag} {spec!r}: cannot import: {e}") from e


def _default_example(tokenizer):
    if tokenizer is not None:
        return dict(tokenizer(["slimtorch exports this example sentence."], return_tensors="pt"))
    raise SlimtorchError("without --calib there is no example input to trace the export with; pass --calib")
