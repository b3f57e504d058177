r"""Distributed calibration: under torch.distributed, ``quantize`` reduces every statistic the calibration data feeds
across the data-parallel ranks, so that every rank builds the same quantized model from its own shard of the data.

| statistic (where)                          | reduction                              | vs one rank on all shards      |
|--------------------------------------------|----------------------------------------|--------------------------------|
| minmax ranges per tensor/channel           | all_reduce MIN / MAX                   | bitwise                        |
| percentile/entropy/mse histograms          | MAX of the power-of-two range R, merge | bitwise (any order, any split) |
|                                            | up to it, SUM of the int64 counts      |                                |
| moving_average ranges                      | mean of the ranks' running min / max   | no (order-dependent by nature) |
| SmoothQuant channel min/max (ChannelStats) | all_reduce MIN / MAX                   | bitwise                        |
| SmoothQuant alpha="auto" errors            | SUM of squared error and squared ref   | same data: to float rounding   |
| bias correction input means (weight_tuning)| SUM of input sums and counts (or of    | to float rounding              |
|                                            | count-weighted output shifts)          |                                |
| BN-fold / SmoothQuant exactness checks     | MAX of the output change, so every     | rank's own first batch         |
|                                            | rank keeps or reverts the same folds   |                                |
| accuracy search: sensitivity errors        | SUM of squared error and squared ref   | to float rounding              |
| accuracy search: eval_fn metric, timeout   | gathered (mean where ranks differ,     | -                              |
|                                            | with a warning); timeout: any rank     |                                |

Float sums run in float64, gathered and added in rank order, so every rank gets the same bits whatever the
backend's reduction algorithm. Besides the statistics, three checks keep ranks from silently diverging:

* at the start, the arguments are checked on every rank (an error on one rank is raised on all) and the plan is
  compared: the config, the quantizable layers and a fingerprint of the float model;
* an error while a rank feeds its data (NaN activations, a batch its model rejects) is raised on every rank, at the
  next synchronisation point, instead of leaving the others waiting in a collective;
* at the end, a bit-exact fingerprint of every tensor of the quantized model's state_dict is compared (int64
  MIN / MAX all_reduce): ranks that differ raise :class:`~slimtorch.DistributedError` on every rank.

The communication device is the CPU for gloo (and mixed backends), the current CUDA device for nccl (xpu for xccl).
Without a process group (``LOCAL``) no function here communicates.
"""
from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import ranks
from ..errors import ConfigError, DistributedError
from .observers import HistogramObserver, MovingAverageMinMaxObserver, Observer, rebin_counts

MPU_VALUES = ("None (reduce over the default process group when torch.distributed is initialized with more than one "
              "rank, else no communication), \"local\" (no communication: quantize on this rank alone), a "
              "torch.distributed ProcessGroup, or a Megatron/DeepSpeed-style mpu with get_data_parallel_group()")


def _dist():
    return torch.distributed


class Sync:
    """Collectives over one process group. ``LOCAL`` (no group, one rank) does no communication: every method then
    returns its input, and ``guard`` lets exceptions through unchanged."""

    def __init__(self, group: Any = None):
        self.group, self.world, self.rank, self.device = group, 1, 0, torch.device("cpu")
        self.metric_warned = False
        if group is not None:
            d = _dist()
            self.world, self.rank = d.get_world_size(group), d.get_rank(group)
            self.device = ranks.device_of(group)  # nccl reduces device tensors only

    @property
    def active(self) -> bool:
        return self.world > 1

    # -- collectives ----------------------------------------------------------------------------------------------
    def _all_reduce(self, t: Tensor, op) -> Tensor:
        if not self.active or t.numel() == 0:
            return t
        x = t.detach().to(self.device, copy=True).contiguous()  # never the caller's tensor in place
        _dist().all_reduce(x, op=op, group=self.group)
        return x.to(t.device)

    def min(self, t: Tensor) -> Tensor:
        return self._all_reduce(t, _dist().ReduceOp.MIN) if self.active else t

    def max(self, t: Tensor) -> Tensor:
        return self._all_reduce(t, _dist().ReduceOp.MAX) if self.active else t

    def sum_exact(self, t: Tensor) -> Tensor:
        """SUM of integer tensors (exact, so order does not matter)."""
        return self._all_reduce(t, _dist().ReduceOp.SUM) if self.active else t

    def sum_ordered(self, t: Tensor) -> Tensor:
        """Float SUM over ranks in float64, added in rank order: the same bits on every rank and every backend."""
        if not self.active or t.numel() == 0:
            return t
        x = t.detach().to(self.device, torch.float64).contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        _dist().all_gather(parts, x, group=self.group)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total.to(t.device)

    def max_float(self, value: float) -> float:
        """The largest ``value`` over the ranks (NaN counts as inf: for errors, where NaN means "changed")."""
        if not self.active:
            return value
        value = math.inf if value != value else value
        return float(self.max(torch.tensor([value], dtype=torch.float64)))

    def any(self, flag: bool) -> bool:
        if not self.active:
            return bool(flag)
        return bool(int(self.max(torch.tensor([int(bool(flag))], dtype=torch.int64))))

    def gather(self, obj: Any) -> List[Any]:
        return ranks.gather(obj, self.group) if self.active else [obj]

    # -- agreement ------------------------------------------------------------------------------------------------
    def guard(self, what: str):
        """``with sync.guard("calibration"): <local work, no collectives>``: an exception on any rank is raised on
        every rank (its own on the failing rank, a DistributedError naming it on the others: :mod:`slimtorch.ranks`)."""
        if not self.active:
            return nullcontext()
        return ranks.guard(self._failed(what), self.group, self.device)

    @staticmethod
    def _failed(what: str):
        return lambda rank, message: (f"quantize(): {what} failed on rank {rank} of the data-parallel group, so every "
                                      f"rank stops here: {message}")

    def check_same(self, value: Any, what: str) -> None:
        """Collective: DistributedError on every rank unless ``value`` (picklable) is equal on all ranks."""
        if not self.active:
            return
        everyone = self.gather(value)
        differ = [r for r, v in enumerate(everyone) if v != everyone[0]]
        if differ:
            raise DistributedError(f"quantize(): {what} differs between rank 0 and rank {differ[0]} of the "
                                   "data-parallel group; the ranks would build different models")

    def agreed_metric(self, value: float, candidate: str) -> float:
        """eval_fn's result as every rank will use it: its own when all ranks agree, else their mean (warned once)."""
        if not self.active:
            return value
        everyone = self.gather(value)
        if all(v == everyone[0] for v in everyone):
            return everyone[0]
        mean = math.fsum(everyone) / len(everyone)
        if not self.metric_warned:
            self.metric_warned = True
            warnings.warn(f"quantize(): eval_fn returned different values on the ranks for {candidate} "
                          f"({', '.join(f'{v:.6g}' for v in everyone)}); their mean {mean:.6g} is used, so that "
                          "every rank takes the same decisions. Evaluate the same data on every rank (or reduce the "
                          "metric inside eval_fn) for the metric of the whole evaluation set", UserWarning,
                          stacklevel=4)
        return mean


LOCAL = Sync()


def resolve(mpu: Any) -> Sync:
    """The :class:`Sync` that ``quantize(mpu=...)`` communicates through; bad values are a ConfigError."""
    d = _dist()
    available = d.is_available()
    initialized = available and d.is_initialized()
    if isinstance(mpu, str):
        if mpu == "local":
            return LOCAL
        raise ConfigError(f"quantize(mpu={mpu!r}): the only string accepted is \"local\"; mpu takes {MPU_VALUES}")
    if mpu is None:
        return _sync_of(d.group.WORLD) if initialized else LOCAL
    if available and isinstance(mpu, d.ProcessGroup):
        group = mpu
    elif callable(getattr(mpu, "get_data_parallel_group", None)):
        group = mpu.get_data_parallel_group()
        if not (available and isinstance(group, d.ProcessGroup)):
            raise ConfigError(f"quantize(mpu=...): mpu.get_data_parallel_group() returned {type(group).__name__}, "
                              "not a torch.distributed ProcessGroup")
    else:
        raise ConfigError(f"quantize(mpu=...): got {type(mpu).__name__}; mpu takes {MPU_VALUES}")
    if not initialized:
        raise ConfigError("quantize(mpu=...): a process group was given but torch.distributed is not initialized")
    return _sync_of(group)


def _sync_of(group: Any) -> Sync:
    sync = Sync(group)
    return sync if sync.active else LOCAL


# -- fingerprints -----------------------------------------------------------------------------------------------------
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_fingerprint(t: Tensor, chunk: int = 1 << 22) -> Tuple[int, int]:
    """(sum of the element bit patterns, position-weighted sum), int64 with wrap-around: equal tensors (bit for bit)
    give equal pairs, different ones almost never. Computed on the tensor's device, ``chunk`` elements at a time."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    elif flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    flat = flat.view(_INT_OF_WIDTH[flat.element_size()])
    total = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), chunk):
        bits = flat[start:start + chunk].to(torch.int64)
        pos = torch.arange(start, start + bits.numel(), device=flat.device, dtype=torch.int64)
        weight = (pos * 2654435761 + 97531) % 2147483629 + 1  # a different odd-ish weight per position
        total += torch.stack([bits.sum(), (bits * weight).sum()])
    return int(total[0]), int(total[1])


def state_signature(module: nn.Module) -> Tuple[List[Tuple[str, Tuple[int, ...], str]], List[Tuple[int, int]]]:
    """(key, shape, dtype) of every state_dict entry, and the fingerprint of each."""
    state = module.state_dict()
    keys = [(k, tuple(v.shape), str(v.dtype)) for k, v in state.items() if isinstance(v, Tensor)]
    return keys, [tensor_fingerprint(state[k]) for k, _, _ in keys]


def check_same_model(model: nn.Module, sync: Sync, when: str = "the quantized model") -> None:
    """Raise DistributedError on every rank unless ``model``'s state_dict is bitwise the same on all ranks."""
    if not sync.active:
        return
    keys, prints = state_signature(model)
    sync.check_same(keys, f"the state_dict layout (keys, shapes, dtypes) of {when}")
    if not prints:
        return
    mine = torch.tensor(prints, dtype=torch.int64)
    differ = (sync.min(mine) != sync.max(mine)).any(1).nonzero().flatten().tolist()
    if differ:
        names = [keys[i][0] for i in differ[:5]]
        raise DistributedError(f"quantize(): {when} differs across the data-parallel ranks in {len(differ)} tensors "
                               f"({names}): the ranks' models, configs or calibration reductions were not the same. "
                               "Every rank must quantize the same float model with the same config")


def check_same_plan(sync: Sync, model: nn.Module, section: Any, args: Dict[str, Any]) -> None:
    """At the start of quantize: the config, the quantizable layers and the float weights must agree."""
    if not sync.active:
        return
    from .qdq import op_type

    layers = [(n, op_type(m), tuple(getattr(m, "weight", torch.empty(0)).shape)) for n, m in model.named_modules()
              if n and op_type(m) is not None]
    sync.check_same(sorted(args.items()), "how quantize() was called (static or dynamic, a loader, an eval_fn)")
    ranks.check_same_config(section.model_dump(mode="json"), "quantize(): the quantization config", sync.group)
    everyone = sync.gather(layers)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            missing = [l[0] for l in everyone[0] if l not in theirs]
            extra = [l[0] for l in theirs if l not in everyone[0]]
            raise DistributedError(f"quantize(): rank {rank} has other quantizable layers than rank 0 (only on rank "
                                   f"0 or other shape: {missing[:5]}, only on rank {rank}: {extra[:5]}); every rank "
                                   "must quantize the same float model")
    check_same_model(model, sync, "the float model passed to quantize()")


# -- statistics -------------------------------------------------------------------------------------------------------
def _shapes(sync: Sync, local: Sequence[Optional[Tuple[int, ...]]], what: str) -> List[Optional[Tuple[int, ...]]]:
    """Per item, the shape its statistic has on the ranks that saw data (None: no rank did); a clash is an error."""
    everyone = sync.gather(list(local))
    if any(len(e) != len(local) for e in everyone):
        raise DistributedError(f"quantize(): the ranks observe different numbers of {what}")
    out: List[Optional[Tuple[int, ...]]] = []
    for i in range(len(local)):
        seen = {e[i] for e in everyone if e[i] is not None}
        if len(seen) > 1:
            raise DistributedError(f"quantize(): {what} {i} has statistics of shapes {sorted(seen)} on different ranks")
        out.append(seen.pop() if seen else None)
    return out


def _packed(items: Sequence[Optional[Tensor]], shapes: Sequence[Optional[Tuple[int, ...]]], fill: float,
            dtype: torch.dtype) -> Tensor:
    parts = [(t.detach().reshape(-1).to("cpu", dtype) if t is not None else
              torch.full((math.prod(s),), fill, dtype=dtype)) for t, s in zip(items, shapes) if s is not None]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def _unpacked(flat: Tensor, shapes: Sequence[Optional[Tuple[int, ...]]], device: torch.device,
              dtype: torch.dtype) -> List[Optional[Tensor]]:
    out, at = [], 0
    for s in shapes:
        if s is None:
            out.append(None)
            continue
        n = math.prod(s)
        out.append(flat[at:at + n].reshape(s).to(device, dtype))
        at += n
    return out


def global_ranges(sync: Sync, mins: Sequence[Optional[Tensor]], maxs: Sequence[Optional[Tensor]], device: torch.device,
                  what: str) -> Tuple[List[Optional[Tensor]], List[Optional[Tensor]]]:
    """Element-wise MIN of ``mins`` and MAX of ``maxs`` over the ranks (None where a rank saw nothing)."""
    shapes = _shapes(sync, [None if m is None else tuple(m.shape) for m in mins], what)
    lo = sync.min(_packed(mins, shapes, math.inf, torch.float32))
    hi = sync.max(_packed(maxs, shapes, -math.inf, torch.float32))
    return _unpacked(lo, shapes, device, torch.float32), _unpacked(hi, shapes, device, torch.float32)


def reduce_observers(observers: Dict[str, Observer], sync: Sync, device: torch.device) -> None:
    """Replace every observer's statistics by those of all ranks together (in place, the same on every rank)."""
    if not sync.active:
        return
    names = list(observers)
    obs = [observers[n] for n in names]
    sync.check_same([(n, type(o).__name__, o.axis) for n, o in zip(names, obs)], "the set of activation observers")
    plain = [o for o in obs if not isinstance(o, (HistogramObserver, MovingAverageMinMaxObserver))]
    lo, hi = global_ranges(sync, [o.min_val for o in plain], [o.max_val for o in plain], device, "observers")
    for o, a, b in zip(plain, lo, hi):
        o.min_val, o.max_val = a, b  # minmax: MIN / MAX is exactly one rank on all the data
    _reduce_moving_averages(sync, [o for o in obs if isinstance(o, MovingAverageMinMaxObserver)], device)
    _reduce_histograms(sync, [o for o in obs if isinstance(o, HistogramObserver)], device)


def _reduce_moving_averages(sync: Sync, obs: List[MovingAverageMinMaxObserver], device: torch.device) -> None:
    """The mean over the ranks that saw data of their final running min and max (no order-free merge exists)."""
    shapes = _shapes(sync, [None if o.min_val is None else tuple(o.min_val.shape) for o in obs], "observers")
    seen = sync.sum_exact(torch.tensor([int(o.min_val is not None) for o in obs], dtype=torch.int64))
    lo = sync.sum_ordered(_packed([o.min_val for o in obs], shapes, 0.0, torch.float64))
    hi = sync.sum_ordered(_packed([o.max_val for o in obs], shapes, 0.0, torch.float64))
    count = torch.cat([torch.full((math.prod(s),), float(c)) for s, c in zip(shapes, seen.tolist()) if s is not None]
                      or [torch.zeros(0)]).double()
    lo, hi = lo / count.clamp(min=1), hi / count.clamp(min=1)
    for o, a, b in zip(obs, _unpacked(lo, shapes, device, torch.float32), _unpacked(hi, shapes, device, torch.float32)):
        o.min_val, o.max_val = a, b


def _reduce_histograms(sync: Sync, obs: List[HistogramObserver], device: torch.device) -> None:
    """MAX of R, each rank's counts merged up to it (exact), SUM of the int64 counts, MIN / MAX of the range."""
    if not obs:
        return
    lo, hi = global_ranges(sync, [o.min_val for o in obs], [o.max_val for o in obs], device, "histogram observers")
    mine = torch.tensor([o.R if o.R is not None else 0.0 for o in obs], dtype=torch.float64)
    ranges = sync.max(mine).tolist()
    counts = []
    for o, R in zip(obs, ranges):
        if o.R is None:
            counts.append(torch.zeros(2, o.bins, dtype=torch.int64))
        else:
            counts.append(torch.stack([rebin_counts(o.pos, o.R, R), rebin_counts(o.neg, o.R, R)]).cpu())
    total = sync.sum_exact(torch.stack(counts))
    for o, R, c, a, b in zip(obs, ranges, total, lo, hi):
        if a is None:
            continue  # no rank saw this module: it stays empty everywhere
        o.R, o.pos, o.neg, o.min_val, o.max_val = R, c[0].to(device), c[1].to(device), a, b


def reduce_channel_stats(stats: Dict[str, Any], sync: Sync, device: torch.device) -> None:
    """SmoothQuant's per-channel activation min / max (ChannelStats): MIN / MAX over the ranks, in place. The
    sampled rows stay per rank: alpha="auto" sums its errors over them (search_alpha's ``reduce``)."""
    if not sync.active:
        return
    items = list(stats.values())
    lo, hi = global_ranges(sync, [s.min for s in items], [s.max for s in items], device, "SmoothQuant inputs")
    for s, a, b in zip(items, lo, hi):
        s.min, s.max = a, b


def reduce_mean_inputs(sync: Sync, stats: Dict[str, Any], flush: Callable[[str], None],
                       out_channels: Dict[str, int], device: torch.device) -> None:
    """Bias correction's running input sums (weight_tuning._MeanInput): the sums of all ranks, in place.

    When every rank holds one input sum of the same shape per layer, sums and counts are added (the mean of all
    inputs, as one process computes it up to float rounding); otherwise (inputs of changing spatial size) each rank
    first reduces its sum to a count-weighted output shift, and those are added.
    """
    if not sync.active:
        return
    names = list(stats)
    meta = sync.gather([(None if stats[n].sum is None else tuple(stats[n].sum.shape), stats[n].shift_sum is not None)
                        for n in names])
    for i, n in enumerate(names):
        st = stats[n]
        shapes = {m[i][0] for m in meta if m[i][0] is not None}
        if not shapes and not any(m[i][1] for m in meta):
            continue  # never called on any rank
        if len(shapes) == 1 and not any(m[i][1] for m in meta):
            mine = st.sum if st.sum is not None else torch.zeros(shapes.pop(), dtype=torch.float64)
            st.sum = sync.sum_ordered(mine).to(device)  # float64: the mean of all ranks' inputs
            st.count = int(sync.sum_exact(torch.tensor([st.count], dtype=torch.int64)))
            continue
        flush(n)
        mine = st.shift_sum if st.shift_sum is not None else torch.zeros(out_channels[n], dtype=torch.float64)
        st.shift_sum = sync.sum_ordered(mine).to(device)
        st.shift_count = int(sync.sum_exact(torch.tensor([st.shift_count], dtype=torch.int64)))
