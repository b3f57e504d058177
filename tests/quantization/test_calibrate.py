"""Calibration: feeding rules, observed ranges, hooks removed, modes restored, device moves, errors."""
import copy
import sys

import pytest
import torch
from torch import nn

from slimtorch.batches import describe, to_device
from slimtorch.errors import CalibrationError, ConfigError
from slimtorch.quantization.calibrate import calibrate
from slimtorch.quantization.observers import MinMaxObserver


class KwModel(nn.Module):
    """Takes keyword inputs, like a transformers model (model(**batch))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids, scale=None):
        h = self.drop(self.proj(input_ids))
        return self.head(h if scale is None else h * scale)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def is_linear(name, m):
    return isinstance(m, nn.Linear)


def factory(name, m):
    return MinMaxObserver()


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, generator=g) * (i + 1) for i in range(n)]


def assert_range(obs, xs):
    allx = torch.cat(xs)
    assert torch.equal(obs.min_val, allx.min()) and torch.equal(obs.max_val, allx.max())


def no_hooks(model):
    return all(len(m._forward_pre_hooks) == 0 and len(m._forward_pre_hooks_with_kwargs) == 0
               for m in model.modules())


@pytest.mark.parametrize("wrap", ["tensor", "tuple", "list", "input_fn", "dict"])
def test_feeding_rules_record_true_input_range(wrap):
    xs = batches(5)
    if wrap == "dict":
        model = KwModel()
        loader = [{"input_ids": x} for x in xs]
    else:
        model = mlp()
        loader = {"tensor": xs, "tuple": [(x, torch.zeros(4)) for x in xs], "list": [[x, 0] for x in xs],
                  "input_fn": [{"pixels": x, "label": 1} for x in xs]}[wrap]
    fn = (lambda b: b["pixels"]) if wrap == "input_fn" else None
    before = copy.deepcopy(model.state_dict())
    obs = calibrate(model, loader, observer_factory=factory, num_batches=100, input_fn=fn, module_filter=is_linear,
                    progress=False)
    first = "proj" if wrap == "dict" else "0"
    assert set(obs) == ({"proj", "head"} if wrap == "dict" else {"0", "2"})
    assert_range(obs[first], xs)
    assert no_hooks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_num_batches_limit_names_and_second_layer_range():
    model, xs = mlp(), batches(6)
    obs = calibrate(model, xs, observer_factory=factory, num_batches=2, module_filter=["2"], progress=False)
    assert list(obs) == ["2"]
    with torch.no_grad():
        hidden = [model[1](model[0](x)) for x in xs[:2]]  # the input of layer "2" = ReLU output
    assert_range(obs["2"], hidden)
    with pytest.raises(ConfigError, match="nope"):
        calibrate(model, xs, observer_factory=factory, num_batches=2, module_filter=["nope"], progress=False)
    with pytest.raises(ConfigError, match=">= 1"):
        calibrate(model, xs, observer_factory=factory, num_batches=0, module_filter=is_linear, progress=False)
    with pytest.raises(CalibrationError, match="no module"):
        calibrate(model, xs, observer_factory=factory, num_batches=1, module_filter=lambda n, m: False)


def test_modes_restored_and_eval_during_calibration():
    model = KwModel()
    model.train()
    model.head.eval()  # a mixed-mode model keeps its per-module modes
    seen = []
    model.drop.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    xs = batches(3)
    obs = calibrate(model, [{"input_ids": x} for x in xs], observer_factory=factory, num_batches=3,
                    module_filter=is_linear, progress=False)
    assert seen == [False] * 3  # dropout off while observing: ranges are the inference ranges
    assert model.training and model.proj.training and not model.head.training
    assert_range(obs["proj"], xs)
    assert len(model.drop._forward_pre_hooks) == 1  # the user's own hook is left alone


def test_errors_name_what_and_where_and_clean_up():
    model = mlp().train()
    kw = dict(observer_factory=factory, num_batches=10, module_filter=is_linear, progress=False)
    with pytest.raises(CalibrationError, match="no batches"):
        calibrate(model, [], **kw)
    bad_shape = batches(2) + [torch.randn(4, 5)]
    with pytest.raises(CalibrationError, match=r"batch 2 \(Tensor\[4, 5\] float32\).*Sequential.*RuntimeError"):
        calibrate(model, bad_shape, **kw)
    nan = batches(3)
    nan[1][0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"batch 1: input of module '0' \(Linear\).*1 NaN"):
        calibrate(model, nan, **kw)
    inf = batches(2)
    inf[0][1, 1] = float("inf")
    with pytest.raises(CalibrationError, match=r"batch 0: input of module '0' \(Linear\).*1 inf"):
        calibrate(model, inf, **kw)
    with torch.no_grad():
        model[0].weight[0] = float("inf")  # finite inputs, but inf reaches the second layer's observer
    with pytest.raises(CalibrationError, match=r"batch 0: input of module '2' \(Linear\)"):
        calibrate(model, batches(2), **kw)
    with pytest.raises(CalibrationError, match=r"batch 0 \(str\)"):
        calibrate(mlp(), ["text"], **kw)
    with pytest.raises(CalibrationError, match=r"dict\(input_ids=Tensor\[4, 6\] float32\).*TypeError"):
        calibrate(mlp(), [{"input_ids": torch.randn(4, 6)}], **kw)  # Sequential takes no keywords
    assert no_hooks(model) and model.training and all(m.training for m in model.modules())


def test_progress_to_stderr(capsys, monkeypatch):
    calibrate(mlp(), batches(20), observer_factory=factory, num_batches=20, module_filter=is_linear)
    assert "slimtorch calibration" in capsys.readouterr().err  # a tqdm bar
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # without tqdm: one line per tenth
    calibrate(mlp(), batches(20), observer_factory=factory, num_batches=20, module_filter=is_linear)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "slimtorch calibration: 20/20 batches" and len(err) == 10
    calibrate(mlp(), batches(3), observer_factory=factory, num_batches=3, module_filter=is_linear, progress=False)
    assert capsys.readouterr().err == ""


def test_to_device_and_describe_nested():
    from collections import namedtuple
    P = namedtuple("P", "x y")
    b = {"a": (torch.ones(2), [torch.zeros(1, 3)]), "p": P(torch.ones(1), 3), "s": "keep"}
    moved = to_device(b, torch.device("meta"))
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta"
    assert isinstance(moved["p"], P) and moved["p"].x.device.type == "meta" and moved["s"] == "keep"
    assert describe(b) == "dict(a=tuple(Tensor[2] float32, list(Tensor[1, 3] float32)), p=P(Tensor[1] float32, " \
                          "int), s=str)"


def test_batches_follow_the_model_device():
    model = mlp().to(torch.float64)  # stands in for another device: parameters decide where inputs go
    seen = []
    model[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].device))
    calibrate(model, [x.double() for x in batches(2)], observer_factory=factory, num_batches=2,
              module_filter=is_linear, progress=False)
    assert seen == [torch.device("cpu")] * 2
    if torch.cuda.is_available():  # runs where a GPU is present; CPU-only CI skips this branch
        m = mlp().cuda()
        obs = calibrate(m, batches(2), observer_factory=factory, num_batches=2, module_filter=is_linear,
                        progress=False)
        assert obs["0"].min_val.device.type == "cuda"
