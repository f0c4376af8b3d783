"""Nothing lost under faults and concurrency: real processes at once, real kills, a full disk.

Each test runs the command line in separate processes (``python -m adaedge``), as two users or
two terminals would, and checks the bundle afterwards: whole, holding every writer's update.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest

from adaedge import runtime
from adaedge.bundle import load as load_bundle
from adaedge.bundle.lock import LOCK
from adaedge.export import export

from .conftest import tiny_model
from .test_adafocus import tiny_focus

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ["--config", "num_classes=5", "--config", "frames=5", "--config", "size=32",
               "--config", "width_mult=0.125"]


def adaedge(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "adaedge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=kw.get("cwd"))


def finish(procs: List[subprocess.Popen], timeout: float = 300) -> List[tuple]:
    return [(p.wait(timeout), *p.communicate()) for p in procs]


def hold_lock(bundle: Path):
    """The bundle's lock, taken by this (test) process as another writer would."""
    fd = os.open(bundle / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stderr_says(proc_err: Path, text: str):
    return lambda: text in proc_err.read_text() if proc_err.exists() else False


def test_two_exports_to_one_new_folder_exactly_one_wins(tmp_path):
    out = tmp_path / "b"
    procs = [adaedge("export", "vared_r2plus1d_18", "--random-weights", "--seed", str(seed),
                     *TINY_CONFIG, "--out", str(out), "-q") for seed in (1, 2)]
    results = finish(procs)
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = [r for r in results if r[0] == 2][0]
    assert loser[2].count("\n") == 1 and "adaedge: error:" in loser[2], loser[2]
    winner = [seed for seed, r in zip((1, 2), results) if r[0] == 0][0]
    b = load_bundle(out)
    b.verify_files()                                 # whole: every file its manifest names
    assert b.manifest.model["weights"] == {"source": "random", "seed": winner}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "b"]
    assert leftovers == []                           # the loser's temporary folder is gone


def _clips_npz(path: Path, n: int, shape, classes: int) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, clips=rng.standard_normal((n, *shape)).astype(np.float32),
             labels=(np.arange(n) % classes).astype(np.int64))
    return path


def test_two_calibrations_at_once_lose_neither_update(tmp_path):
    """calibrate int8 and calibrate exits of one bundle at once: the second waits for the first
    (it says so) and reads what it wrote, so the manifest ends with both."""
    out = tmp_path / "f"
    export(tiny_focus(seed=1), out, weights={"source": "test"})
    m = load_bundle(out).manifest
    data = _clips_npz(tmp_path / "clips.npz", 24, tuple(m.clip_shape)[-4:], 10)
    full = m.policy_flops("static") / 1e9
    fd = hold_lock(out)
    try:
        procs = [adaedge("calibrate", "int8", str(out), "--data", str(data), "--clips", "24",
                         "--min-clips", "4", "-q"),
                 adaedge("calibrate", "exits", str(out), "--data", str(data), "--budget",
                         f"{full:.6f}", "-q")]
        time.sleep(3.0)                      # both are started and stand at the lock
        assert all(p.poll() is None for p in procs)
    finally:
        os.close(fd)
    results = finish(procs)
    for code, stdout, stderr in results:
        assert code == 0, stderr
        assert "waiting for another adaedge process that is writing" in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["int8"] is not None and manifest["int8"]["pieces"]
    assert any(s.get("thresholds") for s in manifest["program"] if s["op"] == "exit")
    load_bundle(out).with_precision("int8").verify_files()


@pytest.fixture()
def built(tmp_path):
    out = tmp_path / "b"
    export(tiny_model(), out, weights={"source": "test"})
    runtime.build(out)
    return out


def _engine_folder(bundle: Path) -> Path:
    return next((bundle / "engines").iterdir())


def test_builds_and_readers_at_once_never_see_a_mix(built):
    """Two builds and a bench at once, while a third writer holds the lock: all wait, then all
    succeed, and the engines every later run uses are one build's."""
    fd = hold_lock(built)
    try:
        procs = [adaedge("build", str(built), "-q"), adaedge("build", str(built), "-q"),
                 adaedge("bench", str(built), "--reps", "2", "--warmup", "0", "--json", "-q")]
        time.sleep(3.0)
        assert all(p.poll() is None for p in procs)      # none ran past the lock
    finally:
        os.close(fd)
    results = finish(procs)
    for code, stdout, stderr in results:
        assert code == 0, stderr
        assert "waiting for another adaedge process" in stderr
    json.loads(results[2][1])                            # bench's --json is one JSON object
    folder = _engine_folder(built)
    index = json.loads((folder / "index.json").read_text())["pieces"]
    assert sorted(p.name for p in folder.glob("*.onnx")) == sorted(e["file"] for e in index.values())
    runtime.load(built).classify(np.zeros((2, 3, 5, 32, 32), np.float32))


def test_a_build_killed_half_way_leaves_the_earlier_engines_whole(built):
    folder = _engine_folder(built)
    before = (folder / "index.json").read_bytes()
    proc = adaedge("build", str(built), "-q")
    wait_for(lambda: any(folder.glob(".piece.*.tmp.onnx")), what="the build's first piece")
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert (folder / "index.json").read_bytes() == before
    rt = runtime.load(built)                  # the old engines: every one the index names
    rt.classify(np.zeros((2, 3, 5, 32, 32), np.float32))
    assert finish([adaedge("build", str(built), "-q")])[0][0] == 0
    assert not list(folder.glob(".*tmp*"))    # the killed build's temporary files are gone


def test_export_overwrite_keeps_user_files_a_hostile_old_manifest_names(tmp_path,
                                                                         tiny_checkpoint):
    """An old manifest whose pieces are the user's ckpt.pt and ./notes.txt: --overwrite replaces
    only files adaedge writes (graphs/*.onnx, graphs/*.npz, the manifest, engines/), so both
    stay, byte for byte."""
    from adaedge.cli import main
    u = tmp_path / "u"
    u.mkdir()
    ckpt = u / "ckpt.pt"
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    (u / "notes.txt").write_text("my notes")
    piece = {"file": "ckpt.pt", "sha256": "0" * 64, "flops": 0, "inputs": [], "outputs": []}
    (u / "manifest.json").write_text(json.dumps({
        "format": "adaedge-bundle", "pieces": {"a": piece, "b": dict(piece, file="./notes.txt")},
        "constants": {"file": "notes.txt"}}))
    assert main(["export", "vared_r2plus1d_18", "--checkpoint", str(ckpt), "--out", str(u),
                 "--overwrite", "-q"]) == 0
    assert ckpt.read_bytes() == tiny_checkpoint.read_bytes()
    assert (u / "notes.txt").read_text() == "my notes"
    load_bundle(u).verify_files()


@pytest.fixture()
def full_disk(tmp_path):
    """A real file system of 300 KB (a tmpfs; mounting needs root): writes past it fail with
    ENOSPC, as on a full disk."""
    where = tmp_path / "full"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full file system) needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_demo_on_a_full_disk_keeps_the_users_video_and_says_so(full_disk, tmp_path, capsys):
    from adaedge.cli import main
    from adaedge.demo import default_video
    bundle = tmp_path / "b"
    export(tiny_model(), bundle, labels=[f"class{i}" for i in range(5)])
    keep = full_disk / "keep.mp4"
    keep.write_bytes(b"my video " * 1000)
    code = main(["demo", "--source", str(default_video()), "--bundle", str(bundle), "--headless",
                 "--output", str(keep), "--overwrite", "--max-frames", "120", "--no-pace",
                 "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "keep.mp4" in err, err
    assert keep.read_bytes() == b"my video " * 1000           # the user's file, untouched
    assert sorted(p.name for p in full_disk.iterdir()) == ["keep.mp4"]   # no partial files
