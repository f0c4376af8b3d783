"""What a piece's graph may hold: the operators adaedge's exporters write, with bounded shapes.

A bundle is untrusted, and an ONNX graph is a program: a ``Loop`` with a trip count of 2^62
hangs the process (SIGINT does not reach ONNX Runtime's kernels), a ``ConstantOfShape`` of
32 GiB exhausts memory, a graph whose real output differs from the one it declares fails deep
inside a backend. So before any backend session is created, every piece (float and int8 forms)
is checked here:

* **Operators**: only those of :data:`ALLOWED` for the bundle's format version, the ones the
  exporters write (``tests/test_operators.py`` exports every family's forms and checks that
  each operator they use is listed, and that nothing else is, but ``Identity``, which allocates
  nothing, for hand-written programs); no control flow (``Loop``, ``Scan``,
  ``If``), nothing that sizes a tensor from a value (``ConstantOfShape``, ``Range``, ``Tile``,
  ``Resize``, ``NonZero``), no subgraphs, no functions but adaedge's own custom ops.
* **Shapes**: with one clip per call (the batch dimension set to 1), ONNX's shape inference
  (strict, propagating constant shapes) must give every value a static shape of at most
  :data:`MAX_VALUES` values, and the graph's outputs the shapes it declares.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet

from ..errors import BundleError
from .vocabulary import CUSTOM_DOMAIN, PLUGIN_OPS, SCHEMA_VERSION

# the standard operators (domain "") adaedge's exporters write, per schema version
_STANDARD_V1 = frozenset("""
Abs Add ArgMax AveragePool Cast Ceil Clip Concat Constant Conv CumSum Div Equal Expand Flatten
Floor GRU Gather GatherElements Gemm GlobalAveragePool Greater GreaterOrEqual Identity Less Log MatMul
Max MaxPool Min Mul Pad ReduceMax ReduceMean ReduceSum Relu Reshape ScatterND Sigmoid Slice
Softmax Split Squeeze Sub Tanh TopK Transpose Unsqueeze Where
QuantizeLinear DequantizeLinear
""".split())

ALLOWED: Dict[int, Dict[str, FrozenSet[str]]] = {
    1: {"": _STANDARD_V1, "ai.onnx": _STANDARD_V1, CUSTOM_DOMAIN: frozenset(PLUGIN_OPS)},
}
MAX_VALUES = 1 << 28        # values in one tensor for one clip (the manifest's bound too)


ORT_DOMAINS = ("com.microsoft", "com.microsoft.nchwc")   # ONNX Runtime's fused kernels


def check_operators(model: Any, what: str, version: int = SCHEMA_VERSION,
                    optimized: bool = False) -> None:
    """Refuse a graph holding an operator adaedge's exporters never write (see the module).

    ``optimized``: a graph ONNX Runtime optimised from a piece (an engine of ``build``), which
    may also hold ONNX Runtime's own fused kernels (its ``com.microsoft`` domains)."""
    allowed = dict(ALLOWED[version])
    if optimized:
        allowed.update({d: _AnyOp() for d in ORT_DOMAINS})  # type: ignore[misc]
    own = {(fn.domain, fn.name) for fn in model.functions}
    for fn in model.functions:
        if fn.domain != CUSTOM_DOMAIN or fn.name not in allowed[CUSTOM_DOMAIN]:
            raise BundleError(f"{what} defines the function {fn.domain}:{fn.name}, which "
                              "adaedge's exporters never write")
        _check_nodes(fn.node, allowed, own, what, f" in the function {fn.name}")
    _check_nodes(model.graph.node, allowed, own, what, "")


class _AnyOp(frozenset):  # type: ignore[type-arg]
    def __contains__(self, item: object) -> bool:
        return True


def _check_nodes(nodes: Any, allowed: Dict[str, FrozenSet[str]], own: Any, what: str,
                 where: str) -> None:
    for node in nodes:
        domain = node.domain or ""
        if node.op_type not in allowed.get(domain, ()) or \
                (domain == CUSTOM_DOMAIN and (domain, node.op_type) not in own):
            name = f"{domain}:{node.op_type}" if domain else node.op_type
            raise BundleError(f"{what} holds the operator {name}{where}, which adaedge's "
                              "exporters never write (a bundle's pieces may hold only theirs: "
                              "no loops, no shapes computed from values)")
        for attr in node.attribute:
            if attr.HasField("g") or len(attr.graphs):
                raise BundleError(f"{what}: node {node.name or node.op_type}{where} holds a "
                                  "subgraph, which adaedge's pieces never do")


def check_shapes(model: Any, what: str) -> None:
    """Every value static and bounded for one clip, and the outputs as declared (see the module)."""
    import onnx
    from onnx import shape_inference
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]        # inferred afresh, not taken from the file
    # shapes come from the initializers' dims; only small integer tensors (shapes, axes, pads)
    # are read as values, so the weights' data is dropped from the copy (a full-size network's
    # hundreds of MB would be serialised for nothing)
    for t in probe.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                           onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
                           onnx.TensorProto.UINT8) and len(t.raw_data) > 4096:
            t.ClearField("raw_data")
    for v in probe.graph.input:
        for d in v.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = 1
    try:
        inferred = shape_inference.infer_shapes(probe, check_type=True, strict_mode=True,
                                                data_prop=True)
    except Exception as e:      # onnx's InferenceError, ValidationError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BundleError(f"{what}: its shapes do not check out ({first[:300]})") from None
    for v in [*inferred.graph.value_info, *inferred.graph.output]:
        t = v.type.tensor_type
        dims = t.shape.dim if t.HasField("shape") else None
        if dims is None or any(not d.HasField("dim_value") for d in dims):
            raise BundleError(f"{what}: the shape of {v.name!r} cannot be known before it runs "
                              "(adaedge's pieces have static shapes for one clip)")
        count = 1
        for d in dims:
            count *= max(int(d.dim_value), 0)
        if count > MAX_VALUES:
            raise BundleError(f"{what}: {v.name!r} would hold {count} values for one clip, more "
                              f"than {MAX_VALUES}")


def check_graph(model: Any, what: str, version: int = SCHEMA_VERSION) -> None:
    """:func:`check_operators` and :func:`check_shapes`."""
    check_operators(model, what, version)
    check_shapes(model, what)


__all__ = ["ALLOWED", "MAX_VALUES", "check_graph", "check_operators", "check_shapes"]
