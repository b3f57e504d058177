"""The run that slimtorch and its peers (DeepSpeed 0.19.6's compression library, Intel Neural Compressor 3.7.1)
share, so that masks and sparsities can be compared layer by layer.

Everything is seeded and built from torch alone: the tiny BERT's weights are drawn from one ``torch.Generator`` in
sorted parameter-name order (not from transformers' initialisers, which change between versions), and so are the
token batches. The peer scripts in ``benchmarks/peers/`` import this file inside their own virtual environments;
the tests import it here. Only torch and transformers are needed.

| piece      | what                                                                                  |
|------------|---------------------------------------------------------------------------------------|
| model      | ``BertForSequenceClassification``: hidden 64, 2 layers, 4 heads, FFN 128, 2 labels    |
|            | (14 Linears: q, k, v, attention.output, intermediate, output per layer, pooler, head) |
| batches    | ``STEPS`` batches of 8 x 16 token ids (vocab 96); label = parity of the first token   |
| optimizer  | plain SGD, ``LR`` = 0.5, so the weights move a lot between prepare and the last step  |
"""
from __future__ import annotations

import hashlib
from typing import Dict, List

import torch
from torch import nn

VOCAB, SEQ, BATCH, STEPS, LR = 96, 16, 8, 12, 0.5


def tiny_bert(seed: int = 0) -> nn.Module:
    """The seeded tiny BERT, in train mode (no dropout: both dropout probabilities are 0)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=SEQ, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if "LayerNorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                scale = 0.1 if name.endswith("weight") else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.train()


def batches(seed: int = 0, steps: int = STEPS) -> List[Dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2})
    return out


def linear_names(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter's bytes in name order: both sides check they start from the same model."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data, after_step=None, before_forward=None) -> None:
    """The shared loop: forward, backward, ``optimizer.step()``; the hooks let a peer drive its scheduler."""
    for i, batch in enumerate(data):
        if before_forward is not None:
            before_forward(i)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(i)


def ceil_top_k(weight: torch.Tensor, dense_ratio: float) -> torch.Tensor:
    """DeepSpeed's l1 keep-mask: the ``ceil(dense_ratio * n)`` largest |w| (computed in float32)."""
    import math

    keep = torch.zeros(weight.numel(), dtype=torch.bool)
    order = weight.abs().flatten().float().argsort(descending=True, stable=True)
    keep[order[:math.ceil(dense_ratio * weight.numel())]] = True
    return keep.reshape(weight.shape)


def pack_masks(masks: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, object]]:
    """Bool masks -> {name: {"shape", "bits"}} with the bits packed 8 to a byte (small reference files)."""
    import numpy as np

    return {n: {"shape": list(m.shape), "bits": torch.from_numpy(np.packbits(m.bool().flatten().numpy()))}
            for n, m in masks.items()}


def unpack_masks(packed: Dict[str, Dict[str, object]]) -> Dict[str, torch.Tensor]:
    import numpy as np

    out = {}
    for n, e in packed.items():
        count = int(torch.tensor(e["shape"]).prod())
        bits = np.unpackbits(e["bits"].numpy())[:count]
        out[n] = torch.from_numpy(bits.astype(bool)).reshape(e["shape"])
    return out
