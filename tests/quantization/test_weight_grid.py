"""slimtorch.quantization.grid, weights in groups: the int4/int8 weight grid, exact on hand-made tensors, and its error
messages."""
import pytest
import torch

from slimtorch.errors import CalibrationError, ConfigError
from slimtorch.quantization.grid import (
    EPS,
    WeightGrid,
    check_group_size,
    group_count,
    quantize_rtn,
)
from slimtorch.quantization.grid import dequantize_groups as dequantize
from slimtorch.quantization.grid import row_qparams as qparams

GRIDS = [WeightGrid(bits, symmetric, group) for bits in (4, 8) for symmetric in (True, False) for group in (None, 16)]


def grid_id(grid):
    return f"int{grid.bits}-{'sym' if grid.symmetric else 'asym'}-{grid.group_size or 'channel'}"


def random_weight(out=12, inp=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[0, 3] = 0.9  # an outlier that sets its group's scale
    w[1, :] = w[1, :].abs()  # a row with no negative value
    w[2, :] = -w[2, :].abs()  # and one with no positive value
    w[3, ::3] = 0.0  # pruned weights
    return w.to(dtype)


def test_integer_ranges_and_storage():
    assert (WeightGrid(4, True, 128).qmin, WeightGrid(4, True, 128).qmax) == (-8, 7)
    assert (WeightGrid(4, False, 128).qmin, WeightGrid(4, False, 128).qmax) == (0, 15)
    assert (WeightGrid(8, True, None).qmin, WeightGrid(8, True, None).qmax) == (-128, 127)
    assert (WeightGrid(8, False, None).qmin, WeightGrid(8, False, None).qmax) == (0, 255)
    assert WeightGrid(4, False, 32).storage_dtype == torch.int8
    assert WeightGrid(8, False, 32).storage_dtype == torch.uint8  # 255 does not fit int8


@pytest.mark.parametrize("bits, group", [(3, None), (16, 32), (True, 32), (4, 0), (4, -1), (4, 2.0), (4, True)])
def test_bad_grid_is_a_config_error(bits, group):
    with pytest.raises(ConfigError, match="bits|group_size"):
        WeightGrid(bits, True, group)


def test_symmetric_int4_scale_is_amax_over_7_5_exactly():
    w = torch.tensor([[7.5, -3.2, 0.4, 1.6],
                      [-7.5, 2.5, 0.0, 1.0],
                      [0.75, 0.25, -0.375, 0.05]])
    q, scale, zero = quantize_rtn(w, WeightGrid(4, True, None))
    assert scale.dtype == torch.float32 and zero.dtype == torch.int32 and q.dtype == torch.int8
    assert torch.equal(scale, torch.tensor([[1.0], [1.0], [0.1]]))
    assert zero.tolist() == [[0], [0], [0]]
    # +amax lands on 7.5 -> 8 -> clipped to 7; -amax is -8; ties round half to even (2.5 -> 2)
    assert q[:2].tolist() == [[7, -3, 0, 2], [-8, 2, 0, 1]]
    assert q[2].tolist() == [7, 2, -4, 0]  # 0.75 / 0.1 = 7.5 -> 7, 0.25 / 0.1 = 2.5 -> 2, -3.75 -> -4, 0.5 -> 0


def test_asymmetric_int4_exact_values_and_range_through_zero():
    w = torch.tensor([[-3.0, 1.0, 12.0, 0.0],  # range 15 -> scale 1, zero 3
                      [2.0, 4.0, 15.0, 7.0],  # no negative value: min is taken as 0 -> zero 0
                      [-15.0, -1.0, -7.0, -2.0]])  # no positive value: max is taken as 0 -> zero 15
    q, scale, zero = quantize_rtn(w, WeightGrid(4, False, None))
    assert scale.flatten().tolist() == [1.0, 1.0, 1.0]
    assert zero.flatten().tolist() == [3, 0, 15]
    assert q.tolist() == [[0, 4, 15, 3], [2, 4, 15, 7], [0, 14, 8, 13]]
    assert torch.equal(dequantize(q, scale, zero, None), w)  # every value was on the grid
    s, z = qparams(w, WeightGrid(4, False, None))
    assert torch.equal(s, scale[:, 0]) and torch.equal(z, zero[:, 0])


@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
def test_zero_weights_stay_exactly_zero(grid):
    w = random_weight()
    w[:, 1::4] = 0.0
    q, scale, zero = quantize_rtn(w, grid)
    back = dequantize(q, scale, zero, grid.group_size)
    assert torch.all(back[w == 0] == 0)


@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
def test_zero_range_groups_are_finite(grid):
    w = torch.zeros(3, 32)
    w[1] = 0.25  # a constant row: its range still includes 0
    q, scale, zero = quantize_rtn(w, grid)
    assert torch.isfinite(scale).all() and (scale >= EPS).all()
    back = dequantize(q, scale, zero, grid.group_size)
    assert torch.equal(back[0], torch.zeros(32)) and torch.equal(back[2], torch.zeros(32))
    torch.testing.assert_close(back[1], w[1], rtol=0, atol=float(scale[1].max()) / 2)


def test_shapes_per_channel_and_groups():
    w = random_weight(6, 64)
    q, scale, zero = quantize_rtn(w, WeightGrid(4, True, None))
    assert q.shape == (6, 64) and scale.shape == (6, 1) and zero.shape == (6, 1)
    q, scale, zero = quantize_rtn(w, WeightGrid(4, False, 16))
    assert q.shape == (6, 64) and scale.shape == (6, 4) and zero.shape == (6, 4)
    assert group_count(64, WeightGrid(4, True, 16)) == 4 and group_count(64, WeightGrid(4, True, None)) == 1
    for g in range(4):  # each group's qparams are those of its own columns
        s, z = qparams(w[:, 16 * g:16 * (g + 1)], WeightGrid(4, False, 16))
        assert torch.equal(s, scale[:, g]) and torch.equal(z, zero[:, g])


@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
def test_round_trip_error_is_at_most_half_a_step(grid):
    """Every element (the clipped +amax included: 7.5 -> 7 is half a step) is within s/2 of its weight."""
    w = random_weight(16, 64, seed=1)
    q, scale, zero = quantize_rtn(w, grid)
    assert grid.qmin <= int(q.min()) and int(q.max()) <= grid.qmax
    assert q.dtype == grid.storage_dtype
    back = dequantize(q, scale, zero, grid.group_size)
    step = scale.repeat_interleave(64 // scale.shape[1], dim=1)
    assert torch.all((back - w).abs() <= step * (0.5 + 1e-5))
    # the steps are those of the grid: (max - min) of row 0's first group over qmax - qmin levels
    first = w[0, :64 // scale.shape[1]]
    span = 2 * first.abs().max() if grid.symmetric else first.max().clamp(min=0) - first.min().clamp(max=0)
    torch.testing.assert_close(scale[0, 0] * (grid.qmax - grid.qmin), span)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", [WeightGrid(4, True, 16), WeightGrid(4, False, None), WeightGrid(8, True, 32)],
                         ids=grid_id)
def test_low_precision_weights_give_their_float32_copys_scales(dtype, grid):
    w = random_weight(dtype=dtype)
    q, scale, zero = quantize_rtn(w, grid)
    q32, scale32, zero32 = quantize_rtn(w.float(), grid)
    assert scale.dtype == torch.float32
    assert torch.equal(scale, scale32) and torch.equal(zero, zero32) and torch.equal(q, q32)


def test_check_group_size_names_the_layer_and_the_sizes_that_work():
    grid = WeightGrid(4, True, 128)
    check_group_size(4096, grid, "model.layers.0.mlp.down_proj")
    check_group_size(576, WeightGrid(4, True, None), "x")  # per channel fits any width
    with pytest.raises(ConfigError) as info:
        check_group_size(576, grid, "model.layers.0.mlp.down_proj")
    message = str(info.value)
    for part in ("model.layers.0.mlp.down_proj", "576", "group_size 128", "64, 96, 144, 192 or 288",
                 "-1 (per channel)", "equal groups"):
        assert part in message, (part, message)
    with pytest.raises(ConfigError, match="in_features 100 .* use 10, 20, 25, 50 or 100"):
        group_count(100, grid, where="tiny")  # no 16-aligned divisor: the nearest divisors
    with pytest.raises(ConfigError, match="model.layers.3.self_attn.o_proj"):
        quantize_rtn(torch.zeros(4, 576), grid, where="model.layers.3.self_attn.o_proj")


def test_dequantize_follows_g_idx():
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-8, 8, (5, 12), generator=g).to(torch.int8)
    scale = torch.rand(5, 3, generator=g) + 0.1
    zero = torch.randint(-2, 3, (5, 3), generator=g).to(torch.int32)
    g_idx = torch.tensor([2, 0, 1, 1, 0, 2, 2, 1, 0, 0, 1, 2], dtype=torch.int32)
    back = dequantize(q, scale, zero, 4, g_idx=g_idx)
    for j in range(12):
        expected = (q[:, j].float() - zero[:, g_idx[j]].float()) * scale[:, g_idx[j]]
        assert torch.equal(back[:, j], expected)
    # the identity g_idx is the plain group layout
    identity = torch.arange(12, dtype=torch.int32) // 4
    assert torch.equal(dequantize(q, scale, zero, 4, g_idx=identity), dequantize(q, scale, zero, 4))


def test_dequantize_rejects_qparams_that_do_not_fit():
    q = torch.zeros(4, 32, dtype=torch.int8)
    with pytest.raises(CalibrationError, match="needs 2 groups"):
        dequantize(q, torch.ones(4, 4), torch.zeros(4, 4, dtype=torch.int32), 16)
    with pytest.raises(CalibrationError, match="scale, zero"):
        dequantize(q, torch.ones(4, 2), torch.zeros(4, 1, dtype=torch.int32), 16)
    with pytest.raises(CalibrationError, match="g_idx"):
        dequantize(q, torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.int32), 16,
                   g_idx=torch.full((32,), 2, dtype=torch.int32))


def test_non_finite_weight_is_a_calibration_error_naming_the_layer():
    w = random_weight()
    w[2, 5] = float("nan")
    with pytest.raises(CalibrationError, match="model.layers.1.mlp.up_proj.*1 NaN/inf"):
        quantize_rtn(w, WeightGrid(4, True, 16), where="model.layers.1.mlp.up_proj")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_follows_the_input_device_and_matches_cpu():
    w = random_weight(64, 128)
    grid = WeightGrid(4, False, 32)
    q, scale, zero = quantize_rtn(w.cuda(), grid)
    assert q.device.type == scale.device.type == zero.device.type == "cuda"
    q_cpu, scale_cpu, zero_cpu = quantize_rtn(w, grid)
    assert torch.equal(q.cpu(), q_cpu) and torch.equal(zero.cpu(), zero_cpu)
    torch.testing.assert_close(scale.cpu(), scale_cpu, rtol=1e-6, atol=0)
