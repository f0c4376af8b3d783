"""AdaFocus building blocks: cropping a cube out of a clip by interpolation at a continuous centre.

A cube of ``(ct, ch, cw)`` (frames, height, width) at centre ``c`` in ``[0, 1]^3`` starts at
``c * (L - l)`` along each axis of length ``L`` (AdaFocusV2's patch placement, per axis) and samples
the clip with linear interpolation at the ``l`` consecutive positions from there. Along one axis this
is a matrix ``R[i, j] = max(0, 1 - |start + i - j|)`` (``l x L``), so the crop is three small matrix
products, differentiable with respect to the centre (which is how the policy learns end to end) and
exported as plain MatMuls.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch


def interpolation_matrix(start: torch.Tensor, out_len: int, in_len: int) -> torch.Tensor:
    """``(N, out_len, in_len)`` linear-interpolation weights for positions ``start + 0..out_len-1``."""
    pos = start[:, None] + torch.arange(out_len, dtype=start.dtype, device=start.device)
    grid = torch.arange(in_len, dtype=start.dtype, device=start.device)
    return torch.relu(1.0 - (pos[:, :, None] - grid[None, None, :]).abs())


def crop_cube(clip: torch.Tensor, centre: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop ``clip`` (N, C, T, H, W) at ``centre`` (N, 3) = (t, y, x) in [0, 1] to (N, C, ct, ch, cw)."""
    n, c, t, h, w = clip.shape
    ct, ch, cw = (int(s) for s in size)
    if not (1 <= ct <= t and 1 <= ch <= h and 1 <= cw <= w):
        raise ValueError(f"cube {tuple(size)} does not fit in a clip of {(t, h, w)}")
    centre = centre.clamp(0.0, 1.0)
    rt = interpolation_matrix(centre[:, 0] * (t - ct), ct, t)   # (N, ct, T)
    ry = interpolation_matrix(centre[:, 1] * (h - ch), ch, h)   # (N, ch, H)
    rx = interpolation_matrix(centre[:, 2] * (w - cw), cw, w)   # (N, cw, W)
    x = torch.matmul(clip, rx[:, None, None].transpose(-1, -2))           # (N, C, T, H, cw)
    x = torch.matmul(ry[:, None, None], x)                                # (N, C, T, ch, cw)
    x = torch.matmul(rt[:, None], x.reshape(n, c, t, ch * cw))            # (N, C, ct, ch*cw)
    return x.reshape(n, c, ct, ch, cw)


def cube_bounds(centre: torch.Tensor, clip_shape: Tuple[int, int, int],
                size: Sequence[int]) -> torch.Tensor:
    """Start positions (t, y, x) of the cubes, for drawing them: (N, 3)."""
    lengths = torch.tensor(clip_shape, dtype=centre.dtype) - torch.tensor(list(size), dtype=centre.dtype)
    return centre.clamp(0.0, 1.0) * lengths


__all__ = ["interpolation_matrix", "crop_cube", "cube_bounds"]
