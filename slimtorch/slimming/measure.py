"""What slimming is judged by, measured on the user's example input: parameters, multiply-accumulates, latency
(median of timed runs after warm-up), and the values removed units carry into their consumers."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch import Tensor, nn


def call(model: nn.Module, example_inputs: Any) -> Any:
    """``model`` on ``example_inputs`` (a tensor, a tuple of positional arguments or a dict of keywords)."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, Tensor):
        return model(example_inputs)
    return model(*example_inputs)


def output_tensors(out: Any) -> List[Tensor]:
    """The floating-point tensors of a model output (tensors, tuples, dicts, ModelOutput), in order."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        values = out.values() if isinstance(out, dict) else out.to_tuple()
        return [t for v in values for t in output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in output_tensors(v)]
    return []


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of the model's Linear and Conv layers on the example input (the rest is small)."""
    total = [0]

    def count(module, args, out):
        if isinstance(module, nn.Linear):
            total[0] += out.numel() * module.in_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            kernel = module.weight[0].numel()  # in_channels / groups x kernel positions
            total[0] += out.numel() * kernel

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    try:
        with torch.no_grad():
            call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def median_seconds(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def captured_inputs(model: nn.Module, names: List[str]) -> Iterator[Dict[str, List[Tensor]]]:
    """Record the first positional input of each named module on every call, while the context is open."""
    seen: Dict[str, List[Tensor]] = {n: [] for n in names}
    handles = []
    for name in names:
        def hook(module, args, name=name):
            if args and isinstance(args[0], Tensor):
                seen[name].append(args[0].detach())
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def constant_channels(inputs: List[Tensor], channels: Tensor, channel_dim: int,
                      rtol: float = 1e-6) -> Tuple[Tensor, float]:
    """The value each of ``channels`` (along ``channel_dim``) holds in every call, and the largest deviation from
    it relative to the channels' scale (0: exactly constant)."""
    columns = [x.movedim(channel_dim, -1)[..., channels.to(x.device)].reshape(-1, channels.numel()).float()
               for x in inputs]
    values = torch.cat(columns)
    mean = values.mean(dim=0)
    spread = float((values - mean).abs().max()) if values.numel() else 0.0
    scale = max(1.0, float(mean.abs().max())) if mean.numel() else 1.0
    return mean, spread / scale
