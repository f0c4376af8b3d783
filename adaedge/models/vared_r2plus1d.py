"""VA-RED² R(2+1)D-18: Tran et al.'s (2+1)D ResNet-18 with every convolution dynamic.

Layout (Tran et al., CVPR 2018, as in torchvision's ``r2plus1d_18``): a stem of a 1x7x7 spatial and
a 3x1x1 temporal convolution, four stages of two basic blocks, each block two (2+1)D convolutions
(1x3x3 spatial to M_i filters, then 3x1x1 temporal), M_i = floor(t d^2 N_{i-1} N_i /
(d^2 N_{i-1} + t N_i)); stages 2-4 halve time and space, with a 1x1x1 strided projection on the
shortcut. Every convolution here is a :class:`~adaedge.nn.DynamicConv3d` (convolution + batch norm
+ gate + cheap operations); filter counts are rounded to a multiple of 2^(S-1) so that every
channel branch computes a whole number of filters (the stem's 45 filters become 46 at S = 2).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import torch
from torch import nn

from ..nn.vared import DynamicConv3d, Triple, clip_motion, efficiency_loss, motion_features
from .registry import Family


def _round_channels(c: float, step: int) -> int:
    return max(step, int(c / step + 0.5) * step)  # half up: 45 -> 46 at step 2


def _dynamic_conv(search_space: int, gate_full_bias: float, temporal_padding: str = "zeros",
                  gate_context: int = 0) -> Callable[..., DynamicConv3d]:
    def conv(cin: int, cout: int, kernel: Triple, stride: Triple, padding: Triple) -> DynamicConv3d:
        return DynamicConv3d(cin, cout, kernel, stride, padding, search_space=search_space,
                             gate_full_bias=gate_full_bias, temporal_padding=temporal_padding,
                             gate_context=gate_context)
    return conv


class DynamicUnit(nn.Module):
    """One dynamic layer (convolution + batch norm [+ ReLU]), or one with a shortcut add and ReLU.

    Without a shortcut the ReLU belongs to the layer (GhostNet's order: the cheap operations read the
    activated maps); with a shortcut it follows the add. This is the unit the exporter turns into
    one static piece per branch.
    """

    def __init__(self, conv: DynamicConv3d, relu: bool = True, residual: bool = False) -> None:
        super().__init__()
        conv.activation = relu and not residual
        self.conv = conv
        self.relu = relu
        self.residual = residual

    def forward(self, x: torch.Tensor, identity: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.conv(x)
        if not self.residual:
            return y
        if identity is None:
            raise ValueError("this unit adds a shortcut: pass identity")
        y = y + identity
        return torch.relu(y) if self.relu else y


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, step: int,
                 conv: Callable[..., DynamicConv3d]) -> None:
        super().__init__()
        mid1 = _round_channels((cin * cout * 27) // (cin * 9 + 3 * cout), step)
        mid2 = _round_channels((cout * cout * 27) // (cout * 9 + 3 * cout), step)
        self.conv1_s = DynamicUnit(conv(cin, mid1, (1, 3, 3), (1, stride, stride), (0, 1, 1)))
        self.conv1_t = DynamicUnit(conv(mid1, cout, (3, 1, 1), (stride, 1, 1), (1, 0, 0)))
        self.conv2_s = DynamicUnit(conv(cout, mid2, (1, 3, 3), (1, 1, 1), (0, 1, 1)))
        self.conv2_t = DynamicUnit(conv(mid2, cout, (3, 1, 1), (1, 1, 1), (1, 0, 0)),
                                   relu=True, residual=True)
        self.downsample: Optional[DynamicUnit] = None
        if stride != 1 or cin != cout:
            self.downsample = DynamicUnit(conv(cin, cout, (1, 1, 1), (stride,) * 3, (0, 0, 0)),
                                          relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        y = self.conv1_t(self.conv1_s(x))
        y = self.conv2_s(y)
        return self.conv2_t(y, identity)


class Head(nn.Module):
    """Global average pooling and the linear classifier."""

    def __init__(self, cin: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x.mean(dim=(2, 3, 4))))


class VaRedR2Plus1D(nn.Module):
    """VA-RED² R(2+1)D. Input: normalised clips (N, 3, T, H, W); output: class logits."""

    def __init__(self, num_classes: int = 400, frames: int = 8, size: int = 112,
                 layers: Sequence[int] = (2, 2, 2, 2), widths: Sequence[int] = (64, 128, 256, 512),
                 stem_width: int = 45, width_mult: float = 1.0, search_space: int = 2,
                 gate_full_bias: float = 0.5, dropout: float = 0.0,
                 temporal_padding: str = "zeros", gate_motion: bool = False) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError("layers and widths must have the same length")
        step = 2 ** (search_space - 1)
        self.frames = int(frames)
        self.size = int(size)
        self.num_classes = int(num_classes)
        self.search_space = int(search_space)
        self.gate_motion = bool(gate_motion)
        context = motion_features(3, self.size, self.size) if self.gate_motion else 0
        conv = _dynamic_conv(search_space, gate_full_bias, temporal_padding, context)
        ws = [_round_channels(w * width_mult, step) for w in widths]
        stem = _round_channels(stem_width * width_mult, step)
        self.stem_s = DynamicUnit(conv(3, stem, (1, 7, 7), (1, 2, 2), (0, 3, 3)))
        self.stem_t = DynamicUnit(conv(stem, ws[0], (3, 1, 1), (1, 1, 1), (1, 0, 0)))
        cin = ws[0]
        stages: List[nn.Sequential] = []
        for i, (n, w) in enumerate(zip(layers, ws)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, w, stride, step, conv))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = Head(cin, num_classes, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, DynamicConv3d):
                nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
        for block in self.blocks():
            # Start each residual branch near identity, as is usual for ResNets.
            nn.init.zeros_(block.conv2_t.conv.bn.weight)

    def blocks(self) -> Iterator[BasicBlock]:
        for stage in self.stages:
            for block in cast(nn.Sequential, stage):
                yield cast(BasicBlock, block)

    def dynamic_layers(self) -> List[Tuple[str, DynamicConv3d]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, DynamicConv3d)]

    def set_policy(self, force: Optional[int] = None) -> None:
        """Force every gate to one branch index (0 = full), or let the gates choose (None)."""
        for _, m in self.dynamic_layers():
            m.force = force

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_motion:       # one motion vector per clip, read by every gate
            motion = clip_motion(x)
            for _, layer in self.dynamic_layers():
                layer.gate.context = motion
        x = self.stem_t(self.stem_s(x))
        for block in self.blocks():
            x = block(x)
        return self.head(x)

    def layer_costs(self) -> List[float]:
        """Static MACs of each dynamic layer for one clip at the configured frames and size."""
        costs: Dict[str, float] = {}
        hooks = []
        for name, m in self.dynamic_layers():
            def hook(mod: nn.Module, inp: Tuple[torch.Tensor, ...], out: torch.Tensor,
                     name: str = name) -> None:
                assert isinstance(mod, DynamicConv3d)
                costs[name] = float(mod.static_macs(inp[0].shape[2], (out.shape[3], out.shape[4])))
            hooks.append(m.register_forward_hook(hook))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self.set_policy(0)
                self(torch.zeros(1, 3, self.frames, self.size, self.size))
        finally:
            self.set_policy(None)
            self.train(was_training)
            for h in hooks:
                h.remove()
        return [costs[name] for name, _ in self.dynamic_layers()]

    def efficiency_loss(self, logits: torch.Tensor, targets: torch.Tensor,
                        costs: Optional[Sequence[float]] = None) -> torch.Tensor:
        """The paper's efficiency loss for the last forward pass (clips classified right only)."""
        layers = [m for _, m in self.dynamic_layers()]
        costs = costs if costs is not None else self.layer_costs()
        return efficiency_loss(layers, costs, logits.argmax(1) == targets)


def vared_r2plus1d_18(**config: object) -> VaRedR2Plus1D:
    """VA-RED² R(2+1)D-18. Keyword config: num_classes, frames, size, widths, stem_width,
    width_mult, layers, search_space, gate_full_bias, dropout, temporal_padding ("zeros", the
    paper's, or "replicate": edge frames repeated, so that the temporal branch is exact on a
    still scene), gate_motion (every gate also reads the clip's motion,
    :func:`~adaedge.nn.vared.clip_motion`, computed once per clip; an extension)."""
    return VaRedR2Plus1D(**config)  # type: ignore[arg-type]


def reference_branches(model: nn.Module, switch: str) -> Optional[List[int]]:
    """The branch each clip took at a switch in the reference's last forward (the exporter names
    a switch after its unit; the unit's ``conv`` records the choice)."""
    unit = dict(model.named_modules()).get(switch + ".conv")
    last: Any = getattr(unit, "last_branch", None)
    return None if last is None else [int(i) for i in last.tolist()]


FAMILY = Family(
    name="vared", title="VA-RED²",
    builders={"vared_r2plus1d_18": vared_r2plus1d_18},
    exporter="adaedge.export.vared:export_vared",
    executions=(("dynamic", "static pieces per branch"),
                ("masked", "every filter and frame computed, then the branch's part kept, as the "
                           "papers' code does; for comparison")),
    decisions=reference_branches,
    branch_titles={"R1-r1": "full", "R1-r1/2": "half channels", "R2-r1": "every other frame",
                   "R2-r1/2": "both halved"},
    trainer="adaedge.training.vared:main",
)
