"""Clean-ups of an exported ONNX graph that the TorchScript exporter leaves to the runtime."""
from __future__ import annotations

from typing import Dict, Tuple

_MERGEABLE = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Mul")


def share_identical_qdq(model) -> int:
    """Merge QuantizeLinear/DequantizeLinear nodes that compute the same thing; returns how many were removed.

    The query, key and value projections read one tensor, so calibration gives them one scale and the exporter
    writes three identical QuantizeLinear->DequantizeLinear chains; ONNX Runtime would quantize the tensor three
    times. Two nodes are identical when they have the same op, the same attributes and the same inputs, where a
    constant input counts by its value (each chain has its own Constant nodes).
    """
    from onnx import numpy_helper

    graph = model.graph
    constant_value: Dict[str, Tuple] = {}
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        constant_value[init.name] = ("init", arr.dtype.str, arr.shape, arr.tobytes())
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            arr = numpy_helper.to_array(node.attribute[0].t)
            constant_value[node.output[0]] = ("const", arr.dtype.str, arr.shape, arr.tobytes())

    graph_outputs = {o.name for o in graph.output}
    renamed: Dict[str, str] = {}
    seen: Dict[Tuple, list] = {}
    keep = []
    removed = 0
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        if node.op_type in _MERGEABLE and not set(node.output) & graph_outputs:
            key = (node.op_type, node.domain,
                   tuple(constant_value.get(n, ("name", n)) for n in node.input),
                   tuple(a.SerializeToString() for a in node.attribute))
            first = seen.get(key)
            if first is not None:
                for old, new in zip(node.output, first):
                    renamed[old] = new
                removed += 1
                continue
            seen[key] = list(node.output)
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    _drop_unused_constants(graph)
    return removed


def drop_identity_casts(model) -> int:
    """Remove Cast nodes whose input already has the target type (the tracer leaves one before some custom ops,
    and it would hide that two QuantizeLinear nodes read the same tensor); returns how many were removed."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model)
    elem_type = {v.name: v.type.tensor_type.elem_type for v in
                 list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    elem_type.update({i.name: i.data_type for i in model.graph.initializer})
    graph_outputs = {o.name for o in model.graph.output}
    renamed: Dict[str, str] = {}
    keep = []
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        if node.op_type == "Cast" and node.output[0] not in graph_outputs:
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None and elem_type.get(node.input[0]) == to:
                renamed[node.output[0]] = node.input[0]
                continue
        keep.append(node)
    removed = len(model.graph.node) - len(keep)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return removed


def _drop_unused_constants(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep)
