"""The procedural motion data set: reproducible, balanced, and told apart by motion only."""

from __future__ import annotations

import numpy as np
import pytest

from adaedge.data import CLASSES, MotionDataset, render_clip


def test_clips_are_reproducible_and_splits_differ():
    a, b = MotionDataset("train", 8, 24), MotionDataset("train", 8, 24)
    for i in (0, 7, 123):
        np.testing.assert_array_equal(a[i][0], b[i][0])
        assert a[i][1] == b[i][1]
    assert not np.array_equal(MotionDataset("val", 8, 24)[0][0], a[0][0])


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_split_is_balanced(split):
    ds = MotionDataset(split, 8, 16)
    counts = np.bincount([i % len(CLASSES) for i in range(len(ds))], minlength=len(CLASSES))
    assert len(set(counts.tolist())) == 1
    assert [ds[i][1] for i in range(20)] == [i % 10 for i in range(20)]


def test_clip_shape_range_and_type():
    clip, label = MotionDataset("test", 8, 32)[3]
    assert clip.shape == (3, 8, 32, 32) and clip.dtype == np.float32
    assert 0.0 <= clip.min() and clip.max() <= 1.0 and label == 3


def _frame_change(label, n=12):
    """Mean absolute change between consecutive frames, averaged over clips of one class."""
    out = []
    for k in range(n):
        clip = render_clip(label, np.random.default_rng((7, k)), 8, 32)
        out.append(np.abs(np.diff(clip, axis=1)).mean())
    return float(np.mean(out))


def test_still_clips_change_only_by_noise_and_moving_clips_change_more():
    still = _frame_change("still")
    for label in CLASSES[1:]:
        assert _frame_change(label) > 1.2 * still, label


def test_appearance_does_not_depend_on_the_class():
    """The first frame's statistics are alike across classes: only motion tells them apart."""
    ds = MotionDataset("train", 8, 32, 1000)
    means = np.array([[ds[i][0][:, 0].mean() for i in range(k, 1000, 10)] for k in range(10)])
    spread = means.mean(axis=1).std()
    assert spread < 0.03, means.mean(axis=1)


def test_unknown_class_and_split():
    with pytest.raises(ValueError, match="unknown class"):
        render_clip("fly", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown split"):
        MotionDataset("holdout")
