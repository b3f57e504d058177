"""weight_tuning: MSE weight scales, output shifts and empirical bias correction of QDQ layers."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.quantization.grid import fake_quantize
from slimtorch.quantization.observers import MinMaxObserver
from slimtorch.quantization.qdq import QDQConv1D, qdq_class_for
from slimtorch.quantization.weight_tuning import (
    correct_bias,
    mse_weight_scale,
    output_shift,
    set_weight_scale,
    weight_quant_delta,
)


def _minmax_scale(w, axis=0):
    return w.movedim(axis, 0).reshape(w.shape[axis], -1).abs().amax(1) / 127.5  # the grid's int8 rule


def _quant_error(w, s, axis=0):
    """W - dequantize(quantize(W)), symmetric int8 with scale s (per channel along axis, or 0-d)."""
    shape = [1] * w.dim()
    shape[axis] = -1
    s = s.reshape(()) if s.dim() == 0 else s.reshape(shape)
    return w - torch.clamp(torch.round(w / s), -128, 127) * s


def _err(w, s, axis=0):
    d = _quant_error(w, s, axis) ** 2
    return d.movedim(axis, 0).reshape(w.shape[axis], -1).sum(1)


def test_mse_scale_never_worse_than_minmax_and_clips_outliers():
    torch.manual_seed(0)
    w = torch.rand(8, 20000) * 2 - 1
    w[3, 5] = 1.05  # one value a little outside a dense [-1, 1]: clipping it buys a finer grid for the rest
    s_mm, s_mse = _minmax_scale(w), mse_weight_scale(w, 0)
    assert s_mse.shape == (8,) and s_mse.dtype == torch.float32
    assert (s_mse <= s_mm * (1 + 1e-6)).all() and (s_mse >= 0.5 * s_mm * (1 - 1e-6)).all()
    assert (_err(w, s_mse) <= _err(w, s_mm) + 1e-9).all()
    assert s_mse[3] < s_mm[3] and _err(w, s_mse)[3] < 0.97 * _err(w, s_mm)[3]
    assert torch.equal(mse_weight_scale(w, 0, num_steps=1), s_mm)  # one step = the minmax scale


def test_mse_scale_per_tensor_axis_one_and_chunking():
    torch.manual_seed(1)
    w = torch.randn(8, 12)
    s = mse_weight_scale(w, None)
    assert s.dim() == 0 and float(_err(w.reshape(1, -1), s.reshape(1), 0)) <= float(
        _err(w.reshape(1, -1), (w.abs().max() / 127.5).reshape(1), 0)) + 1e-9
    # transformers' Conv1D layout [in, out]: channels on axis 1, same answer as the transpose on axis 0
    assert torch.allclose(mse_weight_scale(w, 1), mse_weight_scale(w.t().contiguous(), 0))
    assert torch.equal(mse_weight_scale(w, 0, chunk_elements=1), mse_weight_scale(w, 0))


def test_mse_scale_keeps_zeros():
    torch.manual_seed(2)
    w = torch.randn(4, 32)
    w[:, ::2] = 0.0  # pruned
    s = mse_weight_scale(w, 0)
    assert (_quant_error(w, s)[w == 0] == 0).all()  # zero point 0: a pruned weight stays exactly 0


@pytest.mark.parametrize("bad", [dict(min_ratio=0.0), dict(min_ratio=1.5), dict(num_steps=0)])
def test_mse_scale_rejects_bad_search(bad):
    with pytest.raises(ConfigError):
        mse_weight_scale(torch.randn(2, 3), 0, **bad)


def test_output_shift_is_the_mean_of_the_op():
    torch.manual_seed(3)
    x, d = torch.randn(5, 7, 6), torch.randn(4, 6)
    assert torch.allclose(output_shift("Linear", x.reshape(-1, 6).mean(0), d), F.linear(x, d).reshape(-1, 4).mean(0),
                          atol=1e-5)
    assert torch.allclose(output_shift("Conv1D", x.reshape(-1, 6).mean(0), d.t()), (x @ d.t()).reshape(-1, 4).mean(0),
                          atol=1e-5)
    xc, dc = torch.randn(3, 8, 9, 9), torch.randn(8, 2, 3, 3)  # grouped, strided, dilated
    ref = F.conv2d(xc, dc, None, 2, 0, 2, 4).mean((0, 2, 3))
    assert torch.allclose(output_shift("Conv2d", xc.mean(0), dc, stride=2, dilation=2, groups=4), ref, atol=1e-5)
    x1, d1 = torch.randn(3, 4, 10), torch.randn(6, 4, 3)
    assert torch.allclose(output_shift("Conv1d", x1.mean(0), d1), F.conv1d(x1, d1).mean((0, 2)), atol=1e-5)
    with pytest.raises(ConfigError):
        output_shift("Conv3d", xc.mean(0), dc)


def _qdq(module, x):
    obs = MinMaxObserver("uint8", False)
    obs.observe(x)
    return qdq_class_for(module).from_float(module, act_dtype="uint8", act_symmetric=False, act_qparams=obs.qparams())


def test_set_weight_scale_requantizes():
    torch.manual_seed(4)
    lin = nn.Linear(6, 4)
    q = _qdq(lin, torch.randn(10, 6))
    s = mse_weight_scale(lin.weight, 0)
    set_weight_scale(q, lin.weight, s)
    assert q.weight_int8.dtype == torch.int8
    assert torch.equal(q.weight_scale, s)
    zp = torch.zeros(4, dtype=torch.int32)
    assert torch.equal(q.dequantized_weight(), fake_quantize(lin.weight.detach(), s, zp, axis=0))
    with pytest.raises(ConfigError, match="does not match"):
        set_weight_scale(q, torch.randn(3, 6), s[:3])


class _StaticPadConv(nn.Conv2d):
    """EfficientNet's TF-"SAME" conv: pads through a static_padding child, then a padding-free conv."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("make", [
    lambda: nn.Linear(12, 5),
    lambda: nn.Linear(12, 5, bias=False),
    lambda: nn.Conv2d(4, 6, 3, padding=1),
    lambda: nn.Conv2d(4, 4, 3, padding="same", groups=4, bias=False),  # depthwise, no bias: one is created
    lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", stride=2),
    lambda: _StaticPadConv(4, 4, 3, stride=2, groups=4),
])
def test_correct_bias_restores_the_float_output_mean(make):
    """After correction, mean over the data of the QDQ output == mean of the float op on the same quantized input."""
    torch.manual_seed(5)
    m = make().eval()
    with torch.no_grad():
        m.weight.mul_(3.0)  # coarse weights: a visible rounding shift
    x = torch.randn(16, 4, 9, 9) + 0.5 if isinstance(m, nn.Conv2d) else torch.randn(16, 3, 12) + 0.5
    model = nn.Sequential(m)
    q = copy.deepcopy(model)
    q[0] = _qdq(m, x)
    with torch.no_grad():
        float_on_xq = m(q[0].quantize_input(x))  # the float weight on the layer's own quantized input
        before = q(x)
    chan = 1 if x.dim() == 4 else -1
    mean = lambda y: y.movedim(chan, 0).reshape(y.shape[chan], -1).mean(1)  # noqa: E731
    assert (mean(before) - mean(float_on_xq)).abs().max() > 1e-5  # there was a shift to correct
    report = correct_bias(q, {"0": m.weight}, [x[:8], x[8:]])
    assert set(report) == {"0"} and q[0].bias is not None and q[0].bias.dtype == torch.float32
    with torch.no_grad():
        after = q(x)
    assert torch.allclose(mean(after), mean(float_on_xq), atol=1e-5), (mean(after) - mean(float_on_xq)).abs().max()


def test_correct_bias_conv1d_layout_and_generic_feeding():
    torch.manual_seed(6)
    w, b = torch.randn(6, 4) * 3, torch.randn(4)
    x = torch.randn(8, 5, 6) + 1.0
    obs = MinMaxObserver("uint8", False)
    obs.observe(x)
    q = QDQConv1D(w, b, act_dtype="uint8", act_symmetric=False, act_qparams=obs.qparams())

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = q

        def forward(self, inputs):
            return self.c(inputs)

    model = Wrap()
    correct_bias(model, {"c": w}, [{"inputs": x}], num_batches=1)
    with torch.no_grad():
        ref = q.quantize_input(x) @ w + b
        out = model(x)
    assert torch.allclose(out.reshape(-1, 4).mean(0), ref.reshape(-1, 4).mean(0), atol=1e-5)


def test_correct_bias_errors_and_untouched_when_never_called():
    lin = nn.Linear(4, 3)
    x = torch.randn(5, 4)
    model = nn.Sequential(_qdq(lin, x), nn.ReLU())
    with pytest.raises(ConfigError, match="no module named"):
        correct_bias(model, {"9": lin.weight}, [x])
    with pytest.raises(ConfigError, match="not a slimtorch QDQ layer"):
        correct_bias(model, {"1": lin.weight}, [x])
    with pytest.raises(ConfigError, match="does not match"):
        correct_bias(model, {"0": torch.randn(3, 5)}, [x])
    with pytest.raises(ValueError, match="no batches"):
        correct_bias(model, {"0": lin.weight}, [])
    bias = model[0].bias.clone()
    unused = nn.Sequential(model[0], nn.Identity())

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = unused

        def forward(self, x):
            return x  # inner layer never runs

    assert correct_bias(Skip(), {"inner.0": lin.weight}, [x]) == {}
    assert torch.equal(model[0].bias, bias)


def test_weight_quant_delta():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.randn(6, 2, 6, 6)
    with torch.no_grad():
        h = torch.relu(net[0](x)).flatten(1)
    q = _qdq(net[3], h)
    assert torch.allclose(weight_quant_delta(q, net[3].weight), net[3].weight - q.dequantized_weight())


def test_digits_cnn_bias_correction_and_mse_do_not_hurt():
    """End to end on the trained digits CNN: MSE scales + bias correction keep the accuracy of plain static int8."""
    from torch.utils.data import DataLoader, TensorDataset

    import slimtorch
    from slimtorch.quantization.fold import fold_batchnorm
    from slimtorch.quantization.qdq import QDQModule

    from .cnn_data import accuracy, digits_data, torch_threads, train_digits_cnn

    with torch_threads(1):
        model = train_digits_cnn(epochs=3)  # fewer epochs than test_cnn: a quick trained model is enough here
        data = digits_data()
        loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=64)
        cfg = {"compression_inference": {"static_quantization": {"enabled": True}}}
        q = slimtorch.quantize(model, cfg, calib_dataloader=loader, progress=False)
        folded = copy.deepcopy(model)
        fold_batchnorm(folded, data.x_train[:64])
        fnamed = dict(folded.named_modules())
        layers = {n: m for n, m in q.named_modules() if isinstance(m, QDQModule)}
        base_acc = accuracy(q, data.x_test, data.y_test)
        for n, m in layers.items():
            set_weight_scale(m, fnamed[n].weight, mse_weight_scale(fnamed[n].weight, m.weight_axis))
        correct_bias(q, {n: fnamed[n].weight for n in layers}, loader)
        float_acc = accuracy(model, data.x_test, data.y_test)
        tuned_acc = accuracy(q, data.x_test, data.y_test)
    assert tuned_acc >= min(base_acc, float_acc - 0.005), (float_acc, base_acc, tuned_acc)
