"""Cut AdaFuse into static ONNX pieces, in three executions and two input modes.

``execution``:

* ``dense``: every block computes all channels of its first convolution, then combines them by the
  policy's decisions (Eq. 3) and runs its second convolution on all of them: the reference itself,
  one piece per block.
* ``gathered``: every block computes only the channels it needs and its second convolution reads
  only the channels not skipped. Channel counts are rounded up to ``buckets`` sizes so that every
  piece is static; per block::

      gate   (run)     x, state -> shifted x, decisions, channel lists, bucket choices
      late   (switch)  first-convolution channels reused now that the previous frame did not
                       compute, computed from its carried input (bucket 0: none)
      conv1  (switch)  the kept channels, gathered rows of conv1, scattered into the channel buffer
      conv2  (switch)  the kept and reused channels, gathered columns of conv2
      tail   (run)     conv3, shortcut, ReLU

  The weights of conv1 and conv2 are stored once, as bundle constants, and every bucket piece reads
  them; a padded slot reads an all-zero row, so padding costs time but never changes the result.
  Gathered pieces take one stream per call (static batch 1); the runtime runs a batch row by row.
* ``plain``: the same network with no policy (every channel kept): the lower bound of the
  benchmark, not the reference's function.

``stream=True`` (the default where the network allows it) makes a per-frame program: the input is
one frame, each block carries what the next frame needs (the pooled input, the first convolution's
output and which of its channels are current, the shifted input, the temporal-shift channels), and
the scores are the mean of the last T frames' scores. ``stream=False`` takes whole clips with the
frames folded into the batch (``dense`` and ``plain`` only); a bidirectional temporal shift reads
the next frame, so such a network exports as clips only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx

from ..bundle import NTCHW, Branch, TensorSpec
from ..models.adafuse import KEEP, REUSE, SKIP, AdaBlock, AdaFuse
from ..progress import Progress
from .graph import Graph, bn_affine, conv2d_bn, folded_conv
from .graph import to_numpy as _np
from .parts import Parts

EXECUTIONS = ("dense", "gathered", "plain")


# ---------------------------------------------------------------------------------------------
# shapes

@dataclass
class BlockShape:
    cin: int
    h: int
    w: int
    c1: int          # channels of the first convolution (the gated ones)
    h1: int
    w1: int
    c2: int          # output channels of the second convolution
    h2: int
    w2: int
    cout: int
    fold: int        # channels the temporal shift moves (0: no shift)


def _out(n: int, conv: Any) -> int:
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return (n + 2 * p - k) // s + 1


def block_shapes(model: AdaFuse, size: int) -> List[BlockShape]:
    h = model.stem_size(size)[1]
    out = []
    for b in model.base_model.blocks:
        h1 = _out(h, b.conv1)
        h2 = _out(h1, b.conv2)
        fold = b.conv1.in_channels // b.shift_div if b.shift != "none" else 0
        out.append(BlockShape(b.conv1.in_channels, h, h, b.conv1.out_channels, h1, h1,
                              b.conv2.out_channels, h2, h2, b.out_planes, fold))
        h = h2
    return out


def bucket_sizes(channels: int, buckets: int) -> List[int]:
    """Channel counts a gathered piece is exported for: multiples of ceil(C / buckets), up to C."""
    step = math.ceil(channels / max(1, min(buckets, channels)))
    return [min(channels, step * i) for i in range(1, math.ceil(channels / step) + 1)]


# ---------------------------------------------------------------------------------------------
# graph fragments

def policy_decisions(g: Graph, block: AdaBlock, v: str, v_prev: str) -> str:
    """Arg-max actions (N, C) int64 of the policy on pooled inputs (N, C_in): its batch norm is
    folded into the first linear layer."""
    pol = block.policy_net
    assert pol is not None
    scale, shift = bn_affine(pol.gate_bn)
    w0 = _np(pol.gate_fc0.weight) * scale[:, None]
    b0 = _np(pol.gate_fc0.bias) * scale + shift
    h = g.op("Gemm", g.op("Concat", v_prev, v, axis=1), g.const(w0, "w"), g.const(b0, "b"),
             transB=1)
    logits = g.op("Gemm", g.op("Relu", h), g.const(_np(pol.gate_fc1.weight), "w"),
                  g.const(_np(pol.gate_fc1.bias), "b"), transB=1)
    logits = g.op("Reshape", logits, g.const(np.array([-1, pol.channels, 3], np.int64), "shape"))
    return g.op("ArgMax", logits, axis=2, keepdims=0)


def action_mask(g: Graph, decisions: str, action: int) -> str:
    """1.0 where a channel takes ``action`` (N, C, 1, 1), else 0.0."""
    m = g.op("Cast", g.op("Equal", decisions, g.const(np.array(action, np.int64), "act")), to=1)
    return g.op("Unsqueeze", m, g.const(np.array([2, 3], np.int64), "axes"))


def pooled(g: Graph, x: str) -> str:
    """The spatial mean (N, C) (a ReduceMean: ONNX Runtime reorders the input of a
    GlobalAveragePool into its blocked layout first, which costs more than the mean)."""
    return g.op("ReduceMean", x, axes=[2, 3], keepdims=0)


def block_tail(g: Graph, block: AdaBlock, z: str, x: str, xs: str) -> str:
    """After the second convolution (``z``: its output, batch norm folded, ReLU'd for a
    bottleneck): conv3 for a bottleneck, the shortcut (of the shifted input where it is a
    convolution, as the official code), the residual sum and the ReLU."""
    if block.kind == "bottleneck":
        z = conv2d_bn(g, z, block.conv3, block.bn3)
    shortcut = x
    if block.downsample0 is not None:
        shortcut = conv2d_bn(g, xs, block.downsample0, block.downsample1)
    return g.op("Relu", g.op("Add", z, shortcut))


def after_fusion(g: Graph, block: AdaBlock, fused: str, x: str, xs: str) -> str:
    z = conv2d_bn(g, fused, block.conv2, block.bn2)
    if block.kind == "bottleneck":
        z = g.op("Relu", z)
    return block_tail(g, block, z, x, xs)


class Frames:
    """How a block's piece sees time: ``previous`` gives a value's previous frame, ``shift`` the
    temporal shift. Clip mode: (N*T, ...) with the frames of a clip in consecutive rows. Stream
    mode: one frame (N, ...), the previous frame read from carried state."""

    def previous(self, g: Graph, value: str, name: str, shape: List[int]) -> str:
        raise NotImplementedError

    def shift(self, g: Graph, x: str, s: BlockShape, mode: str) -> str:
        raise NotImplementedError


class ClipFrames(Frames):
    def __init__(self, frames: int) -> None:
        self.frames = frames

    def _split(self, g: Graph, v: str, shape: List[int]) -> str:
        return g.op("Reshape", v, g.const(np.array([-1, self.frames] + shape, np.int64), "shape"))

    def _join(self, g: Graph, v: str, shape: List[int]) -> str:
        return g.op("Reshape", v, g.const(np.array([-1] + shape, np.int64), "shape"))

    def _later(self, g: Graph, v5: str, rank: int) -> str:
        """(N, T, ...) moved one frame later, zeros first."""
        head = g.op("Slice", v5, g.const(np.array([0], np.int64), "s"),
                    g.const(np.array([self.frames - 1], np.int64), "e"),
                    g.const(np.array([1], np.int64), "ax"))
        pads = [0] * (2 * rank)
        pads[1] = 1
        return g.op("Pad", head, g.const(np.array(pads, np.int64), "pads"))

    def previous(self, g: Graph, value: str, name: str, shape: List[int]) -> str:
        return self._join(g, self._later(g, self._split(g, value, shape), len(shape) + 2), shape)

    def shift(self, g: Graph, x: str, s: BlockShape, mode: str) -> str:
        if mode == "none":
            return x
        shape = [s.cin, s.h, s.w]
        v = self._split(g, x, shape)
        parts = g.op("Split", v, g.const(np.array([s.fold, s.fold, s.cin - 2 * s.fold], np.int64),
                                         "split"), axis=2, outputs=3)
        if mode == "online":
            first = self._later(g, parts[0], 5)
            return self._join(g, g.op("Concat", first, parts[1], parts[2], axis=2), shape)
        tail = g.op("Slice", parts[0], g.const(np.array([1], np.int64), "s"),
                    g.const(np.array([self.frames], np.int64), "e"),
                    g.const(np.array([1], np.int64), "ax"))
        pads = [0] * 10
        pads[6] = 1                          # one zero frame after the last
        earlier = g.op("Pad", tail, g.const(np.array(pads, np.int64), "pads"))
        later = self._later(g, parts[1], 5)
        return self._join(g, g.op("Concat", earlier, later, parts[2], axis=2), shape)


@dataclass
class StreamFrames(Frames):
    """Per-frame pieces: each ``previous`` is a state input, and its current value an output the
    program carries to the next frame (``carried``: output name -> state input name)."""

    carried: Dict[str, str] = field(default_factory=dict)
    specs: Dict[str, List[int]] = field(default_factory=dict)

    def previous(self, g: Graph, value: str, name: str, shape: List[int]) -> str:
        prev = g.input(f"{name}_prev", ["N", *shape])
        g.output(value, f"{name}_next")
        self.carried[f"{name}_next"] = f"{name}_prev"
        self.specs[f"{name}_prev"] = shape
        return prev

    def shift(self, g: Graph, x: str, s: BlockShape, mode: str) -> str:
        if mode == "none":
            return x
        if mode != "online":
            raise ValueError("a bidirectional temporal shift reads the next frame: export "
                             "it with stream=False, or build the model with shift='online'")
        parts = g.op("Split", x, g.const(np.array([s.fold, s.cin - s.fold], np.int64), "split"),
                     axis=1, outputs=2)
        earlier = self.previous(g, parts[0], "shift", [s.fold, s.h, s.w])
        return g.op("Concat", earlier, parts[1], axis=1)


def dense_block(g: Graph, block: AdaBlock, x: str, s: BlockShape, frames: Frames,
                plain: bool) -> Tuple[str, Optional[str]]:
    """A whole block computing every channel; returns its output and the decisions (or None)."""
    xs = frames.shift(g, x, s, block.shift)
    y = conv2d_bn(g, xs, block.conv1, block.bn1)
    y = g.op("Relu", y)
    decisions = None
    if block.policy_net is not None and not plain:
        v = pooled(g, xs)
        decisions = policy_decisions(g, block, v, frames.previous(g, v, "pooled", [s.cin]))
        y_prev = frames.previous(g, y, "y", [s.c1, s.h1, s.w1])
        y = g.op("Add", g.op("Mul", y, action_mask(g, decisions, KEEP)),
                 g.op("Mul", y_prev, action_mask(g, decisions, REUSE)))
    return after_fusion(g, block, y, x, xs), decisions


# ---------------------------------------------------------------------------------------------
# gathered pieces

LISTS = ("keep", "late", "used")   # the three channel lists a gathered block needs


def gate_graph(block: AdaBlock, s: BlockShape, buckets: int) -> Tuple[onnx.ModelProto,
                                                                       StreamFrames]:
    """The gathered block's front: temporal shift, policy, and three channel lists with their
    bucket choices, computed together (few nodes: each costs a fixed time on the CPU).

    Lists (N, 1, C) int64, in increasing channel order, padded with ``C`` (the all-zero slot):
    ``keep`` the channels computed now, ``late`` those reused now that the previous frame did not
    compute (their ``stale`` state is 1), ``used`` the channels not skipped. Buckets (N, 1, 1)
    int64: ``keep`` and ``used`` index the bucket sizes, ``late`` the sizes after a 0 (none).
    """
    g = Graph("gate")
    frames = StreamFrames()
    x = g.input("x", ["N", s.cin, s.h, s.w])
    xs = frames.shift(g, x, s, block.shift)
    v = pooled(g, xs)
    d = policy_decisions(g, block, v, frames.previous(g, v, "pooled", [s.cin]))
    stale = g.input("stale_prev", ["N", 1, s.c1])
    frames.specs["stale_prev"] = [1, s.c1]
    frames.carried["stale_next"] = "stale_prev"
    # rows keep, reuse, skip (N, 3, C) -> lists keep, reuse * stale, 1 - skip
    onehot = g.op("Cast", g.op("Equal", g.op("Unsqueeze", d, g.const(np.array([1], np.int64),
                                                                    "ax")),
                               g.const(np.array([KEEP, REUSE, SKIP], np.int64)[None, :, None],
                                       "actions")), to=1)
    scale = g.op("Add", g.const(np.array([1, 0, -1], np.float32)[None, :, None], "a"),
                 g.op("Mul", g.const(np.array([0, 1, 0], np.float32)[None, :, None], "b"),
                      stale))
    lists = g.op("Add", g.op("Mul", onehot, scale),
                 g.const(np.array([0, 0, 1], np.float32)[None, :, None], "c"))
    rank = g.const(np.arange(s.c1, 0, -1, dtype=np.float32)[None, None], "rank")
    _, order = g.op("TopK", g.op("Mul", lists, rank), g.const(np.array([s.c1], np.int64), "k"),
                    axis=2, largest=1, sorted=1, outputs=2)
    count = g.op("ReduceSum", lists, g.const(np.array([2], np.int64), "ax"), keepdims=1)
    slot = g.const(np.arange(s.c1, dtype=np.float32)[None, None], "slot")
    idx = g.op("Where", g.op("Less", slot, count), order, g.const(np.array(s.c1, np.int64), "pad"))
    sizes = bucket_sizes(s.c1, buckets)
    n, step = len(sizes), sizes[0]
    ceil = g.op("Ceil", g.op("Div", count, g.const(np.array(float(step), np.float32), "step")))
    shift = g.const(np.array([1, 0, 1], np.float32)[None, :, None], "minus")
    top = g.const(np.array([n - 1, n, n - 1], np.float32)[None, :, None], "top")
    choice = g.op("Max", g.op("Min", g.op("Sub", ceil, shift), top),
                  g.const(np.array(0.0, np.float32), "zero"))
    choice = g.op("Cast", choice, to=7)
    idx_parts = g.op("Split", idx, axis=1, outputs=3)
    choice_parts = g.op("Split", choice, axis=1, outputs=3)
    for name, i_part, c_part in zip(LISTS, idx_parts, choice_parts):
        g.output(i_part, f"{name}_idx", "int64")
        g.output(c_part, f"{name}_bucket", "int64")
    keep = g.op("Slice", onehot, g.const(np.array([0], np.int64), "s"),
                g.const(np.array([1], np.int64), "e"), g.const(np.array([1], np.int64), "ax"))
    g.output(g.op("Sub", g.const(np.array(1.0, np.float32), "one"), keep), "stale_next")
    if xs != x:              # with no temporal shift the shifted input is the input itself
        g.output(xs, "xs")
    g.output(d, "decisions", "int64")
    return g.model(), frames


def first_slots(g: Graph, idx: str, bucket: int) -> str:
    """The first ``bucket`` entries (bucket,) of a channel list (1, 1, C)."""
    head = g.op("Slice", idx, g.const(np.array([0], np.int64), "s"),
                g.const(np.array([bucket], np.int64), "e"), g.const(np.array([2], np.int64), "ax"))
    return g.op("Reshape", head, g.const(np.array([bucket], np.int64), "shape"))


def gathered_conv1_graph(s: BlockShape, kernel: int, stride: int, bucket: int) -> onnx.ModelProto:
    """``bucket`` rows of the first convolution, at the listed channels, scattered into the
    channel buffer ``y`` (1, C1 + 1, H1, W1)."""
    g = Graph(f"conv1_{bucket}")
    x = g.input("x", [1, s.cin, s.h, s.w])
    idx = g.input("idx", [1, 1, s.c1], "int64")
    y = g.input("y", [1, s.c1 + 1, s.h1, s.w1])
    w = g.input("W", [s.c1 + 1, s.cin, kernel, kernel])
    b = g.input("B", [s.c1 + 1])
    rows = first_slots(g, idx, bucket)
    pad = (kernel - 1) // 2
    computed = g.op("Relu", g.op("Conv", x, g.op("Gather", w, rows, axis=0),
                                 g.op("Gather", b, rows, axis=0), kernel_shape=[kernel, kernel],
                                 strides=[stride, stride], pads=[pad] * 4))
    where = g.op("Concat", g.const(np.zeros((1, bucket, 1), np.int64), "n"),
                 g.op("Reshape", rows, g.const(np.array([1, bucket, 1], np.int64), "shape")),
                 axis=2)
    g.output(g.op("ScatterND", y, where, computed), "y_out")
    return g.model()


def gathered_conv2_graph(block: AdaBlock, s: BlockShape, bucket: int) -> onnx.ModelProto:
    """The second convolution reading ``bucket`` listed channels of the buffer (1, C1 + 1, ...)."""
    g = Graph(f"conv2_{bucket}")
    y = g.input("y", [1, s.c1 + 1, s.h1, s.w1])
    idx = g.input("idx", [1, 1, s.c1], "int64")
    k = block.conv2.kernel_size[0]
    w = g.input("W", [s.c2, s.c1 + 1, k, k])
    b = g.input("B", [s.c2])
    cols = first_slots(g, idx, bucket)
    z = g.op("Conv", g.op("Gather", y, cols, axis=1), g.op("Gather", w, cols, axis=1), b,
             kernel_shape=[k, k], strides=list(block.conv2.stride),
             pads=[block.conv2.padding[0]] * 4)
    if block.kind == "bottleneck":
        z = g.op("Relu", z)
    g.output(z, "z")
    return g.model()


def gathered_weights(block: AdaBlock) -> Dict[str, np.ndarray]:
    """conv1 and conv2 with batch norm folded, each with an all-zero padding slot at index C1."""
    w1, b1, _, _ = folded_conv(block.conv1, block.bn1)
    w2, b2, _, _ = folded_conv(block.conv2, block.bn2)
    c1 = w1.shape[0]
    w1x = np.zeros((c1 + 1,) + w1.shape[1:], np.float32)
    w1x[:c1] = w1
    b1x = np.zeros(c1 + 1, np.float32)
    b1x[:c1] = b1
    w2x = np.zeros((w2.shape[0], c1 + 1) + w2.shape[2:], np.float32)
    w2x[:, :c1] = w2
    return {"W1": w1x, "B1": b1x, "W2": w2x, "B2": b2.astype(np.float32)}


def tail_graph(block: AdaBlock, s: BlockShape) -> onnx.ModelProto:
    g = Graph("tail")
    z = g.input("z", ["N", s.c2, s.h2, s.w2])
    x = g.input("x", ["N", s.cin, s.h, s.w])
    xs = g.input("xs", ["N", s.cin, s.h, s.w]) if block.downsample0 is not None else x
    g.output(block_tail(g, block, z, x, xs), "out")
    return g.model()


# ---------------------------------------------------------------------------------------------
# whole-network pieces

def stem_graph(model: AdaFuse, size: int, frames: Optional[int]) -> onnx.ModelProto:
    """Frames (N, 3, T, H, W) -> (N, T, C, h, w) (clip mode) or one frame -> (N, C, h, w)."""
    g = Graph("stem")
    t = frames or 1
    x = g.input("clip", ["N", 3, t, size, size])
    f = g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3, 4]),
             g.const(np.array([-1, 3, size, size], np.int64), "shape"))
    base = model.base_model
    f = g.op("MaxPool", g.op("Relu", conv2d_bn(g, f, base.conv1, base.bn1)), kernel_shape=[3, 3],
             strides=[2, 2], pads=[1, 1, 1, 1])
    if frames:
        h = model.stem_size(size)[1]
        f = g.op("Reshape", f, g.const(np.array([-1, frames, base.conv1.out_channels, h, h],
                                                np.int64), "shape"))
    g.output(f, "features")
    return g.model()


def head_graph(model: AdaFuse, s: BlockShape, frames: Optional[int]) -> onnx.ModelProto:
    g = Graph("head")
    if frames:
        x = g.input("features", ["N", frames, s.cout, s.h2, s.w2])
        x = g.op("Reshape", x, g.const(np.array([-1, s.cout, s.h2, s.w2], np.int64), "shape"))
    else:
        x = g.input("features", ["N", s.cout, s.h2, s.w2])
    scores = g.op("Gemm", pooled(g, x), g.const(_np(model.new_fc.weight), "w"),
                  g.const(_np(model.new_fc.bias), "b"), transB=1)
    if frames:
        scores = g.op("ReduceMean", g.op("Reshape", scores, g.const(
            np.array([-1, frames, model.num_classes], np.int64), "shape")), axes=[1], keepdims=0)
        g.output(scores, "logits")
    else:
        g.output(scores, "frame_logits")
    return g.model()


def consensus_graph(classes: int, window: int) -> onnx.ModelProto:
    """The stream's scores: the mean of the last ``window`` frames' scores (fewer after a reset)."""
    g = Graph("consensus")
    frame = g.input("frame_logits", ["N", classes])
    past = g.input("window_prev", ["N", window, classes])
    count = g.input("count_prev", ["N", 1])
    kept = g.op("Slice", past, g.const(np.array([1], np.int64), "s"),
                g.const(np.array([window], np.int64), "e"), g.const(np.array([1], np.int64), "ax"))
    win = g.op("Concat", kept, g.op("Unsqueeze", frame, g.const(np.array([1], np.int64), "ax")),
               axis=1)
    n = g.op("Min", g.op("Add", count, g.const(np.array(1.0, np.float32), "one")),
             g.const(np.array(float(window), np.float32), "window"))
    total = g.op("ReduceSum", win, g.const(np.array([1], np.int64), "ax"), keepdims=0)
    g.output(g.op("Div", total, n), "logits")
    g.output(win, "window_next")
    g.output(n, "count_next")
    return g.model()


# ---------------------------------------------------------------------------------------------
# the program

def declare_carries(parts: Parts, frames: StreamFrames, prefix: str,
                    outputs: Dict[str, str]) -> None:
    """Declare a piece's state inputs, and name the next-frame outputs it carries into them."""
    for out, state in frames.carried.items():
        parts.state.append(TensorSpec(f"{prefix}.{state}", ["N", *frames.specs[state]], "float32"))
        outputs[out] = f"{prefix}.{out}"


def carry_steps(parts: Parts, frames: StreamFrames, prefix: str) -> None:
    for out, state in frames.carried.items():
        parts.program.carry(f"{prefix}.carry.{state}", f"{prefix}.{out}", f"{prefix}.{state}")


def export_adafuse(model: AdaFuse, frames: int, size: int, execution: Optional[str] = None,
                   progress: Progress = None, stream: Optional[bool] = None,
                   buckets: int = 8) -> Parts:
    """The pieces, program and policies of an AdaFuse network (a stream: with its state,
    constants and window)."""
    execution = execution or "dense"
    if execution not in EXECUTIONS:
        raise ValueError(f"AdaFuse execution must be one of {', '.join(EXECUTIONS)}, "
                         f"not {execution!r}")
    if stream is None:
        stream = model.shift != "bidirectional"
    if stream and model.shift == "bidirectional":
        raise ValueError("a bidirectional temporal shift reads the next frame, so this network "
                         "cannot stream: export it with stream=False, or build it with "
                         "shift='online'")
    if execution == "gathered" and not stream:
        raise ValueError("the gathered execution is a per-frame program: export it with "
                         "stream=True")
    if not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be a positive integer, not {buckets!r}")
    model = model.eval()
    shapes = block_shapes(model, size)
    blocks = model.base_model.blocks
    parts = Parts(output="logits")
    program = parts.program
    total = len(blocks) + 2
    clip_frames = None if stream else frames

    def layouts(value: str) -> Dict[str, str]:
        return {} if stream else {value: NTCHW}

    program.run(parts.add("stem", stem_graph(model, size, clip_frames)), {"clip": "clip"},
                {"features": "stem"}, layouts=layouts("stem"))
    x = "stem"
    for i, (block, s) in enumerate(zip(blocks, shapes)):
        name = _block_name(model, i)
        if progress:
            progress(i + 1, total, name)
        if execution == "gathered" and block.policy_net is not None:
            x = _gathered_block(parts, block, s, name, x, buckets)
            continue
        fr: Frames = StreamFrames() if stream else ClipFrames(frames)
        g = Graph(name)
        shape = [s.cin, s.h, s.w]
        xin = g.input("x", ["N", *shape] if stream else ["N", frames, *shape])
        x4 = xin if stream else g.op("Reshape", xin, g.const(np.array([-1] + shape, np.int64),
                                                            "shape"))
        out, decisions = dense_block(g, block, x4, s, fr, plain=execution == "plain")
        if not stream:
            out = g.op("Reshape", out, g.const(np.array([-1, frames, s.cout, s.h2, s.w2],
                                                        np.int64), "shape"))
        g.output(out, "out")
        outputs = {"out": name}
        if decisions is not None:
            g.output(decisions, "decisions", "int64")
            outputs["decisions"] = f"{name}.decisions"
        parts.add(name, g.model())
        inputs = {"x": x}
        if isinstance(fr, StreamFrames):
            declare_carries(parts, fr, name, outputs)
            inputs.update({st: f"{name}.{st}" for st in fr.specs})
        program.run(name, inputs, outputs, layouts=layouts(name))
        if isinstance(fr, StreamFrames):
            carry_steps(parts, fr, name)
        x = name
    if progress:
        progress(total, total, "head")
    head = parts.add("head", head_graph(model, shapes[-1], clip_frames))
    if not stream:
        program.run(head, {"features": x}, {"logits": "logits"})
        return parts
    program.run(head, {"features": x}, {"frame_logits": "frame_logits"})
    parts.state += [TensorSpec("window", ["N", frames, model.num_classes], "float32"),
                    TensorSpec("count", ["N", 1], "float32")]
    program.run(parts.add("consensus", consensus_graph(model.num_classes, frames)),
                {"frame_logits": "frame_logits", "window_prev": "window", "count_prev": "count"},
                {"logits": "logits", "window_next": "window_next", "count_next": "count_next"})
    program.carry("carry.window", "window_next", "window")
    program.carry("carry.count", "count_next", "count")
    parts.stream = {"window": frames}
    return parts


def _block_name(model: AdaFuse, i: int) -> str:
    k = 0
    for stage in range(1, 5):
        for j in range(len(getattr(model.base_model, f"layer{stage}"))):
            if k == i:
                return f"base_model.layer{stage}.{j}"
            k += 1
    raise IndexError(i)


def _gathered_block(parts: Parts, block: AdaBlock, s: BlockShape, name: str, x: str,
                    buckets: int) -> str:
    program = parts.program
    sizes = bucket_sizes(s.c1, buckets)
    gate, frames = gate_graph(block, s, buckets)
    parts.add(f"{name}.gate", gate)
    shifted = block.shift != "none"
    xs = f"{name}.xs" if shifted else x
    outputs = {o: f"{name}.{o}" for o in ["decisions"] + [f"{k}_{kind}" for k in LISTS
                                                          for kind in ("idx", "bucket")]}
    if shifted:
        outputs["xs"] = xs
    declare_carries(parts, frames, name, outputs)
    program.run(f"{name}.gate", {"x": x, **{st: f"{name}.{st}" for st in frames.specs}}, outputs)
    # state of the buffers: the shifted input and the first convolution's channels
    parts.state += [TensorSpec(f"{name}.xs_prev", ["N", s.cin, s.h, s.w], "float32"),
                    TensorSpec(f"{name}.y_prev", ["N", s.c1 + 1, s.h1, s.w1], "float32")]
    for k, v in gathered_weights(block).items():
        parts.constants[f"{name}.{k}"] = v
    k1, st1 = block.conv1.kernel_size[0], block.conv1.stride[0]
    conv1 = [Branch("0ch", passes={"y_out": "y"})]
    conv1 += [Branch(f"{b}ch", parts.add(f"{name}.conv1_{b}", gathered_conv1_graph(s, k1, st1, b)))
              for b in sizes]
    w = {"W": f"{name}.W1", "B": f"{name}.B1"}
    program.switch(f"{name}.late", conv1,
                   {"x": f"{name}.xs_prev", "idx": f"{name}.late_idx", "y": f"{name}.y_prev", **w},
                   {"y_out": f"{name}.y_fixed"}, select=f"{name}.late_bucket")
    program.switch(f"{name}.conv1", conv1[1:],
                   {"x": xs, "idx": f"{name}.keep_idx", "y": f"{name}.y_fixed", **w},
                   {"y_out": f"{name}.y"}, select=f"{name}.keep_bucket")
    conv2 = [Branch(f"{b}ch", parts.add(f"{name}.conv2_{b}", gathered_conv2_graph(block, s, b)))
             for b in sizes]
    program.switch(f"{name}.conv2", conv2,
                   {"y": f"{name}.y", "idx": f"{name}.used_idx", "W": f"{name}.W2",
                    "B": f"{name}.B2"},
                   {"z": f"{name}.z"}, select=f"{name}.used_bucket")
    parts.add(f"{name}.tail", tail_graph(block, s))
    tail_in = {"z": f"{name}.z", "x": x}
    if block.downsample0 is not None:
        tail_in["xs"] = xs
    program.run(f"{name}.tail", tail_in, {"out": name})
    carry_steps(parts, frames, name)
    program.carry(f"{name}.carry.xs", xs, f"{name}.xs_prev")
    program.carry(f"{name}.carry.y", f"{name}.y", f"{name}.y_prev")
    widest = parts.policies.setdefault("widest", {})
    for sw, n in ((f"{name}.late", len(sizes)), (f"{name}.conv1", len(sizes) - 1),
                  (f"{name}.conv2", len(sizes) - 1)):
        widest[sw] = n
    return name
