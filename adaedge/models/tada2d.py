"""TAda2D (Huang et al., ICLR 2022): a ResNet whose 3x3 convolutions are TAdaConv2d.

The layout of the paper and of its official code (``TAda2DBlock`` in a ``ResNet3D``), with the same
module names, so a state dict saved by the official code loads unchanged:

    backbone.conv1                  stem: 1x7x7 conv, stride (1, 2, 2), BN, ReLU (no max pool)
    backbone.conv{2..5}.res_{i}     bottleneck blocks; the first of each stage strides (1, 2, 2)
        short_cut, short_cut_bn     1x1x1 projection (first block of a stage)
        conv_branch.a, a_bn, a_relu                 1x1x1 reduction
        conv_branch.b, b_rf                         TAdaConv2d 3x3 and its routing function
        conv_branch.b_bn + b_avgpool_bn(b_avgpool)  the temporal-aggregation branch (Fig. 3):
                                                    two batch norms over the same calibrated map,
                                                    one after a 3x1x1 average pool, summed
        conv_branch.b_relu, c, c_bn                 ReLU, 1x1x1 expansion
        relu(short_cut + conv_branch)
    head.out                        linear classifier over the globally pooled features

``forward`` returns logits (the official head applies softmax in eval mode; the runtime does).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..nn.tadaconv import CAL_DIMS, RouteFuncMLP, TAdaConv2d
from .registry import ExportOption, Family

# Blocks per stage; TAda2D always uses bottleneck blocks (the official code builds it from depth 50).
STAGE_BLOCKS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
NUM_FILTERS = (64, 256, 512, 1024, 2048)
EXPANSION = 4


class Stem(nn.Module):
    """``Base2DStem``: one 1 x k x k convolution per frame, BN, ReLU."""

    def __init__(self, dim_in: int, dim_out: int, kernel: int, stride: int, bn_eps: float,
                 bn_mmt: float) -> None:
        super().__init__()
        self.a = nn.Conv3d(dim_in, dim_out, kernel_size=(1, kernel, kernel),
                           stride=(1, stride, stride), padding=(0, kernel // 2, kernel // 2),
                           bias=False)
        self.a_bn = nn.BatchNorm3d(dim_out, eps=bn_eps, momentum=bn_mmt)
        self.a_relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_relu(self.a_bn(self.a(x)))


class TAda2DBlock(nn.Module):
    """The bottleneck branch: 1x1x1, TAdaConv2d 3x3 with temporal aggregation, 1x1x1."""

    def __init__(self, dim_in: int, num_filters: int, kernel: int, stride: int,
                 route_func_k: Sequence[int], route_func_r: int, pool_k: Sequence[int],
                 bn_eps: float, bn_mmt: float, cal_dim: str = "cin") -> None:
        super().__init__()
        mid = num_filters // EXPANSION
        self.a = nn.Conv3d(dim_in, mid, kernel_size=1, stride=1, padding=0, bias=False)
        self.a_bn = nn.BatchNorm3d(mid, eps=bn_eps, momentum=bn_mmt)
        self.a_relu = nn.ReLU(inplace=True)
        self.b = TAdaConv2d(mid, mid, kernel_size=[1, kernel, kernel], stride=[1, stride, stride],
                            padding=[0, kernel // 2, kernel // 2], bias=False, cal_dim=cal_dim)
        self.b_rf = RouteFuncMLP(c_in=mid, ratio=route_func_r, kernels=route_func_k)
        self.b_bn = nn.BatchNorm3d(mid, eps=bn_eps, momentum=bn_mmt)
        pk = (int(pool_k[0]), int(pool_k[1]), int(pool_k[2]))
        self.b_avgpool = nn.AvgPool3d(kernel_size=pk, stride=1,
                                      padding=(pk[0] // 2, pk[1] // 2, pk[2] // 2))
        self.b_avgpool_bn = nn.BatchNorm3d(mid, eps=bn_eps, momentum=bn_mmt)
        self.b_avgpool_bn.skip_init = True  # type: ignore[assignment]
        with torch.no_grad():  # the aggregation branch starts switched off, as the paper's code
            self.b_avgpool_bn.weight.zero_()
            self.b_avgpool_bn.bias.zero_()
        self.b_relu = nn.ReLU(inplace=True)
        self.c = nn.Conv3d(mid, num_filters, kernel_size=1, stride=1, padding=0, bias=False)
        self.c_bn = nn.BatchNorm3d(num_filters, eps=bn_eps, momentum=bn_mmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_relu(self.a_bn(self.a(x)))
        x = self.b(x, self.b_rf(x))
        x = self.b_bn(x) + self.b_avgpool_bn(self.b_avgpool(x))
        x = self.b_relu(x)
        return self.c_bn(self.c(x))


class ResBlock(nn.Module):
    """``Base3DBlock``: ``relu(shortcut(x) + conv_branch(x))``."""

    def __init__(self, dim_in: int, num_filters: int, stride: int, bn_eps: float, bn_mmt: float,
                 **branch: Any) -> None:
        super().__init__()
        if dim_in != num_filters or stride != 1:
            self.short_cut = nn.Conv3d(dim_in, num_filters, kernel_size=1, stride=(1, stride, stride),
                                       padding=0, bias=False)
            self.short_cut_bn = nn.BatchNorm3d(num_filters, eps=bn_eps, momentum=bn_mmt)
        self.conv_branch = TAda2DBlock(dim_in, num_filters, stride=stride, bn_eps=bn_eps,
                                       bn_mmt=bn_mmt, **branch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short_cut = x
        if hasattr(self, "short_cut"):
            short_cut = self.short_cut_bn(self.short_cut(x))
        return self.relu(short_cut + self.conv_branch(x))


class Stage(nn.Module):
    """``Base3DResStage``: blocks named ``res_1``, ``res_2``, ..."""

    def __init__(self, blocks: List[ResBlock]) -> None:
        super().__init__()
        self.num_blocks = len(blocks)
        for i, block in enumerate(blocks):
            self.add_module(f"res_{i + 1}", block)

    def blocks(self) -> List[ResBlock]:
        return [getattr(self, f"res_{i + 1}") for i in range(self.num_blocks)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks():
            x = block(x)
        return x


class Backbone(nn.Module):
    def __init__(self, conv1: Stem, stages: List[Stage]) -> None:
        super().__init__()
        self.conv1 = conv1
        self.conv2, self.conv3, self.conv4, self.conv5 = stages

    def stages(self) -> List[Stage]:
        return [self.conv2, self.conv3, self.conv4, self.conv5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.stages():
            x = stage(x)
        return x


class Head(nn.Module):
    """``BaseHead``: global average pool, dropout, linear ``out``; returns logits."""

    def __init__(self, dim: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.global_avg_pool = nn.AdaptiveAvgPool3d(1)
        if dropout > 0:
            self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, num_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_avg_pool(x).flatten(1)
        if hasattr(self, "dropout"):
            x = self.dropout(x)
        return self.out(x)


class TAda2D(nn.Module):
    """TAda2D: ``backbone`` (stem and four stages of TAda2D blocks) and ``head``."""

    def __init__(self, stage_blocks: Sequence[int], num_filters: Sequence[int], num_classes: int,
                 frames: int, size: int, downsampling: Sequence[bool], stem_kernel: int = 7,
                 kernel: int = 3, route_func_k: Sequence[int] = (3, 3), route_func_r: int = 4,
                 pool_k: Sequence[int] = (3, 1, 1), bn_eps: float = 1e-5, bn_mmt: float = 0.1,
                 dropout: float = 0.0, cal_dim: str = "cin", in_channels: int = 3) -> None:
        super().__init__()
        if len(stage_blocks) != 4 or any(int(n) < 1 for n in stage_blocks):
            raise ValueError(f"stage_blocks must be four positive counts, got {list(stage_blocks)}")
        if len(num_filters) != 5 or any(int(f) % EXPANSION for f in num_filters[1:]):
            raise ValueError(f"num_filters must be five widths, the last four divisible by "
                             f"{EXPANSION}, got {list(num_filters)}")
        if len(downsampling) != 5:
            raise ValueError("downsampling must hold five flags (stem and four stages)")
        if len(pool_k) != 3 or any(int(k) % 2 == 0 for k in pool_k):
            raise ValueError(f"pool_k must be three odd sizes, got {list(pool_k)}")
        if cal_dim not in CAL_DIMS:
            raise ValueError(f"cal_dim must be one of {CAL_DIMS}")
        self.num_classes = int(num_classes)
        self.frames = int(frames)
        self.size = int(size)
        stem = Stem(in_channels, int(num_filters[0]), stem_kernel, 2 if downsampling[0] else 1,
                    bn_eps, bn_mmt)
        stages = []
        dim_in = int(num_filters[0])
        for s in range(4):
            nf = int(num_filters[s + 1])
            blocks = []
            for i in range(int(stage_blocks[s])):
                stride = 2 if (i == 0 and downsampling[s + 1]) else 1
                blocks.append(ResBlock(dim_in, nf, stride, bn_eps, bn_mmt, kernel=kernel,
                                       route_func_k=route_func_k, route_func_r=route_func_r,
                                       pool_k=pool_k, cal_dim=cal_dim))
                dim_in = nf
            stages.append(Stage(blocks))
        self.backbone = Backbone(stem, stages)
        self.head = Head(dim_in, num_classes, dropout)
        _init_weights(self)

    def blocks(self) -> List[Tuple[str, ResBlock]]:
        return [(f"backbone.conv{s + 2}.res_{i + 1}", b)
                for s, stage in enumerate(self.backbone.stages()) for i, b in enumerate(stage.blocks())]

    def tada_layers(self) -> List[Tuple[str, TAdaConv2d]]:
        return [(n + ".conv_branch.b", b.conv_branch.b) for n, b in self.blocks()]

    def set_form(self, form: str) -> None:
        """How every TAdaConv2d computes (``weights``: the paper's; ``features``: factorised)."""
        for _, layer in self.tada_layers():
            layer.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _init_weights(model: nn.Module) -> None:
    """ResNet initialisation as the official code does it (skipping modules marked skip_init)."""
    for m in model.modules():
        if getattr(m, "skip_init", False):
            continue
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


def _widths(width_mult: float) -> List[int]:
    return [max(8, int(round(f * width_mult / 8)) * 8) for f in NUM_FILTERS]


def tada2d(depth: int = 50, num_classes: int = 400, frames: int = 8, size: int = 224,
           width_mult: float = 1.0, num_filters: Optional[Sequence[int]] = None,
           stage_blocks: Optional[Sequence[int]] = None,
           downsampling: Sequence[bool] = (True, True, True, True, True), stem_kernel: int = 7,
           kernel: int = 3, route_func_k: Sequence[int] = (3, 3), route_func_r: int = 4,
           pool_k: Sequence[int] = (3, 1, 1), bn_eps: float = 1e-5, bn_mmt: float = 0.1,
           dropout: float = 0.0, cal_dim: str = "cin") -> TAda2D:
    """TAda2D-ResNet (default: ResNet-50 widths and depth, 8 frames at 224x224, 400 classes).

    ``stage_blocks`` overrides the blocks per stage that ``depth`` gives; ``num_filters`` the five
    widths that ``width_mult`` scales (stem, then the four stages' outputs).
    """
    if stage_blocks is None:
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"depth {depth} is not one of {sorted(STAGE_BLOCKS)}; "
                             "or give stage_blocks")
        stage_blocks = STAGE_BLOCKS[depth]
    widths = list(num_filters) if num_filters is not None else _widths(width_mult)
    return TAda2D(stage_blocks, widths, num_classes, frames, size, downsampling, stem_kernel,
                  kernel, route_func_k, route_func_r, pool_k, bn_eps, bn_mmt, dropout, cal_dim)


def config_from_official(cfg: "str | Mapping[str, Any]") -> Dict[str, Any]:
    """Builder config of :func:`tada2d` from the ``cfg`` an official checkpoint stores (JSON text).

    Raises ValueError when the config is not one of a TAda2D this module builds.
    """
    c = json.loads(cfg) if isinstance(cfg, str) else dict(cfg)
    video = c.get("VIDEO") or {}
    bb = video.get("BACKBONE") or {}
    branch = (bb.get("BRANCH") or {})
    name = (c.get("MODEL") or {}).get("NAME")
    if branch.get("NAME") != "TAda2DBlock" or (bb.get("STEM") or {}).get("NAME") != "Base2DStem":
        raise ValueError(f"the checkpoint's config is not a TAda2D (MODEL.NAME {name!r}, branch "
                         f"{branch.get('NAME')!r}, stem {(bb.get('STEM') or {}).get('NAME')!r})")
    if any(bb.get("DOWNSAMPLING_TEMPORAL") or []):
        raise ValueError("temporal downsampling is not part of TAda2D (TAdaConv2d strides 1 in time)")
    depth = bb.get("DEPTH", 50)
    if depth not in STAGE_BLOCKS:
        raise ValueError(f"TAda2D depth {depth!r} is not one of {sorted(STAGE_BLOCKS)}")
    kernels = bb.get("KERNEL_SIZE") or [[1, 7, 7], [1, 3, 3]]
    data = c.get("DATA") or {}
    bn = c.get("BN") or {}
    head = video.get("HEAD") or {}
    if head.get("NUM_CLASSES") is None:
        raise ValueError("the checkpoint's config has no VIDEO.HEAD.NUM_CLASSES")
    return {"depth": int(depth), "num_classes": int(head["NUM_CLASSES"]),
            "frames": int(data.get("NUM_INPUT_FRAMES", 8)),
            "size": int(data.get("TRAIN_CROP_SIZE") or data.get("TEST_CROP_SIZE") or 224),
            "num_filters": [int(f) for f in bb.get("NUM_FILTERS", NUM_FILTERS)],
            "downsampling": [bool(d) for d in bb.get("DOWNSAMPLING", [True] * 5)],
            "stem_kernel": int(kernels[0][1]), "kernel": int(kernels[1][1]),
            "route_func_k": [int(k) for k in branch.get("ROUTE_FUNC_K", [3, 3])],
            "route_func_r": int(branch.get("ROUTE_FUNC_R", 4)),
            "pool_k": [int(k) for k in branch.get("POOL_K", [3, 1, 1])],
            "bn_eps": float(bn.get("EPS", 1e-5)), "bn_mmt": float(bn.get("MOMENTUM", 0.1)),
            "dropout": float(head.get("DROPOUT_RATE", 0.0))}


def official_checkpoint(state: Mapping[str, Any], meta: Mapping[str, Any],
                        name: Optional[str]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """An official TAdaConv file (``{"model_state", "cfg"}``): its config, read from ``cfg``."""
    if not meta.get("official_cfg") or name not in (None, "tada2d"):
        return None
    return "tada2d", config_from_official(meta["official_cfg"])


FAMILY = Family(
    name="tada", title="TAda2D",
    builders={"tada2d": tada2d},
    exporter="adaedge.export.tada:export_tada",
    executions=(("calibrated", "the factorised calibrated convolution (CalibratedConv nodes)"),
                ("official", "the official code's per-clip weights and grouped convolution, "
                             "batch 1; for comparison"),
                ("uncalibrated", "alpha fixed at 1, no routing function: a benchmark's lower "
                                 "bound, not the model's function")),
    options=(ExportOption("routing", "the routing function inside each block's piece (fused, "
                                     "default) or a piece of its own", choices=("fused", "separate")),),
    official=official_checkpoint,
    checkpoint_help="official TAdaConv checkpoints ({'model_state', 'cfg'})",
)

__all__ = ["TAda2D", "tada2d", "config_from_official", "official_checkpoint", "STAGE_BLOCKS",
           "FAMILY"]
