"""TAdaConv (Huang et al., ICLR 2022): temporally adaptive convolution with calibration weights.

Frame ``t`` of each clip is convolved with ``W_t = alpha_t * W_b`` (Eq. 2), where the calibration
weights ``alpha`` come from a routing function over frame descriptors (Eq. 4, :class:`RouteFuncMLP`)
with local context (two temporal 1D convolutions) and global context (the clip's pooled descriptor
through a linear map), initialised so that ``alpha`` starts at 1.

:class:`TAdaConv2d` and :class:`RouteFuncMLP` are drop-in replacements for the official classes:
the same constructor arguments, ``forward`` signatures, parameter names and shapes, so a state dict
saved by the official code loads unchanged.

The calibration factorises (this is what :mod:`adaedge.export` writes, and what
:func:`calibrated_conv2d` computes with ``form="features"``):

* over input channels:  ``conv(x_t, alpha_t * W_b) = conv(alpha_t * x_t, W_b)``;
* over output channels: ``conv(x_t, alpha_t * W_b) = alpha_t * conv(x_t, W_b)`` (bias added after),

exact because ``alpha_t`` is constant over the frame's pixels and zero padding stays zero. So a
calibrated convolution is one static convolution over frames folded into the batch plus a
per-frame, per-channel multiply. ``form="weights"`` is the paper's formulation (per-clip, per-frame
weights and a grouped convolution with the batch folded into the groups), the reference.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _triple

CAL_DIMS = ("cin", "cout")
FORMS = ("weights", "features")

IntOr3 = Union[int, Sequence[int]]


class RouteFuncMLP(nn.Module):
    """The routing function giving the calibration weights ``alpha`` of shape ``(B, C, T, 1, 1)``.

    ``alpha = 1 + b(ReLU(BN(a(pool_hw(x) + g(pool_thw(x))))))`` (Eq. 4): ``g`` a 1x1x1 linear map of
    the global descriptor, ``a`` and ``b`` temporal convolutions of kernel ``kernels[0]`` and
    ``kernels[1]``, ``a`` reducing the channels by ``ratio``. ``b`` starts at zero, so alpha starts at 1.
    """

    def __init__(self, c_in: int, ratio: int, kernels: Sequence[int], bn_eps: float = 1e-5,
                 bn_mmt: float = 0.1) -> None:
        super().__init__()
        if len(kernels) != 2 or any(int(k) < 1 or int(k) % 2 == 0 for k in kernels):
            raise ValueError(f"kernels must be two odd temporal kernel sizes, got {list(kernels)}")
        if ratio < 1 or c_in // ratio < 1:
            raise ValueError(f"ratio {ratio} leaves no channels of {c_in}")
        self.c_in = c_in
        hidden = int(c_in // ratio)
        self.avgpool = nn.AdaptiveAvgPool3d((None, 1, 1))
        self.globalpool = nn.AdaptiveAvgPool3d(1)
        self.g = nn.Conv3d(c_in, c_in, kernel_size=1, padding=0)
        ka, kb = int(kernels[0]), int(kernels[1])
        self.a = nn.Conv3d(c_in, hidden, kernel_size=(ka, 1, 1), padding=(ka // 2, 0, 0))
        self.bn = nn.BatchNorm3d(hidden, eps=bn_eps, momentum=bn_mmt)
        self.relu = nn.ReLU(inplace=True)
        self.b = nn.Conv3d(hidden, c_in, kernel_size=(kb, 1, 1), padding=(kb // 2, 0, 0),
                           bias=False)
        self.b.skip_init = True  # type: ignore[assignment]  # initialisers must keep the zeros
        with torch.no_grad():
            self.b.weight.zero_()  # alpha starts at exactly 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.globalpool(x)
        x = self.avgpool(x)
        x = self.a(x + self.g(g))
        x = self.bn(x)
        x = self.relu(x)
        return self.b(x) + 1


def calibrated_conv2d(x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor,
                      bias: "torch.Tensor | None", stride: Tuple[int, int], padding: Tuple[int, int],
                      dilation: Tuple[int, int], groups: int, cal_dim: str,
                      form: str = "weights") -> torch.Tensor:
    """Calibrated 2D convolution of each frame of ``x`` ``(B, C_in, T, H, W)``.

    ``weight`` is ``(C_out, C_in / groups, kh, kw)``, ``bias`` ``(C_out,)`` or None, ``alpha``
    ``(B, C_a, T, 1, 1)`` with ``C_a`` the calibrated dimension's size (``C_in / groups`` for
    ``cin``, as the official code broadcasts it, ``C_out`` for ``cout``) or 1.
    Returns ``(B, C_out, T, H', W')``.
    """
    if cal_dim not in CAL_DIMS:
        raise ValueError(f"cal_dim must be one of {CAL_DIMS}, got {cal_dim!r}")
    b, c_in, t, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c_in, h, w)
    a = alpha.permute(0, 2, 1, 3, 4)  # (B, T, C_a, 1, 1)
    if form == "features":
        a = a.reshape(b * t, a.shape[2], 1, 1)
        if cal_dim == "cin":
            # Input channel k*C_in/g + j of group k meets weight column j: alpha[j] scales it.
            scale = a.repeat(1, groups, 1, 1) if a.shape[1] == c_in_g and groups > 1 else a
            y = F.conv2d(frames * scale, weight, bias, stride, padding, dilation, groups)
        else:
            y = F.conv2d(frames, weight, None, stride, padding, dilation, groups) * a
            if bias is not None:
                y = y + bias.view(1, -1, 1, 1)
    elif form == "weights":
        if cal_dim == "cin":
            per_frame = a.unsqueeze(2) * weight  # (B, T, C_out, C_in/g, kh, kw)
        else:
            per_frame = a.unsqueeze(3) * weight
        y = F.conv2d(frames.reshape(1, b * t * c_in, h, w),
                     per_frame.reshape(b * t * c_out, c_in_g, kh, kw),
                     None if bias is None else bias.repeat(b * t), stride, padding, dilation,
                     groups * b * t)
    else:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return y.reshape(b, t, c_out, y.shape[-2], y.shape[-1]).permute(0, 2, 1, 3, 4)


class TAdaConv2d(nn.Module):
    """Temporally adaptive 2D convolution on ``(B, C, T, H, W)`` tensors: ``forward(x, alpha)``.

    Parameters as the official code stores them: ``weight`` ``(1, 1, C_out, C_in/groups, kh, kw)``,
    ``bias`` ``(1, 1, C_out)``. ``kernel_size``, ``stride``, ``padding`` and ``dilation`` take the
    official 3-tuples whose temporal entries must be 1, 1, 0 and 1. ``form`` selects how forward
    computes (both are exact, see the module docstring); the default is the paper's formulation.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOr3, stride: IntOr3 = 1,
                 padding: IntOr3 = 0, dilation: IntOr3 = 1, groups: int = 1, bias: bool = True,
                 cal_dim: str = "cin") -> None:
        super().__init__()
        k3: Tuple[int, int, int] = _triple(kernel_size)
        s3: Tuple[int, int, int] = _triple(stride)
        p3: Tuple[int, int, int] = _triple(padding)
        d3: Tuple[int, int, int] = _triple(dilation)
        if k3[0] != 1 or s3[0] != 1 or p3[0] != 0 or d3[0] != 1:
            raise ValueError("TAdaConv2d is a 2D convolution per frame: the temporal kernel, "
                             "stride and dilation must be 1 and the temporal padding 0")
        if cal_dim not in CAL_DIMS:
            raise ValueError(f"cal_dim must be one of {CAL_DIMS}, got {cal_dim!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = k3
        self.stride = s3
        self.padding = p3
        self.dilation = d3
        self.groups = groups
        self.cal_dim = cal_dim
        self.form = "weights"
        self.weight = nn.Parameter(torch.empty(1, 1, out_channels, in_channels // groups,
                                               k3[1], k3[2]))
        if bias:
            self.bias = nn.Parameter(torch.empty(1, 1, out_channels))
        else:
            self.register_parameter("bias", None)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = (in_channels // groups) * k3[1] * k3[2]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def base_weight(self) -> torch.Tensor:
        """``W_b`` as a plain conv2d weight ``(C_out, C_in/groups, kh, kw)``."""
        return self.weight[0, 0]

    @property
    def base_bias(self) -> "torch.Tensor | None":
        return None if self.bias is None else self.bias.reshape(-1)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return calibrated_conv2d(x, alpha, self.base_weight, self.base_bias,
                                 (self.stride[1], self.stride[2]),
                                 (self.padding[1], self.padding[2]),
                                 (self.dilation[1], self.dilation[2]), self.groups, self.cal_dim,
                                 self.form)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"bias={self.bias is not None}, cal_dim={self.cal_dim!r}")


__all__ = ["RouteFuncMLP", "TAdaConv2d", "calibrated_conv2d", "CAL_DIMS", "FORMS"]
