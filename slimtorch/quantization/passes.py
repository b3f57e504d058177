"""Passes over calibration data: every statistic quantization and the block pipeline collect (observers,
SmoothQuant's channel ranges, bias correction's mean inputs, the accuracy search's reference outputs, the decoder
blocks' captured calls, GPTQ's Hessians) comes from :func:`feed_batches`, the one calibration loop, and every step
that runs the model does it inside :func:`preserved_modes`.

| name              | what it does                                                                            |
|-------------------|-----------------------------------------------------------------------------------------|
| preserved_modes   | eval (or train) mode inside; every submodule's own mode back afterwards, also on errors  |
| hooks_attached    | forward (pre-)hooks on some modules for the duration of a block, always removed          |
| feed_batches      | up to N batches through the model: input_fn, device, feeding rules, no_grad, errors;    |
|                   | hooks attached for the pass; a hook may end a forward early (:class:`StopForward`)      |
| progress_bar      | a tqdm bar on stderr, or plain progress lines without tqdm                              |
| ReplayableLoader  | the user's loader with ``calib_input_fn`` applied, iterable more than once               |

Batches are fed as docs/conventions.md says (:func:`slimtorch.batches.feed`). ``tests/test_single_core.py`` fails
if a second loop that feeds batches to a model appears in slimtorch.
"""
from __future__ import annotations

import itertools
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..batches import describe, feed
from ..errors import CalibrationError, SlimError
from ..token_ids import check_token_ids, token_ids_of

Hook = Tuple[nn.Module, Callable[..., Any]]


class StopForward(Exception):
    """Raised by a hook once it has recorded what the pass needs (the block pipeline's capture stops before the
    blocks it does not need to run): :func:`feed_batches` ends that batch's forward there and counts it as fed."""


@contextmanager
def preserved_modes(model: nn.Module, mode: Optional[str] = "eval") -> Iterator[nn.Module]:
    """``model`` in ``mode`` ("eval", "train", or None to leave it) inside the block; afterwards, also on errors,
    every submodule has its own train/eval mode back (a model with a frozen eval part keeps it)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if mode is not None:
            model.train(mode == "train")
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def hooks_attached(pre: Sequence[Hook] = (), post: Sequence[Hook] = (), *, with_kwargs: bool = False
                   ) -> Iterator[None]:
    """Forward pre-hooks ``pre`` and forward hooks ``post`` ((module, hook) pairs) attached inside the block."""
    handles = []
    try:
        for m, hook in pre:
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
        for m, hook in post:
            handles.append(m.register_forward_hook(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for h in handles:
            h.remove()


class _TextProgress:
    """Progress lines on stderr, every tenth of the run, where tqdm is not installed."""

    def __init__(self, total: int, label: str, unit: str):
        self.total, self.label, self.unit, self.n, self.every = total, label, unit, 0, max(1, total // 10)

    def update(self, k: int) -> None:
        self.n += k
        if self.n % self.every == 0 or self.n == self.total:
            print(f"{self.label}: {self.n}/{self.total} {_plural(self.unit)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")  # batches, blocks, windows


def progress_bar(total: int, label: str, unit: str = "batch"):
    """A tqdm bar on stderr (``update(k)``, ``close()``), or progress lines where tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextProgress(total, label, unit)
    return tqdm(total=total, desc=label, unit=unit, file=sys.stderr, leave=False)


def feed_batches(model: nn.Module, batches: Iterable, *, what: str, num_batches: Optional[int] = None,
                 input_fn: Optional[Callable[[Any], Any]] = None,
                 on_batch: Optional[Callable[[int], None]] = None,
                 on_output: Optional[Callable[[int, Any], None]] = None,
                 progress: Optional[str] = None, pre: Sequence[Hook] = (), post: Sequence[Hook] = (),
                 hook_kwargs: bool = False) -> int:
    """Feed up to ``num_batches`` (None: all) of ``batches`` to ``model`` in eval mode, without gradients; returns
    how many were fed. Never reads a batch too many from a one-shot loader.

    Each batch is fed by :func:`slimtorch.batches.feed` (``input_fn``, the model's device, the feeding rules);
    ``pre`` / ``post`` forward (pre-)hooks are attached for the pass (``hook_kwargs``: they receive the keyword
    arguments too); ``on_batch(i)`` runs before batch i, ``on_output(i, output)`` after it (output None when a hook
    raised :class:`StopForward`). A batch the model rejects is a :class:`~slimtorch.CalibrationError` that names
    ``what``, the batch's index and its structure; slimtorch's own errors raised inside (an observer's, with its own
    context) pass through unchanged. ``progress`` labels a progress bar on stderr (None: no bar). Train/eval modes
    are restored afterwards, also on errors.
    """
    bar = None
    if progress is not None:
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:  # a generator, or a loader whose length is unknown
            total = num_batches
        known = [t for t in (total, num_batches) if t is not None]
        bar = progress_bar(min(known) if known else 0, progress)
    seen = 0
    try:
        with preserved_modes(model, "eval"), torch.no_grad(), hooks_attached(pre, post, with_kwargs=hook_kwargs):
            source = batches if num_batches is None else itertools.islice(batches, num_batches)
            for i, batch in enumerate(source):
                if on_batch is not None:
                    on_batch(i)
                inputs = input_fn(batch) if input_fn is not None else batch
                try:
                    out = feed(model, inputs)
                except StopForward:
                    out = None
                except SlimError:
                    raise
                except Exception as e:  # the model (or the feeding rules) rejected this batch
                    check_token_ids(model, token_ids_of(inputs), f"{what} batch {i}")  # the usual cause, named
                    raise CalibrationError(f"{what} batch {i} ({describe(inputs)}) could not be fed to "
                                           f"{type(model).__name__}: {type(e).__name__}: {e}") from e
                if on_output is not None:
                    on_output(i, out)
                seen += 1
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return seen


class ReplayableLoader:
    """The user's loader, with ``calib_input_fn`` applied, iterable more than once (BN folding, SmoothQuant,
    calibration, bias correction and the accuracy search each pass over it); counts the batches the last pass
    yielded. A one-shot loader (a generator) is cached as it is read, so every pass sees the same batches."""

    def __init__(self, loader: Iterable, input_fn: Optional[Callable[[Any], Any]] = None):
        if isinstance(loader, (str, bytes)) or not hasattr(loader, "__iter__"):
            raise CalibrationError(f"calib_dataloader must be an iterable of batches (a DataLoader, a list of "
                                   f"tensors or dicts), got {type(loader).__name__}")
        self.loader, self.input_fn = loader, input_fn
        self._one_shot = iter(loader) is loader
        self._cache: List[Any] = []
        self.batches_seen = 0

    def __iter__(self):
        self.batches_seen = 0
        source = self._cached() if self._one_shot else iter(self.loader)
        for i, batch in enumerate(source):
            if self.input_fn is not None:
                try:
                    batch = self.input_fn(batch)
                except Exception as e:
                    raise CalibrationError(f"calib_input_fn raised on calibration batch {i} ({describe(batch)}): "
                                           f"{type(e).__name__}: {e}") from e
            self.batches_seen += 1
            yield batch

    def _cached(self):
        yield from self._cache
        for batch in self.loader:
            self._cache.append(batch)
            yield batch

    def __len__(self):
        return len(self.loader)  # TypeError for a generator: a progress bar then counts up to num_batches

    def first(self):
        """The first batch (converted); a CalibrationError when the loader yields none."""
        for batch in self:
            return batch
        raise CalibrationError("the calibration loader yielded no batches; static quantization needs at least one "
                               "batch of representative inputs")
