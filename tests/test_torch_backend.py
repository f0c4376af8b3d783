"""The PyTorch backends: every family's bundle, translated to torch ops and ``torch.export``-ed,
matches the PyTorch reference with every branch forced (``verify``), and ONNX Runtime with the
gates free (same decisions, same scores). ``torch-cpu`` runs here; the CUDA-graph tests need a
CUDA GPU and skip elsewhere.

Tolerance: verify's (max |bundle - reference| <= 1e-4 * max |reference|, float32); against ONNX
Runtime the same bound.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from adaedge import models
from adaedge.bundle import BundleError
from adaedge.bundle import load as load_bundle
from adaedge.cli import main
from adaedge.export import export
from adaedge.runtime import BackendUnavailable, Stream, load
from adaedge.runtime.arrays import NUMPY, runs
from adaedge.runtime.backends.pytorch.translate import OnnxModule, UnsupportedPiece
from adaedge.runtime.backends.pytorch import TorchArrays
from adaedge.verify import relative_error as close
from adaedge.verify import verify

from .conftest import tiny_model, varied_clips
from .test_adafocus import tiny_focus
from .test_adafuse import clips as fuse_clips
from .test_adafuse import tiny_adafuse
from .test_tada import tiny_tada

RTOL = 1e-4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


FAMILIES = {
    "vared": lambda: (tiny_model(seed=4), {}),
    "tada": lambda: (tiny_tada(seed=1), {}),
    "adafocus": lambda: (tiny_focus(seed=1), {}),
    "adafuse-gathered": lambda: (tiny_adafuse(shift="online"),
                                 dict(execution="gathered", options={"stream": True, "buckets": 4})),
}


def verify_family(tmp_path, family: str, backend: str) -> None:
    """Export one family's tiny model and verify the bundle on ``backend`` (every branch forced,
    every exit, or every frame of a stream)."""
    model, kw = FAMILIES[family]()
    models.save_checkpoint(model, tmp_path / "ckpt.pt")
    export(model, tmp_path / "b", weights={"source": "test"}, **kw)
    report = verify(tmp_path / "b", checkpoint=tmp_path / "ckpt.pt", backend=backend)
    assert report.ok, [c.to_json() for c in report.cases if not c.ok]
    assert report.backend == backend


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_verifies_on_torch_cpu(tmp_path, family):
    verify_family(tmp_path, family, "torch-cpu")


def test_gated_runs_take_the_same_branches_as_onnxruntime(tiny_bundle):
    ort, tb = load(tiny_bundle), load(tiny_bundle, "torch-cpu")
    x = varied_clips(8).numpy()
    a, b = ort.classify(x), tb.classify(x)
    assert len({tuple(t.branches.values()) for t in a.traces}) > 1    # the batch really splits
    assert [t.branches for t in a.traces] == [t.branches for t in b.traces]
    assert close(b.scores, a.scores) <= RTOL
    assert [t.flops for t in a.traces] == [t.flops for t in b.traces]
    assert all(t.decisions == len(ort.manifest.switches()) for t in b.traces)
    exe = tb.executables["head"]
    assert exe.dynamic is True           # one program for every batch size


def test_streams_carry_device_state(tmp_path):
    model = tiny_adafuse(shift="online")
    export(model, tmp_path / "b", execution="dense", options={"stream": True})
    x = fuse_clips()
    ort, tb = Stream(load(tmp_path / "b"), 2), Stream(load(tmp_path / "b", "torch-cpu"), 2)
    for t in range(x.shape[2]):
        a, b = ort.step(x[:, :, t:t + 1].numpy()), tb.step(x[:, :, t:t + 1].numpy())
        assert close(b.scores, a.scores) <= RTOL
    assert all(isinstance(v, torch.Tensor) for v in tb.state.values())
    with torch.no_grad():
        assert close(b.scores, model(x).numpy()) <= RTOL


def test_device_row_operations_match_numpy():
    ops = TorchArrays("cpu")
    v = np.arange(6 * 3, dtype=np.float32).reshape(6, 3)
    t = ops.from_host(v)
    for index in (np.array([1, 2, 3]), np.array([0, 2, 5]), np.array([4])):
        assert np.array_equal(ops.to_host(ops.rows(t, index)), NUMPY.rows(v, index))
        got = ops.to_host(ops.put_rows(t, index, ops.from_host(-v[:len(index)])))
        assert np.array_equal(got, NUMPY.put_rows(v, index, -v[:len(index)]))
    parts = [(np.array([0, 3]), v[:2]), (np.array([1, 2, 4, 5]), v[2:])]
    want = NUMPY.scatter(parts, 6)
    got = ops.scatter([(i, ops.from_host(p)) for i, p in parts], 6)
    assert np.array_equal(ops.to_host(got), want)
    assert np.array_equal(ops.to_host(t), v)                  # nothing wrote into the source
    assert runs(np.array([0, 1, 2, 5, 6, 9])) == [(0, 0, 3), (3, 5, 2), (5, 9, 1)]


def test_unsupported_ops_and_computed_shapes_are_refused_with_the_node_named():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    odd = helper.make_model(helper.make_graph(
        [helper.make_node("Erf", ["x"], ["y"], name="the_erf")], "g", [x], [y]))
    with pytest.raises(UnsupportedPiece, match="the_erf.*Erf"):
        OnnxModule(odd)
    shape = helper.make_tensor_value_info("s", onnx.TensorProto.INT64, [2])
    computed = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"], name="the_reshape")], "g", [x, shape], [y]))
    with pytest.raises(UnsupportedPiece, match="the_reshape.*computes it"):
        OnnxModule(computed)(torch.zeros(2, 3), torch.tensor([3, 2]))


def test_tampered_piece_is_refused_before_translation(tmp_path, tiny):
    manifest = export(tiny, tmp_path / "b", weights={"source": "test"})
    path = tmp_path / "b" / manifest.pieces["head"].file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match="corrupt"):
        load(tmp_path / "b", "torch-cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_torch_cuda_without_a_gpu_says_so(tiny_bundle, capsys):
    with pytest.raises(BackendUnavailable, match="CUDA GPU"):
        load(tiny_bundle, "torch-cuda")
    assert main(["bench", str(tiny_bundle), "--backend", "torch-cuda", "--reps", "1"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err


def test_cli_build_and_bench_on_torch_cpu(tiny_bundle, capsys):
    assert main(["build", str(tiny_bundle), "--backend", "torch-cpu", "--quiet"]) == 0
    assert main(["bench", str(tiny_bundle), "--backend", "torch-cpu", "--reps", "1",
                 "--warmup", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["meta"]["backend"] == "torch-cpu"
    by = {c["name"]: c for c in report["configs"]}
    m = load_bundle(tiny_bundle).manifest
    assert by["static"]["gflops"] == pytest.approx(m.policy_flops("static") / 1e9, abs=1e-4)
    assert by["free"]["decisions"] == len(m.switches())      # one decision per gate per clip


# ---------------------------------------------------------------------------------------------
# on a CUDA GPU

@cuda
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_graphs_verify_every_family(tmp_path, family):
    verify_family(tmp_path, family, "torch-cuda")


@cuda
def test_cuda_graph_replays_do_not_alias_outputs(tiny_bundle):
    """Two runs of one piece: the first result must survive the second replay."""
    rt = load(tiny_bundle, "torch-cuda")
    exe = rt.executables["head"]
    name = rt.manifest.pieces["head"].inputs[0].name
    shape = [2] + [int(d) for d in rt.manifest.pieces["head"].inputs[0].shape[1:]]
    a = exe.run({name: torch.randn(shape, device="cuda")})
    keep = a["logits"].clone()
    exe.run({name: torch.randn(shape, device="cuda")})
    assert torch.equal(a["logits"], keep)
    x = varied_clips(8).numpy()
    cpu, gpu = load(tiny_bundle).classify(x), rt.classify(x)
    assert [t.branches for t in cpu.traces] == [t.branches for t in gpu.traces]
    assert close(gpu.scores, cpu.scores) <= RTOL       # TF32 is off: float32 throughout
