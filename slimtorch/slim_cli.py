"""``slimtorch slim``: a pruned model (zeros in its weights, e.g. saved after ``finalize()``) -> a smaller dense model,
saved with :func:`slimtorch.save_slim`, and the report printed (parameters, MACs, latency before and after).

The model is a Hugging Face model directory (loaded with ``transformers.AutoModel``) or ``package.module:function``
returning an ``nn.Module``. The example input is ``--text`` tokenized with the directory's tokenizer (padded to
``--max-length``, ``--batch-size`` copies), or a float tensor of ``--input-shape`` (e.g. 1,3,224,224), seeded.
"""
from __future__ import annotations

import argparse
import sys

from .errors import SlimtorchError


def add_slim_parser(sub) -> None:
    p = sub.add_parser("slim", help="cut a pruned model's zero units, heads and channels out; save the slim model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory, or package.module:function")
    p.add_argument("--output", required=True, help="directory to save the slim model in")
    p.add_argument("--text", default="slimtorch keeps what the pruned model computes.",
                   help="example text (model directories with a tokenizer)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example text")
    p.add_argument("--batch-size", type=int, default=8, help="copies of the example text (latency batch)")
    p.add_argument("--input-shape", help="example float input shape for models without a tokenizer, e.g. 1,3,224,224")
    p.add_argument("--round-to", type=int, default=1, help="keep each channel count a multiple of this")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")


def run_slim(args) -> int:
    import torch

    from .quantize_cli import load_model
    from .slimming import save_slim, slim, slim_report

    try:
        model, tokenizer = load_model(args.model)
        if args.input_shape:
            try:
                shape = tuple(int(d) for d in args.input_shape.split(","))
            except ValueError:
                raise SlimtorchError(f"--input-shape {args.input_shape!r}: give comma-separated sizes, "
                                     "e.g. 1,3,224,224") from None
            example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        elif tokenizer is not None:
            example = dict(tokenizer([args.text] * args.batch_size, padding="max_length", truncation=True,
                                     max_length=args.max_length, return_tensors="pt"))
        else:
            raise SlimtorchError("no example input: give --input-shape (the model has no tokenizer)")
        small = slim(model, example, round_to=args.round_to, measure_latency=not args.no_latency)
        how = save_slim(small, args.output)
    except SlimtorchError as err:
        print(f"slimtorch slim: {err}", file=sys.stderr)
        return 2
    print(slim_report(small))
    print(f"\nsaved to {args.output} ("
          + ("save_pretrained with the updated config: from_pretrained loads it" if how == "transformers" else
             "slimtorch format: load with slimtorch.load_slim") + ")")
    return 0
