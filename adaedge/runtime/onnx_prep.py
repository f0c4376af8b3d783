"""What a piece's ONNX becomes before an engine builder parses it (TensorRT here).

* :func:`map_custom_ops`: adaedge's custom nodes (``CheapFill``, ``CalibratedConv``, domain
  ``adaedge``) stay as plugin nodes where a plugin library provides them, and are replaced by their
  standard-op bodies everywhere else, so a bundle never depends on a plugin being present;
* :func:`to_float16`: a float16 copy of a graph whose inputs and outputs stay float32, for
  builders that only take precision from the graph's types (strongly typed TensorRT networks);
* :func:`has_qdq`: whether a piece carries explicit quantisation (the only way to INT8 now that
  TensorRT 11 has dropped implicit calibration).

All three are pure functions of the ONNX, so an engine's cache key (the piece's hash, the
precision, the plugin library's hash) covers what they do.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Set

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..bundle import CUSTOM_DOMAIN, PLUGIN_OPS


def custom_ops(model: onnx.ModelProto) -> Set[str]:
    return {n.op_type for n in model.graph.node if n.domain == CUSTOM_DOMAIN}


def map_custom_ops(model: onnx.ModelProto, plugins: Iterable[str] = ()) -> onnx.ModelProto:
    """A copy of ``model`` whose custom nodes are plugin nodes for the ops in ``plugins`` (their
    function bodies dropped, so that a parser looks the op up in its plugin registry) and their
    standard-op bodies for all other ops."""
    keep = set(plugins)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [f for f in out.functions if f.domain == CUSTOM_DOMAIN and f.name in keep]
    inline = [f for f in out.functions if f not in kept]
    if inline:
        from onnx import inliner
        del out.functions[:]
        out.functions.extend(inline)
        out = inliner.inline_local_functions(out)
    del out.functions[:]
    for node in out.graph.node:
        if node.domain == CUSTOM_DOMAIN:
            node.ClearField("overload")    # a plugin has one name; cal_dim is an attribute
    if not any(n.domain == CUSTOM_DOMAIN for n in out.graph.node):
        keep_opsets = [o for o in out.opset_import if o.domain != CUSTOM_DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(keep_opsets)
    return out


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


_F16_MAX = float(np.finfo(np.float16).max)


def _half(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t)
    half = np.clip(arr, -_F16_MAX, _F16_MAX).astype(np.float16)
    return numpy_helper.from_array(half, t.name)


def to_float16(model: onnx.ModelProto, keep_float32: Iterable[str] = ()) -> onnx.ModelProto:
    """A float16 copy of ``model`` (custom ops already mapped or inlined): float32 weights,
    constants and casts become float16; float32 inputs are cast to float16 on entry and float32
    outputs back on exit, so the piece's interface does not change.

    Custom nodes (domain ``adaedge``) whose op is in ``keep_float32`` stay float32 (TensorRT
    plugins that take and return float32 only): their inputs are cast to float32, the weights
    only they read keep their float32 values, and their outputs are cast back to float16.
    """
    if model.functions:
        from onnx import inliner
        model = inliner.inline_local_functions(model)
    keep = set(keep_float32)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    plugin_nodes = [n for n in g.node if n.domain == CUSTOM_DOMAIN and n.op_type in keep]
    readers: Dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    plugin_reads = {name for n in plugin_nodes for name in n.input}
    float32_weights = {init.name for init in g.initializer
                       if init.name in plugin_reads and readers.get(init.name) ==
                       sum(list(n.input).count(init.name) for n in plugin_nodes)}
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT and init.name not in float32_weights:
            g.initializer[i].CopyFrom(_half(init))
    ins = {i.name for i in g.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    outs = {o.name for o in g.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    if ins & outs:
        raise ValueError(f"graph outputs {sorted(ins & outs)} are also inputs")
    half = {name: name + "__f16" for name in ins | outs}    # the float16 value inside the graph
    nodes: List[onnx.NodeProto] = [
        helper.make_node("Cast", [name], [half[name]], to=TensorProto.FLOAT16,
                         name=f"{name}__to_f16") for name in sorted(ins)]
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(_half(a.t))
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
        node.input[:] = [half.get(i, i) for i in node.input]
        node.output[:] = [half.get(o, o) for o in node.output]
        if node.domain == CUSTOM_DOMAIN and node.op_type in keep:
            nodes.extend(_float32_island(node, float32_weights))
        else:
            nodes.append(node)
    for name in sorted(outs):
        nodes.append(helper.make_node("Cast", [half[name]], [name], to=TensorProto.FLOAT,
                                      name=f"{name}__to_f32"))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return onnx.shape_inference.infer_shapes(out)


def _float32_island(node: onnx.NodeProto, float32_weights: Set[str]) -> List[onnx.NodeProto]:
    """``node`` with float32 I/O inside a float16 graph: Casts to float32 before (weights that
    stayed float32 are read as they are) and back to float16 after."""
    before, inputs = [], []
    for name in node.input:
        if not name or name in float32_weights:
            inputs.append(name)
            continue
        cast = f"{name}__f32_for_{node.name}"
        before.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT,
                                       name=f"{cast}__cast"))
        inputs.append(cast)
    node.input[:] = inputs
    after, outputs = [], []
    for name in node.output:
        wide = f"{name}__f32"
        after.append(helper.make_node("Cast", [wide], [name], to=TensorProto.FLOAT16,
                                      name=f"{wide}__cast"))
        outputs.append(wide)
    node.output[:] = outputs
    return before + [node] + after


__all__ = ["PLUGIN_OPS", "custom_ops", "map_custom_ops", "has_qdq", "to_float16"]
