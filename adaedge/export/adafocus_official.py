"""Cut the official AdaFocus models (:mod:`adaedge.models.adafocus`) into exit stages.

    AdaFocusV2       glance: clip -> per-frame global features, per-frame patch positions (GRU)
                     frame t: clip, g, actions [, state] -> state, logits_t      (T exits)
    Uni-AdaFocus     glance: clip -> glance state, focus frames, focus boxes, logits_0 (last
                              global head)
                     focus f: clip, glance state, frames, boxes [, state] -> state, logits
                     (F + 1 exits)
    Uni-AdaFocus-TSM glance: clip -> global logits, glance exit logits (new_new_fc), box, frames
                     focus: clip, ... -> logits                                   (2 exits)
    AdaFocusV2-TSM   one piece (no exit)

An ``exit`` step follows every stage but the last, with the official criterion (``max_logit``:
the largest raw logit, the official "confidence"); ``adaedge calibrate exits`` writes thresholds.
Crops are the official ``grid_sample`` arithmetic as two MatMuls with interpolation matrices built
in the graph; the focus frames are chosen in the graph by the policy's inverse CDF, exactly as
the reference does; batch norms are folded; TSM shifts are Slice/Pad/Concat.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnx
from torch import nn

from ..models.adafocus import (AdaFocusV2, AdaFocusV2TSM, Bottleneck, InvertedResidual,
                               MobileNetV2, ResNet, TemporalShift, UniAdaFocus, UniAdaFocusTSM,
                               _map_size)
from ..progress import Progress
from .adafocus import conv_bn, linear
from .graph import Graph, bn_affine
from .graph import to_numpy as _np
from .parts import Parts

CRITERION = "max_logit"        # the official "confidence": the largest raw logit


def shift(g: Graph, x: str, frames: int, shape: Tuple[int, int, int]) -> str:
    """TSM's shift of (N*T, C, H, W) as :func:`adaedge.models.adafocus.temporal_shift`: channels
    [0, fold) from frame t+1, [fold, 2 fold) from frame t-1."""
    c, h, w = shape
    fold = c // 8
    if fold == 0:
        return x
    v = g.op("Reshape", x, g.const([-1, frames, c, h, w], "shape", "int64"))

    def part(t0: int, t1: int, c0: int, c1: int) -> str:
        return g.op("Slice", v, g.const([t0, c0], "s", "int64"), g.const([t1, c1], "e", "int64"),
                    g.const([1, 2], "a", "int64"))

    future = g.op("Pad", part(1, frames, 0, fold),
                  g.const([0, 0, 0, 0, 0, 0, 1, 0, 0, 0], "pads", "int64"))
    past = g.op("Pad", part(0, frames - 1, fold, 2 * fold),
                g.const([0, 1, 0, 0, 0, 0, 0, 0, 0, 0], "pads", "int64"))
    out = g.op("Concat", future, past, part(0, frames, 2 * fold, c), axis=2)
    return g.op("Reshape", out, g.const([-1, c, h, w], "shape", "int64"))


def _conv(layer: Any) -> Tuple[Any, Optional[int]]:
    """A convolution and, where TSM wraps it, its frames."""
    if isinstance(layer, TemporalShift):
        return layer.net, layer.frames
    return layer, None


def _out(h: int, conv: Any) -> int:
    return (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1


def mobilenet(g: Graph, x: str, net: MobileNetV2, size: int) -> str:
    """The official MobileNetV2's feature map of frames (N*T, 3, size, size)."""
    h = size
    for layer in net.features:
        if isinstance(layer, InvertedResidual):
            seq = list(layer.conv)
            first, frames = _conv(seq[0])
            y = shift(g, x, frames, (int(first.in_channels), h, h)) if frames else x
            if len(seq) == 8:
                y = conv_bn(g, y, first, seq[1], "relu6")
                y = conv_bn(g, y, seq[3], seq[4], "relu6")
                h2 = _out(h, seq[3])
                y = conv_bn(g, y, seq[6], seq[7])
            else:
                y = conv_bn(g, y, first, seq[1], "relu6")
                h2 = _out(h, first)
                y = conv_bn(g, y, seq[3], seq[4])
            x = g.op("Add", x, y) if layer.use_res_connect else y
            h = h2
        else:
            stem: Any = layer
            x = conv_bn(g, x, stem[0], stem[1], "relu6")
            h = _out(h, stem[0])
    return x


def resnet(g: Graph, x: str, net: ResNet, size: int) -> str:
    """The official ResNet's pooled features (N*T, D) of frames (N*T, 3, size, size)."""
    x = conv_bn(g, x, net.conv1, net.bn1, "relu")
    h = _out(size, net.conv1)
    x = g.op("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    h = (h + 2 - 3) // 2 + 1
    for i in range(1, 5):
        block: Any
        for block in getattr(net, f"layer{i}"):
            assert isinstance(block, Bottleneck)
            conv1, frames = _conv(block.conv1)
            branch = shift(g, x, frames, (int(conv1.in_channels), h, h)) if frames else x
            down: Any = block.downsample
            identity = conv_bn(g, x, down[0], down[1]) if down is not None else x
            y = conv_bn(g, branch, conv1, block.bn1, "relu")
            y = conv_bn(g, y, block.conv2, block.bn2, "relu")
            h = _out(h, block.conv2)
            y = conv_bn(g, y, block.conv3, block.bn3)
            x = g.op("Relu", g.op("Add", y, identity))
    return g.op("Flatten", g.op("GlobalAveragePool", x), axis=1)


def mlp(g: Graph, x: str, m: Any) -> str:
    """``MultiLayerPerceptron``: Linear with its batch norm folded, then ReLU."""
    return g.op("Relu", linear(g, x, m.layers[0], m.layers[1]))


def head(g: Graph, x: str, seq: Any) -> str:
    return linear(g, x, seq[1])


def frames_of(g: Graph, clip: str, c: int, t: int, s: int, index: Optional[List[int]] = None) -> str:
    """Frames (N*T', 3, S, S) of clips (N, 3, T, S, S), frame-major (all, or those of ``index``)."""
    x = clip
    if index is not None:
        x = g.op("Gather", clip, g.const(index, "idx", "int64"), axis=2)
    x = g.op("Transpose", x, perm=[0, 2, 1, 3, 4])
    return g.op("Reshape", x, g.const([-1, c, s, s], "shape", "int64"))


def crop(g: Graph, frames: str, y0: str, x0: str, h: str, w: str, size: int, patch: int) -> str:
    """The official crop (grid_sample, bilinear, zero padding, align_corners=False) of (B, C, S,
    S) frames: (B, C, P, P); y0, x0, h, w are (B, 1)."""
    j = g.const((np.arange(patch) + 0.5).reshape(1, patch).astype(np.float32), "j")
    i = g.const(np.arange(size, dtype=np.float32).reshape(1, 1, size), "i")
    half = g.const(np.full((), 0.5, np.float32), "half")
    one = g.const(np.full((), 1.0, np.float32), "one")
    out = g.const(np.full((), float(patch), np.float32), "P")

    def weights(start: str, side: str) -> str:           # (B, P, S), in the reference's order
        pos = g.op("Add", g.op("Sub", start, half), g.op("Div", g.op("Mul", j, side), out))
        d = g.op("Abs", g.op("Sub", g.op("Unsqueeze", pos, g.const([2], "ax", "int64")), i))
        return g.op("Relu", g.op("Sub", one, d))

    ry = g.op("Unsqueeze", weights(y0, h), g.const([1], "ax", "int64"))       # (B, 1, P, S)
    rx = g.op("Unsqueeze", g.op("Transpose", weights(x0, w), perm=[0, 2, 1]),
              g.const([1], "ax", "int64"))                                    # (B, 1, S, P)
    return g.op("MatMul", g.op("MatMul", ry, frames), rx)


def column(g: Graph, x: str, k: int) -> str:
    """Column k of (B, K) as (B, 1)."""
    return g.op("Slice", x, g.const([k], "s", "int64"), g.const([k + 1], "e", "int64"),
                g.const([1], "a", "int64"))


def fixed_crop(g: Graph, frames: str, action: str, size: int, patch: int) -> str:
    span = g.const(np.full((), float(size - patch), np.float32), "span")
    side = g.op("Add", g.op("Mul", column(g, action, 0), g.const(np.zeros((), np.float32), "z")),
                g.const(np.full((), float(patch), np.float32), "p"))
    return crop(g, frames, g.op("Mul", column(g, action, 0), span),
                g.op("Mul", column(g, action, 1), span), side, side, size, patch)


def scaled_crop(g: Graph, frames: str, box: str, size: int, patch: int, lo: float, hi: float) -> str:
    """Uni-AdaFocus's box (y, x, sy, sx) as :func:`adaedge.models.adafocus.scaled_patch`."""
    p = g.const(np.full((), float(patch), np.float32), "p")
    span = g.const(np.full((), float(hi - lo), np.float32), "r")
    base = g.const(np.full((), lo / patch, np.float32), "b")
    s = g.const(np.full((), float(size), np.float32), "s")

    def side(k: int) -> str:       # patch * (s * (hi - lo) / patch + lo / patch), as the reference
        return g.op("Mul", p, g.op("Add", g.op("Div", g.op("Mul", column(g, box, k), span), p),
                                   base))
    h, w = side(2), side(3)
    return crop(g, frames, g.op("Mul", column(g, box, 0), g.op("Sub", s, h)),
                g.op("Mul", column(g, box, 1), g.op("Sub", s, w)), h, w, size, patch)


def focus_index(g: Graph, weights: str, glance: int, frames: int, focus: int) -> str:
    """:func:`adaedge.models.adafocus.focus_indices` in the graph: (N, G) weights -> (N, F)."""
    zero = g.op("Mul", column(g, weights, 0), g.const(np.zeros((), np.float32), "z"))   # (N, 1)
    csum = g.op("CumSum", weights, g.const(np.array(1, np.int64), "axis"))
    cdf = g.op("Concat", zero, g.op("Slice", csum, g.const([0], "s", "int64"),
                                     g.const([glance - 1], "e", "int64"),
                                     g.const([1], "a", "int64")),
               g.op("Add", zero, g.const(np.full((), 1.0, np.float32), "one")), axis=1)
    gf = g.const(np.full((), float(glance), np.float32), "G")
    idx: List[str] = []
    for i in range(focus):
        u = g.const(np.full((), (i + 0.5) / focus, np.float32), "u")
        first = g.op("ArgMax", g.op("Cast", g.op("GreaterOrEqual", cdf, u), to=onnx.TensorProto.INT64),
                     axis=1, keepdims=1)
        k = g.op("Clip", g.op("Sub", first, g.const(np.array(1, np.int64), "one")),
                 g.const(np.array(0, np.int64), "lo"), g.const(np.array(glance - 1, np.int64), "hi"))
        ck = g.op("GatherElements", cdf, k, axis=1)
        ck1 = g.op("GatherElements", cdf, g.op("Add", k, g.const(np.array(1, np.int64), "one")),
                   axis=1)
        kf = g.op("Cast", k, to=onnx.TensorProto.FLOAT)
        a = g.op("Mul", g.op("Div", g.op("Add", kf, g.const(np.full((), 1.0, np.float32), "one")),
                             gf), g.op("Sub", u, ck))
        b = g.op("Mul", g.op("Div", kf, gf), g.op("Sub", u, ck1))
        q = g.op("Div", g.op("Sub", a, b), g.op("Sub", ck1, ck))
        idx.append(g.op("Cast", g.op("Floor", g.op("Mul", q, g.const(
            np.full((), float(frames), np.float32), "T"))), to=onnx.TensorProto.INT64))
    one = g.const(np.array(1, np.int64), "one")
    for i in range(1, focus):
        idx[i] = g.op("Where", g.op("Greater", idx[i], idx[i - 1]), idx[i], g.op("Add", idx[i - 1], one))
    out = [g.op("Min", v, g.const(np.array(frames - focus + i, np.int64), "cap"))
           for i, v in enumerate(idx)]
    return g.op("Concat", *out, axis=1)


def pick_frame(g: Graph, clip: str, index: str, frames: int, s: int) -> str:
    """Frame ``index`` (N, 1) of each clip (N, 3, T, S, S): (N, 3, S, S), as a one-hot product
    (exact: weights 0 and 1)."""
    onehot = g.op("Cast", g.op("Equal", g.const(np.arange(frames, dtype=np.int64).reshape(1, frames),
                                                "t"), index), to=onnx.TensorProto.FLOAT)   # (N, T)
    v = g.op("Reshape", g.op("Transpose", clip, perm=[0, 2, 1, 3, 4]),
             g.const([0, frames, 3 * s * s], "shape", "int64"))                            # (N, T, 3SS)
    x = g.op("MatMul", g.op("Unsqueeze", onehot, g.const([1], "ax", "int64")), v)        # (N, 1, 3SS)
    return g.op("Reshape", x, g.const([-1, 3, s, s], "shape", "int64"))


def policy_v2(g: Graph, fmap: str, model: AdaFocusV2, frames: int) -> str:
    """(N*T, C, m, m) maps -> (N, T, 2) actions: encoder, GRU (ONNX's, gates reordered), fc."""
    stn = model.policy_stn
    enc: Any = stn.encoder
    e = g.op("Tanh", conv_bn(g, fmap, enc[0], enc[1]))
    e = g.op("Flatten", e, axis=1)
    e = g.op("Tanh", linear(g, e, enc[4], enc[5]))                                   # (N*T, H)
    hdim = stn.hidden
    seq = g.op("Transpose", g.op("Reshape", e, g.const([-1, frames, hdim], "shape", "int64")),
               perm=[1, 0, 2])                                                        # (T, N, H)
    gru: Any = stn.gru

    def zrn(w: np.ndarray) -> np.ndarray:           # PyTorch's (r, z, n) -> ONNX's (z, r, h)
        r, z, n = np.split(w, 3, axis=0)
        return np.concatenate([z, r, n], axis=0)
    w = g.const(zrn(_np(gru.weight_ih_l0))[None], "W")
    r = g.const(zrn(_np(gru.weight_hh_l0))[None], "R")
    b = g.const(np.concatenate([zrn(_np(gru.bias_ih_l0)), zrn(_np(gru.bias_hh_l0))])[None], "B")
    y = g.op("GRU", seq, w, r, b, outputs=2, hidden_size=hdim, linear_before_reset=1)[0]
    y = g.op("Reshape", g.op("Transpose", g.op("Squeeze", y, g.const([1], "ax", "int64")),
                             perm=[1, 0, 2]), g.const([-1, hdim], "shape", "int64"))  # (N*T, H)
    fc: Any = stn.fc
    act = g.op("Sigmoid", linear(g, y, fc[0]))
    return g.op("Reshape", act, g.const([-1, frames, 2], "shape", "int64"))


def _clip_input(g: Graph, t: int, s: int) -> str:
    return g.input("clip", ["N", 3, t, s, s])


def export_v2(model: AdaFocusV2, progress: Progress = None) -> Parts:
    t, s, p = model.frames, model.size, model.patch
    c_g = model.global_CNN.last_channel
    parts = Parts(output="logits")
    g = Graph("glance")
    clip = _clip_input(g, t, s)
    fmap = mobilenet(g, frames_of(g, clip, 3, t, s), model.global_CNN, s)
    feat = g.op("Flatten", g.op("GlobalAveragePool", fmap), axis=1)
    g.output(g.op("Reshape", feat, g.const([-1, t, c_g], "shape", "int64")), "g")
    g.output(policy_v2(g, fmap, model, t), "actions")
    parts.program.run(parts.add("glance", g.model()), {"clip": "clip"},
                      {"g": "g", "actions": "actions"})
    for k in range(t):
        if progress:
            progress(k, t, f"frame{k}")
        g = Graph(f"frame{k}")
        clip = _clip_input(g, t, s)
        gv = g.input("g", ["N", t, c_g])
        acts = g.input("actions", ["N", t, 2])

        def at(v: str, width: int) -> str:
            sl = g.op("Slice", v, g.const([k], "s", "int64"), g.const([k + 1], "e", "int64"),
                      g.const([1], "a", "int64"))
            return g.op("Reshape", sl, g.const([-1, width], "shape", "int64"))
        frame = g.op("Reshape", g.op("Gather", clip, g.const(np.array(k, np.int64), "t"), axis=2),
                     g.const([-1, 3, s, s], "shape", "int64"))
        local = resnet(g, fixed_crop(g, frame, at(acts, 2), s, p), model.local_CNN, p)
        z = mlp(g, g.op("Concat", at(gv, c_g), local, axis=1), model.classifier.mlp)
        inputs = {"clip": "clip", "g": "g", "actions": "actions"}
        width: Any = model.classifier.mlp.layers[0]
        z = _running_max(g, z, k, int(width.out_features), inputs)
        g.output(head(g, z, model.classifier.classifiers[k]), "logits")
        _add_step(parts, g, f"frame{k}", k, inputs, k == t - 1, f"logits{k}", f"exit{k}")
    return parts


def _running_max(g: Graph, z: str, k: int, width: int, inputs: Dict[str, str]) -> str:
    """The official classifiers' recurrence: step ``k`` keeps the element-wise max of its
    features and the previous step's (input ``prev``, read from value ``state{k-1}``); the
    result is the step's output ``state``."""
    if k > 0:
        z = g.op("Max", z, g.input("prev", ["N", width]))
        inputs["prev"] = f"state{k - 1}"
    g.output(z, "state")
    return z


def _add_step(parts: Parts, g: Graph, name: str, k: int, inputs: Dict[str, str], last: bool,
              logits: str, exit_name: str) -> None:
    """Run step ``k``'s piece (its state becomes ``state{k}``); every step but the last gives its
    logits as ``logits`` and exits on them, the last gives the bundle's output."""
    parts.program.run(parts.add(name, g.model()), inputs,
                      {"state": f"state{k}", "logits": "logits" if last else logits})
    if not last:
        parts.program.exit(exit_name, logits, CRITERION)


def spatial_policy(g: Graph, maps: str, pol: Any) -> str:
    """(N, C, G, m, m) -> (N, 4, G') boxes."""
    enc: Any = pol.encoder
    x = maps
    for conv_i, bn_i in ((0, 1), (3, 4), (6, 7)):
        x = g.op("Relu", conv3d_bn(g, x, enc[conv_i], enc[bn_i]))
    last: Any = enc[9]
    x = g.op("Sigmoid", g.op("Conv", x, g.const(_np(last.weight), "w"),
                             kernel_shape=list(last.kernel_size), pads=[0] * 6))
    return g.op("Reshape", x, g.const([0, 4, -1], "shape", "int64"))


def conv3d_bn(g: Graph, x: str, conv: Any, bn: Any) -> str:
    scale, shift_ = bn_affine(bn)
    w = _np(conv.weight) * scale[:, None, None, None, None]
    pad = list(conv.padding)
    return g.op("Conv", x, g.const(w, "w"), g.const(shift_, "b"), kernel_shape=list(conv.kernel_size),
                pads=pad + pad)


def temporal_policy(g: Graph, feat: str, pol: Any, glance: int, channels: int) -> str:
    """(N, G, C) glance features -> (N, G) softmax weights (temperature 1)."""
    tc: Any = pol.Tconv
    x = g.op("Unsqueeze", g.op("Transpose", feat, perm=[0, 2, 1]), g.const([3], "ax", "int64"))
    x = g.op("Relu", conv_bn(g, x, tc[0], tc[1]))
    x = g.op("Relu", conv_bn(g, x, tc[3], tc[4]))
    last: Any = tc[6]
    x = g.op("Conv", x, g.const(_np(last.weight), "w"), kernel_shape=[1, 1])
    return g.op("Softmax", g.op("Flatten", x, axis=1), axis=1)


def _maps(g: Graph, fmap: str, glance: int, c: int, m: int) -> str:
    """(N*G, C, m, m) -> (N, C, G, m, m)."""
    v = g.op("Reshape", fmap, g.const([-1, glance, c, m, m], "shape", "int64"))
    return g.op("Transpose", v, perm=[0, 2, 1, 3, 4])


def export_uni(model: UniAdaFocus, progress: Progress = None) -> Parts:
    t, gl, fo = model.frames, model.glance_frames, model.focus
    s, p = model.size, model.patch
    c_g, m = model.global_CNN.last_channel, _map_size(s)
    cls: Any = model.classifier
    hidden = int(cls.global_mlp.layers[0].out_features)
    parts = Parts(output="logits")
    g = Graph("glance")
    clip = _clip_input(g, t, s)
    fmap = mobilenet(g, frames_of(g, clip, 3, t, s, model.glance_index), model.global_CNN, s)
    feat = g.op("Flatten", g.op("GlobalAveragePool", fmap), axis=1)                  # (N*G, C)
    boxes = spatial_policy(g, _maps(g, fmap, gl, c_g, m), model.spatial_policy)      # (N, 4, G)
    interp = np.zeros((gl, t), np.float32)                  # F.interpolate linear, align_corners=False
    for i in range(t):
        src = max(0.0, (i + 0.5) * gl / t - 0.5)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, gl - 1)
        lam = src - i0
        interp[i0, i] += 1 - lam
        interp[i1, i] += lam
    all_boxes = g.op("MatMul", boxes, g.const(interp, "interp"))                      # (N, 4, T)
    fview = g.op("Reshape", feat, g.const([-1, gl, c_g], "shape", "int64"))
    weights = temporal_policy(g, fview, model.temporal_policy, gl, c_g)
    index = focus_index(g, weights, gl, t, fo)                                         # (N, F)
    fboxes = g.op("GatherElements", all_boxes, g.op("Expand", g.op(
        "Unsqueeze", index, g.const([1], "ax", "int64")), g.const([1, 4, 1], "shape", "int64")),
        axis=2)                                                                         # (N, 4, F)
    z1 = g.op("Reshape", mlp(g, feat, cls.global_mlp), g.const([-1, gl, hidden], "shape", "int64"))
    c1 = g.op("ReduceMax", z1, axes=[1], keepdims=0)       # the running max, after every frame
    g.output(c1, "c1")
    g.output(index, "focus_index", "int64")
    g.output(g.op("Transpose", fboxes, perm=[0, 2, 1]), "focus_boxes")                # (N, F, 4)
    g.output(head(g, c1, cls.global_classifiers[gl - 1]), "logits")
    parts.program.run(parts.add("glance", g.model()), {"clip": "clip"},
                      {"c1": "c1", "focus_index": "focus_index", "focus_boxes": "focus_boxes",
                       "logits": "logits0"})
    parts.program.exit("exit0", "logits0", CRITERION)
    for f in range(fo):
        if progress:
            progress(f, fo, f"focus{f}")
        g = Graph(f"focus{f}")
        clip = _clip_input(g, t, s)
        c1 = g.input("c1", ["N", hidden])
        index = g.input("focus_index", ["N", fo], "int64")
        fboxes = g.input("focus_boxes", ["N", fo, 4])
        idx = g.op("Slice", index, g.const([f], "s", "int64"), g.const([f + 1], "e", "int64"),
                   g.const([1], "a", "int64"))
        box = g.op("Reshape", g.op("Slice", fboxes, g.const([f], "s", "int64"),
                                   g.const([f + 1], "e", "int64"), g.const([1], "a", "int64")),
                   g.const([-1, 4], "shape", "int64"))
        frame = pick_frame(g, clip, idx, t, s)
        local = resnet(g, scaled_crop(g, frame, box, s, p, model.box_min, model.box_max),
                       model.local_CNN, p)
        z = mlp(g, local, cls.local_mlp)
        inputs = {"clip": "clip", "c1": "c1", "focus_index": "focus_index",
                  "focus_boxes": "focus_boxes"}
        z = _running_max(g, z, f, hidden, inputs)
        g.output(head(g, g.op("Concat", z, c1, axis=1), cls.local_classifiers[f]), "logits")
        _add_step(parts, g, f"focus{f}", f, inputs, f == fo - 1, f"logits{f + 1}",
                  f"exit{f + 1}")
    return parts


def _tsn_heads(g: Graph, feat: str, tsn: Any, frames: int) -> Tuple[str, str]:
    c = tsn.new_fc.out_features

    def avg(fc: Any) -> str:
        v = g.op("Reshape", linear(g, feat, fc), g.const([-1, frames, c], "shape", "int64"))
        return g.op("ReduceMean", v, axes=[1], keepdims=0)
    return avg(tsn.new_fc), avg(tsn.new_new_fc)


def export_v2_tsm(model: AdaFocusV2TSM, progress: Progress = None) -> Parts:
    tg, tf, s, p = model.glance_frames, model.focus_frames, model.size, model.patch
    c_g, m = model.global_CNN.base_model.last_channel, _map_size(s)
    parts = Parts(output="logits")
    g = Graph("model")
    clip = _clip_input(g, tg + tf, s)
    fmap = mobilenet(g, frames_of(g, clip, 3, tg + tf, s, list(range(tg))),
                     model.global_CNN.base_model, s)
    feat = g.op("Flatten", g.op("GlobalAveragePool", fmap), axis=1)
    gl, _ = _tsn_heads(g, feat, model.global_CNN, tg)
    stn: Any = model.policy_stn
    x = g.op("Reshape", fmap, g.const([-1, tg * c_g, m, m], "shape", "int64"))
    x = g.op("Flatten", g.op("Tanh", conv_bn(g, x, stn[0], stn[1])), axis=1)
    x = g.op("Tanh", linear(g, x, stn[4], stn[5]))
    x = g.op("Tanh", linear(g, x, stn[7], stn[8]))
    action = g.op("Sigmoid", linear(g, x, stn[10]))
    focus = g.op("Gather", clip, g.const(list(range(tg, tg + tf)), "idx", "int64"), axis=2)
    stacked = g.op("Reshape", g.op("Transpose", focus, perm=[0, 2, 1, 3, 4]),
                   g.const([0, tf * 3, s, s], "shape", "int64"))
    patches = g.op("Reshape", fixed_crop(g, stacked, action, s, p),
                   g.const([-1, 3, p, p], "shape", "int64"))
    ll, _ = _tsn_heads(g, resnet(g, patches, model.local_CNN.base_model, p), model.local_CNN, tf)
    g.output(g.op("Add", gl, ll), "logits")
    parts.program.run(parts.add("model", g.model()), {"clip": "clip"}, {"logits": "logits"})
    return parts


def export_uni_tsm(model: UniAdaFocusTSM, progress: Progress = None) -> Parts:
    gl, ti, fo, s, p = model.glance_frames, model.input_frames, model.focus, model.size, model.patch
    c_g, m = model.global_CNN.base_model.last_channel, _map_size(s)
    t = gl + ti
    ncls = model.num_classes
    parts = Parts(output="logits")
    g = Graph("glance")
    clip = _clip_input(g, t, s)
    fmap = mobilenet(g, frames_of(g, clip, 3, t, s, list(range(gl))), model.global_CNN.base_model, s)
    feat = g.op("Flatten", g.op("GlobalAveragePool", fmap), axis=1)
    gfinal, gavg = _tsn_heads(g, feat, model.global_CNN, gl)
    box = g.op("Reshape", spatial_policy(g, _maps(g, fmap, gl, c_g, m), model.spatial_policy),
               g.const([-1, 4], "shape", "int64"))
    weights = temporal_policy(g, g.op("Reshape", feat, g.const([-1, gl, c_g], "shape", "int64")),
                              model.temporal_policy, gl, c_g)
    g.output(gfinal, "global_final")
    g.output(gavg, "logits")
    g.output(box, "box")
    g.output(focus_index(g, weights, gl, ti, fo), "focus_index", "int64")
    parts.program.run(parts.add("glance", g.model()), {"clip": "clip"},
                      {"global_final": "global_final", "logits": "logits0", "box": "box",
                       "focus_index": "focus_index"})
    parts.program.exit("exit0", "logits0", CRITERION)
    g = Graph("focus")
    clip = _clip_input(g, t, s)
    gfinal = g.input("global_final", ["N", ncls])
    box = g.input("box", ["N", 4])
    index = g.input("focus_index", ["N", fo], "int64")
    frames = [pick_frame(g, g.op("Gather", clip, g.const(list(range(gl, t)), "idx", "int64"), axis=2),
                         g.op("Slice", index, g.const([f], "s", "int64"),
                              g.const([f + 1], "e", "int64"), g.const([1], "a", "int64")), ti, s)
              for f in range(fo)]
    stacked = g.op("Concat", *frames, axis=1)                                            # (N, F*3, S, S)
    patches = g.op("Reshape", scaled_crop(g, stacked, box, s, p, model.box_min, model.box_max),
                   g.const([-1, 3, p, p], "shape", "int64"))
    lfinal, _ = _tsn_heads(g, resnet(g, patches, model.local_CNN.base_model, p), model.local_CNN, fo)
    g.output(g.op("Add", gfinal, lfinal), "logits")
    parts.program.run(parts.add("focus", g.model()),
                      {"clip": "clip", "global_final": "global_final", "box": "box",
                       "focus_index": "focus_index"}, {"logits": "logits"})
    return parts


def export_official(model: nn.Module, frames: int, size: int, progress: Progress = None) -> Parts:
    """The exit stages of an official AdaFocus model (see the module docstring)."""
    want = (getattr(model, "frames"), getattr(model, "size"))
    if (frames, size) != want:
        raise ValueError(f"{type(model).__name__} is built for {want[0]} frames of "
                         f"{want[1]}x{want[1]} (its policy's sizes depend on it); export it at "
                         f"that size, not {frames}x{size}x{size}")
    model = model.eval()
    writer: Dict[type, Any] = {AdaFocusV2: export_v2, UniAdaFocus: export_uni,
                               AdaFocusV2TSM: export_v2_tsm, UniAdaFocusTSM: export_uni_tsm}
    return writer[type(model)](model, progress)


__all__ = ["export_official", "CRITERION"]
