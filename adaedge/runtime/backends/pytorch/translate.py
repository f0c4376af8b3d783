"""Our ONNX pieces as PyTorch modules: one module per piece, exported with ``torch.export``.

The pieces adaedge writes use a small set of standard ops (custom nodes are inlined to their
standard-op bodies first). :class:`OnnxModule` runs them with torch ops, node by node, so that
``torch.export`` traces a piece into a flat program that CUDA graphs can capture. Values that ONNX
passes as tensors but PyTorch takes as Python numbers (shapes, axes, pads, slice bounds, ``k``)
must be constants of the piece; a piece that computes them is refused with the node's name.

Semantics follow ONNX opset 17 for the attributes adaedge writes; anything else is refused rather
than guessed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ....errors import BundleError

_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.DOUBLE: torch.float64, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.INT8: torch.int8,
}


@dataclass
class Node:
    op: str
    inputs: List[str]
    outputs: List[str]
    attrs: Dict[str, Any]
    name: str


class UnsupportedPiece(BundleError):
    """A piece with an op (or a form of one) this translation does not run."""


def _attrs(node: onnx.NodeProto) -> Dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class OnnxModule(torch.nn.Module):
    """Runs one ONNX graph (opset 17, adaedge's op set) with torch ops."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        if model.functions:
            from onnx import inliner
            model = inliner.inline_local_functions(model)
        graph = model.graph
        self.input_names = [i.name for i in graph.input]
        self.output_names = [o.name for o in graph.output]
        self._np: Dict[str, np.ndarray] = {}        # constants, for ops that take Python numbers
        self._buffer: Dict[str, str] = {}           # constant value -> buffer attribute
        for init in graph.initializer:
            self._constant(init.name, numpy_helper.to_array(init))
        self.nodes: List[Node] = []
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise UnsupportedPiece(f"node {node.name!r} is custom op {node.domain}::"
                                       f"{node.op_type} with no function body")
            attrs = _attrs(node)
            if node.op_type == "Constant":
                if "value" not in attrs:
                    raise UnsupportedPiece(f"Constant {node.name!r} without a tensor value")
                self._constant(node.output[0], numpy_helper.to_array(attrs["value"]))
                continue
            if node.op_type not in _OPS:
                raise UnsupportedPiece(f"node {node.name!r}: op {node.op_type} is not supported "
                                       "by the PyTorch translation")
            self.nodes.append(Node(node.op_type, list(node.input), list(node.output), attrs,
                                   node.name))

    def _constant(self, name: str, value: np.ndarray) -> None:
        self._np[name] = value
        attr = f"c{len(self._buffer)}_" + re.sub(r"\W", "_", name)[:40]
        self.register_buffer(attr, torch.from_numpy(np.array(value)), persistent=False)
        self._buffer[name] = attr

    def ints(self, name: str, node: str) -> List[int]:
        """A constant input as Python ints (shapes, axes, pads...)."""
        if name not in self._np:
            raise UnsupportedPiece(f"node {node!r} takes {name!r} as a number, but the piece "
                                   "computes it; only constant values are supported there")
        return [int(v) for v in np.asarray(self._np[name]).reshape(-1)]

    def forward(self, *args: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        env: Dict[str, torch.Tensor] = dict(zip(self.input_names, args))
        for name, attr in self._buffer.items():
            env[name] = getattr(self, attr)
        for node in self.nodes:
            xs = [env[i] if i else None for i in node.inputs]
            out = _OPS[node.op](self, node, xs)
            if isinstance(out, torch.Tensor):
                out = (out,)
            for o, v in zip(node.outputs, out):
                env[o] = v
        return tuple(env[o] for o in self.output_names)


Op = Callable[[OnnxModule, "Node", List[Any]], Any]
_OPS: Dict[str, Op] = {}


def _op(*names: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        for n in names:
            _OPS[n] = fn
        return fn
    return register


def _elementwise(fn: Callable[..., Any]) -> Op:
    return lambda m, node, xs: fn(*xs)


_ELEMENTWISE: Dict[str, Callable[..., Any]] = {
                   "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Abs": torch.abs,
                   "Log": torch.log,
                   "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh,
                   "Ceil": torch.ceil, "Equal": torch.eq, "Less": torch.lt, "Where": torch.where,
                   "MatMul": torch.matmul, "Identity": lambda x: x}
for _name, _fn in _ELEMENTWISE.items():
    _OPS[_name] = _elementwise(_fn)


@_op("Max", "Min")
def _max_min(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    fn = torch.maximum if node.op == "Max" else torch.minimum
    return functools.reduce(fn, xs)


@_op("Div")
def _div(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    x, y = xs
    if x.dtype.is_floating_point:
        return x / y
    return torch.div(x, y, rounding_mode="trunc")


@_op("Cast")
def _cast(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    a, n = node.attrs, node.name
    if a["to"] not in _ONNX_TO_TORCH:
        raise UnsupportedPiece(f"Cast {n!r} to ONNX type {a['to']}")
    return xs[0].to(_ONNX_TO_TORCH[a["to"]])


@_op("Clip")
def _clip(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    lo = xs[1] if len(xs) > 1 else None
    hi = xs[2] if len(xs) > 2 else None
    return torch.clamp(xs[0], lo, hi)


@_op("ArgMax")
def _argmax(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    a, n = node.attrs, node.name
    if a.get("select_last_index", 0):
        raise UnsupportedPiece(f"ArgMax {n!r} with select_last_index")
    return torch.argmax(xs[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))


@_op("Concat")
def _concat(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    return torch.cat(xs, dim=node.attrs["axis"])


def _symmetric(pads: Sequence[int], k: int, n: str) -> Tuple[List[int], Optional[List[int]]]:
    """ONNX pads [b1.., e1..] as torch's symmetric padding, or the F.pad list when asymmetric."""
    begin, end = list(pads[:k]), list(pads[k:])
    if begin == end:
        return begin, None
    flat: List[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return [0] * k, flat


@_op("Conv")
def _conv(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    a, n = node.attrs, node.name
    x, w = xs[0], xs[1]
    b = xs[2] if len(xs) > 2 else None
    k = w.dim() - 2
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedPiece(f"Conv {n!r} with auto_pad")
    padding, flat = _symmetric(a.get("pads", [0] * 2 * k), k, n)
    if flat is not None:
        x = F.pad(x, flat)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k]
    return fn(x, w, b, stride=a.get("strides", [1] * k), padding=padding,
              dilation=a.get("dilations", [1] * k), groups=a.get("group", 1))


@_op("Gemm")
def _gemm(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    a = node.attrs
    x, w = xs[0], xs[1]
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = torch.matmul(x, w)
    if a.get("alpha", 1.0) != 1.0:
        y = y * a["alpha"]
    if len(xs) > 2 and xs[2] is not None:
        c = xs[2] if a.get("beta", 1.0) == 1.0 else xs[2] * a["beta"]
        y = y + c
    return y


@_op("Flatten")
def _flatten(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    a = node.attrs
    x, axis = xs[0], a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    if axis == 0:
        return x.reshape(1, -1)
    if axis == x.dim():
        return x.reshape(-1, 1)
    return x.flatten(axis).flatten(0, axis - 1)


@_op("GlobalAveragePool")
def _gap(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    return xs[0].mean(dim=tuple(range(2, xs[0].dim())), keepdim=True)


@_op("AveragePool", "MaxPool")
def _pool(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    a, n = node.attrs, node.name
    op = node.op
    kernel = list(a["kernel_shape"])
    k = len(kernel)
    padding, flat = _symmetric(a.get("pads", [0] * 2 * k), k, n)
    if flat is not None:
        raise UnsupportedPiece(f"{op} {n!r} with asymmetric pads")
    strides = a.get("strides", [1] * k)
    ceil = bool(a.get("ceil_mode", 0))
    if op == "MaxPool":
        fn_max = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[k]
        return fn_max(xs[0], kernel, strides, padding, a.get("dilations", [1] * k), ceil)
    fn_avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[k]
    return fn_avg(xs[0], kernel, strides, padding, ceil, bool(a.get("count_include_pad", 0)))


@_op("Gather")
def _gather(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    a = node.attrs
    x, idx = xs
    axis = a.get("axis", 0)
    axis = axis + x.dim() if axis < 0 else axis
    return x[(slice(None),) * axis + (idx,)]


@_op("ScatterND")
def _scatter_nd(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    a, n = node.attrs, node.name
    if a.get("reduction", b"none") not in (b"none", "none"):
        raise UnsupportedPiece(f"ScatterND {n!r} with a reduction")
    data, idx, upd = xs
    k = idx.shape[-1]
    out = data.clone()
    out[tuple(idx[..., i] for i in range(k))] = upd
    return out


@_op("Expand")
def _expand(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    shape = m.ints(node.inputs[1], node.name)
    x = xs[0]
    if len(shape) > x.dim():
        x = x.reshape((1,) * (len(shape) - x.dim()) + tuple(x.shape))
    target = [1] * (x.dim() - len(shape)) + list(shape)
    return x.expand([-1 if b == 1 else b for b in target])   # numpy broadcasting of x to shape


@_op("Pad")
def _pad(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    names, a, n = node.inputs, node.attrs, node.name
    x = xs[0]
    pads = m.ints(names[1], n)
    if len(names) > 3 and names[3]:
        raise UnsupportedPiece(f"Pad {n!r} with axes")
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    value = float(m._np[names[2]]) if len(names) > 2 and names[2] else 0.0
    k = x.dim()
    flat: List[int] = []
    for d in reversed(range(k)):
        flat += [pads[d], pads[d + k]]
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode]
    if mode != "constant":      # torch pads only the last dims in these modes: drop the leading
        while len(flat) > 2 and flat[-1] == flat[-2] == 0:    # dims that are not padded
            flat = flat[:-2]
    return F.pad(x, flat, mode=torch_mode, value=value if mode == "constant" else None)


def _axes(m: OnnxModule, names: List[str], a: Dict[str, Any], n: str) -> Optional[List[int]]:
    if "axes" in a:
        return list(a["axes"])
    if len(names) > 1 and names[1]:
        return m.ints(names[1], n)
    return None


@_op("ReduceMean", "ReduceSum", "ReduceMax")
def _reduce(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    names, a, n = node.inputs, node.attrs, node.name
    op = node.op
    x = xs[0]
    axes = _axes(m, names, a, n)
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    fn = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax}[op]
    return fn(x, dim=tuple(axes), keepdim=keep)


@_op("Reshape")
def _reshape(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    names, a, n = node.inputs, node.attrs, node.name
    x = xs[0]
    shape = m.ints(names[1], n)
    if a.get("allowzero", 0):
        raise UnsupportedPiece(f"Reshape {n!r} with allowzero")
    return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


@_op("Slice")
def _slice(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    names, n = node.inputs, node.name
    x = xs[0]
    starts, ends = m.ints(names[1], n), m.ints(names[2], n)
    axes = m.ints(names[3], n) if len(names) > 3 and names[3] else list(range(len(starts)))
    steps = m.ints(names[4], n) if len(names) > 4 and names[4] else [1] * len(starts)
    index: List[Any] = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise UnsupportedPiece(f"Slice {n!r} with step {st}")
        index[ax if ax >= 0 else ax + x.dim()] = slice(s, e, st)
    return x[tuple(index)]


@_op("Split")
def _split(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    names, a, n = node.inputs, node.attrs, node.name
    x = xs[0]
    axis = a.get("axis", 0)
    count = len(node.outputs)
    if len(names) > 1 and names[1]:
        sizes = m.ints(names[1], n)
    else:
        size = x.shape[axis]
        sizes = [-(-size // count)] * (count - 1)
        sizes.append(size - sum(sizes))
    return tuple(torch.split(x, sizes, dim=axis))


@_op("Tile")
def _tile(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    names, n = node.inputs, node.name
    return xs[0].repeat(m.ints(names[1], n))


@_op("TopK")
def _topk(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    names, a, n = node.inputs, node.attrs, node.name
    k = m.ints(names[1], n)[0]
    values, indices = torch.topk(xs[0], k, dim=a.get("axis", -1), largest=bool(a.get("largest", 1)),
                                 sorted=bool(a.get("sorted", 1)))
    return values, indices


@_op("Transpose")
def _transpose(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    a = node.attrs
    x = xs[0]
    perm = a.get("perm", list(reversed(range(x.dim()))))
    return x.permute(list(perm))


@_op("Unsqueeze")
def _unsqueeze(m: OnnxModule, node: "Node", xs: List[Any]) -> Any:
    names, n = node.inputs, node.name
    x = xs[0]
    axes = m.ints(names[1], n)
    rank = x.dim() + len(axes)
    for ax in sorted(ax + rank if ax < 0 else ax for ax in axes):
        x = x.unsqueeze(ax)
    return x


SUPPORTED_OPS = sorted(_OPS)
