"""slimtorch.llm.gptq on a random Linear fed correlated inputs: GPTQ beats round-to-nearest, stays on its grid, is
RTN exactly when the Hessian is diagonal, and every bad input is a clear error."""
import pytest
import torch

from slimtorch.errors import CalibrationError, ConfigError
from slimtorch.llm.gptq import (
    HessianAccumulator,
    check_enough_tokens,
    gptq_quantize,
    min_tokens_for,
)
from slimtorch.quantization.grid import WeightGrid, quantize_rtn
from slimtorch.quantization.grid import dequantize_groups as dequantize

IN, OUT, TOKENS = 128, 64, 4096


class Layer:
    """A Linear's weight and a source of its inputs: x = (z @ mix) * channel_scale, z standard normal, so the inputs
    are correlated and a few channels are much larger than the others (as in an LLM)."""

    def __init__(self, seed=0):
        self.gen = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(IN, IN, generator=self.gen) / IN ** 0.5 + 0.3 * torch.eye(IN)
        self.channel_scale = torch.exp(torch.randn(IN, generator=self.gen))
        self.weight = torch.randn(OUT, IN, generator=self.gen) * 0.05

    def inputs(self, tokens):
        return (torch.randn(tokens, IN, generator=self.gen) @ self.mix) * self.channel_scale

    def output_error(self, x, quantized):
        return float(((x @ self.weight.T - x @ quantized.T) ** 2).sum())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def layer():
    layer = Layer()
    layer.calibration = layer.inputs(TOKENS)
    layer.held_out = layer.inputs(TOKENS)
    accumulator = HessianAccumulator()
    accumulator.add(layer.calibration.reshape(4, -1, IN))  # [batch, tokens, in] as a Linear sees it
    layer.hessian = accumulator.hessian
    return layer


def rtn(weight, grid):
    q, scale, zero = quantize_rtn(weight, grid)
    return dequantize(q, scale, zero, grid.group_size)


GROUPED = [WeightGrid(4, symmetric, group) for symmetric in (True, False) for group in (32, None)]
ORDERS = [dict(), dict(static_groups=True), dict(act_order=True), dict(act_order=True, static_groups=True)]


def grid_id(grid):
    return f"int{grid.bits}-{'sym' if grid.symmetric else 'asym'}-{grid.group_size or 'channel'}"


def order_id(order):
    return "+".join(sorted(order)) or "plain"


# -- the Hessian --------------------------------------------------------------------------------------------------
def test_hessian_is_two_over_n_x_transpose_x_over_every_token():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 5, 8, generator=g), torch.randn(7, 8, generator=g), torch.randn(1, 3, 2, 8, generator=g)]
    accumulator = HessianAccumulator()
    for x in batches:
        accumulator.add(x.to(torch.bfloat16))
    rows = torch.cat([x.to(torch.bfloat16).float().reshape(-1, 8) for x in batches])
    assert accumulator.tokens == 10 + 7 + 6 == rows.shape[0] and accumulator.in_features == 8
    assert accumulator.hessian.dtype == torch.float32
    torch.testing.assert_close(accumulator.hessian, 2 / rows.shape[0] * rows.T @ rows, rtol=1e-5, atol=1e-6)
    accumulator.add(torch.zeros(0, 8))  # an empty batch changes nothing
    assert accumulator.tokens == 23


def test_hessian_accumulator_errors():
    with pytest.raises(CalibrationError, match="model.layers.0.mlp.up_proj: no input seen yet"):
        HessianAccumulator(where="model.layers.0.mlp.up_proj").hessian
    accumulator = HessianAccumulator(16, where="model.layers.0.mlp.up_proj")
    assert accumulator.tokens == 0 and torch.equal(accumulator.hessian, torch.zeros(16, 16))
    with pytest.raises(CalibrationError, match="up_proj: input of shape \\(4, 8\\) does not end in in_features 16"):
        accumulator.add(torch.zeros(4, 8))


def test_min_tokens_rule_and_message():
    assert min_tokens_for(4096) == 4096
    check_enough_tokens(4096, 4096, "x")
    with pytest.raises(CalibrationError) as info:
        check_enough_tokens(100, 4096, "model.layers.2.mlp.down_proj")
    for part in ("model.layers.2.mlp.down_proj", "saw 100 calibration tokens", "at least 4096", "rtn"):
        assert part in str(info.value)


def test_why_min_tokens_is_in_features():
    """Below in_features tokens the Hessian is rank deficient: GPTQ fits the tokens it saw and is worse than RTN on
    other tokens; from in_features tokens on it beats RTN there too."""
    layer = Layer(seed=1)
    held_out = layer.inputs(2048)
    grid = WeightGrid(4, True, 32)
    baseline = layer.output_error(held_out, rtn(layer.weight, grid))
    ratios = {}
    for tokens in (IN // 4, 2 * IN):
        accumulator = HessianAccumulator()
        accumulator.add(layer.inputs(tokens))
        result = gptq_quantize(layer.weight, accumulator.hessian, grid)
        ratios[tokens] = layer.output_error(held_out, result.quantized) / baseline
    assert ratios[IN // 4] > 1.0 and ratios[2 * IN] < 0.8, ratios
    with pytest.raises(CalibrationError, match=f"at least {IN}"):
        gptq_quantize(layer.weight, accumulator.hessian, grid, tokens=IN // 4)


# -- GPTQ against RTN -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ORDERS, ids=order_id)
@pytest.mark.parametrize("grid", GROUPED, ids=grid_id)
def test_gptq_output_error_is_clearly_below_rtns(layer, grid, order):
    result = gptq_quantize(layer.weight, layer.hessian, grid, tokens=TOKENS, **order)
    for x in (layer.calibration, layer.held_out):
        ratio = layer.output_error(x, result.quantized) / layer.output_error(x, rtn(layer.weight, grid))
        assert ratio < 0.8, ratio  # ~0.4 in order, ~0.3 with act order


@pytest.mark.parametrize("order", ORDERS, ids=order_id)
@pytest.mark.parametrize("grid", GROUPED + [WeightGrid(8, True, 32), WeightGrid(8, False, None)], ids=grid_id)
def test_result_lies_exactly_on_its_grid(layer, grid, order):
    result = gptq_quantize(layer.weight, layer.hessian, grid, **order)
    groups = 1 if grid.group_size is None else IN // grid.group_size
    assert result.q.shape == (OUT, IN) and result.q.dtype == grid.storage_dtype
    assert result.scale.shape == result.zero.shape == (OUT, groups)
    assert result.scale.dtype == torch.float32 and result.zero.dtype == torch.int32
    assert grid.qmin <= int(result.q.min()) and int(result.q.max()) <= grid.qmax
    if grid.symmetric:
        assert not result.zero.any()
    back = dequantize(result.q, result.scale, result.zero, grid.group_size, g_idx=result.g_idx)
    assert torch.equal(back, result.quantized)


def test_error_is_the_dampened_quadratic_loss(layer):
    """error = 1/2 tr((W - Q) H_damped (W - Q)^T): the sum of the per-column OBS losses is the total loss."""
    for order in ORDERS:
        result = gptq_quantize(layer.weight, layer.hessian, WeightGrid(4, True, 32), dampening=0.01, **order)
        damped = layer.hessian + 0.01 * layer.hessian.diagonal().mean() * torch.eye(IN)
        delta = (result.quantized - layer.weight).double()
        expected = 0.5 * float(torch.einsum("oi,ij,oj->", delta, damped.double(), delta))
        assert result.error == pytest.approx(expected, rel=1e-3), order


# -- exactness --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [WeightGrid(b, s, g) for b in (4, 8) for s in (True, False) for g in (32, None)],
                         ids=grid_id)
def test_diagonal_hessian_is_rtn_exactly(layer, grid):
    """A diagonal H has a diagonal inverse Cholesky factor: no error reaches another column, so GPTQ is RTN."""
    q, scale, zero = quantize_rtn(layer.weight, grid)
    diagonal = torch.diag(torch.rand(IN, generator=torch.Generator().manual_seed(4)) + 0.5)
    for hessian in (torch.eye(IN), diagonal):
        result = gptq_quantize(layer.weight, hessian, grid, block_size=24)
        assert torch.equal(result.q, q) and torch.equal(result.scale, scale) and torch.equal(result.zero, zero)
        assert result.g_idx is None
    # with H = I the loss is the weights' squared error times (1 + dampening)
    result = gptq_quantize(layer.weight, torch.eye(IN), grid, dampening=0.01)
    squared = float(((dequantize(q, scale, zero, grid.group_size) - layer.weight) ** 2).sum())
    assert result.error == pytest.approx(0.5 * 1.01 * squared, rel=1e-5)


def test_static_groups_use_the_original_weights_scales(layer):
    grid = WeightGrid(4, False, 32)
    _, scale, zero = quantize_rtn(layer.weight, grid)
    for act_order in (False, True):
        result = gptq_quantize(layer.weight, layer.hessian, grid, act_order=act_order, static_groups=True)
        assert torch.equal(result.scale, scale) and torch.equal(result.zero, zero)
        assert result.g_idx is None  # groups stay runs of input columns: nothing to store


def test_act_order_groups_follow_the_activation_order(layer):
    grid = WeightGrid(4, True, 32)
    result = gptq_quantize(layer.weight, layer.hessian, grid, act_order=True)
    g_idx = result.g_idx
    assert g_idx.dtype == torch.int32 and g_idx.shape == (IN,)
    assert torch.bincount(g_idx.long(), minlength=4).tolist() == [32] * 4  # a valid, equal-sized group assignment
    order = torch.argsort(layer.hessian.diagonal(), descending=True, stable=True)
    assert torch.equal(g_idx[order].long(), torch.arange(IN) // 32)  # group k = the k-th 32 most active inputs
    # the dequantized weight uses each column's own group, not column // 32
    back = dequantize(result.q, result.scale, result.zero, 32, g_idx=g_idx)
    assert torch.equal(back, result.quantized)
    assert not torch.equal(dequantize(result.q, result.scale, result.zero, 32), result.quantized)
    # per channel there is one group: no g_idx
    assert gptq_quantize(layer.weight, layer.hessian, WeightGrid(4, True, None), act_order=True).g_idx is None


@pytest.mark.parametrize("order", ORDERS, ids=order_id)
@pytest.mark.parametrize("grid", [WeightGrid(4, True, 32), WeightGrid(4, False, 32), WeightGrid(4, True, None)],
                         ids=grid_id)
def test_block_size_changes_nothing_but_float_rounding(layer, grid, order):
    """Blocks of 8 (groups span 4 blocks), 24 (groups straddle blocks) and 128 give the same quantization. Float
    rounding may flip an integer that sits on a rounding tie (the symmetric grid puts -amax exactly on -7.5), and the
    flip moves the later columns a little: a handful of integers, the same loss."""
    results = [gptq_quantize(layer.weight, layer.hessian, grid, block_size=b, **order) for b in (8, 24, 128)]
    reference = results[-1]
    for other in results[:-1]:
        assert (other.q != reference.q).float().mean() < 0.005
        assert other.error == pytest.approx(reference.error, rel=2e-3)
        assert layer.output_error(layer.calibration, other.quantized) == pytest.approx(
            layer.output_error(layer.calibration, reference.quantized), rel=5e-3)


# -- inputs that need care --------------------------------------------------------------------------------------
def test_dead_inputs_zero_their_weight_columns(layer):
    x = layer.calibration.clone()
    dead = [3, 17, 100]
    x[:, dead] = 0.0
    accumulator = HessianAccumulator()
    accumulator.add(x)
    for order in ORDERS:
        result = gptq_quantize(layer.weight, accumulator.hessian, WeightGrid(4, False, 32), **order)
        assert torch.all(result.quantized[:, dead] == 0)
        assert torch.isfinite(result.quantized).all() and result.quantized[:, [0, 1, 2]].any()


def test_preserve_zeros_keeps_a_pruned_weight_pruned(layer):
    sparse = layer.weight.clone()
    sparse[:, 1::2] = 0.0  # 50% pruned
    grid = WeightGrid(4, True, 32)
    kept = gptq_quantize(sparse, layer.hessian, grid, preserve_zeros=True)
    assert torch.all(kept.quantized[sparse == 0] == 0)
    moved = gptq_quantize(sparse, layer.hessian, grid)
    assert (moved.quantized[sparse == 0] != 0).float().mean() > 0.3  # the error feedback revives pruned weights


def test_low_precision_weight_keeps_its_dtype_and_inputs_are_untouched(layer):
    weight = layer.weight.to(torch.bfloat16)
    hessian = layer.hessian.clone()
    weight_before = weight.clone()
    result = gptq_quantize(weight, hessian, WeightGrid(4, True, 32), act_order=True)
    assert result.quantized.dtype == torch.bfloat16
    assert torch.equal(weight, weight_before) and torch.equal(hessian, layer.hessian)
    back = dequantize(result.q, result.scale, result.zero, 32, g_idx=result.g_idx)
    assert torch.equal(back.to(torch.bfloat16), result.quantized)


# -- errors -----------------------------------------------------------------------------------------------------
WHERE = "model.layers.5.self_attn.q_proj"


def test_hessian_not_positive_definite_says_what_to_do(layer):
    indefinite = torch.eye(IN)
    indefinite[0, 1] = indefinite[1, 0] = 2.0  # eigenvalue -1
    with pytest.raises(CalibrationError) as info:
        gptq_quantize(layer.weight, indefinite, WeightGrid(4, True, 32), dampening=0.0, where=WHERE)
    for part in (WHERE, "not positive definite", "more tokens", "larger dampening"):
        assert part in str(info.value)


@pytest.mark.parametrize("what", ["weight", "Hessian"])
def test_nan_or_inf_is_a_calibration_error(layer, what):
    weight, hessian = layer.weight.clone(), layer.hessian.clone()
    if what == "weight":
        weight[3, 4] = float("inf")
    else:
        hessian[5, 6] = float("nan")
    with pytest.raises(CalibrationError, match=f"{WHERE}: the {what} .* 1 NaN/inf"):
        gptq_quantize(weight, hessian, WeightGrid(4, True, 32), where=WHERE)


def test_no_calibration_token_is_an_error(layer):
    with pytest.raises(CalibrationError, match=f"{WHERE}: its Hessian is all zeros"):
        gptq_quantize(layer.weight, torch.zeros(IN, IN), WeightGrid(4, True, 32), where=WHERE)
    with pytest.raises(CalibrationError, match=f"{WHERE} saw 0 calibration tokens; GPTQ needs at least {IN}"):
        gptq_quantize(layer.weight, torch.zeros(IN, IN), WeightGrid(4, True, 32), tokens=0, where=WHERE)


def test_bad_arguments(layer):
    grid = WeightGrid(4, True, 32)
    with pytest.raises(ConfigError, match=f"{WHERE}: in_features 128 is not a multiple of group_size 48"):
        gptq_quantize(layer.weight, layer.hessian, WeightGrid(4, True, 48), where=WHERE)
    with pytest.raises(ConfigError, match="block_size"):
        gptq_quantize(layer.weight, layer.hessian, grid, block_size=0, where=WHERE)
    with pytest.raises(ConfigError, match="dampening"):
        gptq_quantize(layer.weight, layer.hessian, grid, dampening=-0.1, where=WHERE)
    with pytest.raises(CalibrationError, match=r"Hessian must be \[128, 128\]"):
        gptq_quantize(layer.weight, layer.hessian[:64, :64], grid, where=WHERE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpus_result(layer):
    grid = WeightGrid(4, True, 32)
    cpu = gptq_quantize(layer.weight, layer.hessian, grid, act_order=True)
    accumulator = HessianAccumulator()
    accumulator.add(layer.calibration.cuda().reshape(4, -1, IN))
    torch.testing.assert_close(accumulator.hessian.cpu(), layer.hessian, rtol=1e-4, atol=1e-4)
    gpu = gptq_quantize(layer.weight.cuda(), accumulator.hessian, grid, act_order=True)
    assert gpu.q.device.type == gpu.scale.device.type == gpu.quantized.device.type == "cuda"
    assert torch.equal(gpu.g_idx.cpu(), cpu.g_idx)
    assert (gpu.q.cpu() != cpu.q).float().mean() < 0.005
    assert gpu.error == pytest.approx(cpu.error, rel=2e-3)
