"""VA-RED² building blocks: the soft modulation gate and the dynamic convolution.

Pan et al., "VA-RED²: Video Adaptive Redundancy Reduction", ICLR 2021.

A dynamic layer is a 3D convolution followed by its batch norm. A soft modulation gate reads the
layer's input and scores a temporal policy (S_t choices) and a channel policy (S_c choices)::

    p(X) = max(tanh(FC2(ReLU(BN(FC1(GAP(X))))) + beta), 0)        (poster, "soft modulation gate")

Temporal branch i multiplies the temporal stride by R = 2^i and computes only output frames
0, R, 2R, ...; a cheap temporal operation rebuilds the others, Y[iR + j] = Phi^t_j(Y'[i]).
Channel branch i computes the first r = (1/2)^i of the output filters with the same weights as the
full convolution (a slice) and a cheap depthwise operation fills the rest, Y = [Y', Phi^c(Y')].
Every branch returns the shape of the full convolution.

Following GhostNet (Han et al., CVPR 2020), the cheap operations act on the *normalised* computed
maps: the layer's batch norm is applied to the computed filters (sliced for a channel branch), then
the layer's activation when it has one (``activation=True``: primary conv -> BN -> ReLU -> cheap
operation -> ReLU, GhostNet's order), and each cheap operation is a depthwise 3x3 convolution with
its own bias. Every branch is thus an exact composition of convolutions and ReLUs, which the
exporter folds into one static graph per branch.

Training mixes the branches weighted by the gate (poster, Y = sum_j V_t[j] sum_i V_c[i] f(X; R_j,
r_i)); evaluation takes the single branch the gate picks (arg-max of each policy), per clip.

``temporal_padding = "replicate"`` (an option, not the paper's) pads time by repeating the edge
frames instead of zeros: a clip whose frames are all equal then has equal frames at every layer,
so "compute every other frame, copy the rest" is exact on a still scene (with zero padding the
first and last frames differ from the inner ones and copying moves that difference inside).
``gate_context`` (an extension of the paper's gate) gives every gate a vector computed once per
clip beside GAP(X): the network's :func:`clip_motion`, how much each cell of a coarse grid of
the clip changes from frame to frame. The averages of a still and a panning clip of one scene
are nearly equal at every layer; their frame differences are not.

``mix = "hard"`` is a training alternative (not the paper's): the forward pass is the one branch a
Gumbel-perturbed arg-max of the logits picks, as in evaluation, and the gradient reaches the gate
through the policies' softmax (straight-through). The soft mix scales outputs by the unnormalised
scores (about 0.2x at initialisation) that evaluation's single branch does not have, so batch-norm
statistics learned under it do not fit evaluation; the hard mix has no such gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

Triple = Tuple[int, int, int]
TEMPORAL_PADDINGS = ("zeros", "replicate")


MOTION_GRID = 4          # clip_motion's grid: 4 x 4 cells per frame
MOTION_FLOOR = 1e-3      # clip_motion reads log(floor + difference)


def clip_motion(clip: torch.Tensor, grid: int = MOTION_GRID) -> torch.Tensor:
    """How much a clip moves: with P the clip average-pooled to ``grid`` x ``grid`` cells per
    frame and D = |P[t+1] - P[t]|, per channel and cell log(floor + mean_t D), then per channel
    log(floor + max over cells and frames of D) (a small object crossing one cell for a few
    frames shows there); (N, C * (grid^2 + 1)), zeros for a single frame. The logarithm spreads
    sensor noise (about 0.01) and a pan (about 0.3) apart. Computed once per clip and read by
    every gate."""
    n, c, t, h, w = clip.shape
    kh, kw = max(1, h // grid), max(1, w // grid)
    p = F.avg_pool3d(clip, (1, kh, kw), (1, kh, kw))[:, :, :, :grid, :grid]
    if t < 2:
        return torch.zeros(n, c * (p.shape[3] * p.shape[4] + 1), dtype=clip.dtype,
                           device=clip.device)
    d = (p[:, :, 1:] - p[:, :, :-1]).abs()
    mean = torch.log(d.mean(dim=2) + MOTION_FLOOR).flatten(1)
    peak = torch.log(d.amax(dim=(2, 3, 4)) + MOTION_FLOOR)
    return torch.cat([mean, peak], dim=1)


def motion_features(channels: int, height: int, width: int, grid: int = MOTION_GRID) -> int:
    """The length of :func:`clip_motion`'s vector for clips of this shape."""
    return channels * (min(grid, height) * min(grid, width) + 1)


def _triple(v: Union[int, Sequence[int]]) -> Triple:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise ValueError(f"expected 3 values, got {v!r}")
    return t  # type: ignore[return-value]


@dataclass(frozen=True)
class Branch:
    """One static branch of a dynamic layer: temporal index t (R = 2^t), channel index c (r = 2^-c)."""

    index: int
    t: int
    c: int

    @property
    def temporal_factor(self) -> int:
        return 2 ** self.t

    @property
    def channel_ratio(self) -> float:
        return 0.5 ** self.c

    @property
    def name(self) -> str:
        denom = 2 ** self.c
        return f"R{self.temporal_factor}-r1" if denom == 1 else f"R{self.temporal_factor}-r1/{denom}"


class SoftModulationGate(nn.Module):
    """p(X) = max(tanh(FC2(ReLU(BN(FC1(GAP(X))))) + beta), 0), split into temporal and channel scores.

    ``beta`` is the per-layer bias beta_p^l of the poster; FC2 has no bias of its own. With
    ``context`` > 0 the features are [GAP(X), c], c a vector of that length computed once per
    clip (:func:`clip_motion`, set in ``self.context`` before each forward pass): an extension
    of the paper's gate that lets it tell a still clip from a moving one.
    """

    def __init__(self, in_channels: int, temporal_choices: int, channel_choices: int,
                 hidden: Optional[int] = None, full_bias: float = 0.5, context: int = 0) -> None:
        super().__init__()
        self.temporal_choices = temporal_choices
        self.channel_choices = channel_choices
        self.context_features = int(context)
        self.context: Optional[torch.Tensor] = None
        hidden = hidden or max(8, in_channels // 4)
        self.fc1 = nn.Linear(in_channels + self.context_features, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, temporal_choices + channel_choices, bias=False)
        beta = torch.zeros(temporal_choices + channel_choices)
        beta[0] = full_bias                   # temporal: stride factor 1 preferred at start
        beta[temporal_choices] = full_bias    # channel: all filters preferred at start
        self.beta = nn.Parameter(beta)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """GAP(x) as (N, C), with the clip's context vector beside it when the gate reads one."""
        pooled = x.mean(dim=(2, 3, 4))
        if not self.context_features:
            return pooled
        if self.context is None or tuple(self.context.shape) != (x.shape[0],
                                                                 self.context_features):
            raise RuntimeError("this gate reads a context vector per clip: set gate.context "
                               f"to an (N, {self.context_features}) tensor first")
        return torch.cat([pooled, self.context.to(pooled.dtype)], dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """z = FC2(ReLU(BN(FC1(features(x))))) + beta, before the squashing."""
        return self.logits_of_features(self.features(x))

    def logits_of_features(self, f: torch.Tensor) -> torch.Tensor:
        """z from the features :meth:`features` computed."""
        return self.fc2(F.relu(self.bn(self.fc1(f)))) + self.beta

    @staticmethod
    def squash(logits: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.tanh(logits), min=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.squash(self.logits(x))

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Branch index per clip: t * S_c + c, t and c the arg-max of each policy's scores.

        Scores p = max(tanh(z), 0) tie where tanh saturates (exactly 1.0 in float32) or clamps to
        0; ties are broken by the logits z, which p orders the same way elsewhere. So the choice is
        the arg-max of z: one rule every backend computes alike, whatever its tanh rounds to.
        """
        t = logits[:, : self.temporal_choices].argmax(dim=1)
        c = logits[:, self.temporal_choices:].argmax(dim=1)
        return t * self.channel_choices + c


class DynamicConv3d(nn.Module):
    """A 3D convolution and its batch norm with VA-RED²'s temporal and channel branches.

    ``search_space`` S gives S temporal choices (R = 1, 2, ..., 2^(S-1)) and S channel choices
    (r = 1, 1/2, ..., (1/2)^(S-1)); ``out_channels`` must be divisible by 2^(S-1).

    Attributes set by the caller:
        force: ``None`` lets the gate choose; an int forces that branch index for every clip, a
        LongTensor of one index per clip forces each clip's (training with gate targets).
    After each forward, ``last_logits`` and ``last_scores`` hold the gate's logits and scores and
    ``last_branch`` (eval mode, or forced) the branch index taken per clip.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Sequence[int]],
                 stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int]] = 0,
                 search_space: int = 2, gate_hidden: Optional[int] = None,
                 gate_full_bias: float = 0.5, activation: bool = False,
                 temporal_padding: str = "zeros", gate_context: int = 0) -> None:
        super().__init__()
        if search_space < 1:
            raise ValueError("search_space must be at least 1")
        if temporal_padding not in TEMPORAL_PADDINGS:
            raise ValueError(f"temporal_padding must be one of {', '.join(TEMPORAL_PADDINGS)}, "
                             f"not {temporal_padding!r}")
        step = 2 ** (search_space - 1)
        if out_channels % step:
            raise ValueError(f"out_channels={out_channels} is not divisible by 2^(S-1)={step}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)
        self.padding = _triple(padding)
        self.search_space = search_space
        self.activation = activation
        self.temporal_padding = temporal_padding
        self.conv = nn.Conv3d(in_channels, out_channels, self.kernel_size, self.stride,
                              self.padding, bias=False)
        self.bn = nn.BatchNorm3d(out_channels)
        self.gate = SoftModulationGate(in_channels, search_space, search_space, gate_hidden,
                                       gate_full_bias, context=gate_context)
        # channel_fill[c-1]: from the first out/2^c filters to the remaining ones (depthwise,
        # channel multiplier 2^c - 1).
        self.channel_fill = nn.ModuleList()
        for c in range(1, search_space):
            computed = out_channels // 2 ** c
            self.channel_fill.append(nn.Conv3d(computed, out_channels - computed, (1, 3, 3),
                                               padding=(0, 1, 1), groups=computed, bias=True))
        # temporal_fill[t-1]: from each computed frame to the R - 1 frames after it (depthwise,
        # channel multiplier R - 1).
        self.temporal_fill = nn.ModuleList()
        for t in range(1, search_space):
            r = 2 ** t
            self.temporal_fill.append(nn.Conv3d(out_channels, out_channels * (r - 1), (1, 3, 3),
                                                padding=(0, 1, 1), groups=out_channels, bias=True))
        self._init_cheap_ops()
        self.force: Union[None, int, torch.Tensor] = None
        self.mix = "soft"
        self.tau = 1.0          # temperature of the Gumbel-perturbed choice in the "hard" mix
        self.last_scores: Optional[torch.Tensor] = None
        self.last_logits: Optional[torch.Tensor] = None
        self.last_branch: Optional[torch.Tensor] = None

    def channel_fill_conv(self, c: int) -> nn.Conv3d:
        """The cheap operation of channel branch c (c >= 1)."""
        return cast(nn.Conv3d, self.channel_fill[c - 1])

    def temporal_fill_conv(self, t: int) -> nn.Conv3d:
        """The cheap operation of temporal branch t (t >= 1)."""
        return cast(nn.Conv3d, self.temporal_fill[t - 1])

    def _cheap_ops(self) -> List[nn.Conv3d]:
        return [cast(nn.Conv3d, m) for m in list(self.channel_fill) + list(self.temporal_fill)]

    def _init_cheap_ops(self) -> None:
        # Start the cheap operations as copies (centre tap 1), the natural guess for a redundant map.
        for m in self._cheap_ops():
            assert m.bias is not None
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
            with torch.no_grad():
                m.weight[:, :, 0, 1, 1] = 1.0

    @property
    def branches(self) -> Tuple[Branch, ...]:
        s = self.search_space
        return tuple(Branch(t * s + c, t, c) for t in range(s) for c in range(s))

    @property
    def conv_padding(self) -> Triple:
        """The padding the convolution itself applies (time is padded before it when
        replicating edge frames)."""
        if self.temporal_padding == "replicate":
            return (0, self.padding[1], self.padding[2])
        return self.padding

    def pad_time(self, x: torch.Tensor) -> torch.Tensor:
        """x with ``padding[0]`` edge frames repeated at each end (``temporal_padding =
        "replicate"``), else x (the convolution pads with zeros)."""
        pt = self.padding[0]
        if self.temporal_padding != "replicate" or pt == 0:
            return x
        return torch.cat([x[:, :, :1].expand(-1, -1, pt, -1, -1), x,
                          x[:, :, -1:].expand(-1, -1, pt, -1, -1)], dim=2)

    def output_frames(self, frames: int) -> int:
        k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
        return (frames + 2 * p - k) // s + 1

    def branch_forward(self, x: torch.Tensor, branch: Branch) -> torch.Tensor:
        """The static computation of one branch (normalised by the layer's batch norm)."""
        computed = self.out_channels // 2 ** branch.c
        r = branch.temporal_factor
        stride = (self.stride[0] * r, self.stride[1], self.stride[2])
        y = F.conv3d(self.pad_time(x), self.conv.weight[:computed], None, stride,
                     self.conv_padding)
        bn = self.bn
        y = F.batch_norm(y, bn.running_mean[:computed] if bn.running_mean is not None else None,
                         bn.running_var[:computed] if bn.running_var is not None else None,
                         bn.weight[:computed], bn.bias[:computed],
                         bn.training or not bn.track_running_stats, bn.momentum or 0.0, bn.eps)
        act = torch.relu if self.activation else (lambda t: t)
        y = act(y)
        if branch.c:
            y = torch.cat([y, act(self.channel_fill_conv(branch.c)(y))], dim=1)
        frames_out = self.output_frames(x.shape[2])
        if branch.t and frames_out > y.shape[2]:
            n, ch, tc, h, w = y.shape
            filled = act(self.temporal_fill_conv(branch.t)(y)).view(n, ch, r - 1, tc, h, w)
            y = torch.cat([y.unsqueeze(2), filled], dim=2)          # (n, ch, r, tc, h, w)
            y = y.transpose(2, 3).reshape(n, ch, tc * r, h, w)[:, :, :frames_out]
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate.logits(x)
        scores = self.gate.squash(logits)
        self.last_scores = scores
        self.last_logits = logits
        if self.training and self.force is None:
            s = self.search_space
            if self.mix == "hard":
                vt = _straight_through(logits[:, :s], self.tau)
                vc = _straight_through(logits[:, s:], self.tau)
                self.last_scores = torch.cat([F.softmax(logits[:, :s], 1),
                                              F.softmax(logits[:, s:], 1)], dim=1)
            elif self.mix == "soft":
                vt, vc = scores[:, :s], scores[:, s:]
            else:
                raise ValueError(f"mix must be 'soft' or 'hard', not {self.mix!r}")
            out = None
            for b in self.branches:
                w = (vt[:, b.t] * vc[:, b.c]).view(-1, 1, 1, 1, 1)
                term = w * self.branch_forward(x, b)
                out = term if out is None else out + term
            assert out is not None
            return out
        if isinstance(self.force, torch.Tensor):
            choice = self.force.to(device=x.device, dtype=torch.long)
        elif self.force is not None:
            choice = torch.full((x.shape[0],), int(self.force), dtype=torch.long, device=x.device)
        else:
            choice = self.gate.decide(logits)
        self.last_branch = choice
        return self.dispatch(x, choice)

    def dispatch(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Run each clip through its branch: group the batch by branch, run each group once."""
        branches = self.branches
        if bool((choice == choice[0]).all()):
            return self.branch_forward(x, branches[int(choice[0])])
        out: Optional[torch.Tensor] = None
        for idx in torch.unique(choice).tolist():
            rows = (choice == idx).nonzero(as_tuple=True)[0]
            y = self.branch_forward(x[rows], branches[idx])
            if out is None:
                out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
            out[rows] = y
        assert out is not None
        return out

    def static_macs(self, frames_in: int, size_out: Tuple[int, int]) -> int:
        """Multiply-accumulates of the full (static) convolution for one clip."""
        kt, kh, kw = self.kernel_size
        return (self.out_channels * self.output_frames(frames_in) * size_out[0] * size_out[1]
                * self.in_channels * kt * kh * kw)

    def expected_cost_ratio(self) -> torch.Tensor:
        """E[r / R] per clip under the gate's last scores, the poster's r_l^s / R_l^s."""
        if self.last_scores is None:
            raise RuntimeError("run a forward pass first")
        s = self.search_space
        powers = 0.5 ** torch.arange(s, dtype=self.last_scores.dtype, device=self.last_scores.device)

        def expected(v: torch.Tensor) -> torch.Tensor:
            # All scores zero: evaluation's arg-max takes branch 0 (the full one), so count that.
            total = v.sum(1)
            return torch.where(total > 0, (v * powers).sum(1) / total.clamp_min(1e-12),
                               torch.ones_like(total))

        return expected(self.last_scores[:, s:]) * expected(self.last_scores[:, :s])


def _straight_through(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """One-hot of a Gumbel-perturbed arg-max (a sample of softmax(logits / tau)) in the forward
    pass, softmax gradient backward. As tau falls the sample becomes evaluation's arg-max."""
    soft = F.softmax(logits, dim=1)
    gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-9, 1 - 1e-9)))
    hard = F.one_hot((logits / tau + gumbel).argmax(1), logits.shape[1]).to(soft.dtype)
    return hard + soft - soft.detach()


def efficiency_loss(layers: Sequence[DynamicConv3d], costs: Sequence[float],
                    correct: torch.Tensor) -> torch.Tensor:
    """The poster's L_e = (mu_0 * sum_l C(f_l) / sum_k C(f_k) * r_l^s / R_l^s)^2, averaged over clips.

    ``costs`` are the static MACs of each layer, ``correct`` a bool tensor (mu_0 per clip): clips the
    network gets wrong are not pushed to be cheaper.
    """
    total = float(sum(costs))
    if total <= 0:
        raise ValueError("layer costs must be positive")
    spent = sum(layer.expected_cost_ratio() * (cost / total) for layer, cost in zip(layers, costs))
    assert isinstance(spent, torch.Tensor)
    return ((correct.to(spent.dtype) * spent) ** 2).mean()
