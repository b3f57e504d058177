"""Schedule formulas of docs/conventions.md, value by value."""
import math

import pytest

from slimtorch.pruning.schedules import is_pruning_step, schedule_fraction, sparsity_at


@pytest.mark.parametrize("step,expected", [(0, 0.0), (5, 1 - 0.1 ** 0.5), (10, 0.9), (20, 0.9), (-3, 0.0)])
def test_exp(step, expected):
    assert sparsity_at(step, 0, 10, 0.1, "exp") == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kind,formula", [
    ("exp", lambda f, d: 1 - d ** f),
    ("cos", lambda f, d: (1 - d) * (1 - math.cos(math.pi * f / 2))),
    ("linear", lambda f, d: (1 - d) * f),
    ("cube", lambda f, d: (1 - d) * (1 - (1 - f) ** 3)),
])
def test_every_kind_matches_its_formula(kind, formula):
    start, end, d = 100, 1100, 0.25
    values = []
    for step in range(start, end + 1, 50):
        f = (step - start) / (end - start)
        got = sparsity_at(step, start, end, d, kind)
        assert got == pytest.approx(formula(f, d), abs=1e-12)
        values.append(got)
    assert values[0] == pytest.approx(0.0) and values[-1] == pytest.approx(1 - d)
    assert all(b >= a for a, b in zip(values, values[1:]))  # monotone


def test_start_equals_end_prunes_once_to_target():
    assert sparsity_at(4, 5, 5, 0.5, "exp") == 0.0
    assert sparsity_at(5, 5, 5, 0.5, "cube") == 0.5
    assert schedule_fraction(7, 5, 5) == 1.0
    assert [s for s in range(12) if is_pruning_step(s, 5, 5, 3)] == [5]


def test_pruning_steps_every_frequency_and_at_end():
    assert [s for s in range(30) if is_pruning_step(s, 3, 20, 5)] == [3, 8, 13, 18, 20]
    assert [s for s in range(30) if is_pruning_step(s, 0, 10, 1)] == list(range(11))


def test_unknown_kind():
    with pytest.raises(ValueError, match="sparsity_decay_type"):
        sparsity_at(1, 0, 2, 0.5, "quadratic")
