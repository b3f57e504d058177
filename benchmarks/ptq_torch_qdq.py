#!/usr/bin/env python
"""Groundwork for issue 3: all-MiniLM-L6-v2 with every encoder Linear as a slimtorch QDQ module, in PyTorch.

    python benchmarks/ptq_torch_qdq.py        # ~3 min on 2 cores

Calibrates on 256 training paragraphs (batches of 8, up to 128 tokens) from ``_distill.paragraphs()``, builds the
QDQ model from ``slimtorch.quantization`` (per-channel symmetric int8 weights; activations per observer) and prints
the cosine of the held-out sentence embeddings (256 paragraphs, up to 256 tokens) to the float model. No ONNX
here: that is the export's job; this measures the quantization math alone.
"""
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _distill as D  # noqa: E402
from slimtorch.quantization.calibrate import calibrate  # noqa: E402
from slimtorch.quantization.observers import OBSERVERS  # noqa: E402
from slimtorch.quantization.qdq import qdq_class_for  # noqa: E402

VARIANTS = [
    ("static int8 symmetric, minmax", dict(observer="minmax")),
    ("static int8 symmetric, percentile", dict(observer="percentile")),
    ("static int8 symmetric, mse", dict(observer="mse")),
    ("static int8 symmetric, entropy", dict(observer="entropy")),
    ("static uint8 asymmetric, minmax", dict(observer="minmax", act_dtype="uint8", act_symmetric=False)),
    ("static int8 mse, FFN output.dense left float", dict(observer="mse", keep_float=("output.dense",))),
    ("dynamic int8, per tensor", dict(dynamic=True)),
    ("dynamic int8, per token", dict(dynamic=True, act_granularity="token")),
]


def quantized_copy(model, names, calib, observer="minmax", act_dtype="int8", act_symmetric=True, dynamic=False,
                   act_granularity="tensor", keep_float=()):
    q = copy.deepcopy(model)
    modules = dict(q.named_modules())
    observers = {}
    if not dynamic:
        observers = calibrate(q, calib, num_batches=len(calib), module_filter=names, progress=False,
                              observer_factory=lambda n, m: OBSERVERS[observer](dtype=act_dtype,
                                                                                 symmetric=act_symmetric))
    for name in names:
        if any(k in name for k in keep_float):
            continue
        parent, _, child = name.rpartition(".")
        float_module = modules[name]
        setattr(modules[parent], child, qdq_class_for(float_module).from_float(
            float_module, act_qparams=None if dynamic else observers[name].qparams(), dynamic=dynamic,
            act_dtype=act_dtype, act_symmetric=act_symmetric, act_granularity=act_granularity))
    return q


def main():
    torch.manual_seed(0)
    model, tok = D.load_minilm(train=False)
    train, held = D.paragraphs()
    calib = [tok(train[i:i + 8], padding=True, truncation=True, max_length=128, return_tensors="pt")
             for i in range(0, 256, 8)]
    reference = D.embed(model, tok, held)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    print(f"all-MiniLM-L6-v2, {len(names)} encoder Linears as QDQ, {len(held)} held-out paragraphs, PyTorch CPU")
    print(f"{'variant':<46} {'cosine mean':>11} {'min':>7}")
    for label, kwargs in VARIANTS:
        cos = (D.embed(quantized_copy(model, names, calib, **kwargs), tok, held) * reference).sum(-1)
        print(f"{label:<46} {cos.mean():>11.4f} {cos.min():>7.4f}")


if __name__ == "__main__":
    main()
