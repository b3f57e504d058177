"""``slimtorch compress``: config + model + calibration data -> the model compressed by :func:`slimtorch.compress`
(every enabled ``compression_inference`` section, one-shot pruning then quantization), written with
:func:`slimtorch.save` (``slimtorch.load(OUTPUT)`` reads it back), and a summary printed.

The model is a Hugging Face model directory, loaded as the class its config names (``LlamaForCausalLM``, so a
decoder LLM takes the block pipeline; ``transformers.AutoModel`` when it names none), or ``package.module:function``
returning an ``nn.Module``. Calibration data is a text file (paragraphs separated by blank lines, tokenized with the
model directory's tokenizer), a ``torch.save``d list of batches, or ``package.module:function`` returning an
iterable of batches.
"""
from __future__ import annotations

import argparse
import sys
import time

from .errors import SlimtorchError


def add_compress_parser(sub) -> None:
    p = sub.add_parser("compress", help="run every post-training section of a config (one-shot pruning, then "
                                        "quantization) and save the result", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="JSON config with compression_inference sections")
    p.add_argument("--model", required=True, help="Hugging Face model directory, or package.module:function")
    p.add_argument("--calib", help="calibration data: a .txt file, a torch.save'd list of batches, or "
                                   "package.module:function (sections that read activations need it)")
    p.add_argument("--output", required=True, help="directory to write the compressed model in (slimtorch.save)")
    p.add_argument("--device", help="where the block pipeline compresses each block of a decoder LLM, e.g. cuda")
    p.add_argument("--batch-size", type=int, default=8, help="texts per calibration batch (text files)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (text files)")


def run_compress(args) -> int:
    from . import compress, quantization_report, save
    from .quantize_cli import load_calibration, load_model

    try:
        model, tokenizer = load_model(args.model, architecture=True)
        batches = load_calibration(args.calib, tokenizer, args.batch_size, args.max_length)
        started = time.perf_counter()
        result = compress(model, args.config, batches if args.calib else None, device=args.device)
        seconds = time.perf_counter() - started
        directory = save(result, args.output)
    except SlimtorchError as err:
        print(f"slimtorch compress: {err}", file=sys.stderr)
        return 2
    print("\n".join(_summary(quantization_report(result), type(model).__name__, seconds)))
    print(f"wrote {directory}; slimtorch.load({str(directory)!r}) reads it")
    return 0


def _summary(report, model_name: str, seconds: float) -> list:
    """The counts, then each distinct scheme (at most five) with how many layers got it."""
    schemes = {}
    for row in report.quantized:
        schemes[row.scheme] = schemes.get(row.scheme, 0) + 1
    head = (f"{model_name}: {len(report.quantized)} layers compressed, {len(report.left_float)} left as they were "
            f"({seconds:.1f} s)")
    return [head] + [f"  {n} x {scheme}" for scheme, n in list(schemes.items())[:5]]
