"""Export: every piece is valid ONNX, matches its PyTorch branch, and counts its FLOPs right."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from adaedge import bundle as bundle_mod
from adaedge.export import ExportError, export
from adaedge.export.vared import plan_units

from .conftest import clips, tiny_model

RTOL = 1e-4


def _session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_every_piece_is_checked_onnx_with_static_shapes_but_the_batch(tiny_bundle):
    b = bundle_mod.load(tiny_bundle)
    assert len(b.manifest.pieces) == 37 * 5 + 1      # per gate: the gate and 4 branches; the head
    for name in b.manifest.pieces:
        model = onnx.load(str(b.piece_path(name)))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
        for t in b.manifest.pieces[name].inputs + b.manifest.pieces[name].outputs:
            assert t.shape[0] == "N" and all(isinstance(d, int) for d in t.shape[1:]), (name, t)


def test_every_branch_piece_matches_its_pytorch_branch(tiny, tiny_bundle):
    """Piece by piece: each branch of each unit, on its own input, within 1e-4 relative."""
    b = bundle_mod.load(tiny_bundle)
    plans, _ = plan_units(tiny, 5, 32)
    g = torch.Generator().manual_seed(3)
    checked = 0
    for plan in plans:
        x = torch.randn(3, *plan.in_shape, generator=g)
        ident = torch.randn(3, *plan.out_shape, generator=g) if plan.unit.residual else None
        for br in plan.unit.conv.branches:
            plan.unit.conv.force = br.index
            with torch.no_grad():
                ref = plan.unit(x, ident).numpy() if ident is not None else plan.unit(x).numpy()
            feeds = {"x": x.numpy()}
            if ident is not None:
                feeds["identity"] = ident.numpy()
            piece = f"{plan.name}.{br.name.replace('/', '_')}"
            got = _session(b.piece_path(piece)).run(None, feeds)[0]
            err = np.abs(got - ref).max() / np.abs(ref).max()
            assert err <= RTOL, (piece, err)
            checked += 1
        plan.unit.conv.force = None
    assert checked == 37 * 4


def test_gate_pieces_match_scores_and_decisions(tiny, tiny_bundle):
    b = bundle_mod.load(tiny_bundle)
    plans, _ = plan_units(tiny, 5, 32)
    decisions = set()
    for plan in plans:
        x = torch.randn(8, *plan.in_shape, generator=torch.Generator().manual_seed(4)) * 2
        gate = plan.unit.conv.gate
        with torch.no_grad():
            logits = gate.logits(x)
        got_scores, got_branch = _session(b.piece_path(f"{plan.name}.gate")).run(
            ["scores", "branch"], {"x": x.numpy()})
        np.testing.assert_allclose(got_scores, gate.squash(logits).numpy(), rtol=1e-4, atol=1e-5)
        assert got_branch.tolist() == gate.decide(logits).tolist()
        decisions.update(got_branch.tolist())
    assert decisions == {0, 1, 2, 3}   # the randomised gates exercise every branch


def test_flops_counted_from_graphs_match_the_analytic_count(tiny, tiny_bundle):
    """The static network's conv MACs from ONNX equal the layers' analytic MACs (+ the head)."""
    b = bundle_mod.load(tiny_bundle)
    m = b.manifest
    static = sum(m.pieces[s.branches[0].piece].flops for s in m.switches())
    assert static == int(sum(tiny.layer_costs()))
    head = tiny.head.fc
    assert m.pieces["head"].flops == head.in_features * head.out_features
    # every branch: the computed filters and frames, plus 9 MACs per filled element (3x3 depthwise)
    plans, _ = plan_units(tiny, 5, 32)
    for plan in plans:
        conv = plan.unit.conv
        c_out, t_out, h, w = plan.out_shape
        per_output = conv.in_channels * int(np.prod(conv.kernel_size))
        step = next(s for s in m.switches() if s.name == plan.name)
        for br, entry in zip(conv.branches, step.branches):
            computed = c_out // 2 ** br.c
            frames = -(-t_out // br.temporal_factor)
            want = computed * frames * h * w * per_output
            if br.c:
                want += (c_out - computed) * frames * h * w * 9
            if br.t and t_out > frames:
                want += c_out * (br.temporal_factor - 1) * frames * h * w * 9
            assert m.pieces[entry.piece].flops == want, entry.piece


def test_manifest_describes_input_policies_and_weights(tiny_bundle):
    data = json.loads((tiny_bundle / "manifest.json").read_text())
    assert data["schema_version"] == bundle_mod.SCHEMA_VERSION
    assert data["input"]["frames"] == 5 and data["input"]["size"] == [32, 32]
    assert data["input"]["layout"] == "NCTHW" and len(data["input"]["mean"]) == 3
    assert set(data["policies"]) == {"static", "all-half", "all-stride2", "cheapest"}
    assert set(data["policies"]["all-half"].values()) == {1}
    assert data["model"]["weights"] == {"source": "test"}


def test_masked_execution_gives_the_same_outputs_at_full_cost(tiny, tmp_path, tiny_bundle):
    """The papers' execution (compute everything, keep the branch's part) agrees, and costs more."""
    from adaedge import runtime

    export(tiny, tmp_path / "masked", execution="masked")
    dynamic, masked = runtime.load(tiny_bundle), runtime.load(tmp_path / "masked")
    x = clips(3).numpy()
    for force in ("static", "all-half", "all-stride2", "cheapest", None):
        a, b = dynamic.classify(x, force=force), masked.classify(x, force=force)
        assert np.abs(a.scores - b.scores).max() <= RTOL * np.abs(a.scores).max(), force
        if force in ("all-half", "all-stride2", "cheapest"):
            assert b.traces[0].flops > a.traces[0].flops, force


def test_export_never_clobbers_what_is_not_a_bundle(tiny, tmp_path):
    other = tmp_path / "data"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a bundle"):
        export(tiny, other)
    assert (other / "precious.txt").read_text() == "keep me"


def test_export_replaces_a_bundle_only_when_asked(tiny, tmp_path):
    out = tmp_path / "b"
    export(tiny, out)
    with pytest.raises(ExportError, match="overwrite"):
        export(tiny, out)
    export(tiny, out, overwrite=True)
    bundle_mod.load(out).verify_files()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]  # no leftovers


def test_overwrite_replaces_only_what_the_old_bundle_lists(tiny, tmp_path):
    out = tmp_path / "b"
    export(tiny, out)
    (out / "model.pt").write_text("the checkpoint being exported")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("mine")
    (out / "graphs" / "extra.txt").write_text("also mine")
    old = json.loads((out / "manifest.json").read_text())
    export(tiny, out, overwrite=True, weights={"source": "second"})
    assert json.loads((out / "manifest.json").read_text())["model"]["weights"] == \
        {"source": "second"} != old["model"]["weights"]
    assert (out / "model.pt").read_text() == "the checkpoint being exported"
    assert (out / "notes" / "todo.txt").read_text() == "mine"
    assert (out / "graphs" / "extra.txt").read_text() == "also mine"
    bundle_mod.load(out).verify_files()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]          # no leftovers


def test_a_folder_whose_manifest_is_not_an_adaedge_bundle_is_never_replaced(tiny, tmp_path):
    other = tmp_path / "site"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"name": "a web app"}))
    (other / "index.html").write_text("keep me")
    with pytest.raises(ExportError, match="not an adaedge bundle"):
        export(tiny, other, overwrite=True)
    assert sorted(p.name for p in other.iterdir()) == ["index.html", "manifest.json"]


@pytest.mark.parametrize("when", ["writing", "swapping"])
def test_an_interrupted_overwrite_leaves_the_old_bundle_whole(tiny, tmp_path, monkeypatch, when):
    """Ctrl-C (or SIGTERM) while the new bundle is written, or at the swap itself: the old
    bundle and the user's files stay as they were, and no temporary folder is left behind."""
    import os
    import signal

    import adaedge.export as export_mod
    import adaedge.export.replace as replace_mod
    out = tmp_path / "b"
    export(tiny, out)
    (out / "notes.txt").write_text("mine")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
              if p.is_file() and p.name != ".adaedge.lock"}
    if when == "writing":
        real_write = export_mod._write

        def write_then_terminate(*args, **kwargs):
            real_write(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)        # as `kill` would
        monkeypatch.setattr(export_mod, "_write", write_then_terminate)
        expected = replace_mod.Terminated
    else:
        real_replace = os.replace

        def replace_then_fail(src, dst):
            # interrupted as the new bundle is about to be renamed in (the old one is aside)
            if os.fspath(dst) == os.fspath(out) and ".b." in os.path.basename(os.fspath(src)):
                raise KeyboardInterrupt
            real_replace(src, dst)
        monkeypatch.setattr(replace_mod.os, "replace", replace_then_fail)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        export(tiny, out, overwrite=True, weights={"source": "second"})
    monkeypatch.undo()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*")   # but the (empty) lock
             if p.is_file() and p.name != ".adaedge.lock"}                   # file of the swap
    assert after == before
    bundle_mod.load(out).verify_files()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_non_finite_weights_export_with_a_warning_naming_them(tmp_path):
    m = tiny_model()
    with torch.no_grad():
        m.head.fc.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 weight tensors hold NaN or infinite values "
                                            r"\(head.fc.weight\)"):
        export(m, tmp_path / "b")


def test_export_at_other_frames_and_size(tmp_path):
    m = tiny_model()
    man = export(m, tmp_path / "b", frames=8, size=48)
    assert man.clip_shape == [3, 8, 48, 48]
