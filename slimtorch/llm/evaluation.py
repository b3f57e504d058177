"""Perplexity of a causal LM over a token stream, and the token windows calibration cuts from a stream.

The protocol (benchmarks/_smollm2.py measures SmolLM2 with it):

* The stream (one tokenized text, no BOS token added) is cut into **non-overlapping windows** of ``window``
  tokens: tokens ``[0, window)``, ``[window, 2 * window)``, ... Each window is one independent forward pass
  (``use_cache=False``, no attention mask: every token of a window is real), so no token sees context from the
  previous window.
* **The short tail is dropped**: the last ``N % window`` tokens are not evaluated, so that every prediction has
  the same context budget and the result does not depend on how long the last piece happens to be.
* Inside a window, token ``t`` is predicted from tokens ``< t``; **the first token of every window has no
  prediction**. Tokens predicted = ``windows * (window - 1)``; ``windows = N // window``.
* ``nll`` is the mean negative log-likelihood (natural log) over all predicted tokens, computed from the logits
  in float32 whatever the model's dtype (a window's sum in float32, windows accumulated in float64);
  ``perplexity = exp(nll)``. A model that produces
  NaN or inf logits gets a NaN or inf perplexity (reported, not raised: a broken compression is a result).

The model runs in eval mode under ``torch.no_grad()``; every submodule's own train/eval mode is restored
afterwards, also on errors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batches import model_device
from ..errors import ConfigError
from ..quantization.passes import preserved_modes, progress_bar
from ..token_ids import check_token_ids

__all__ = ["PerplexityResult", "perplexity", "token_windows"]


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(nll)``; ``nll`` is the mean over ``tokens`` predicted tokens in ``windows`` windows."""

    perplexity: float
    nll: float
    tokens: int
    windows: int


def _as_stream(token_ids: Tensor) -> Tensor:
    """``token_ids`` as a 1-D integer tensor (accepts [N] or [1, N])."""
    if not isinstance(token_ids, Tensor):
        raise ConfigError(f"token_ids must be a torch.Tensor of token ids, got {type(token_ids).__name__}")
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1:
        raise ConfigError(f"token_ids must have shape [N] or [1, N] (one token stream), got {list(token_ids.shape)}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise ConfigError(f"token_ids must be integer token ids, got dtype {token_ids.dtype}")
    return token_ids


def token_windows(token_ids: Tensor, window: int, count: Optional[int] = None) -> Tensor:
    """The first ``count`` (None: all) consecutive non-overlapping windows of ``window`` tokens of the stream
    ``token_ids`` ([N] or [1, N]), as a [count, window] tensor (a view when possible); the short tail is dropped.

    Raises :class:`~slimtorch.ConfigError` for a window < 2, a stream shorter than one window, or a ``count``
    larger than the stream holds.
    """
    stream = _as_stream(token_ids)
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ConfigError(f"window must be an integer >= 2 (a window's first token has no prediction), got {window!r}")
    available = stream.numel() // window
    if available == 0:
        raise ConfigError(f"the token stream has {stream.numel()} tokens, fewer than one window of {window}; "
                          f"pass more text or a smaller window")
    if count is None:
        count = available
    elif isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"count must be a positive integer or None, got {count!r}")
    elif count > available:
        raise ConfigError(f"asked for {count} windows of {window} tokens, but the stream of {stream.numel()} tokens "
                          f"holds only {available}; pass more text, a smaller window or count <= {available}")
    return stream[:count * window].reshape(count, window)


def _logits(output: Any) -> Tensor:
    """The logits of a model's output: a transformers ModelOutput, a tuple (logits first) or a bare tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise ConfigError(f"the model returned {type(output).__name__} without logits; perplexity needs a causal LM "
                          f"whose output has .logits (or is the logits tensor)")
    return logits


def perplexity(model: nn.Module, token_ids: Tensor, *, window: int = 512, batch_size: int = 1,
               device: Union[str, torch.device, None] = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of the causal LM ``model`` over the token stream ``token_ids`` ([N] or [1, N]), by the
    non-overlapping-window protocol of this module (short tail dropped, each window's first token unpredicted).

    ``batch_size`` windows run per forward pass: the same result, and about three logits-sized float32 buffers
    per window (~300 MB for 512 tokens x SmolLM2's 49,152-token vocabulary). The windows are sent to ``device``
    (None: the device of the model's first parameter; name it for a model spread over several devices). The model
    is called as ``model(input_ids=..., use_cache=False)``. ``progress`` shows a bar on stderr.
    """
    windows = token_windows(token_ids, window)
    check_token_ids(model, windows, f"the evaluation token stream, cut in windows of {window}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    target_device = model_device(model) if device is None else torch.device(device)
    windows = windows.to(torch.long)
    total_nll = 0.0  # a Python float: float64 accumulation over ~10^5 tokens
    predicted = 0
    bar = progress_bar(len(windows), "perplexity", unit="window") if progress else None
    try:
        with preserved_modes(model, "eval"), torch.no_grad():
            for start in range(0, len(windows), batch_size):
                batch = windows[start:start + batch_size].to(target_device)
                logits = _logits(model(input_ids=batch, use_cache=False))
                if logits.shape[:2] != batch.shape:
                    raise ConfigError(f"the model's logits have shape {list(logits.shape)}, expected "
                                      f"{list(batch.shape)} + [vocab] for input_ids of shape {list(batch.shape)}")
                # position t predicts token t + 1; the window's first token is never a target
                nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                      batch[:, 1:].reshape(-1), reduction="sum")
                total_nll += nll.item()
                predicted += batch[:, 1:].numel()
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    mean_nll = total_nll / predicted
    ppl = math.inf if mean_nll > 709.0 else math.exp(mean_nll)  # exp overflows past ~709.78; NaN stays NaN
    return PerplexityResult(perplexity=ppl, nll=mean_nll, tokens=predicted, windows=len(windows))
