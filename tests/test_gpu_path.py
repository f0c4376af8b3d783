"""The GPU path's desk-check fixes, each proved where this machine allows (no GPU, no TensorRT):

* Polygraphy's ``MemcpyKind`` is a class of ``ctypes.c_int`` constants: the driver passes the
  constant, and a wrapper that fails its first copies is skipped for the next one;
* a float16 graph keeps float32 I/O around plugin nodes (TensorRT 11 builds strongly typed);
* the plugin library is loaded once per process (a second backend reuses it);
* torch-cuda turns cuDNN's TF32 off (verify's 1e-4 holds);
* the plugin CMake keeps its default architectures on a second configure, and refuses
  TensorRT 8.6 headers with the reason;
* ``torch.export`` with a dynamic batch from a batch-1 example;
* the lean runtime refuses an engine that is not version-compatible, saying so.

The same behaviours on a real GPU are in ``benchmarks/gpu_check.sh``; CUDA tests here skip.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from adaedge.bundle import load as load_bundle
from adaedge.errors import BackendUnavailable, BundleError
from adaedge.export import export
from adaedge.runtime.backends import tensorrt as trt_backend
from adaedge.runtime.backends.pytorch import batch_bucket, exact_float32, export_piece
from adaedge.runtime.backends.tensorrt import cuda
from adaedge.runtime.onnx_prep import map_custom_ops, to_float16
from adaedge.verify import relative_error

from .test_tada import tiny_tada

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "adaedge" / "plugins"


# ---------------------------------------------------------------------------------------------
# 1. Polygraphy's MemcpyKind, and falling back from a wrapper that cannot copy

def fake_polygraphy(calls):
    """A ``polygraphy.cuda`` with Polygraphy's shapes: MemcpyKind a plain class of c_int
    constants (calling it raises TypeError, as in Polygraphy), memcpy handing ``kind`` on."""
    blocks = {}

    class MemcpyKind:
        HostToHost = ctypes.c_int(0)
        HostToDevice = ctypes.c_int(1)
        DeviceToHost = ctypes.c_int(2)
        DeviceToDevice = ctypes.c_int(3)
        Default = ctypes.c_int(4)

    class Wrapper:
        def malloc(self, nbytes):
            buf = ctypes.create_string_buffer(nbytes)
            blocks[ctypes.addressof(buf)] = buf
            return ctypes.addressof(buf)

        def free(self, ptr):
            blocks.pop(ptr)

        def memcpy(self, dst, src, nbytes, kind, stream_ptr=None):
            if not isinstance(kind, ctypes.c_int):
                raise ctypes.ArgumentError("Don't know how to convert parameter 4")
            calls.append(kind.value)
            ctypes.memmove(dst, src, nbytes)

    class Stream:
        ptr = 1234

        def synchronize(self):
            pass

        def free(self):
            calls.append("stream freed")

    module = types.ModuleType("polygraphy.cuda")
    module.MemcpyKind = MemcpyKind
    module.wrapper = Wrapper
    module.Stream = Stream
    return module


def test_polygraphy_driver_passes_memcpy_kinds_as_its_constants(monkeypatch):
    calls = []
    package = types.ModuleType("polygraphy")
    package.cuda = fake_polygraphy(calls)
    monkeypatch.setitem(sys.modules, "polygraphy", package)
    monkeypatch.setitem(sys.modules, "polygraphy.cuda", package.cuda)
    with pytest.raises(TypeError):            # what the old code did on every copy
        package.cuda.MemcpyKind(1)
    driver = cuda.open_driver("polygraphy")   # opens only if its round trip works
    assert calls == [cuda.H2D, cuda.D2D, cuda.D2H]
    arrays = cuda.CudaArrays(driver)
    v = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(arrays.to_host(arrays.rows(arrays.from_host(v), np.array([2, 0]))),
                          v[[2, 0]])
    driver.close()
    assert calls[-1] == "stream freed"


def test_a_wrapper_that_cannot_copy_is_skipped_for_the_next():
    class Broken(cuda.HostDriver):
        name = "broken"

        def copy(self, dst, src, nbytes, kind):
            raise TypeError("MemcpyKind() takes no arguments")

    class Missing:
        def __init__(self):
            raise BackendUnavailable("missing is not installed")

    driver = cuda.open_driver(drivers={"missing": Missing, "broken": Broken,
                                       "host": cuda.HostDriver})
    assert driver.name == "host"
    with pytest.raises(BackendUnavailable, match="broken failed its first copies: TypeError"):
        cuda.open_driver(drivers={"missing": Missing, "broken": Broken})
    with pytest.raises(BackendUnavailable, match="the CUDA wrapper broken cannot be used"):
        cuda.open_driver("broken", drivers={"broken": Broken})


# ---------------------------------------------------------------------------------------------
# 2. float16 graphs with plugin nodes

@pytest.fixture(scope="module")
def tada_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("tada") / "b"
    export(tiny_tada(seed=3), out, weights={"source": "test"})
    return load_bundle(out)


def _with_bodies(plugin_model, original):
    """The plugin graph with the custom op's function bodies put back, so ONNX Runtime runs it."""
    m = onnx.ModelProto()
    m.CopyFrom(plugin_model)
    m.functions.extend(original.functions)
    names = {(f.name, f.overload) for f in original.functions}
    for node in m.graph.node:
        if node.domain == "adaedge":
            src = next(n for n in original.graph.node if n.domain == "adaedge")
            node.overload = src.overload if (node.op_type, src.overload) in names else ""
    if not any(o.domain == "adaedge" for o in m.opset_import):
        m.opset_import.append(onnx.helper.make_opsetid("adaedge", 1))
    return m


def test_float16_graphs_keep_plugin_nodes_in_float32(tada_bundle):
    checked = 0
    for piece in tada_bundle.manifest.pieces:
        original = tada_bundle.piece_model(piece)
        if not any(n.domain == "adaedge" for n in original.graph.node):
            continue
        plugin = map_custom_ops(original, ["CalibratedConv"])
        half = to_float16(plugin, keep_float32=["CalibratedConv"])
        types_ = {v.name: v.type.tensor_type.elem_type for v in
                  list(half.graph.value_info) + list(half.graph.input) + list(half.graph.output)}
        types_.update({i.name: i.data_type for i in half.graph.initializer})
        producers = {o: n for n in half.graph.node for o in n.output}
        readers = {}
        for n in half.graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        nodes = [n for n in half.graph.node if n.domain == "adaedge"]
        assert nodes
        for node in nodes:
            for name in node.input:
                if name in producers:          # an activation: cast to float32 just before
                    cast = producers[name]
                    assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
                else:                          # a weight only plugins read: kept float32
                    assert types_[name] == onnx.TensorProto.FLOAT, name
            for name in node.output:           # cast back to float16 right after
                (after,) = readers[name]
                assert after.op_type == "Cast" and after.attribute[0].i == onnx.TensorProto.FLOAT16
        # the rest of the graph is float16, and the interface float32
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in half.graph.initializer)
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in half.graph.input)
        rng = np.random.default_rng(0)
        feeds = {t.name: rng.standard_normal([2] + [int(d) for d in t.shape[1:]]).astype(np.float32)
                 for t in tada_bundle.manifest.pieces[piece].inputs}

        def run(m):
            s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            return s.run(None, feeds)
        for want, got in zip(run(original), run(_with_bodies(half, original))):
            assert relative_error(got, want) < 1e-2, piece
        checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------------------------
# 3. the plugin library, once per process

class FakeRegistry:
    """TensorRT's registry as the headers describe it: load_library returns None when any of the
    library's plugins are already registered; get_creator finds IPluginV3 creators (10+)."""

    def __init__(self):
        self.creators = set()
        self.loads = 0

    def load_library(self, path):
        self.loads += 1
        if self.creators:
            return None
        self.creators |= {"CheapFill", "CalibratedConv"}
        return object()

    def get_creator(self, name, version, namespace=""):
        return object() if name in self.creators and version == "1" else None


def test_the_plugin_library_is_loaded_once_per_process(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_backend, "_PLUGIN_LIBRARIES", {})
    lib = tmp_path / "libadaedge_plugins.so"
    lib.write_bytes(b"a plugin library")
    registry = FakeRegistry()
    first = trt_backend.load_plugin_library(registry, str(lib))
    second = trt_backend.load_plugin_library(registry, str(tmp_path / "." / lib.name))
    assert first == second and registry.loads == 1          # the second backend reuses it
    assert sorted(first[0]) == ["CalibratedConv", "CheapFill"]
    other = tmp_path / "copy.so"
    other.write_bytes(b"another build")
    with pytest.raises(BackendUnavailable, match="another adaedge plugin library is already"):
        trt_backend.load_plugin_library(registry, str(other))
    lib.write_bytes(b"rebuilt")
    with pytest.raises(BackendUnavailable, match="changed since this process loaded it"):
        trt_backend.load_plugin_library(registry, str(lib))
    with pytest.raises(BackendUnavailable, match="does not exist"):
        trt_backend.load_plugin_library(registry, str(tmp_path / "nope.so"))


# ---------------------------------------------------------------------------------------------
# 4. TF32

def test_torch_cuda_runs_exact_float32():
    flags = types.SimpleNamespace(
        backends=types.SimpleNamespace(cudnn=types.SimpleNamespace(allow_tf32=True),
                                       cuda=types.SimpleNamespace(
                                           matmul=types.SimpleNamespace(allow_tf32=True))))
    exact_float32(flags)
    assert flags.backends.cudnn.allow_tf32 is False
    assert flags.backends.cuda.matmul.allow_tf32 is False
    before = torch.backends.cudnn.allow_tf32
    try:
        exact_float32(torch)               # the real flags, and torch.export still works after
        assert torch.backends.cudnn.allow_tf32 is False
        module = torch.nn.Conv2d(3, 4, 3)
        program = torch.export.export(module, (torch.randn(2, 3, 8, 8),), strict=False)
        assert program is not None
    finally:
        torch.backends.cudnn.allow_tf32 = before


# ---------------------------------------------------------------------------------------------
# 5. the plugin CMake

def _fake_tensorrt_headers(folder: Path, major: int, minor: int) -> Path:
    folder.mkdir(parents=True)
    if major >= 10:            # 10.12 and newer spell the version TRT_*_ENTERPRISE
        text = (f"#define TRT_MAJOR_ENTERPRISE {major}\n#define TRT_MINOR_ENTERPRISE {minor}\n"
                "#define TRT_PATCH_ENTERPRISE 0\n#define NV_TENSORRT_MAJOR TRT_MAJOR_ENTERPRISE\n")
    else:
        text = (f"#define NV_TENSORRT_MAJOR {major}\n#define NV_TENSORRT_MINOR {minor}\n"
                "#define NV_TENSORRT_PATCH 1\n")
    (folder / "NvInferVersion.h").write_text(text)
    (folder / "NvInferRuntime.h").write_text("// configure only\n")
    return folder


def _cache_value(build: Path, key: str) -> str:
    for line in (build / "CMakeCache.txt").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split("=", 1)[1]
    raise KeyError(key)


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None,
                    reason="needs nvcc and cmake")
def test_plugin_cmake_keeps_its_architectures_and_refuses_tensorrt_8(tmp_path):
    inc = _fake_tensorrt_headers(tmp_path / "trt10", 10, 13)
    build = tmp_path / "build"
    for _ in range(2):                                  # the second configure used to lose them
        proc = subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(build),
                               f"-DTENSORRT_INCLUDE_DIR={inc}"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "TensorRT 10.13.0" in proc.stdout
        assert "87" in _cache_value(build, "CMAKE_CUDA_ARCHITECTURES").split(";")
        assert "90" in _cache_value(build, "CMAKE_CUDA_ARCHITECTURES").split(";")
    proc = subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(build),
                           "-DCMAKE_CUDA_ARCHITECTURES=80"], capture_output=True, text=True)
    assert proc.returncode == 0 and _cache_value(build, "CMAKE_CUDA_ARCHITECTURES") == "80"
    old = _fake_tensorrt_headers(tmp_path / "trt86", 8, 6)
    proc = subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(tmp_path / "b86"),
                           f"-DTENSORRT_INCLUDE_DIR={old}"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "TensorRT 8.6.1 is too old" in proc.stderr and "IPluginV3" in proc.stderr


# ---------------------------------------------------------------------------------------------
# 6. torch.export with a dynamic batch from a batch-1 example

class Piece(torch.nn.Module):
    """Like a translated piece (``OnnxModule``): inputs as varargs, one batched, one constant."""

    def forward(self, *inputs):
        x, w = inputs
        y = torch.nn.functional.conv2d(x, w, padding=1).relu()
        return (y.reshape(y.shape[0], -1).sum(1, keepdim=True),)


def test_torch_export_is_dynamic_from_a_batch_of_one():
    w = torch.randn(4, 3, 3, 3)
    with _no_warning():                   # no fallback to a static export
        program, dynamic = export_piece(Piece(), [True, False], [torch.randn(1, 3, 8, 8), w])
    assert dynamic
    for n in (1, 2, 7, 16):
        x = torch.randn(n, 3, 8, 8)
        assert torch.allclose(program(x, w)[0], Piece()(x, w)[0], rtol=1e-5, atol=1e-5)
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 17)] == [1, 2, 4, 8, 8, 16, 16, 32]


class _no_warning:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# 7. the lean runtime

class _LeanRuntime:
    def __init__(self, logger):
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, data):
        raise AssertionError("a refused engine must not be deserialized")


def fake_lean_tensorrt():
    """``tensorrt_lean``'s surface: a runtime, no builder."""
    module = types.ModuleType("tensorrt_lean")
    module.__version__ = "10.13.0"
    module.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    module.Runtime = _LeanRuntime
    module.BuilderFlag = types.SimpleNamespace()
    return module


def test_the_lean_runtime_refuses_engines_that_are_not_version_compatible(tiny_bundle, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(trt_backend, "trt", fake_lean_tensorrt())
    bundle = load_bundle(shutil.copytree(tiny_bundle, tmp_path / "b"))
    backend = trt_backend.TensorRTBackend(driver=cuda.HostDriver())
    assert backend.lean and backend.version_compatible
    assert backend.runtime.engine_host_code_allowed
    plain = dict(backend.key(bundle, "head"), version_compatible=False)   # built without VC
    trt_backend.EngineCache(bundle).store("head", plain, b"plan")
    with pytest.raises(BundleError, match=r"version_compatible False \(this machine: True\).*"
                                          r"runs only version-compatible ones.*--version-compatible"):
        backend.load(bundle, "head")
    with pytest.raises(BundleError, match="no engine built yet.*lean runtime"):
        backend.load(bundle, "stem_s.gate")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_cache_is_bounded_and_freed(tiny_bundle):
    from adaedge.runtime import load
    rt = load(tiny_bundle, "torch-cuda", graph_cache=2)
    x = np.random.default_rng(0).standard_normal((5, 3, 5, 32, 32)).astype(np.float32)
    want = load(tiny_bundle).classify(x, force="static").scores
    for n in (1, 2, 3, 5):                  # buckets 1, 2, 4, 8: more than the cache holds
        got = rt.classify(x[:n], force="static").scores
        assert relative_error(got, want[:n]) <= 1e-4
    assert all(len(e._graphs) <= 2 for e in rt.backend.executables)
    rt.backend.close()
    assert not rt.backend.executables
