"""The CUDA kernels of the TensorRT plugins, checked where they can be.

* Everywhere: ``adaedge_kernels.cu`` compiled as C++ for the host (``kernels/host_shim.h``: one
  thread walks every output element) against the references: ``CalibratedConv``'s standard-op
  body run by ONNX Runtime, and the VA-RED² fills' standard-op arithmetic in PyTorch.
* Where nvcc is present: the kernels compile for Jetson Xavier and Orin and for Hopper.
* Where TensorRT's headers are found (``TENSORRT_INCLUDE_DIR``): the plugin library builds with
  the documented CMake command.
* On a CUDA GPU with CuPy: the same comparisons on the device, and each kernel timed against its
  standard-op body (printed; timings are never asserted).

Tolerance: 1e-5 relative to the largest magnitude (float32 sums in a different order).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from adaedge.export.graph import Graph
from adaedge.export.tada import calibrated_conv_function
from adaedge.verify import relative_error as close

KERNELS = Path(__file__).resolve().parents[1] / "adaedge" / "plugins" / "kernels"
PLUGINS = KERNELS.parent
RTOL = 1e-5


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    out = tmp_path_factory.mktemp("kernels")
    src = out / "host.cpp"
    src.write_text('#include "host_shim.h"\n#include "adaedge_kernels.cu"\n')
    lib = out / "libhost_kernels.so"
    subprocess.run([cxx, "-O2", "-shared", "-fPIC", f"-I{KERNELS}", "-x", "c++", str(src), "-o",
                    str(lib)], check=True, capture_output=True)
    return ctypes.CDLL(str(lib))


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


def _rand(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# references

def channel_fill_reference(y, w, b, relu):
    """What VA-RED²'s channel-fill piece computes: y, then the grouped cheap convolution."""
    c, k = y.shape[1], w.shape[-1]
    f = F.conv3d(torch.from_numpy(y), torch.from_numpy(w).reshape(-1, 1, 1, k, k),
                 torch.from_numpy(b), padding=(0, k // 2, k // 2), groups=c)
    f = F.relu(f) if relu else f
    return torch.cat([torch.from_numpy(y), f], 1).numpy()


def temporal_fill_reference(y, w, b, r, frames_out, relu):
    """What VA-RED²'s temporal-fill piece computes: skipped frames interleaved after each
    computed one (the exporter's reshape/transpose/concat), then the activation."""
    n, c, tc, h, wd = y.shape
    k = w.shape[-1]
    f = F.conv3d(torch.from_numpy(y), torch.from_numpy(w).reshape(-1, 1, 1, k, k),
                 torch.from_numpy(b), padding=(0, k // 2, k // 2), groups=c)
    f6 = f.reshape(n, c, r - 1, tc, h, wd).permute(0, 1, 3, 2, 4, 5)
    out = torch.cat([torch.from_numpy(y).reshape(n, c, tc, 1, h, wd), f6], 3)
    out = out.reshape(n, c, tc * r, h, wd)[:, :, :frames_out]
    return (F.relu(out) if relu else out).numpy()


def calibrated_conv_body(x, alpha, w, b, cal_dim, strides, pads, dilations, group):
    """CalibratedConv's standard-op body (the exporter's function), run by ONNX Runtime."""
    g = Graph("cc")
    xi = g.input("x", ["NT", *x.shape[1:]])
    ai = g.input("alpha", ["NT", alpha.shape[1], 1, 1])
    g.output(g.custom(calibrated_conv_function(cal_dim), xi, ai, g.const(w, "w"), g.const(b, "b"),
                      cal_dim=cal_dim, strides=strides, pads=pads, dilations=dilations,
                      group=group), "y")
    sess = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "alpha": alpha[:, :, None, None]})[0]


CONV_CASES = [  # cal_dim, Cin, Cout, group, kernel, strides, pads, dilations
    ("cin", 6, 8, 1, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1]),
    ("cout", 6, 8, 1, (3, 3), [2, 2], [1, 1, 1, 1], [1, 1]),
    ("cin", 8, 8, 4, (3, 3), [1, 2], [1, 0, 1, 0], [2, 1]),
    ("cout", 4, 6, 2, (1, 1), [1, 1], [0, 0, 0, 0], [1, 1]),
]


def conv_case(case, seed=0):
    cal_dim, cin, cout, group, (kh, kw), strides, pads, dil = case
    x = _rand(6, cin, 9, 11, seed=seed)
    w = _rand(cout, cin // group, kh, kw, seed=seed + 1)
    b = _rand(cout, seed=seed + 2)
    alpha = 1 + 0.5 * _rand(6, cin if cal_dim == "cin" else cout, seed=seed + 3)
    return x, alpha, w, b


def out_size(n, k, s, p0, p1, d):
    return (n + p0 + p1 - d * (k - 1) - 1) // s + 1


# ---------------------------------------------------------------------------------------------
# on the host

@pytest.mark.parametrize("relu", [0, 1])
@pytest.mark.parametrize("mult", [1, 3])
def test_channel_fill_kernel_matches_the_fill_arithmetic(host_kernels, mult, relu):
    n, cc, t, h, wd, k = 2, 3, 4, 5, 6, 3
    y = np.abs(_rand(n, cc, t, h, wd, seed=1))
    w, b = _rand(cc * mult, k, k, seed=2), _rand(cc * mult, seed=3)
    out = np.full((n, cc * (1 + mult), t, h, wd), np.nan, np.float32)
    host_kernels.adaedge_channel_fill(_ptr(y), _ptr(w), _ptr(b), _ptr(out), n, cc, mult, t, h, wd,
                                      k, relu)
    assert close(out, channel_fill_reference(y, w, b, relu)) <= RTOL


@pytest.mark.parametrize("r,frames_out", [(2, 8), (2, 7), (4, 8), (4, 6)])
def test_temporal_fill_kernel_interleaves_like_the_fill_arithmetic(host_kernels, r, frames_out):
    n, c, h, wd, k = 2, 3, 5, 4, 3
    tc = -(-frames_out // r)
    y = np.abs(_rand(n, c, tc, h, wd, seed=4))
    w, b = _rand(c * (r - 1), k, k, seed=5), _rand(c * (r - 1), seed=6)
    out = np.full((n, c, frames_out, h, wd), np.nan, np.float32)
    host_kernels.adaedge_temporal_fill(_ptr(y), _ptr(w), _ptr(b), _ptr(out), n, c, tc, r,
                                       frames_out, h, wd, k, 1)
    assert close(out, temporal_fill_reference(y, w, b, r, frames_out, True)) <= RTOL


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}-g{c[3]}-s{c[5]}")
def test_calibrated_conv_kernel_matches_its_standard_op_body(host_kernels, case):
    cal_dim, cin, cout, group, (kh, kw), strides, pads, dil = case
    x, alpha, w, b = conv_case(case)
    ho = out_size(x.shape[2], kh, strides[0], pads[0], pads[2], dil[0])
    wo = out_size(x.shape[3], kw, strides[1], pads[1], pads[3], dil[1])
    out = np.full((x.shape[0], cout, ho, wo), np.nan, np.float32)
    host_kernels.adaedge_calibrated_conv(
        _ptr(x), _ptr(w), _ptr(alpha), _ptr(b), _ptr(out), x.shape[0], cin, x.shape[2], x.shape[3],
        cout, group, kh, kw, strides[0], strides[1], pads[0], pads[1], dil[0], dil[1], ho, wo,
        1 if cal_dim == "cin" else 0)
    want = calibrated_conv_body(x, alpha, w, b, cal_dim, strides, pads, dil, group)
    assert want.shape == out.shape
    assert close(out, want) <= RTOL


# ---------------------------------------------------------------------------------------------
# compilers

@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_72", "sm_87", "sm_90"])
def test_kernels_compile_for_jetson_and_desktop_gpus(tmp_path, arch):
    out = tmp_path / "k.ptx"
    proc = subprocess.run(["nvcc", "-ptx", f"-arch={arch}", str(KERNELS / "adaedge_kernels.cu"),
                           "-o", str(out)], capture_output=True, text=True)
    if proc.returncode and "Unsupported gpu architecture" in proc.stderr:
        pytest.skip(f"this nvcc does not target {arch}")
    assert proc.returncode == 0, proc.stderr
    ptx = out.read_text()
    for kernel in ("adaedge_channel_fill", "adaedge_temporal_fill", "adaedge_calibrated_conv"):
        assert f".entry {kernel}" in ptx


TRT_INCLUDE = os.environ.get("TENSORRT_INCLUDE_DIR") or next(
    (d for d in ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu", "/usr/include")
     if Path(d, "NvInferRuntime.h").is_file()), None)


@pytest.mark.skipif(TRT_INCLUDE is None or shutil.which("nvcc") is None or
                    shutil.which("cmake") is None,
                    reason="needs TensorRT's headers (TENSORRT_INCLUDE_DIR), nvcc and cmake")
def test_plugin_library_builds_with_the_documented_command(tmp_path):
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(build),
                    f"-DTENSORRT_INCLUDE_DIR={TRT_INCLUDE}", "-DCMAKE_CUDA_ARCHITECTURES=87"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    lib = build / "libadaedge_plugins.so"
    symbols = subprocess.run(["nm", "-D", str(lib)], capture_output=True, text=True).stdout
    assert " T getCreators" in symbols and " T setLoggerFinder" in symbols


# ---------------------------------------------------------------------------------------------
# on a CUDA GPU

def _cupy():
    cp = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return cp


def test_kernels_on_the_gpu_match_their_bodies():
    cp = _cupy()
    module = cp.RawModule(code=(KERNELS / "adaedge_kernels.cu").read_text())
    dev = torch.device("cuda")
    # channel fill at a VA-RED² R(2+1)D-18 stage-2 size (batch 16, 64 channels, half computed)
    n, cc, t, h, wd, k = 16, 32, 8, 56, 56, 3
    y = torch.rand(n, cc, t, h, wd, device=dev)
    w, b = torch.randn(cc, k, k, device=dev), torch.randn(cc, device=dev)
    out = torch.empty(n, 2 * cc, t, h, wd, device=dev)
    fill = module.get_function("adaedge_channel_fill")
    total = out.numel()

    def kernel():
        fill(((total + 255) // 256,), (256,), (y.data_ptr(), w.data_ptr(), b.data_ptr(),
                                               out.data_ptr(), np.int32(n), np.int32(cc),
                                               np.int32(1), np.int32(t), np.int32(h),
                                               np.int32(wd), np.int32(k), np.int32(1)))

    def body():
        f = F.relu(F.conv3d(y, w.reshape(-1, 1, 1, k, k), b, padding=(0, 1, 1), groups=cc))
        return torch.cat([y, f], 1)

    kernel()
    torch.cuda.synchronize()
    assert close(out.cpu().numpy(), body().cpu().numpy()) <= RTOL
