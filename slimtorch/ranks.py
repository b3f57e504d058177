"""Agreement across the ranks of a torch.distributed job, before anything collective runs.

A check that fails on one rank only (a config that its rank-dependent value makes invalid, a model built otherwise)
must not leave the other ranks waiting in the next collective: they would hang there, or die much later with the
backend's "Connection closed by peer". So every distributed entry point (``quantize``, ``prepare_pruning`` under
DDP/FSDP2, ``slimtorch.deepspeed.initialize`` at every ZeRO stage, the Trainer callback) validates on every rank
inside :func:`guard`, which then agrees on the outcome with one collective: a failing rank raises its own error,
and every other rank a :class:`~slimtorch.DistributedError` carrying the failing rank's message. Configs that are
valid on every rank but differ are named setting by setting (:func:`check_same_config`).

Without an initialized process group of more than one rank nothing here communicates.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

from .errors import DistributedError

_BACKEND_DEVICE = {"nccl": "cuda", "xccl": "xpu"}


def world(group: Any = None) -> int:
    """The number of ranks in ``group`` (the default group when None); 1 without torch.distributed."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def device_of(group: Any = None) -> torch.device:
    """Where the backend of ``group`` reduces tensors: the current CUDA (XPU) device for nccl (xccl), else the CPU."""
    kind = _BACKEND_DEVICE.get(str(torch.distributed.get_backend(group)))
    return torch.device(kind, getattr(torch, kind).current_device()) if kind else torch.device("cpu")


def gather(obj: Any, group: Any = None) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without communication on one rank."""
    if world(group) < 2:
        return [obj]
    out: List[Any] = [None] * world(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def raise_everywhere(failure: Optional[BaseException], describe: Callable[[int, str], str], group: Any = None,
                     device: Optional[torch.device] = None) -> None:
    """Collective: when any rank of ``group`` failed, raise on the others a DistributedError whose message is
    ``describe(failing rank, "ErrorType: its message")``; the failing rank returns (its caller re-raises its own
    error). Costs one small all_reduce when nobody failed."""
    if world(group) < 2:
        return
    flag = torch.tensor([int(failure is not None)], dtype=torch.int64, device=device or device_of(group))
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
    if not int(flag.item()):
        return
    messages = gather(None if failure is None else f"{type(failure).__name__}: {failure}", group)
    if failure is None:
        rank, message = next((r, m) for r, m in enumerate(messages) if m is not None)
        raise DistributedError(describe(rank, message))


@contextmanager
def guard(describe: Callable[[int, str], str], group: Any = None,
          device: Optional[torch.device] = None) -> Iterator[None]:
    """``with guard(describe): <checks and local work, no collectives>``: an exception on any rank is raised on
    every rank (:func:`raise_everywhere`), never left for the others to wait on."""
    try:
        yield
    except Exception as error:  # noqa: BLE001  (any failure: the others must hear of it, whatever it is)
        raise_everywhere(error, describe, group, device)
        raise
    raise_everywhere(None, describe, group, device)


def differences(reference: Any, other: Any, path: str = "") -> List[Tuple[str, Any, Any]]:
    """``(dotted path, reference value, other value)`` of every leaf where two nested dicts (configs) differ; a key
    missing on one side has the value ``"(not set)"``."""
    if isinstance(reference, dict) and isinstance(other, dict):
        out: List[Tuple[str, Any, Any]] = []
        for key in list(reference) + [k for k in other if k not in reference]:
            where = f"{path}.{key}" if path else str(key)
            out += differences(reference.get(key, "(not set)"), other.get(key, "(not set)"), where)
        return out
    return [] if reference == other else [(path, reference, other)]


def check_same_config(config: dict, what: str, group: Any = None) -> None:
    """Collective: DistributedError on every rank unless ``config`` (a config's plain dump) is the same on all
    ranks; the message names each differing setting with its values, e.g. ``different_groups.sp1.params.dense_ratio:
    0.5 on rank 0, 0.25 on rank 1``."""
    everyone = gather(config, group)
    for rank, theirs in enumerate(everyone):
        found = differences(everyone[0], theirs)
        if found:
            listed = "; ".join(f"{p}: {a!r} on rank 0, {b!r} on rank {rank}" for p, a, b in found[:5])
            more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
            raise DistributedError(
                f"{what} differs between rank 0 and rank {rank}: {listed}{more}. Every rank must load the same "
                "config (a value computed from the rank, e.g. LOCAL_RANK, gives each rank another setting)")
