"""The TensorRT backend: what can be checked without TensorRT runs here (static types against
``tensorrt-stubs``, the engine cache's keys and refusals, the ONNX each builder parses, device row
operations on host memory); engine building and running need TensorRT and a GPU and skip elsewhere.

Tolerances: fp32 engines 1e-4 (verify's), fp16 graphs 1e-2 relative to the largest magnitude.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import onnxruntime as ort
import pytest
import torch

from adaedge import models
from adaedge.bundle import BundleError
from adaedge.bundle import load as load_bundle
from adaedge.export import export
from adaedge.runtime import BackendUnavailable, load
from adaedge.runtime.backends import tensorrt as trt_backend
from adaedge.runtime.arrays import NUMPY
from adaedge.runtime.backends.tensorrt.cuda import CudaArrays, HostDriver
from adaedge.runtime.onnx_prep import map_custom_ops, to_float16
from adaedge.runtime.backends.pytorch.translate import OnnxModule
from adaedge.runtime.backends.tensorrt import EngineCache, engine_key
from adaedge.verify import verify

from .test_tada import tiny_tada

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRT = trt_backend.load_tensorrt() is not None and torch.cuda.is_available()
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT and a CUDA GPU")


def _split_top(s: str) -> List[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def patch_stub(text: str) -> str:
    """tensorrt-stubs 10.13 has lines Python cannot parse: parameters named ``in`` and a
    parameter without a default after defaulted ones. Rename and default them; nothing else."""
    out = []
    for line in text.splitlines():
        line = re.sub(r"([(,] ?)in: ", r"\1in_: ", line)
        s = line.strip()
        if s.startswith("def ") and s.endswith(":"):
            try:
                ast.parse(s + " ...")
            except SyntaxError:
                head, rest = line.split("(", 1)
                args, tail = rest.rsplit(")", 1)
                parts, seen = _split_top(args), False
                for i, p in enumerate(parts):
                    if "=" in p:
                        seen = True
                    elif seen and p.strip() and not p.strip().startswith("*"):
                        parts[i] = p + " = ..."
                line = head + "(" + ",".join(parts) + ")" + tail
        out.append(line)
    return "\n".join(out) + "\n"


def stubs_dir(tmp: Path) -> Path:
    dist = importlib.metadata.distribution("tensorrt-stubs")
    for f in dist.files or []:
        if f.suffix == ".pyi":
            src = Path(str(dist.locate_file(f)))
            dst = tmp / str(f)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(patch_stub(src.read_text(encoding="utf-8")), encoding="utf-8")
    return tmp


def run_mypy(args: List[str], stubs: Path, cwd: Path) -> List[str]:
    env = dict(os.environ, MYPYPATH=str(stubs))
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent",
                           *args], cwd=cwd, env=env, capture_output=True, text=True)
    return proc.stdout.splitlines()


def test_tensorrt_code_type_checks_against_tensorrt_stubs(tmp_path):
    pytest.importorskip("mypy")
    try:
        importlib.metadata.distribution("tensorrt-stubs")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("tensorrt-stubs is not installed (the README's test command installs it)")
    stubs = stubs_dir(tmp_path / "stubs")
    # the check is real: a misuse of the API is caught through the stubs
    probe = tmp_path / "probe.py"
    probe.write_text("import tensorrt as trt\n\ndef f(c: trt.IExecutionContext) -> None:\n"
                     "    c.execute_async_v9(0)\n")
    caught = [line for line in run_mypy([str(probe)], stubs, tmp_path) if "probe.py" in line]
    assert any("execute_async_v9" in line for line in caught), caught
    files = ["adaedge/runtime/backends/tensorrt/__init__.py",
             "adaedge/runtime/backends/tensorrt/cache.py",
             "adaedge/runtime/backends/tensorrt/cuda.py"]
    assert all((ROOT / f).is_file() for f in files)
    out = run_mypy(files, stubs, ROOT)
    ours = [line for line in out if line.startswith("adaedge/")]
    assert ours == [], ours
    assert any(f"checked {len(files)} source files" in line for line in out), out[-3:]


# ---------------------------------------------------------------------------------------------
# the engine cache

DEVICE = {"name": "NVIDIA Orin", "compute_capability": "8.7"}


def test_cache_returns_only_engines_built_for_this_setup(tiny_bundle, tmp_path):
    bundle = load_bundle(shutil.copytree(tiny_bundle, tmp_path / "b"))
    cache = EngineCache(bundle)
    sha = bundle.manifest.pieces["head"].sha256
    key = engine_key(sha, "10.3.0", DEVICE, "fp16", 1, None)
    assert cache.lookup("head", key) == (None, "no engine built yet")
    path = cache.store("head", key, b"engine bytes")
    assert cache.lookup("head", key) == (b"engine bytes", "")
    other = engine_key(sha, "8.6.2", {"name": "NVIDIA H100", "compute_capability": "9.0"},
                       "fp16", 1, None)
    found, why = cache.lookup("head", other)
    assert found is None
    assert "tensorrt '10.3.0' (this machine: '8.6.2')" in why and "gpu 'NVIDIA Orin'" in why
    assert "precision" not in why                         # only what differs is named
    stale = engine_key("0" * 64, "10.3.0", DEVICE, "fp16", 1, None)   # the piece changed
    assert "onnx_sha256" in cache.lookup("head", stale)[1]
    path.write_bytes(b"tampered")
    assert "does not match its recorded hash" in cache.lookup("head", key)[1]
    index = json.loads(cache.index_path.read_text())
    index["pieces"]["head"]["file"] = "../../manifest.json"
    cache.index_path.write_text(json.dumps(index))
    with pytest.raises(BundleError, match="leaves the bundle"):
        cache.lookup("head", key)
    cache.index_path.write_text("{not json")
    with pytest.raises(BundleError, match="unreadable"):
        cache.lookup("head", key)


def test_the_engine_cache_writes_and_reads_nothing_through_links_the_bundle_ships(tiny_bundle,
                                                                                   tmp_path):
    root = shutil.copytree(tiny_bundle, tmp_path / "b")
    bundle = load_bundle(root)
    cache = EngineCache(bundle)
    key = engine_key(bundle.manifest.pieces["head"].sha256, "10.3.0", DEVICE, "fp16", 1, None)
    cache.folder.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    os.symlink(victim, cache.folder / f"head.{trt_backend.key_digest(key)}.engine")
    path = cache.store("head", key, b"engine bytes")      # replaces the link, never follows it
    assert victim.read_text() == "keep me" and not path.is_symlink()
    assert cache.lookup("head", key) == (b"engine bytes", "")
    cache.index_path.unlink()
    outside = tmp_path / "index.json"
    outside.write_text(json.dumps({"pieces": {}}))
    os.symlink(outside, cache.index_path)                 # an index shipped as a link out
    with pytest.raises(BundleError, match="unreadable"):
        cache.lookup("head", key)
    with pytest.raises(BundleError, match="unreadable"):
        cache.store("head", key, b"engine bytes")
    assert json.loads(outside.read_text()) == {"pieces": {}}


def test_keys_cover_what_an_engine_depends_on():
    base = engine_key("a" * 64, "10.3.0", DEVICE, "fp32", 1, None)
    for changed in (engine_key("b" * 64, "10.3.0", DEVICE, "fp32", 1, None),
                    engine_key("a" * 64, "10.4.0", DEVICE, "fp32", 1, None),
                    engine_key("a" * 64, "10.3.0", {**DEVICE, "compute_capability": "8.6"},
                               "fp32", 1, None),
                    engine_key("a" * 64, "10.3.0", DEVICE, "fp16", 1, None),
                    engine_key("a" * 64, "10.3.0", DEVICE, "fp32", 16, None),
                    engine_key("a" * 64, "10.3.0", DEVICE, "fp32", 1, "c" * 64)):
        assert changed != base and trt_backend.key_digest(changed) != trt_backend.key_digest(base)


@pytest.mark.skipif(trt_backend.load_tensorrt() is not None, reason="TensorRT is installed here")
def test_without_tensorrt_the_backend_says_how_to_install_it(tiny_bundle, capsys):
    from adaedge.cli import main
    with pytest.raises(BackendUnavailable, match="pip install tensorrt.*Jetson"):
        load(tiny_bundle, "tensorrt")
    assert main(["build", str(tiny_bundle), "--backend", "tensorrt", "--quiet"]) == 2
    assert "TensorRT" in capsys.readouterr().err
    assert main(["build", str(tiny_bundle), "--backend", "onnxruntime", "--precision", "fp16"]) == 2
    assert "onnxruntime backend runs precision fp32 or int8, not 'fp16'" in \
        capsys.readouterr().err
    assert main(["build", str(tiny_bundle), "--backend", "onnxruntime", "--max-batch", "4"]) == 2
    assert "--max-batch does not apply to the onnxruntime backend" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# what the builder parses

@pytest.fixture(scope="module")
def tada_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("tada") / "b"
    model = tiny_tada(seed=2)
    export(model, out, weights={"source": "test"})
    return load_bundle(out)


def _ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _feeds(bundle, piece, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal([batch] + [int(d) for d in t.shape[1:]]).astype(np.float32)
            for t in bundle.manifest.pieces[piece].inputs}


def test_custom_nodes_become_plugin_nodes_or_their_bodies(tada_bundle):
    piece = next(n for n in tada_bundle.manifest.pieces
                 if any(x.domain == "adaedge" for x in tada_bundle.piece_model(n).graph.node))
    model = tada_bundle.piece_model(piece)
    plugin = map_custom_ops(model, ["CalibratedConv"])
    nodes = [n for n in plugin.graph.node if n.domain == "adaedge"]
    assert nodes and all(n.op_type == "CalibratedConv" and not n.overload for n in nodes)
    assert len(plugin.functions) == 0                   # no body: the parser asks the registry
    assert {a.name for a in nodes[0].attribute} >= {"cal_dim", "strides", "pads", "group"}
    body = map_custom_ops(model)
    assert not any(n.domain == "adaedge" for n in body.graph.node)
    assert all(o.domain != "adaedge" for o in body.opset_import)
    feeds = _feeds(tada_bundle, piece)
    for a, b in zip(_ort(model, feeds), _ort(body, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_float16_graphs_keep_their_interface_and_stay_close(tada_bundle):
    for piece in tada_bundle.manifest.pieces:
        model = map_custom_ops(tada_bundle.piece_model(piece))
        half = to_float16(model)
        assert [i.name for i in half.graph.input] == [i.name for i in model.graph.input]
        assert [o.name for o in half.graph.output] == [o.name for o in model.graph.output]
        assert all(i.type.tensor_type.elem_type == 1 for i in half.graph.input)
        assert sum(init.data_type == 10 for init in half.graph.initializer) > 0   # float16
        xs = [torch.from_numpy(v) for v in _feeds(tada_bundle, piece).values()]
        with torch.no_grad():
            want = OnnxModule(model)(*xs)
            got = OnnxModule(half)(*xs)
        for w, g in zip(want, got):
            assert g.dtype == w.dtype
            assert float((g - w).abs().max() / w.abs().max()) < 1e-2, piece


# ---------------------------------------------------------------------------------------------
# device arrays (the row arithmetic, on host memory)

def test_device_rows_gather_scatter_and_free():
    driver = HostDriver()
    ops = CudaArrays(driver)
    v = np.arange(7 * 2 * 3, dtype=np.float32).reshape(7, 2, 3)
    d = ops.from_host(v)
    for index in (np.array([2, 3, 4]), np.array([6, 0, 3]), np.array([5])):
        assert np.array_equal(ops.to_host(ops.rows(d, index)), NUMPY.rows(v, index))
        new = -v[:len(index)]
        assert np.array_equal(ops.to_host(ops.put_rows(d, index, ops.from_host(new))),
                              NUMPY.put_rows(v, index, new))
    parts = [(np.array([0, 1, 5]), v[:3]), (np.array([2, 3, 4, 6]), v[3:])]
    got = ops.scatter([(i, ops.from_host(p)) for i, p in parts], 7)
    assert np.array_equal(ops.to_host(got), NUMPY.scatter(parts, 7))
    both = ops.concat([ops.rows(d, np.array([1])), ops.rows(d, np.array([4, 5]))])
    assert np.array_equal(ops.to_host(both), v[[1, 4, 5]])
    assert np.array_equal(ops.to_host(d), v)                 # the source was never written
    before = driver.live_blocks
    del got, both
    assert driver.live_blocks == before - 2                  # dropped values free their memory


# ---------------------------------------------------------------------------------------------
# with TensorRT and a GPU

@needs_trt
def test_fp32_engines_verify_and_are_reused(tmp_path, tiny):
    models.save_checkpoint(tiny, tmp_path / "ckpt.pt")
    export(tiny, tmp_path / "b", weights={"source": "test"})
    report = verify(tmp_path / "b", checkpoint=tmp_path / "ckpt.pt", backend="tensorrt")
    assert report.ok, [c.to_json() for c in report.cases if not c.ok]
    index = json.loads((tmp_path / "b" / "engines" / "tensorrt" / "index.json").read_text())
    assert set(index["pieces"]) == set(load_bundle(tmp_path / "b").manifest.pieces)
    stamp = {p: (tmp_path / "b" / "engines" / "tensorrt" / e["file"]).stat().st_mtime
             for p, e in index["pieces"].items()}
    load(tmp_path / "b", "tensorrt")                            # cached: nothing rebuilt
    assert all((tmp_path / "b" / "engines" / "tensorrt" / index["pieces"][p]["file"])
               .stat().st_mtime == t for p, t in stamp.items())


@needs_trt
def test_batch_profile_groups_by_branch_and_fp16_stays_close(tmp_path, tiny):
    from .conftest import varied_clips
    export(tiny, tmp_path / "b", weights={"source": "test"})
    x = varied_clips(8).numpy()
    want = load(tmp_path / "b").classify(x)
    got = load(tmp_path / "b", "tensorrt", max_batch=8).classify(x)
    assert [t.branches for t in got.traces] == [t.branches for t in want.traces]
    assert np.abs(got.scores - want.scores).max() <= 1e-4 * np.abs(want.scores).max() + 1e-6
    half = load(tmp_path / "b", "tensorrt", precision="fp16").classify(x, force="static")
    ref = load(tmp_path / "b").classify(x, force="static")
    assert np.abs(half.scores - ref.scores).max() <= 1e-2 * np.abs(ref.scores).max()


@needs_trt
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("nvcc") is None,
                    reason="needs cmake and nvcc to build the plugin library")
def test_plugins_take_the_custom_nodes_in_fp32_and_fp16(tmp_path):
    """Build the plugin library, then run a TAda2D bundle whose CalibratedConv nodes the plugin
    implements: fp32 verifies against the reference; fp16 (plugins in float32 inside a float16
    graph) stays within 1e-2; a second backend in the process reuses the loaded library."""
    from .test_plugins import PLUGINS, TRT_INCLUDE
    if TRT_INCLUDE is None:
        pytest.skip("TensorRT's headers were not found")
    build = tmp_path / "plugins"
    subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(build),
                    f"-DTENSORRT_INCLUDE_DIR={TRT_INCLUDE}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    lib = str(build / "libadaedge_plugins.so")
    model = tiny_tada(seed=4)
    models.save_checkpoint(model, tmp_path / "ckpt.pt")
    export(model, tmp_path / "b", weights={"source": "test"})
    report = verify(tmp_path / "b", checkpoint=tmp_path / "ckpt.pt", backend="tensorrt",
                    plugins=lib)
    assert report.ok, [c.to_json() for c in report.cases if not c.ok]
    x = np.random.default_rng(0).standard_normal(
        [2] + load_bundle(tmp_path / "b").manifest.full_clip_shape).astype(np.float32)
    ref = load(tmp_path / "b").classify(x).scores
    half = load(tmp_path / "b", "tensorrt", precision="fp16", plugins=lib)
    assert "CalibratedConv" in half.backend.plugin_ops
    assert np.abs(half.classify(x).scores - ref).max() <= 1e-2 * np.abs(ref).max()
