"""BatchNorm folding: the pure formula, pair discovery on real CNNs, BNs that must stay, the output check, modes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtorch.errors import ConfigError
from slimtorch.quantization import fold as fold_mod
from slimtorch.quantization.fold import FoldResult, fold_batchnorm, fold_conv_bn_weights

from .cnn_data import digits_data, image_crops, load_efficientnet_lite0, torch_threads, train_digits_cnn


def random_bn(c: int, affine: bool = True, kind=nn.BatchNorm2d) -> nn.Module:
    """An eval-mode BN with non-trivial running statistics and affine parameters."""
    bn = kind(c, affine=affine, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c))
        bn.running_var.copy_(torch.rand(c) * 3 + 0.05)
        if affine:
            bn.weight.copy_(torch.randn(c))
            bn.bias.copy_(torch.randn(c))
    return bn.eval()


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- the formula --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups,bias,affine", [(1, True, True), (1, False, True), (4, False, True), (8, True, False)])
def test_fold_conv2d_weights_match_conv_then_bn(groups, bias, affine):
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=bias).double()
    bn = random_bn(8, affine).double()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    w, b = fold_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                bn.weight if affine else None, bn.bias if affine else None)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1, groups=groups), bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_fold_linear_and_conv1d_weights():
    lin, bn1 = nn.Linear(5, 6), random_bn(6, kind=nn.BatchNorm1d)
    x = torch.randn(4, 5)
    w, b = fold_conv_bn_weights(lin.weight, lin.bias, bn1.running_mean, bn1.running_var, bn1.eps, bn1.weight, bn1.bias)
    torch.testing.assert_close(F.linear(x, w, b), bn1(lin(x)), rtol=1e-5, atol=1e-5)
    conv, bn2 = nn.Conv1d(3, 6, 3, bias=False), random_bn(6, kind=nn.BatchNorm1d)
    x = torch.randn(2, 3, 9)
    w, b = fold_conv_bn_weights(conv.weight, None, bn2.running_mean, bn2.running_var, bn2.eps, bn2.weight, bn2.bias)
    assert w.dtype == torch.float32 and b.shape == (6,)
    torch.testing.assert_close(F.conv1d(x, w, b), bn2(conv(x)), rtol=1e-5, atol=1e-5)


def test_fold_weights_channel_mismatch_is_config_error():
    with pytest.raises(ConfigError, match="4 channels.*shape \\(6, 3\\)"):
        fold_conv_bn_weights(torch.randn(6, 3), None, torch.zeros(4), torch.ones(4), 1e-5, None, None)


# -- real models --------------------------------------------------------------------------------------------------
def test_digits_cnn_folds_both_bns_in_place_and_keeps_the_source_intact():
    model = train_digits_cnn()
    pristine = copy.deepcopy(model)
    x = digits_data().x_test
    model.train()  # the caller's mode must survive, and a train-mode BN forward would move the running stats
    folded = copy.deepcopy(model)
    stem_weight = folded[0].weight
    pairs = fold_batchnorm(folded, x[:8])
    assert isinstance(pairs, FoldResult) and pairs == [("0", "1"), ("3", "4")] and pairs.skipped == {}
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)
    assert folded[0].bias is not None and folded[0].weight is stem_weight  # bias added, parameter object kept
    assert all(m.training for m in folded.modules()) and all(m.training for m in model.modules())
    assert state_equal(model, pristine)
    folded.eval(), model.eval()
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-5


def test_efficientnet_lite0_folds_every_bn():
    model = load_efficientnet_lite0()
    pristine = copy.deepcopy(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = image_crops(4, seed=3)
    folded = copy.deepcopy(model)
    with torch_threads(1):
        pairs = fold_batchnorm(folded, x[:2])
        assert len(pairs) == n_bn == 49 and pairs.skipped == {}
        assert ("_conv_stem", "_bn0") in pairs and ("_blocks.3._depthwise_conv", "_blocks.3._bn1") in pairs
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            assert rel_err(folded(x), model(x)) < 1e-5
    assert state_equal(model, pristine) and not model.training


# -- BNs that must stay -------------------------------------------------------------------------------------------
class Residual(nn.Module):
    """conv -> bn, but the pre-BN conv output is also added back: folding would change the skip path."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), random_bn(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Mixed(nn.Module):
    """One foldable pair and every kind of BN that is not."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), random_bn(4)
        self.bn_after_relu = random_bn(4)
        self.bn_input = random_bn(3)  # normalizes the model input: no producer
        self.conv2, self.bn_batch_stats = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.unused_bn = random_bn(4)
        self.fc, self.bn_fc = nn.Linear(4, 5), random_bn(5, kind=nn.BatchNorm1d)

    def forward(self, x):
        x = self.bn_input(x)
        x = self.bn_after_relu(torch.relu(self.bn1(self.conv1(x))))
        x = self.bn_batch_stats(self.conv2(x))
        return self.bn_fc(self.fc(x.mean((2, 3))))


def test_unfoldable_bns_are_left_alone_and_reported():
    model = Mixed().eval()
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    pairs = fold_batchnorm(model, x)
    assert pairs == [("conv1", "bn1"), ("fc", "bn_fc")]
    sk = pairs.skipped
    assert set(sk) == {"bn_after_relu", "bn_input", "bn_batch_stats", "unused_bn"}
    assert "not the direct output" in sk["bn_after_relu"] and "not the direct output" in sk["bn_input"]
    assert "track_running_stats=False" in sk["bn_batch_stats"] and "not called" in sk["unused_bn"]
    assert isinstance(model.bn_after_relu, nn.BatchNorm2d) and isinstance(model.bn1, nn.Identity)
    with torch.no_grad():
        assert rel_err(model(x), ref) < 1e-5


def test_conv_output_read_elsewhere_is_not_folded():
    model = Residual().eval()
    pairs = fold_batchnorm(model, torch.randn(2, 4, 5, 5))
    assert pairs == [] and "also read by" in pairs.skipped["bn"] and "add" in pairs.skipped["bn"]
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_conv_output_returned_by_the_model_is_not_folded():
    class TwoOutputs(Residual):
        def forward(self, x):
            y = self.conv(x)
            return self.bn(y), y

    pairs = fold_batchnorm(TwoOutputs().eval(), torch.randn(2, 4, 5, 5))
    assert pairs == [] and "the model's output" in pairs.skipped["bn"]


def test_shared_conv_feeding_two_bns_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn_a, self.bn_b = nn.Conv2d(2, 2, 1), random_bn(2), random_bn(2)

        def forward(self, x):
            return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))

    pairs = fold_batchnorm(Shared().eval(), torch.randn(1, 2, 3, 3))
    assert pairs == [] and set(pairs.skipped) == {"bn_a", "bn_b"}


def test_linear_bn1d_on_3d_output_is_not_folded():
    # BatchNorm1d on [N, C, L] normalizes axis 1, but a Linear's features are on the last axis
    model = nn.Sequential(nn.Linear(4, 4), random_bn(4, kind=nn.BatchNorm1d)).eval()
    pairs = fold_batchnorm(model, torch.randn(2, 4, 4))
    assert pairs == [] and "last axis" in pairs.skipped["1"]


# -- the output check ---------------------------------------------------------------------------------------------
def test_a_fold_that_changes_the_output_is_reverted(monkeypatch):
    # pretend discovery missed the residual read: the output check must catch the fold and undo it
    monkeypatch.setattr(fold_mod, "_why_not", lambda *a, **k: None)
    model = Residual().eval()
    pristine = copy.deepcopy(model)
    pairs = fold_batchnorm(model, torch.randn(2, 4, 5, 5))
    assert pairs == [] and "changed the model output" in pairs.skipped["bn"]
    assert isinstance(model.bn, nn.BatchNorm2d) and state_equal(model, pristine)


def test_nondeterministic_model_cannot_be_verified(monkeypatch):
    class Noisy(Residual):
        def forward(self, x):
            return super().forward(x) + torch.rand_like(x)

    monkeypatch.setattr(fold_mod, "_why_not", lambda *a, **k: None)
    with pytest.raises(ConfigError, match="deterministic"):
        fold_batchnorm(Noisy().eval(), torch.randn(1, 4, 3, 3))


# -- inputs, modes, errors ----------------------------------------------------------------------------------------
class KwNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv1d(2, 3, 3), random_bn(3, kind=nn.BatchNorm1d)

    def forward(self, signal, gain=1.0):
        return {"out": self.bn(self.conv(signal)) * gain}


@pytest.mark.parametrize("how", ["tuple", "dict", "callable"])
def test_example_input_forms(how):
    x = torch.randn(2, 2, 8)
    inputs = {"tuple": (x, 2.0), "dict": {"signal": x, "gain": 2.0}, "callable": lambda m: m(x, gain=2.0)}[how]
    model = KwNet().eval()
    ref = model(x)["out"]
    assert fold_batchnorm(model, inputs) == [("conv", "bn")]
    torch.testing.assert_close(model(x)["out"], ref, rtol=1e-5, atol=1e-5)


def test_modes_restored_per_module_and_running_stats_untouched():
    model = Mixed()
    model.train()
    model.conv2.eval()  # a frozen part must stay frozen
    before = model.bn_after_relu.running_mean.clone()
    fold_batchnorm(model, torch.randn(2, 3, 6, 6))
    assert not model.conv2.training and model.conv1.training and model.bn_after_relu.training
    assert torch.equal(model.bn_after_relu.running_mean, before)  # the example forward ran in eval mode


def test_model_without_bn_is_not_run():
    model = nn.Sequential(nn.Linear(2, 2))
    assert fold_batchnorm(model, lambda m: pytest.fail("no BN: no forward needed")) == []


def test_forward_that_fails_is_a_config_error():
    with pytest.raises(ConfigError, match="example forward of Sequential failed"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.randn(1, 5, 2, 2))


def test_bad_input_type():
    with pytest.raises(TypeError, match="example inputs"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fold_on_cuda():
    model = train_digits_cnn().cuda()
    x = digits_data().x_test[:16]
    ref = model(x.cuda())
    pairs = fold_batchnorm(model, x)  # cpu inputs follow the model to its device
    assert len(pairs) == 2 and model[0].bias.device.type == "cuda"
    assert rel_err(model(x.cuda()), ref) < 1e-5
