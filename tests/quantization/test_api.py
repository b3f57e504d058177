"""quantize(): what it builds, what it leaves alone, save/load, and every user mistake as a clear error."""
import copy
import math

import pytest
import torch
from torch import nn

import slimtorch as st
from slimtorch import CalibrationError, ConfigError, StateDictError
from slimtorch.quantization.qdq import QDQConv2d, QDQLinear

STATIC = {"compression_inference": {"static_quantization": {"enabled": True}}}
DYNAMIC = {"compression_inference": {"dynamic_quantization": {"enabled": True}}}


def static(**body):
    return {"compression_inference": {"static_quantization": {"enabled": True, **body}}}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def conv_bn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    with torch.no_grad():  # non-trivial BN statistics
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
    return m.eval()


def batches(n=4, shape=(8, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_static_builds_qdq_copy_and_leaves_the_model_alone():
    model = mlp().train()
    before = copy.deepcopy(model)
    q = st.quantize(model, STATIC, calib_dataloader=batches(), progress=False)
    assert same_state(model, before) and model.training
    assert all(isinstance(model[i], nn.Linear) for i in (0, 2, 4))
    assert all(isinstance(q[i], QDQLinear) and not q[i].dynamic for i in (0, 2, 4))
    assert q[0].act_dtype == "uint8" and q[0].weight_scale.shape == (32,)
    x = batches(1, seed=5)[0]
    with torch.no_grad():
        err = (q(x) - model(x)).norm() / model(x).norm()
    assert err < 0.03
    report = st.quantization_report(q)
    assert [r.name for r in report.quantized] == ["0", "2", "4"] and report.calibration_batches == 4
    assert "3 layers quantized" in str(report)


def test_op_types_and_excluded_modules_leave_layers_float():
    model = conv_bn()
    q = st.quantize(model, static(op_types=["Conv2d"], excluded_modules=[]), calib_dataloader=batches(
        2, (4, 1, 6, 6)), progress=False)
    assert isinstance(q[0], QDQConv2d) and isinstance(q[4], nn.Linear)
    q = st.quantize(model, static(excluded_modules=["^4$"]), calib_dataloader=batches(2, (4, 1, 6, 6)),
                    progress=False)
    assert isinstance(q[4], nn.Linear)
    left = st.quantization_report(q).left_float
    assert [(f.name, f.reason) for f in left] == [("4", "excluded_modules[0] ('^4$')")]
    with pytest.warns(UserWarning, match=r"excluded_modules\[0\] \('classifier'\) matches no"):
        st.quantize(mlp(), static(excluded_modules=["classifier"]), calib_dataloader=batches(), progress=False)


def test_batchnorm_is_folded_before_quantizing():
    model = conv_bn()
    x = batches(2, (4, 1, 6, 6))
    q = st.quantize(model, STATIC, calib_dataloader=x, progress=False)
    assert isinstance(q[1], nn.Identity) and isinstance(model[1], nn.BatchNorm2d)
    assert st.quantization_report(q).folded_batchnorm == [("0", "1")]
    with torch.no_grad():
        assert (q(x[0]) - model(x[0])).norm() / model(x[0]).norm() < 0.05
    unfolded = st.quantize(model, static(fold_batchnorm=False), calib_dataloader=x, progress=False)
    assert isinstance(unfolded[1], nn.BatchNorm2d)


def test_dynamic_needs_no_loader_and_per_token_is_closer():
    model = mlp()
    x = torch.randn(6, 16) * torch.linspace(0.1, 10, 6)[:, None]  # rows of very different scale
    with torch.no_grad():
        ref = model(x)
        errs = {}
        for gran in ("per_tensor", "per_token"):
            cfg = {"compression_inference": {"dynamic_quantization": {"enabled": True,
                                                                        "activation": {"granularity": gran}}}}
            q = st.quantize(model, cfg)
            assert q[0].dynamic
            errs[gran] = float((q(x) - ref).norm() / ref.norm())
    assert errs["per_token"] < errs["per_tensor"] < 0.05


def test_generator_loader_and_input_fn():
    model = conv_bn()
    data = batches(3, (4, 1, 6, 6))

    def gen():  # one-shot: BN folding and calibration must both see the same batches
        for b in data:
            yield {"image": b, "label": 0}

    q = st.quantize(model, STATIC, calib_dataloader=gen(), calib_input_fn=lambda b: b["image"], progress=False)
    ref = st.quantize(model, STATIC, calib_dataloader=data, progress=False)
    assert same_state(q, ref) and st.quantization_report(q).calibration_batches == 3


def test_num_calibration_batches_caps_the_loader():
    q = st.quantize(mlp(), static(num_calibration_batches=2), calib_dataloader=batches(5), progress=False)
    assert st.quantization_report(q).calibration_batches == 2
    ref = st.quantize(mlp(), STATIC, calib_dataloader=batches(5)[:2], progress=False)
    assert same_state(q, ref)


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_save_and_load_without_calibration_data(tmp_path, fmt):
    model = conv_bn()
    x = batches(2, (4, 1, 6, 6))
    q = st.quantize(model, STATIC, calib_dataloader=x, progress=False)
    path = tmp_path / f"q.{'pt' if fmt == 'torch' else 'safetensors'}"
    if fmt == "torch":
        torch.save(q.state_dict(), path)
    else:
        safetensors = pytest.importorskip("safetensors.torch")
        safetensors.save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(path))
    restored = st.load_quantized(model, path)
    assert same_state(restored, q) and isinstance(restored[1], nn.Identity)
    with torch.no_grad():
        assert torch.equal(restored(x[1]), q(x[1]))
    d = st.quantize(mlp(), DYNAMIC)
    assert same_state(st.load_quantized(mlp(), d.state_dict()), d)
    no_bias = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    qb = st.quantize(no_bias, STATIC, calib_dataloader=x, progress=False)
    assert qb[0].bias is not None and st.quantization_report(qb).bias_corrected == ["0"]  # created by the correction
    assert same_state(st.load_quantized(no_bias, qb.state_dict()), qb)


def test_load_quantized_errors():
    with pytest.raises(StateDictError, match="no slimtorch QDQ layer"):
        st.load_quantized(mlp(), mlp().state_dict())
    q = st.quantize(mlp(), STATIC, calib_dataloader=batches(), progress=False)
    with pytest.raises(StateDictError, match="layer '0' is quantized, but Sequential has ReLU there"):
        st.load_quantized(nn.Sequential(nn.ReLU(), nn.Linear(16, 4)), q.state_dict())


def test_pruned_zeros_stay_exact_zeros():
    model = mlp()
    with torch.no_grad():
        for i in (0, 2):
            w = model[i].weight.view(model[i].out_features, -1, 4)
            w.scatter_(-1, w.abs().argsort(-1)[..., :2], 0.0)
    q = st.quantize(model, STATIC, calib_dataloader=batches(), progress=False)
    for i in (0, 2):
        assert torch.equal(q[i].weight_int8 == 0, model[i].weight == 0)


# ------------------------------------------------------------------ user mistakes: clear errors, model unchanged
class TakesTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.fc(x + y)


def _nan_batches():
    b = batches(2)
    b[1][3, 5] = float("nan")
    return b


MISTAKES = [
    ("static_without_loader", lambda: (mlp(), STATIC, None), CalibrationError,
     ["static quantization needs calibration data", "calib_dataloader="]),
    ("empty_loader", lambda: (mlp(), STATIC, []), CalibrationError, ["yielded no batches"]),
    ("nan_in_batch", lambda: (mlp(), STATIC, _nan_batches()), CalibrationError,
     ["calibration batch 1", "input of module '0' (Linear)", "1 NaN"]),
    ("inf_inside_model", lambda: (_inf_model(), STATIC, batches()), CalibrationError,
     ["input of module '2' (Linear)", "inf"]),
    ("batch_model_cannot_take", lambda: (TakesTwo(), STATIC, batches(1, (2, 4))), CalibrationError,
     ["calibration batch 0 (Tensor[2, 4] float32) could not be fed to TakesTwo", "TypeError"]),
    ("not_a_loader", lambda: (mlp(), STATIC, 42), CalibrationError, ["calib_dataloader must be an iterable"]),
    ("op_type_not_quantizable", lambda: (mlp(), static(op_types=["Linear", "LSTM"]), batches()), ConfigError,
     ["op_types.1", "'Linear', 'Conv1d', 'Conv2d' or 'Conv1D'", "got 'LSTM'"]),
    ("everything_excluded", lambda: (mlp(), static(excluded_modules=[".*"]), batches()), ConfigError,
     ["nothing to quantize in Sequential"]),
    ("no_section", lambda: (mlp(), {"compression_training": {}}, batches()), ConfigError,
     ["no quantization section is enabled"]),
    ("accuracy_criterion_without_eval_fn", lambda: (mlp(), static(accuracy_criterion={"tolerable_loss": 0.01}),
                                                    batches()),
     ConfigError, ["static_quantization.accuracy_criterion is set, but quantize() got no eval_fn", "eval_fn="]),
    ("attention_matmuls", lambda: (mlp(), static(quantize_attention_matmuls=True), batches()), ConfigError,
     ["quantize_attention_matmuls", "not available"]),
]


def _inf_model():
    m = mlp()
    with torch.no_grad():
        m[0].bias[0] = float("inf")
    return m


@pytest.mark.parametrize("make,error,parts", [pytest.param(m, e, p, id=i) for i, m, e, p in MISTAKES])
def test_user_mistakes_raise_clear_errors_and_leave_model_alone(make, error, parts):
    model, cfg, loader = make()
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    with pytest.raises(error) as info:
        st.quantize(model, cfg, calib_dataloader=loader, progress=False)
    for part in parts:
        assert part in str(info.value), f"{part!r} not in {info.value}"
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) or (before[k].isnan() == after[k].isnan()).all() for k in before)
    assert [m.training for m in model.modules()] == modes
    assert not any(isinstance(m, (QDQLinear, QDQConv2d)) for m in model.modules())


def test_quantizing_twice_and_other_api_misuse():
    q = st.quantize(mlp(), STATIC, calib_dataloader=batches(), progress=False)
    with pytest.raises(ConfigError, match="already contains slimtorch QDQ layers"):
        st.quantize(q, STATIC, calib_dataloader=batches(), progress=False)
    with pytest.raises(ConfigError, match="mpu takes None .*\"local\".*ProcessGroup.*get_data_parallel_group"):
        st.quantize(mlp(), STATIC, mpu=object(), calib_dataloader=batches(), progress=False)
    with pytest.raises(ConfigError, match="eval_fn must be a function model -> number, got str"):
        st.quantize(mlp(), STATIC, calib_dataloader=batches(), eval_fn="accuracy", progress=False)
    with pytest.raises(ConfigError, match="was not returned by slimtorch.quantize"):
        st.quantization_report(mlp())
    assert math.isfinite(float(q(batches(1)[0]).sum()))


class PostLN(nn.Module):
    """A post-LN block (the LayerNorm output is also the residual), with planted outlier channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.q, self.k = nn.Linear(32, 32), nn.Linear(32, 32)
        self.out = nn.Linear(32, 8)
        with torch.no_grad():
            self.norm.weight[:3] = 40.0

    def forward(self, x):
        h = self.norm(x)
        h = h + self.q(h) * torch.sigmoid(self.k(h))
        return self.out(h)


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_smoothquant_without_folding_smooths_what_folding_cannot(tmp_path, alpha):
    model = PostLN().eval()
    data = batches(4, (16, 32))
    x = batches(1, (16, 32), seed=7)[0]
    sq = static(smoothquant={"enabled": True, "alpha": alpha, "folding": False}, activation={"dtype": "int8"})
    plain = st.quantize(model, static(activation={"dtype": "int8"}), calib_dataloader=data, progress=False)
    folded = st.quantize(model, static(smoothquant={"enabled": True, "alpha": alpha}, activation={"dtype": "int8"}),
                         calib_dataloader=data, progress=False)
    smoothed = st.quantize(model, sq, calib_dataloader=data, progress=False)
    assert st.quantization_report(folded).smoothquant.groups == []  # the LayerNorm also feeds the residual
    groups = st.quantization_report(smoothed).smoothquant.groups
    assert [g.linears for g in groups] == [["q", "k"], ["out"]]  # q and k read one tensor: one scale, one Mul
    assert torch.equal(smoothed.q.input_smooth, smoothed.k.input_smooth)
    with torch.no_grad():
        ref = model(x)
        err = {name: float((m(x) - ref).norm() / ref.norm()) for name, m in
               (("plain", plain), ("smoothed", smoothed))}
    assert err["smoothed"] * 2 < err["plain"], err
    restored = st.load_quantized(model, smoothed.state_dict())
    with torch.no_grad():
        assert torch.equal(restored(x), smoothed(x))
    onnx = pytest.importorskip("onnx")
    path = st.export_onnx(smoothed, x, tmp_path / "sq.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Mul") == 3 and ops.count("QuantizeLinear") == 2  # q/k share a Mul and a QuantizeLinear;
    # the third Mul is the model's own gate
