"""A small ONNX graph builder: each call adds one node and reads like the sentence describing it.

    g = Graph("gate")
    x = g.input("x", ["N", 64, 8, 56, 56])
    z = g.op("GlobalAveragePool", x)
    g.output(g.op("Flatten", z, axis=1), "pooled")
    model = g.model()                      # checked, shape-inferred, opset 17
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17

_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
          "int64": TensorProto.INT64, "int32": TensorProto.INT32, "bool": TensorProto.BOOL,
          "uint8": TensorProto.UINT8}
_DTYPE_NAME: Dict[int, str] = {int(v): k for k, v in _DTYPE.items()}

Dim = Union[int, str]


class Graph:
    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: List[onnx.NodeProto] = []
        self.inputs: List[onnx.ValueInfoProto] = []
        self.outputs: List[onnx.ValueInfoProto] = []
        self.initializers: List[onnx.TensorProto] = []
        self._count: Dict[str, int] = {}

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
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: Optional[str] = None,
           **attrs: Any) -> Any:
        """Add a node; returns its output name (or a list of names for ``outputs > 1``)."""
        outs = [self._fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs,
                                           name=name or self._fresh("n_" + op_type), **attrs))
        return outs[0] if outputs == 1 else outs

    def output(self, value: str, name: str, dtype: str = "float32") -> str:
        """Expose ``value`` as graph output ``name`` (an Identity renames it)."""
        self.nodes.append(helper.make_node("Identity", [value], [name], name=self._fresh("out")))
        self.outputs.append(helper.make_tensor_value_info(name, _DTYPE[dtype], None))
        return name

    def model(self, check: bool = True) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="adaedge")
        model.ir_version = 8
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


def value_shape(v: onnx.ValueInfoProto) -> List[Dim]:
    dims: List[Dim] = []
    for d in v.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append("?")
    return dims


def value_dtype(v: onnx.ValueInfoProto) -> str:
    return _DTYPE_NAME.get(int(v.type.tensor_type.elem_type), "unknown")
