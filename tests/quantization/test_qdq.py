"""QDQ modules: accuracy vs float, per-channel vs per-tensor, dynamic mode, zeros, state_dict, dtype, no mutation."""
import copy

import pytest
import torch
from torch import nn

from slimtorch.errors import CalibrationError, ConfigError, StateDictError
from slimtorch.quantization.observers import MinMaxObserver
from slimtorch.quantization.qdq import QDQConv1D, QDQConv1d, QDQConv2d, QDQLinear, op_type, qdq_class_for


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 5)).eval()


def rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def quantize_model(model, x, *, dynamic=False, weight_granularity="per_channel", act_dtype="int8",
                   act_symmetric=True, **kw):
    """Test helper (quantize() comes later): observe each layer's input on x, swap in QDQ copies."""
    q = copy.deepcopy(model)
    obs, hooks = {}, []
    for name, m in q.named_modules():
        if qdq_class_for(m) is not None:
            obs[name] = MinMaxObserver(act_dtype, act_symmetric)
            hooks.append(m.register_forward_pre_hook(lambda mod, a, o=obs[name]: o.observe(a[0])))
    with torch.no_grad():
        q(x)
    for h in hooks:
        h.remove()
    for name, o in obs.items():
        parent, _, child = name.rpartition(".")
        owner = q.get_submodule(parent) if parent else q
        m = getattr(owner, child)
        setattr(owner, child, qdq_class_for(m).from_float(
            m, weight_granularity=weight_granularity, act_dtype=act_dtype, act_symmetric=act_symmetric,
            act_qparams=None if dynamic else o.qparams(), dynamic=dynamic, **kw))
    return q


def test_mlp_and_cnn_close_to_float_static_and_dynamic():
    torch.manual_seed(1)
    for model, x in ((mlp(), torch.randn(64, 16)), (cnn(), torch.randn(8, 3, 16, 16))):
        before = copy.deepcopy(model.state_dict())
        ref = model(x)
        for kw in ({}, {"act_dtype": "uint8", "act_symmetric": False}, {"dynamic": True}):
            q = quantize_model(model, x, **kw)
            err = rel_err(q(x), ref)
            assert err < 0.02, (kw, err)  # measured 0.008-0.011
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # float model untouched
        assert type(model[0]) in (nn.Linear, nn.Conv2d)


def test_dynamic_per_token_linear_and_conv_rejects_token():
    torch.manual_seed(2)
    lin = nn.Linear(16, 8)
    x = torch.randn(2, 5, 16) * torch.logspace(-2, 1, 5)[None, :, None]  # tokens of very different scales
    tok = QDQLinear.from_float(lin, dynamic=True, act_granularity="token")
    ten = QDQLinear.from_float(lin, dynamic=True)
    ref = lin(x)
    # the small tokens keep their precision per token; per tensor they drown in the large tokens' step
    assert rel_err(tok(x)[:, 0], ref[:, 0]) * 10 < rel_err(ten(x)[:, 0], ref[:, 0])
    with pytest.raises(ConfigError, match="token"):
        QDQConv2d.from_float(nn.Conv2d(3, 3, 1), dynamic=True, act_granularity="token")
    with pytest.raises(ConfigError, match="token"):
        QDQLinear.from_float(lin, act_qparams=(1.0, 0), act_granularity="token")


def test_per_channel_beats_per_tensor_on_skewed_channels():
    torch.manual_seed(3)
    lin = nn.Linear(32, 8)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-3, 0, 8)[:, None])  # output channel ranges differ 1000x
    x = torch.randn(64, 32)
    pc = QDQLinear.from_float(lin, weight_granularity="per_channel", dynamic=True)
    pt = QDQLinear.from_float(lin, weight_granularity="per_tensor", dynamic=True)
    assert pc.weight_scale.shape == (8,) and pt.weight_scale.shape == ()
    wc = rel_err(pc.dequantized_weight(), lin.weight.detach())
    wt = rel_err(pt.dequantized_weight(), lin.weight.detach())
    assert wc < 0.005 and wc * 2 < wt  # measured 0.0037 vs 0.0086
    small = slice(0, 3)  # the small channels: per tensor rounds them to (nearly) zero
    ref = lin(x)
    assert rel_err(pc(x)[:, small], ref[:, small]) * 10 < rel_err(pt(x)[:, small], ref[:, small])


def test_pruned_zeros_stay_zero_and_weights_symmetric():
    torch.manual_seed(4)
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 0.1] = 0.0
        lin.weight[3] = 0.0  # a fully pruned channel: scale clamps to eps, weights stay 0
    zeros = lin.weight == 0
    for g in ("per_channel", "per_tensor"):
        q = QDQLinear.from_float(lin, weight_granularity=g, dynamic=True)
        assert q.weight_int8.dtype == torch.int8
        assert torch.equal(q.weight_int8 == 0, zeros)
        # the full int8 range (quantization/grid.py: scale max|w| / 127.5): the largest |w| of each scale's weights
        # lands on +127.5 -> 127 when positive, on -127.5 -> -128 when negative
        w, qi = lin.weight.detach(), q.weight_int8.int()
        rows = range(8) if g == "per_channel" else [None]
        for r in rows:
            wr, qr = (w, qi) if r is None else (w[r], qi[r])
            if bool((wr != 0).any()):
                top = wr.abs().argmax()
                assert int(qr.flatten()[top]) == (-128 if float(wr.flatten()[top]) < 0 else 127)
        assert torch.equal(q.dequantized_weight() == 0, zeros)
    conv = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight[:, :, 1, :] = 0.0
    q = QDQConv2d.from_float(conv, dynamic=True)
    assert torch.equal(q.weight_int8 == 0, conv.weight == 0)


def test_state_dict_round_trip_without_calibration():
    torch.manual_seed(5)
    x = torch.randn(4, 3, 16, 16)
    model = cnn()
    q = quantize_model(model, x, act_dtype="uint8", act_symmetric=False)
    sd = q.state_dict()
    assert sd["0.weight_int8"].dtype == torch.int8 and sd["0.input_zero_point"].dtype == torch.int32
    # rebuild from the float model with dummy qparams: the file alone restores every number
    fresh = copy.deepcopy(model)
    for i in (0, 2):
        fresh[i] = QDQConv2d.from_float(model[i], act_dtype="uint8", act_symmetric=False, act_qparams=(1.0, 128))
    fresh[5] = QDQLinear.from_float(model[5], act_dtype="uint8", act_symmetric=False, act_qparams=(1.0, 128))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), q(x))
    # per-tensor checkpoint into a per-channel-built module: scale shape follows the file
    lin = nn.Linear(8, 4)
    a = QDQLinear.from_float(lin, weight_granularity="per_tensor", act_qparams=(0.1, 0))
    b = QDQLinear.from_float(nn.Linear(8, 4), act_qparams=(1.0, 0))
    b.load_state_dict(a.state_dict())
    xx = torch.randn(3, 8)
    assert torch.equal(a(xx), b(xx))
    # dynamic modules have no activation buffers; loading a static file into one is a clear error
    d = QDQLinear.from_float(lin, dynamic=True)
    assert set(d.state_dict()) == {"weight_int8", "weight_scale", "bias", "qdq_spec"}
    with pytest.raises(StateDictError, match="the checkpoint holds a static QDQ layer, this one is dynamic"):
        d.load_state_dict(a.state_dict())


def test_to_float64_keeps_scales_float32():
    torch.manual_seed(6)
    x = torch.randn(16, 16)
    q = quantize_model(mlp(), x)
    y32 = q(x)
    q64 = copy.deepcopy(q).to(torch.float64)
    assert q64[0].bias.dtype == torch.float64 and q64[0].weight_int8.dtype == torch.int8
    assert q64[0].weight_scale.dtype == torch.float32 and q64[0].input_scale.dtype == torch.float32
    y64 = q64(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-4, atol=1e-5)
    q.to("cpu")  # device moves keep working (meta is a device too: shapes follow, values do not)
    m = copy.deepcopy(q).to("meta")
    assert m[0].weight_scale.device.type == "meta" and m[0].weight_scale.dtype == torch.float32


def test_input_saturates_like_quantizelinear():
    lin = nn.Linear(2, 1, bias=False)
    q = QDQLinear.from_float(lin, act_qparams=(0.01, 0))
    big = torch.tensor([[5.0, -5.0]])
    assert torch.equal(q.quantize_input(big), torch.tensor([[1.27, -1.28]]))  # full int8 range [-128, 127]


def test_bad_act_qparams_and_granularity():
    lin = nn.Linear(4, 2)
    with pytest.raises(CalibrationError, match="act_qparams"):
        QDQLinear.from_float(lin)
    with pytest.raises(CalibrationError, match="zero point"):
        QDQLinear.from_float(lin, act_qparams=(0.1, 3))
    with pytest.raises(CalibrationError, match="> 0"):
        QDQLinear.from_float(lin, act_qparams=(0.0, 0))
    with pytest.raises(CalibrationError, match="per tensor"):
        QDQLinear.from_float(lin, act_qparams=(torch.ones(2), torch.zeros(2)))
    with pytest.raises(ConfigError, match="granularity"):
        QDQLinear.from_float(lin, weight_granularity="per_row", dynamic=True)


def test_conv1d_and_padding_modes():
    torch.manual_seed(7)
    x = torch.randn(4, 3, 20)
    for mode in ("zeros", "reflect", "circular"):
        conv = nn.Conv1d(3, 6, 3, padding=1, padding_mode=mode)
        q = QDQConv1d.from_float(conv, dynamic=True)
        assert rel_err(q(x), conv(x)) < 0.015  # measured ~0.008
    conv2 = nn.Conv2d(3, 4, 3, padding="same", dilation=2)
    x2 = torch.randn(2, 3, 9, 9)
    assert rel_err(QDQConv2d.from_float(conv2, dynamic=True)(x2), conv2(x2)) < 0.015


def test_gpt2_conv1d():
    from transformers import GPT2Config, GPT2Model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(8)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=None, eos_token_id=None)
    model = GPT2Model(cfg).eval()
    ids = torch.randint(0, 64, (3, 12))
    before = copy.deepcopy(model.state_dict())
    c_fc = model.h[0].mlp.c_fc
    assert isinstance(c_fc, Conv1D) and c_fc.weight.shape == (32, 128)  # [in, out]
    assert op_type(c_fc) == "Conv1D" and op_type(nn.Linear(2, 2)) == "Linear" and op_type(nn.ReLU()) is None
    q1 = QDQConv1D.from_float(c_fc, dynamic=True)
    assert q1.weight_int8.shape == (32, 128) and q1.weight_scale.shape == (128,)  # per output column
    h = torch.randn(3, 12, 32)
    assert rel_err(q1(h), c_fc(h)) < 0.015  # measured 0.009
    ref = model(ids).last_hidden_state
    for kw in ({}, {"dynamic": True}, {"dynamic": True, "act_granularity": "token"}):
        q = quantize_model(model, ids, **kw)
        assert isinstance(q.h[0].attn.c_attn, QDQConv1D)
        err = rel_err(q(ids).last_hidden_state, ref)
        assert err < 0.012, (kw, err)  # measured 0.004-0.0055
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
