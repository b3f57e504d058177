"""Pure mask math: exact structure, exact counts, layouts, determinism."""
import math

import pytest
import torch

from slimtorch.config.patterns import BlockPattern, NMPattern, parse_pattern
from slimtorch.pruning import masks


def _scores(out, red, seed=0):
    return torch.rand(out, red, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern", ["4x1", "1x4", "2x8", "1x1", "8x8", "channelx1", "1xchannel", "16x2"])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_block_mask_drops_whole_blocks_and_exact_count(pattern, sparsity):
    p = parse_pattern(pattern)
    scores = _scores(32, 64)
    keep = masks.block_mask(scores, p, sparsity)
    rows, cols = masks.block_sides(p, 32, 64)
    per_block = keep.reshape(32 // rows, rows, 64 // cols, cols).sum(dim=(1, 3))
    assert ((per_block == 0) | (per_block == rows * cols)).all()
    n_blocks = per_block.numel()
    dropped = int((per_block == 0).sum())
    assert dropped == masks.pruned_count(sparsity, n_blocks)
    assert abs(dropped / n_blocks - sparsity) <= 0.5 / n_blocks + 1e-12
    assert masks.pattern_holds(keep, p)


def test_block_mask_drops_the_lowest_mean_blocks():
    scores = torch.tensor([[1.0, 9.0], [2.0, 8.0], [3.0, 0.5], [4.0, 0.4]])
    # blocks: col0 rows0-1 (1.5), rows2-3 (3.5); col1: 8.5, 0.45
    keep = masks.block_mask(scores, BlockPattern(2, 1), 0.5)
    assert keep.tolist() == [[False, True], [False, True], [True, False], [True, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 2), (3, 8)])
def test_nm_mask_full_sparsity_every_group(n, m):
    p = NMPattern(n, m)
    scores = _scores(16, 64, seed=n * m)
    keep = masks.nm_mask(scores, p, 1 - n / m)
    groups = keep.reshape(-1, m)
    assert (groups.sum(dim=1) == n).all()
    # the kept weights are the top-n scores of their group
    top = torch.topk(scores.reshape(-1, m), n, dim=1).indices
    assert torch.equal(torch.zeros_like(groups).scatter_(1, top, True), groups)
    assert masks.pattern_holds(keep, p)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.4, 0.5])
def test_nm_mask_partial_makes_only_a_share_of_groups_sparse(sparsity):
    p = NMPattern(2, 4)
    scores = _scores(32, 32, seed=3)
    keep = masks.nm_mask(scores, p, sparsity)
    counts = keep.reshape(-1, 4).sum(dim=1)
    assert set(counts.unique().tolist()) <= {2, 4}
    n_sparse = int((counts == 2).sum())
    assert n_sparse == masks.pruned_count(sparsity / 0.5, counts.numel())
    assert masks.pattern_holds(keep, p, dense_groups_allowed=True)
    assert masks.pattern_holds(keep, p) == (sparsity == 0.5)


def test_nm_mask_sparsifies_the_clearest_groups_first():
    # group A scores alike (its 2:4 choice is a coin toss), group B has two clear winners: B goes first,
    # although A's dropped weights score less in total
    scores = torch.tensor([[0.1, 0.1, 0.1, 0.1, 10.0, 1.0, 10.0, 1.0]])
    keep = masks.nm_mask(scores, NMPattern(2, 4), 0.25)
    assert keep.tolist() == [[True] * 4 + [True, False, True, False]]
    assert masks.nm_mask(scores, NMPattern(2, 4), 0.5).sum() == 4


def test_nm_mask_cheapest_takes_the_groups_whose_dropped_weights_score_least():
    # group A is the less clear one (0.2 / 0.3), but by cost it goes first (0.3 dropped against B's 2.0), as a
    # global ranking counts the groups
    scores = torch.tensor([[0.1, 0.3, 0.2, 0.4, 10.0, 1.0, 10.0, 1.0]])
    keep = masks.nm_mask(scores, NMPattern(2, 4), 0.25, choose="cheapest")
    assert keep.tolist() == [[False, True, False, True] + [True] * 4]
    assert masks.nm_mask(scores, NMPattern(2, 4), 0.25).tolist() == [[True] * 4 + [True, False, True, False]]
    assert masks.compute_mask(scores, NMPattern(2, 4), 0.25, nm_choose="cheapest").tolist() == keep.tolist()


def test_ties_are_deterministic():
    scores = torch.ones(64, 64)
    a = masks.block_mask(scores, BlockPattern(4, 1), 0.5)
    b = masks.block_mask(scores.clone(), BlockPattern(4, 1), 0.5)
    assert torch.equal(a, b)
    c = masks.nm_mask(scores, NMPattern(2, 4), 0.5)
    assert torch.equal(c, masks.nm_mask(scores.clone(), NMPattern(2, 4), 0.5))


@pytest.mark.parametrize("layout,shape", [
    (masks.LINEAR, (6, 8)), (masks.TRANSPOSED, (8, 6)), (masks.CONV, (6, 4, 3, 3)), (masks.CONV, (6, 8, 5)),
])
def test_matrix_view_round_trip(layout, shape):
    w = torch.randn(*shape)
    m = masks.to_matrix(w, layout)
    assert m.shape[0] == (shape[1] if layout == masks.TRANSPOSED else shape[0])
    assert torch.equal(masks.from_matrix(m, w.shape, layout), w)


def test_conv_groups_run_along_input_channels_at_one_kernel_position():
    w = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2)  # [out, in, kh, kw]
    m = masks.to_matrix(w, masks.CONV)
    # first 4 entries of a row: all input channels at kernel position (0, 0)
    assert m[0, :4].tolist() == w[0, :, 0, 0].tolist()
    assert m[1, 4:8].tolist() == w[1, :, 0, 1].tolist()


@pytest.mark.parametrize("pattern,shape,in_g,problem", [
    ("2:4", (8, 6), 6, "multiple of M=4"),
    ("4x1", (6, 8), 8, "block height 4"),
    ("1x4", (8, 6), 6, "block width 4"),
    ("2:4", (8, 9), 1, "multiple of M=4"),       # depthwise 3x3 conv: 1 input channel per group
    ("4x1", (8, 8), 8, None),
    ("channelx1", (7, 8), 8, None),
    ("1xchannel", (7, 9), 9, None),
])
def test_fit_problem(pattern, shape, in_g, problem):
    got = masks.fit_problem(parse_pattern(pattern), shape[0], shape[1], in_g)
    if problem is None:
        assert got is None
    else:
        assert problem in got


def test_pattern_holds_rejects_broken_structure():
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[0, 0] = False  # a 4x1 block with one zero
    assert not masks.pattern_holds(keep, BlockPattern(4, 1))
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[0, :1] = False  # 3 of 4 kept
    assert not masks.pattern_holds(keep, NMPattern(2, 4))


def test_pruned_count_rounds_to_nearest():
    assert masks.pruned_count(0.9, 10) == 9
    assert masks.pruned_count(0.25, 6) == 2  # 1.5 rounds up
    assert masks.pruned_count(1 - 0.1 ** 1, 147456) == round(0.9 * 147456)
    assert masks.pruned_count(1.2, 5) == 5 and masks.pruned_count(-0.1, 5) == 0
    assert math.isclose(masks.pruned_count(0.5, 1000) / 1000, 0.5)


@pytest.mark.parametrize("seed", range(5))
def test_lowest_k_equals_a_stable_sort(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 7, (500,), generator=g).float()  # many ties
    for k in (0, 1, 37, 250, 499, 500, 600):
        want = torch.zeros(500, dtype=torch.bool)
        want[torch.argsort(values, stable=True)[:k]] = True
        assert torch.equal(masks.lowest_k(values, k), want), k


def test_lowest_k_never_picks_nan_first():
    values = torch.tensor([float("nan"), 3.0, 1.0, 2.0])
    assert masks.lowest_k(values, 3).tolist() == [False, True, True, True]


def test_nm_keep_keeps_the_n_best_of_every_group_and_prunes_the_earlier_of_equal_scores():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 0.0],
                           [0.0, 0.0, 0.0, 5.0, 4.0, 9.0, 2.0, 7.0]])
    assert masks.nm_keep(scores, NMPattern(2, 4)).int().tolist() == [[0, 0, 1, 1, 1, 0, 1, 0],
                                                                     [0, 0, 1, 1, 0, 1, 0, 1]]
    assert masks.nm_keep(scores, NMPattern(1, 4)).int().tolist() == [[0, 0, 0, 1, 1, 0, 0, 0],
                                                                     [0, 0, 0, 1, 0, 1, 0, 0]]
    # NaN counts as +inf (kept); any leading dimensions, groups along the last one
    assert masks.nm_keep(torch.tensor([float("nan"), 0.0, 2.0, 1.0]), NMPattern(2, 4)).tolist() == [
        True, False, True, False]
    assert masks.nm_keep(scores.reshape(2, 1, 8), NMPattern(2, 4)).shape == (2, 1, 8)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2)])
def test_nm_keep_on_a_slice_equals_nm_mask_of_the_whole_matrix_at_full_sparsity(n, m):
    """SparseGPT chooses one group's columns at a time; the training-time pruner the whole matrix at once: one
    selection, the same mask (ties included: integer scores)."""
    p = NMPattern(n, m)
    scores = torch.randint(0, 3, (16, 4 * m), generator=torch.Generator().manual_seed(1)).float()
    whole = masks.nm_mask(scores, p, (m - n) / m)
    by_slice = torch.cat([masks.nm_keep(scores[:, i:i + m], p) for i in range(0, scores.shape[1], m)], dim=1)
    assert torch.equal(whole, by_slice)
    assert torch.equal(whole, masks.compute_mask(scores, p, (m - n) / m, nm_choose="cheapest"))
    assert bool((whole.reshape(-1, m).sum(dim=1) == n).all())


def test_row_mask_prunes_the_rounded_count_in_every_row_with_earlier_ties_first():
    scores = torch.tensor([[5.0, 1.0, 1.0, 1.0, 9.0, 8.0, 7.0, 6.0, 4.0, 3.0]] * 2)
    scores[1] = torch.arange(10, 0, -1)
    keep = masks.row_mask(scores, 0.25)  # 2.5 rounds up: 3 per row
    assert (~keep).sum(dim=1).tolist() == [3, 3]
    assert (~keep[0]).nonzero().flatten().tolist() == [1, 2, 3]
    assert (~keep[1]).nonzero().flatten().tolist() == [7, 8, 9]
    assert (~masks.row_mask(scores, 0.22)).sum(dim=1).tolist() == [2, 2]  # 2.2 rounds down
    assert bool(masks.row_mask(scores, 0.0).all())


@pytest.mark.parametrize("seed", range(3))
def test_lowest_k_ranks_each_row_on_its_own_as_a_stable_sort(seed):
    values = torch.randint(0, 5, (6, 40), generator=torch.Generator().manual_seed(seed)).float()
    for k in (0, 1, 13, 39, 40):
        want = torch.zeros_like(values, dtype=torch.bool)
        want.scatter_(1, torch.argsort(values, dim=1, stable=True)[:, :k], True)
        assert torch.equal(masks.lowest_k(values, k), want), k


def test_nm_dropped_mean_is_the_mean_of_the_weights_the_group_would_drop():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 8.0, 8.0, 0.0, 2.0]])
    assert masks.nm_dropped_mean(scores, NMPattern(2, 4)).tolist() == [1.5, 1.0]
    assert masks.nm_dropped_mean(scores, NMPattern(3, 4)).tolist() == [1.0, 0.0]


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402


@settings(max_examples=200, deadline=None, derandomize=True)
@given(rows=hst.sampled_from([1, 2, 4, 8]), cols=hst.sampled_from([1, 2, 4, 8]), out_mult=hst.integers(1, 6),
       in_mult=hst.integers(1, 6), sparsity=hst.floats(0.0, 1.0), seed=hst.integers(0, 2 ** 16))
def test_block_mask_invariants(rows, cols, out_mult, in_mult, sparsity, seed):
    scores = torch.rand(rows * out_mult, cols * in_mult, generator=torch.Generator().manual_seed(seed))
    pattern = BlockPattern(rows, cols)
    keep = masks.block_mask(scores, pattern, sparsity)
    n_blocks = out_mult * in_mult
    dropped_weights = int((~keep).sum())
    assert dropped_weights == masks.pruned_count(sparsity, n_blocks) * rows * cols
    assert masks.pattern_holds(keep, pattern)
    # every dropped block scores no more than every kept block
    means = masks.block_mean(scores, rows, cols).flatten()
    kept_blocks = masks.block_mean(keep.float(), rows, cols).flatten() == 1
    if kept_blocks.any() and (~kept_blocks).any():
        assert means[~kept_blocks].max() <= means[kept_blocks].min()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(nm=hst.sampled_from([(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]), out=hst.integers(1, 8),
       groups=hst.integers(1, 8), frac=hst.floats(0.0, 1.0), seed=hst.integers(0, 2 ** 16))
def test_nm_mask_invariants(nm, out, groups, frac, seed):
    n, m = nm
    scores = torch.rand(out, groups * m, generator=torch.Generator().manual_seed(seed))
    sparsity = frac * (m - n) / m
    keep = masks.nm_mask(scores, NMPattern(n, m), sparsity)
    counts = keep.reshape(-1, m).sum(dim=1)
    assert set(counts.unique().tolist()) <= {n, m}
    assert int((counts == n).sum()) == masks.pruned_count(frac, counts.numel())
    # inside a sparse group the kept weights are its best ones
    g_scores, g_keep = scores.reshape(-1, m), keep.reshape(-1, m)
    for row in (counts == n).nonzero().flatten().tolist():
        assert g_scores[row][g_keep[row]].min() >= g_scores[row][~g_keep[row]].max()
