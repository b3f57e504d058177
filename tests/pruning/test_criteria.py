"""Criteria formulas, value by value, and their buffer reuse."""
import pytest
import torch

from slimtorch.pruning import criteria


def test_snip_momentum_accumulates_beta_weighted_history():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=g)
    grads = [torch.randn(8, 8, generator=g) for _ in range(4)]
    state = spare = None
    expected = torch.zeros(8, 8)
    for grad in grads:
        state, spare = criteria.observe("snip_momentum", 0.9, state, spare, w, grad)
        expected = 0.9 * expected + (w * grad).abs()
        assert torch.allclose(state, expected, atol=1e-6)
    assert spare is not None and spare.data_ptr() != state.data_ptr()  # two buffers, swapped each update


@pytest.mark.parametrize("method,formula", [
    ("snip", lambda w, g: (w * g).abs()),
    ("gradient", lambda w, g: g.abs()),
])
def test_single_update_criteria(method, formula):
    w, g = torch.randn(4, 6), torch.randn(4, 6)
    old = torch.full((4, 6), 99.0)
    state, _ = criteria.observe(method, 0.9, old, None, w, g)
    assert torch.equal(state, formula(w, g))  # the previous state is not carried over


def test_bf16_weights_keep_float32_scores():
    w = torch.randn(16, 16).bfloat16()
    grad = torch.randn(16, 16).bfloat16()
    state, spare = criteria.observe("snip_momentum", 0.5, None, None, w, grad)
    state, _ = criteria.observe("snip_momentum", 0.5, state, spare, w, grad)
    assert state.dtype == torch.float32
    one = (w.float() * grad.float()).abs()
    assert torch.allclose(state, 1.5 * one, rtol=1e-2)


def test_magnitude_needs_no_observation_and_scores_fall_back():
    w = torch.tensor([[-3.0, 1.0]])
    assert criteria.observation_window("magnitude", 0.9) is None
    assert torch.equal(criteria.score("magnitude", w, None), torch.tensor([[3.0, 1.0]]))
    assert torch.equal(criteria.score("snip", w, None), torch.tensor([[3.0, 1.0]]))  # no gradient seen yet
    with pytest.raises(ValueError, match="takes no observations"):
        criteria.observe("magnitude", 0.9, None, None, w, w)


def test_momentum_window_covers_what_still_matters():
    window = criteria.observation_window("snip_momentum", 0.9)
    assert 0.9 ** window < 1e-3 <= 0.9 ** (window - 1)
    assert criteria.observation_window("snip", 0.9) == 0
