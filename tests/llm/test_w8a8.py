"""W8A8 int8 / FP8 E4M3: the grids (pure functions), the W8A8Linear layer, and oneshot's w8a8_quantization section on
tiny random-init decoders (per-token dynamic and static per-tensor activations, SmoothQuant folded inside each block,
GPTQ on the int8 grid), with its user errors."""
import pytest
import torch

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.llm.modules import W8A8Linear
from slimtorch.quantization.grid import (
    WeightGrid,
    fake_quantize,
    fake_quantize_dynamic,
    quantize,
    quantize_per_channel,
    quantize_rtn,
    symmetric_scale,
)
from slimtorch.quantization.smoothquant.scales import linear_weight

from .tiny_models import TINY_MODELS, random_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
INT8, FP8 = "int8", "fp8_e4m3"


def per_token(x, fmt):
    return fake_quantize_dynamic(x, fmt, True, "token")


def config(**section):
    return {"compression_inference": {"w8a8_quantization": {"enabled": True, **section}}}


def calibration(model, batches=4, length=32, seed=0):
    return [random_tokens(model.config.vocab_size, 2, length, seed + i) for i in range(batches)]


def logit_error(reference, model, ids):
    with torch.no_grad():
        ref, out = reference(input_ids=ids).logits, model(input_ids=ids).logits
    return float(((out - ref) ** 2).mean() / (ref ** 2).mean())


# -- the grids ---------------------------------------------------------------------------------------------------
def test_int8_weights_are_the_int8_weight_grid_per_channel():
    """int8 W8A8 weights and the weight-only int8 symmetric per-channel grid are one grid (scale amax / 127.5,
    [-128, 127]): GPTQ's int8 results drop into W8A8Linear unchanged."""
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0)) * 3
    q, scale = quantize_per_channel(w, INT8)
    q_ref, scale_ref, _ = quantize_rtn(w, WeightGrid(8, True, None))
    assert q.dtype == torch.int8 and scale.shape == (16, 1)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    torch.testing.assert_close(scale[:, 0], w.abs().amax(1) / 127.5)


def test_fp8_saturates_instead_of_making_nan():
    fp8 = torch.float8_e4m3fn
    x = torch.tensor([[1000.0, -1000.0, 0.0, 448.0, 1e-9]])
    q = quantize(x, torch.tensor(1.0), dtype=FP8)
    assert q.dtype == fp8 and q.float().tolist() == [[448.0, -448.0, 0.0, 448.0, 0.0]]
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    q, scale = quantize_per_channel(w, FP8)
    assert q.dtype == fp8 and bool(torch.isfinite(q.float()).all())
    torch.testing.assert_close(q.float().abs().amax(1), torch.full((8,), 448.0))  # each row's max hits the top
    relative = (q.float() * scale - w).abs() / w.abs().clamp(min=1e-2)
    assert float(relative.median()) < 0.04  # 3 mantissa bits: about 1/16 worst case, far less typically


def test_per_token_activations_have_one_scale_per_token():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    x[0, 0] *= 100  # one loud token must not coarsen the others' grids
    y = per_token(x, INT8)
    for t in range(5):
        step = x[1, t].abs().max() / 127.5
        assert float((y[1, t] - x[1, t]).abs().max()) <= float(step) / 2 + 1e-6
    # every token's values are integers times its own scale
    k = y[0, 1] / (x[0, 1].abs().max() / 127.5)
    torch.testing.assert_close(k, torch.round(k), atol=1e-4, rtol=0)
    static = fake_quantize(x, symmetric_scale(torch.tensor(1.0), INT8), dtype=INT8)
    assert float(static.abs().max()) <= 128 / 127.5 + 1e-6  # beyond the calibrated range: clipped (-128 s)


def test_w8a8_linear_matches_the_math_and_keeps_its_8bit_tensors_under_half():
    torch.manual_seed(3)
    linear = torch.nn.Linear(32, 8)
    x = torch.randn(4, 32)
    for fmt in (INT8, FP8):
        q, scale = quantize_per_channel(linear.weight, fmt)
        layer = W8A8Linear(q, scale, linear.bias, fmt)
        expected = per_token(x, fmt) @ (q.float() * scale).t() + linear.bias
        torch.testing.assert_close(layer(x), expected.detach())
        half = layer.half()
        assert half.weight.dtype == q.dtype and half.weight_scale.dtype == torch.float32
        assert half.bias.dtype == torch.float16 and half(x.half()).dtype == torch.float16


def test_no_float8_dtype_is_a_clear_error(monkeypatch):
    model = TINY_MODELS["llama"]()
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ConfigError, match=r"no float8_e4m3fn dtype.*format to 'int8'"):
        st.oneshot(model, config(format="fp8_e4m3", algorithm="rtn"), calibration(model), progress=False)


def test_config_errors_name_the_key():
    model = TINY_MODELS["llama"]()
    with pytest.raises(ConfigError, match=r"w8a8_quantization\.algorithm.*FP8 E4M3 weights take algorithm 'rtn'"):
        st.oneshot(model, config(format="fp8_e4m3", algorithm="gptq"), calibration(model), progress=False)
    both = {"compression_inference": {"w8a8_quantization": {"enabled": True},
                                      "weight_only_quantization": {"enabled": True}}}
    with pytest.raises(ConfigError, match=r"w8a8_quantization\.enabled.*both enabled"):
        st.oneshot(model, both, calibration(model), progress=False)
    with pytest.raises(ConfigError, match=r"call\s+slimtorch\.compress"):
        st.quantize(model, config(), calib_dataloader=calibration(model))


# -- through oneshot -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_rtn_weights_are_per_channel_rtn_of_every_block_weight(arch, fmt):
    model = TINY_MODELS[arch]()
    q_model = st.oneshot(model, config(format=fmt, algorithm="rtn"), calibration(model), progress=False)
    float_layers = dict(model.named_modules())
    layers = {n: m for n, m in q_model.named_modules() if isinstance(m, W8A8Linear)}
    assert layers and all("lm_head" not in n for n in layers)
    for name, layer in layers.items():
        q, scale = quantize_per_channel(linear_weight(float_layers[name]), fmt)
        assert layer.dynamic and layer.weight.dtype == q.dtype
        torch.testing.assert_close(layer.dequantized_weight(), q.float() * scale, rtol=0, atol=0)
    assert st.quantization_report(q_model).mode == f"w8a8 {fmt}"
    ids = random_tokens(model.config.vocab_size, 2, 32, seed=50)
    assert logit_error(model, q_model, ids) < (2e-3 if fmt == "int8" else 2e-2)


def test_static_activation_scales_come_from_the_calibration_inputs():
    model = TINY_MODELS["llama"]()
    calib = calibration(model)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, max(seen.get(n, 0.0),
                                                                                   float(a[0].abs().max()))))
             for n, m in model.named_modules() if n == "model.layers.0.self_attn.q_proj"]
    q_model = st.oneshot(model, config(activations="static_per_tensor", algorithm="rtn"), calib, progress=False)
    for h in hooks:
        h.remove()
    layer = q_model.get_submodule("model.layers.0.self_attn.q_proj")
    assert not layer.dynamic  # block 0's inputs are the model's own: the range seen by the float forward
    torch.testing.assert_close(layer.input_scale, torch.tensor([seen["model.layers.0.self_attn.q_proj"] / 127.5]))
    assert all(not m.dynamic for m in q_model.modules() if isinstance(m, W8A8Linear))


def test_static_activation_ranges_come_from_quantize_observers():
    """``observer`` picks one of quantize's observers for the static ranges: percentile clips the 99th percentile
    of |x| (the same observer quantize() uses, fed the same inputs), so the scale is below minmax's."""
    from slimtorch.quantization.observers import PercentileObserver

    model = TINY_MODELS["llama"]()
    calib = calibration(model)
    name = "model.layers.0.self_attn.q_proj"
    observer = PercentileObserver(percentile=99.0)
    hook = model.get_submodule(name).register_forward_pre_hook(lambda m, a: observer.observe(a[0]))
    section = dict(activations="static_per_tensor", algorithm="rtn")
    clipped = st.oneshot(model, config(**section, observer="percentile", percentile=99.0), calib, progress=False)
    hook.remove()
    plain = st.oneshot(model, config(**section), calib, progress=False)
    scale = clipped.get_submodule(name).input_scale
    torch.testing.assert_close(scale, symmetric_scale(observer.absmax().reshape(1), INT8), rtol=0, atol=0)
    assert float(scale) < 0.9 * float(plain.get_submodule(name).input_scale)
    assert "percentile" in st.quantization_report(clipped).quantized[0].scheme


def test_w8a8_smoothquant_and_observer_config_errors():
    model = TINY_MODELS["llama"]()
    with pytest.raises(ConfigError, match=r"w8a8_quantization\.observer.*static_per_tensor"):
        st.oneshot(model, config(observer="entropy"), calibration(model), progress=False)
    with pytest.raises(ConfigError, match=r"w8a8_quantization\.smoothquant\.folding.*folds"):
        st.oneshot(model, config(smoothquant={"enabled": True, "folding": False}), calibration(model),
                   progress=False)


def test_w8a8_smoothquant_takes_alpha_auto():
    """One SmoothQuant shape: "auto" picks each group's alpha from the grid, in W8A8 as in static_quantization."""
    model = _outlier_llama()
    q = st.oneshot(model, config(algorithm="rtn", smoothquant={"enabled": True, "alpha": "auto"}),
                   calibration(model), progress=False)
    schemes = [layer.scheme for layer in st.quantization_report(q).quantized]
    assert sum("SmoothQuant scales folded" in s for s in schemes) >= 8


def _outlier_llama():
    """A tiny Llama whose input norms make two hidden channels 40x louder: the activation outliers SmoothQuant is
    for (real LLMs have them; random init has none)."""
    model = TINY_MODELS["llama"]()
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 77]] = 40.0
    return model


def test_smoothquant_folds_into_the_norms_and_up_to_down_and_lowers_static_int8_error():
    model = _outlier_llama()
    calib = calibration(model, batches=8)
    ids = random_tokens(model.config.vocab_size, 2, 32, seed=51)
    plain = st.oneshot(model, config(activations="static_per_tensor", algorithm="rtn"), calib, progress=False)
    smoothed = st.oneshot(model, config(activations="static_per_tensor", algorithm="rtn",
                                        smoothquant={"enabled": True, "alpha": 0.8}), calib, progress=False)
    schemes = {q.name: q.scheme for q in st.quantization_report(smoothed).quantized}
    for name in ("q_proj", "k_proj", "v_proj"):
        assert schemes[f"model.layers.0.self_attn.{name}"].endswith("scales folded into input_layernorm")
    for name in ("gate_proj", "up_proj"):
        assert schemes[f"model.layers.1.mlp.{name}"].endswith("scales folded into post_attention_layernorm")
    assert schemes["model.layers.1.mlp.down_proj"].endswith("scales folded into mlp.up_proj")
    assert "folded" not in schemes["model.layers.1.self_attn.o_proj"]  # GQA: v's and o's widths differ
    assert logit_error(model, smoothed, ids) < 0.5 * logit_error(model, plain, ids)


def test_gptq_on_the_int8_grid_beats_rtn_and_pruned_zeros_stay_zero():
    model = TINY_MODELS["llama"]()
    calib = calibration(model, batches=8, length=64)
    ids = random_tokens(model.config.vocab_size, 4, 64, seed=99)
    rtn = st.oneshot(model, config(algorithm="rtn"), calib, progress=False)
    gptq = st.oneshot(model, config(algorithm="gptq"), calib, progress=False)
    assert logit_error(model, gptq, ids) < logit_error(model, rtn, ids)
    both = {"compression_inference": {"w8a8_quantization": {"enabled": True, "algorithm": "gptq"},
                                      "oneshot_pruning": {"enabled": True, "pattern": "2:4"}}}
    pruned = st.oneshot(model, both, calib, progress=False)
    for name, layer in pruned.named_modules():
        if isinstance(layer, W8A8Linear):
            groups = layer.weight.reshape(layer.out_features, -1, 4)
            assert bool(((groups != 0).sum(-1) <= 2).all()), name
