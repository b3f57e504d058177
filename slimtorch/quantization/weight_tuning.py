r"""Post-training weight tuning for int8 QDQ layers: MSE weight scales and bias correction.

| function                 | what                                                                                  |
|--------------------------|---------------------------------------------------------------------------------------|
| mse_weight_scale         | per-channel symmetric int8 scale s_c = r_c * max\|W_c\| / 127.5, r_c in [min_ratio, 1]|
|                          | chosen to minimize sum_j (W_cj - fq(W_cj))^2                                          |
| output_shift             | E[op(x, dW)] per output channel from the mean input (exact: the op is linear in x)    |
| set_weight_scale         | re-quantize a QDQ layer's int8 weight with new scales (zero point stays 0)            |
| correct_bias             | empirical bias correction of a QDQ model: b_c += E[op(x_q, W_float - W_int8)]_c       |

Bias correction (Nagel et al. 2019, "Data-Free Quantization through Weight Equalization and Bias Correction",
the empirical variant): rounding the weight shifts each output channel's mean by E[(W - W_q) x]; adding it back to
the bias removes that shift. ``x`` is the layer's own (fake-quantized) input in the QDQ model, so the correction
also sees what quantization upstream did to the input mean. Zero points stay 0, so a pruned weight stays exactly 0.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batches import first_tensor, model_device
from ..errors import CalibrationError, ConfigError
from .distributed import LOCAL, reduce_mean_inputs
from .grid import quantize, round_to_grid, symmetric_scale
from .passes import feed_batches, hooks_attached
from .qdq import QDQ_MODULES, QDQModule

__all__ = ["mse_weight_scale", "output_shift", "set_weight_scale", "correct_bias", "weight_quant_delta"]


def _channels_first(w: Tensor, axis: int) -> Tensor:
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def mse_weight_scale(weight: Tensor, axis: Optional[int] = 0, *, num_steps: int = 50, min_ratio: float = 0.5,
                     chunk_elements: int = 1 << 24) -> Tensor:
    """Symmetric int8 scale(s) minimizing the squared rounding + clipping error.

    Searches the grid's symmetric scale of ``r * amax`` (quantization/grid.py: ``r * amax / 127.5``) for
    ``num_steps`` ratios ``r`` evenly spaced in ``[min_ratio, 1]`` (``r = 1``, the minmax scale, is always a
    candidate, so the error is never larger than minmax's). ``axis``: the channel axis (1-d result, one scale per
    channel) or None (0-d, one scale for the tensor). Values land on the int8 grid, as the QDQ layers store them.
    """
    if not 0 < min_ratio <= 1 or num_steps < 1:
        raise ConfigError(f"mse_weight_scale needs 0 < min_ratio <= 1 and num_steps >= 1, got {min_ratio}, {num_steps}")
    w = weight.detach().to(torch.float32)
    flat = w.reshape(1, -1) if axis is None else _channels_first(w, axis)
    if not torch.isfinite(flat).all():
        raise CalibrationError("cannot choose a weight scale: the weight contains NaN or inf")
    amax = flat.abs().amax(1)
    ratios = torch.linspace(1.0, min_ratio, num_steps, device=w.device) if num_steps > 1 else \
        torch.ones(1, device=w.device)
    best_err = torch.full_like(amax, float("inf"))
    best = symmetric_scale(amax)
    per_ratio = max(1, chunk_elements // max(1, flat.numel()))  # bound the [ratios, C, K] temporary
    for start in range(0, len(ratios), per_ratio):
        r = ratios[start:start + per_ratio]
        s = symmetric_scale(r[:, None] * amax[None, :])  # [R, C]
        q = round_to_grid(flat[None], s[..., None], None, "int8") * s[..., None]
        err = ((q - flat[None]) ** 2).sum(-1)  # [R, C]
        e_min, idx = err.min(0)
        better = e_min < best_err  # strict: ties keep the larger (earlier) ratio, minmax first
        best_err = torch.where(better, e_min, best_err)
        best = torch.where(better, s.gather(0, idx[None])[0], best)
    return best if axis is not None else best.reshape(())


def _linear_shift(x: Tensor, d: Tensor, **conv) -> Tensor:
    return F.linear(x, d)


def _conv1d_hf_shift(x: Tensor, d: Tensor, **conv) -> Tensor:
    return x @ d  # transformers' Conv1D: delta [in, out]


def _conv_shift(op: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def shift(x: Tensor, d: Tensor, **conv) -> Tensor:
        y = op(x[None], d, None, conv.get("stride", 1), 0, conv.get("dilation", 1), conv.get("groups", 1))
        return y[0].reshape(y.shape[1], -1).mean(1)  # the mean over the output positions
    return shift


#: the output shift of each op type, as the config's ``op_types`` name them
OUTPUT_SHIFTS: Dict[str, Callable[..., Tensor]] = {
    "Linear": _linear_shift, "Conv1D": _conv1d_hf_shift, "Conv1d": _conv_shift(F.conv1d),
    "Conv2d": _conv_shift(F.conv2d)}


def output_shift(kind: str, mean_input: Tensor, weight_delta: Tensor, **conv) -> Tensor:
    """Per-output-channel mean of ``op(x, weight_delta)`` (no bias), from the mean input alone (the op is linear).

    ``kind``: "Linear" (``mean_input`` [in], delta [out, in]), "Conv1D" (transformers', delta [in, out]),
    "Conv1d"/"Conv2d" (``mean_input`` [C, *spatial] = the batch mean of the padded input, delta the conv weight;
    ``conv``: stride, dilation, groups; the result is the mean over the output positions).
    """
    if kind not in OUTPUT_SHIFTS:
        raise ConfigError(f"output_shift: unknown op kind {kind!r}")
    return OUTPUT_SHIFTS[kind](mean_input.to(torch.float32), weight_delta.to(torch.float32), **conv)


def set_weight_scale(qdq: QDQModule, weight: Tensor, scale: Tensor) -> None:
    """Re-quantize ``qdq``'s int8 weight from the float ``weight`` with ``scale`` (per channel on the layer's weight
    axis, or 0-d), zero point 0, on the int8 grid: what :class:`QDQModule` stores, with another scale."""
    w = weight.detach().to(torch.float32).to(qdq.weight_int8.device)
    if tuple(w.shape) != tuple(qdq.weight_int8.shape):
        raise ConfigError(f"set_weight_scale: weight {tuple(w.shape)} does not match the layer's "
                          f"{tuple(qdq.weight_int8.shape)}")
    scale = scale.detach().to(torch.float32).to(w.device)
    axis = qdq.weight_axis if scale.dim() == 1 else None
    qdq.weight_int8 = quantize(w, scale, dtype="int8", axis=axis)
    qdq.weight_scale = scale


def _kind(qdq: QDQModule) -> str:
    for k, cls in QDQ_MODULES.items():
        if type(qdq) is cls or isinstance(qdq, cls):
            return k
    raise ConfigError(f"{type(qdq).__name__} is not a slimtorch QDQ layer")


def _op_input(qdq: QDQModule, x: Tensor) -> Tensor:
    """What the layer's weight op sees: the fake-quantized input, padded as the layer's forward() pads it."""
    xq = qdq.quantize_input(x.detach()).to(torch.float32)
    if getattr(qdq, "pre_pad", None) is not None:
        xq = F.pad(xq, qdq.pre_pad)
    if hasattr(qdq, "padding_mode"):
        if qdq.padding_mode != "zeros":
            xq = F.pad(xq, qdq.reversed_padding, mode=qdq.padding_mode)
        else:
            pad = qdq.padding
            if pad == "same":
                k = qdq.weight_int8.shape[2:]
                total = [d * (kk - 1) for d, kk in zip(qdq.dilation, k)]
                widths = []
                for t in reversed(total):
                    widths += [t // 2, t - t // 2]
                xq = F.pad(xq, widths)
            elif pad != "valid":
                p = [pad] * (xq.dim() - 2) if isinstance(pad, int) else list(pad)
                widths = []
                for pp in reversed(p):
                    widths += [pp, pp]
                xq = F.pad(xq, widths)
    return xq


class _MeanInput:
    """Running mean of a layer's op input: over the batch for convs (keeping positions), over all rows otherwise.
    Conv inputs of changing spatial size are reduced to their output shift batch by batch instead."""

    def __init__(self):
        self.sum: Optional[Tensor] = None
        self.count = 0
        self.shift_sum: Optional[Tensor] = None  # sum of per-batch shifts (variable spatial sizes)
        self.shift_count = 0


def correct_bias(model: nn.Module, float_weights: Dict[str, Tensor], loader: Iterable, *, num_batches: int = 100,
                 input_fn: Optional[Callable[[Any], Any]] = None, sync: Any = None) -> Dict[str, float]:
    """Empirical bias correction, in place, of the QDQ layers named in ``float_weights`` (``{name: float weight}``).

    One pass over up to ``num_batches`` batches of ``loader`` (fed as calibration feeds them) records the mean
    fake-quantized input of every named layer; then ``bias_c += E[op(x_q, W - W_q)]_c`` (a float32 bias is created
    where the layer had none). The float weights must be the ones the layers were quantized from (after BN folding
    and SmoothQuant), in the layers' own layout. One pass, not layer by layer: the correction of a layer changes the
    mean input of the next ones only through ``(W - W_q) * shift``, second order. Layers never called keep their
    bias. Returns ``{name: max |correction|}`` of the corrected layers. ``sync`` (distributed calibration): the
    input means are those of every rank's batches together (quantization/distributed.py).
    """
    sync = LOCAL if sync is None else sync
    if num_batches < 1:
        raise ConfigError(f"correct_bias: num_batches must be >= 1, got {num_batches}")
    named = dict(model.named_modules())
    missing = [n for n in float_weights if n not in named]
    if missing:
        raise ConfigError(f"correct_bias: no module named {missing[:5]} in {type(model).__name__}")
    layers = {n: named[n] for n in float_weights}
    kinds = {n: _kind(m) for n, m in layers.items()}
    stats = {n: _MeanInput() for n in layers}

    def make_hook(name):
        qdq, st = layers[name], stats[name]

        def hook(module, args, kwargs):
            x = first_tensor(args, kwargs)
            if x is None:
                return None
            xq = _op_input(qdq, x)
            if kinds[name] in ("Conv1d", "Conv2d"):
                m = xq.sum(0) if xq.dim() == qdq.weight_int8.dim() else xq  # unbatched conv input
                n = xq.shape[0] if xq.dim() == qdq.weight_int8.dim() else 1
                if st.sum is not None and st.sum.shape != m.shape:  # spatial size changed: reduce what we have
                    _flush(name)
                st.sum = m if st.sum is None else st.sum + m
                st.count += n
            else:
                rows = xq.reshape(-1, xq.shape[-1])
                s = rows.sum(0)
                st.sum = s if st.sum is None else st.sum + s
                st.count += rows.shape[0]
            return None
        return hook

    deltas = {n: weight_quant_delta(layers[n], float_weights[n]) for n in layers}

    def shift_of(name, mean):
        q = layers[name]
        conv = dict(stride=q.stride, dilation=q.dilation, groups=q.groups) if hasattr(q, "groups") else {}
        return output_shift(kinds[name], mean, deltas[name], **conv)

    def _flush(name):
        st = stats[name]
        if st.sum is None:
            return
        shift = shift_of(name, st.sum / st.count) * st.count
        st.shift_sum = shift if st.shift_sum is None else st.shift_sum + shift
        st.shift_count += st.count
        st.sum, st.count = None, 0

    device = model_device(model)
    with sync.guard("bias correction"):
        with hooks_attached(pre=[(m, make_hook(n)) for n, m in layers.items()], with_kwargs=True):
            seen = feed_batches(model, loader, what="bias correction", num_batches=num_batches, input_fn=input_fn)
        if seen == 0:
            raise CalibrationError("bias correction: the loader yielded no batches")
    reduce_mean_inputs(sync, stats, _flush, {n: q.weight_int8.shape[q.weight_axis] for n, q in layers.items()}, device)
    report = {}
    with torch.no_grad():
        for name, q in layers.items():
            _flush(name)
            st = stats[name]
            if st.shift_sum is None:  # never called: leave the layer as it is
                continue
            shift = st.shift_sum / st.shift_count
            bias = torch.zeros_like(shift) if q.bias is None else q.bias.detach().to(torch.float32)
            new_bias = (bias + shift).to(device=q.weight_int8.device,
                                         dtype=torch.float32 if q.bias is None else q.bias.dtype)
            q.bias = new_bias
            report[name] = float(shift.abs().max())
    return report


def weight_quant_delta(qdq: QDQModule, float_weight: Tensor) -> Tensor:
    """``W_float - W_int8 * scale`` of a QDQ layer, in its stored layout."""
    w = float_weight.detach().to(torch.float32).to(qdq.weight_int8.device)
    if tuple(w.shape) != tuple(qdq.weight_int8.shape):
        raise ConfigError(f"float weight {tuple(w.shape)} does not match the QDQ layer's "
                          f"{tuple(qdq.weight_int8.shape)}")
    return w - qdq.dequantized_weight(torch.float32)
