r"""Observers: watch calibration tensors, then propose quantization parameters.

Contract: ``observe(x)`` (any number of times), ``qparams() -> (scale, zero_point)``, ``reset()``.

| name           | class                       | range it proposes                                     | per channel |
|----------------|-----------------------------|-------------------------------------------------------|-------------|
| minmax         | MinMaxObserver              | [min, max] of everything observed                     | yes         |
| moving_average | MovingAverageMinMaxObserver | m <- m + c * (batch_min - m), same for max            | yes         |
| percentile     | PercentileObserver          | ``percentile`` quantile of \|x\| (of x if asymmetric) | no          |
| entropy        | EntropyObserver             | threshold minimising KL(P \|\| Q), TensorRT-style       | no          |
| mse            | MSEObserver                 | clip range minimising the quantize-dequantize MSE     | no          |

Histogram observers keep two fixed-size histograms (of x >= 0 and of -x for x < 0) on [0, R], so memory is bounded.
R is always the power of two just above the largest |x| seen, R = 2**(floor(log2(amax)) + 1) > amax, and x goes to bin
floor(|x| * (bins / R)). Multiplying by a power of two is exact in floating point and floor(floor(a) / 2) =
floor(a / 2), so merging adjacent bin pairs of a histogram counted at R gives exactly the histogram counted at 2R: when
a batch raises R, the counts are merged up to it. The histogram is therefore exactly the one of the concatenated data
counted directly at its final R, whatever the batch order or split; ``merge`` combines two observers (other shards of
the data, other ranks) with the same guarantee, which distributed calibration relies on. The bin width is at most
twice the finest a histogram ending at amax could have. Counts are int64 (exact, deterministic). An input of only
zeros leaves R = 0 (everything is in bin 0, whatever R becomes later).
Asymmetric histogram observers clip [min, max] to [-t, t] with the |x| threshold t (percentile: per-side quantiles).
``merge(other)`` is exact for minmax and the histogram observers; for moving_average it averages the two running
ranges (a moving average has no order-free merge).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import CalibrationError
from .grid import EPS as DEFAULT_EPS
from .grid import choose_qparams, fake_quantize


def is_power_of_two(r: float) -> bool:
    return r > 0.0 and math.frexp(r)[0] == 0.5


def range_above(amax: float) -> float:
    """The power of two strictly above ``amax`` >= 0: 2**(floor(log2(amax)) + 1); 0.0 for amax == 0.

    Exact for every finite float (subnormals too): frexp gives amax = m * 2**e with 0.5 <= m < 1, so 2**e > amax.
    """
    if amax <= 0.0:
        return 0.0
    return math.ldexp(1.0, math.frexp(amax)[1])


def rebin_counts(counts: Tensor, r_from: float, r_to: float) -> Tensor:
    """A histogram counted on [0, r_from) as it would be counted on [0, r_to): r_to / r_from adjacent bins merge.

    Both ranges are powers of two (or r_from = 0: only zeros, all in bin 0), r_to >= r_from. Exact: a value in bin
    i at r_from is in bin floor(i / k) at r_to = k * r_from, since floor(floor(a) / k) = floor(a / k).
    """
    if r_to == r_from or r_from == 0.0:
        return counts
    if not (is_power_of_two(r_to) and is_power_of_two(r_from)) or r_to < r_from:
        raise CalibrationError(f"histogram ranges must be powers of two and only grow, got {r_from} -> {r_to}")
    bins = counts.numel()
    group = min(int(r_to / r_from), bins)  # an exact power of two; from `bins` on, everything lands in bin 0
    merged = counts.reshape(-1, group).sum(1)
    return torch.cat([merged, merged.new_zeros(bins - merged.numel())])


class Observer(ABC):
    """Base class: input checks, the empty-observer error and the qparams() step shared by all observers."""

    per_channel_ok = True

    def __init__(self, dtype: str = "int8", symmetric: bool = True, per_channel_axis: Optional[int] = None,
                 eps: float = DEFAULT_EPS):
        if per_channel_axis is not None and not self.per_channel_ok:
            raise CalibrationError(f"{type(self).__name__} is per-tensor only; use minmax or moving_average per "
                                   "channel")
        choose_qparams(torch.tensor(0.0), torch.tensor(0.0), dtype=dtype, symmetric=symmetric)  # validates the pair
        self.dtype, self.symmetric, self.axis, self.eps = dtype, symmetric, per_channel_axis, eps
        self.reset()

    def reset(self) -> None:
        self.min_val: Optional[Tensor] = None
        self.max_val: Optional[Tensor] = None

    def observe(self, x: Tensor) -> None:
        x = x.detach()
        if not x.is_floating_point():
            x = x.to(torch.float32)
        if x.numel() == 0:
            return  # nothing to learn from an empty tensor
        finite = torch.isfinite(x)
        if not bool(finite.all()):
            n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
            raise CalibrationError(f"the observed tensor (shape {tuple(x.shape)}, {x.dtype}) contains {n_nan} NaN and "
                             f"{n_inf} inf values; quantization ranges need finite activations")
        self._observe(x.to(torch.float32))

    @abstractmethod
    def _observe(self, x: Tensor) -> None:
        """Fold a finite float32 tensor into the statistics."""

    def _channel_minmax(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self.axis is None:
            return x.amin(), x.amax()
        flat = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)  # [C, everything else]
        if self.min_val is not None and self.min_val.numel() != flat.shape[0]:
            raise CalibrationError(f"the observed tensor has {flat.shape[0]} channels on axis {self.axis}, earlier "
                                   f"ones had {self.min_val.numel()}")
        return flat.amin(1), flat.amax(1)

    def _range(self) -> Tuple[Tensor, Tensor]:
        return self.min_val, self.max_val

    def merge(self, other: "Observer") -> None:
        """Fold ``other``'s statistics (the same kind of observer, on other data) into this one, in place."""
        if type(other) is not type(self) or other.axis != self.axis:
            raise CalibrationError(f"cannot merge a {type(other).__name__} (axis {other.axis}) into a "
                                   f"{type(self).__name__} (axis {self.axis})")
        if other.min_val is None:
            return
        if self.min_val is not None and self.min_val.shape != other.min_val.shape:
            raise CalibrationError(f"cannot merge observers of {other.min_val.numel()} and {self.min_val.numel()} "
                                   "channels")
        self._merge(other)

    def _merge(self, other: "Observer") -> None:
        lo, hi = other.min_val.to(self._device(other)), other.max_val.to(self._device(other))
        if self.min_val is None:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def _device(self, other: "Observer") -> torch.device:
        return (self.min_val if self.min_val is not None else other.min_val).device

    def qparams(self) -> Tuple[Tensor, Tensor]:
        if self.min_val is None:
            raise CalibrationError(f"{type(self).__name__}.qparams() called before any tensor was observed; run "
                               f"calibration data through observe() first")
        lo, hi = self._range()
        return choose_qparams(lo, hi, dtype=self.dtype, symmetric=self.symmetric, eps=self.eps)

    def absmax(self) -> Tensor:
        """The largest magnitude of the range this observer proposes (clipped, for the histogram observers): what a
        symmetric per-tensor scale is made from, whatever the grid (the block pipeline's static activations)."""
        if self.min_val is None:
            raise CalibrationError(f"{type(self).__name__}.absmax() called before any tensor was observed")
        lo, hi = self._range()
        return torch.maximum(-lo, hi)


class MinMaxObserver(Observer):
    """Running min and max of everything observed."""

    def _observe(self, x: Tensor) -> None:
        lo, hi = self._channel_minmax(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch min and max; the first batch initialises it."""

    def __init__(self, dtype: str = "int8", symmetric: bool = True, per_channel_axis: Optional[int] = None,
                 averaging_constant: float = 0.01, eps: float = DEFAULT_EPS):
        if not 0.0 < averaging_constant <= 1.0:
            raise CalibrationError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant
        super().__init__(dtype, symmetric, per_channel_axis, eps)

    def _observe(self, x: Tensor) -> None:
        lo, hi = self._channel_minmax(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (lo - self.min_val)  # m <- m + c * (batch_min - m)
            self.max_val = self.max_val + c * (hi - self.max_val)

    def _merge(self, other: "Observer") -> None:
        if self.min_val is None:
            super()._merge(other)
            return
        dev = self.min_val.device  # no order-free merge exists: the mean of the two running ranges
        self.min_val = (self.min_val + other.min_val.to(dev)) / 2
        self.max_val = (self.max_val + other.max_val.to(dev)) / 2


class HistogramObserver(Observer):
    """Two-sided histogram on [0, R] with ``bins`` bins per side; subclasses turn it into a clipping range."""

    per_channel_ok = False

    def __init__(self, dtype: str = "int8", symmetric: bool = True, per_channel_axis: Optional[int] = None,
                 bins: int = 2048, eps: float = DEFAULT_EPS):
        if bins < 2 or bins & (bins - 1):
            raise CalibrationError(f"bins must be a power of two >= 2 (doubling the range merges bin pairs), "
                                   f"got {bins}")
        self.bins = bins
        super().__init__(dtype, symmetric, per_channel_axis, eps)

    def reset(self) -> None:
        super().reset()
        self.R: Optional[float] = None  # a power of two > every |x| seen; 0.0 while only zeros were seen
        self.pos: Optional[Tensor] = None  # counts of x in [i*w, (i+1)*w), w = R / bins
        self.neg: Optional[Tensor] = None  # counts of -x in the same bins, for x < 0

    @property
    def bin_width(self) -> float:
        return self.R / self.bins

    def _counts(self, a: Tensor) -> Tensor:
        if self.R == 0.0:  # only zeros so far: bin 0 at any R
            return torch.bincount(torch.zeros(a.numel(), dtype=torch.long, device=a.device), minlength=self.bins)
        scale = self.bins / self.R  # a power of two: a * scale is exact wherever it is >= 1
        if scale > 2.0 ** 120:  # R below ~2**-109: scale and the products are out of float32's range
            a = a.double()
        idx = torch.clamp((a * scale).floor().long(), 0, self.bins - 1)  # bin = floor(|x| * bins / R)
        return torch.bincount(idx, minlength=self.bins)

    def rebin(self, R: float) -> None:
        """Raise the range to ``R`` (a power of two >= the current one), merging the counts (exact)."""
        if self.R is not None and R != self.R:
            self.pos, self.neg = (rebin_counts(h, self.R, R) for h in (self.pos, self.neg))
            self.R = R

    def _observe(self, x: Tensor) -> None:
        x = x.reshape(-1)
        lo, hi = x.amin(), x.amax()
        R = range_above(float(torch.maximum(-lo, hi)))
        if self.R is None:
            self.R = R
            self.pos = torch.zeros(self.bins, dtype=torch.int64, device=x.device)
            self.neg = torch.zeros_like(self.pos)
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.rebin(max(self.R, R))
        self.pos += self._counts(x[x >= 0])
        self.neg += self._counts(-x[x < 0])

    def _merge(self, other: "Observer") -> None:
        if other.bins != self.bins:
            raise CalibrationError(f"cannot merge histograms of {other.bins} and {self.bins} bins")
        first = self.min_val is None
        super()._merge(other)
        dev = self.min_val.device
        if first:
            self.R, self.pos, self.neg = other.R, other.pos.to(dev).clone(), other.neg.to(dev).clone()
            return
        R = max(self.R, other.R)
        self.rebin(R)
        self.pos = self.pos + rebin_counts(other.pos, other.R, R).to(dev)
        self.neg = self.neg + rebin_counts(other.neg, other.R, R).to(dev)

    def abs_hist(self) -> Tensor:
        """Histogram of |x| on [0, R], float64."""
        return (self.pos + self.neg).double()

    def _range(self) -> Tuple[Tensor, Tensor]:
        t = torch.as_tensor(self._threshold(), dtype=torch.float32, device=self.min_val.device)
        # clip [min, max] to [-t, t]; a symmetric scale then comes from t (or the larger side, if smaller than t)
        return _clip_range(self.min_val, self.max_val, t)

    @abstractmethod
    def _threshold(self) -> float:
        """The clipping magnitude this observer's method picks from the histogram."""


def _quantile(counts: Tensor, edges: Tensor, q: float) -> float:
    """Value below which a fraction q of the histogram mass lies, linear inside the bin."""
    cum = torch.cumsum(counts, 0)
    target = q * float(cum[-1])
    i = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype)).clamp(max=len(counts) - 1))
    before = float(cum[i - 1]) if i > 0 else 0.0
    frac = (target - before) / max(float(counts[i]), 1.0)
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


class PercentileObserver(HistogramObserver):
    """Clips at the ``percentile`` of |x| (symmetric) or at the lower/upper percentiles of x (asymmetric)."""

    def __init__(self, dtype: str = "int8", symmetric: bool = True, per_channel_axis: Optional[int] = None,
                 percentile: float = 99.99, bins: int = 2048, eps: float = DEFAULT_EPS):
        if not 0.0 < percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile
        super().__init__(dtype, symmetric, per_channel_axis, bins, eps)

    def _threshold(self) -> float:
        edges = torch.linspace(0.0, self.R, self.bins + 1, dtype=torch.float64)
        return _quantile(self.abs_hist().cpu(), edges, self.percentile / 100.0)

    def _range(self) -> Tuple[Tensor, Tensor]:
        if self.symmetric:
            return super()._range()
        # signed histogram: negative bins (most negative first) then positive bins
        counts = torch.cat([self.neg.flip(0), self.pos]).double().cpu()
        edges = torch.linspace(-self.R, self.R, 2 * self.bins + 1, dtype=torch.float64)
        p = self.percentile / 100.0
        lo = torch.as_tensor(_quantile(counts, edges, 1.0 - p), dtype=torch.float32, device=self.min_val.device)
        hi = torch.as_tensor(_quantile(counts, edges, p), dtype=torch.float32, device=self.min_val.device)
        return torch.maximum(self.min_val, lo), torch.minimum(self.max_val, hi)


class EntropyObserver(HistogramObserver):
    """TensorRT entropy calibration: the |x| threshold whose ``levels``-level quantization loses least KL."""

    def __init__(self, dtype: str = "int8", symmetric: bool = True, per_channel_axis: Optional[int] = None,
                 bins: int = 2048, levels: int = 128, eps: float = DEFAULT_EPS):
        self.levels = levels  # 128 = the int8 magnitudes of a symmetric grid
        super().__init__(dtype, symmetric, per_channel_axis, bins, eps)

    def _threshold(self) -> float:
        hist = self.abs_hist()
        last = int(torch.nonzero(hist).max()) + 1  # bins beyond the data cannot be better thresholds
        if last <= self.levels:
            return last * self.bin_width  # too few bins to quantize: keep everything
        hist = hist[:last]
        cands = torch.arange(self.levels, last + 1, device=hist.device)  # threshold after i bins
        tail = hist.flip(0).cumsum(0).flip(0)  # tail[i] = sum(hist[i:])
        j = torch.arange(last, device=hist.device)
        best_kl, best_i = float("inf"), last
        for chunk in cands.split(256):  # bounded memory: [256, bins] at a time
            i = chunk[:, None]
            inside = j[None, :] < i
            h = torch.where(inside, hist[None, :], torch.zeros((), dtype=hist.dtype, device=hist.device))
            p = h.clone()  # P: first i bins, outliers folded into bin i-1
            p.scatter_add_(1, i - 1, torch.where(chunk < last, tail[chunk.clamp(max=last - 1)],
                                                 torch.zeros_like(tail[:1])).unsqueeze(1).to(p.dtype))
            level = torch.clamp(j[None, :] * self.levels // i, max=self.levels - 1)  # bin j -> level floor(j*L/i)
            nz = (p > 0).double()
            lsum = torch.zeros(len(chunk), self.levels, dtype=p.dtype, device=p.device).scatter_add_(1, level, h)
            lnz = torch.zeros_like(lsum).scatter_add_(1, level, nz)
            # Q: each level's mass spread evenly over the bins of that level where P is non-zero
            q = nz * lsum.gather(1, level) / lnz.gather(1, level).clamp(min=1.0)
            p = p / p.sum(1, keepdim=True)
            q = q / q.sum(1, keepdim=True).clamp(min=1e-300)
            q = torch.where((p > 0) & (q == 0), torch.full_like(q, 1e-12), q)  # smoothing: P>0 where Q has no mass
            kl = torch.where(p > 0, p * torch.log(p / q.clamp(min=1e-300)), torch.zeros_like(p)).sum(1)
            k = int(torch.argmin(kl))
            if float(kl[k]) < best_kl:  # strict: ties keep the smaller threshold
                best_kl, best_i = float(kl[k]), int(chunk[k])
        return best_i * self.bin_width  # KL(P || Q) = sum P log(P / Q), minimised over i


class MSEObserver(HistogramObserver):
    """Grid search of the clipping threshold t in (0, amax] minimising the quantize-dequantize MSE of the histogram."""

    def __init__(self, dtype: str = "int8", symmetric: bool = True, per_channel_axis: Optional[int] = None,
                 grid: int = 100, bins: int = 2048, eps: float = DEFAULT_EPS):
        self.grid = grid
        super().__init__(dtype, symmetric, per_channel_axis, bins, eps)

    def _threshold(self) -> float:
        dev = self.pos.device
        sub = 4  # 4 points per bin, each with a quarter of its count: bins are not much finer than the int8 step
        offs = (torch.arange(sub, device=dev, dtype=torch.float64) + 0.5) / sub
        idx = torch.arange(self.bins, device=dev, dtype=torch.float64)[:, None]
        centers = ((idx + offs) * self.bin_width).reshape(-1)  # sub-bin points (i + (k + 0.5) / sub) * w
        vals = torch.cat([centers, -centers]).float()
        w = torch.cat([self.pos, self.neg]).double().repeat_interleave(sub) / sub
        amax = float(torch.maximum(-self.min_val, self.max_val))
        ts = torch.arange(1, self.grid + 1, device=dev, dtype=torch.float32) * (amax / self.grid)  # t_k = k/G * amax
        lo, hi = _clip_range(self.min_val, self.max_val, ts)
        s, z = choose_qparams(lo, hi, dtype=self.dtype, symmetric=self.symmetric, eps=self.eps)
        err = fake_quantize(vals.expand(len(ts), -1), s, z, dtype=self.dtype, axis=0) - vals  # [grid, values]
        mse = (err.double() ** 2 * w).sum(1)  # sum_b count_b * (fq(x_b) - x_b)^2
        return float(ts[int(torch.argmin(mse))])


def _clip_range(min_val: Tensor, max_val: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
    """[min, max] with 0 in it (a quantization grid always holds 0) clipped to [-t, t]: data that is all positive
    (or all negative) and a threshold below its smallest magnitude must not give min > max."""
    lo = torch.maximum(torch.clamp(min_val, max=0.0), -t)
    hi = torch.minimum(torch.clamp(max_val, min=0.0), t)
    return lo, hi


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def observer_for(name: str, *, dtype: str = "int8", symmetric: bool = True, percentile: float = 99.99) -> Observer:
    """A fresh observer of the kind a config's ``observer`` key names (:data:`OBSERVERS`); ``percentile`` is read by
    the percentile observer only."""
    kw = {"percentile": percentile} if name == "percentile" else {}
    return OBSERVERS[name](dtype=dtype, symmetric=symmetric, **kw)
