"""The demo on a real recorded video, its clear errors, and the shipped checkpoint's stated accuracy."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from adaedge import models, runtime
from adaedge.cli import main
from adaedge.data import CLASSES, MotionDataset
from adaedge.demo import DEMO_CHECKPOINT, SourceError, default_video, demo_bundle, run_demo
from adaedge.export import export
from adaedge.training.vared import normalise

from .conftest import tiny_model


@pytest.fixture(scope="module")
def labelled_bundle(tmp_path_factory):
    """A tiny bundle whose clips are 5 frames of 32x32, with labels, for fast demo runs."""
    out = tmp_path_factory.mktemp("demo") / "b"
    export(tiny_model(), out, labels=[f"class{i}" for i in range(5)])
    return out


def _frames(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while True:
        ok, _ = cap.read()
        if not ok:
            break
        n += 1
    cap.release()
    return n


def test_headless_demo_on_a_recorded_video_writes_one_frame_per_input_frame(labelled_bundle,
                                                                          tmp_path):
    out = tmp_path / "out.mp4"
    summary = run_demo(source=default_video(), bundle=labelled_bundle, headless=True, output=out,
                       frame_step=2, clip_stride=8, pace=False, max_frames=60, log=lambda s: None)
    assert summary.frames_read == 60 and summary.frames_written == 60
    assert _frames(out) == 60
    # T = 5 sampled every 2nd frame fills at frame 8; clips are offered at 8, 16, ..., 56
    assert summary.clips_submitted == 7
    assert summary.clips_inferred + summary.clips_skipped == summary.clips_submitted
    assert summary.clips_inferred >= 1 and len(summary.latencies_ms) == summary.clips_inferred
    assert sum(summary.labels.values()) == summary.clips_inferred
    assert sum(summary.branch_counts.values()) == 37 * summary.clips_inferred
    d = summary.to_json()
    assert d["median_ms"] > 0 and 0 < d["mean_gflops"] and abs(sum(d["branch_share"].values()) - 1) < 1e-3
    text = summary.text()
    assert "60 read, 60 written" in text and str(out) in text


def test_paced_playback_keeps_up_with_the_file_and_skips_nothing(labelled_bundle, tmp_path):
    summary = run_demo(source=default_video(), bundle=labelled_bundle, headless=True,
                       output=tmp_path / "o.mp4", max_frames=30, pace=True, log=lambda s: None)
    assert summary.clips_skipped == 0 and summary.clips_inferred == summary.clips_submitted
    assert summary.display_fps <= 25.0 * 1.02   # paced: never faster than the file's 25 FPS


def test_a_missing_file_and_a_missing_camera_say_how_to_choose_a_source(labelled_bundle, tmp_path):
    with pytest.raises(SourceError, match="does not exist; choose a source with --source"):
        run_demo(source=tmp_path / "nope.mp4", bundle=labelled_bundle, headless=True)
    with pytest.raises(SourceError, match="camera 7 is not there"):
        run_demo(source=7, bundle=labelled_bundle, headless=True)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 1000)
    with pytest.raises(SourceError, match="cannot|no frames"):
        run_demo(source=junk, bundle=labelled_bundle, headless=True, output=tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()


def test_the_demo_command_prints_a_json_summary(labelled_bundle, tmp_path, capsys):
    assert main(["demo", "--bundle", str(labelled_bundle), "--headless", "--output",
                 str(tmp_path / "d.mp4"), "--max-frames", "20", "--no-pace", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["frames_read"] == 20 and d["frames_written"] == 20
    assert main(["demo", "--source", str(tmp_path / "none.avi"), "--bundle",
                 str(labelled_bundle)]) == 2
    assert "choose a source with --source" in capsys.readouterr().err


# -- the shipped checkpoint ---------------------------------------------------------------

SAMPLE = 300   # a fixed sample: the first 300 clips of the test split


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    if not DEMO_CHECKPOINT.is_file():
        pytest.fail(f"the shipped checkpoint {DEMO_CHECKPOINT} is missing")
    out = tmp_path_factory.mktemp("shipped") / "b"
    model = models.load_model(DEMO_CHECKPOINT)
    _, meta = models.read_checkpoint(DEMO_CHECKPOINT)
    export(model, out, labels=meta["labels"])
    return runtime.load(out), meta


def test_shipped_checkpoint_reaches_its_stated_accuracy(shipped):
    rt, meta = shipped
    x, y = MotionDataset("test", rt.manifest.input["frames"], rt.manifest.input["size"][0],
                         SAMPLE).arrays()
    result = rt.classify(normalise(x))
    accuracy = float((result.labels == y).mean())
    assert abs(accuracy - meta["test_top1"]) <= 0.05, (accuracy, meta["test_top1"])
    flops = np.array([t.flops for t in result.traces]) / 1e9
    per_class = meta["gflops_per_class"]
    for k, name in enumerate(CLASSES):    # the card's GFLOPs per class hold on this sample
        assert abs(flops[y == k].mean() - per_class[name]) <= 0.1 * per_class[name], name


def test_shipped_checkpoint_is_small_and_documented():
    assert DEMO_CHECKPOINT.stat().st_size < 10 * 2 ** 20
    card = DEMO_CHECKPOINT.with_suffix(".md").read_text()
    assert "What it is not" in card and "adaedge train" in card


def test_default_demo_bundle_is_exported_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAEDGE_CACHE", str(tmp_path))
    first = demo_bundle(log=lambda s: None)
    assert first.is_relative_to(tmp_path) and (first / "manifest.json").is_file()
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert demo_bundle(log=lambda s: None) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
