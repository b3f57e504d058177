"""all-MiniLM-L6-v2 end to end: quantize on real text, sentence embeddings in PyTorch and ONNX Runtime.

Static int8: mean cosine >= 0.99 and min >= 0.98 to the float model on 128 held-out paragraphs, disjoint from the
calibration ones, in PyTorch and after export in ONNX Runtime; dynamic: mean >= 0.98. (benchmarks/ptq.py measures
256 held-out paragraphs and the peers.)
"""
import copy
import random

import numpy as np
import pytest
import torch

import slimtorch as st
from tests.conftest import real_paragraphs

pytestmark = pytest.mark.slow
MAX_LEN = 128


@pytest.fixture(scope="module")
def texts():
    paras = real_paragraphs()
    random.Random(0).shuffle(paras)
    return paras[:256], paras[256:384]  # calibration, held out (disjoint)


@pytest.fixture(scope="module")
def float_embeddings(_minilm_pristine, texts):
    """The float model's embeddings of the held-out paragraphs (computed once for both sections)."""
    model, tok = _minilm_pristine
    return embed_torch(copy.deepcopy(model).eval(), tokenize(tok, texts[1]))


def tokenize(tok, texts, batch=16):
    return [dict(tok(texts[i:i + batch], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt"))
            for i in range(0, len(texts), batch)]


def mean_pool(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def embed_torch(model, batches):
    with torch.no_grad():
        return torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])


def embed_ort(path, batches):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    out = []
    for b in batches:
        hidden = sess.run(None, {k: v.numpy() for k, v in b.items() if k in names})[0]
        out.append(mean_pool(torch.from_numpy(np.asarray(hidden)), b["attention_mask"]))
    return torch.cat(out)


def cosines(a, b):
    c = torch.nn.functional.cosine_similarity(a, b)
    return float(c.mean()), float(c.min())


@pytest.mark.parametrize("section,mean_min,min_min", [
    ({"static_quantization": {"enabled": True, "num_calibration_batches": 32}}, 0.99, 0.98),
    ({"dynamic_quantization": {"enabled": True}}, 0.98, 0.95),
])
def test_minilm_quantized_keeps_sentence_embeddings(minilm, texts, float_embeddings, tmp_path, section, mean_min,
                                                    min_min):
    model, tok = minilm
    model.eval()
    calib_texts, held_texts = texts
    calib = tokenize(tok, calib_texts, batch=8)
    held = tokenize(tok, held_texts)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = st.quantize(model, {"compression_inference": section}, calib_dataloader=calib, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = st.quantization_report(q)
    assert len(report.quantized) == 37  # 36 encoder Linears + the pooler

    ref = float_embeddings
    torch_mean, torch_min = cosines(embed_torch(q, held), ref)
    path = st.export_onnx(q, held[0], tmp_path / "minilm.int8.onnx")
    ort_mean, ort_min = cosines(embed_ort(path, held), ref)
    print(f"\n{list(section)[0]}: PyTorch {torch_mean:.4f}/{torch_min:.4f}, ONNX Runtime {ort_mean:.4f}/{ort_min:.4f}")
    assert torch_mean >= mean_min and torch_min >= min_min
    assert ort_mean >= mean_min and ort_min >= min_min
