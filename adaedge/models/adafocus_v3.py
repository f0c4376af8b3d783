"""AdaFocusV3 (Wang et al., ECCV 2022): glance, focus on cubes, exit early.

A light global network glances at the whole clip (every frame, downsampled); a policy network
places all ``num_cubes`` cubes at once from the glance's features; an expensive local network
encodes the cubes one by one; after the glance and after every cube a classifier predicts from
everything seen so far, and inference may stop there (``adaedge calibrate exits`` solves the
thresholds for a budget).

    glance:  g = mean_t GAP(global_CNN(frames)),  logits_0 = global_CNN_fc(g)
             centres = policy(mean_t global_CNN(frames))              (N, K, 3) in [0, 1]
             s_0 = mlp([g, 0])                                        the classifier's state
    cube k:  f_k = mean over the cube's frames of GAP(local_CNN(crop(clip, centres[:, k])))
             s_k = max(s_{k-1}, mlp([g, f_k]))   (feature reuse of the glance, running max)
             logits_k = classifiers[k-1](s_k)

This is adaedge's own reading of the AdaFocusV3 paper: no official AdaFocusV3 code exists (the
Uni-AdaFocus repository is the series' code, and its model, with integer focus frames and 2-D
boxes, is :class:`adaedge.models.adafocus.UniAdaFocus`). Its modules use torchvision's MobileNetV2
and BasicBlock ResNet layouts and its own temporal shift (channels [0, C/8) from frame t-1), so no
official checkpoint loads into it: load those with ``models.load_model``, which builds the
official variant they hold. It is the small model of adaedge's own early-exit benchmarks.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..nn.focus import crop_cube

MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))
SMALL_GLANCE = ((1, 16, 1, 1), (6, 24, 1, 2), (6, 32, 2, 2), (6, 64, 1, 1))  # stride 8
RESNET_LAYERS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def temporal_shift(x: torch.Tensor, frames: int, fold_div: int = 8) -> torch.Tensor:
    """TSM's shift (Lin et al., ICCV 2019) on frames folded into the batch (N*T, C, H, W): the
    first C/8 channels of frame t come from frame t-1, the next C/8 from frame t+1 (zeros at the
    ends), the rest stay. It costs no FLOPs and lets 2D encoders see motion."""
    nt, c, h, w = x.shape
    fold = c // fold_div
    v = x.reshape(nt // frames, frames, c, h, w)
    zero = v.new_zeros(v.shape[0], 1, fold, h, w)
    past = torch.cat([zero, v[:, :-1, :fold]], dim=1)
    future = torch.cat([v[:, 1:, fold:2 * fold], zero], dim=1)
    return torch.cat([past, future, v[:, :, 2 * fold:]], dim=2).reshape(nt, c, h, w)


def _divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups,
                                   bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_res_connect = stride == 1 and cin == cout
        layers: List[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel=1))
        layers += [ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.shift_frames = 0   # > 0: temporal shift of the residual branch's input over this many

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_res_connect:
            return self.conv(x)
        branch = temporal_shift(x, self.shift_frames) if self.shift_frames else x
        return x + self.conv(branch)


class MobileNetV2(nn.Module):
    """MobileNetV2's layout (torchvision's names): ``features`` only; ``last_channel`` outputs."""

    def __init__(self, width_mult: float = 1.0,
                 setting: Sequence[Sequence[int]] = MOBILENET_V2, last_channel: int = 1280) -> None:
        super().__init__()
        cin = _divisible(32 * width_mult)
        self.last_channel = _divisible(last_channel * max(1.0, width_mult))
        layers: List[nn.Module] = [ConvBNReLU(3, cin, stride=2)]
        for t, c, n, s in setting:
            cout = _divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(ConvBNReLU(cin, self.last_channel, kernel=1))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.shift_frames = 0   # > 0: temporal shift of the residual branch's input over this many

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        branch = temporal_shift(x, self.shift_frames) if self.shift_frames else x
        out = self.relu(self.bn1(self.conv1(branch)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """ResNet's layout with basic blocks (torchvision's names), no ``fc``; ``out_dim`` outputs."""

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), width: int = 64,
                 maxpool: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if maxpool else nn.Identity()
        cin = width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != planes:
                down = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes))
            blocks = [BasicBlock(cin, planes, stride, down)]
            blocks += [BasicBlock(planes, planes) for _ in range(int(n) - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes
        self.out_dim = cin
        self.num_layers = len(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_layers):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


class Policy(nn.Module):
    """All cube centres at once from the glance's (time-averaged) feature map: (N, K, 3) in [0, 1]."""

    def __init__(self, feature_dim: int, map_size: int, hidden: int, num_cubes: int) -> None:
        super().__init__()
        self.num_cubes = num_cubes
        self.encoder = nn.Sequential(
            nn.Conv2d(feature_dim, 64, 1, bias=False), nn.BatchNorm2d(64), nn.Tanh(), nn.Flatten(),
            nn.Linear(64 * map_size * map_size, hidden), nn.BatchNorm1d(hidden), nn.Tanh())
        self.fc = nn.Sequential(nn.Linear(hidden, 3 * num_cubes), nn.Sigmoid())

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(fmap)).view(-1, self.num_cubes, 3)


class MultiLayerPerceptron(nn.Module):
    def __init__(self, input_dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Classifier(nn.Module):
    """``mlp`` over [glance feature, cube feature], running max state, one linear head per cube."""

    def __init__(self, input_dim: int, hidden: int, num_cubes: int, num_classes: int,
                 dropout: float) -> None:
        super().__init__()
        self.mlp = MultiLayerPerceptron(input_dim, hidden)
        self.classifiers = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))
            for _ in range(num_cubes))


class AdaFocusV3(nn.Module):
    def __init__(self, num_classes: int = 10, frames: int = 8, size: int = 32,
                 glance_size: int = 16, cube: Sequence[int] = (4, 24, 24), num_cubes: int = 3,
                 global_width: float = 0.5,
                 global_setting: Sequence[Sequence[int]] = SMALL_GLANCE,
                 global_last_channel: int = 256, local_layers: Sequence[int] = (1, 1, 1, 1),
                 local_width: int = 32, local_maxpool: bool = True, policy_hidden: int = 64,
                 hidden: int = 128, dropout: float = 0.0, temporal_shift: bool = True) -> None:
        super().__init__()
        if size % glance_size:
            raise ValueError(f"glance_size {glance_size} must divide size {size}")
        if len(cube) != 3 or not (1 <= cube[0] <= frames and 1 <= cube[1] <= size
                                  and 1 <= cube[2] <= size):
            raise ValueError(f"cube (frames, height, width) {list(cube)} must fit in "
                             f"{(frames, size, size)}")
        if num_cubes < 1:
            raise ValueError("num_cubes must be at least 1")
        self.num_classes, self.frames, self.size = int(num_classes), int(frames), int(size)
        self.glance_size, self.cube, self.num_cubes = int(glance_size), tuple(int(c) for c in cube), \
            int(num_cubes)
        self.global_CNN = MobileNetV2(global_width, global_setting, global_last_channel)
        gdim = self.global_CNN.last_channel
        self.global_CNN_fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(gdim, num_classes))
        self.local_CNN = ResNet(local_layers, local_width, local_maxpool)
        ldim = self.local_CNN.out_dim
        self.local_CNN_fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(ldim, num_classes))
        self.global_CNN.eval()
        with torch.no_grad():
            map_size = self.global_CNN(torch.zeros(1, 3, glance_size, glance_size)).shape[-1]
        self.global_CNN.train()
        self.map_size = int(map_size)   # the glance's feature map is map_size x map_size
        self.policy = Policy(gdim, self.map_size, policy_hidden, num_cubes)
        self.classifier = Classifier(gdim + ldim, hidden, num_cubes, num_classes, dropout)
        self.global_dim, self.local_dim, self.hidden = gdim, ldim, int(hidden)
        self.temporal_shift = bool(temporal_shift)
        if temporal_shift:   # TSM in both encoders (the Sth-Sth variants of AdaFocus use TSM)
            for m in self.global_CNN.modules():
                if isinstance(m, InvertedResidual):
                    m.shift_frames = self.frames
            for m in self.local_CNN.modules():
                if isinstance(m, BasicBlock):
                    m.shift_frames = self.cube[0]

    # -- the stages ----------------------------------------------------------------------------
    def glance(self, clip: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Global feature ``g``, cube ``centres``, the classifier's ``state`` and ``logits``."""
        n, c, t, h, w = clip.shape
        frames = clip.transpose(1, 2).reshape(n * t, c, h, w)
        factor = self.size // self.glance_size
        if factor > 1:
            frames = nn.functional.avg_pool2d(frames, factor)
        fmap = self.global_CNN(frames)
        fmap = fmap.reshape(n, t, *fmap.shape[1:]).mean(dim=1)          # (N, Cg, h, w)
        g = fmap.mean(dim=(2, 3))
        centres = self.policy(fmap)
        state = self.classifier.mlp(torch.cat([g, g.new_zeros(n, self.local_dim)], dim=1))
        return {"g": g, "centres": centres, "state": state, "logits": self.global_CNN_fc(g)}

    def local_feature(self, clip: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        cube = crop_cube(clip, centre, self.cube)                         # (N, C, ct, ch, cw)
        n, c, ct, ch, cw = cube.shape
        fmap = self.local_CNN(cube.transpose(1, 2).reshape(n * ct, c, ch, cw))
        return fmap.mean(dim=(2, 3)).reshape(n, ct, -1).mean(dim=1)

    def focus(self, k: int, clip: torch.Tensor, g: torch.Tensor, centres: torch.Tensor,
              state: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Cube ``k`` (1-based): the new state and the prediction from everything seen so far."""
        f = self.local_feature(clip, centres[:, k - 1])
        state = torch.maximum(state, self.classifier.mlp(torch.cat([g, f], dim=1)))
        return {"state": state, "logits": self.classifier.classifiers[k - 1](state)}

    def stage_logits(self, clip: torch.Tensor) -> List[torch.Tensor]:
        """Predictions after the glance and after each cube: ``num_cubes + 1`` of (N, classes)."""
        out = self.glance(clip)
        logits = [out["logits"]]
        state = out["state"]
        for k in range(1, self.num_cubes + 1):
            step = self.focus(k, clip, out["g"], out["centres"], state)
            state = step["state"]
            logits.append(step["logits"])
        return logits

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        """The prediction after all cubes (no early exit)."""
        return self.stage_logits(clip)[-1]


def adafocus_v3(**config: Any) -> AdaFocusV3:
    """AdaFocusV3 (defaults: a small model for 8x32x32 clips; see :class:`AdaFocusV3`).

    ``local_depth`` (10, 18, 34) is a shorthand for ``local_layers``.
    """
    depth = config.pop("local_depth", None)
    if depth is not None:
        if depth not in RESNET_LAYERS:
            raise ValueError(f"local_depth {depth} is not one of {sorted(RESNET_LAYERS)}")
        config["local_layers"] = RESNET_LAYERS[depth]
    return AdaFocusV3(**config)


# Parts of an official AdaFocus checkpoint that correspond to ours.
__all__ = ["AdaFocusV3", "adafocus_v3", "crop_cube"]
