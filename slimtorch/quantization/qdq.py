r"""QDQ modules: int8 weights + an input QuantizeLinear->DequantizeLinear pair, in plain PyTorch on any device.

| class       | wraps                    | weight layout (stored as ``weight_int8``) | per-channel axis |
|-------------|--------------------------|-------------------------------------------|------------------|
| QDQLinear   | nn.Linear                | [out, in]                                 | 0                |
| QDQConv1d   | nn.Conv1d                | [out, in/groups, k]                       | 0                |
| QDQConv2d   | nn.Conv2d                | [out, in/groups, kh, kw]                  | 0                |
| QDQConv1D   | transformers' Conv1D     | [in, out] (kept as the original)          | 1                |

forward(x) = op(fake_quantize(x, input qparams), dequantize(weight_int8, weight_scale, 0), bias).

Weights are symmetric int8 on the one grid of quantization/grid.py (zero point 0, what TensorRT needs; scale
max|w| / 127.5, range [-128, 127]), so a pruned 0.0 is stored as exactly 0. Activations are static
(``input_scale``/``input_zero_point`` buffers from calibration) or dynamic (qparams from the current input: per
tensor, or per token = per row of the last axis). Every tensor is a buffer, so ``.to()``, ``state_dict()`` and
``load_state_dict()`` work without calibration data. Scales stay float32 through ``.to(dtype)``/``.half()``:
QuantizeLinear takes float32 scales, and the PyTorch and ONNX models must agree.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CalibrationError, ConfigError, StateDictError
from .grid import choose_qparams, dequantize, fake_quantize, fake_quantize_dynamic, grid_range, quantize
from .qdq_onnx import export_conv, export_linear

WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
ACT_GRANULARITIES = ("tensor", "token")
_FP32_BUFFERS = ("weight_scale", "input_scale", "input_smooth")


def _is_hf_conv1d(module: nn.Module) -> bool:
    # matched by name so slimtorch does not import transformers (slow) just to recognise the class
    return any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf")


_DTYPE_CODES = ("int8", "uint8")


def encode_spec(act_dtype: str, act_symmetric: bool, dynamic: bool, act_granularity: str) -> Tensor:
    """[dtype, symmetric, dynamic, per-token] as int8: what a state_dict needs to rebuild a QDQ layer."""
    return torch.tensor([_DTYPE_CODES.index(act_dtype), int(act_symmetric), int(dynamic),
                         ACT_GRANULARITIES.index(act_granularity)], dtype=torch.int8)


def decode_spec(spec: Tensor) -> dict:
    """Inverse of :func:`encode_spec`: keyword arguments of ``from_float``."""
    codes = [int(v) for v in spec.tolist()]
    if len(codes) != 4 or codes[0] not in (0, 1) or codes[3] not in (0, 1):
        raise ConfigError(f"qdq_spec {codes} is not a slimtorch QDQ layer description")
    return dict(act_dtype=_DTYPE_CODES[codes[0]], act_symmetric=bool(codes[1]), dynamic=bool(codes[2]),
                act_granularity=ACT_GRANULARITIES[codes[3]])


class QDQModule(nn.Module):
    """Base class of the QDQ layers: int8 weight storage, activation fake-quantization, dtype-safe ``_apply`` and
    shape-tolerant loading. ``isinstance(m, QDQModule)`` tells a quantized layer; subclasses set ``weight_axis``
    (the per-channel axis of their stored weight) and implement ``forward``."""

    weight_axis = 0
    dynamic_token_ok = True

    def __init__(self, weight: Tensor, bias: Optional[Tensor], *, weight_granularity: str = "per_channel",
                 act_dtype: str = "int8", act_symmetric: bool = True,
                 act_qparams: Optional[Tuple[Tensor, Tensor]] = None, dynamic: bool = False,
                 act_granularity: str = "tensor"):
        super().__init__()
        if weight_granularity not in WEIGHT_GRANULARITIES:
            raise ConfigError(f"weight granularity must be one of {WEIGHT_GRANULARITIES}, got {weight_granularity!r}")
        if act_granularity not in ACT_GRANULARITIES or (act_granularity == "token" and not dynamic):
            raise ConfigError(f"activation granularity must be 'tensor', or 'token' with dynamic=True; got "
                              f"{act_granularity!r} (dynamic={dynamic})")
        if act_granularity == "token" and not self.dynamic_token_ok:
            raise ConfigError(f"{type(self).__name__} has no token axis; use act_granularity='tensor'")
        if act_dtype not in _DTYPE_CODES:
            raise ConfigError(f"QDQ activation dtype must be one of {_DTYPE_CODES}, got {act_dtype!r}")
        choose_qparams(torch.tensor(0.0), torch.tensor(0.0), dtype=act_dtype, symmetric=act_symmetric)  # validates
        self.act_dtype, self.act_symmetric = act_dtype, act_symmetric
        self.dynamic, self.act_granularity = dynamic, act_granularity
        w = weight.detach().to(torch.float32)
        if weight_granularity == "per_channel":
            flat = w.movedim(self.weight_axis, 0).reshape(w.shape[self.weight_axis], -1)
            lo, hi = flat.amin(1), flat.amax(1)
            axis = self.weight_axis
        else:
            lo, hi, axis = w.amin(), w.amax(), None
        scale, zp = choose_qparams(lo, hi, dtype="int8", symmetric=True)  # zp 0: pruned zeros stay exactly 0
        self.register_buffer("weight_int8", quantize(w, scale, zp, dtype="int8", axis=axis))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # the activation scheme as a small tensor, so a state_dict (or safetensors file) alone rebuilds the layer
        self.register_buffer("qdq_spec", encode_spec(act_dtype, act_symmetric, dynamic, act_granularity))
        self.register_buffer("input_smooth", None)  # SmoothQuant without folding: 1/s per input channel
        if not dynamic:
            if act_qparams is None:
                raise CalibrationError(f"static {type(self).__name__} needs act_qparams=(scale, zero_point) from "
                                       f"calibration; pass dynamic=True to quantize activations at run time")
            s, z = self._check_act_qparams(*act_qparams)
            self.register_buffer("input_scale", s.to(w.device))
            self.register_buffer("input_zero_point", z.to(w.device))

    def _check_act_qparams(self, scale, zero_point) -> Tuple[Tensor, Tensor]:
        s = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        z = torch.as_tensor(zero_point).detach().clone().to(torch.int32)
        qmin, qmax = grid_range(self.act_dtype)
        if s.numel() != 1 or z.numel() != 1:
            raise CalibrationError(f"activation qparams must be per tensor (one scale, one zero point), got shapes "
                                   f"{tuple(s.shape)} and {tuple(z.shape)}")
        if not (torch.isfinite(s).all() and float(s) > 0):
            raise CalibrationError(f"activation scale must be finite and > 0, got {float(s)}")
        if not qmin <= int(z) <= qmax or (self.act_symmetric and int(z) != 0):
            raise CalibrationError(f"activation zero point {int(z)} is invalid for {self.act_dtype} "
                                   f"({'symmetric: must be 0' if self.act_symmetric else f'range [{qmin}, {qmax}]'})")
        return s.reshape(()), z.reshape(())

    # -- activation quantization -------------------------------------------------------------------------------
    def quantize_input(self, x: Tensor) -> Tensor:
        """QuantizeLinear -> DequantizeLinear of ``x`` with static or run-time qparams (saturating, like ONNX)."""
        if self.input_smooth is not None:
            x = x * self.input_smooth.to(x.dtype)
        if not self.dynamic:
            return fake_quantize(x, self.input_scale, self.input_zero_point, dtype=self.act_dtype)
        return fake_quantize_dynamic(x, self.act_dtype, self.act_symmetric, self.act_granularity)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        axis = self.weight_axis if self.weight_scale.dim() == 1 else None
        return dequantize(self.weight_int8, self.weight_scale, axis=axis).to(dtype)

    # -- buffers -----------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        keep = {n: self._buffers[n] for n in _FP32_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for n, t in keep.items():  # follow the device, never the dtype: scales are float32 by contract
            self._buffers[n] = t.to(device=self._buffers[n].device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a per-tensor checkpoint loads into a per-channel-built module (and back): the scale shape follows the file
        for n in ("weight_scale",):
            t, own = state_dict.get(prefix + n), self._buffers.get(n)
            if t is not None and own is not None and t.shape != own.shape:
                self._buffers[n] = torch.empty(t.shape, dtype=own.dtype, device=own.device)
        for n in ("input_smooth", "bias"):  # optional tensors a checkpoint may add (SmoothQuant, bias correction)
            t = state_dict.get(prefix + n)
            if t is not None and self._buffers.get(n) is None:
                self._buffers[n] = torch.empty(t.shape, dtype=t.dtype, device=self.weight_int8.device)
        spec = state_dict.get(prefix + "qdq_spec")
        if spec is not None:
            stored = decode_spec(spec)
            if stored["dynamic"] != self.dynamic:
                raise StateDictError(
                    f"{prefix or 'layer '}: the checkpoint holds a {'dynamic' if stored['dynamic'] else 'static'} "
                    f"QDQ layer, this one is {'dynamic' if self.dynamic else 'static'}; rebuild the model with "
                    "slimtorch.load_quantized(float_model, state_dict)")
            self.act_dtype, self.act_symmetric = stored["act_dtype"], stored["act_symmetric"]
            self.act_granularity = stored["act_granularity"]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        w = "per_channel" if self.weight_scale.dim() == 1 else "per_tensor"
        act = f"dynamic/{self.act_granularity}" if self.dynamic else "static"
        return (f"weight={tuple(self.weight_int8.shape)} int8 {w}, act={self.act_dtype} "
                f"{'symmetric' if self.act_symmetric else 'asymmetric'} {act}")

    @classmethod
    def _from_float_kwargs(cls, module: nn.Module) -> dict:
        return {}

    @classmethod
    def from_float(cls, module: nn.Module, *, weight_granularity: str = "per_channel", act_dtype: str = "int8",
                   act_symmetric: bool = True, act_qparams: Optional[Tuple[Tensor, Tensor]] = None,
                   dynamic: bool = False, act_granularity: str = "tensor"):
        """A QDQ copy of ``module`` (never modified): its weight quantized, its bias copied, activation qparams set."""
        q = cls(module.weight, module.bias, weight_granularity=weight_granularity, act_dtype=act_dtype,
                act_symmetric=act_symmetric, act_qparams=act_qparams, dynamic=dynamic,
                act_granularity=act_granularity, **cls._from_float_kwargs(module))
        q.train(module.training)
        return q


class QDQLinear(QDQModule):
    """nn.Linear with an int8 weight [out, in]."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], **kw):
        super().__init__(weight, bias, **kw)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return export_linear(self, x)
        return self._eager_forward(x)

    def _eager_forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.dequantized_weight(x.dtype), self.bias)


class QDQConv1D(QDQModule):
    """transformers' Conv1D (y = x @ W + b, W stored [in, out]): the weight keeps that layout, channels on axis 1."""

    weight_axis = 1

    def __init__(self, weight: Tensor, bias: Optional[Tensor], **kw):
        super().__init__(weight, bias, **kw)
        self.nf = weight.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return export_linear(self, x)
        return self._eager_forward(x)

    def _eager_forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(self.quantize_input(x), self.dequantized_weight(x.dtype))  # [.., in] @ [in, out]
        return y if self.bias is None else y + self.bias


class _QDQConvNd(QDQModule):
    dynamic_token_ok = False  # a conv input has no token rows; dynamic convs use per-tensor qparams
    _conv = None

    def __init__(self, weight: Tensor, bias: Optional[Tensor], *, stride, padding, dilation, groups,
                 padding_mode: str = "zeros", reversed_padding=None, pre_pad=None, **kw):
        super().__init__(weight, bias, **kw)
        self.pre_pad = None if pre_pad is None else list(pre_pad)  # F.pad widths applied before the conv
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode, self.reversed_padding = padding_mode, reversed_padding
        self.out_channels = weight.shape[0]

    @classmethod
    def _from_float_kwargs(cls, m: nn.Module) -> dict:
        return dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                    padding_mode=m.padding_mode, reversed_padding=list(m._reversed_padding_repeated_twice),
                    pre_pad=static_padding_of(m))

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_pad is not None:  # TensorFlow-style "SAME" convs (EfficientNet ports): zeros are on the grid
            x = F.pad(x, self.pre_pad)
        if self.padding_mode != "zeros":  # as nn.ConvNd: pad explicitly (reflect/replicate/circular), then no padding
            x = F.pad(x, self.reversed_padding, mode=self.padding_mode)
        if torch.onnx.is_in_onnx_export():
            return export_conv(self, x, self._onnx_conv_attrs(x))
        return self._conv_after_padding(x)

    def _padding_after_pre_pad(self):
        return 0 if self.padding_mode != "zeros" else self.padding

    def _conv_after_padding(self, x: Tensor) -> Tensor:
        w = self.dequantized_weight(x.dtype)
        return type(self)._conv(self.quantize_input(x), w, self.bias, self.stride, self._padding_after_pre_pad(),
                                self.dilation, self.groups)

    def _onnx_conv_attrs(self, x: Tensor):
        """(strides, pads, dilations, group, kernel_shape) as ONNX Conv attributes."""
        kernel = list(self.weight_int8.shape[2:])
        nd = len(kernel)
        padding = self._padding_after_pre_pad()
        if padding == "valid":
            padding = 0
        if padding == "same":  # nn.ConvNd: total d*(k-1), the extra one on the right
            total = [d * (k - 1) for d, k in zip(self.dilation, kernel)]
            begin, end = [t // 2 for t in total], [t - t // 2 for t in total]
        else:
            p = [padding] * nd if isinstance(padding, int) else list(padding)
            begin, end = p, p
        return list(self.stride), begin + end, list(self.dilation), self.groups, kernel


class QDQConv1d(_QDQConvNd):
    """nn.Conv1d with an int8 weight [out, in/groups, k]."""
    _conv = staticmethod(F.conv1d)


class QDQConv2d(_QDQConvNd):
    """nn.Conv2d with an int8 weight [out, in/groups, kh, kw]."""
    _conv = staticmethod(F.conv2d)


QDQ_MODULES = {"Linear": QDQLinear, "Conv1d": QDQConv1d, "Conv2d": QDQConv2d, "Conv1D": QDQConv1D}


def static_padding_of(module: nn.Module) -> Optional[list]:
    """Zero padding a conv subclass applies in its own forward() through a ``static_padding`` child (the
    ``Conv2dStaticSamePadding`` of EfficientNet ports), as F.pad widths; None when there is none."""
    pad = getattr(module, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d) or (isinstance(pad, nn.ConstantPad2d) and pad.value == 0):
        return list(pad.padding)
    return None


def quantizable_forward(module: nn.Module) -> Optional[str]:
    """None if the QDQ module computes what ``module.forward`` does; else why not (a subclass with its own
    forward() that slimtorch does not know)."""
    base = next((b for b in (nn.Linear, nn.Conv1d, nn.Conv2d) if isinstance(module, b)), None)
    if base is None or type(module).forward is base.forward:
        return None
    pad = getattr(module, "static_padding", None)
    if pad is not None and (static_padding_of(module) is not None or type(pad).__name__ == "Identity"):
        return None  # forward() = static_padding then the plain conv: reproduced with pre_pad
    return (f"{type(module).__name__} overrides {base.__name__}.forward(), so a QDQ copy could compute something "
            "else; exclude it or quantize its parent's layers")


def qdq_class_for(module: nn.Module):
    """The QDQ class for ``module`` (by op type, the names config ``op_types`` uses), or None if it has none."""
    if _is_hf_conv1d(module):
        return QDQConv1D
    for name, cls in (("Linear", nn.Linear), ("Conv1d", nn.Conv1d), ("Conv2d", nn.Conv2d)):
        if isinstance(module, cls):
            return QDQ_MODULES[name]
    return None


def op_type(module: nn.Module) -> Optional[str]:
    """Config op-type name of ``module`` ("Linear", "Conv1d", "Conv2d", "Conv1D") or None."""
    cls = qdq_class_for(module)
    return None if cls is None else next(k for k, v in QDQ_MODULES.items() if v is cls)
