"""FLOPs of an ONNX graph, counted from its nodes and inferred shapes.

Convention (fvcore's, and the papers'): FLOPs are multiply-accumulates of Conv, Gemm and MatMul
nodes (and of the convolution inside adaedge's ``CalibratedConv``), per clip. The graph is
shape-inferred with a batch of one clip, so a piece that folds frames into the batch inside (TAda2D)
counts every frame. Other nodes (pooling, element-wise arithmetic, concatenation) count as zero.
"""

from __future__ import annotations

from typing import Dict, List, Union

import onnx

from ..bundle.vocabulary import CUSTOM_DOMAIN
from ..bundle.folder import value_shape


def _prod(xs: List[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _one_clip(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose graph inputs have a batch of 1 (their first dimension, where symbolic)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for v in m.graph.input:
        dims = v.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    return m


def count_flops(model: onnx.ModelProto) -> int:
    """Multiply-accumulates per clip of ``model``; all shapes must be inferable for one clip."""
    g = onnx.shape_inference.infer_shapes(_one_clip(model)).graph
    shapes: Dict[str, List[Union[int, str]]] = {}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        shapes[v.name] = value_shape(v)
    weights = {init.name: [int(d) for d in init.dims] for init in g.initializer}

    def static(name: str) -> List[int]:
        if name in weights:
            return weights[name]
        shape = shapes.get(name)
        if shape is None or not all(isinstance(d, int) for d in shape):
            raise ValueError(f"count_flops: no static shape for {name!r} at batch 1: {shape}")
        return [int(d) for d in shape]

    total = 0
    for node in g.node:
        conv_like = node.op_type == "Conv" and node.domain in ("", "ai.onnx")
        calibrated = node.op_type == "CalibratedConv" and node.domain == CUSTOM_DOMAIN
        if conv_like or calibrated:
            w = static(node.input[2] if calibrated else node.input[1])
            # out: (N, C_out, *spatial); each output element reads C_in/group * kernel inputs.
            total += _prod(static(node.output[0])) * w[1] * _prod(w[2:])
        elif node.op_type == "Gemm":
            w = static(node.input[1])
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            k = w[1] if trans_b else w[0]
            total += _prod(static(node.output[0])) * k
        elif node.op_type == "MatMul":
            b = static(node.input[1])
            total += _prod(static(node.output[0])) * b[-2]
    return int(total)
