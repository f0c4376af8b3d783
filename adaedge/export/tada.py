"""Cut TAda2D into static ONNX pieces: the stem, one piece per residual block, the head.

Inside every piece the frames are folded into the batch, ``(N*T, C, H, W)``, so each per-frame
convolution is one plain 2D convolution over all frames of all clips. Between pieces values are
``(N, T, C, H, W)`` (step ``layouts`` say so): a clip stays one row of the batch, and the reshapes
into and out of the folded form are free views.

A calibrated convolution (:mod:`adaedge.nn.tadaconv`) is written as a custom node ``CalibratedConv``
(domain ``adaedge``) whose function body holds standard ops, so ONNX Runtime runs it with no
library and a TensorRT plugin can take its place::

    CalibratedConv(x, alpha, W, B; strides, pads, dilations, group, cal_dim)
      overload "cin":   Conv(x * alpha, W, B)              alpha: (N*T, C_in, 1, 1)
      overload "cout":  Conv(x, W) * alpha + B             alpha: (N*T, C_out, 1, 1)

The routing function is fused into the block's piece (``routing="fused"``, the default) or cut
into a piece of its own between the block's front and back (``routing="separate"``); the benchmark
measures both. The temporal-aggregation branch ``b_bn(y) + b_avgpool_bn(avgpool_t(y))`` is one
average pool over the frames axis and per-channel affine maps.

``execution`` selects what the block computes:

* ``calibrated`` (default): the factorised calibration above, exact;
* ``official``: the official code's formulation, per-clip per-frame weights ``alpha * W_b`` built
  at run time and one grouped convolution with the batch folded into the groups (static batch 1);
  exact, kept to measure what the factorisation wins;
* ``uncalibrated``: alpha fixed at 1 and no routing function, the same network without its
  calibration: the lower bound of the benchmark (not the reference's function).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import onnx
from onnx import helper

from ..bundle.vocabulary import CUSTOM_DOMAIN, NTCHW, OPSET
from ..models.tada2d import ResBlock, Stem, TAda2D
from ..nn.tadaconv import TAdaConv2d
from ..progress import Progress
from .graph import Dim, Graph, bn_affine, conv2d_bn
from .graph import to_numpy as _np
from .parts import Parts

EXECUTIONS = ("calibrated", "official", "uncalibrated")
ROUTINGS = ("fused", "separate")


def calibrated_conv_function(cal_dim: str) -> onnx.FunctionProto:
    """The standard-op body of ``adaedge::CalibratedConv`` for one calibration dimension."""
    conv_attrs = [helper.make_attribute_ref(n, t) for n, t in (
        ("strides", onnx.AttributeProto.INTS), ("pads", onnx.AttributeProto.INTS),
        ("dilations", onnx.AttributeProto.INTS), ("group", onnx.AttributeProto.INT))]
    if cal_dim == "cin":
        nodes = [helper.make_node("Mul", ["x", "alpha"], ["x_cal"]),
                 helper.make_node("Conv", ["x_cal", "W", "B"], ["y"])]
        conv = nodes[1]
    elif cal_dim == "cout":
        nodes = [helper.make_node("Conv", ["x", "W"], ["conv"]),
                 helper.make_node("Mul", ["conv", "alpha"], ["conv_cal"]),
                 helper.make_node("Constant", [], ["axes"], value_ints=[1, 2]),
                 helper.make_node("Unsqueeze", ["B", "axes"], ["B3"]),
                 helper.make_node("Add", ["conv_cal", "B3"], ["y"])]
        conv = nodes[0]
    else:
        raise ValueError(f"cal_dim must be 'cin' or 'cout', not {cal_dim!r}")
    conv.attribute.extend(conv_attrs)
    fn = helper.make_function(CUSTOM_DOMAIN, "CalibratedConv", ["x", "alpha", "W", "B"], ["y"],
                              nodes, [helper.make_opsetid("", OPSET)],
                              attributes=["strides", "pads", "dilations", "group", "cal_dim"])
    fn.overload = cal_dim
    fn.doc_string = ("Per-frame calibrated 2D convolution (TAdaConv) over frames folded into the "
                     f"batch, calibration over {'input' if cal_dim == 'cin' else 'output'} channels")
    return fn


def conv_out_size(conv: TAdaConv2d, h: int, w: int) -> Tuple[int, int]:
    (kh, kw), (ph, pw) = conv.kernel_size[1:], conv.padding[1:]
    (dh, dw), (sh, sw) = conv.dilation[1:], conv.stride[1:]
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def write_calibrated_conv(g: Graph, conv: TAdaConv2d, x: str, alpha: Optional[str], frames: int,
                          h: int, w: int, execution: str = "calibrated") -> str:
    """``conv`` applied to ``x`` (N*T, C_in, H, W) with calibration ``alpha`` (N*T, C_a, 1, 1);
    ``alpha=None`` writes the plain convolution (the uncalibrated lower bound)."""
    weight = _np(conv.base_weight)
    bias = np.zeros(conv.out_channels) if conv.bias is None else _np(conv.base_bias)
    attrs: Dict[str, Any] = dict(strides=list(conv.stride[1:]), pads=[conv.padding[1], conv.padding[2]] * 2,
                 dilations=list(conv.dilation[1:]), group=conv.groups)
    if alpha is None:
        return g.op("Conv", x, g.const(weight, "w"), g.const(bias, "b"),
                    kernel_shape=list(weight.shape[2:]), **attrs)
    if conv.cal_dim == "cin" and conv.groups > 1:
        # alpha holds C_in/groups weights shared by every group (as the official code broadcasts
        # them): tile them over the groups.
        alpha = g.op("Tile", alpha, g.const([1, conv.groups, 1, 1], "reps", "int64"))
    if execution != "official":
        return g.custom(calibrated_conv_function(conv.cal_dim), x, alpha, g.const(weight, "w"),
                        g.const(bias, "b"), cal_dim=conv.cal_dim, **attrs)
    # The official formulation: W_t = alpha_t * W_b per clip and frame, one grouped convolution
    # with the batch folded into the groups (static batch 1: T rows).
    rows = frames
    c_out, c_in_g, kh, kw = weight.shape
    groups = conv.groups
    if conv.cal_dim == "cin":
        # Output o of group k reads input channel k*C_in/g + j through column j.
        a6 = g.op("Reshape", alpha, g.const([rows, groups, 1, c_in_g, 1, 1], "shape", "int64"))
        w6 = g.const(weight.reshape(1, groups, c_out // groups, c_in_g, kh, kw), "w")
        per_frame = g.op("Mul", a6, w6)
    else:
        a5 = g.op("Reshape", alpha, g.const([rows, c_out, 1, 1, 1], "shape", "int64"))
        per_frame = g.op("Mul", a5, g.const(weight[None], "w"))
    per_frame = g.op("Reshape", per_frame, g.const([rows * c_out, c_in_g, kh, kw], "shape",
                                                   "int64"))
    x1 = g.op("Reshape", x, g.const([1, rows * conv.in_channels, h, w], "shape", "int64"))
    y = g.op("Conv", x1, per_frame, g.const(np.tile(bias, rows), "b"), group=groups * rows,
             **{k: v for k, v in attrs.items() if k != "group"})
    ho, wo = conv_out_size(conv, h, w)
    return g.op("Reshape", y, g.const([rows, c_out, ho, wo], "shape", "int64"))


class BlockWriter:
    """Writes one TAda2D residual block into graphs, in the order the sentence says it."""

    def __init__(self, block: ResBlock, in_shape: Tuple[int, ...], frames: int, execution: str):
        self.block = block
        self.branch = block.conv_branch
        self.frames = frames
        self.execution = execution
        self.c_in, self.h, self.w = in_shape[1], in_shape[2], in_shape[3]
        conv: TAdaConv2d = self.branch.b
        self.mid = conv.in_channels
        self.stride = conv.stride[1]
        self.c_out = self.branch.c.out_channels
        self.ho, self.wo = conv_out_size(conv, self.h, self.w)
        pool = self.branch.b_avgpool
        self.pool_k = [int(v) for v in np.broadcast_to(np.asarray(pool.kernel_size), 3)]
        if self.pool_k[1:] != [1, 1]:
            raise ValueError(f"the aggregation pool {self.pool_k} pools over space; only temporal "
                             "pools (kt x 1 x 1) are exported")
        if not pool.count_include_pad or pool.ceil_mode:
            raise ValueError("the aggregation pool must count padding and not use ceil mode")

    @property
    def out_shape(self) -> Tuple[int, ...]:
        return (self.frames, self.c_out, self.ho, self.wo)

    def fold(self, g: Graph, x: str, c: int, h: int, w: int) -> str:
        return g.op("Reshape", x, g.const([-1, c, h, w], "shape", "int64"))

    def unfold(self, g: Graph, x: str, c: int, h: int, w: int) -> str:
        return g.op("Reshape", x, g.const([-1, self.frames, c, h, w], "shape", "int64"))

    def front(self, g: Graph, x5: str) -> Tuple[str, Optional[str]]:
        """Block input (N, T, C, H, W) -> the reduced map ``a`` (folded) and the projected shortcut."""
        x = self.fold(g, x5, self.c_in, self.h, self.w)
        shortcut = None
        if hasattr(self.block, "short_cut"):
            shortcut = conv2d_bn(g, x, self.block.short_cut, self.block.short_cut_bn)
        a = g.op("Relu", conv2d_bn(g, x, self.branch.a, self.branch.a_bn))
        return a, shortcut

    def routing(self, g: Graph, a: str) -> str:
        """alpha = 1 + b(ReLU(BN(a(pool_hw(x) + g(pool_thw(x)))))), as (N*T, C, 1, 1)."""
        rf = self.branch.b_rf
        c = self.mid
        d = g.op("GlobalAveragePool", a)                                           # (NT, C, 1, 1)
        d = g.op("Transpose", g.op("Reshape", d, g.const([-1, self.frames, c], "shape", "int64")),
                 perm=[0, 2, 1])                                                   # (N, C, T)
        glob = g.op("ReduceMean", d, axes=[2], keepdims=1)                        # (N, C, 1)
        glob = g.op("Conv", glob, g.const(_np(rf.g.weight)[:, :, :, 0, 0], "wg"),
                    g.const(_np(rf.g.bias), "bg"), kernel_shape=[1])
        scale, shift = bn_affine(rf.bn)
        wa = _np(rf.a.weight)[:, :, :, 0, 0] * scale[:, None, None]
        ba = _np(rf.a.bias) * scale + shift
        ka, kb = rf.a.kernel_size[0], rf.b.kernel_size[0]
        z = g.op("Conv", g.op("Add", d, glob), g.const(wa, "wa"), g.const(ba, "ba"),
                 kernel_shape=[ka], pads=[ka // 2, ka // 2])
        z = g.op("Conv", g.op("Relu", z), g.const(_np(rf.b.weight)[:, :, :, 0, 0], "wb"),
                 kernel_shape=[kb], pads=[kb // 2, kb // 2])
        alpha = g.op("Add", z, g.const(np.ones((), np.float32), "one"))            # (N, C, T)
        alpha = g.op("Transpose", alpha, perm=[0, 2, 1])
        return g.op("Reshape", alpha, g.const([-1, c, 1, 1], "shape", "int64"))

    def back(self, g: Graph, a: str, alpha: Optional[str], shortcut: Optional[str],
             x5: str) -> str:
        """Calibrated conv, aggregation, ReLU, expansion, residual add and ReLU -> (N, T, C, H, W)."""
        br = self.branch
        y = write_calibrated_conv(g, br.b, a, alpha, self.frames, self.h, self.w,
                                  self.execution)                                 # (NT, C, Ho, Wo)
        kt = self.pool_k[0]
        flat = g.op("Reshape", y, g.const([-1, 1, self.frames, self.mid * self.ho * self.wo],
                                          "shape", "int64"))
        pooled = g.op("AveragePool", flat, kernel_shape=[kt, 1], pads=[kt // 2, 0, kt // 2, 0],
                      count_include_pad=1)
        pooled = g.op("Reshape", pooled, g.const([-1, self.mid, self.ho, self.wo], "shape",
                                                 "int64"))
        s1, t1 = bn_affine(br.b_bn)
        s2, t2 = bn_affine(br.b_avgpool_bn)
        z = g.op("Add", g.op("Mul", y, g.const(s1[:, None, None], "s1")),
                 g.op("Mul", pooled, g.const(s2[:, None, None], "s2")))
        z = g.op("Relu", g.op("Add", z, g.const((t1 + t2)[:, None, None], "t")))
        z = conv2d_bn(g, z, br.c, br.c_bn)                                     # (NT, C', Ho, Wo)
        z5 = self.unfold(g, z, self.c_out, self.ho, self.wo)
        if shortcut is None:
            res = x5
        else:
            res = self.unfold(g, shortcut, self.c_out, self.ho, self.wo)
        return g.op("Relu", g.op("Add", z5, res))


def stem_graph(stem: Stem, frames: int, size: int, batch: Dim) -> Tuple[onnx.ModelProto, Tuple]:
    g = Graph("backbone.conv1")
    x = g.input("x", [batch, 3, frames, size, size])
    x4 = g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3, 4]),
              g.const([-1, 3, size, size], "shape", "int64"))
    y = g.op("Relu", conv2d_bn(g, x4, stem.a, stem.a_bn))
    k, s, p = stem.a.kernel_size[1], stem.a.stride[1], int(stem.a.padding[1])  # type: ignore[arg-type]
    ho = (size + 2 * p - k) // s + 1
    c = stem.a.out_channels
    g.output(g.op("Reshape", y, g.const([-1, frames, c, ho, ho], "shape", "int64")), "y")
    return g.model(), (frames, c, ho, ho)


def head_graph(model: TAda2D, in_shape: Tuple[int, ...], batch: Dim) -> onnx.ModelProto:
    g = Graph("head")
    x = g.input("x", [batch, *in_shape])
    z = g.op("ReduceMean", x, axes=[1, 3, 4], keepdims=0)                      # (N, C)
    logits = g.op("Gemm", z, g.const(_np(model.head.out.weight), "w"),
                  g.const(_np(model.head.out.bias), "b"), transB=1)
    g.output(logits, "logits")
    return g.model()


def export_tada(model: TAda2D, frames: int, size: int, execution: Optional[str] = None,
                progress: Progress = None, routing: str = "fused") -> Parts:
    """The pieces and program of a TAda2D network (no switches: one static path)."""
    execution = execution or "calibrated"
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, not {execution!r}")
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {routing!r}")
    if execution != "calibrated" and routing != "fused":
        raise ValueError("routing='separate' is only for execution='calibrated'")
    model = model.eval()
    batch: Dim = 1 if execution == "official" else "N"
    blocks = model.blocks()
    total = len(blocks) + 2
    parts = Parts(output="logits")
    pieces = parts.pieces

    def step(piece: str, inputs: Dict[str, str], outputs: Dict[str, str]) -> None:
        parts.program.run(piece, inputs, outputs,
                          layouts={v: NTCHW for v in outputs.values() if v != "logits"})

    if progress:
        progress(0, total, "backbone.conv1")
    pieces["backbone.conv1"], shape = stem_graph(model.backbone.conv1, frames, size, batch)
    step("backbone.conv1", {"x": "clip"}, {"y": "backbone.conv1"})
    value = "backbone.conv1"
    for i, (name, block) in enumerate(blocks):
        if progress:
            progress(i + 1, total, name)
        writer = BlockWriter(block, shape, frames, execution)
        if routing == "fused":
            g = Graph(name)
            x5 = g.input("x", [batch, *shape])
            a, shortcut = writer.front(g, x5)
            alpha = writer.routing(g, a) if execution != "uncalibrated" else None
            g.output(writer.back(g, a, alpha, shortcut, x5), "y")
            pieces[name] = g.model()
            step(name, {"x": value}, {"y": name})
        else:
            mid_shape = [batch, frames, writer.mid, writer.h, writer.w]
            g = Graph(f"{name}.front")
            x5 = g.input("x", [batch, *shape])
            a, shortcut = writer.front(g, x5)
            g.output(writer.unfold(g, a, writer.mid, writer.h, writer.w), "a")
            front_outputs = {"a": f"{name}.a"}
            if shortcut is not None:
                g.output(writer.unfold(g, shortcut, writer.c_out, writer.ho, writer.wo), "shortcut")
                front_outputs["shortcut"] = f"{name}.shortcut"
            pieces[f"{name}.front"] = g.model()
            step(f"{name}.front", {"x": value}, front_outputs)

            g = Graph(f"{name}.route")
            a5 = g.input("a", mid_shape)
            alpha = writer.routing(g, writer.fold(g, a5, writer.mid, writer.h, writer.w))
            g.output(g.op("Reshape", alpha, g.const([-1, frames, writer.mid, 1, 1], "shape",
                                                    "int64")), "alpha")
            pieces[f"{name}.route"] = g.model()
            step(f"{name}.route", {"a": f"{name}.a"}, {"alpha": f"{name}.alpha"})

            g = Graph(f"{name}.back")
            a5 = g.input("a", mid_shape)
            al5 = g.input("alpha", [batch, frames, writer.mid, 1, 1])
            inputs = {"a": f"{name}.a", "alpha": f"{name}.alpha"}
            if shortcut is not None:
                sc5 = g.input("shortcut", [batch, frames, writer.c_out, writer.ho, writer.wo])
                sc = writer.fold(g, sc5, writer.c_out, writer.ho, writer.wo)
                inputs["shortcut"] = f"{name}.shortcut"
                x5 = ""
            else:
                sc = None
                x5 = g.input("x", [batch, *shape])
                inputs["x"] = value
            y = writer.back(g, writer.fold(g, a5, writer.mid, writer.h, writer.w),
                            writer.fold(g, al5, writer.mid, 1, 1), sc, x5)
            g.output(y, "y")
            pieces[f"{name}.back"] = g.model()
            step(f"{name}.back", inputs, {"y": name})
        shape = writer.out_shape
        value = name
    if progress:
        progress(total - 1, total, "head")
    pieces["head"] = head_graph(model, shape, batch)
    step("head", {"x": value}, {"logits": "logits"})
    if progress:
        progress(total, total, "done")
    return parts


def calibrated_conv_graph(conv: TAdaConv2d, frames: int, height: int, width: int,
                          execution: str = "calibrated") -> onnx.ModelProto:
    """One calibrated convolution as a graph over frames folded into the batch:
    ``x (N*T, C_in, H, W), alpha (N*T, C_a, 1, 1) -> y (N*T, C_out, H', W')``, ``C_a`` as
    :class:`TAdaConv2d` takes it (``official``: N = 1). To test the node, its body and the TensorRT
    plugin that replaces it, layer by layer.
    """
    c_a = conv.in_channels // conv.groups if conv.cal_dim == "cin" else conv.out_channels
    g = Graph("calibrated_conv")
    batch: Dim = frames if execution == "official" else "NT"
    x = g.input("x", [batch, conv.in_channels, height, width])
    alpha = g.input("alpha", [batch, c_a, 1, 1])
    g.output(write_calibrated_conv(g, conv, x, alpha, frames, height, width, execution), "y")
    return g.model()
