"""Nothing lost under faults and concurrency: real processes at once, real kills, a full disk.

Each test runs the command line in separate processes (``python -m adaedge``), as two users or
two terminals would, and checks the bundle afterwards: whole, holding every writer's update.
"""

from __future__ import annotations

import contextlib
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


def adaedge(*args: str, err: "Path | None" = None) -> subprocess.Popen:
    """``python -m adaedge ARGS`` in a process of its own; its stderr to the file ``err`` (read
    while it runs) or a pipe."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "adaedge", *args], stdout=subprocess.PIPE,
                            stderr=open(err, "w") if err is not None else subprocess.PIPE,
                            text=True, env=env)
    proc.err_file = err          # type: ignore[attr-defined]
    return proc


def finish(procs: List[subprocess.Popen], timeout: float = 300) -> List[tuple]:
    out = []
    for p in procs:
        code = p.wait(timeout)
        stdout, stderr = p.communicate()
        if getattr(p, "err_file", None) is not None:
            stderr = p.err_file.read_text()        # type: ignore[attr-defined]
        out.append((code, stdout, stderr))
    return out


def all_at_the_lock(procs: List[subprocess.Popen]) -> None:
    """Wait until every process says it waits for the lock (started, loaded, standing there)."""
    def there(p: subprocess.Popen) -> bool:
        assert p.poll() is None, finish([p])
        return "waiting for another adaedge process" in p.err_file.read_text()  # type: ignore
    wait_for(lambda: all(there(p) for p in procs), timeout=240, what="the lock")


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
                         "--min-clips", "4", "-q", err=tmp_path / "int8.err"),
                 adaedge("calibrate", "exits", str(out), "--data", str(data), "--budget",
                         f"{full:.6f}", "-q", err=tmp_path / "exits.err")]
        all_at_the_lock(procs)                # both are started and stand at the lock
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


def test_builds_and_readers_at_once_never_see_a_mix(built, tmp_path):
    """Two builds and a bench at once, while a third writer holds the lock: all wait, then all
    succeed, and the engines every later run uses are one build's."""
    fd = hold_lock(built)
    try:
        procs = [adaedge("build", str(built), "-q", err=tmp_path / "b1.err"),
                 adaedge("build", str(built), "-q", err=tmp_path / "b2.err"),
                 adaedge("bench", str(built), "--reps", "2", "--warmup", "0", "--json", "-q",
                         err=tmp_path / "bench.err")]
        all_at_the_lock(procs)                # none ran past the lock
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


@contextlib.contextmanager
def small_fs(where: Path, size: str):
    """A real file system of ``size`` (a tmpfs; mounting needs root): writes past it fail with
    ENOSPC, as on a full disk, and ``remount(ro=True)`` makes it read-only."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full file system) needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def remount(where: Path, ro: bool) -> None:
    subprocess.run(["mount", "-o", f"remount,{'ro' if ro else 'rw'}", str(where)], check=True)


@pytest.fixture()
def full_disk(tmp_path):
    with small_fs(tmp_path / "full", "300k") as where:
        yield where


def _fill(where: Path) -> None:
    with open(where / "filler", "wb") as f:
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError:
            pass


def _snapshot(folder: Path):
    """Every file's bytes (but the empty lock file, which a writer may create)."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != LOCK}


def test_a_full_disk_and_a_read_only_bundle_are_one_line_and_change_nothing(tmp_path, capsys):
    from adaedge.cli import main
    tiny_config = TINY_CONFIG
    with small_fs(tmp_path / "disk", "8m") as disk:
        b, f = disk / "b", disk / "f"
        export(tiny_model(), b, weights={"source": "test"})
        export(tiny_focus(seed=1), f, weights={"source": "test"})
        m = load_bundle(f).manifest
        data = _clips_npz(tmp_path / "clips.npz", 24, tuple(m.clip_shape)[-4:], 10)
        budget = f"{m.policy_flops('static') / 1e9:.6f}"
        commands = [["build", str(b)],
                    ["calibrate", "exits", str(f), "--data", str(data), "--budget", budget],
                    ["calibrate", "int8", str(f), "--data", str(data), "--min-clips", "4"],
                    ["export", "vared_r2plus1d_18", "--random-weights", *tiny_config, "--out",
                     str(b), "--overwrite"],
                    ["export", "vared_r2plus1d_18", "--random-weights", *tiny_config, "--out",
                     str(disk / "new")]]
        for state in ("full", "read-only"):
            if state == "full":
                _fill(disk)
            else:
                (disk / "filler").unlink()
                remount(disk, ro=True)
            before = {p: _snapshot(p) for p in (b, f)}
            for args in commands:
                assert main([*args, "-q"]) == 2, (state, args)
                err = capsys.readouterr().err
                assert err.count("\n") == 1 and err.startswith("adaedge: error:"), (state, err)
                assert str(disk) in err, (state, err)           # it names where
                assert ("no space left" in err.lower()) if state == "full" else \
                    ("read-only" in err.lower()), (state, err)
            assert {p: _snapshot(p) for p in (b, f)} == before       # nothing lost or half done
            assert sorted(p.name for p in disk.iterdir()) == (["b", "f", "filler"] if state ==
                                                                "full" else ["b", "f"])
        remount(disk, ro=False)
        runtime.load(b).classify(np.zeros((1, 3, 5, 32, 32), np.float32))


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


def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing_half_written(built, tmp_path):
    """SIGINT, as Ctrl-C sends it, to real export, build, bench, demo and calibrate processes
    at work."""
    from adaedge.demo import default_video
    folder = _engine_folder(built)
    runs = [
        # a network large enough that its export takes seconds: with the tiny one, the signal
        # could land after the bundle was complete, while the interpreter was already exiting
        # (exit 0, seen once on a loaded machine)
        (["export", "vared_r2plus1d_18", "--random-weights", "--config", "num_classes=5",
          "--config", "frames=8", "--config", "size=64", "--config", "width_mult=0.5", "--out",
          str(tmp_path / "new")], lambda: any(p.name.startswith(".new.")
                                              for p in tmp_path.iterdir())),
        (["build", str(built)], lambda: any(folder.glob(".piece.*.tmp.onnx"))),
        (["bench", str(built), "--reps", "100000", "--warmup", "0"], None),
        (["demo", "--source", str(default_video()), "--bundle", str(built), "--headless",
          "--output", str(tmp_path / "o.mp4")], None),                  # paced: 10 s of video
        (["calibrate", "int8", str(built), "--data", "motion:val:2000"], None)]
    for args, started in runs:
        proc = adaedge(*args, "-q")
        if started is not None:
            wait_for(started, what=f"{args[0]} at work")
        else:
            time.sleep(6.0)                   # loaded and timing
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        code, out, err = finish([proc])[0]
        assert code == 130 and err == "adaedge: interrupted\n", (args[0], code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]     # no half export, no video
    assert load_bundle(built).manifest.int8 is None                 # nor half a calibration
    assert not list(folder.glob(".*tmp*"))
    runtime.load(built).classify(np.zeros((1, 3, 5, 32, 32), np.float32))


@pytest.mark.parametrize("model", ["vared_r2plus1d_18", "adafocus_v3"])
def test_train_out_is_checked_before_any_training(tmp_path, capsys, model):
    from adaedge.cli import main
    precious = tmp_path / "precious.pt"
    precious.write_bytes(b"weeks of training")
    card = tmp_path / "precious.md"
    card.write_text("its card")
    lone = tmp_path / "lone.pt"
    (tmp_path / "lone.md").write_text("a card whose checkpoint is gone")
    base = ["train", "--model", model, "--minutes", "0.01"]
    for out, message in ((precious, "precious.pt exists; pass --overwrite"),
                         (lone, "lone.md exists; pass --overwrite"),
                         (tmp_path, "is a folder"),
                         (tmp_path / "missing" / "x.pt", "does not exist"),
                         ("", "--out is empty")):
        start = time.monotonic()
        assert main([*base, "--out", str(out)]) == 2, out
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert time.monotonic() - start < 5           # refused at once, not after training
    for bad in ("nan", "-1", "0", "inf", "soon"):
        assert main(["train", "--model", model, "--minutes", bad, "--out",
                     str(tmp_path / "new.pt")]) == 2
        assert "--minutes must be a positive number" in capsys.readouterr().err
    assert precious.read_bytes() == b"weeks of training" and card.read_text() == "its card"
    assert not (tmp_path / "new.pt").exists()


def test_demo_whose_plot_finds_a_full_disk_replaces_neither_file(tmp_path, capsys):
    """The video fits (its folder has room) but the plot does not (a 16 KB file system): the
    user's earlier video and plot stay as they were."""
    from adaedge.cli import main
    from adaedge.demo import default_video
    bundle = tmp_path / "b"
    export(tiny_model(), bundle, labels=[f"class{i}" for i in range(5)])
    video = tmp_path / "keep.mp4"
    video.write_bytes(b"my video")
    with small_fs(tmp_path / "tiny", "16k") as tiny:
        plot = tiny / "keep.png"
        plot.write_bytes(b"my plot")
        code = main(["demo", "--source", str(default_video()), "--bundle", str(bundle),
                     "--headless", "--output", str(video), "--plot", str(plot), "--overwrite",
                     "--max-frames", "30", "--no-pace", "-q"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "keep.png" in err, err
        assert plot.read_bytes() == b"my plot"
        assert sorted(p.name for p in tiny.iterdir()) == ["keep.png"]
    assert video.read_bytes() == b"my video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "keep.mp4", "tiny"]


def test_the_next_writer_removes_what_a_killed_writer_left(tmp_path, capsys):
    """A writer killed between writing its temporary manifest (or int8 form) and renaming it
    leaves the file; the next writer, holding the lock, removes it, and no user file."""
    from adaedge.cli import main
    out = tmp_path / "f"
    export(tiny_focus(seed=1), out, weights={"source": "test"})
    (out / "graphs" / "int8").mkdir()
    stale = [out / ".manifest.json.k1ll3d.tmp", out / "graphs" / "int8" / ".x.onnx.k1ll3d.tmp"]
    for p in stale:
        p.write_text("half written")
    mine = out / ".notes.tmp"
    mine.write_text("my notes")
    m = load_bundle(out).manifest
    data = _clips_npz(tmp_path / "clips.npz", 16, tuple(m.clip_shape)[-4:], 10)
    assert main(["calibrate", "exits", str(out), "--data", str(data), "--budget",
                 f"{m.policy_flops('static') / 1e9:.6f}", "-q"]) == 0
    assert not any(p.exists() for p in stale)
    assert mine.read_text() == "my notes"


def test_an_export_killed_half_way_leaves_nothing_the_next_one_keeps(tmp_path):
    """kill -9 while the pieces are written leaves the hidden folder it wrote into; the next
    export to the same folder removes it (its lock is free); a hidden folder that is not an
    export's stays. (One an export at work holds stays too: test_two_exports_... runs two at
    once.)"""
    out = tmp_path / "b"
    proc = adaedge("export", "vared_r2plus1d_18", "--random-weights", *TINY_CONFIG, "--out",
                   str(out), "-q")
    wait_for(lambda: any(p.name.startswith(".b.") and (p / "graphs").is_dir()
                         for p in tmp_path.iterdir()), what="the export writing its pieces")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]
    assert left and not out.exists()
    users = tmp_path / ".b.notmine"          # not tempfile's name: a user's folder
    users.mkdir()
    (users / LOCK).write_text("")
    assert finish([adaedge("export", "vared_r2plus1d_18", "--random-weights", *TINY_CONFIG,
                           "--out", str(out), "-q")])[0][0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.notmine", "b"]
    load_bundle(out).verify_files()
