"""A small ONNX graph builder: each call adds one node and reads like the sentence describing it.

    g = Graph("gate")
    x = g.input("x", ["N", 64, 8, 56, 56])
    z = g.op("GlobalAveragePool", x)
    g.output(g.op("Flatten", z, axis=1), "pooled")
    model = g.model()                      # checked, shape-inferred, opset 17
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..bundle.vocabulary import CUSTOM_DOMAIN, CUSTOM_OPSET, IR_VERSION, IR_VERSION_FUNCTIONS, OPSET

_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
          "int64": TensorProto.INT64, "int32": TensorProto.INT32, "bool": TensorProto.BOOL,
          "uint8": TensorProto.UINT8}

Dim = Union[int, str]


class Graph:
    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: List[onnx.NodeProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self.functions: Dict[Tuple[str, str], onnx.FunctionProto] = {}
        self._count: Dict[str, int] = {}
        self._alias: Dict[str, str] = {}    # values renamed to the graph output they became

    def _fresh(self, hint: str) -> str:
        n = self._count.get(hint, 0)
        self._count[hint] = n + 1
        return f"{hint}_{n}"

    def input(self, name: str, shape: Sequence[Dim], dtype: str = "float32") -> str:
        self.inputs.append(helper.make_tensor_value_info(name, _DTYPE[dtype], list(shape)))
        return name

    def const(self, value: Union[np.ndarray, Sequence[int], Sequence[float]], hint: str = "c",
              dtype: Optional[str] = None) -> str:
        arr = np.asarray(value, dtype=dtype) if dtype else np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        name = self._fresh(hint)
        # (np.ascontiguousarray would turn a 0-d scalar into shape (1,))
        self.initializers.append(numpy_helper.from_array(arr.copy(order="C"), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: Optional[str] = None,
           role: Optional[str] = None, **attrs: Any) -> Any:
        """Add a node; returns its output name (or a list of names for ``outputs > 1``).

        ``role`` tags the node and its outputs by name (``fill_3``, ``n_fill_Conv_3``) so that a
        profile can tell what the node does (``bench --breakdown``: cheap fills apart from the
        convolutions of computed filters); backends keep the tag in the names of fused nodes.
        """
        tag = f"{role}_" if role else ""
        outs = [self._fresh(tag + op_type.lower()) for _ in range(outputs)]
        inputs = tuple(self._alias.get(i, i) for i in inputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs,
                                           name=name or self._fresh(f"n_{tag}{op_type}"), **attrs))
        return outs[0] if outputs == 1 else outs

    def custom(self, function: onnx.FunctionProto, *inputs: str, **attrs: Any) -> str:
        """A node of a custom op (domain ``adaedge``) whose body is ``function``.

        The function travels with the model, so a runtime without the op runs its body; a
        TensorRT plugin of the same name can take its place. ``function.overload`` (IR 10) lets
        one op have bodies for different attribute values.
        """
        key = (function.name, function.overload)
        self.functions.setdefault(key, function)
        out = self._fresh(function.name.lower())
        inputs = tuple(self._alias.get(i, i) for i in inputs)
        node = helper.make_node(function.name, list(inputs), [out], domain=function.domain,
                                name=self._fresh("n_" + function.name), **attrs)
        if function.overload:
            node.overload = function.overload
        self.nodes.append(node)
        return out

    def output(self, value: str, name: str, dtype: str = "float32") -> str:
        """Expose ``value`` as graph output ``name``: the node computing it writes the output
        directly where it can, else an Identity copies it (a graph input, a constant, a value
        already exposed under another name)."""
        value = self._alias.get(value, value)
        producer = next((n for n in self.nodes if value in n.output), None)
        exposed = {o.name for o in self.outputs}
        if producer is not None and value not in exposed and \
                not any(i.name == value for i in self.inputs):
            for node in self.nodes:
                node.output[:] = [name if o == value else o for o in node.output]
                node.input[:] = [name if i == value else i for i in node.input]
            self._alias[value] = name
        else:
            self.nodes.append(helper.make_node("Identity", [value], [name],
                                               name=self._fresh("out")))
        self.outputs.append(helper.make_tensor_value_info(name, _DTYPE[dtype], None))
        return name

    def model(self, check: bool = True) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.functions:
            opsets.append(helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_OPSET))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="adaedge",
                                  functions=list(self.functions.values()))
        # IR 10 (ONNX 1.16) brings function overloads; graphs without functions stay at IR 8.
        model.ir_version = IR_VERSION_FUNCTIONS if self.functions else IR_VERSION
        if check:
            model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
            onnx.checker.check_model(model, full_check=True)
            _fill_output_shapes(model)
        return model


def _fill_output_shapes(model: onnx.ModelProto) -> None:
    known = {v.name: v for v in model.graph.value_info}
    for out in model.graph.output:
        if not out.type.tensor_type.HasField("shape") and out.name in known:
            out.type.CopyFrom(known[out.name].type)


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor as float64 numpy (weights are folded in double, then stored as float32)."""
    return t.detach().cpu().double().numpy()


def bn_affine(bn: Any) -> Tuple[np.ndarray, np.ndarray]:
    """An eval-mode batch norm as ``y = x * scale + shift`` per channel."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = to_numpy(bn.weight) / np.sqrt(to_numpy(bn.running_var) + bn.eps)
    return scale, to_numpy(bn.bias) - to_numpy(bn.running_mean) * scale


def folded_conv(conv: Any, bn: Any) -> Tuple[np.ndarray, np.ndarray, Tuple[int, int],
                                              Tuple[int, int]]:
    """A per-frame convolution with its eval-mode batch norm folded in: weight (C_out, C_in/g,
    kh, kw), bias, stride and padding. ``conv`` is an ``nn.Conv2d``, or an ``nn.Conv3d`` with a
    1 x kh x kw kernel and no temporal stride."""
    weight = to_numpy(conv.weight)
    stride, padding = tuple(conv.stride), tuple(conv.padding)
    if weight.ndim == 5:
        assert weight.shape[2] == 1 and stride[0] == 1 and padding[0] == 0, "not per frame"
        weight, stride, padding = weight[:, :, 0], stride[1:], padding[1:]
    scale, shift = bn_affine(bn)
    if conv.bias is not None:
        shift = shift + to_numpy(conv.bias) * scale
    return weight * scale[:, None, None, None], shift, stride, padding


def conv2d_bn(g: Graph, x: str, conv: Any, bn: Any) -> str:
    """A per-frame 2D convolution with its eval-mode batch norm folded in (:func:`folded_conv`),
    applied to frames folded into the batch (N*T, C, H, W)."""
    weight, shift, stride, padding = folded_conv(conv, bn)
    return g.op("Conv", x, g.const(weight, "w"), g.const(shift, "b"),
                kernel_shape=list(weight.shape[2:]), strides=list(stride),
                pads=[padding[0], padding[1]] * 2, group=conv.groups)
