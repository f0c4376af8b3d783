"""AdaFuse (Meng et al., ICLR 2021): per block, keep, reuse or skip each channel, frame by frame.

A 2D ResNet runs on every frame (TSN, or TSM with a temporal shift in every block). Inside each
residual block a policy network reads the pooled block input of the current frame and of the
previous one and chooses, for every output channel of the block's first convolution (Eq. 3)::

    keep:   ỹ_t[i] = y_t[i]        computed now
    reuse:  ỹ_t[i] = y_{t-1}[i]    the previous frame's first-convolution output (zero at t = 0)
    skip:   ỹ_t[i] = 0

and the block's second convolution reads ỹ_t. The class scores are the mean of the frame scores.

Module and parameter names follow the official code (``base_model.layer{i}.{j}.policy_net.gate_fc0``
...), so its checkpoints load with :func:`load_official`. Its action order is kept too: index 0 is
skip, 1 reuse, 2 keep. At inference the decision is the arg-max of the policy's logits (the official
code samples Gumbel noise even at test time; we do not); in training it is the straight-through
Gumbel-softmax sample of the paper (Eq. 7).

Temporal shift (TSM): ``shift="bidirectional"`` is the official one (1/``shift_div`` of the channels
from the next frame, 1/``shift_div`` from the previous); it reads the future, so such a network runs
on whole clips only. ``shift="online"`` (TSM's online variant: 1/``shift_div`` of the channels from
the previous frame only) is causal and streams frame by frame. ``shift="none"`` is TSN.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ExportOption, Family

SKIP, REUSE, KEEP = 0, 1, 2
ACTIONS = ("skip", "reuse", "keep")
SHIFTS = ("none", "bidirectional", "online")
DEPTHS: Dict[int, Tuple[str, Tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3))}


def previous_frame(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``x`` (N*T, ...) moved one frame later within each clip: row t holds frame t-1, row 0 zeros."""
    v = x.reshape((-1, frames) + tuple(x.shape[1:]))
    return torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1).reshape(x.shape)


def temporal_shift(x: torch.Tensor, frames: int, mode: str, shift_div: int) -> torch.Tensor:
    """TSM's shift of (N*T, C, H, W): ``bidirectional`` moves channels [0, C/d) one frame earlier
    and [C/d, 2C/d) one frame later; ``online`` moves [0, C/d) one frame later (causal)."""
    if mode == "none":
        return x
    nt, c, h, w = x.shape
    fold = c // shift_div
    v = x.reshape(nt // frames, frames, c, h, w)
    zero = torch.zeros_like(v[:, :1, :fold])
    later = torch.cat([zero, v[:, :-1, :fold]], dim=1)
    if mode == "online":
        return torch.cat([later, v[:, :, fold:]], dim=2).reshape(x.shape)
    earlier = torch.cat([v[:, 1:, :fold], zero], dim=1)
    later2 = torch.cat([zero, v[:, :-1, fold:2 * fold]], dim=1)
    return torch.cat([earlier, later2, v[:, :, 2 * fold:]], dim=2).reshape(x.shape)


class PolicyBlock(nn.Module):
    """The policy network: ``fc1(relu(bn(fc0([v_{t-1}, v_t]))))`` -> 3 logits per channel.

    ``v`` is the global average of the block input. With a shared policy the two linear layers are
    the network's (one pair per input/output size), as in the official ``--shared_policy_net``.
    """

    def __init__(self, in_planes: int, channels: int, hidden: int,
                 shared: Optional[Tuple[nn.Linear, nn.Linear]] = None) -> None:
        super().__init__()
        self.channels = channels
        if shared is not None:
            self.gate_fc0, self.gate_fc1 = shared
        else:
            self.gate_fc0 = nn.Linear(2 * in_planes, hidden)
            self.gate_fc1 = nn.Linear(hidden, 3 * channels)
            for fc in (self.gate_fc0, self.gate_fc1):
                nn.init.normal_(fc.weight, 0, 0.001)
                nn.init.zeros_(fc.bias)
        self.gate_bn = nn.BatchNorm1d(hidden)
        self.gate_relu = nn.ReLU(inplace=False)

    def forward(self, pooled: torch.Tensor, pooled_prev: torch.Tensor) -> torch.Tensor:
        h = self.gate_relu(self.gate_bn(self.gate_fc0(torch.cat([pooled_prev, pooled], dim=1))))
        return self.gate_fc1(h).view(-1, self.channels, 3)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class AdaBlock(nn.Module):
    """A residual block with adaptive temporal fusion between its first and second convolution.

    ``kind="basic"``: conv1 3x3 (stride) -> [fusion] -> conv2 3x3; ``kind="bottleneck"``: conv1 1x1
    -> [fusion] -> conv2 3x3 (stride) -> conv3 1x1 (ResNet v1.5, as torchvision and the official
    code). Without a policy (``policy_net`` is None) every channel is kept.
    """

    def __init__(self, kind: str, inplanes: int, planes: int, stride: int, gated: bool,
                 hidden: int, shift: str, shift_div: int,
                 shared: Optional[Tuple[nn.Linear, nn.Linear]] = None) -> None:
        super().__init__()
        self.kind = kind
        self.shift, self.shift_div = shift, shift_div
        expansion = 4 if kind == "bottleneck" else 1
        self.out_planes = planes * expansion
        if kind == "basic":
            self.conv1, self.conv2 = conv3x3(inplanes, planes, stride), conv3x3(planes, planes)
        else:
            self.conv1, self.conv2 = conv1x1(inplanes, planes), conv3x3(planes, planes, stride)
            self.conv3 = conv1x1(planes, self.out_planes)
            self.bn3 = nn.BatchNorm2d(self.out_planes)
        self.bn1, self.bn2 = nn.BatchNorm2d(planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample0: Optional[nn.Conv2d] = None
        self.downsample1: Optional[nn.BatchNorm2d] = None
        if stride != 1 or inplanes != self.out_planes:
            self.downsample0 = conv1x1(inplanes, self.out_planes, stride)
            self.downsample1 = nn.BatchNorm2d(self.out_planes)
        self.channels = planes
        self.policy_net = PolicyBlock(inplanes, planes, hidden, shared) if gated else None

    def decide(self, xs: torch.Tensor, frames: int, tau: float = 0.67) -> torch.Tensor:
        """One-hot decisions (N*T, C, 3) over (skip, reuse, keep) for the shifted block input.

        Eval: the arg-max of the logits. Training: a straight-through Gumbel-softmax sample.
        """
        if self.policy_net is None:
            ones = torch.zeros(xs.shape[0], self.channels, 3, dtype=xs.dtype, device=xs.device)
            ones[:, :, KEEP] = 1
            return ones
        pooled = xs.mean(dim=(2, 3))
        logits = self.policy_net(pooled, previous_frame(pooled, frames))
        if self.training:
            return F.gumbel_softmax(torch.log_softmax(logits, dim=2), tau=tau, hard=True)
        return F.one_hot(logits.argmax(dim=2), 3).to(xs.dtype)

    def forward(self, x: torch.Tensor, frames: int, tau: float = 0.67,
                record: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        xs = temporal_shift(x, frames, self.shift, self.shift_div)
        y = self.relu(self.bn1(self.conv1(xs)))
        mask = self.decide(xs, frames, tau)
        if record is not None:
            record.append(mask)
        fused = y * mask[:, :, KEEP, None, None] + \
            previous_frame(y, frames) * mask[:, :, REUSE, None, None]
        out = self.bn2(self.conv2(fused))
        if self.kind == "bottleneck":
            out = self.bn3(self.conv3(self.relu(out)))
        if self.downsample0 is not None:
            assert self.downsample1 is not None
            x = self.downsample1(self.downsample0(xs))
        return self.relu(out + x)

    def conv_macs(self, h: int, w: int) -> Tuple[Dict[str, int], Tuple[int, int]]:
        """Multiply-accumulates per frame of each convolution for an input of h x w, and the
        block's output size."""
        out: Dict[str, int] = {}
        size = (h, w)
        for name in ("conv1", "conv2", "conv3", "downsample0"):
            conv = getattr(self, name, None)
            if conv is None:
                continue
            src = (h, w) if name == "downsample0" else size
            (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
            ho, wo = (src[0] + 2 * ph - kh) // sh + 1, (src[1] + 2 * pw - kw) // sw + 1
            out[name] = conv.out_channels * ho * wo * conv.in_channels * kh * kw
            if name != "downsample0":
                size = (ho, wo)
        return out, size


class AdaFuseResNet(nn.Module):
    """The official ``BateNet``: a torchvision-style ResNet whose blocks carry policy networks."""

    def __init__(self, depth: int, base_width: int, enabled_stages: Sequence[int], hidden_dim: int,
                 hidden_quota: int, shared_policy: bool, shift: str, shift_div: int) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, not {depth}")
        kind, layers = DEPTHS[depth]
        expansion = 4 if kind == "bottleneck" else 1
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=False)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.gate_fc0s: Optional[nn.ModuleDict] = nn.ModuleDict() if shared_policy else None
        self.gate_fc1s: Optional[nn.ModuleDict] = nn.ModuleDict() if shared_policy else None
        inplanes = base_width
        for stage, nblocks in enumerate(layers):
            planes = base_width * 2 ** stage
            gated = stage in enabled_stages
            hidden = hidden_quota // planes if hidden_quota > 0 else hidden_dim
            if gated and hidden < 1:
                raise ValueError(f"hidden_quota {hidden_quota} gives no policy units for "
                                 f"{planes} channels")
            blocks = nn.ModuleList()
            for j in range(nblocks):
                stride = 2 if stage > 0 and j == 0 else 1
                shared = None
                if gated and self.gate_fc0s is not None and self.gate_fc1s is not None:
                    key = f"{2 * inplanes}_{3 * planes}"      # the official keyword
                    if key not in self.gate_fc0s:
                        fc0, fc1 = nn.Linear(2 * inplanes, hidden), nn.Linear(hidden, 3 * planes)
                        for fc in (fc0, fc1):
                            nn.init.normal_(fc.weight, 0, 0.001)
                            nn.init.zeros_(fc.bias)
                        self.gate_fc0s[key], self.gate_fc1s[key] = fc0, fc1
                    m0, m1 = self.gate_fc0s[key], self.gate_fc1s[key]
                    assert isinstance(m0, nn.Linear) and isinstance(m1, nn.Linear)
                    shared = (m0, m1)
                blocks.append(AdaBlock(kind, inplanes, planes, stride, gated, hidden, shift,
                                       shift_div, shared))
                inplanes = planes * expansion
            setattr(self, f"layer{stage + 1}", blocks)
        self.out_features = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def blocks(self) -> List[AdaBlock]:
        return [b for i in range(1, 5) for b in getattr(self, f"layer{i}")]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class AdaFuse(nn.Module):
    """The official ``TSN_Gate``: ``base_model`` per frame, ``new_fc``, mean over the frames.

    Input (N, 3, T, H, W) in adaedge's layout; output (N, classes).
    """

    def __init__(self, depth: int = 50, num_classes: int = 174, frames: int = 8, size: int = 224,
                 base_width: int = 64, shift: str = "none", shift_div: int = 8,
                 enabled_stages: Sequence[int] = (0, 1, 2, 3), hidden_dim: int = 1024,
                 hidden_quota: int = 0, shared_policy: bool = False,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if shift not in SHIFTS:
            raise ValueError(f"shift must be one of {', '.join(SHIFTS)}, not {shift!r}")
        if any(s not in (0, 1, 2, 3) for s in enabled_stages):
            raise ValueError(f"enabled_stages must name stages 0..3, got {list(enabled_stages)}")
        self.frames, self.size, self.num_classes = frames, size, num_classes
        self.shift = shift
        self.base_model = AdaFuseResNet(depth, base_width, enabled_stages, hidden_dim, hidden_quota,
                                        shared_policy, shift, shift_div)
        self.dropout = nn.Dropout(dropout)
        self.new_fc = nn.Linear(self.base_model.out_features, num_classes)
        nn.init.normal_(self.new_fc.weight, 0, 0.001)
        nn.init.zeros_(self.new_fc.bias)

    def frame_features(self, x: torch.Tensor, tau: float = 0.67,
                       record: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        n, c, t = x.shape[:3]
        f = x.transpose(1, 2).reshape(n * t, c, x.shape[3], x.shape[4])
        f = self.base_model.stem(f)
        for block in self.base_model.blocks:
            f = block(f, t, tau, record)
        return f.mean(dim=(2, 3))

    def frame_logits(self, x: torch.Tensor, tau: float = 0.67,
                     record: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        """Scores of every frame, (N, T, classes)."""
        feats = self.frame_features(x, tau, record)
        return self.new_fc(self.dropout(feats)).view(x.shape[0], x.shape[2], -1)

    def forward(self, x: torch.Tensor, tau: float = 0.67) -> torch.Tensor:
        return self.frame_logits(x, tau).mean(dim=1)

    def decisions(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The action index of every channel and frame, per block: (N, T, C) int64 each
        (0 skip, 1 reuse, 2 keep); blocks without a policy keep everything."""
        record: List[torch.Tensor] = []
        self.frame_features(x, record=record)
        return [m.argmax(dim=2).view(x.shape[0], x.shape[2], -1) for m in record]

    # -- cost (Eq. 5) -----------------------------------------------------------------------
    def stem_size(self, size: Optional[int] = None) -> Tuple[int, int]:
        """Output size of the stem convolution and of the max pool after it."""
        s = size or self.size
        h = (s + 2 * 3 - 7) // 2 + 1
        return h, (h + 2 - 3) // 2 + 1

    def block_macs(self, size: Optional[int] = None) -> List[Dict[str, int]]:
        """Per block and convolution, multiply-accumulates per frame at full width."""
        h = w = self.stem_size(size)[1]
        out = []
        for block in self.base_model.blocks:
            macs, (h, w) = block.conv_macs(h, w)
            out.append(macs)
        return out

    def policy_macs(self) -> int:
        """Per frame: the policy networks' two linear layers."""
        return sum(fc.in_features * fc.out_features for b in self.base_model.blocks
                   if b.policy_net is not None
                   for fc in (b.policy_net.gate_fc0, b.policy_net.gate_fc1))

    def _static_macs(self, size: Optional[int] = None) -> int:
        """Per frame: stem, conv3 / shortcut of every block and classifier (no policy)."""
        h = self.stem_size(size)[0]
        total = self.base_model.conv1.out_channels * h * h * 3 * 49
        for macs in self.block_macs(size):
            total += macs.get("conv3", 0) + macs.get("downsample0", 0)
        return total + self.new_fc.in_features * self.new_fc.out_features

    def fixed_macs(self, size: Optional[int] = None) -> int:
        """Per frame: stem, conv3 / shortcut of every block, policy networks and classifier."""
        return self._static_macs(size) + self.policy_macs()

    def flops(self, x: torch.Tensor) -> torch.Tensor:
        """Multiply-accumulates per clip (N,) under the policy's decisions, by Eq. 5: a channel of
        the first convolution is computed at frame t if it is kept at t or reused at t+1, and the
        second convolution reads the channels not skipped at t."""
        decisions = self.decisions(x)
        n, t = x.shape[0], x.shape[2]
        total = torch.full((n,), float(self.fixed_macs() * t), dtype=torch.float64)
        for d, macs in zip(decisions, self.block_macs()):
            c = d.shape[2]
            needed = d == KEEP
            needed[:, :-1] |= d[:, 1:] == REUSE
            total += needed.sum(dim=(1, 2)).double() / c * macs["conv1"]
            total += (d != SKIP).sum(dim=(1, 2)).double() / c * macs["conv2"]
        return total

    def plain_macs(self) -> int:
        """Multiply-accumulates per clip of the same network with no policy (all channels kept)."""
        per_frame = self._static_macs() + sum(m["conv1"] + m["conv2"] for m in self.block_macs())
        return per_frame * self.frames


def _builder(shift: str):  # type: ignore[no-untyped-def]
    def build(**config: Any) -> AdaFuse:
        config.setdefault("shift", shift)
        return AdaFuse(**config)
    build.__name__ = f"adafuse_{'tsn' if shift == 'none' else 'tsm'}_r50"
    build.__doc__ = (f"AdaFuse on {'TSN' if shift == 'none' else 'TSM'} ResNet (default depth 50, "
                     "width 64, 8 frames of 224x224, all four stages gated).")
    return build


adafuse_tsn_r50 = _builder("none")
adafuse_tsm_r50 = _builder("bidirectional")


def config_from_state(state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Guess depth, width, classes, gated stages and policy sizes of an official checkpoint from
    its tensors (the official file stores no config). Shift and frames are not in the weights."""
    keys = set(state)
    blocks = [k for k in keys if k.startswith("base_model.layer3.") and k.endswith(".conv1.weight")]
    bottleneck = "base_model.layer1.0.conv3.weight" in keys
    n3 = len(blocks)
    depth = {(False, 2): 18, (False, 6): 34, (True, 6): 50, (True, 23): 101}.get((bottleneck, n3))
    if depth is None:
        raise ValueError("not an AdaFuse ResNet checkpoint (no layer3 blocks of a known depth)")
    width = int(state["base_model.conv1.weight"].shape[0])
    stages = [s for s in range(4) if f"base_model.layer{s + 1}.0.policy_net.gate_fc0.weight" in keys]
    cfg: Dict[str, Any] = {"depth": depth, "base_width": width, "enabled_stages": stages,
                           "num_classes": int(state["new_fc.weight"].shape[0]),
                           "shared_policy": any(k.startswith("base_model.gate_fc0s.") for k in keys)}
    if stages:
        hidden = [int(state[f"base_model.layer{s + 1}.0.policy_net.gate_fc0.weight"].shape[0])
                  for s in stages]
        planes = [width * 2 ** s for s in stages]
        quota = hidden[0] * planes[0]
        if len(set(hidden)) == 1:
            cfg["hidden_dim"] = hidden[0]
        elif all(quota // p == h for p, h in zip(planes, hidden)):
            cfg["hidden_quota"] = quota
        else:
            raise ValueError(f"policy sizes {hidden} fit neither a fixed size nor a quota")
    return cfg


def official_checkpoint(state: Mapping[str, Any], meta: Mapping[str, Any],
                        name: Optional[str]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """An official AdaFuse file (``{"state_dict"}`` with TSN/TSM names): its config, read from
    the tensors. The file does not record the temporal shift, so the model must be named."""
    if "new_fc.weight" not in state or "base_model.conv1.weight" not in state:
        return None
    if name not in ("adafuse_tsn_r50", "adafuse_tsm_r50"):
        raise ValueError("this looks like an official AdaFuse file, which does not record whether "
                         "the network shifts channels in time: name the model (adafuse_tsn_r50 or "
                         "adafuse_tsm_r50) and give frames")
    return name, config_from_state(state)


def _yes_no(text: str) -> bool:
    if text not in ("yes", "no"):
        raise ValueError(text)
    return text == "yes"


FAMILY = Family(
    name="adafuse", title="AdaFuse",
    builders={"adafuse_tsn_r50": adafuse_tsn_r50, "adafuse_tsm_r50": adafuse_tsm_r50},
    exporter="adaedge.export.adafuse:export_adafuse",
    executions=(("dense", "every channel computed, then combined by the policy's decisions"),
                ("gathered", "only the channels the policy needs: bucketed static pieces"),
                ("plain", "no policy: the benchmarks' baseline, not the model's function")),
    options=(ExportOption("stream", "yes: a per-frame program carrying state (default where the "
                                    "network allows: not with a bidirectional temporal shift); "
                                    "no: whole clips", _yes_no),
             ExportOption("buckets", "channel-count buckets per convolution of the gathered "
                                     "form (default 8)", int)),
    official=official_checkpoint,
    checkpoint_help="official AdaFuse checkpoints ({'state_dict'} with DataParallel's 'module.'); "
                    "name the model and give frames",
    branch_titles={"0ch": "no channels"},
)

__all__ = ["AdaFuse", "AdaBlock", "PolicyBlock", "adafuse_tsn_r50", "adafuse_tsm_r50",
           "temporal_shift", "previous_frame", "config_from_state", "official_checkpoint",
           "FAMILY",
           "SKIP", "REUSE", "KEEP", "ACTIONS", "SHIFTS"]
