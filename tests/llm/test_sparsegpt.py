"""slimtorch.llm.sparsegpt on a random Linear fed correlated inputs with a few large channels: exact N:M and
per-row structure for every method, SparseGPT < Wanda < magnitude in output error, and the edge cases."""
import pytest
import torch

from slimtorch.config.patterns import NMPattern
from slimtorch.errors import ConfigError
from slimtorch.llm.gptq import HessianAccumulator
from slimtorch.llm.sparsegpt import magnitude_prune, sparsegpt_prune, wanda_prune

from .test_gptq import IN, Layer

pytestmark = pytest.mark.usefixtures("one_thread")
TWO_FOUR, FOUR_EIGHT = NMPattern(2, 4), NMPattern(4, 8)


def hessian_of(x):
    acc = HessianAccumulator()
    acc.add(x)
    return acc.hessian


@pytest.fixture(scope="module")
def layer():
    layer = Layer(seed=3)
    calibration = layer.inputs(4096)
    return layer, calibration, hessian_of(calibration), layer.inputs(2048)


def prune_all(layer, target):
    layer, _, H, _ = layer
    return {"magnitude": magnitude_prune(layer.weight, target),
            "wanda": wanda_prune(layer.weight, H, target),
            "sparsegpt": sparsegpt_prune(layer.weight, H, target, block_size=32)}


@pytest.mark.parametrize("target", [TWO_FOUR, FOUR_EIGHT], ids=str)
def test_n_m_structure_is_exact_for_every_method(layer, target):
    for method, pruned in prune_all(layer, target).items():
        groups = pruned.reshape(pruned.shape[0], -1, target.m)
        nonzero = (groups != 0).sum(dim=2)
        assert bool((nonzero == target.n).all()), method  # random weights: no weight is 0 by chance


def test_unstructured_ratio_is_exact_in_every_row(layer):
    for method, pruned in prune_all(layer, 0.5).items():
        assert ((pruned == 0).sum(dim=1) == IN // 2).all(), method


@pytest.mark.parametrize("target", [TWO_FOUR, FOUR_EIGHT, 0.5], ids=str)
def test_held_out_output_error_sparsegpt_below_wanda_below_magnitude(layer, target):
    model, _, _, held_out = layer
    errors = {m: model.output_error(held_out, w) for m, w in prune_all(layer, target).items()}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors


def test_kept_weights_are_the_originals_for_wanda_and_magnitude_only(layer):
    model, _, H, _ = layer
    for pruned, changed in ((magnitude_prune(model.weight, TWO_FOUR), False),
                            (wanda_prune(model.weight, H, TWO_FOUR), False),
                            (sparsegpt_prune(model.weight, H, TWO_FOUR), True)):
        kept = pruned != 0
        assert torch.equal(pruned[kept], model.weight[kept]) != changed


def test_wanda_with_equal_input_norms_is_magnitude(layer):
    model, *_ = layer
    torch.testing.assert_close(wanda_prune(model.weight, torch.eye(IN) * 3.0, TWO_FOUR),
                               magnitude_prune(model.weight, TWO_FOUR), rtol=0, atol=0)


def test_nothing_to_prune_leaves_the_weight(layer):
    model, _, H, _ = layer
    torch.testing.assert_close(sparsegpt_prune(model.weight, H, 0.0), model.weight, rtol=0, atol=1e-6)


def test_bad_targets_are_errors(layer):
    model, _, H, _ = layer
    with pytest.raises(ConfigError, match=r"q_proj: in_features 128 is not a multiple of 3"):
        sparsegpt_prune(model.weight, H, NMPattern(2, 3), where="q_proj")
    with pytest.raises(ConfigError, match="block_size 30 must be a multiple of the pattern's m"):
        sparsegpt_prune(model.weight, H, TWO_FOUR, block_size=30)
    with pytest.raises(ConfigError, match=r"fraction in \[0, 1\)"):
        wanda_prune(model.weight, H, 1.0)


def test_column_pruning_removes_the_same_whole_columns_in_every_row_and_obs_compensates_best(layer):
    """Whole input columns (FFN units seen from the down projection): exactly 0.25 * in zero columns for every
    method; structured OBS (sparsegpt) updates the kept columns and leaves the smallest held-out output error."""
    from slimtorch.llm.sparsegpt import Columns, prune_columns

    model, _, H, held_out = layer
    target = Columns(0.25)
    pruned = {m: prune_columns(model.weight, H, target, m) for m in ("magnitude", "wanda", "sparsegpt")}
    for method, w in pruned.items():
        zero_columns = (w == 0).all(dim=0)
        assert int(zero_columns.sum()) == IN // 4, method
        assert int((w == 0).sum()) == (IN // 4) * w.shape[0], method  # nothing else is zero
    kept = ~(pruned["wanda"] == 0).all(dim=0)
    assert torch.equal(pruned["wanda"][:, kept], model.weight[:, kept])  # wanda and magnitude leave the rest alone
    errors = {m: model.output_error(held_out, w) for m, w in pruned.items()}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("target", [TWO_FOUR, FOUR_EIGHT, 0.37], ids=str)
def test_every_method_chooses_through_the_shared_masks_ties_and_rounding_included(target):
    """Integer weights (many equal scores) and a diagonal Hessian (SparseGPT's updates then change no other
    column): all three methods zero exactly what slimtorch.pruning.masks chooses from |w|, the earlier of equal
    scores first, and 0.37 of 24 inputs rounds to 9 per row (8.88), as the training-time pruner counts."""
    from slimtorch.pruning import masks

    w = torch.randint(-2, 3, (6, 24), generator=torch.Generator().manual_seed(0)).float()
    w[w == 0] = 3.0  # no zero weight, so zeros are exactly the pruned ones
    H = torch.eye(24) * 2.0
    keep = masks.nm_keep(w.abs(), target) if isinstance(target, NMPattern) else masks.row_mask(w.abs(), target)
    want = w * keep
    for method, pruned in (("magnitude", magnitude_prune(w, target)), ("wanda", wanda_prune(w, H, target)),
                           ("sparsegpt", sparsegpt_prune(w, H, target, block_size=24))):
        assert torch.equal(pruned, want), method
    if not isinstance(target, NMPattern):
        assert (want == 0).sum(dim=1).tolist() == [9] * 6


def test_column_count_rounds_to_nearest():
    from slimtorch.llm.sparsegpt import Columns, prune_columns

    w = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    for sparsity, columns in ((0.37, 4), (0.34, 3), (0.25, 3)):  # 3.7, 3.4 and 2.5 (ties up)
        pruned = prune_columns(w, None, Columns(sparsity), "magnitude")
        assert int((pruned == 0).all(dim=0).sum()) == columns, sparsity
