"""Layer surgery: the shrunk layers compute exactly the kept channels of the originals, and folding the constant
that a removed unit carried keeps the consumer's output exact."""
import pytest
import torch
from torch import nn

from slimtorch.slimming.surgery import (
    fold_constant_inputs,
    shrink_batchnorm,
    shrink_conv,
    shrink_linear,
    zero_rows,
)


def test_shrunk_linear_pair_equals_the_masked_pair():
    torch.manual_seed(0)
    up, down = nn.Linear(8, 16), nn.Linear(16, 8)
    dropped = torch.tensor([1, 4, 5, 11])
    keep = torch.tensor([i for i in range(16) if i not in dropped.tolist()])
    with torch.no_grad():  # the masked model: the units' rows and biases are zero
        up.weight[dropped] = 0
        up.bias[dropped] = 0
    x = torch.randn(3, 8)
    masked = down(torch.relu(up(x)))
    slim = shrink_linear(down, keep_in=keep)(torch.relu(shrink_linear(up, keep_out=keep)(x)))
    torch.testing.assert_close(slim, masked, rtol=1e-6, atol=1e-6)
    assert up.weight.shape == (16, 8)  # the originals are untouched


def test_a_unit_with_zero_weights_but_a_bias_folds_into_the_consumer():
    torch.manual_seed(1)
    up, down = nn.Linear(6, 10), nn.Linear(10, 4)
    dropped = torch.tensor([0, 7])
    with torch.no_grad():
        up.weight[dropped] = 0  # bias kept: the unit outputs gelu(b) for every token
    x = torch.randn(5, 6)
    masked = down(nn.functional.gelu(up(x)))
    keep = torch.tensor([i for i in range(10) if i not in dropped.tolist()])
    fold_constant_inputs(down, dropped, nn.functional.gelu(up.bias[dropped]))
    slim = shrink_linear(down, keep_in=keep)(nn.functional.gelu(shrink_linear(up, keep_out=keep)(x)))
    torch.testing.assert_close(slim, masked, rtol=1e-5, atol=1e-6)


def test_folding_creates_a_bias_only_when_needed():
    consumer = nn.Linear(4, 3, bias=False)
    fold_constant_inputs(consumer, torch.tensor([2]), torch.zeros(1))
    assert consumer.bias is None
    fold_constant_inputs(consumer, torch.tensor([2]), torch.ones(1))
    torch.testing.assert_close(consumer.bias.detach(), consumer.weight.detach()[:, 2])


def test_conv_batchnorm_conv_chain_shrinks_exactly():
    torch.manual_seed(2)
    conv1, bn, conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 5, 3, padding=1)
    bn.eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        dropped = torch.tensor([2, 3, 6])
        conv1.weight[dropped] = 0
        conv1.bias[dropped] = 0
        bn.weight[dropped] = 0  # the unit's BN output is then its bias: zero it too, as channel pruning does
        bn.bias[dropped] = 0
    keep = torch.tensor([0, 1, 4, 5, 7])
    x = torch.randn(2, 3, 9, 9)
    masked = conv2(torch.relu(bn(conv1(x))))
    hidden = shrink_batchnorm(bn, keep)(shrink_conv(conv1, keep_out=keep)(x))
    slim = shrink_conv(conv2, keep_in=keep)(torch.relu(hidden))
    torch.testing.assert_close(slim, masked, rtol=1e-5, atol=1e-5)
    assert not shrink_batchnorm(bn, keep).training


def test_depthwise_conv_keeps_its_channels_together():
    torch.manual_seed(3)
    dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    keep = torch.tensor([0, 2, 5])
    x = torch.randn(1, 6, 7, 7)
    small = shrink_conv(dw, keep_out=keep)
    assert small.groups == 3 and small.in_channels == small.out_channels == 3
    torch.testing.assert_close(small(x[:, keep]), dw(x)[:, keep])
    with pytest.raises(ValueError, match="same channels on both sides"):
        shrink_conv(dw, keep_out=keep, keep_in=torch.tensor([0, 1, 2]))


def test_bad_indices_are_refused():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="width 0"):
        shrink_linear(lin, keep_out=torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="increasing indices below 4"):
        shrink_linear(lin, keep_out=torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="increasing indices below 4"):
        shrink_linear(lin, keep_in=torch.tensor([0, 4]))


def test_zero_rows_and_columns():
    from slimtorch.slimming.units import zero_inputs

    conv = nn.Conv2d(4, 3, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[1] = 0
        conv.weight[:, 3] = 0
    assert zero_rows(conv.weight).tolist() == [False, True, False]
    assert zero_inputs(conv).tolist() == [False, False, False, True]
