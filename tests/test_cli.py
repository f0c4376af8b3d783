"""The command line end to end: export -> build -> verify -> bench, and its clear refusals."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from onnx import numpy_helper

from adaedge import models
from adaedge.bundle import sha256_file
from adaedge.cli import main

TINY_ARGS = ["--config", "width_mult=0.125", "--config", "num_classes=5", "--frames", "4",
             "--size", "32", "-q"]


def test_export_build_verify_bench_from_a_checkpoint(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "b"
    assert main(["export", "vared_r2plus1d_18", "--checkpoint", str(tiny_checkpoint),
                 "--out", str(out), "-q"]) == 0
    assert "186 pieces, 37 gates" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["labels"] == [f"class{i}" for i in range(5)]   # from the checkpoint
    assert manifest["model"]["weights"]["sha256"] == sha256_file(tiny_checkpoint)
    assert main(["build", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--checkpoint", str(tiny_checkpoint), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["rtol"] == 1e-4
    names = [c["name"].replace(" (compiled, one clip per call)", "")[:24] for c in report["cases"]]
    assert names == (["free gates"] + ["every gate forced to bra"] * 4) * 2  # pieces, compiled
    assert all(c["name"].endswith("(compiled, one clip per call)") for c in report["cases"][5:])
    assert main(["bench", str(out), "--reps", "2", "--warmup", "0", "--json", "-q"]) == 0
    bench = json.loads(capsys.readouterr().out)
    names = [c["name"] for c in bench["configs"]]
    assert names == ["static", "all-half", "all-stride2", "cheapest", "free", "plain-graph"]
    for c in bench["configs"]:
        assert set(c) == {"name", "gflops", "median_ms", "p90_ms", "clips_per_s", "realization",
                          "limit_ms", "decisions", "decision_ms"}
        # the limit: the static network's time scaled by the FLOPs (every saved FLOP saved time)
        assert c["limit_ms"] == pytest.approx(bench["configs"][0]["median_ms"] * c["gflops"] /
                                              bench["configs"][0]["gflops"], rel=1e-2)
        assert c["median_ms"] > 0 and c["p90_ms"] >= c["median_ms"] and c["clips_per_s"] > 0
    by = {c["name"]: c for c in bench["configs"]}
    assert by["free"]["decisions"] == 37 and by["free"]["decision_ms"] >= 0   # one per gate
    assert all(by[n]["decisions"] == 0 for n in names if n != "free")       # forced: none
    assert by["static"]["realization"] is None and by["all-half"]["realization"] is not None
    assert by["all-half"]["gflops"] < by["static"]["gflops"]


def test_random_weights_bundles_verify_from_their_seed(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["export", "vared_r2plus1d_18", "--random-weights", "--seed", "3",
                 "--out", str(out)] + TINY_ARGS) == 0
    assert main(["verify", str(out), "-q"]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    assert "cheapest" in capsys.readouterr().out


def test_export_refuses_without_weights(tmp_path, capsys):
    assert main(["export", "vared_r2plus1d_18", "--out", str(tmp_path / "x")] + TINY_ARGS) == 2
    assert "--random-weights" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_of_a_checkpoint_for_another_width_names_the_keys(tmp_path, tiny_checkpoint,
                                                                 capsys):
    assert main(["export", "vared_r2plus1d_18", "--checkpoint", str(tiny_checkpoint),
                 "--config", "width_mult=0.25", "--out", str(tmp_path / "x"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "shape mismatches" in err
    assert not (tmp_path / "x").exists()


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "adaedge: error:" in capsys.readouterr().err
    assert main(["export", "nope", "--random-weights", "--out", str(tmp_path / "y")]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["bench", str(tmp_path)]) == 2


@pytest.mark.parametrize("argv,message", [
    (["bench", "{b}", "--threads", "100000"], "--threads: must be an integer from 1 to 1024"),
    (["bench", "{b}", "--threads", "two"], "--threads: must be an integer from 1 to 1024"),
    (["bench", "{b}", "--threads", "0"], "--threads: must be an integer from 1 to 1024"),
    (["bench", "{b}", "--reps", "0"], "--reps must be at least 1"),
    (["bench", "{b}", "--batch", "0"], "--batch must be at least 1"),
    (["demo", "--bundle", "{b}", "--max-frames", "-5"], "--max-frames must be at least 1"),
    (["demo", "--bundle", "{b}", "--frame-step", "0"], "--frame-step must be at least 1"),
    (["demo", "--bundle", "{b}", "--clip-stride", "0"], "--clip-stride must be at least 1"),
    (["export", "vared_r2plus1d_18", "--random-weights", "--frames", "0", "--out", "{t}/x"],
     "frames must be an integer from 1 to 4096, not 0"),
    (["export", "vared_r2plus1d_18", "--random-weights", "--size", "-3", "--out", "{t}/x"],
     "size must be an integer from 1 to 4096, not -3"),
    (["export", "vared_r2plus1d_18", "--random-weights", "--config", "num_classes=-5", "--out",
      "{t}/x"], "num_classes must be an integer from 1 to 1000000, not -5"),
    (["export", "vared_r2plus1d_18", "--random-weights", "--config", "width_mult=0", "--out",
      "{t}/x"], "width_mult must be a number above 0 and at most 16, not 0"),
    (["export", "vared_r2plus1d_18", "--random-weights", "--config", "width_mult=abc", "--out",
      "{t}/x"], "width_mult must be a number above 0"),
    (["export", "vared_r2plus1d_18", "--random-weights", "--config", "nope=1", "--out",
      "{t}/x"], "'nope' is not a setting of this model"),
])
def test_bad_options_are_one_line_and_exit_2(tiny_bundle, tmp_path, capsys, argv, message):
    argv = [a.format(b=tiny_bundle, t=tmp_path) for a in argv]
    with _exit_code() as code:
        code.value = main(argv)
    assert code.value == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


class _exit_code:
    """main() returns 2 for adaedge's errors; argparse's own refusals exit 2 (SystemExit)."""
    value: object = None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is SystemExit:
            self.value = exc.code
            return True
        return False


def test_verify_names_the_piece_that_differs_and_exits_nonzero(tmp_path, tiny_bundle,
                                                               tiny_checkpoint, capsys):
    out = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, out)
    piece = "stages.0.1.conv1_t.R1-r1_2"
    path = out / "graphs" / f"{piece}.onnx"
    model = onnx.load(str(path))
    w = next(i for i in model.graph.initializer if len(i.dims) == 4)   # the conv weight
    arr = numpy_helper.to_array(w).copy()
    arr[0] *= 1.01
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    onnx.save(model, str(path))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["pieces"][piece]["sha256"] = sha256_file(path)   # a consistent, but wrong, bundle
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(out), "--checkpoint", str(tiny_checkpoint), "-q"]) == 1
    text = capsys.readouterr().out
    assert "MISMATCH" in text and piece in text
    assert "ok   every gate forced to branch 0" in text    # other branches still agree


def test_checkpoint_and_bundle_must_be_the_same_model(tmp_path, tiny_bundle, capsys):
    other = tmp_path / "other.pt"
    models.save_checkpoint(models.create("vared_r2plus1d_18", num_classes=7, width_mult=0.125),
                           other)
    assert main(["verify", str(tiny_bundle), "--checkpoint", str(other), "-q"]) == 2
    assert "shape mismatches" in capsys.readouterr().err

