"""Value-by-value tests of slimtorch.quantization.grid: choose_qparams / quantize / dequantize / fake_quantize."""
import pytest
import torch

from slimtorch.quantization.grid import EPS, choose_qparams, dequantize, fake_quantize, fake_quantize_dynamic, quantize

t = torch.tensor


@pytest.mark.parametrize("lo, hi, dtype, symmetric, scale, zp", [
    (-1.0, 0.5, "int8", True, 1 / 127.5, 0),      # s = max(|-1|, 0.5) / ((127 - -128) / 2)
    (-0.25, 2.54, "int8", True, 2.54 / 127.5, 0),
    (-0.25, 1.5, "int4", True, 1.5 / 7.5, 0),     # the same rule at 4 bits
    (-3.0, 896.0, "fp8_e4m3", True, 2.0, 0),      # and for FP8 E4M3: amax / 448
    (-1.0, 2.0, "uint8", False, 3 / 255, 85),     # s = 3/255, z = 0 - round(-1 / s) = 85
    (0.5, 2.0, "uint8", False, 2 / 255, 0),       # range widened to [0, 2]
    (-2.0, -1.0, "uint8", False, 2 / 255, 255),   # range widened to [-2, 0]: z = round(2 / s) = 255
    (-1.0, 2.0, "int8", False, 3 / 255, -43),     # z = -128 - round(-85) = -43
])
def test_hand_computed_qparams(lo, hi, dtype, symmetric, scale, zp):
    s, z = choose_qparams(t(lo), t(hi), dtype=dtype, symmetric=symmetric)
    assert s.dtype == torch.float32 and z.dtype == torch.int32 and s.dim() == 0
    assert float(s) == pytest.approx(scale, rel=1e-6)
    assert int(z) == zp


def test_zero_range_gives_tiny_positive_scale():
    for dtype, sym in [("int8", True), ("uint8", False)]:
        s, z = choose_qparams(t(0.0), t(0.0), dtype=dtype, symmetric=sym)
        assert float(s) == pytest.approx(EPS) and float(s) > 0 and torch.isfinite(s)
        x = torch.zeros(3)
        assert torch.equal(fake_quantize(x, s, z, dtype=dtype), x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_range_raises(bad):
    with pytest.raises(ValueError, match="non-finite"):
        choose_qparams(t(bad), t(1.0))
    with pytest.raises(ValueError, match="non-finite"):
        choose_qparams(t([0.0, -1.0]), t([1.0, bad]), dtype="uint8", symmetric=False)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="min_val > max_val"):
        choose_qparams(t(1.0), t(0.0))
    with pytest.raises(ValueError, match="symmetric"):
        choose_qparams(t(-1.0), t(1.0), dtype="uint8", symmetric=True)
    with pytest.raises(ValueError, match="dtype"):
        choose_qparams(t(-1.0), t(1.0), dtype="int16")
    with pytest.raises(ValueError, match="axis"):
        quantize(torch.ones(2, 3), torch.ones(2), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not match"):
        quantize(torch.ones(2, 3), torch.ones(2), torch.zeros(2, dtype=torch.int32), axis=1)


def test_round_half_to_even_and_saturation():
    s, z = t(1.0), t(0, dtype=torch.int32)
    q = quantize(t([0.5, 1.5, 2.5, -0.5, -2.5, 1000.0, -1000.0]), s, z, dtype="int8")
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]  # full int8 range, as ONNX QuantizeLinear saturates
    assert quantize(t([-1000.0]), s, z, dtype="int8", quant_min=-127).tolist() == [-127]
    qu = quantize(t([-5.0, 0.0, 300.0]), s, t(3, dtype=torch.int32), dtype="uint8")
    assert qu.dtype == torch.uint8 and qu.tolist() == [0, 3, 255]
    assert dequantize(qu, s, t(3)).tolist() == [-3.0, 0.0, 252.0]


@pytest.mark.parametrize("dtype, symmetric", [("int8", True), ("uint8", False), ("int8", False)])
def test_round_trip_error_at_most_half_a_step_inside_range(dtype, symmetric):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g) * 3 + 0.7
    s, z = choose_qparams(x.min(), x.max(), dtype=dtype, symmetric=symmetric)
    err = (dequantize(quantize(x, s, z, dtype=dtype), s, z) - x).abs()
    assert float(err.max()) <= float(s) / 2 * (1 + 1e-5)


def test_symmetric_zero_point_is_zero_and_uint8_represents_zero_exactly():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        lo, hi = sorted((torch.randn(2, generator=g) * 10).tolist())
        _, zs = choose_qparams(t(lo), t(hi), dtype="int8", symmetric=True)
        assert int(zs) == 0
        s, z = choose_qparams(t(lo), t(hi), dtype="uint8", symmetric=False)
        assert 0 <= int(z) <= 255
        assert float(dequantize(quantize(t([0.0]), s, z, dtype="uint8"), s, z)) == 0.0


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("dtype, symmetric", [("int8", True), ("uint8", False)])
def test_per_channel_equals_per_tensor_slices(axis, dtype, symmetric):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 6, generator=g) * torch.arange(1, 7)  # columns of growing scale
    red = 1 if axis == 0 else 0  # reduce over the other axis
    s, z = choose_qparams(w.amin(red), w.amax(red), dtype=dtype, symmetric=symmetric)
    assert s.shape == (w.shape[axis],)
    q = quantize(w, s, z, dtype=dtype, axis=axis)
    for c in range(w.shape[axis]):
        sl = w.select(axis, c)
        sc, zc = choose_qparams(sl.min(), sl.max(), dtype=dtype, symmetric=symmetric)
        assert float(sc) == float(s[c]) and int(zc) == int(z[c])
        assert torch.equal(q.select(axis, c), quantize(sl, sc, zc, dtype=dtype))
        assert float((dequantize(q, s, z, axis=axis).select(axis, c) - sl).abs().max()) <= float(sc) / 2 * (1 + 1e-5)


@pytest.mark.parametrize("dtype, symmetric", [("int8", True), ("uint8", False)])
def test_fake_quantize_equals_composition_exactly(dtype, symmetric):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 5, 3, generator=g) * 4
    s, z = choose_qparams(x.min() * 0.5, x.max() * 0.5, dtype=dtype, symmetric=symmetric)  # some values clip
    assert torch.equal(fake_quantize(x, s, z, dtype=dtype), dequantize(quantize(x, s, z, dtype=dtype), s, z))
    sc, zc = choose_qparams(x.amin((0, 2)), x.amax((0, 2)), dtype=dtype, symmetric=symmetric)
    assert torch.equal(fake_quantize(x, sc, zc, dtype=dtype, axis=1),
                       dequantize(quantize(x, sc, zc, dtype=dtype, axis=1), sc, zc, axis=1))
    xb = x.to(torch.bfloat16)
    fq = fake_quantize(xb, s, z, dtype=dtype)
    assert fq.dtype == torch.bfloat16
    assert torch.equal(fq, dequantize(quantize(xb, s, z, dtype=dtype), s, z).to(torch.bfloat16))


# -- the one int8 rule and the runtimes it must agree with ---------------------------------------------------------
def test_symmetric_int8_uses_the_full_range_and_keeps_zero():
    """scale = amax / 127.5: -amax is exactly -128, +amax rounds up to 128 and saturates to 127 (s/2 off)."""
    x = t([-2.55, 2.55, 0.0, 1.0])
    s, z = choose_qparams(x.min(), x.max())
    assert float(s) == pytest.approx(0.02, rel=1e-6) and int(z) == 0
    assert quantize(x, s, z).tolist() == [-128, 127, 0, 50]


def test_per_token_int8_and_fp8_are_what_compressed_tensors_computes_at_run_time():
    """A W8A8 checkpoint with dynamic per-token activations leaves their scales to the runtime: transformers'
    compressed-tensors computes them with its own rule, so slimtorch's grid must be that rule, bit for bit."""
    ct = pytest.importorskip("compressed_tensors.quantization")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 64, generator=g) * torch.logspace(-3, 2, 64)  # tokens of very different ranges
    x[0, 1] = 0.0  # an all-zero token
    for kind, dtype in (("int", "int8"), ("float", "fp8_e4m3")):
        args = ct.QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True)
        scale, zero = compute_dynamic_scales_and_zp(value=x, args=args, module=None)
        theirs = ct_fake_quantize(x, scale, zero, args)
        assert torch.equal(fake_quantize_dynamic(x, dtype, True, "token"), theirs), dtype


def test_quantize_linear_in_onnx_runtime_matches_the_grid_bit_for_bit():
    """Static QDQ: QuantizeLinear -> DequantizeLinear in ONNX Runtime is fake_quantize exactly, ties (half to even)
    and saturation (to the full dtype range) included, for symmetric int8 and asymmetric uint8."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(500, generator=g) * 3, t([-9.0, 9.0, 0.0])])
    for dtype, symmetric, proto in (("int8", True, TensorProto.INT8), ("uint8", False, TensorProto.UINT8)):
        s, z = choose_qparams(x.min() * 0.7, x.max() * 0.7, dtype=dtype, symmetric=symmetric)  # some values clip
        x_ties = torch.cat([x, (torch.arange(-6, 7) + 0.5) * s])  # exact halves of a step
        inits = [numpy_helper.from_array(s.numpy(), "s"),
                 helper.make_tensor("z", proto, [], [int(z)])]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
        graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"x": x_ties.numpy()})[0])
        assert torch.equal(got, fake_quantize(x_ties, s, z, dtype=dtype)), dtype


def test_straight_through_gradient_passes_inside_the_range_and_stops_where_values_clip():
    s = t(0.1)
    x = t([-20.0, -12.8, -0.26, 0.0, 0.33, 12.7, 12.76, 20.0]).requires_grad_()
    y = fake_quantize(x, s, dtype="int8", ste=True)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), s, dtype="int8"))  # same values as without ste
    y.sum().backward()
    # 12.76 / 0.1 = 127.6 rounds to 128 and clips; -12.8 is exactly -128: inside
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    plain = t([0.33]).requires_grad_()
    fake_quantize(plain, s, dtype="int8").sum().backward()
    assert plain.grad.tolist() == [0.0]  # without ste: round has no slope
    xd = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(7)).requires_grad_()
    fake_quantize_dynamic(xd, "int8", True, "token", ste=True).sum().backward()
    assert torch.equal(xd.grad, torch.ones_like(xd))  # a token's own range never clips
