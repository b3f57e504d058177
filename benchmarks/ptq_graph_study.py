#!/usr/bin/env python
"""Issue 3 research: which QDQ ONNX graph structure makes ONNX Runtime (CPU, 2 threads) run all-MiniLM-L6-v2's
36 encoder Linears fastest with static activation qparams?

    python benchmarks/ptq_graph_study.py                 # ~5-8 min on 2 cores
    python benchmarks/ptq_graph_study.py --rounds 30 --json-out benchmarks/results/ptq_graph_study.json

The float model is exported once with the legacy TorchScript exporter (opset 17; each Linear becomes
``MatMul(x, W^T initializer) -> Add(bias)``). Every variant is made by editing that graph with the ``onnx`` API:
activation Q/DQ nodes get their ranges from a quick calibration in ONNX Runtime (per-tensor min/max of every
MatMul input over ``--calib-batches`` batches of 8 training paragraphs). All variants, ONNX Runtime's own
``quantize_dynamic`` and ``quantize_static`` (QDQ, MatMul only, U8S8 per-channel) and the float model are then
timed in ONE run, round-robin (see ptq.py), and scored on the held-out paragraphs (cosine of mean-pooled sentence
embeddings to the float PyTorch model). For each variant the graph ONNX Runtime actually runs
(``SessionOptions.optimized_model_filepath``) is saved and its node types counted.

The basic pattern ("static U8 act / S8 per-channel W, float output") for one Linear:

    x (float) -> QuantizeLinear(x_scale f32 scalar, x_zp uint8 scalar) -> DequantizeLinear(same) --+
    W_q int8 [in, out] initializer -> DequantizeLinear(w_scale f32 [out], w_zp int8 [out] zeros, axis=1) -> MatMul
    -> Add(bias, float)

(no QuantizeLinear after the MatMul). One QuantizeLinear per quantized tensor (shared by q/k/v, which read the
same LayerNorm output), one DequantizeLinear per consumer. ONNX Runtime fuses each DQ/DQ/MatMul into
com.microsoft.MatMulIntegerToFloat (U8S8, weight prepacked); the variants (VARIANTS below) change one thing at a
time: activation dtype, weight granularity, Q sharing, weight layout, Gemm instead of MatMul, attention MatMuls,
a re-quantized output (-> QLinearMatMul, what quantize_static writes), dynamic activations, the FFN
down-projections (dynamic / float / smoothed), QOperator MatMulInteger instead of QDQ, merged q/k/v, and onnx
shape inference (value_info lets ONNX Runtime fuse SkipLayerNormalization).
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import ptq as P  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

FFN_DOWN = re.compile(r"/output/dense/MatMul$")          # encoder.layer.N.output.dense (after GELU)
ATTN_MM = re.compile(r"/attention/self/MatMul(_1)?$")   # Q.K^T and P.V


# --------------------------------------------------------------------------------------------------------------------
# graph inspection and calibration
# --------------------------------------------------------------------------------------------------------------------

def _session_exposing(m, tensor_names, path):
    """An unoptimized ONNX Runtime session on ``m`` with ``tensor_names`` added as graph outputs."""
    import onnxruntime as ort

    for t in tensor_names:
        m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    onnx.save(m, path)
    so = P.session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess, [o.name for o in sess.get_outputs()]

def matmuls(model: onnx.ModelProto) -> Tuple[List[onnx.NodeProto], List[onnx.NodeProto]]:
    """-> (weight MatMuls [x @ W initializer], attention MatMuls [activation @ activation]) of the encoder."""
    inits = {i.name for i in model.graph.initializer}
    wm, am = [], []
    for n in model.graph.node:
        if n.op_type != "MatMul" or "/encoder/" not in n.name:
            continue
        if n.input[1] in inits:
            wm.append(n)
        elif ATTN_MM.search(n.name):
            am.append(n)
    return wm, am


def calibrate(float_path: str, calib: Sequence[Dict[str, torch.Tensor]], tmp: str):
    """Per-tensor min/max of every encoder MatMul input, and per-channel (last axis) absmax / min / max of the weight
    MatMuls' inputs, over the calibration batches (run in ONNX Runtime, optimizations off so every tensor exists)."""
    m = onnx.load(float_path)
    wm, am = matmuls(m)
    names = sorted({n.input[0] for n in wm} | {i for n in am for i in n.input})
    per_channel = {n.input[0] for n in wm}
    existing = {o.name for o in m.graph.output}
    sess, out_names = _session_exposing(m, [t for t in names if t not in existing], os.path.join(tmp, "calib_aug.onnx"))
    stats: Dict[str, Dict[str, np.ndarray]] = {}
    for b in calib:
        res = dict(zip(out_names, sess.run(None, P.feed_for(sess, b))))
        for t in names:
            a = res[t]
            s = stats.setdefault(t, {"min": np.inf, "max": -np.inf})
            s["min"] = min(s["min"], float(a.min()))
            s["max"] = max(s["max"], float(a.max()))
            if t in per_channel:
                flat = a.reshape(-1, a.shape[-1])
                s["cmin"] = np.minimum(s.get("cmin", np.inf), flat.min(0))
                s["cmax"] = np.maximum(s.get("cmax", -np.inf), flat.max(0))
    return stats


# --------------------------------------------------------------------------------------------------------------------
# qparams
# --------------------------------------------------------------------------------------------------------------------
def act_qparams(lo: float, hi: float, dtype: str) -> Tuple[float, int]:
    """Per-tensor activation (scale, zero point): 'u8' asymmetric over [min(lo,0), max(hi,0)], 's8' symmetric."""
    if dtype == "u8":
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max(hi - lo, 1e-8) / 255.0
        return scale, int(np.clip(round(-lo / scale), 0, 255))
    return max(abs(lo), abs(hi), 1e-8) / 127.0, 0


def weight_q(w: np.ndarray, per_channel: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weight of a [in, out] MatMul weight -> (w_q int8, scale f32 [out] or scalar)."""
    amax = np.abs(w).max(0) if per_channel else np.abs(w).max()
    scale = (np.maximum(amax, 1e-12) / 127.0).astype(np.float32)
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


# --------------------------------------------------------------------------------------------------------------------
# graph editing
# --------------------------------------------------------------------------------------------------------------------
class Editor:
    def __init__(self, model: onnx.ModelProto):
        self.m = model
        self.inits = {i.name: i for i in model.graph.initializer}
        self.new_nodes: Dict[str, List[onnx.NodeProto]] = collections.defaultdict(list)  # inserted before node name
        self.q_cache: Dict[Tuple[str, str], Tuple[str, str, str]] = {}
        self.after: List[Tuple[str, List[onnx.NodeProto]]] = []   # inserted after node name
        self.dead: set = set()                                      # node names to drop
        self.k = 0

    def uid(self, base: str) -> str:
        self.k += 1
        return f"{base}__{self.k}"

    def add_init(self, name: str, arr: np.ndarray) -> str:
        t = numpy_helper.from_array(arr, name)
        self.m.graph.initializer.append(t)
        self.inits[name] = t
        return name

    def emit(self, before: onnx.NodeProto, node: onnx.NodeProto) -> None:
        self.new_nodes[before.name].append(node)

    def quantize_input(self, node: onnx.NodeProto, idx: int, scale, zp, qdtype, *, dynamic: bool = False,
                       axis: Optional[int] = None, dq_scale=None, dq_zp=None, share: bool = True) -> None:
        """Replace node.input[idx] (an activation) by DQ(Q(x)). One Q per (tensor, key) shared by consumers; one DQ
        per consumer. dynamic: DynamicQuantizeLinear (uint8) instead of Q with constant qparams. axis/dq_*: a
        per-channel QuantizeLinear (scale vector along ``axis``) with a per-tensor DequantizeLinear (dq_scale,
        dq_zp): activation smoothing folded into the quantizer."""
        x = node.input[idx]
        own = axis is not None or not share
        key = (x, ("dyn" if dynamic else qdtype.__name__) + (":" + node.name if own else ""))
        if key not in self.q_cache:
            base = self.uid(x)
            if dynamic:
                q = helper.make_node("DynamicQuantizeLinear", [x], [base + "_q", base + "_s", base + "_z"],
                                     name=base + "_DynQ")
                self.q_cache[key] = (base + "_q", base + "_s", base + "_z")
            else:
                s = self.add_init(base + "_scale", np.asarray(scale, np.float32))
                z = self.add_init(base + "_zp", np.asarray(zp, qdtype))
                attrs = {} if axis is None else {"axis": axis}
                q = helper.make_node("QuantizeLinear", [x, s, z], [base + "_q"], name=base + "_Q", **attrs)
                if axis is not None:
                    s = self.add_init(base + "_dq_scale", np.asarray(dq_scale, np.float32))
                    z = self.add_init(base + "_dq_zp", np.asarray(dq_zp, qdtype))
                self.q_cache[key] = (base + "_q", s, z)
            self.emit(node, q)
        xq, s, z = self.q_cache[key]
        out = self.uid(x + "_dq")
        self.emit(node, helper.make_node("DequantizeLinear", [xq, s, z], [out], name=out + "_DQ"))
        node.input[idx] = out

    def quantize_weight(self, node: onnx.NodeProto, per_channel: bool, row_scale: Optional[np.ndarray] = None):
        """Weight initializer [in, out] -> int8 initializer -> DequantizeLinear (axis=1 when per channel).
        row_scale: multiply row j (input channel j) by row_scale[j] first (SmoothQuant)."""
        w = numpy_helper.to_array(self.inits[node.input[1]]).astype(np.float32)
        if row_scale is not None:
            w = w * row_scale[:, None]
        wq, scale = weight_q(w, per_channel)
        base = self.uid(node.input[1])
        q = self.add_init(base + "_int8", wq)
        s = self.add_init(base + "_scale", scale)
        z = self.add_init(base + "_zp", np.zeros(scale.shape, np.int8))
        attrs = {"axis": 1} if per_channel else {}
        out = base + "_dq"
        self.emit(node, helper.make_node("DequantizeLinear", [q, s, z], [out], name=out + "_DQ", **attrs))
        node.input[1] = out

    def quantize_weight_transposed(self, node: onnx.NodeProto, per_channel: bool) -> None:
        """Weight stored as int8 [out, in] (nn.Linear's layout) -> DequantizeLinear(axis=0) -> Transpose -> MatMul:
        the shape a plain export of F.linear(x, DQ(W_q)) takes when nothing folds the Transpose."""
        w = numpy_helper.to_array(self.inits[node.input[1]]).astype(np.float32)
        wq, scale = weight_q(w, per_channel)
        base = self.uid(node.input[1])
        q = self.add_init(base + "_int8_oi", np.ascontiguousarray(wq.T))
        s = self.add_init(base + "_scale", scale)
        z = self.add_init(base + "_zp", np.zeros(scale.shape, np.int8))
        attrs = {"axis": 0} if per_channel else {}
        self.emit(node, helper.make_node("DequantizeLinear", [q, s, z], [base + "_dq"], name=base + "_DQ", **attrs))
        self.emit(node, helper.make_node("Transpose", [base + "_dq"], [base + "_dqT"], name=base + "_T",
                                         perm=[1, 0]))
        node.input[1] = base + "_dqT"

    def to_gemm(self, node: onnx.NodeProto, add: onnx.NodeProto, x_scale: float, x_zp: int, per_channel: bool):
        """MatMul(x, W) + Add(bias) -> Reshape(x, [-1, in]) -> Q -> DQ -> Gemm(transB=1, DQ(W_q [out, in], axis=0),
        C = DQ(int32 bias, x_scale * w_scale, axis=0)) -> Reshape back. Returns nothing; rewires in place."""
        w = numpy_helper.to_array(self.inits[node.input[1]]).astype(np.float32)
        bias_name = [i for i in add.input if i in self.inits][0]
        bias = numpy_helper.to_array(self.inits[bias_name]).astype(np.float32)
        wq, wscale = weight_q(w, per_channel)
        base = self.uid(node.name.replace("/", "_"))
        x = node.input[0]
        k, n_out = w.shape
        shp = self.add_init(base + "_2d", np.array([-1, k], np.int64))
        outc = self.add_init(base + "_outc", np.array([n_out], np.int64))
        self.emit(node, helper.make_node("Reshape", [x, shp], [base + "_x2"], name=base + "_R1"))
        s = self.add_init(base + "_xs", np.asarray(x_scale, np.float32))
        z = self.add_init(base + "_xz", np.asarray(x_zp, np.uint8))
        self.emit(node, helper.make_node("QuantizeLinear", [base + "_x2", s, z], [base + "_xq"], name=base + "_Q"))
        self.emit(node, helper.make_node("DequantizeLinear", [base + "_xq", s, z], [base + "_xdq"], name=base + "_DQ"))
        wq_ = self.add_init(base + "_w", np.ascontiguousarray(wq.T))
        ws = self.add_init(base + "_ws", wscale)
        wz = self.add_init(base + "_wz", np.zeros(wscale.shape, np.int8))
        attrs = {"axis": 0} if per_channel else {}
        self.emit(node, helper.make_node("DequantizeLinear", [wq_, ws, wz], [base + "_wdq"], name=base + "_WDQ",
                                         **attrs))
        bscale = (x_scale * np.broadcast_to(wscale, (n_out,))).astype(np.float32)
        bq = self.add_init(base + "_b", np.round(bias / bscale).astype(np.int32))
        bs = self.add_init(base + "_bs", bscale)
        bz = self.add_init(base + "_bz", np.zeros(n_out, np.int32))
        self.emit(node, helper.make_node("DequantizeLinear", [bq, bs, bz], [base + "_bdq"], name=base + "_BDQ",
                                         axis=0))
        self.emit(node, helper.make_node("Gemm", [base + "_xdq", base + "_wdq", base + "_bdq"], [base + "_y2"],
                                         name=base + "_Gemm", transB=1))
        self.emit(node, helper.make_node("Shape", [x], [base + "_xs_shape"], name=base + "_Shape", start=0, end=-1))
        self.emit(node, helper.make_node("Concat", [base + "_xs_shape", outc], [base + "_yshape"], name=base + "_Cat",
                                         axis=0))
        self.emit(node, helper.make_node("Reshape", [base + "_y2", base + "_yshape"], [add.output[0]],
                                         name=base + "_R2"))
        self.dead.update({node.name, add.name})

    def to_matmul_integer(self, node: onnx.NodeProto, x_scale: float, x_zp: int, per_channel: bool) -> None:
        """QOperator form (no DequantizeLinear): x -> QuantizeLinear (uint8; shared per tensor) -> MatMulInteger(x_q,
        W_q int8 [in, out], x_zp, w_zp int8 [out]) -> Cast(float) -> Mul(x_scale * w_scale [out]) -> (the bias Add
        that follows stays). ONNX Runtime fuses MatMulInteger/Cast/Mul(/Add) into MatMulIntegerToFloat."""
        x = node.input[0]
        key = (x, "u8-qop")
        if key not in self.q_cache:
            base = self.uid(x)
            s = self.add_init(base + "_scale", np.asarray(x_scale, np.float32))
            z = self.add_init(base + "_zp", np.asarray(x_zp, np.uint8))
            self.emit(node, helper.make_node("QuantizeLinear", [x, s, z], [base + "_q"], name=base + "_Q"))
            self.q_cache[key] = (base + "_q", s, z)
        xq, _, xz = self.q_cache[key]
        w = numpy_helper.to_array(self.inits[node.input[1]]).astype(np.float32)
        wq, wscale = weight_q(w, per_channel)
        base = self.uid(node.input[1])
        q = self.add_init(base + "_int8", wq)
        wz = self.add_init(base + "_zp", np.zeros(wscale.shape, np.int8))
        sc = self.add_init(base + "_outscale", (x_scale * wscale).astype(np.float32))
        y = node.output[0]
        self.emit(node, helper.make_node("MatMulInteger", [xq, q, xz, wz], [base + "_i32"], name=base + "_MMI"))
        self.emit(node, helper.make_node("Cast", [base + "_i32"], [base + "_f"], name=base + "_Cast",
                                         to=TensorProto.FLOAT))
        self.emit(node, helper.make_node("Mul", [base + "_f", sc], [y], name=base + "_Mul"))
        self.dead.add(node.name)

    def requantize_output(self, node: onnx.NodeProto, lo: float, hi: float, qdtype_name: str) -> None:
        """MatMul output -> Q -> DQ -> its consumers (the QLinearMatMul-shaped graph)."""
        y = node.output[0]
        scale, zp = act_qparams(lo, hi, qdtype_name)
        dt = np.uint8 if qdtype_name == "u8" else np.int8
        base = self.uid(y)
        s = self.add_init(base + "_scale", np.asarray(scale, np.float32))
        z = self.add_init(base + "_zp", np.asarray(zp, dt))
        newy = base + "_float"
        node.output[0] = newy
        self.after.append((node.name, [
            helper.make_node("QuantizeLinear", [newy, s, z], [base + "_q"], name=base + "_Q"),
            helper.make_node("DequantizeLinear", [base + "_q", s, z], [y], name=base + "_DQ"),
        ]))

    def finish(self) -> onnx.ModelProto:
        after: Dict[str, List[onnx.NodeProto]] = {}
        for name, nodes in self.after:
            after.setdefault(name, []).extend(nodes)
        nodes = []
        for n in self.m.graph.node:
            nodes.extend(self.new_nodes.get(n.name, []))
            if n.name not in self.dead:
                nodes.append(n)
            nodes.extend(after.get(n.name, []))
        del self.m.graph.node[:]
        self.m.graph.node.extend(nodes)
        # drop float weights no longer used
        used = {i for n in self.m.graph.node for i in n.input}
        keep = [i for i in self.m.graph.initializer if i.name in used]
        del self.m.graph.initializer[:]
        self.m.graph.initializer.extend(keep)
        onnx.checker.check_model(self.m)
        return self.m


def fuse_qkv(model: onnx.ModelProto) -> onnx.ModelProto:
    """Merge each layer's query/key/value Linears (same input) into one MatMul [384, 1152] + Add + Split(3), the
    Split outputs taking the names of the three bias Adds' outputs. A float-graph rewrite."""
    m = copy.deepcopy(model)
    inits = {i.name: i for i in m.graph.initializer}
    consumers = collections.defaultdict(list)
    for n in m.graph.node:
        for i in n.input:
            consumers[i].append(n)
    dead, new_before = set(), {}
    layers = sorted({re.search(r"/encoder/layer\.(\d+)/", n.name).group(1) for n in m.graph.node
                     if re.search(r"/encoder/layer\.\d+/attention/self/query/MatMul$", n.name)})
    for L in layers:
        mm = [next(n for n in m.graph.node if n.name.endswith(f"/encoder/layer.{L}/attention/self/{p}/MatMul"))
              for p in ("query", "key", "value")]
        adds = [[c for c in consumers[n.output[0]] if c.op_type == "Add"][0] for n in mm]
        w = np.concatenate([numpy_helper.to_array(inits[n.input[1]]) for n in mm], axis=1)
        b = np.concatenate([numpy_helper.to_array(inits[[i for i in a.input if i in inits][0]]) for a in adds])
        base = f"/encoder/layer.{L}/attention/self/qkv"
        m.graph.initializer.extend([numpy_helper.from_array(w, base + ".weight"),
                                    numpy_helper.from_array(b, base + ".bias"),
                                    numpy_helper.from_array(np.array([w.shape[1] // 3] * 3, np.int64),
                                                            base + ".split")])
        new_before[mm[0].name] = [
            helper.make_node("MatMul", [mm[0].input[0], base + ".weight"], [base + "/MatMul_output_0"],
                             name=base + "/MatMul"),
            helper.make_node("Add", [base + "/MatMul_output_0", base + ".bias"], [base + "/Add_output_0"],
                             name=base + "/Add"),
            helper.make_node("Split", [base + "/Add_output_0", base + ".split"], [a.output[0] for a in adds],
                             name=base + "/Split", axis=-1),
        ]
        dead.update(n.name for n in mm + adds)
    nodes = []
    for n in m.graph.node:
        nodes.extend(new_before.get(n.name, []))
        if n.name not in dead:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    onnx.checker.check_model(m)
    return m


def build(float_model: onnx.ModelProto, stats, *, act: str = "u8", per_channel: bool = True, attn: bool = False,
          down: str = "same", requant: bool = False, smooth: str = "", alpha: float = 0.5,
          share_q: bool = True, weight_layout: str = "in_out", gemm: bool = False, qkv: bool = False,
          qop: bool = False,
          out_stats=None) -> onnx.ModelProto:
    """One graph variant.

    act: 'u8' (asymmetric, uint8 zp), 's8' (symmetric, int8 zp 0) static activations, or 'dyn'
         (DynamicQuantizeLinear -> DequantizeLinear).
    per_channel: weight scales per output column (DQ axis=1) or one per tensor.
    attn: also quantize both inputs of the attention MatMuls (Q.K^T, P.V) with the same activation scheme.
    down: FFN down-projections (output.dense): 'same' as the rest, 'float' (left alone), 'dyn' (dynamic).
    requant: also Q/DQ each weight MatMul's output (what ORT's quantize_static does -> QLinearMatMul).
    share_q: one QuantizeLinear per tensor shared by its consumers (q/k/v read the same LayerNorm output), else one
         Q -> DQ pair per consumer.
    qop: QOperator form instead of QDQ: Q -> MatMulInteger -> Cast -> Mul(scales) (-> the float bias Add).
    qkv: merge query/key/value into one [384, 1152] MatMul (+ Add + Split) first (fuse_qkv).
    weight_layout: 'in_out' (int8 [in, out] -> DQ axis=1 -> MatMul) or 'out_in_T' (int8 [out, in] -> DQ axis=0
         -> Transpose -> MatMul).
    gemm: each Linear as Reshape -> Q -> DQ -> Gemm(transB=1, DQ weight, DQ int32 bias) -> Reshape (U8 static).
    smooth: '' | 'down' | 'all': SmoothQuant scales s_j = amax(x_j)^alpha / amax(W_j)^(1-alpha) folded into the
         weights (rows) and into a per-channel QuantizeLinear (scale vector a*s_j along the last axis) followed by a
         per-tensor DequantizeLinear (scale a): no extra node.
    """
    m = fuse_qkv(float_model) if qkv else copy.deepcopy(float_model)
    ed = Editor(m)
    wm, am = matmuls(m)
    qd = {"u8": np.uint8, "s8": np.int8}
    consumers = collections.defaultdict(list)
    for n in m.graph.node:
        for i in n.input:
            consumers[i].append(n)
    for n in wm:
        if qop:
            st = stats[n.input[0]]
            scale, zp = act_qparams(st["min"], st["max"], "u8")
            ed.to_matmul_integer(n, scale, zp, per_channel)
            continue
        if gemm:
            st = stats[n.input[0]]
            scale, zp = act_qparams(st["min"], st["max"], "u8")
            add = [c for c in consumers[n.output[0]] if c.op_type == "Add"][0]
            ed.to_gemm(n, add, scale, zp, per_channel)
            continue
        is_down = bool(FFN_DOWN.search(n.name))
        mode = act
        if is_down and down == "float":
            continue
        if is_down and down == "dyn":
            mode = "dyn"
        st = stats[n.input[0]]
        use_smooth = mode != "dyn" and (smooth == "all" or (smooth == "down" and is_down))
        if use_smooth:
            w = numpy_helper.to_array(ed.inits[n.input[1]]).astype(np.float32)
            xa = np.maximum(np.maximum(np.abs(st["cmin"]), np.abs(st["cmax"])), 1e-5)
            wa = np.maximum(np.abs(w).max(1), 1e-5)
            s = (xa ** alpha / wa ** (1 - alpha)).astype(np.float32)
            s = s / np.exp(np.mean(np.log(s)))          # geometric mean 1 (only the shape matters)
            lo, hi = float((st["cmin"] / s).min()), float((st["cmax"] / s).max())
            a, z = act_qparams(lo, hi, mode)
            ed.quantize_input(n, 0, (a * s).astype(np.float32), np.full(s.shape, z, qd[mode]), qd[mode], axis=-1,
                              dq_scale=a, dq_zp=z)
            ed.quantize_weight(n, per_channel, row_scale=s)
        else:
            if mode == "dyn":
                ed.quantize_input(n, 0, None, None, np.uint8, dynamic=True, share=share_q)
            else:
                scale, zp = act_qparams(st["min"], st["max"], mode)
                ed.quantize_input(n, 0, scale, zp, qd[mode], share=share_q)
            if weight_layout == "out_in_T":
                ed.quantize_weight_transposed(n, per_channel)
            else:
                ed.quantize_weight(n, per_channel)
        if requant:
            o = out_stats[n.output[0]]
            ed.requantize_output(n, o["min"], o["max"], act if act != "dyn" else "u8")
    if attn:
        for n in am:
            for i in (0, 1):
                st = stats[n.input[i]]
                if act == "dyn":
                    ed.quantize_input(n, i, None, None, np.uint8, dynamic=True)
                else:
                    scale, zp = act_qparams(st["min"], st["max"], act)
                    ed.quantize_input(n, i, scale, zp, qd[act])
    return ed.finish()


def output_stats(float_path: str, calib, tmp: str):
    """Per-tensor min/max of the weight MatMuls' outputs (for the requantized variant)."""
    m = onnx.load(float_path)
    wm, _ = matmuls(m)
    names = [n.output[0] for n in wm]
    sess, out_names = _session_exposing(m, names, os.path.join(tmp, "calib_out.onnx"))
    stats = {t: {"min": np.inf, "max": -np.inf} for t in names}
    for b in calib:
        res = dict(zip(out_names, sess.run(None, P.feed_for(sess, b))))
        for t in names:
            stats[t]["min"] = min(stats[t]["min"], float(res[t].min()))
            stats[t]["max"] = max(stats[t]["max"], float(res[t].max()))
    return stats


# --------------------------------------------------------------------------------------------------------------------
VARIANTS: List[Tuple[str, dict]] = [
    ("A  static U8 act, S8 W per-channel, float out", dict(act="u8")),
    ("A2 A with one Q->DQ pair per consumer (q/k/v not sharing)", dict(act="u8", share_q=False)),
    ("A3 A with weight int8 [out,in] -> DQ(axis=0) -> Transpose -> MatMul", dict(act="u8",
                                                                                   weight_layout="out_in_T")),
    ("A4 A as Gemm: Reshape 2-D, Q/DQ, Gemm(transB, DQ int32 bias), Reshape", dict(act="u8", gemm=True)),
    ("B  static S8 act (sym), S8 W per-channel", dict(act="s8")),
    ("B2 B with one Q->DQ pair per consumer", dict(act="s8", share_q=False)),
    ("C  static U8 act, S8 W per-tensor", dict(act="u8", per_channel=False)),
    ("D  A + attention MatMuls (U8 x U8)", dict(act="u8", attn=True)),
    ("E  A + output re-quantized (Q/DQ after MatMul)", dict(act="u8", requant=True)),
    ("F  dynamic: DynamicQuantizeLinear->DQ, W per-channel", dict(act="dyn")),
    ("G  A, FFN down-proj dynamic", dict(act="u8", down="dyn")),
    ("G2 D (A + attention), FFN down-proj dynamic", dict(act="u8", attn=True, down="dyn")),
    ("H  A, FFN down-proj float", dict(act="u8", down="float")),
    ("A+SI A + onnx shape inference (value_info stored)", dict(act="u8", si=True)),
    ("L  A in QOperator form: Q -> MatMulInteger -> Cast -> Mul", dict(act="u8", qop=True)),
    ("K  A with q/k/v merged into one MatMul [384,1152] + Split", dict(act="u8", qkv=True)),
    ("I  A + smoothing in per-channel Q, down-proj only", dict(act="u8", smooth="down")),
]

KEY_OPS = ("MatMul", "Gemm", "QGemm", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger",
           "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "FusedMatMul", "Gelu", "BiasGelu",
           "FastGelu", "Add", "SkipLayerNormalization", "LayerNormalization", "Attention", "QAttention")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--pause-ms", type=float, default=1e3 * P.PAUSE_S, help="see ptq.interleaved_latency")
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa",
                    help="attention implementation the float model is exported with (sdpa: transformers' default, "
                         "adds IsNaN/Where guards per layer; eager: matmul-softmax-matmul)")
    ap.add_argument("--only", default="", help="comma-separated variant letters (default: all)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--no-shape-inference", dest="shape_inference", action="store_false",
                    help="skip the rows whose graphs carry onnx.shape_inference value_info")
    ap.add_argument("--keep-dir", default=None, help="keep the ONNX files (and optimized graphs) here")
    args = ap.parse_args(argv)

    P.seed_everything(0)
    torch.set_num_threads(P.THREADS)
    import onnxruntime as ort

    t_start = time.perf_counter()
    model, tok, calib, held, timing = P.load_data(args.calib_batches, args.held_out)
    ref = P.torch_embed(model, held)
    P.set_attention(model, args.attn)
    variants = [(k, v) for k, v in VARIANTS if not args.only or k.split()[0] in args.only.split(",")]
    tmpobj = None
    if args.keep_dir:
        tmp = args.keep_dir
        os.makedirs(tmp, exist_ok=True)
    else:
        tmpobj = tempfile.TemporaryDirectory(prefix="slimtorch_graph_study_")
        tmp = tmpobj.name
    try:
        float_path = os.path.join(tmp, "float.onnx")
        P.legacy_export(model, timing, float_path)
        fm = onnx.load(float_path)
        wm, am = matmuls(fm)
        print(f"float export: torch.onnx.export(dynamo=False, opset 17, {args.attn} attention): {len(wm)} weight "
              f"MatMuls, {len(am)} attention MatMuls; ORT {ort.__version__}")
        t0 = time.perf_counter()
        stats = calibrate(float_path, calib, tmp)
        ostats = output_stats(float_path, calib, tmp) if any(v.get("requant") for _, v in variants) else None
        print(f"calibration ({len(calib)} batches) {time.perf_counter() - t0:.1f} s")

        paths = {"float": float_path}
        build_s = {}
        if any(v.get("qkv") for _, v in variants):
            p = os.path.join(tmp, "float_qkv.onnx")
            onnx.save(fuse_qkv(fm), p)
            paths["float, q/k/v merged (fuse_qkv)"] = p
        if args.shape_inference:
            p = os.path.join(tmp, "float_si.onnx")
            onnx.save(onnx.shape_inference.infer_shapes(fm), p)
            paths["float + onnx shape inference"] = p
        for label, kw in variants:
            t0 = time.perf_counter()
            kw = dict(kw)
            si = kw.pop("si", False)
            if si and not args.shape_inference:
                continue
            qm = build(fm, stats, out_stats=ostats, **kw)
            if si:
                qm = onnx.shape_inference.infer_shapes(qm)
            p = os.path.join(tmp, label.split()[0] + ".onnx")
            onnx.save(qm, p)
            build_s[label] = time.perf_counter() - t0
            paths[label] = p
        for label, path, wall, note in P.ort_peers(float_path, calib, tmp, which=("static_u8s8", "dynamic")):
            paths[label] = path
            build_s[label] = wall

        rows, sessions = {}, {}
        for label, p in paths.items():
            opt = os.path.join(tmp, f"opt_{abs(hash(label))}.onnx")
            sessions[label] = P.make_session(p, opt)
            c = P.cos_stats(P.ort_embed(sessions[label], held), ref)
            ops = P.op_counts(opt)
            rows[label] = {"cos_mean": c[0], "cos_min": c[1], "build_s": build_s.get(label),
                           "file_mb": os.path.getsize(p) / 2**20,
                           "optimized_ops": {k: v for k, v in ops.items() if k in KEY_OPS},
                           "optimized_ops_all": ops}
            print(f"{label}: cosine {c[0]:.4f} ({c[1]:.4f}); optimized: "
                  + ", ".join(f"{k} {v}" for k, v in ops.items() if k in KEY_OPS))
        times = P.interleaved_latency(sessions, timing, args.rounds, pause_s=args.pause_ms / 1e3)
        for label, s in P.speed_stats(times, "float").items():
            rows[label].update(s)
    finally:
        if tmpobj is not None:
            tmpobj.cleanup()

    print()
    print("| variant | cosine mean | cosine min | median ms | speed-up | median round ratio | quiet-round ratio | "
          "ORT optimized graph |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        ops = ", ".join(f"{k} {v}" for k, v in r["optimized_ops"].items()
                        if k not in ("Add", "LayerNormalization", "SkipLayerNormalization"))
        print(f"| {label} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['median_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['median_round_ratio']:.2f}x | {r['quiet_round_ratio']:.2f}x ({r['n_quiet']}) | {ops} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({
            "benchmark": "ptq_graph_study", "attn": args.attn, "rounds": args.rounds, "pause_ms": args.pause_ms,
            "calib_batches": len(calib),
            "held_out": int(ref.shape[0]), "onnxruntime": ort.__version__, "torch": torch.__version__,
            "variants": rows}, indent=1))
        print(f"saved {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
