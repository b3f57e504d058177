"""AWQ: the scale search (pure functions) and weight_only_quantization.awq through oneshot on tiny decoders."""
import pytest
import torch

import slimtorch as st
from slimtorch.llm.awq import awq_search, candidate_scales, weight_magnitude
from slimtorch.llm.modules import WeightOnlyLinear
from slimtorch.quantization.grid import WeightGrid

from .test_w8a8 import _outlier_llama, calibration, logit_error
from .tiny_models import random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
GRID = WeightGrid(4, True, 32)


def _loud_inputs(n=512, width=64, loud=(5, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    x[:, list(loud)] *= 30
    return x


def test_weight_magnitude_is_normalized_per_group():
    w = torch.tensor([[1.0, 2.0, 4.0, 8.0], [2.0, 2.0, 1.0, 1.0]])
    torch.testing.assert_close(weight_magnitude([w], WeightGrid(4, True, 2)),
                               torch.tensor([(0.5 + 1.0) / 2, (1.0 + 1.0) / 2, (0.5 + 1.0) / 2, (1.0 + 1.0) / 2]))


def test_candidate_scales_centre_on_one_and_follow_the_activations():
    act = torch.tensor([1.0, 10.0, 100.0])
    s = candidate_scales(act, torch.ones(3), 0.5, duo_scaling=False)
    torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    torch.testing.assert_close(s / s[0], torch.tensor([1.0, 10.0 ** 0.5, 10.0]))
    assert bool((candidate_scales(act, torch.ones(3), 0.0, duo_scaling=True) - 1).abs().max() < 1e-6)


def test_search_gives_loud_channels_larger_scales_and_never_loses_to_rtn():
    x = _loud_inputs()
    w = [torch.randn(48, 64, generator=torch.Generator().manual_seed(1)),
         torch.randn(16, 64, generator=torch.Generator().manual_seed(2))]
    result = awq_search(x, x.abs().mean(0), w, GRID)
    assert result.ratio is not None and result.error < 0.8 * result.rtn_error
    quiet = torch.ones(64, dtype=torch.bool)
    quiet[[5, 40]] = False
    assert float(result.scales[[5, 40]].min()) > float(result.scales[quiet].max())
    # inputs without outliers: scaling may not pay, and then no scaling is returned
    flat = torch.randn(512, 64, generator=torch.Generator().manual_seed(3))
    again = awq_search(flat, flat.abs().mean(0), w, GRID, grid_points=4)
    assert again.error <= again.rtn_error
    if again.ratio is None:
        torch.testing.assert_close(again.scales, torch.ones(64))


def test_awq_through_oneshot_folds_into_the_block_and_beats_rtn():
    model = _outlier_llama()
    calib = calibration(model, batches=8)
    ids = random_tokens(model.config.vocab_size, 4, 32, seed=52)

    def section(**extra):
        return {"compression_inference": {"weight_only_quantization": {
            "enabled": True, "group_size": 32, "algorithm": "rtn", **extra}}}

    rtn = st.oneshot(model, section(), calib, progress=False)
    awq = st.oneshot(model, section(awq={"enabled": True, "grid": 10}), calib, progress=False)
    schemes = {q.name: q.scheme for q in st.quantization_report(awq).quantized}
    assert "(awq + rtn)" in schemes["model.layers.0.self_attn.q_proj"]
    assert schemes["model.layers.0.self_attn.q_proj"].endswith("AWQ scales folded into input_layernorm")
    assert logit_error(model, awq, ids) < 0.8 * logit_error(model, rtn, ids)
    # the caller's model is untouched (no scale was folded into its norms)
    assert float(model.model.layers[0].input_layernorm.weight.detach()[3]) == 40.0
    assert all(isinstance(awq.get_submodule(n), WeightOnlyLinear) for n in schemes)
    gptq = st.oneshot(model, section(algorithm="gptq", awq={"enabled": True, "grid": 10}), calib, progress=False)
    assert logit_error(model, gptq, ids) < logit_error(model, rtn, ids)
