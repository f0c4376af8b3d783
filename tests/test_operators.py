"""Hostile graphs and sizes in a bundle are refused before any session, allocation or full read.

The operator allow-list is exactly what the exporters write: every family's every form is
exported here (and an int8 form), and their operators must be the list, no more, no less.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from adaedge import models, runtime
from adaedge.bundle import load as load_bundle
from adaedge.bundle.operators import ALLOWED
from adaedge.cli import main
from adaedge.errors import BundleError
from adaedge.export import export

from .conftest import tiny_model
from .test_adafocus import tiny_focus
from .test_adafocus_official import GIVEN, checkpoint
from .test_adafuse import tiny_adafuse
from .test_tada import tiny_tada


def _ops(graph, into):
    for n in graph.node:
        into.add((n.domain or "", n.op_type))
        for a in n.attribute:
            assert not a.HasField("g") and not a.graphs     # no subgraphs, ever
    return into


def test_the_allow_list_is_exactly_what_the_exporters_write(tmp_path):
    forms = [(tiny_model(), {}), (tiny_model(), {"execution": "masked"}), (tiny_focus(), {}),
             (tiny_model(temporal_padding="replicate", gate_motion=True), {}),   # Pad, Log
             (models.create("vared_r2plus1d_18", num_classes=5, frames=5, size=32,  # a copy
                            width_mult=0.125, temporal_padding="replicate",     # fill: Expand
                            gate_motion=True).eval(), {})]
    forms += [(tiny_tada(cal_dim=c), {"execution": e, "options": {"routing": r}})
              for e, r, c in (("calibrated", "fused", "cin"), ("calibrated", "separate", "cin"),
                              ("calibrated", "fused", "cout"), ("official", "fused", "cin"),
                              ("official", "fused", "cout"), ("uncalibrated", "fused", "cin"))]
    forms += [(tiny_adafuse(), {"execution": e, "options": {"stream": s}})
              for e, s in (("dense", False), ("dense", True), ("gathered", True),
                           ("plain", False), ("plain", True))]
    forms += [(tiny_adafuse(shift=s), {"options": {"stream": s == "online"}})
              for s in ("bidirectional", "online")]
    forms += [(models.load_model(checkpoint(v), name=v, **GIVEN[v]).eval(), {}) for v in GIVEN]
    used = set()
    for i, (model, kw) in enumerate(forms):
        out = tmp_path / f"b{i}"
        export(model, out, weights={"source": "test"}, **kw)
        for f in (out / "graphs").rglob("*.onnx"):
            m = onnx.load(str(f))
            _ops(m.graph, used)
            for fn in m.functions:
                used.add((fn.domain, fn.name))
                _ops(fn, used)
    # an int8 form of the VA-RED² bundle: Q/DQ
    from adaedge.calibration.int8 import calibrate_int8
    clips = np.random.default_rng(0).standard_normal((8, 3, 5, 32, 32)).astype(np.float32)
    calibrate_int8(tmp_path / "b0", clips, min_clips=2)
    for f in (tmp_path / "b0" / "graphs" / "int8").glob("*.onnx"):
        _ops(onnx.load(str(f)).graph, used)
    allowed = {(d, op) for d, ops in ALLOWED[1].items() if d != "ai.onnx" for op in ops}
    assert used - allowed == set()            # the exporters write nothing the list lacks
    unused = allowed - used
    assert unused <= {("adaedge", "CheapFill"), ("", "Identity")}, unused  # nothing unwritten
    # (CheapFill: the format's plugin vocabulary, which a TensorRT plugin implements; Identity
    # allocates nothing, and hand-written programs such as tests/test_program.py's use it)


@pytest.fixture()
def copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _replace_head(bundle: Path, graph) -> None:
    """Put ``graph`` in place of the 'head' piece, its hash recorded (a careful attacker)."""
    data = json.loads((bundle / "manifest.json").read_text())
    spec = data["pieces"]["head"]
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    raw = model.SerializeToString()
    (bundle / spec["file"]).write_bytes(raw)
    spec["sha256"] = hashlib.sha256(raw).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(data))


def _head_io(bundle: Path):
    spec = json.loads((bundle / "manifest.json").read_text())["pieces"]["head"]
    (i,), outs = spec["inputs"], spec["outputs"]
    return i, outs


def _vi(spec):
    return h.make_tensor_value_info(spec["name"], getattr(T, {"float32": "FLOAT",
                                    "int64": "INT64"}[spec["dtype"]]), spec["shape"])


def test_a_loop_of_2_62_trips_is_refused_before_any_session(copy):
    i, outs = _head_io(copy)
    body = h.make_graph([h.make_node("Identity", ["c"], ["c_out"])], "body",
                        [h.make_tensor_value_info("it", T.INT64, []),
                         h.make_tensor_value_info("c", T.BOOL, [])],
                        [h.make_tensor_value_info("c_out", T.BOOL, [])])
    nodes = [h.make_node("Loop", ["trips", "cond"], [], body=body)]
    nodes += [h.make_node("ReduceMean", [i["name"]], [o["name"]]) for o in outs]
    _replace_head(copy, h.make_graph(
        nodes, "g", [_vi(i)], [_vi(o) for o in outs],
        initializer=[h.make_tensor("trips", T.INT64, [], [1 << 62]),
                     h.make_tensor("cond", T.BOOL, [], [True])]))
    with pytest.raises(BundleError, match="operator Loop, which adaedge's exporters never write"):
        runtime.load(copy)


def test_a_constant_of_32_gib_is_refused(copy):
    i, outs = _head_io(copy)
    nodes = [h.make_node("ConstantOfShape", ["shape"], ["big"])]
    nodes += [h.make_node("ReduceMean", [i["name"]], [o["name"]]) for o in outs]
    _replace_head(copy, h.make_graph(nodes, "g", [_vi(i)], [_vi(o) for o in outs],
                                     initializer=[h.make_tensor("shape", T.INT64, [1], [8 << 30])]))
    with pytest.raises(BundleError, match="operator ConstantOfShape"):
        runtime.load(copy)


def test_an_allowed_operator_sized_far_past_the_bound_is_refused(copy):
    """Expand is written by the exporters; an Expand to 2^40 values is not."""
    i, outs = _head_io(copy)
    scores = outs[0]
    assert len(outs) == 1 and len(scores["shape"]) == 2
    nodes = [h.make_node("Expand", ["one", "shape"], ["big"]),
             h.make_node("Flatten", [i["name"]], ["flat"]),
             h.make_node("Slice", ["flat", "starts", "ends", "axes"], [scores["name"]])]
    _replace_head(copy, h.make_graph(nodes, "g", [_vi(i)], [_vi(scores)], initializer=[
        h.make_tensor("one", T.FLOAT, [1], [1.0]),
        h.make_tensor("shape", T.INT64, [2], [1 << 20, 1 << 20]),
        h.make_tensor("starts", T.INT64, [1], [0]),
        h.make_tensor("ends", T.INT64, [1], [scores["shape"][1]]),
        h.make_tensor("axes", T.INT64, [1], [1])]))
    with pytest.raises(BundleError, match=r"'big' would hold 1099511627776 values for one clip"):
        runtime.load(copy)


def test_a_graph_whose_real_output_differs_from_the_declared_one_is_refused(copy):
    i, outs = _head_io(copy)
    scores = outs[0]
    wrong = dict(scores, shape=[scores["shape"][0], scores["shape"][1]])
    # the graph declares its output as the manifest does, but computes one value more
    nodes = [h.make_node("Flatten", [i["name"]], ["flat"]),
             h.make_node("Slice", ["flat", "starts", "ends", "axes"], [scores["name"]])]
    nodes += [h.make_node("ArgMax", ["flat"], [o["name"]], axis=1, keepdims=0) for o in outs[1:]]
    _replace_head(copy, h.make_graph(nodes, "g", [_vi(i)], [_vi(wrong)] + [_vi(o) for o in outs[1:]],
                                     initializer=[
        h.make_tensor("starts", T.INT64, [1], [0]),
        h.make_tensor("ends", T.INT64, [1], [scores["shape"][1] + 1]),
        h.make_tensor("axes", T.INT64, [1], [1])]))
    with pytest.raises(BundleError, match="its shapes do not check out"):
        runtime.load(copy)


def test_a_deflated_constant_far_larger_than_its_manifest_shape_is_refused_unread(tmp_path):
    from .test_adafuse import tiny_adafuse as fuse
    out = tmp_path / "b"
    export(fuse(), out, execution="gathered", options={"stream": True, "buckets": 4})
    data = json.loads((out / "manifest.json").read_text())
    spec = data["constants"]
    name = spec["tensors"][0]["name"]
    path = out / spec["file"]
    # 2^27 float32 zeros (512 MiB), deflated to about half a MB, where the manifest says the
    # first constant's shape
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (1 << 27,)}
            np.lib.format.write_array_header_1_0(f, header)
            chunk = bytes(1 << 24)
            for _ in range(32):
                f.write(chunk)
    assert path.stat().st_size < 4 << 20
    spec["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(data))
    import tracemalloc
    tracemalloc.start()                       # NumPy reports its arrays to tracemalloc
    try:
        with pytest.raises(BundleError, match=f"{name!r} unpacks to"):
            load_bundle(out).constants()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20                    # nothing near the 512 MiB it claims


def test_a_huge_sparse_piece_file_is_refused_before_it_is_read(copy):
    spec = json.loads((copy / "manifest.json").read_text())["pieces"]["head"]
    path = copy / spec["file"]
    with open(path, "r+b") as f:
        f.truncate(30 << 30)                  # 30 GB, sparse: nothing on disk
    with pytest.raises(BundleError, match="piece 'head' .* bytes, more than"):
        runtime.load(copy)


@pytest.fixture()
def built(copy):
    runtime.build(copy)
    return copy, next((copy / "engines").iterdir())


@pytest.mark.parametrize("entry", ['"a string"', "[1, 2]", "{\"file\": 5}"])
def test_an_engine_index_entry_of_the_wrong_type_is_one_line(built, entry, capsys):
    bundle, folder = built
    text = (folder / "index.json").read_text()
    data = json.loads(text)
    data["pieces"]["head"] = json.loads(entry)
    (folder / "index.json").write_text(json.dumps(data))
    assert main(["bench", str(bundle), "--reps", "1", "--warmup", "0", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "engine cache index" in err, err


def test_an_engine_index_nested_200k_deep_is_one_line(built, capsys):
    bundle, folder = built
    (folder / "index.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["bench", str(bundle), "--reps", "1", "--warmup", "0", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "engine cache index" in err, err


def test_an_engine_swapped_for_another_pieces_is_named(built, capsys):
    bundle, folder = built
    data = json.loads((folder / "index.json").read_text())
    pieces = data["pieces"]
    other = next(n for n in pieces if n != "head")
    pieces["head"] = dict(pieces["head"], file=pieces[other]["file"],
                          sha256=pieces[other]["sha256"])
    (folder / "index.json").write_text(json.dumps(data))
    assert main(["bench", str(bundle), "--reps", "1", "--warmup", "0", "--json", "-q"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""                 # nothing half printed where JSON was asked for
    assert captured.err.count("\n") == 1 and "engine for piece 'head'" in captured.err


def test_the_exporters_stay_within_the_bound_for_a_clip_too_large(tmp_path):
    """export --frames 64 --size 4096 is refused in one line before torch allocates it."""
    assert main(["export", "vared_r2plus1d_18", "--random-weights", "--config",
                 "width_mult=0.125", "--frames", "64", "--size", "4096", "--out",
                 str(tmp_path / "b"), "-q"]) == 2
    assert not (tmp_path / "b").exists()
