"""Cut a VA-RED² network into static ONNX pieces: per dynamic unit one gate and one piece per branch.

Each branch piece is the whole unit for that branch, with the batch norm folded into the weights:

    Conv(x, W[:C] * s, b) [-> Relu]                the computed filters, temporal stride * R
    -> Conv_dw(., Phi^c) [-> Relu] ; Concat        channel fill, when r < 1
    -> Conv_dw(., Phi^t) [-> Relu] ; interleave    temporal fill, when R > 1 (and a frame needs it)
    -> Add(., identity) -> Relu                    for the unit that closes a residual block

Convolutions are written in the form ONNX Runtime runs fastest (:func:`conv_nd`).

``execution="masked"`` writes what the papers' code runs instead: the full convolution, then the
slice the branch keeps, then the fills. It exists to measure how much the static pieces win.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import onnx
import torch

from ..bundle import Branch as ProgramBranch
from ..bundle import Gate
from ..models.vared_r2plus1d import DynamicUnit, Head, VaRedR2Plus1D
from ..nn.vared import MOTION_FLOOR, MOTION_GRID, Branch, DynamicConv3d
from ..progress import Progress
from .graph import Graph, bn_affine
from .graph import to_numpy as _np
from .parts import Parts


@dataclass
class UnitPlan:
    """One unit in program order: its name (= its output value), input values and shapes."""

    name: str
    unit: DynamicUnit
    x: str
    identity: Optional[str]
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]


def plan_units(model: VaRedR2Plus1D, frames: int, size: int) -> Tuple[List[UnitPlan], Tuple[int, ...]]:
    """The units in program order with their per-clip shapes, found by one forward pass."""
    names = {id(m): n for n, m in model.named_modules()}
    order: List[Tuple[DynamicUnit, Tuple[int, ...], Tuple[int, ...]]] = []
    head_in: List[Tuple[int, ...]] = []

    def unit_hook(mod: torch.nn.Module, inp: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        assert isinstance(mod, DynamicUnit)
        order.append((mod, tuple(inp[0].shape[1:]), tuple(out.shape[1:])))

    hooks = [m.register_forward_hook(unit_hook) for m in model.modules()
             if isinstance(m, DynamicUnit)]
    hooks.append(model.head.register_forward_hook(
        lambda mod, inp, out: head_in.append(tuple(inp[0].shape[1:]))))
    was_training = model.training
    model.eval()
    try:
        model.set_policy(0)
        with torch.no_grad():
            model(torch.zeros(1, 3, frames, size, size))
    finally:
        model.set_policy(None)
        model.train(was_training)
        for h in hooks:
            h.remove()

    # Wire values: follow the model's forward (stem, then per block: shortcut, four units).
    plans: List[UnitPlan] = []
    shapes = {id(u): (i, o) for u, i, o in order}

    def add(unit: DynamicUnit, x: str, identity: Optional[str] = None) -> str:
        i, o = shapes[id(unit)]
        plans.append(UnitPlan(names[id(unit)], unit, x, identity, i, o))
        return names[id(unit)]

    x = add(model.stem_t, add(model.stem_s, "clip"))
    for block in model.blocks():
        identity = add(block.downsample, x) if block.downsample is not None else x
        y = add(block.conv1_t, add(block.conv1_s, x))
        x = add(block.conv2_t, add(block.conv2_s, y), identity)
    return plans, head_in[0]


def _bias(conv: torch.nn.Conv3d) -> torch.Tensor:
    assert conv.bias is not None
    return conv.bias


def conv_nd(g: Graph, x: str, shape: Tuple[int, ...], weight: np.ndarray, bias: np.ndarray,
            stride: Tuple[int, int, int], pads: Tuple[int, int, int],
            group: int = 1, role: Optional[str] = None) -> Tuple[str, Tuple[int, ...]]:
    """A 3D convolution over NCTHW, written in the form ONNX Runtime runs fastest; exact either way.

    * temporal-only kernels (kt x 1 x 1, no spatial stride) run as a 2D (kt, 1) convolution over
      the free reshape (N, C, T, H*W);
    * depthwise 1 x k x k kernels with channel multiplier 1 and no stride run as a 2D depthwise
      convolution over the free reshape (N, C*T, H, W), each channel's kernel repeated T times;
    * anything else stays a 3D convolution.

    ``shape`` is the per-clip input shape (C, T, H, W); returns the output value and its shape.
    """
    c, t, h, w = shape
    out_ch, _, kt, kh, kw = weight.shape
    pt, ph, pw = pads
    to = (t + 2 * pt - kt) // stride[0] + 1
    ho = (h + 2 * ph - kh) // stride[1] + 1
    wo = (w + 2 * pw - kw) // stride[2] + 1
    out_shape = (out_ch, to, ho, wo)
    if group == 1 and kh == kw == 1 and ph == pw == 0 and stride[1:] == (1, 1):
        x4 = g.op("Reshape", x, g.const([0, c, t, h * w], "shape", "int64"))
        y = g.op("Conv", x4, g.const(weight[:, :, :, :, 0], "w"), g.const(bias, "b"), role=role,
                 kernel_shape=[kt, 1], strides=[stride[0], 1], pads=[pt, 0, pt, 0])
        return g.op("Reshape", y, g.const([0, *out_shape], "shape", "int64")), out_shape
    if group == c == out_ch and kt == 1 and pt == 0 and stride == (1, 1, 1):
        x4 = g.op("Reshape", x, g.const([0, c * t, h, w], "shape", "int64"))
        y = g.op("Conv", x4, g.const(np.repeat(weight[:, :, 0], t, axis=0), "w"),
                 g.const(np.repeat(bias, t), "b"), role=role, kernel_shape=[kh, kw],
                 pads=[ph, pw, ph, pw], group=c * t)
        return g.op("Reshape", y, g.const([0, *out_shape], "shape", "int64")), out_shape
    y = g.op("Conv", x, g.const(weight, "w"), g.const(bias, "b"), role=role,
             kernel_shape=[kt, kh, kw], strides=list(stride), pads=[pt, ph, pw, pt, ph, pw],
             group=group)
    return y, out_shape


def is_copy(fill: torch.nn.Conv3d) -> bool:
    """Whether a depthwise cheap operation copies its input: centre tap 1, every other weight
    and the bias 0 (the initial value; see ``DynamicConv3d._init_cheap_ops``)."""
    w = _np(fill.weight)
    kt, kh, kw = w.shape[2:]
    copy = np.zeros_like(w)
    copy[:, :, kt // 2, kh // 2, kw // 2] = 1.0
    return bool(np.array_equal(w, copy) and not np.any(_np(_bias(fill))))


def pad_time(g: Graph, x: str, shape: Tuple[int, ...],
             conv: DynamicConv3d) -> Tuple[str, Tuple[int, ...]]:
    """x with its edge frames repeated ``padding[0]`` times at each end (a ``Pad`` of mode
    ``edge`` on the time axis) when the layer replicates edge frames; else x unchanged (the
    convolution pads with zeros). Returns the value and its per-clip shape (C, T, H, W)."""
    pt = conv.padding[0]
    if conv.temporal_padding != "replicate" or pt == 0:
        return x, shape
    c, t, h, w = shape
    pads = g.const([0, 0, pt, 0, 0, 0, 0, pt, 0, 0], "pads", "int64")
    return g.op("Pad", x, pads, mode="edge"), (c, t + 2 * pt, h, w)


def motion_graph(frames: int, size: int, grid: int = MOTION_GRID) -> onnx.ModelProto:
    """The clip's motion vector every gate reads (:func:`~adaedge.nn.vared.clip_motion`)."""
    g = Graph("motion")
    x = g.input("clip", ["N", 3, frames, size, size])
    k = max(1, size // grid)
    cells = min(grid, size)
    if frames < 2:     # one frame: no motion, zeros (GAP(x) (N, 3) times a zero matrix)
        pooled = g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)
        zeros = g.const(np.zeros((3, 3 * (cells * cells + 1)), np.float32), "zeros")
        g.output(g.op("MatMul", pooled, zeros), "motion")
        return g.model()
    p = g.op("AveragePool", x, kernel_shape=[1, k, k], strides=[1, k, k])
    if size // k != cells:
        p = g.op("Slice", p, g.const([0, 0], "s", "int64"), g.const([cells, cells], "e", "int64"),
                 g.const([3, 4], "a", "int64"))

    def frames_(start: int, stop: int) -> str:
        return g.op("Slice", p, g.const([start], "s", "int64"), g.const([stop], "e", "int64"),
                    g.const([2], "a", "int64"))
    d = g.op("Abs", g.op("Sub", frames_(1, frames), frames_(0, frames - 1)))
    floor = g.const(np.array(MOTION_FLOOR, np.float32), "floor")
    mean = g.op("Log", g.op("Add", g.op("ReduceMean", d, axes=[2], keepdims=0), floor))
    peak = g.op("Log", g.op("Add", g.op("ReduceMax", d, axes=[2, 3, 4], keepdims=0), floor))
    g.output(g.op("Concat", g.op("Flatten", mean, axis=1), peak, axis=1), "motion")
    return g.model()


def branch_graph(plan: UnitPlan, branch: Branch, execution: str = "dynamic") -> onnx.ModelProto:
    """The static graph of one branch of one unit (batch norm folded)."""
    unit, conv = plan.unit, plan.unit.conv
    g = Graph(f"{plan.name}.{branch.name}")
    x = g.input("x", ["N", *plan.in_shape])
    identity = g.input("identity", ["N", *plan.out_shape]) if unit.residual else None
    scale, shift = bn_affine(conv.bn)
    weight = _np(conv.conv.weight) * scale[:, None, None, None, None]
    out_ch, frames_out = conv.out_channels, plan.out_shape[1]
    computed = out_ch // 2 ** branch.c
    r = branch.temporal_factor
    st, sh, sw = conv.stride

    def act(v: str) -> str:
        return g.op("Relu", v) if conv.activation else v

    x, in_shape = pad_time(g, x, plan.in_shape, conv)
    if execution == "dynamic":
        y, shape = conv_nd(g, x, in_shape, weight[:computed], shift[:computed],
                           (st * r, sh, sw), conv.conv_padding)
    elif execution == "masked":  # the papers' execution: compute everything, keep the branch's part
        y, shape = conv_nd(g, x, in_shape, weight, shift, conv.stride, conv.conv_padding)
        if computed < out_ch or r > 1:
            y = g.op("Slice", y, g.const([0, 0], "starts", "int64"),
                     g.const([computed, frames_out], "ends", "int64"),
                     g.const([1, 2], "axes", "int64"), g.const([1, r], "steps", "int64"))
            shape = (computed, -(-frames_out // r), *shape[2:])
    else:
        raise ValueError(f"execution must be 'dynamic' or 'masked', not {execution!r}")
    y = act(y)
    if branch.c:
        fill = conv.channel_fill_conv(branch.c)
        f, _ = conv_nd(g, y, shape, _np(fill.weight), _np(_bias(fill)), (1, 1, 1), (0, 1, 1),
                       group=computed, role="fill")
        y = g.op("Concat", y, act(f), axis=1)
        shape = (out_ch, *shape[1:])
    computed_frames = shape[1]
    if branch.t and frames_out > computed_frames and is_copy(conv.temporal_fill_conv(branch.t)):
        # A fill that copies each computed frame (its initial value, exact on a still scene) is
        # written as a repeat: one Expand instead of a convolution, a Concat and a ReLU (the
        # copied frames are already activated).
        h, w = shape[2], shape[3]
        y6 = g.op("Reshape", y, g.const([0, out_ch, computed_frames, 1, h, w], "shape", "int64"))
        y6 = g.op("Expand", y6, g.const([1, 1, 1, r, 1, 1], "repeat", "int64"))
        y = g.op("Reshape", y6, g.const([0, out_ch, computed_frames * r, h, w], "shape", "int64"))
        if computed_frames * r != frames_out:
            y = g.op("Slice", y, g.const([0], "starts", "int64"),
                     g.const([frames_out], "ends", "int64"), g.const([2], "axes", "int64"))
    elif branch.t and frames_out > computed_frames:
        fill = conv.temporal_fill_conv(branch.t)
        h, w = shape[2], shape[3]
        f, _ = conv_nd(g, y, shape, _np(fill.weight), _np(_bias(fill)), (1, 1, 1), (0, 1, 1),
                       group=out_ch, role="fill")
        y6 = g.op("Reshape", y, g.const([0, out_ch, computed_frames, 1, h, w], "shape", "int64"))
        if r == 2:
            f6 = g.op("Reshape", f, g.const([0, out_ch, computed_frames, 1, h, w], "shape",
                                             "int64"))
        else:
            f6 = g.op("Reshape", f, g.const([0, out_ch, r - 1, computed_frames, h, w], "shape",
                                             "int64"))
            f6 = g.op("Transpose", f6, perm=[0, 1, 3, 2, 4, 5])
        y = g.op("Concat", y6, f6, axis=3)
        y = g.op("Reshape", y, g.const([0, out_ch, computed_frames * r, h, w], "shape", "int64"))
        if computed_frames * r != frames_out:
            y = g.op("Slice", y, g.const([0], "starts", "int64"),
                     g.const([frames_out], "ends", "int64"), g.const([2], "axes", "int64"))
        # The fill's ReLU comes after the interleave (ReLU leaves the computed, already activated
        # frames as they are), so that the piece ends in an op writing its output: a Reshape at
        # the end would be a full copy into the graph output.
        y = act(y)
    if identity is not None:
        y = g.op("Add", y, identity)
        if unit.relu:
            y = g.op("Relu", y)
    g.output(y, "y")
    return g.model()


def gate_graph(plan: UnitPlan) -> onnx.ModelProto:
    """The gate: scores = max(tanh(z), 0), z = FC2(ReLU(BN(FC1(GAP(x))))) + beta, and the branch
    index from the arg-max of z per policy."""
    gate = plan.unit.conv.gate
    g = Graph(f"{plan.name}.gate")
    x = g.input("x", ["N", *plan.in_shape])
    z = g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)
    if gate.context_features:
        z = g.op("Concat", z, g.input("motion", ["N", gate.context_features]), axis=1)
    scale, b1 = bn_affine(gate.bn)
    w1 = _np(gate.fc1.weight) * scale[:, None]
    z = g.op("Relu", g.op("Gemm", z, g.const(w1, "w1"), g.const(b1, "b1"), transB=1))
    z = g.op("Gemm", z, g.const(_np(gate.fc2.weight), "w2"), g.const(_np(gate.beta), "beta"),
             transB=1)
    scores = g.op("Max", g.op("Tanh", z), g.const(np.zeros((), np.float32), "zero"))
    st, sc = gate.temporal_choices, gate.channel_choices

    def argmax(start: int, stop: int) -> str:  # on the logits: see SoftModulationGate.decide
        part = g.op("Slice", z, g.const([start], "s", "int64"), g.const([stop], "e", "int64"),
                    g.const([1], "a", "int64"))
        return g.op("ArgMax", part, axis=1, keepdims=0)

    decision = g.op("Add", g.op("Mul", argmax(0, st), g.const(np.array(sc, np.int64), "sc")),
                    argmax(st, st + sc))
    g.output(scores, "scores")
    g.output(decision, "branch", dtype="int64")
    return g.model()


def head_graph(head: Head, in_shape: Tuple[int, ...]) -> onnx.ModelProto:
    g = Graph("head")
    x = g.input("x", ["N", *in_shape])
    z = g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)
    logits = g.op("Gemm", z, g.const(_np(head.fc.weight), "w"), g.const(_np(head.fc.bias), "b"),
                  transB=1)
    g.output(logits, "logits")
    return g.model()


def _tag(branch: Branch) -> str:
    return branch.name.replace("/", "_")


def export_vared(model: VaRedR2Plus1D, frames: int, size: int, execution: str = "dynamic",
                 progress: Progress = None) -> Parts:
    """The pieces, the program and the forced policies of a VA-RED² R(2+1)D network: per unit
    a switch whose gate piece picks one branch piece, then the head."""
    if execution not in ("dynamic", "masked"):
        raise ValueError(f"execution must be 'dynamic' or 'masked', not {execution!r}")
    model = model.eval()
    plans, head_in = plan_units(model, frames, size)
    parts = Parts(output="logits")
    total = len(plans) + 1
    if model.gate_motion:        # one motion vector per clip, computed first, read by every gate
        parts.program.run(parts.add("motion", motion_graph(frames, size)), {"clip": "clip"},
                          {"motion": "motion"})
    for i, plan in enumerate(plans):
        if progress:
            progress(i, total, plan.name)
        conv = plan.unit.conv
        gate = parts.add(f"{plan.name}.gate", gate_graph(plan))
        gate_inputs = {"x": plan.x}
        if conv.gate.context_features:
            gate_inputs["motion"] = "motion"
        inputs = {"x": plan.x}
        if plan.identity is not None:
            inputs["identity"] = plan.identity
        branches = [ProgramBranch(b.name, parts.add(f"{plan.name}.{_tag(b)}",
                                                    branch_graph(plan, b, execution)))
                    for b in conv.branches]
        parts.program.switch(plan.name, branches, inputs, {"y": plan.name},
                             gate=Gate(gate, gate_inputs, "branch", "scores"))
    if progress:
        progress(total - 1, total, "head")
    parts.program.run(parts.add("head", head_graph(model.head, head_in)),
                      {"x": plans[-1].name}, {"logits": "logits"})
    s = model.search_space
    named = {"static": (0, 0), "all-half": (0, min(1, s - 1)), "all-stride2": (min(1, s - 1), 0),
             "cheapest": (s - 1, s - 1)}
    parts.policies = {pol: {p.name: t * s + c for p in plans} for pol, (t, c) in named.items()}
    if progress:
        progress(total, total, "done")
    return parts
