"""How QDQ modules appear in an ONNX graph: autograd Functions whose ``symbolic`` writes the QDQ nodes.

Eager PyTorch never calls these (the modules run their own math); during ``torch.onnx.export`` the modules call
:func:`export_linear` or :func:`export_conv`, whose Function's ``forward`` computes the same result as the eager
module (so tracing sees the right shapes) and whose ``symbolic`` emits, for a static Linear::

    x -> QuantizeLinear(s_x, z_x) -> DequantizeLinear(s_x, z_x) --\
                                                                   MatMul -> Add(bias)
    W^T (int8 initializer) -> DequantizeLinear(s_w, 0, axis=1) ----/

The MatMul output is not re-quantized: ONNX Runtime then fuses DQ->MatMul into one int8 GEMM that returns float
(MatMulIntegerToFloat), the fastest int8 path on x86, and the bias Add stays float. Weights are stored as int8
initializers (4x smaller files; pruned zeros stay exactly 0), zero points as constants of the activation dtype.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .grid import EPS, dequantize, fake_quantize, fake_quantize_dynamic, grid_range, half_range

_ONNX_DTYPE = {"int8": torch.int8, "uint8": torch.uint8}


def _const(g, value: Tensor):
    return g.op("Constant", value_t=value)


def _dq_weight(g, w_int8, w_scale, channels: int, axis: int):
    if channels:  # per channel
        zero = _const(g, torch.zeros(channels, dtype=torch.int8))
        return g.op("DequantizeLinear", w_int8, w_scale, zero, axis_i=axis)
    return g.op("DequantizeLinear", w_int8, w_scale, _const(g, torch.tensor(0, dtype=torch.int8)))


def _qdq_input(g, x, spec: Tuple):
    """Activation QuantizeLinear->DequantizeLinear: static constants, or qparams computed from x (dynamic)."""
    mode, act_dtype, symmetric, scale, zero_point = spec
    if mode == "static":
        s = _const(g, torch.tensor(scale, dtype=torch.float32))
        z = _const(g, torch.tensor(zero_point, dtype=_ONNX_DTYPE[act_dtype]))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)
    if mode == "dynamic_tensor" and act_dtype == "uint8":
        q, s, z = g.op("DynamicQuantizeLinear", x, outputs=3)  # ONNX's own dynamic uint8 op, same formula
        return g.op("DequantizeLinear", q, s, z)
    return _fake_quant(g, x, act_dtype, symmetric, per_token=mode == "dynamic_token")


def _fake_quant(g, x, act_dtype: str, symmetric: bool, per_token: bool):
    """Run-time quantize-dequantize written out in float ops (round(x/s)+z, clipped, minus z, times s): ONNX
    QuantizeLinear takes no per-row scale for 3-D inputs before opset 21, and DynamicQuantizeLinear is uint8 only.

    The nodes spell out quantization/grid.py's formulas with its constants (range, half range, eps), so ONNX Runtime
    computes what ``fake_quantize_dynamic`` does, bit for bit (tests/export/test_onnx.py)."""
    eps = _const(g, torch.tensor(EPS))
    zero = _const(g, torch.tensor(0.0))
    reduce = dict(axes_i=[-1], keepdims_i=1) if per_token else dict(keepdims_i=0)
    lo = g.op("Min", g.op("ReduceMin", x, **reduce), zero)  # the range always holds 0
    hi = g.op("Max", g.op("ReduceMax", x, **reduce), zero)
    qmin, qmax = (float(v) for v in grid_range(act_dtype))
    if symmetric:  # s = max|x| / ((qmax - qmin) / 2), z = 0
        half = _const(g, torch.tensor(half_range(act_dtype)))
        s = g.op("Max", g.op("Div", g.op("Max", g.op("Neg", lo), hi), half), eps)
        z = zero
    else:  # s = (max - min) / (qmax - qmin), z = qmin - round(min / s)
        s = g.op("Max", g.op("Div", g.op("Sub", hi, lo), _const(g, torch.tensor(qmax - qmin))), eps)
        z = g.op("Sub", _const(g, torch.tensor(qmin)), g.op("Round", g.op("Div", lo, s)))
    q = g.op("Add", g.op("Round", g.op("Div", x, s)), z)
    q = g.op("Clip", q, _const(g, torch.tensor(qmin)), _const(g, torch.tensor(qmax)))
    return g.op("Mul", g.op("Sub", q, z), s)


def _eager_input(x: Tensor, mode: str, act_dtype: str, symmetric: bool, scale: float, zero_point: int) -> Tensor:
    if mode == "static":
        return fake_quantize(x, torch.tensor(scale, dtype=torch.float32, device=x.device),
                             torch.tensor(zero_point, dtype=torch.int32, device=x.device), dtype=act_dtype)
    return fake_quantize_dynamic(x, act_dtype, symmetric, "tensor" if mode == "dynamic_tensor" else "token")


def _eager_weight(w_int8: Tensor, w_scale: Tensor, axis: int, dtype: torch.dtype) -> Tensor:
    return dequantize(w_int8, w_scale, axis=axis if w_scale.dim() == 1 else None).to(dtype)


class _LinearQDQ(torch.autograd.Function):
    """x @ W^T-as-[in, out] (+ bias); the weight arrives already as [in, out] int8 with channels on axis 1."""

    @staticmethod
    def forward(ctx, x, w_in_out, w_scale, bias, smooth, mode, act_dtype, symmetric, scale, zero_point):  # noqa
        x = x if smooth is None else x * smooth
        y = torch.matmul(_eager_input(x, mode, act_dtype, symmetric, scale, zero_point),
                         _eager_weight(w_in_out, w_scale, 1, x.dtype))
        return y if bias is None else y + bias

    @staticmethod
    def symbolic(g, x, w_in_out, w_scale, bias, smooth, mode, act_dtype, symmetric, scale, zero_point):
        spec = (mode, act_dtype, symmetric, scale, zero_point)
        x = x if _is_none(smooth) else g.op("Mul", x, smooth)
        w = _dq_weight(g, w_in_out, w_scale, _static_len(w_scale), 1)
        y = g.op("MatMul", _qdq_input(g, x, spec), w)
        return y if _is_none(bias) else g.op("Add", y, bias)


class _ConvQDQ(torch.autograd.Function):
    """Conv with an int8 weight [out, in/groups, *kernel] (channels on axis 0), already padded for non-zero modes."""

    @staticmethod
    def forward(ctx, x, w_int8, w_scale, bias, mode, act_dtype, symmetric, scale, zero_point,
                strides, pads, dilations, group):  # noqa: D102
        nd = w_int8.dim() - 2
        conv = torch.nn.functional.conv1d if nd == 1 else torch.nn.functional.conv2d
        return conv(_eager_input(x, mode, act_dtype, symmetric, scale, zero_point),
                    _eager_weight(w_int8, w_scale, 0, x.dtype), bias, strides, pads[:nd], dilations, group)

    @staticmethod
    def symbolic(g, x, w_int8, w_scale, bias, mode, act_dtype, symmetric, scale, zero_point,
                 strides, pads, dilations, group):
        spec = (mode, act_dtype, symmetric, scale, zero_point)
        w = _dq_weight(g, w_int8, w_scale, _static_len(w_scale), 0)
        inputs = [_qdq_input(g, x, spec), w] + ([] if _is_none(bias) else [bias])
        kernel = _kernel_shape(w_int8)
        return g.op("Conv", *inputs, strides_i=strides, pads_i=pads, dilations_i=dilations, group_i=group,
                    kernel_shape_i=kernel)


def _is_none(value) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


def _static_len(value) -> int:
    """Number of scales (0 for a per-tensor scalar) from the traced value's static type."""
    sizes = value.type().sizes()
    return 0 if not sizes else int(sizes[0])


def _kernel_shape(w) -> list:
    return [int(d) for d in w.type().sizes()[2:]]


def _spec(module) -> Tuple:
    """(mode, dtype, symmetric, scale, zero point) of a QDQ module's input, as plain Python values."""
    if not module.dynamic:
        return ("static", module.act_dtype, module.act_symmetric, float(module.input_scale),
                int(module.input_zero_point))
    mode = "dynamic_tensor" if module.act_granularity == "tensor" else "dynamic_token"
    return mode, module.act_dtype, module.act_symmetric, 0.0, 0


def export_linear(module, x: Tensor) -> Tensor:
    """Linear or transformers Conv1D: the int8 weight as [in, out] (what MatMul takes), channels on axis 1."""
    w_in_out = module.weight_int8 if module.weight_axis == 1 else module.weight_int8.t()  # folded to an initializer
    return _LinearQDQ.apply(x, w_in_out, module.weight_scale, module.bias, module.input_smooth, *_spec(module))


def export_conv(module, x: Tensor, attrs) -> Tensor:
    strides, pads, dilations, group, kernel = attrs
    nd = len(kernel)
    if pads[:nd] != pads[nd:]:  # "same" with an even kernel: the extra zero goes at the end, as in nn.ConvNd.
        # Padding before the QuantizeLinear is exact: 0.0 is always on the activation grid.
        x = torch.nn.functional.pad(x, [p for b, e in zip(reversed(pads[:nd]), reversed(pads[nd:])) for p in (b, e)])
        pads = [0] * (2 * nd)
    return _ConvQDQ.apply(x, module.weight_int8, module.weight_scale, module.bias, *_spec(module),
                          strides, pads, dilations, group)
