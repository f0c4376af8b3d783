"""Cut AdaFocusV3 into exit stages: the glance, then one piece per cube, an ``exit`` step after each
stage but the last.

    glance:  clip -> g, centres, state, logits          (global CNN on every frame, policy)
    cube k:  clip, g, centres, prev_state -> state, logits   (crop cube k, local CNN, classifier)

The crop is the reference's interpolation written as three MatMuls with interpolation matrices
built in the graph from the cube's centre (:mod:`adaedge.nn.focus`). Batch norms are folded.
The exit steps start with no thresholds (every clip runs all cubes); ``adaedge calibrate exits``
writes a threshold set per compute budget.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import onnx
from torch import nn

from ..models.adafocus_v3 import AdaFocusV3, BasicBlock, ConvBNReLU, InvertedResidual, ResNet
from ..progress import Progress
from .graph import Graph, bn_affine, conv2d_bn
from .graph import to_numpy as _np
from .parts import Parts
CRITERION = "entropy"


def conv_bn(g: Graph, x: str, conv: Any, bn: Any, act: Optional[str] = None) -> str:
    """A Conv2d with its batch norm folded in, and its activation (relu, relu6 or none)."""
    y = conv2d_bn(g, x, conv, bn)
    if act == "relu":
        return g.op("Relu", y)
    if act == "relu6":
        return g.op("Clip", y, g.const(np.zeros((), np.float32), "lo"),
                    g.const(np.full((), 6.0, np.float32), "hi"))
    return y


def linear(g: Graph, x: str, fc: Any, bn: Any = None,
           columns: Optional[slice] = None) -> str:
    """``fc`` (optionally only some input columns) with a following batch norm folded in."""
    w = _np(fc.weight)
    b = _np(fc.bias) if fc.bias is not None else np.zeros(w.shape[0])
    if columns is not None:
        w = w[:, columns]
    if bn is not None:
        scale, shift = bn_affine(bn)
        w, b = w * scale[:, None], b * scale + shift
    return g.op("Gemm", x, g.const(w, "w"), g.const(b, "b"), transB=1)


def temporal_shift(g: Graph, x: str, frames: int, shape: Tuple[int, int, int]) -> str:
    """TSM's shift of (N*T, C, H, W) as the reference (:func:`adaedge.models.adafocus_v3.temporal_shift`)."""
    c, h, w = shape
    fold = c // 8
    v = g.op("Reshape", x, g.const([-1, frames, c, h, w], "shape", "int64"))

    def part(t0: int, t1: int, c0: int, c1: int) -> str:
        return g.op("Slice", v, g.const([t0, c0], "s", "int64"), g.const([t1, c1], "e", "int64"),
                    g.const([1, 2], "a", "int64"))

    past = g.op("Pad", part(0, frames - 1, 0, fold),
                g.const([0, 1, 0, 0, 0, 0, 0, 0, 0, 0], "pads", "int64"))
    future = g.op("Pad", part(1, frames, fold, 2 * fold),
                  g.const([0, 0, 0, 0, 0, 0, 1, 0, 0, 0], "pads", "int64"))
    out = g.op("Concat", past, future, part(0, frames, 2 * fold, c), axis=2)
    return g.op("Reshape", out, g.const([-1, c, h, w], "shape", "int64"))


def mobilenet(g: Graph, x: str, features: nn.Sequential, size: int) -> str:
    h = size
    layer: Any
    for layer in features:
        if isinstance(layer, ConvBNReLU):
            conv: Any = layer[0]
            x = conv_bn(g, x, conv, layer[1], "relu6")
            h = (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        elif isinstance(layer, InvertedResidual):
            y = x
            if layer.use_res_connect and layer.shift_frames:
                last_bn: Any = layer.conv[-1]
                y = temporal_shift(g, x, layer.shift_frames, (int(last_bn.num_features), h, h))
            for sub in layer.conv:
                if isinstance(sub, ConvBNReLU):
                    y = conv_bn(g, y, sub[0], sub[1], "relu6")
            y = conv_bn(g, y, layer.conv[-2], layer.conv[-1])
            x = g.op("Add", x, y) if layer.use_res_connect else y
            dw: Any = [sub for sub in layer.conv if isinstance(sub, ConvBNReLU)][-1][0]
            h = (h + 2 * dw.padding[0] - dw.kernel_size[0]) // dw.stride[0] + 1
        else:
            raise ValueError(f"unexpected layer {type(layer).__name__} in the global CNN")
    return x


def resnet(g: Graph, x: str, net: ResNet, size: int) -> str:
    x = conv_bn(g, x, net.conv1, net.bn1, "relu")
    h = (size + 2 * 3 - 7) // 2 + 1
    c = net.conv1.out_channels
    if isinstance(net.maxpool, nn.MaxPool2d):
        x = g.op("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        h = (h + 2 - 3) // 2 + 1
    for i in range(net.num_layers):
        for block in getattr(net, f"layer{i + 1}"):
            assert isinstance(block, BasicBlock)
            identity = x
            branch = x
            if block.shift_frames:
                branch = temporal_shift(g, x, block.shift_frames, (c, h, h))
            down: Any = block.downsample
            if down is not None:
                identity = conv_bn(g, x, down[0], down[1])
            y = conv_bn(g, branch, block.conv1, block.bn1, "relu")
            y = conv_bn(g, y, block.conv2, block.bn2)
            x = g.op("Relu", g.op("Add", y, identity))
            c = block.conv2.out_channels
            h = (h + 2 - 3) // block.conv1.stride[0] + 1
    return x


def glance_graph(model: AdaFocusV3) -> onnx.ModelProto:
    t, s = model.frames, model.size
    g = Graph("glance")
    clip = g.input("clip", ["N", 3, t, s, s])
    frames = g.op("Reshape", g.op("Transpose", clip, perm=[0, 2, 1, 3, 4]),
                  g.const([-1, 3, s, s], "shape", "int64"))
    factor = s // model.glance_size
    if factor > 1:
        frames = g.op("AveragePool", frames, kernel_shape=[factor, factor],
                      strides=[factor, factor])
    fmap = mobilenet(g, frames, model.global_CNN.features, model.glance_size)  # (N*T, Cg, h, w)
    m = model.map_size
    with_t = g.op("Reshape", fmap, g.const([-1, t, model.global_dim, m, m], "shape", "int64"))
    fmap = g.op("ReduceMean", with_t, axes=[1], keepdims=0)                  # (N, Cg, h, w)
    feat = g.op("Flatten", g.op("GlobalAveragePool", fmap), axis=1)         # (N, Cg)
    pol: Any = model.policy
    p = conv_bn(g, fmap, pol.encoder[0], pol.encoder[1])
    p = g.op("Flatten", g.op("Tanh", p), axis=1)
    p = g.op("Tanh", linear(g, p, pol.encoder[4], pol.encoder[5]))
    centres = g.op("Sigmoid", linear(g, p, pol.fc[0]))
    centres = g.op("Reshape", centres, g.const([-1, model.num_cubes, 3], "shape", "int64"))
    mlp: Any = model.classifier.mlp.layers
    state = g.op("Relu", linear(g, feat, mlp[0], mlp[1], columns=slice(0, model.global_dim)))
    g.output(feat, "g")
    g.output(centres, "centres")
    g.output(state, "state")
    fc: Any = model.global_CNN_fc
    g.output(linear(g, feat, fc[1]), "logits")
    return g.model()


def _interpolation(g: Graph, centre: str, axis: int, in_len: int, out_len: int) -> str:
    """(N, out_len, in_len) weights max(0, 1 - |c * (L - l) + i - j|), as the reference."""
    c = g.op("Slice", centre, g.const([axis], "s", "int64"), g.const([axis + 1], "e", "int64"),
             g.const([1], "a", "int64"))                                    # (N, 1)
    start = g.op("Mul", c, g.const(np.full((1, 1), in_len - out_len, np.float32), "span"))
    pos = g.op("Add", start, g.const(np.arange(out_len, dtype=np.float32)[None], "i"))
    diff = g.op("Sub", g.op("Unsqueeze", pos, g.const([2], "axes", "int64")),
                g.const(np.arange(in_len, dtype=np.float32)[None, None], "j"))
    return g.op("Relu", g.op("Sub", g.const(np.ones((), np.float32), "one"), g.op("Abs", diff)))


def cube_graph(model: AdaFocusV3, k: int) -> onnx.ModelProto:
    t, s = model.frames, model.size
    ct, ch, cw = model.cube
    g = Graph(f"cube{k}")
    clip = g.input("clip", ["N", 3, t, s, s])
    feat = g.input("g", ["N", model.global_dim])
    centres = g.input("centres", ["N", model.num_cubes, 3])
    state = g.input("prev_state", ["N", model.hidden])
    centre = g.op("Gather", centres, g.const(np.array(k - 1, np.int64), "k"), axis=1)   # (N, 3)
    centre = g.op("Clip", centre, g.const(np.zeros((), np.float32), "lo"),
                  g.const(np.ones((), np.float32), "hi"))
    rt = _interpolation(g, centre, 0, t, ct)
    ry = _interpolation(g, centre, 1, s, ch)
    rx = _interpolation(g, centre, 2, s, cw)
    axes12 = g.const([1, 2], "axes", "int64")
    x = g.op("MatMul", clip, g.op("Unsqueeze", g.op("Transpose", rx, perm=[0, 2, 1]), axes12))
    x = g.op("MatMul", g.op("Unsqueeze", ry, axes12), x)                    # (N, 3, T, ch, cw)
    x = g.op("Reshape", x, g.const([0, 3, t, ch * cw], "shape", "int64"))
    x = g.op("MatMul", g.op("Unsqueeze", rt, g.const([1], "axes", "int64")), x)  # (N,3,ct,ch*cw)
    x = g.op("Reshape", x, g.const([0, 3, ct, ch, cw], "shape", "int64"))
    x = g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3, 4]),
             g.const([-1, 3, ch, cw], "shape", "int64"))
    fmap = resnet(g, x, model.local_CNN, ch)
    f = g.op("Reshape", g.op("GlobalAveragePool", fmap),
             g.const([-1, ct, model.local_dim], "shape", "int64"))
    f = g.op("ReduceMean", f, axes=[1], keepdims=0)                          # (N, F)
    mlp: Any = model.classifier.mlp.layers
    z = g.op("Relu", linear(g, g.op("Concat", feat, f, axis=1), mlp[0], mlp[1]))
    new_state = g.op("Max", state, z)
    g.output(new_state, "state")
    head: Any = model.classifier.classifiers[k - 1]
    g.output(linear(g, new_state, head[1]), "logits")
    return g.model()


def export_adafocus(model: Any, frames: int, size: int, execution: Optional[str] = None,
                    progress: Progress = None) -> Parts:
    """The exit stages of an AdaFocus network: the official variants through
    :mod:`.adafocus_official`; adaedge's AdaFocusV3 here (the glance, then one piece per cube,
    an exit after every stage but the last)."""
    if not isinstance(model, AdaFocusV3):
        if execution not in (None, "stages"):
            raise ValueError(f"execution must be 'stages' for AdaFocus, not {execution!r}")
        from .adafocus_official import export_official
        return export_official(model, frames, size, progress)
    if execution not in (None, "stages"):
        raise ValueError(f"execution must be 'stages' for AdaFocusV3, not {execution!r}")
    if (frames, size) != (model.frames, model.size):
        raise ValueError(f"AdaFocusV3 is built for {model.frames}x{model.size}x{model.size} clips "
                         f"(its policy's layer sizes depend on it); export it at that size, not "
                         f"{frames}x{size}x{size}")
    model = model.eval()
    total = model.num_cubes + 1
    if progress:
        progress(0, total, "glance")
    parts = Parts(output="logits")
    program = parts.program
    program.run(parts.add("glance", glance_graph(model)), {"clip": "clip"},
                {"g": "g", "centres": "centres", "state": "state0", "logits": "logits0"})
    program.exit("exit0", "logits0", CRITERION)
    for k in range(1, model.num_cubes + 1):
        if progress:
            progress(k, total, f"cube{k}")
        last = k == model.num_cubes
        program.run(parts.add(f"cube{k}", cube_graph(model, k)),
                    {"clip": "clip", "g": "g", "centres": "centres", "prev_state": f"state{k - 1}"},
                    {"state": f"state{k}", "logits": "logits" if last else f"logits{k}"})
        if not last:
            program.exit(f"exit{k}", f"logits{k}", CRITERION)
    if progress:
        progress(total, total, "done")
    return parts
