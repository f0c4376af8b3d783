"""The camera data set: reproducible, balanced, its splits from disjoint sources, and each class
moving the picture the way its name says (measured on the rendered frames)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")
cv2 = pytest.importorskip("cv2")

from adaedge.data.camera import (CLASSES, PHOTOS, SPLIT_SIZES, VIDEOS,  # noqa: E402
                                 CameraDataset, render)


def test_clips_are_reproducible_and_splits_differ():
    a, b = CameraDataset("train", 8, 32), CameraDataset("train", 8, 32)
    for i in (0, 7, 123):
        np.testing.assert_array_equal(a[i][0], b[i][0])
        assert a[i][1] == b[i][1]
    assert not np.array_equal(CameraDataset("val", 8, 32)[0][0], a[0][0])
    assert not np.array_equal(CameraDataset("test", 8, 32)[0][0], a[0][0])


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_split_is_balanced(split):
    ds = CameraDataset(split, 8, 24)
    assert len(ds) == SPLIT_SIZES[split] and len(ds) % len(CLASSES) == 0
    assert [ds.uint8(i)[1] for i in range(18)] == [i % 9 for i in range(18)]


def test_no_source_is_in_two_splits():
    splits = list(PHOTOS)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not set(PHOTOS[a]) & set(PHOTOS[b]), (a, b)
    assert len(set(VIDEOS.values())) == len(VIDEOS)
    assert VIDEOS["test"] == "bikes.mp4"          # held-out real footage: the demo's video


def test_clip_shape_range_and_type():
    clip, label = CameraDataset("test", 8, 40)[3]
    assert clip.shape == (3, 8, 40, 40) and clip.dtype == np.float32
    assert 0.0 <= clip.min() and clip.max() <= 1.0 and label == 3
    x, y = CameraDataset("test", 8, 40, 18).arrays_uint8()
    assert x.shape == (18, 3, 8, 40, 40) and x.dtype == np.uint8 and y.tolist() == [i % 9 for i in range(18)]
    np.testing.assert_array_equal(x[3].astype(np.float32) / 255.0, clip)


def _shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How far the content moved from frame a to frame b (dx, dy), by phase correlation."""
    ga = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float64)
    gb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY).astype(np.float64)
    win = cv2.createHanningWindow(ga.shape[::-1], cv2.CV_64F)
    (dx, dy), _ = cv2.phaseCorrelate(ga, gb, win)
    return np.array([dx, dy])


def _motion(label: str, n: int = 10):
    """Median content shift per frame pair (first to last frame / frames) and the mean change
    between consecutive frames, over n clips of one class rendered from the train sources."""
    shifts, change = [], []
    for k in range(n):
        frames = render(label, np.random.default_rng((99, k)), "train", 8, 64)
        shifts.append(_shift(frames[0], frames[-1]) / 7)
        change.append(np.abs(np.diff(frames.astype(np.float32), axis=0)).mean())
    return np.median(np.array(shifts), axis=0), float(np.mean(change))


def test_each_class_moves_the_picture_as_its_name_says():
    (sx, sy), still = _motion("still")
    assert abs(sx) < 0.2 and abs(sy) < 0.2
    expected = {"pan_left": (1, 0), "pan_right": (-1, 0), "tilt_up": (0, 1), "tilt_down": (0, -1)}
    for label, (ex, ey) in expected.items():
        (dx, dy), change = _motion(label)
        assert change > 2 * still, label
        # 2.5-8% of the view per frame: 1.6-5 pixels at 64
        if ex:
            assert ex * dx > 1.0 and abs(dy) < 0.5, (label, dx, dy)
        else:
            assert ey * dy > 1.0 and abs(dx) < 0.5, (label, dx, dy)
    for label in ("zoom_in", "zoom_out", "shake", "object_moves"):
        assert _motion(label)[1] > 1.5 * still, label


def test_zoom_in_grows_the_content_and_zoom_out_shrinks_it():
    def scale(label: str) -> float:
        out = []
        for k in range(6):
            f = render(label, np.random.default_rng((98, k)), "train", 8, 64).astype(np.float32)
            first, last = f[0], f[-1]
            # the scale s that best maps the first frame's centre onto the last frame's
            best = min(np.linspace(0.5, 2.0, 31), key=lambda s: np.abs(
                cv2.warpAffine(first, np.array([[s, 0, 32 * (1 - s)], [0, s, 32 * (1 - s)]]),
                               (64, 64))[16:48, 16:48] - last[16:48, 16:48]).mean())
            out.append(best)
        return float(np.median(out))
    assert scale("zoom_in") > 1.15 and scale("zoom_out") < 0.87


def test_a_moving_object_moves_part_of_the_picture_while_the_camera_stands():
    """object_moves: the picture changes where the object is, not everywhere."""
    for k in range(5):
        f = render("object_moves", np.random.default_rng((97, k)), "train", 8, 64)
        diff = np.abs(f[-1].astype(np.float32) - f[0].astype(np.float32)).mean(-1)
        changed = diff > 40
        assert 0.01 < changed.mean() < 0.5, k
