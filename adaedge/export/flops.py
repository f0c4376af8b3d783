"""FLOPs of an ONNX graph, counted from its nodes and inferred shapes.

Convention (fvcore's, and the papers'): FLOPs are multiply-accumulates of Conv, Gemm and MatMul
nodes, per clip: the leading (batch) dimension of every tensor is left out. Other nodes (pooling,
element-wise arithmetic, concatenation) count as zero.
"""

from __future__ import annotations

from typing import Dict, List, Union

import onnx

from .graph import value_shape


def _prod(xs: List[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def count_flops(model: onnx.ModelProto) -> int:
    """Multiply-accumulates per clip of ``model``; its non-batch dimensions must be inferable."""
    g = onnx.shape_inference.infer_shapes(model).graph
    shapes: Dict[str, List[Union[int, str]]] = {}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        shapes[v.name] = value_shape(v)
    weights = {init.name: [int(d) for d in init.dims] for init in g.initializer}

    def per_clip(name: str) -> List[int]:
        shape = shapes.get(name)
        if shape is None or not all(isinstance(d, int) for d in shape[1:]):
            raise ValueError(f"count_flops: no static per-clip shape for {name!r}: {shape}")
        return [int(d) for d in shape[1:]]

    total = 0
    for node in g.node:
        if node.op_type == "Conv":
            w = weights[node.input[1]]
            # out: (C_out, *spatial); each output element reads C_in/group * kernel inputs.
            total += _prod(per_clip(node.output[0])) * w[1] * _prod(w[2:])
        elif node.op_type == "Gemm":
            w = weights[node.input[1]]
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            k, n = (w[1], w[0]) if trans_b else (w[0], w[1])
            total += k * n
        elif node.op_type == "MatMul":
            b = weights.get(node.input[1])
            k = b[-2] if b is not None else per_clip(node.input[0])[-1]
            total += _prod(per_clip(node.output[0])) * k
    return int(total)
