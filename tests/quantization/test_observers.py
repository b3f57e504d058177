"""Observers: exact min/max, the moving-average formula, robust ranges on real-shaped data, rebinning, errors."""
import pytest
import torch

from slimtorch.errors import CalibrationError

from slimtorch.quantization.observers import (OBSERVERS, EntropyObserver, HistogramObserver, MinMaxObserver,
                                              MovingAverageMinMaxObserver, MSEObserver, PercentileObserver)
from slimtorch.quantization.primitives import choose_qparams, fake_quantize


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_registry_matches_config_names():
    assert set(OBSERVERS) == {"minmax", "moving_average", "percentile", "entropy", "mse"}


def test_minmax_exact_per_tensor_and_per_channel():
    batches = [torch.randn(16, 8, generator=gen(i)) * (i + 1) for i in range(3)]
    allx = torch.cat(batches)
    for axis in (None, 1):
        o = MinMaxObserver("int8", True, per_channel_axis=axis)
        for b in batches:
            o.observe(b)
        lo, hi = (allx.min(), allx.max()) if axis is None else (allx.amin(0), allx.amax(0))
        assert torch.equal(o.min_val, lo) and torch.equal(o.max_val, hi)
        s, z = o.qparams()
        es, ez = choose_qparams(lo, hi, dtype="int8", symmetric=True)
        assert torch.equal(s, es) and torch.equal(z, ez)
    o = MinMaxObserver("uint8", False, per_channel_axis=0)  # a conv weight [out, in, kh, kw], per output channel
    w = torch.randn(5, 3, 2, 2, generator=gen(9))
    o.observe(w)
    assert o.qparams()[0].shape == (5,) and torch.equal(o.max_val, w.reshape(5, -1).amax(1))
    with pytest.raises(ValueError, match="channels"):
        o.observe(torch.randn(4, 3, 2, 2))


def test_moving_average_formula():
    o = MovingAverageMinMaxObserver("uint8", False, averaging_constant=0.25)
    o.observe(torch.tensor([-1.0, 3.0]))  # first batch initialises: (-1, 3)
    o.observe(torch.tensor([-5.0, 7.0]))  # m <- m + 0.25 (b - m): (-2, 4)
    o.observe(torch.tensor([2.0, 8.0]))   # (-2 + 0.25 * 4, 4 + 0.25 * 4) = (-1, 5)
    assert o.min_val.item() == -1.0 and o.max_val.item() == 5.0
    s, z = o.qparams()
    assert float(s) == pytest.approx(6 / 255) and int(z) == round(1 / (6 / 255))


def test_percentile_ignores_planted_outlier():
    x = torch.randn(100_000, generator=gen(0))
    x[12345] = 1000.0
    p, m = PercentileObserver("int8", True, percentile=99.99), MinMaxObserver("int8", True)
    for o in (p, m):
        for b in x.split(10_000):
            o.observe(b)
    assert float(m.qparams()[0]) * 127 == pytest.approx(1000.0)
    true_q = float(torch.quantile(x.abs()[:50_000], 0.9999))  # ~3.9
    amax_p = float(p.qparams()[0]) * 127
    assert amax_p < 10 and abs(amax_p - true_q) < 2 * p.bin_width + 0.3


@pytest.mark.parametrize("dist", [torch.distributions.Laplace(0.0, 1.0), torch.distributions.StudentT(5.0)])
@pytest.mark.parametrize("cls", [EntropyObserver, MSEObserver])
def test_entropy_and_mse_clip_heavy_tails_with_lower_error(dist, cls):
    torch.manual_seed(0)
    x = dist.sample((100_000,))
    robust, mm = cls("int8", True), MinMaxObserver("int8", True)
    for o in (robust, mm):
        for b in x.split(25_000):
            o.observe(b)
    (s, z), (sm, zm) = robust.qparams(), mm.qparams()
    assert float(s) < 0.95 * float(sm)  # a clearly smaller clipping range
    mse = lambda s, z: float(((fake_quantize(x, s, z, dtype="int8") - x) ** 2).mean())
    assert mse(s, z) < mse(sm, zm)


def test_mse_asymmetric_uint8_beats_minmax_on_heavy_tails():
    torch.manual_seed(1)
    x = torch.distributions.StudentT(3.0).sample((100_000,))
    o, m = MSEObserver("uint8", False), MinMaxObserver("uint8", False)
    o.observe(x)
    m.observe(x)
    mse = lambda q: float(((fake_quantize(x, *q, dtype="uint8") - x) ** 2).mean())
    assert mse(o.qparams()) < mse(m.qparams())


def test_histogram_rebinning_matches_concatenation():
    g = gen(4)
    batches = [torch.randn(20_000, generator=g) * 1.9 ** k + 0.3 * k for k in range(6)]  # range grows every batch
    allx = torch.cat(batches)
    seq, cat = PercentileObserver("int8", True, percentile=99.0), PercentileObserver("int8", True, percentile=99.0)
    for b in batches:
        seq.observe(b)
    cat.observe(allx)
    assert seq.R >= float(allx.abs().max()) and seq.bin_width <= 2 * cat.bin_width  # bounded, at most 2x coarser
    # every bin count equals the exact count of the concatenated data in that bin (up to float ties at edges)
    edges = torch.arange(seq.bins + 1, dtype=torch.float64) * seq.bin_width
    exact = torch.histogram(allx[allx >= 0].double(), bins=edges.float().double())[0]
    assert float((seq.pos.double() - exact).abs().sum()) <= 5
    assert int(seq.pos.sum() + seq.neg.sum()) == allx.numel()
    # and the clipping range it proposes agrees with observing the concatenation, within one bin width
    assert abs(float(seq.qparams()[0] - cat.qparams()[0])) * 127 <= seq.bin_width
    for cls in (EntropyObserver, MSEObserver):
        a, b = cls("int8", True), cls("int8", True)
        for x in batches:
            a.observe(x)
        b.observe(allx)
        assert float(a.qparams()[0]) == pytest.approx(float(b.qparams()[0]), rel=0.1)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(name, bad):
    o = OBSERVERS[name]("int8", True)
    o.observe(torch.randn(10, generator=gen(5)))
    x = torch.randn(4, 3, generator=gen(6))
    x[1, 2] = bad
    with pytest.raises(ValueError, match="observed tensor.*(NaN|inf)"):
        o.observe(x)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_empty_observer_and_reset(name):
    o = OBSERVERS[name]("uint8", False)
    with pytest.raises(CalibrationError, match="before any tensor was observed"):
        o.qparams()
    o.observe(torch.randn(1000, generator=gen(7)))
    s, z = o.qparams()
    assert float(s) > 0 and 0 <= int(z) <= 255
    o.reset()
    with pytest.raises(CalibrationError, match="before any tensor was observed"):
        o.qparams()


@pytest.mark.parametrize("name", ["percentile", "entropy", "mse"])
def test_histogram_observers_are_per_tensor_and_handle_constant_input(name):
    with pytest.raises(ValueError, match="per-tensor"):
        OBSERVERS[name]("int8", True, per_channel_axis=0)
    o = OBSERVERS[name]("int8", True)
    o.observe(torch.zeros(100))
    o.observe(torch.zeros(100))
    s, z = o.qparams()
    assert torch.isfinite(s) and float(s) > 0 and int(z) == 0
    o.observe(torch.full((10,), 3.0))  # range grows from zero
    assert isinstance(o, HistogramObserver) and o.R >= 3.0
    assert float(o.qparams()[0]) > 0
