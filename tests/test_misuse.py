"""Every misuse a careless user tried ends in one line (exit 2), before any long work, with the
user's files as they were; the Python API raises adaedge's own errors."""

from __future__ import annotations

import json
import shutil
import sys
import time

import numpy as np
import pytest

from adaedge import runtime
from adaedge.cli import main
from adaedge.errors import AdaedgeError, InputError, UsageError
from adaedge.export import export

from .conftest import tiny_model
from .test_adafocus import tiny_focus


@pytest.fixture(scope="module")
def focus(tmp_path_factory):
    out = tmp_path_factory.mktemp("misuse") / "f"
    export(tiny_focus(seed=1), out, weights={"source": "test"})
    return out


@pytest.fixture(scope="module")
def clips_npz(tmp_path_factory, focus):
    path = tmp_path_factory.mktemp("data") / "clips.npz"
    rng = np.random.default_rng(0)
    np.savez(path, clips=rng.standard_normal((16, 3, 4, 16, 16)).astype(np.float32),
             labels=np.arange(16) % 10)
    return path


def one_line(capsys, *texts: str) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("adaedge: error:"), captured
    for t in texts:
        assert t in captured.err, captured.err
    return captured.out


def test_options_that_would_crash_or_be_ignored_are_one_line(focus, clips_npz, tiny_bundle,
                                                             tmp_path, capsys):
    before = (focus / "manifest.json").read_bytes()
    npy = tmp_path / "clips.npy"
    np.save(npy, np.zeros((2, 3, 4, 16, 16), np.float32))
    budget = "1.0"
    cases = [
        (["calibrate", "exits", str(focus), "--data", str(clips_npz), "--budget", budget,
          "--plot", str(tmp_path / "p.txt")], "written as PNG"),
        (["calibrate", "exits", str(focus), "--data", str(npy), "--budget", budget],
         "is not an .npz file"),
        (["calibrate", "exits", str(focus), "--data", str(clips_npz), "--budget", budget,
          "--default", "nan"], "the default budget must be one of the budgets solved"),
        (["bench", str(tiny_bundle), "--seed", "-1"], "--seed must be from 0"),
        (["bench", str(tiny_bundle), "--batch", "10000000"], "at most"),
        (["verify", str(tiny_bundle), "--checkpoint", "x.pt", "--clips", "100000000"],
         "at most"),
        (["bench", str(tiny_bundle), "--budget", "0.1", "--reps", "1"], "has no exits"),
        (["export", "vared_r2plus1d_18", "--random-weights", "--out", ""], "(--out) is empty"),
    ]
    for args, message in cases:
        start = time.monotonic()
        code = main([*args, "-q"])
        if code != 2:
            pytest.fail(f"{args}: exit {code}, {capsys.readouterr()}")
        one_line(capsys, message)
        assert time.monotonic() - start < 30, args       # refused before the long work
    assert (focus / "manifest.json").read_bytes() == before


def test_verify_without_a_checkpoint_says_so_at_once(tmp_path, capsys):
    out = tmp_path / "b"
    export(tiny_model(), out, weights={"source": "checkpoint", "file": "ckpt.pt"})
    start = time.monotonic()
    assert main(["verify", str(out), "-q"]) == 2
    one_line(capsys, "pass --checkpoint CKPT", "ckpt.pt")
    assert time.monotonic() - start < 2.0


def test_demo_plot_must_be_an_image_and_not_the_video(tiny_bundle, tmp_path, capsys):
    from adaedge.demo import default_video
    args = ["demo", "--source", str(default_video()), "--bundle", str(tiny_bundle),
            "--headless", "--max-frames", "10", "--no-pace", "-q"]
    assert main([*args, "--output", str(tmp_path / "o.mp4"), "--plot",
                 str(tmp_path / "p.txt")]) == 2
    one_line(capsys, "written as PNG")
    assert main([*args, "--output", str(tmp_path / "o.png"), "--plot",
                 str(tmp_path / "o.png")]) == 2
    one_line(capsys, "is also --output")
    assert list(tmp_path.iterdir()) == []


def test_int8_json_is_pure_json_with_entropy_ranges(tmp_path, capsys):
    out = tmp_path / "b"
    export(tiny_model(), out, weights={"source": "test"})
    data = tmp_path / "c.npz"
    np.savez(data, clips=np.random.default_rng(0).standard_normal((6, 3, 5, 32, 32))
             .astype(np.float32))
    assert main(["calibrate", "int8", str(out), "--data", str(data), "--method", "entropy",
                 "--min-clips", "2", "--json", "-q"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)                       # stdout holds the report alone


def test_the_camera_data_without_its_extra_says_which(focus, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cv2", None)     # as on the core install: no OpenCV
    assert main(["calibrate", "exits", str(focus), "--data", "camera:val:8", "--budget",
                 "1.0", "-q"]) == 2
    one_line(capsys, "the 'train' extra", "pip install 'adaedge[train]'")


def test_the_python_api_raises_adaedges_errors(focus, tiny_bundle):
    rt = runtime.load(focus)
    x = np.zeros((2, 3, 4, 16, 16), np.float32)
    for kwargs in ({"exit_at": 5}, {"state": [1, 2]}, {"budget": object()},
                   {"budget": float("nan")}):
        with pytest.raises(InputError):
            rt.classify(x, **kwargs)
    with pytest.raises(UsageError, match="backend must be a backend's name"):
        runtime.load(tiny_bundle, backend=object())
    rt.classify(x, exit_at=["exit0", None])           # what it takes still works
    assert issubclass(InputError, AdaedgeError)


def test_quickstart_never_replaces_a_named_folder_silently(tiny_bundle, tmp_path):
    """examples/quickstart.py writes into the cache by default and says where; a folder the user
    names that holds a bundle is replaced only with --overwrite."""
    import os
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "mine"
    shutil.copytree(tiny_bundle, out)
    before = (out / "manifest.json").read_bytes()
    env = dict(os.environ, PYTHONPATH=str(root), ADAEDGE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(root / "examples" / "quickstart.py"), "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"into {out}" in proc.stdout
    assert "already holds a bundle; pass overwrite=True (--overwrite)" in proc.stderr
    assert (out / "manifest.json").read_bytes() == before
    assert "Traceback" not in proc.stderr


def test_export_says_something_from_the_start(tmp_path):
    """The first words on stderr come before PyTorch is imported (seconds on a cold machine),
    and the writing of the pieces has its own progress."""
    import os
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "adaedge", "export", "vared_r2plus1d_18",
                             "--random-weights", "--config", "width_mult=0.125", "--config",
                             "frames=4", "--config", "size=32", "--out", str(tmp_path / "b")],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    first_at = time.monotonic() - start
    rest = proc.stderr.read().decode()
    proc.wait(300)
    total = time.monotonic() - start
    assert proc.returncode == 0, rest
    assert b"export: loading PyTorch" in first
    assert first_at < 0.3 * total, (first_at, total)     # long before the work is done
    assert "writing" in rest or "written" in rest
