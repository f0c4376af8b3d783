"""AdaFocus as its official code builds it: AdaFocusV2 and Uni-AdaFocus, with and without TSM.

Wang et al., AdaFocusV2 (CVPR 2022) and Uni-AdaFocus (TPAMI 2025, whose code carries AdaFocusV3's
glance, focus and early exit; no separate V3 code exists). Module names, structure and arithmetic
follow the official repositories (LeapLabTHU/AdaFocusV2 @ e97987c, LeapLabTHU/Uni-AdaFocus @
8846488) as read, so that a checkpoint their training scripts wrote computes the same function
here; ``tests/data`` holds such checkpoints and their official outputs.

Building blocks (official names):

* ``MobileNetV2``: the widely used implementation with flat ``features.{i}.conv.{0..7}`` names
  (stem 32 channels unscaled, channel counts rounded up to multiples of 8, a ``classifier``
  Linear that AdaFocus does not use).
* ``ResNet``: torchvision's ResNet v1.5 with Bottleneck blocks (stride on the 3x3), 2048-d
  features at full width, an unused ``fc``.
* ``TemporalShift`` (TSM): channels ``[0, C/8)`` of frame t come from frame t+1, ``[C/8, C/4)``
  from frame t-1 (zeros at the clip's ends); it wraps a block's first convolution (``.net``), so
  only the residual branch sees shifted channels.
* ``TSN``: a TSM backbone with two heads, ``new_fc`` and ``new_new_fc``, averaged over frames.

Models (input: clips (N, C, T, H, W), normalised with ImageNet's statistics):

* ``AdaFocusV2`` (``adafocus_v2``): MobileNetV2 glances at every frame at full resolution; a GRU
  policy places one patch per frame; ResNet-50 encodes each patch; a pooling classifier keeps the
  running max of ``mlp([global_t, local_t])`` and predicts after every frame (T exits).
* ``UniAdaFocus`` (``uni_adafocus``): MobileNetV2 glances at G of the T frames; a spatial policy
  gives a box (y, x, scale_y, scale_x) per glance frame, interpolated to all frames; a temporal
  policy weights the glance frames, and F focus frames are read off its inverse CDF; each focus
  frame's box is cropped and resized (bilinear, half-pixel centres, zero padding) to the patch
  size and encoded by ResNet-50; two running maxes (glance, focus) feed the classifiers. Exits:
  after the glance (the last global classifier), then after every focus frame (F + 1 exits).
* ``AdaFocusV2TSM`` (``adafocus_v2_tsm``) and ``UniAdaFocusTSM`` (``uni_adafocus_tsm``): the
  Something-Something variants: TSN backbones with TSM; one patch (or box) per video; the
  prediction is the sum of the two TSNs' ``new_fc`` averages. Their official loaders sample the
  glance clip and the focus clip separately from a video, so these models take both, one after
  the other in time: ``clip[:, :, :glance_frames]`` and ``clip[:, :, glance_frames:]``.

Early exits as the official evaluation computes them: ``confidence`` is the largest raw logit
(``max_logit`` in adaedge's bundles), ``entropy`` is sum p log p; a clip leaves at the first exit
whose value reaches its threshold.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Family

MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))
RESNET50 = (3, 4, 6, 3)
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# ---------------------------------------------------------------------------------------------
# TSM

def temporal_shift(x: torch.Tensor, frames: int, fold_div: int = 8) -> torch.Tensor:
    """TSM's shift of (N*T, C, H, W): channels [0, fold) of frame t take frame t+1's, channels
    [fold, 2*fold) frame t-1's (zeros past the clip's ends); fold = C // fold_div."""
    nt, c, h, w = x.shape
    v = x.view(nt // frames, frames, c, h, w)
    fold = c // fold_div
    out = torch.zeros_like(v)
    out[:, :-1, :fold] = v[:, 1:, :fold]
    out[:, 1:, fold:2 * fold] = v[:, :-1, fold:2 * fold]
    out[:, :, 2 * fold:] = v[:, :, 2 * fold:]
    return out.view(nt, c, h, w)


class TemporalShift(nn.Module):
    """A module (``net``) fed the TSM-shifted input."""

    def __init__(self, net: nn.Module, frames: int, fold_div: int = 8) -> None:
        super().__init__()
        self.net = net
        self.frames = frames
        self.fold_div = fold_div

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(temporal_shift(x, self.frames, self.fold_div))


# ---------------------------------------------------------------------------------------------
# MobileNetV2, the official flat layout

def _divisible(x: float, by: int = 8) -> int:
    return int(math.ceil(x / by) * by)


def mbv2_channels(width: float = 1.0) -> List[int]:
    """Output channels of features.1..17 at a width multiplier (the t = 1 block is unscaled)."""
    out = []
    for t, c, n, _ in MBV2_SETTING:
        out += [_divisible(c * width) if t > 1 else c] * n
    return out


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(inp * expand)
        self.use_res_connect = stride == 1 and inp == oup
        if expand == 1:
            self.conv = nn.Sequential(
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))
        else:
            self.conv = nn.Sequential(
                nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden),
                nn.ReLU6(inplace=True),
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """The official glance network. ``channels``: outputs of features.1..17 (default: the
    official rule at ``width``); ``input_channel`` the stem's, ``last_channel`` features.18's;
    ``classes``: the (unused) ImageNet classifier's size, None for none (inside a TSN);
    ``tsm_frames``: wrap the residual blocks' first convolution in TSM."""

    def __init__(self, width: float = 1.0, channels: Optional[Sequence[int]] = None,
                 input_channel: int = 32, last_channel: int = 1280,
                 classes: Optional[int] = 1000, tsm_frames: Optional[int] = None) -> None:
        super().__init__()
        channels = list(channels) if channels is not None else mbv2_channels(width)
        if len(channels) != sum(n for _, _, n, _ in MBV2_SETTING):
            raise ValueError(f"MobileNetV2 needs 17 block widths, got {len(channels)}")
        layers: List[nn.Module] = [nn.Sequential(
            nn.Conv2d(3, input_channel, 3, 2, 1, bias=False), nn.BatchNorm2d(input_channel),
            nn.ReLU6(inplace=True))]
        inp, k = input_channel, 0
        for t, _, n, s in MBV2_SETTING:
            for i in range(n):
                block = InvertedResidual(inp, channels[k], s if i == 0 else 1, t)
                if tsm_frames is not None and t > 1 and block.use_res_connect:
                    block.conv[0] = TemporalShift(block.conv[0], tsm_frames)
                layers.append(block)
                inp, k = channels[k], k + 1
        layers.append(nn.Sequential(nn.Conv2d(inp, last_channel, 1, 1, 0, bias=False),
                                    nn.BatchNorm2d(last_channel), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.last_channel = last_channel
        self.classifier = nn.Linear(last_channel, classes) if classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, last_channel, H/32, W/32)."""
        return self.features(x)


# ---------------------------------------------------------------------------------------------
# ResNet-50 (torchvision v1.5)

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1: nn.Module = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The official local network: ``planes`` per stage (official 64/128/256/512), ``inplanes``
    the stem's width, ``layers`` blocks per stage; ``classes`` the (unused) fc, None for none;
    ``tsm_frames``: wrap every block's conv1 in TSM."""

    def __init__(self, layers: Sequence[int] = RESNET50, planes: Sequence[int] = (64, 128, 256, 512),
                 inplanes: int = 64, classes: Optional[int] = 1000,
                 tsm_frames: Optional[int] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, inplanes, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (n, p, s) in enumerate(zip(layers, planes, (1, 2, 2, 2)), start=1):
            blocks = []
            for b in range(n):
                down = None
                if b == 0 and (s != 1 or inplanes != p * 4):
                    down = nn.Sequential(nn.Conv2d(inplanes, p * 4, 1, s, bias=False),
                                         nn.BatchNorm2d(p * 4))
                block = Bottleneck(inplanes, p, s if b == 0 else 1, down)
                if tsm_frames is not None:
                    block.conv1 = TemporalShift(block.conv1, tsm_frames)
                blocks.append(block)
                inplanes = p * 4
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.layers: List[nn.Module] = [getattr(self, f"layer{i}") for i in range(1, 5)]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = inplanes
        self.fc = nn.Linear(inplanes, classes) if classes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector (N, 4 * planes[-1])."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in self.layers:
            x = layer(x)
        return torch.flatten(self.avgpool(x), 1)


class TSN(nn.Module):
    """A TSM backbone with the two heads of the official TSN wrapper (dropout > 0): ``new_fc``
    and ``new_new_fc``, each averaged over the ``frames`` segments."""

    def __init__(self, base_model: nn.Module, feature_dim: int, classes: int, frames: int) -> None:
        super().__init__()
        self.base_model: Any = base_model
        self.new_fc = nn.Linear(feature_dim, classes)
        self.new_new_fc = nn.Linear(feature_dim, classes)
        self.frames = frames

    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-frame feature vectors (N*T, D), and the last feature map for MobileNetV2."""
        if isinstance(self.base_model, MobileNetV2):
            fmap = self.base_model(x)
            return fmap.mean([2, 3]), fmap
        return self.base_model(x), None

    def heads(self, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        c = self.new_fc.out_features
        return (self.new_fc(feat).view(-1, self.frames, c).mean(1),
                self.new_new_fc(feat).view(-1, self.frames, c).mean(1))


def _head(dim: int, classes: int) -> nn.Sequential:
    """``Sequential(Dropout, Linear)``: the official heads' layout (keys ``.1.weight``)."""
    return nn.Sequential(nn.Dropout(0.0), nn.Linear(dim, classes))


class MultiLayerPerceptron(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden),
                                    nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.layers(x.reshape(-1, shape[-1])).view(*shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# crops

def _interp(pos: torch.Tensor, length: int) -> torch.Tensor:
    """Bilinear weights with zero padding: (..., out, length), row j samples ``pos[..., j]``."""
    i = torch.arange(length, dtype=pos.dtype, device=pos.device)
    return torch.clamp(1 - (pos.unsqueeze(-1) - i).abs(), min=0)


def crop_resize(frames: torch.Tensor, y0: torch.Tensor, x0: torch.Tensor, h: torch.Tensor,
                w: torch.Tensor, out: int) -> torch.Tensor:
    """The official crop (``affine_grid`` + ``grid_sample``: bilinear, zero padding,
    ``align_corners=False``) written as two matrix products: output pixel j of (N, C, S, S)
    frames samples row ``y0 - 0.5 + (j + 0.5) h / out`` and column ``x0 - 0.5 + (j + 0.5) w /
    out``; y0, x0, h, w are per frame (N,). With h = w = out it is V2's fixed patch at (y0, x0)."""
    j = torch.arange(out, dtype=frames.dtype, device=frames.device)
    ry = _interp(y0[:, None] - 0.5 + (j + 0.5) * h[:, None] / out, frames.shape[-2])
    rx = _interp(x0[:, None] - 0.5 + (j + 0.5) * w[:, None] / out, frames.shape[-1])
    return torch.matmul(torch.matmul(ry.unsqueeze(1), frames), rx.transpose(1, 2).unsqueeze(1))


def fixed_patch(frames: torch.Tensor, action: torch.Tensor, patch: int) -> torch.Tensor:
    """V2's patch: (y, x) in [0, 1] places a patch x patch window at ``a (S - P)``."""
    s = frames.shape[-1]
    side = torch.full_like(action[:, 0], float(patch))
    return crop_resize(frames, action[:, 0] * (s - patch), action[:, 1] * (s - patch), side, side,
                       patch)


def scaled_patch(frames: torch.Tensor, action: torch.Tensor, patch: int, box_min: float,
                 box_max: float) -> torch.Tensor:
    """Uni-AdaFocus's box: (y, x, sy, sx) in [0, 1]; its sides are ``box_min + s (box_max -
    box_min)`` pixels (official: 96 and 224), resized to patch x patch."""
    s = frames.shape[-1]
    h = patch * (action[:, 2] * (box_max - box_min) / patch + box_min / patch)
    w = patch * (action[:, 3] * (box_max - box_min) / patch + box_min / patch)
    return crop_resize(frames, action[:, 0] * (s - h), action[:, 1] * (s - w), h, w, patch)


# ---------------------------------------------------------------------------------------------
# policies

class PolicySTN(nn.Module):
    """AdaFocusV2's policy: a per-frame encoder of the glance map, a GRU over the frames, and
    (y, x) per frame."""

    def __init__(self, channels: int, map_size: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 64, 1, bias=False), nn.BatchNorm2d(64), nn.Tanh(), nn.Flatten(),
            nn.Linear(64 * map_size * map_size, hidden), nn.BatchNorm1d(hidden), nn.Tanh())
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.fc = nn.Sequential(nn.Linear(hidden, 2), nn.Sigmoid())
        self.hidden = hidden

    def forward(self, fmap: torch.Tensor, frames: int) -> torch.Tensor:
        e = self.encoder(fmap).view(-1, frames, self.hidden)
        out, _ = self.gru(e)
        return self.fc(out.reshape(-1, self.hidden))                       # (N*T, 2)


class SpatialPolicy(nn.Module):
    """Uni-AdaFocus's box policy over the glance maps (N, C, G, h, w): (y, x, sy, sx) per glance
    frame (``depth`` 1), or one per video (``depth`` G, the TSM variant)."""

    def __init__(self, channels: int, hidden: int, map_size: int, depth: int = 1) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv3d(channels, hidden, 1, bias=False), nn.BatchNorm3d(hidden), nn.ReLU(inplace=True),
            nn.Conv3d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm3d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm3d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv3d(hidden, 4, (depth, map_size, map_size), bias=False), nn.Sigmoid())

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.encoder(maps).flatten(2)                                 # (N, 4, G or 1)


class TemporalPolicy(nn.Module):
    """Uni-AdaFocus's frame weights: temporal convolutions over the glance features (N, G, C)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.Tconv = nn.Sequential(
            nn.Conv2d(channels, hidden, (3, 1), padding=(1, 0), bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, (3, 1), padding=(1, 0), bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1, bias=False))

    def forward(self, g: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        x = self.Tconv(g.permute(0, 2, 1).unsqueeze(-1)).flatten(1)        # (N, G)
        return torch.softmax(x / temperature, dim=1)


def focus_indices(weights: torch.Tensor, frames: int, focus: int) -> torch.Tensor:
    """Uni-AdaFocus's focus frames at test time, deterministic: for u_i = (i + 0.5) / F, the
    linear inverse of the glance weights' CDF over G equal bins of [0, 1], scaled to ``frames``
    and floored; then made strictly increasing, each at most ``frames - F + i``. (N, F) int64."""
    n, g = weights.shape
    cdf = torch.cat([weights.new_zeros(n, 1), weights.cumsum(1)], 1)
    cdf[:, -1] = 1.0
    idx = []
    for i in range(focus):
        u = (i + 0.5) / focus
        k = ((cdf >= u).to(torch.int64).argmax(1) - 1).clamp(0, g - 1)      # cdf[k] < u <= cdf[k+1]
        ck = cdf.gather(1, k[:, None])[:, 0]
        ck1 = cdf.gather(1, (k + 1)[:, None])[:, 0]
        kf = k.to(weights.dtype)
        q = ((kf + 1) / g * (u - ck) - kf / g * (u - ck1)) / (ck1 - ck)
        idx.append(torch.floor(q * frames).to(torch.int64))
    for i in range(1, focus):
        idx[i] = torch.where(idx[i] > idx[i - 1], idx[i], idx[i - 1] + 1)
    return torch.stack([torch.clamp(v, max=frames - focus + i) for i, v in enumerate(idx)], 1)


def glance_boxes_to_frames(boxes: torch.Tensor, frames: int) -> torch.Tensor:
    """(N, 4, G) glance-frame boxes to (N, 4, T): ``F.interpolate(linear, align_corners=False)``."""
    return F.interpolate(boxes, size=frames, mode="linear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# the models

def _frames(x: torch.Tensor) -> torch.Tensor:
    """Clips (N, C, T, H, W) as frames (N*T, C, H, W), frame-major."""
    n, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(n * t, c, h, w)


class AdaFocusV2(nn.Module):
    """AdaFocusV2 (MobileNetV2 glance, ResNet-50 local, GRU policy, per-frame exits)."""

    def __init__(self, num_classes: int = 200, frames: int = 16, size: int = 224, patch: int = 128,
                 mbv2_width: float = 1.0, mbv2_channels: Optional[Sequence[int]] = None,
                 mbv2_input: int = 32, mbv2_last: int = 1280,
                 resnet_planes: Sequence[int] = (64, 128, 256, 512), resnet_inplanes: int = 64,
                 resnet_layers: Sequence[int] = RESNET50, policy_hidden: int = 2048,
                 mlp_hidden: int = 4096, imagenet_classes: Optional[int] = 1000) -> None:
        super().__init__()
        self.num_classes, self.frames, self.size, self.patch = num_classes, frames, size, patch
        heads = imagenet_classes
        self.global_CNN = MobileNetV2(mbv2_width, mbv2_channels, mbv2_input, mbv2_last, heads)
        self.global_CNN_fc = _head(mbv2_last, num_classes)
        self.local_CNN = ResNet(resnet_layers, resnet_planes, resnet_inplanes, heads)
        self.local_CNN_fc = _head(self.local_CNN.feature_dim, num_classes)
        self.policy_stn = PolicySTN(mbv2_last, _map_size(size), policy_hidden)
        self.classifier = PoolingClassifier(mbv2_last + self.local_CNN.feature_dim, mlp_hidden,
                                            num_classes, frames)

    def parts(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        n, t = x.shape[0], x.shape[2]
        frames = _frames(x)
        fmap = self.global_CNN(frames)
        g = fmap.mean([2, 3])
        actions = self.policy_stn(fmap, t)
        local = self.local_CNN(fixed_patch(frames, actions, self.patch))
        logits = self.classifier(g.view(n, t, -1), local.view(n, t, -1))
        return {"global_feat": g, "actions": actions, "local_feat": local,
                "global_logits": self.global_CNN_fc(g), "local_logits": self.local_CNN_fc(local),
                "exit_logits": logits}

    def stage_logits(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The prediction at each exit: after every frame."""
        return list(self.parts(x)["exit_logits"].unbind(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_logits(x)[-1]


class PoolingClassifier(nn.Module):
    """AdaFocusV2's classifier: ``cur_t = max(mlp([g_t, l_t]), cur_{t-1})`` (from frame 0's
    own value), one head per frame."""

    def __init__(self, dim: int, hidden: int, classes: int, frames: int) -> None:
        super().__init__()
        self.mlp = MultiLayerPerceptron(dim, hidden)
        self.classifiers = nn.ModuleList([_head(hidden, classes) for _ in range(frames)])

    def forward(self, g: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        z = self.mlp(torch.cat([g, local], -1))                              # (N, T, hidden)
        cur, out = z[:, 0], []
        for t in range(z.shape[1]):
            cur = torch.maximum(z[:, t], cur)
            out.append(self.classifiers[t](cur))
        return torch.stack(out, 1)


class UniPoolingClassifier(nn.Module):
    """Uni-AdaFocus's classifier: a running max over the glance frames (``global_mlp``, one head
    per glance frame) and one over the focus frames (``local_mlp``), whose heads read
    ``[focus max, final glance max]``."""

    def __init__(self, global_dim: int, local_dim: int, hidden: int, classes: int, glance: int,
                 focus: int) -> None:
        super().__init__()
        self.global_mlp = MultiLayerPerceptron(global_dim, hidden)
        self.local_mlp = MultiLayerPerceptron(local_dim, hidden)
        self.global_classifiers = nn.ModuleList([_head(hidden, classes) for _ in range(glance)])
        self.local_classifiers = nn.ModuleList([_head(2 * hidden, classes) for _ in range(focus)])

    def glance(self, g: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        z1 = self.global_mlp(g)
        c1, out = z1[:, 0], []
        for s in range(z1.shape[1]):
            c1 = torch.maximum(z1[:, s], c1)
            out.append(self.global_classifiers[s](c1))
        return c1, out

    def forward(self, g: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        c1, out = self.glance(g)
        z2 = self.local_mlp(local)
        c2 = z2[:, 0]
        for f in range(z2.shape[1]):
            c2 = torch.maximum(z2[:, f], c2)
            out.append(self.local_classifiers[f](torch.cat([c2, c1], 1)))
        return torch.stack(out, 1)


def _map_size(size: int) -> int:
    """MobileNetV2's last feature map side for ``size`` input pixels (five stride-2 stages)."""
    for _ in range(5):
        size = (size + 1) // 2
    return size


class UniAdaFocus(nn.Module):
    """Uni-AdaFocus (MobileNetV2 glance over G frames, spatial and temporal policies, ResNet-50 on
    F focus frames; exits after the glance and after every focus frame)."""

    def __init__(self, num_classes: int = 200, frames: int = 48, glance: int = 16, focus: int = 16,
                 size: int = 224, patch: int = 128, box_min: float = 96, box_max: float = 224,
                 mbv2_width: float = 1.0, mbv2_channels: Optional[Sequence[int]] = None,
                 mbv2_input: int = 32, mbv2_last: int = 1280,
                 resnet_planes: Sequence[int] = (64, 128, 256, 512), resnet_inplanes: int = 64,
                 resnet_layers: Sequence[int] = RESNET50, spatial_hidden: int = 128,
                 temporal_hidden: int = 64, mlp_hidden: int = 4096, temperature: float = 1.0,
                 imagenet_classes: Optional[int] = 1000) -> None:
        super().__init__()
        if frames % glance or focus > frames:
            raise ValueError(f"glance {glance} must divide frames {frames} and focus {focus} "
                             "must not exceed it")
        self.num_classes, self.frames, self.glance_frames, self.focus = num_classes, frames, glance, focus
        self.size, self.patch, self.box_min, self.box_max = size, patch, box_min, box_max
        self.temperature = temperature
        heads = imagenet_classes
        self.global_CNN = MobileNetV2(mbv2_width, mbv2_channels, mbv2_input, mbv2_last, heads)
        self.global_CNN_fc = _head(mbv2_last, num_classes)
        self.aux_fc = nn.Linear(mbv2_last, num_classes)
        self.local_CNN = ResNet(resnet_layers, resnet_planes, resnet_inplanes, heads)
        self.local_CNN_fc = _head(self.local_CNN.feature_dim, num_classes)
        self.spatial_policy = SpatialPolicy(mbv2_last, spatial_hidden, _map_size(size))
        self.temporal_policy = TemporalPolicy(mbv2_last, temporal_hidden)
        self.classifier = UniPoolingClassifier(mbv2_last, self.local_CNN.feature_dim, mlp_hidden,
                                               num_classes, glance, focus)

    @property
    def glance_index(self) -> List[int]:
        return list(range(self.frames))[1::self.frames // self.glance_frames]

    def glance_part(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The glance: features, boxes for every frame, frame weights and the focus frames."""
        n, g = x.shape[0], self.glance_frames
        fmap = self.global_CNN(_frames(x[:, :, self.glance_index]))
        gfeat = fmap.mean([2, 3])
        boxes = self.spatial_policy(fmap.view(n, g, *fmap.shape[1:]).transpose(1, 2))   # (N, 4, G)
        weights = self.temporal_policy(gfeat.view(n, g, -1), self.temperature)
        index = focus_indices(weights, self.frames, self.focus)
        all_boxes = glance_boxes_to_frames(boxes, self.frames)                          # (N, 4, T)
        focus_boxes = all_boxes.gather(2, index[:, None, :].expand(n, 4, self.focus))   # (N, 4, F)
        return {"fmap": fmap, "global_feat": gfeat, "boxes": boxes, "weights": weights,
                "focus_index": index, "focus_boxes": focus_boxes.transpose(1, 2)}

    def parts(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        n = x.shape[0]
        p = self.glance_part(x)
        frames = x.transpose(1, 2)                                                     # (N, T, C, H, W)
        chosen = frames.gather(1, p["focus_index"][:, :, None, None, None].expand(
            -1, -1, *frames.shape[2:]))
        patches = scaled_patch(chosen.reshape(-1, *frames.shape[2:]),
                               p["focus_boxes"].reshape(-1, 4), self.patch, self.box_min,
                               self.box_max)
        local = self.local_CNN(patches)
        logits = self.classifier(p["global_feat"].view(n, self.glance_frames, -1),
                                 local.view(n, self.focus, -1))
        p.update(local_feat=local, all_logits=logits,
                 exit_logits=logits[:, -(self.focus + 1):],
                 global_logits=self.global_CNN_fc(p["global_feat"]),
                 local_logits=self.local_CNN_fc(local))
        return p

    def stage_logits(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The prediction at each exit: the glance's (its last global head), then after every
        focus frame."""
        return list(self.parts(x)["exit_logits"].unbind(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_logits(x)[-1]


class AdaFocusV2TSM(nn.Module):
    """AdaFocusV2 on Something-Something: TSN(MobileNetV2 + TSM) glances at ``frames`` frames, an
    MLP places one patch per video, TSN(ResNet-50 + TSM) reads it on ``focus_frames`` (official:
    1.5x) frames; the prediction is the sum of both TSNs' ``new_fc`` averages. The clip holds the
    glance frames, then the focus frames."""

    def __init__(self, num_classes: int = 174, frames: int = 8, focus_frames: Optional[int] = None,
                 size: int = 224, patch: int = 144, mbv2_width: float = 1.0,
                 mbv2_channels: Optional[Sequence[int]] = None, mbv2_input: int = 32,
                 mbv2_last: int = 1280, resnet_planes: Sequence[int] = (64, 128, 256, 512),
                 resnet_inplanes: int = 64, resnet_layers: Sequence[int] = RESNET50,
                 policy_hidden: Sequence[int] = (1024, 512)) -> None:
        super().__init__()
        self.num_classes, self.glance_frames, self.size, self.patch = num_classes, frames, size, patch
        self.focus_frames = focus_frames if focus_frames is not None else int(1.5 * frames)
        self.frames = self.glance_frames + self.focus_frames
        mbv2 = MobileNetV2(mbv2_width, mbv2_channels, mbv2_input, mbv2_last, None, frames)
        self.global_CNN = TSN(mbv2, mbv2_last, num_classes, frames)
        res = ResNet(resnet_layers, resnet_planes, resnet_inplanes, None, self.focus_frames)
        self.local_CNN = TSN(res, res.feature_dim, num_classes, self.focus_frames)
        m = _map_size(size)
        h1, h2 = policy_hidden
        self.policy_stn = nn.Sequential(
            nn.Conv2d(mbv2_last * frames, 64, 1, bias=False), nn.BatchNorm2d(64), nn.Tanh(),
            nn.Flatten(), nn.Linear(64 * m * m, h1), nn.BatchNorm1d(h1), nn.Tanh(),
            nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.Tanh(), nn.Linear(h2, 2), nn.Sigmoid())

    def parts(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        n, t = x.shape[0], self.glance_frames
        gfeat, fmap = self.global_CNN.features(_frames(x[:, :, :t]))
        assert fmap is not None
        gl, gr = self.global_CNN.heads(gfeat)
        action = self.policy_stn(fmap.reshape(n, t * fmap.shape[1], *fmap.shape[2:]))
        focus = x[:, :, t:]
        patches = fixed_patch(focus.transpose(1, 2).reshape(n, -1, *focus.shape[3:]), action,
                              self.patch)
        lfeat, _ = self.local_CNN.features(patches.reshape(-1, 3, self.patch, self.patch))
        ll, lr = self.local_CNN.heads(lfeat)
        return {"global_feat": gfeat, "global_logit": gl, "global_reg_logit": gr,
                "action": action, "local_feat": lfeat, "local_logit": ll, "local_reg_logit": lr,
                "logit": gl + ll}

    def stage_logits(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [self.parts(x)["logit"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts(x)["logit"]


class UniAdaFocusTSM(nn.Module):
    """Uni-AdaFocus on Something-Something: TSN(MobileNetV2 + TSM) glances at ``glance`` frames;
    one box per video and ``focus`` of the ``input_frames`` focus-clip frames (temporal policy);
    TSN(ResNet-50 + TSM over the focus frames). Exits: the glance TSN's ``new_new_fc`` average,
    then the sum of both ``new_fc`` averages. The clip holds the glance frames, then the input
    frames."""

    def __init__(self, num_classes: int = 174, glance: int = 8, input_frames: int = 24,
                 focus: int = 8, size: int = 224, patch: int = 144, box_min: float = 96,
                 box_max: float = 224, mbv2_width: float = 1.0,
                 mbv2_channels: Optional[Sequence[int]] = None, mbv2_input: int = 32,
                 mbv2_last: int = 1280, resnet_planes: Sequence[int] = (64, 128, 256, 512),
                 resnet_inplanes: int = 64, resnet_layers: Sequence[int] = RESNET50,
                 spatial_hidden: int = 128, temporal_hidden: int = 64) -> None:
        super().__init__()
        self.num_classes, self.glance_frames, self.input_frames, self.focus = \
            num_classes, glance, input_frames, focus
        self.frames = glance + input_frames
        self.size, self.patch, self.box_min, self.box_max = size, patch, box_min, box_max
        mbv2 = MobileNetV2(mbv2_width, mbv2_channels, mbv2_input, mbv2_last, None, glance)
        self.global_CNN = TSN(mbv2, mbv2_last, num_classes, glance)
        res = ResNet(resnet_layers, resnet_planes, resnet_inplanes, None, focus)
        self.local_CNN = TSN(res, res.feature_dim, num_classes, focus)
        self.aux_fc = nn.Linear(mbv2_last, num_classes)
        self.spatial_policy = SpatialPolicy(mbv2_last, spatial_hidden, _map_size(size), glance)
        self.temporal_policy = TemporalPolicy(mbv2_last, temporal_hidden)

    def parts(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        n, g = x.shape[0], self.glance_frames
        gfeat, fmap = self.global_CNN.features(_frames(x[:, :, :g]))
        assert fmap is not None
        gfinal, gavg = self.global_CNN.heads(gfeat)
        action = self.spatial_policy(fmap.view(n, g, *fmap.shape[1:]).transpose(1, 2))[:, :, 0]
        weights = self.temporal_policy(gfeat.view(n, g, -1), 1.0)
        index = focus_indices(weights, self.input_frames, self.focus)
        frames = x[:, :, g:].transpose(1, 2)                                        # (N, Ti, C, H, W)
        chosen = frames.gather(1, index[:, :, None, None, None].expand(-1, -1, *frames.shape[2:]))
        patches = scaled_patch(chosen.reshape(n, -1, *frames.shape[3:]), action, self.patch,
                               self.box_min, self.box_max)
        lfeat, _ = self.local_CNN.features(patches.reshape(-1, 3, self.patch, self.patch))
        lfinal, lavg = self.local_CNN.heads(lfeat)
        return {"global_feat": gfeat, "global_final_logit": gfinal, "global_avg_logit": gavg,
                "spatial_action": action, "temporal_weights": weights, "focus_index": index,
                "local_feat": lfeat, "local_final_logit": lfinal, "logit": gfinal + lfinal}

    def stage_logits(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The prediction at each exit: the glance TSN's ``new_new_fc`` average, then the sum."""
        p = self.parts(x)
        return [p["global_avg_logit"], p["logit"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts(x)["logit"]


__all__ = ["AdaFocusV2", "UniAdaFocus", "AdaFocusV2TSM", "UniAdaFocusTSM", "MobileNetV2", "ResNet",
           "TSN", "TemporalShift", "temporal_shift", "crop_resize", "fixed_patch", "scaled_patch",
           "focus_indices", "glance_boxes_to_frames", "mbv2_channels", "IMAGENET_MEAN",
           "IMAGENET_STD"]


# ---------------------------------------------------------------------------------------------
# official checkpoints

VARIANTS = ("adafocus_v2", "adafocus_v2_tsm", "uni_adafocus", "uni_adafocus_tsm")


def _mbv2_config(state: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    channels = []
    for i in range(1, 18):
        last = f"{prefix}features.{i}.conv.6.weight"
        if last not in state:
            last = f"{prefix}features.{i}.conv.3.weight"
        if last not in state:
            raise ValueError(f"no MobileNetV2 block features.{i} under {prefix or 'the top'}")
        channels.append(int(state[last].shape[0]))
    return {"mbv2_channels": channels, "mbv2_input": int(state[f"{prefix}features.0.0.weight"].shape[0]),
            "mbv2_last": int(state[f"{prefix}features.18.0.weight"].shape[0])}


def _resnet_config(state: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    planes, layers = [], []
    for i in range(1, 5):
        n = 0
        while f"{prefix}layer{i}.{n}.bn1.weight" in state:
            n += 1
        if n == 0:
            raise ValueError(f"no ResNet stage layer{i} under {prefix}")
        layers.append(n)
        planes.append(int(state[f"{prefix}layer{i}.0.bn1.weight"].shape[0]))
    if f"{prefix}layer1.0.conv3.weight" not in state and f"{prefix}layer1.0.conv3.net.weight" not in state:
        raise ValueError("the local network is not a Bottleneck ResNet (no conv3): AdaFocus's is "
                         "ResNet-50")
    return {"resnet_planes": planes, "resnet_layers": layers,
            "resnet_inplanes": int(state[f"{prefix}conv1.weight"].shape[0])}


def _count(state: Dict[str, Any], prefix: str) -> int:
    n = 0
    while f"{prefix}{n}.1.weight" in state:
        n += 1
    return n


def _map_from(pixels: int) -> int:
    """The input size whose MobileNetV2 map is ``pixels`` wide (the official 7 -> 224)."""
    return 32 * pixels


def official_variant(state: Dict[str, Any]) -> Optional[str]:
    """Which official AdaFocus model a state dict (``module.`` stripped) is, or None."""
    keys = set(state)
    tsn = "global_CNN.base_model.features.0.0.weight" in keys
    if "policy_stn.gru.weight_ih_l0" in keys:
        return "adafocus_v2"
    if tsn and "policy_stn.0.weight" in keys:
        return "adafocus_v2_tsm"
    if "spatial_policy.encoder.0.weight" in keys:
        return "uni_adafocus_tsm" if tsn else "uni_adafocus"
    return None


def official_config(state: Dict[str, Any], variant: str) -> Dict[str, Any]:
    """The builder config of an official checkpoint, read from its tensors (what they do not
    hold: the frames of Uni-AdaFocus's input, the patch size and the box bounds, comes from the
    caller)."""
    if variant in ("adafocus_v2", "uni_adafocus"):
        cfg = _mbv2_config(state, "global_CNN.")
        cfg.update(_resnet_config(state, "local_CNN."))
        cfg["num_classes"] = int(state["global_CNN_fc.1.weight"].shape[0])
        cfg["imagenet_classes"] = int(state["global_CNN.classifier.weight"].shape[0]) \
            if "global_CNN.classifier.weight" in state else None
    else:
        cfg = _mbv2_config(state, "global_CNN.base_model.")
        cfg.update(_resnet_config(state, "local_CNN.base_model."))
        cfg["num_classes"] = int(state["global_CNN.new_fc.weight"].shape[0])
    if variant == "adafocus_v2":
        m = int(round(math.sqrt(state["policy_stn.encoder.4.weight"].shape[1] / 64)))
        cfg.update(frames=_count(state, "classifier.classifiers."), size=_map_from(m),
                   policy_hidden=int(state["policy_stn.gru.weight_hh_l0"].shape[1]),
                   mlp_hidden=int(state["classifier.mlp.layers.0.weight"].shape[0]))
    elif variant == "adafocus_v2_tsm":
        frames = int(state["policy_stn.0.weight"].shape[1]) // cfg["mbv2_last"]
        m = int(round(math.sqrt(state["policy_stn.4.weight"].shape[1] / 64)))
        cfg.update(frames=frames, size=_map_from(m),
                   policy_hidden=[int(state["policy_stn.4.weight"].shape[0]),
                                  int(state["policy_stn.7.weight"].shape[0])])
    else:
        last = state["spatial_policy.encoder.9.weight"]                  # (4, h, depth, m, m)
        cfg.update(size=_map_from(int(last.shape[-1])),
                   spatial_hidden=int(state["spatial_policy.encoder.0.weight"].shape[0]),
                   temporal_hidden=int(state["temporal_policy.Tconv.0.weight"].shape[0]))
        if variant == "uni_adafocus":
            cfg.update(glance=_count(state, "classifier.global_classifiers."),
                       focus=_count(state, "classifier.local_classifiers."),
                       mlp_hidden=int(state["classifier.global_mlp.layers.0.weight"].shape[0]))
        else:
            cfg.update(glance=int(last.shape[2]))
    return cfg


def official_checkpoint(state: Any, meta: Any, name: Optional[str]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """An official AdaFocusV2 / Uni-AdaFocus file: its variant and config, read from the tensors.
    A given ``name`` must agree with the variant the file holds."""
    variant = official_variant(dict(state))
    if variant is None:
        return None
    if name is not None and name != variant:
        raise ValueError(f"this is an official {variant} checkpoint, not {name}")
    return variant, official_config(dict(state), variant)


def module_fit(model: nn.Module, state: Dict[str, Any]) -> Dict[str, str]:
    """Per module of ``model`` (with parameters or buffers of its own), whether ``state`` holds
    all of its tensors with their shapes: ``"ok"``, or what is wrong."""
    out: Dict[str, str] = {}
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        own.update(dict(module.named_buffers(recurse=False)))
        if not own:
            continue
        problems = []
        for key, tensor in own.items():
            full = f"{name}.{key}" if name else key
            if full not in state:
                problems.append(f"{key} missing")
            elif tuple(state[full].shape) != tuple(tensor.shape):
                problems.append(f"{key} is {tuple(state[full].shape)}, expected {tuple(tensor.shape)}")
        out[name] = "ok" if not problems else "; ".join(problems)
    return out


def load_whole_modules(model: nn.Module, state: Dict[str, Any], source: str,
                       partial: bool = False) -> Dict[str, str]:
    """Load ``state`` into ``model`` module by module: each module takes all of its tensors or
    none. Strict (default): the first module that does not fit, or any tensor the model has no
    place for, fails the load naming it. ``partial=True``: modules that fit load whole, the others
    keep their values; returns per module ``"loaded"`` or why not (a module is never half-loaded)."""
    from ..errors import CheckpointError
    fit = module_fit(model, state)
    known = set(model.state_dict())
    extra = sorted(set(state) - known)
    if not partial:
        bad = next(((m, why) for m, why in fit.items() if why != "ok"), None)
        if bad is not None:
            raise CheckpointError(f"checkpoint {source} does not fit {type(model).__name__}: module "
                                  f"{bad[0] or '(top)'}: {bad[1]}")
        if extra:
            raise CheckpointError(f"checkpoint {source} holds tensors {type(model).__name__} has "
                                  f"no place for: {', '.join(extra[:6])}"
                                  f"{' ...' if len(extra) > 6 else ''}")
        model.load_state_dict(state, strict=True)
        return {m: "loaded" for m in fit}
    take = {}
    report = {}
    for m, why in fit.items():
        if why == "ok":
            module = model.get_submodule(m) if m else model
            for key, _ in list(module.named_parameters(recurse=False)) + \
                    list(module.named_buffers(recurse=False)):
                full = f"{m}.{key}" if m else key
                take[full] = state[full]
            report[m] = "loaded"
        else:
            report[m] = why
    model.load_state_dict(take, strict=False)
    return report


def _builder(cls: Any, name: str) -> Any:
    def build(**config: Any) -> nn.Module:
        return cls(**config)
    build.__name__ = name
    build.__doc__ = cls.__doc__
    return build


adafocus_v2 = _builder(AdaFocusV2, "adafocus_v2")
uni_adafocus = _builder(UniAdaFocus, "uni_adafocus")
adafocus_v2_tsm = _builder(AdaFocusV2TSM, "adafocus_v2_tsm")
uni_adafocus_tsm = _builder(UniAdaFocusTSM, "uni_adafocus_tsm")

def _adafocus_v3(**config: Any) -> nn.Module:
    from .adafocus_v3 import adafocus_v3
    return adafocus_v3(**config)


_adafocus_v3.__doc__ = "adaedge's AdaFocusV3 reading (cubes; :mod:`adaedge.models.adafocus_v3`)."

FAMILY = Family(
    name="adafocus", title="AdaFocus",
    builders={"adafocus_v2": adafocus_v2, "uni_adafocus": uni_adafocus,
              "adafocus_v2_tsm": adafocus_v2_tsm, "uni_adafocus_tsm": uni_adafocus_tsm,
              "adafocus_v3": _adafocus_v3},
    exporter="adaedge.export.adafocus:export_adafocus",
    executions=(("stages", "the glance and one piece per focus stage, with an exit after each"),),
    official=official_checkpoint,
    checkpoint_help="official AdaFocusV2, AdaFocusV2-TSM, Uni-AdaFocus and Uni-AdaFocus-TSM "
                    "checkpoints (give patch; Uni-AdaFocus: frames; Uni-AdaFocus-TSM: "
                    "input_frames and focus)",
    official_needs={"adafocus_v2": {"patch": "128"},
                     "adafocus_v2_tsm": {"patch": "144"},
                     "uni_adafocus": {"patch": "128", "frames": "48"},
                     "uni_adafocus_tsm": {"patch": "144", "input_frames": "24", "focus": "8"}},
    trainer="adaedge.training.adafocus:main",
    verify_rtol=1e-3,
    verify_clips="smooth",
    verify_rtol_why="patch positions come from network features: float32 rounding there (1e-5, "
                    "batch norms folded) moves a patch by about 1e-4 pixel, which the local "
                    "network amplifies to up to 5e-4 in the scores; each piece fed the "
                    "reference's inputs matches within 1e-4",
)

__all__ += ["adafocus_v2", "uni_adafocus", "adafocus_v2_tsm", "uni_adafocus_tsm", "VARIANTS", "FAMILY",
            "official_variant", "official_config", "official_checkpoint", "module_fit",
            "load_whole_modules"]
