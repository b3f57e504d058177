"""Which output channels and attention heads of a model can be removed, and what must shrink with them: a dataflow
analysis of the model's exported graph (``torch.export``, ATen ops).

Every Linear or Conv output opens a *space*: its output channels. The analysis follows each space through the
graph, one tensor dimension at a time, and records what the channels meet:

- elementwise ops, dropout, dtype casts, pooling over other dims: the channels pass through unchanged;
- an elementwise op with another space's channels on the same dim (``act(gate) * up``; an SE gate): the two spaces
  become one *group*, whose units are removed together;
- a Linear or Conv that reduces over them: a *consumer*, whose input columns shrink;
- BatchNorm and depthwise convs: *followers*, whose per-channel parameters shrink and which pass the channels on;
- a reshape into ``[..., heads, head_dim]``, head-internal ops (rotary embeddings slice and concatenate within a
  head), and scaled-dot-product attention: the q, k and v spaces form one head group; with grouped-query attention
  (k and v repeated to the query heads, ``repeat_kv``) a unit is one key/value head with its queries.

Anything else that touches the channels (a residual add, a norm or softmax over them, a concatenation with other
channels, a model output, an op the analysis does not know) makes the group *unremovable*, with the op and the
module named: the residual stream's width is refused this way. The analysis says what is *structurally*
removable; whether the removed units' values are exactly constant (so that removing them is exact) is measured
afterwards on the example inputs.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .surgery import input_width

#: ATen ops that act on each element alone: every channel tag passes through unchanged
_ELEMENTWISE_UNARY = {
    "gelu", "relu", "relu_", "silu", "silu_", "sigmoid", "tanh", "hardtanh", "hardtanh_", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "mish", "softplus", "erf", "exp", "neg", "abs", "sqrt", "rsqrt", "pow", "dropout", "clone",
    "contiguous", "alias", "to", "_to_copy", "type_as", "detach", "lift_fresh_copy", "clamp", "clamp_min",
    "clamp_max", "square", "log", "reciprocal", "sin", "cos", "fill",
}
_ELEMENTWISE_BINARY = {"add", "sub", "mul", "div", "maximum", "minimum", "rsub"}
_NO_OUTPUT = {"_assert_tensor_metadata", "sym_size", "_assert_scalar", "sym_constrain_range_for_size"}
_POOL = {"adaptive_avg_pool2d", "adaptive_avg_pool1d", "avg_pool2d", "avg_pool1d", "max_pool2d", "max_pool1d",
         "adaptive_max_pool2d", "max_pool2d_with_indices"}
_REDUCE = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "prod", "logsumexp"}


@dataclass(frozen=True)
class Tag:
    """What one tensor dimension holds: the channels of ``space`` (``role`` "ch"), or its heads ("head", each
    entry ``rep`` times when key/value heads were repeated for the queries), or the positions inside a head
    ("within")."""

    space: int
    role: str = "ch"
    rep: int = 1


@dataclass
class Space:
    """The output channels of one producer module."""

    id: int
    module: str
    op: str          # "linear" or "conv"
    channels: int
    head_dim: Optional[int] = None


@dataclass
class Group:
    """Spaces whose units are removed together, with the modules that shrink with them.

    ``producers``: modules whose output channels (rows, with biases) are the units. ``consumers``: modules whose
    input channels are. ``followers``: per-channel modules on the way (BatchNorm, depthwise convs). For a head
    group ``head_dim`` is set and a unit is one key/value head (one head without GQA) with its query heads.
    ``reason``: why the group cannot be removed (None: it can).
    """

    producers: List[Space]
    consumers: List[Tuple[str, str]] = field(default_factory=list)   # (module, op)
    followers: List[Tuple[str, str]] = field(default_factory=list)   # (module, op)
    head_dim: Optional[int] = None
    reason: Optional[str] = None
    summed_in: Optional[str] = None  # where the producers' outputs are added (one residual stream), if they are

    @property
    def units(self) -> int:
        """Units of the group: channels, or key/value heads (the fewest heads among its spaces)."""
        if self.head_dim is None:
            return self.producers[0].channels
        return min(s.channels // self.head_dim for s in self.producers)


@dataclass
class Analysis:
    groups: List[Group]

    def removable(self) -> List[Group]:
        return [g for g in self.groups if g.reason is None]


class _Tracer:
    def __init__(self, program: torch.export.ExportedProgram, model: nn.Module):
        self.program = program
        self.model = model
        signature = program.graph_signature
        self.params = dict(signature.inputs_to_parameters)
        self.buffers = dict(signature.inputs_to_buffers)
        self.constants = set(getattr(signature, "inputs_to_lifted_tensor_constants", {}) or {})
        self.tags: Dict[Any, Any] = {}          # node -> {dim: Tag} (a list of them for tuple outputs)
        self.const: Dict[Any, bool] = {}        # node -> computed from parameters and constants alone
        self.spaces: List[Space] = []
        self.parent: List[int] = []
        self.reason: Dict[int, str] = {}
        self.summed: Dict[int, str] = {}       # root -> where two producers' channels are added (a residual stream)
        self.head_dim: Dict[int, int] = {}
        self.consumers: Dict[int, List[Tuple[str, str]]] = {}
        self.followers: Dict[int, List[Tuple[str, str]]] = {}
        self.space_of_module: Dict[str, int] = {}
        self.consumer_space: Dict[str, int] = {}

    # -- union-find over spaces -------------------------------------------------------------------------------
    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        keep, gone = min(ra, rb), max(ra, rb)
        self.parent[gone] = keep
        for table in (self.reason, self.summed):
            if gone in table and keep not in table:
                table[keep] = table[gone]
        if gone in self.head_dim:
            if keep in self.head_dim and self.head_dim[keep] != self.head_dim[gone]:
                self.escape(keep, f"heads of {self.head_dim[keep]} and {self.head_dim[gone]} channels meet")
            self.head_dim.setdefault(keep, self.head_dim[gone])
        for table in (self.consumers, self.followers):
            table.setdefault(keep, []).extend(table.pop(gone, []))
        return keep

    def escape(self, space: int, reason: str) -> None:
        self.reason.setdefault(self.find(space), reason)

    def escape_all(self, tags: Dict[int, Tag], reason: str) -> None:
        for tag in tags.values():
            self.escape(tag.space, reason)

    def new_space(self, module: str, op: str, channels: int) -> int:
        if module in self.space_of_module:  # a module called twice: its output channels are the same units
            return self.space_of_module[module]
        sid = len(self.spaces)
        self.spaces.append(Space(sid, module, op, channels))
        self.parent.append(sid)
        self.space_of_module[module] = sid
        return sid

    # -- helpers ----------------------------------------------------------------------------------------------
    @staticmethod
    def _where(node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        return list(stack.values())[-1][0] if stack else "the model's forward"

    def _module_of(self, arg) -> Optional[str]:
        name = self.params.get(getattr(arg, "name", None))
        return name.rsplit(".", 1)[0] if name else None

    def _tags(self, arg) -> Dict[int, Tag]:
        tags = self.tags.get(arg) if isinstance(arg, torch.fx.Node) else None
        return tags if isinstance(tags, dict) else {}

    @staticmethod
    def _shape(arg) -> Optional[Tuple[int, ...]]:
        val = arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None
        return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else None

    def _is_const(self, arg) -> bool:
        if not isinstance(arg, torch.fx.Node):
            return True
        return self.const.get(arg, False)

    def _consume(self, tag: Tag, module: str, op: str) -> None:
        space = self.find(tag.space)
        if module in self.consumer_space:
            space = self.union(space, self.consumer_space[module])
        self.consumer_space[module] = space
        self.consumers.setdefault(space, []).append((module, op))

    # -- the walk ---------------------------------------------------------------------------------------------
    def run(self) -> Analysis:
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                self.const[node] = node.name in self.params or node.name in self.buffers or \
                    node.name in self.constants
                continue
            if node.op == "output":
                for out in _flatten(node.args):
                    self.escape_all(self._tags(out), "they reach the model's output")
                continue
            if node.op != "call_function":
                continue
            inputs = [a for a in _flatten((node.args, node.kwargs)) if isinstance(a, torch.fx.Node)]
            self.const[node] = all(self._is_const(a) for a in inputs)
            self.tags[node] = self._visit(node)
        return self._groups()

    def _visit(self, node):  # noqa: C901 - one dispatch over the op families
        target = node.target
        if target is operator.getitem:
            source, index = node.args
            tags = self.tags.get(source)
            return tags[index] if isinstance(tags, list) and index < len(tags) else {}
        name = _op_name(target)
        args = node.args
        where = self._where(node)
        if name in _NO_OUTPUT:
            return {}
        if name == "linear":
            return self._linear(node, args, where)
        if name == "addmm":
            return self._addmm(node, args, where)
        if name in ("conv2d", "conv1d", "convolution"):
            return self._conv(node, args, where)
        if name in ("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit"):
            return self._batch_norm(node, args, where, tuple_out=name.startswith("_native"))
        if name in _ELEMENTWISE_UNARY:
            return dict(self._tags(args[0]))
        if name in _ELEMENTWISE_BINARY:
            return self._binary(node, name, where)
        if name in ("view", "reshape", "_unsafe_view", "flatten", "unflatten"):
            return self._reshape(node, args[0], where)
        if name in ("transpose", "t", "permute", "unsqueeze", "squeeze", "expand", "slice", "select", "cat",
                    "split", "split_with_sizes", "chunk"):
            return self._layout(node, name, args, where)
        if name == "scaled_dot_product_attention":
            return self._attention(node, args, where)
        if name in ("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d"):
            return self._pad(node, args, where)
        if name in _POOL:
            tags = self._tags(args[0])
            if any(d >= 2 for d in tags):
                self.escape_all(tags, f"{name} pools over them in {where}")
                return {}
            return dict(tags) if not name.endswith("with_indices") else [dict(tags), {}]
        if name in _REDUCE or name in ("softmax", "_softmax", "log_softmax", "_log_softmax", "layer_norm",
                                       "native_layer_norm", "group_norm", "native_group_norm"):
            return self._reduce(node, name, args, where)
        if name == "embedding":
            return {}
        for a in _flatten((args, node.kwargs)):
            self.escape_all(self._tags(a), f"{name} in {where}, which slimtorch cannot follow")
        return {}

    def _linear(self, node, args, where):
        x, weight = args[0], args[1]
        module = self._module_of(weight)
        tags = self._tags(x)
        shape = self._shape(node)
        last = len(shape) - 1 if shape else -1
        if module is None:
            self.escape_all(tags, f"a linear op in {where} whose weight is not a module parameter")
            return {}
        in_dim = len(self._shape(x)) - 1
        for d, tag in tags.items():
            if d == in_dim and tag.role == "ch":
                self._consume(tag, module, "linear")
            else:
                self.escape(tag.space, f"{module} reads them along another dimension than its inputs")
        weight_shape = self._shape(weight)
        return {last: Tag(self.new_space(module, "linear", weight_shape[0]))}

    def _addmm(self, node, args, where):
        """``addmm(bias, x, W)`` with ``W`` ``[in, out]``: transformers' Conv1D (GPT-2), a Linear stored transposed."""
        x, weight = args[1], args[2]
        module = self._module_of(weight)
        tags = self._tags(x)
        if module is None:
            self.escape_all(tags, f"a matrix product in {where} whose weight is not a module parameter")
            return {}
        for d, tag in tags.items():
            if d == 1 and tag.role == "ch":
                self._consume(tag, module, "conv1d")
            else:
                self.escape(tag.space, f"{module} reads them along another dimension than its inputs")
        return {1: Tag(self.new_space(module, "conv1d", self._shape(weight)[1]))}

    def _conv(self, node, args, where):
        x, weight = args[0], args[1]
        at = 8 if _op_name(node.target) == "convolution" else 6  # conv2d(x, w, b, stride, padding, dilation, groups)
        groups = int(args[at]) if len(args) > at else 1
        module = self._module_of(weight)
        tags = self._tags(x)
        weight_shape = self._shape(weight)
        out_channels, in_per_group = weight_shape[0], weight_shape[1]
        in_channels = in_per_group * groups
        if module is None:
            self.escape_all(tags, f"a convolution in {where} whose weight is not a module parameter")
            return {}
        for d, tag in tags.items():
            if d != 1 or tag.role != "ch":
                self.escape(tag.space, f"{module} convolves over them")
        depthwise = groups > 1 and groups == in_channels == out_channels
        if depthwise:
            tag = tags.get(1)
            if tag is None:
                return {}
            space = self.find(tag.space)
            self.followers.setdefault(space, []).append((module, "depthwise_conv"))
            return {1: Tag(space)}
        if groups > 1:
            self.escape_all(tags, f"{module} is a grouped convolution ({groups} groups)")
            sid = self.new_space(module, "conv", out_channels)
            self.escape(sid, f"{module} is a grouped convolution ({groups} groups)")
            return {1: Tag(sid)}
        if 1 in tags and tags[1].role == "ch":
            self._consume(tags[1], module, "conv")
        return {1: Tag(self.new_space(module, "conv", out_channels))}

    def _batch_norm(self, node, args, where, tuple_out: bool):
        tags = self._tags(args[0])
        module = self._module_of(args[1]) if len(args) > 1 and args[1] is not None else None
        out = {}
        for d, tag in tags.items():
            if d == 1 and tag.role == "ch" and module is not None:
                self.followers.setdefault(self.find(tag.space), []).append((module, "batch_norm"))
                out[1] = tag
            else:
                self.escape(tag.space, f"batch norm in {where} normalizes over them")
        return [out, {}, {}] if tuple_out else out

    def _binary(self, node, name, where):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        shape = self._shape(node)
        if shape is None:
            return {}
        rank = len(shape)
        out: Dict[int, Tag] = {}
        operands = [(a, self._tags(a), self._shape(a)), (b, self._tags(b), self._shape(b))]
        for d in range(rank):
            found: List[Tag] = []
            untagged_full: List[Any] = []
            for arg, tags, arg_shape in operands:
                if arg_shape is None:
                    continue  # a scalar
                ad = d - (rank - len(arg_shape))
                if ad < 0:
                    continue
                if ad in tags:
                    found.append(tags[ad])
                elif arg_shape[ad] != 1:
                    untagged_full.append(arg)
            if not found:
                continue
            first = found[0]
            for other in found[1:]:
                if other.role != first.role or other.rep != first.rep:
                    self.escape(first.space, f"{name} in {where} meets them with differently laid-out channels")
                    self.escape(other.space, f"{name} in {where} meets them with differently laid-out channels")
                self.union(first.space, other.space)
            if len(found) > 1 and name in ("add", "sub", "rsub"):
                self.summed.setdefault(self.find(first.space), where)
            if untagged_full and name in ("add", "sub", "rsub", "maximum", "minimum") and \
                    not all(self._is_const(u) for u in untagged_full):
                self.escape(first.space, f"they are added to other values (a residual connection?) in {where}")
                continue
            if name == "div" and len(found) and b is not None and self._tags(b):
                self.escape(first.space, f"they divide in {where}")
                continue
            out[d] = Tag(self.find(first.space), first.role, first.rep)
        return out

    def _pad(self, node, args, where):
        """Padding of other dims (a conv's spatial \"same\" padding) passes the channels; padding them does not."""
        tags = self._tags(args[0])
        shape = self._shape(args[0])
        pads = list(args[1]) if len(args) > 1 else []
        padded = {len(shape) - 1 - i // 2 for i, p in enumerate(pads) if p != 0}  # pairs from the last dim back
        if any(d in padded for d in tags):
            self.escape_all(tags, f"padding in {where} adds channels")
            return {}
        return dict(tags)

    def _reduce(self, node, name, args, where):
        tags = self._tags(args[0])
        shape = self._shape(args[0])
        if not tags or shape is None:
            return {}
        rank = len(shape)
        if name in ("layer_norm", "native_layer_norm"):
            reduced = set(range(rank - len(args[1]), rank))
        elif name in ("group_norm", "native_group_norm"):
            reduced = set(range(1, rank))
        elif name in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
            reduced = {int(args[1]) % rank}
        else:
            dims = args[1] if len(args) > 1 else None
            if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
                reduced = set(range(rank))
            else:
                reduced = {int(x) % rank for x in (dims if isinstance(dims, (list, tuple)) else [dims])}
        hit = [t for d, t in tags.items() if d in reduced]
        if hit:
            self.escape_all(tags, f"{name} in {where} combines them")
            return {} if not name.startswith("native") else [{}, {}, {}]
        out_shape = self._shape(node) if not name.startswith("native") else None
        if name in ("layer_norm", "softmax", "_softmax", "log_softmax", "_log_softmax") or \
                (out_shape is not None and len(out_shape) == rank):
            result = dict(tags)
        else:
            result = {}
            for d, t in tags.items():
                result[d - sum(1 for r in reduced if r < d)] = t
        return [result, {}, {}] if name.startswith("native") else result

    def _reshape(self, node, source, where):
        tags = self._tags(source)
        src, dst = self._shape(source), self._shape(node)
        if not tags:
            return {}
        if src is None or dst is None:
            self.escape_all(tags, f"a reshape of unknown shape in {where}")
            return {}
        out: Dict[int, Tag] = {}
        for in_dims, out_dims in _dim_groups(src, dst):
            in_tagged = [(d, tags[d]) for d in in_dims if d in tags]
            if not in_tagged:
                continue
            in_big = [d for d in in_dims if src[d] != 1]
            out_big = [d for d in out_dims if dst[d] != 1]
            if len(in_big) == 1 and len(out_big) == 1:  # the same axis, size-1 dims around it
                out[out_big[0]] = in_tagged[0][1]
                continue
            if len(in_big) == 1 and len(out_big) == 2 and in_tagged[0][1].role == "ch":
                tag = in_tagged[0][1]  # [.., C] -> [.., heads, head_dim]
                space, head_dim = self.find(tag.space), dst[out_big[1]]
                if space in self.head_dim and self.head_dim[space] != head_dim:
                    self.escape(space, f"{where} splits them into heads of {head_dim}, elsewhere "
                                       f"{self.head_dim[space]}")
                    continue
                self.head_dim[space] = head_dim
                out[out_big[0]] = Tag(space, "head")
                out[out_big[1]] = Tag(space, "within")
                continue
            roles = [tags.get(d) for d in in_big]
            if len(in_big) == 2 and len(out_big) == 1 and roles[0] is not None and roles[0].role == "head" and \
                    roles[1] is not None and roles[1].role == "within":
                self.union(roles[0].space, roles[1].space)  # [.., heads, head_dim] -> [.., C]
                out[out_big[0]] = Tag(self.find(roles[0].space), "ch", roles[0].rep)
                continue
            if len(in_big) == 2 and len(out_big) == 1 and roles[0] is not None and roles[0].role == "head" and \
                    roles[1] is None:  # repeat_kv: [B, kv_heads, n_rep, ...] -> [B, kv_heads * n_rep, ...]
                out[out_big[0]] = Tag(self.find(roles[0].space), "head", roles[0].rep * src[in_big[1]])
                continue
            for _, tag in in_tagged:
                self.escape(tag.space, f"a reshape in {where} ({list(src)} -> {list(dst)}) mixes them with other "
                                       "dimensions")
        return out

    def _layout(self, node, name, args, where):  # noqa: C901 - the layout ops, each a few lines
        tags = self._tags(args[0]) if name != "cat" else {}
        shape = self._shape(args[0]) if name != "cat" else None
        if name in ("transpose", "t"):
            d0, d1 = (0, 1) if name == "t" else (int(args[1]), int(args[2]))
            rank = len(shape)
            d0, d1 = d0 % rank, d1 % rank
            swap = {d0: d1, d1: d0}
            return {swap.get(d, d): t for d, t in tags.items()}
        if name == "permute":
            order = [int(d) % len(shape) for d in args[1]]
            return {order.index(d): t for d, t in tags.items()}
        if name == "unsqueeze":
            at = int(args[1]) % (len(shape) + 1)
            return {d + (d >= at): t for d, t in tags.items()}
        if name == "squeeze":
            out_shape = self._shape(node)
            kept = [d for d in range(len(shape)) if not (shape[d] == 1 and len(out_shape) < len(shape) and
                                                         (len(args) < 2 or d in _dims(args[1], len(shape))))]
            return {kept.index(d): t for d, t in tags.items() if d in kept}
        if name == "expand":
            return dict(tags)
        if name in ("slice", "select"):
            dim = int(args[1]) % len(shape) if len(args) > 1 else 0
            tag = tags.get(dim)
            if tag is not None and not (name == "slice" and tag.role == "within"):
                self.escape_all(tags, f"{name} in {where} takes some of them")
                return {}
            if name == "select":
                return {d - (d > dim): t for d, t in tags.items() if d != dim}
            return dict(tags)
        if name == "cat":
            parts, dim = args[0], int(args[1]) if len(args) > 1 else 0
            part_tags = [self._tags(p) for p in parts]
            if not any(part_tags):
                return {}
            rank = len(self._shape(parts[0]))
            dim %= rank
            first = part_tags[0]
            ok = all(set(p) == set(first) for p in part_tags) and \
                all(p[d].role == first[d].role for p in part_tags for d in first)
            if ok and (dim not in first or first[dim].role == "within"):
                for p in part_tags[1:]:
                    for d in first:
                        self.union(first[d].space, p[d].space)
                return {d: Tag(self.find(t.space), t.role, t.rep) for d, t in first.items()}
            for p in part_tags:
                self.escape_all(p, f"cat in {where} joins them with other channels")
            return {}
        # split / chunk: along an untagged dim every piece keeps the tags
        dim = int(args[2]) if len(args) > 2 else 0
        dim %= len(shape)
        if dim in tags:
            self.escape_all(tags, f"{name} in {where} splits them (a fused projection?)")
            return [{} for _ in range(_pieces(node))]
        return [dict(tags) for _ in range(_pieces(node))]

    def _attention(self, node, args, where):
        q, k, v = (self._tags(a) for a in args[:3])
        shapes = [self._shape(a) for a in args[:3]]
        heads = [{t.role: (d, t) for d, t in tags.items()} for tags in (q, k, v)]
        if not all("head" in h and "within" in h for h in heads):
            for tags in (q, k, v):
                self.escape_all(tags, f"attention in {where} whose q, k and v are not all split into heads of "
                                      "removable projections")
            return {}
        for (hd, ht), shape in zip((h["head"] for h in heads), shapes):
            if hd != len(shape) - 3 or heads[0]["within"][0] != len(shape) - 1:
                self.escape(ht.space, f"attention in {where} sees them in an unexpected layout")
        q_heads = shapes[0][heads[0]["head"][0]]
        for h, shape in zip(heads[1:], shapes[1:]):
            kv_heads = shape[h["head"][0]] // h["head"][1].rep
            gqa = bool(args[7]) if len(args) > 7 else bool(node.kwargs.get("enable_gqa", False))
            repeated = h["head"][1].rep if not gqa else q_heads // max(1, shape[h["head"][0]])
            if kv_heads * repeated != q_heads:
                self.escape(h["head"][1].space, f"attention in {where}: {kv_heads} key/value heads do not repeat "
                                                f"to {q_heads} query heads")
        group = heads[0]["head"][1].space
        for h in heads[1:]:
            group = self.union(group, h["head"][1].space)
        rank = len(shapes[0])
        return {rank - 3: Tag(self.find(group), "head"), rank - 1: Tag(self.find(group), "within")}

    # -- the result -------------------------------------------------------------------------------------------
    def _groups(self) -> Analysis:
        members: Dict[int, List[Space]] = {}
        for space in self.spaces:
            members.setdefault(self.find(space.id), []).append(space)
        groups = []
        for root, spaces in members.items():
            head_dim = self.head_dim.get(root)
            group = Group(spaces, consumers=_unique(self.consumers.get(root, [])),
                          followers=_unique(self.followers.get(root, [])), head_dim=head_dim,
                          reason=self.reason.get(root), summed_in=self.summed.get(root))
            if group.reason is None and not group.consumers:
                group.reason = "no layer reads them"
            if group.reason is None:
                group.reason = _layout_problem(group, self.model)
            groups.append(group)
        return Analysis(groups)


def _layout_problem(group: Group, model: nn.Module) -> Optional[str]:
    """Why the group's spaces cannot be cut into the same units (None: they can)."""
    widths = {s.module: s.channels for s in group.producers}
    if group.head_dim is None:
        if len(set(widths.values())) != 1:
            return f"producers of different widths meet: {widths}"
        return None
    units = group.units
    for s in group.producers:
        if s.channels % group.head_dim or (s.channels // group.head_dim) % units:
            return f"{s.module}'s {s.channels} channels are not whole heads of {group.head_dim} per unit"
    for name, op in group.consumers:
        width = input_width(model.get_submodule(name))
        if width % units:
            return f"{name}'s {width} inputs do not split into {units} heads"
    return None


def _unique(pairs: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    seen, out = set(), []
    for p in pairs:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _flatten(obj) -> List[Any]:
    if isinstance(obj, (list, tuple)):
        return [x for o in obj for x in _flatten(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _flatten(o)]
    return [obj]


def _op_name(target) -> str:
    text = str(target)
    parts = text.split(".")
    return parts[1] if len(parts) >= 2 and parts[0] == "aten" else text


def _dims(arg, rank: int) -> List[int]:
    return [int(d) % rank for d in (arg if isinstance(arg, (list, tuple)) else [arg])]


def _pieces(node) -> int:
    val = node.meta.get("val")
    return len(val) if isinstance(val, (list, tuple)) else 1


def _dim_groups(src: Sequence[int], dst: Sequence[int]) -> List[Tuple[List[int], List[int]]]:
    """Pair up runs of dims of ``src`` and ``dst`` with equal products (how a reshape regroups dims)."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        a, b = [i], [j] if j < len(dst) else []
        pa = src[i] if i < len(src) else 1
        pb = dst[j] if j < len(dst) else 1
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(src):
                a.append(i)
                pa *= src[i]
                i += 1
            elif j < len(dst):
                b.append(j)
                pb *= dst[j]
                j += 1
            else:
                break
        while i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):  # trailing size-1 dims
            a.append(i)
            i += 1
        groups.append(([d for d in a if d < len(src)], [d for d in b if d < len(dst)]))
    return groups


def analyze(model: nn.Module, example_inputs: Any) -> Analysis:
    """Export ``model`` on ``example_inputs`` (a tensor, a tuple of positional arguments, or a dict of keyword
    arguments) and find its removable groups. The model is not changed."""
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, dict) else (
        (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs), {})
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:
        raise UnsupportedModelError(f"{type(model).__name__} could not be traced by torch.export on the example "
                                    f"inputs ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                    "slimming needs a traceable forward") from None
    finally:
        model.train(was_training)
    return _Tracer(program, model).run()
