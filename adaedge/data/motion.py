"""A procedural video data set whose classes can only be told apart by motion.

Each clip shows one textured object (ellipse, rectangle or triangle, striped and checkered in
random colours) on a random, noisy, low-frequency background, with fresh sensor noise every frame.
Appearance is drawn independently of the class; only the motion differs:

    still, slide_left, slide_right, slide_up, slide_down, rotate_cw, rotate_ccw, zoom_in, zoom_out,
    shake

at a speed drawn per clip (0.5x to 1.5x of each class's base speed). Clip ``i`` of a split is
always the same: it is drawn from ``numpy.random.default_rng((SPLIT_SEEDS[split], i))``; its class
is ``i % 10``, so every split is balanced. Clips are float32 (3, T, S, S) in [0, 1], RGB; normalise
them with the bundle's mean and std before the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence, Tuple

import numpy as np

from .split import SplitDataset

CLASSES = ("still", "slide_left", "slide_right", "slide_up", "slide_down", "rotate_cw",
           "rotate_ccw", "zoom_in", "zoom_out", "shake")
MOVING = tuple(c for c in CLASSES if c != "still")
SPLIT_SEEDS = {"train": 1001, "val": 2002, "test": 3003}
SPLIT_SIZES = {"train": 6000, "val": 1000, "test": 1000}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a random grid, bilinearly upsampled to size x size."""
    grid = rng.random((cells + 1, cells + 1))
    pos = np.linspace(0, cells, size)
    i = np.minimum(pos.astype(int), cells - 1)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _motion(label: str, t: np.ndarray, speed: float, size: int,
            rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centre (x, y), angle (radians) and scale of the object for one class."""
    n = len(t)
    cx, cy = np.full(n, 0.5 * size), np.full(n, 0.5 * size)
    angle = np.full(n, rng.uniform(0, 2 * np.pi))
    scale = np.ones(n)
    step = 0.045 * size * speed              # slide: pixels per frame
    dt = t - t.mean()
    if label == "slide_left":
        cx = cx - step * dt
    elif label == "slide_right":
        cx = cx + step * dt
    elif label == "slide_up":
        cy = cy - step * dt
    elif label == "slide_down":
        cy = cy + step * dt
    elif label in ("rotate_cw", "rotate_ccw"):
        sign = 1.0 if label == "rotate_cw" else -1.0
        angle = angle + sign * np.deg2rad(25.0) * speed * dt   # < 45 deg: the checker's symmetry
    elif label in ("zoom_in", "zoom_out"):
        sign = 1.0 if label == "zoom_in" else -1.0
        scale = np.exp(sign * 0.09 * speed * dt)
    elif label == "shake":
        jitter = rng.uniform(-1, 1, size=(2, n)) * 0.1 * size * speed
        cx, cy = cx + jitter[0], cy + jitter[1]
    return cx, cy, angle, scale


def render_clip(label: str, rng: np.random.Generator, frames: int = 8,
                size: int = 32) -> np.ndarray:
    """One clip of ``label`` as float32 (3, frames, size, size) in [0, 1]."""
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; classes: {', '.join(CLASSES)}")
    speed = rng.uniform(0.5, 1.5)
    t = np.arange(frames, dtype=np.float64)
    # background: two colours mixed by smooth noise, plus fine static texture
    c0, c1 = rng.random(3), rng.random(3)
    mix = _smooth_noise(rng, size, int(rng.integers(2, 6)))
    bg = c0[:, None, None] * mix + c1[:, None, None] * (1 - mix)
    bg = bg + rng.normal(0, rng.uniform(0.02, 0.08), size=(1, size, size))
    # object: shape, size, colours and texture frequencies
    shape = int(rng.integers(3))
    radius = rng.uniform(0.18, 0.3) * size
    oc0, oc1 = rng.random(3), rng.random(3)
    freq = rng.uniform(2.5, 5.0)
    phase = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.6, 1.0)
    cx, cy, angle, scale = _motion(label, t, speed, size, rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    # object coordinates of every pixel in every frame: q = R(-angle) (p - c) / (radius * scale)
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    ca, sa = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    r = (radius * scale)[:, None, None]
    qx = (ca * dx + sa * dy) / r
    qy = (-sa * dx + ca * dy) / r / aspect
    if shape == 0:       # ellipse
        dist = 1.0 - np.sqrt(qx ** 2 + qy ** 2)
    elif shape == 1:     # rectangle
        dist = 1.0 - np.maximum(np.abs(qx), np.abs(qy))
    else:                # triangle
        dist = np.minimum(np.minimum(qy + 0.5, 0.8 - 0.8 * qy - 1.4 * qx), 0.8 - 0.8 * qy + 1.4 * qx)
    mask = np.clip(dist * r / 1.5 + 0.5, 0.0, 1.0)          # about 1.5 px of anti-aliasing
    stripes = 0.5 + 0.5 * np.sin(freq * np.pi * qx + phase)
    checker = (np.floor(qx * 2.0) + np.floor(qy * 2.0)) % 2
    tex = 0.7 * stripes + 0.3 * checker
    obj = oc0[:, None, None, None] * tex[None] + oc1[:, None, None, None] * (1 - tex[None])
    clip = bg[:, None] * (1 - mask[None]) + obj * mask[None]
    clip = clip * rng.uniform(0.7, 1.2) + rng.normal(0, rng.uniform(0.01, 0.05), clip.shape)
    return np.clip(clip, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class MotionDataset(SplitDataset):
    """Clips of one split, drawn on demand: ``ds[i] -> (clip, label index)``."""

    size: int = 32

    seeds: ClassVar[Mapping[str, int]] = SPLIT_SEEDS
    sizes: ClassVar[Mapping[str, int]] = SPLIT_SIZES
    classes: ClassVar[Sequence[str]] = CLASSES

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int]:
        label, rng = self.draw(i)
        return render_clip(CLASSES[label], rng, self.frames, self.size), label

    def arrays(self, start: int = 0, stop: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """Clips [start, stop) stacked: float32 (n, 3, T, S, S) and int64 labels (n,)."""
        stop = stop or self.length
        items = [self[i] for i in range(start, stop)]
        return (np.stack([c for c, _ in items]), np.array([y for _, y in items], dtype=np.int64))
