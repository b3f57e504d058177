"""Quantize all-MiniLM-L6-v2 to int8 on real text, export it to ONNX, and compare with the float model.

    python examples/quantize_minilm.py                                   # static int8, about 2 minutes on 2 cores
    python examples/quantize_minilm.py --config examples/configs/ptq_dynamic.json

Install (in the slimtorch checkout, after torch): pip install -e ".[examples,onnx]"

Calibrates on 256 paragraphs of the Python documentation shipped with the standard library, then measures the
sentence embeddings of 256 other paragraphs against the float model, in PyTorch and in ONNX Runtime, and the
ONNX Runtime latency of the int8 file next to the float export (batch 8 x 128 tokens, 2 threads).
"""
import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F

import slimtorch as st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prune_minilm import load_minilm, paragraphs  # noqa: E402  (same model and text as the pruning example)


def tokenize(tok, texts, batch_size, max_length=128, pad_to_max=False):
    return [dict(tok(texts[i:i + batch_size], padding="max_length" if pad_to_max else True, truncation=True,
                     max_length=max_length, return_tensors="pt")) for i in range(0, len(texts), batch_size)]


def pool(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def embed_torch(model, batches):
    with torch.no_grad():
        return torch.cat([pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])


def session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def embed_ort(sess, batches):
    names = {i.name for i in sess.get_inputs()}
    return torch.cat([pool(torch.from_numpy(np.asarray(sess.run(None, {k: v.numpy() for k, v in b.items()
                                                                       if k in names})[0])), b["attention_mask"])
                      for b in batches])


def latency_ms(sessions, batch, rounds):
    """Median per session, the sessions interleaved round by round so machine noise hits them alike."""
    names = {i.name for i in next(iter(sessions.values())).get_inputs()}
    feeds = {k: v.numpy() for k, v in batch.items() if k in names}
    times = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, feeds)
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "configs" / "ptq_static.json"))
    parser.add_argument("--rounds", type=int, default=10, help="latency rounds")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tok = load_minilm()
    model.eval()
    texts = paragraphs()
    random.Random(0).shuffle(texts)
    calib = tokenize(tok, texts[:256], 8)
    held = tokenize(tok, texts[256:512], 16)

    started = time.perf_counter()
    q = st.quantize(model, args.config, calib_dataloader=calib)
    seconds = time.perf_counter() - started
    print(st.quantization_report(q))

    ref = embed_torch(model, held)
    cos_torch = F.cosine_similarity(embed_torch(q, held), ref)
    out = tempfile.mkdtemp()
    bench = tokenize(tok, texts[:8], 8, pad_to_max=True)[0]  # batch 8 x 128 tokens
    f32 = st.export_onnx(model, bench, os.path.join(out, "minilm.onnx"))
    int8 = st.export_onnx(q, bench, os.path.join(out, "minilm.int8.onnx"))
    sessions = {"float": session(f32), "int8": session(int8)}
    cos_ort = F.cosine_similarity(embed_ort(sessions["int8"], held), ref)
    ms = latency_ms(sessions, bench, args.rounds)
    mib = {k: os.path.getsize(p) / 2**20 for k, p in (("float", f32), ("int8", int8))}

    print(f"\nquantize() took {seconds:.1f} s; 256 held-out paragraphs, cosine to the float model's embeddings:")
    print(f"  PyTorch QDQ model:   mean {cos_torch.mean():.4f}  min {cos_torch.min():.4f}")
    print(f"  ONNX Runtime (int8): mean {cos_ort.mean():.4f}  min {cos_ort.min():.4f}")
    print(f"ONNX Runtime, batch 8 x 128, 2 threads: float {ms['float']:.1f} ms ({mib['float']:.0f} MiB), "
          f"int8 {ms['int8']:.1f} ms ({mib['int8']:.0f} MiB): {ms['float'] / ms['int8']:.2f}x")


if __name__ == "__main__":
    main()
