"""Device memory and a stream, through one thin wrapper over a maintained CUDA library.

The TensorRT backend needs four things from CUDA: allocate and free device memory, copy (host to
device, device to host, device to device) on a stream, and wait for the stream. :class:`Driver`
names them; three implementations wrap the libraries users have:

* ``cuda-python`` (NVIDIA's bindings, ``pip install cuda-python``), preferred: stream-ordered
  allocation (``cudaMallocAsync``) where the device has memory pools, so freeing a value never
  waits for the GPU (``cudaMalloc`` where it has none);
* Polygraphy's CUDA helpers (``pip install polygraphy``; ships with TensorRT's Python tools);
* PyCUDA, where a user already has it (JetPack images often do).

:class:`DeviceArray` is a typed, batch-first block of device memory that frees itself;
:class:`CudaArrays` gives the interpreter its row operations on them with memory copies only (a row
of a batch-first array is one contiguous block), so intermediate values never leave the device.
:class:`HostDriver` implements the same interface on host memory: it runs the row arithmetic where
no GPU is present (the tests use it), and is never chosen automatically.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, cast

import numpy as np

from ....errors import BackendUnavailable, UsageError
from ...arrays import runs

H2D, D2H, D2D = 1, 2, 3      # cudaMemcpyKind values (the same in every CUDA version)


class Driver(Protocol):
    name: str
    stream: int                                   # the handle TensorRT's execute_async_v3 takes

    def malloc(self, nbytes: int) -> int: ...

    def free(self, ptr: int) -> None: ...

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None: ...

    def synchronize(self) -> None: ...

    def device(self) -> Dict[str, Any]:
        """{"name", "compute_capability"} of the current device."""
        ...

    def close(self) -> None:
        """Release the stream (the driver is not used afterwards)."""
        ...


class CudaError(RuntimeError):
    pass


def self_test(driver: Driver) -> None:
    """A round trip through the driver (allocate, copy in, copy across, copy out, free), so that a
    wrapper that cannot work here fails when it is opened, not at the first piece."""
    src = np.arange(16, dtype=np.uint8)
    back = np.zeros(16, dtype=np.uint8)
    a, b = driver.malloc(16), driver.malloc(16)
    try:
        driver.copy(a, src.ctypes.data, 16, H2D)
        driver.copy(b, a, 16, D2D)
        driver.copy(back.ctypes.data, b, 16, D2H)
        driver.synchronize()
    finally:
        driver.free(a)
        driver.free(b)
    if not np.array_equal(src, back):
        raise CudaError(f"the {driver.name} driver's copies do not round-trip")


# ---------------------------------------------------------------------------------------------
# cuda-python

class CudaPythonDriver:
    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart         # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart  # type: ignore[no-redef]   # cuda-python 12.0-12.5
            except ImportError as e:
                raise BackendUnavailable(f"cuda-python is not installed ({e})") from None
        self.rt = cudart
        self.stream = int(self._check(cudart.cudaStreamCreate(), "cudaStreamCreate"))
        # stream-ordered allocation needs memory pools (cudaMallocAsync returns
        # cudaErrorNotSupported on devices and drivers without them)
        dev = self._check(cudart.cudaGetDevice(), "cudaGetDevice")
        attr = getattr(getattr(cudart, "cudaDeviceAttr", None), "cudaDevAttrMemoryPoolsSupported",
                       None)
        self.stream_ordered = attr is not None and bool(self._check(
            cudart.cudaDeviceGetAttribute(attr, dev), "cudaDeviceGetAttribute"))

    def _check(self, result: Any, what: str) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise CudaError(f"{what} failed: {err}")
        if isinstance(result, tuple):
            return result[1] if len(result) == 2 else result[1:]
        return None

    def malloc(self, nbytes: int) -> int:
        if self.stream_ordered:
            return int(self._check(self.rt.cudaMallocAsync(max(nbytes, 1), self.stream),
                                   "cudaMallocAsync"))
        return int(self._check(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, ptr: int) -> None:
        if self.stream_ordered:
            self.rt.cudaFreeAsync(ptr, self.stream)
        else:       # not stream-ordered: wait until the stream no longer reads the block
            self.rt.cudaStreamSynchronize(self.stream)
            self.rt.cudaFree(ptr)

    def close(self) -> None:
        self.rt.cudaStreamDestroy(self.stream)

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        self._check(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind(kind),
                                            self.stream), "cudaMemcpyAsync")

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def device(self) -> Dict[str, Any]:
        dev = self._check(self.rt.cudaGetDevice(), "cudaGetDevice")
        props = self._check(self.rt.cudaGetDeviceProperties(dev), "cudaGetDeviceProperties")
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return {"name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}


# ---------------------------------------------------------------------------------------------
# Polygraphy

def _driver_api_device() -> Dict[str, Any]:
    """Name and compute capability through the CUDA driver library (stable C ABI)."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        raise BackendUnavailable("the CUDA driver library (libcuda) is not present")
    if cuda.cuInit(0) != 0:
        raise BackendUnavailable("cuInit failed: no usable CUDA device")
    dev = ctypes.c_int()
    cuda.cuCtxGetDevice(ctypes.byref(dev))
    buf = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(buf, 256, dev)
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)   # COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)   # COMPUTE_CAPABILITY_MINOR
    return {"name": buf.value.decode(), "compute_capability": f"{major.value}.{minor.value}"}


_POLYGRAPHY_KINDS = {H2D: "HostToDevice", D2H: "DeviceToHost", D2D: "DeviceToDevice"}


class PolygraphyDriver:
    name = "polygraphy"

    def __init__(self) -> None:
        try:
            from polygraphy import cuda as pcuda
        except ImportError as e:
            raise BackendUnavailable(f"Polygraphy is not installed ({e})") from None
        self.cuda = pcuda
        self.wrapper = pcuda.wrapper()
        self._stream = pcuda.Stream()
        self.stream = int(self._stream.ptr)

    def malloc(self, nbytes: int) -> int:
        return int(self.wrapper.malloc(max(nbytes, 1)))

    def free(self, ptr: int) -> None:
        self.wrapper.free(ptr)

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        # Polygraphy's MemcpyKind is a class of ctypes.c_int constants (not an enum): pick the
        # constant by name; memcpy hands it to cudaMemcpyAsync as it is
        self.wrapper.memcpy(dst, src, nbytes, getattr(self.cuda.MemcpyKind, _POLYGRAPHY_KINDS[kind]),
                            self.stream)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def device(self) -> Dict[str, Any]:
        return _driver_api_device()

    def close(self) -> None:
        self._stream.free()        # Polygraphy never destroys a stream by itself


# ---------------------------------------------------------------------------------------------
# PyCUDA

class PyCudaDriver:
    name = "pycuda"

    def __init__(self) -> None:
        try:
            import pycuda.autoinit  # noqa: F401  (creates the context)
            import pycuda.driver as drv
        except ImportError as e:
            raise BackendUnavailable(f"PyCUDA is not installed ({e})") from None
        self.drv = drv
        self._stream = drv.Stream()
        self.stream = int(self._stream.handle)
        self._blocks: Dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        block = self.drv.mem_alloc(max(nbytes, 1))
        self._blocks[int(block)] = block
        return int(block)

    def free(self, ptr: int) -> None:
        block = self._blocks.pop(ptr, None)
        if block is not None:
            block.free()

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        if kind == H2D:
            self.drv.memcpy_htod_async(dst, (ctypes.c_char * nbytes).from_address(src),
                                       self._stream)
        elif kind == D2H:
            self.drv.memcpy_dtoh_async((ctypes.c_char * nbytes).from_address(dst), src,
                                       self._stream)
        else:
            self.drv.memcpy_dtod_async(dst, src, nbytes, self._stream)

    def synchronize(self) -> None:
        self._stream.synchronize()

    def device(self) -> Dict[str, Any]:
        dev = self.drv.Context.get_device()
        major, minor = dev.compute_capability()
        return {"name": dev.name(), "compute_capability": f"{major}.{minor}"}

    def close(self) -> None:
        self._stream = None


# ---------------------------------------------------------------------------------------------
# host memory (tests, and the row arithmetic without a GPU)

class HostDriver:
    """The Driver interface on host memory: copies are ``memmove``; nothing is asynchronous."""

    name = "host"
    stream = 0

    def __init__(self) -> None:
        self._blocks: Dict[int, Any] = {}

    def malloc(self, nbytes: int) -> int:
        block = ctypes.create_string_buffer(max(nbytes, 1))
        ptr = ctypes.addressof(block)
        self._blocks[ptr] = block
        return ptr

    def free(self, ptr: int) -> None:
        self._blocks.pop(ptr, None)

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        ctypes.memmove(dst, src, nbytes)

    def synchronize(self) -> None:
        pass

    def device(self) -> Dict[str, Any]:
        return {"name": "host memory", "compute_capability": "0.0"}

    def close(self) -> None:
        pass

    @property
    def live_blocks(self) -> int:
        return len(self._blocks)


_DRIVERS = {"cuda-python": CudaPythonDriver, "polygraphy": PolygraphyDriver,
            "pycuda": PyCudaDriver}


def open_driver(name: Optional[str] = None,
                drivers: Optional[Dict[str, Any]] = None) -> Driver:
    """The named CUDA wrapper, or the first one installed that passes a round trip
    (:func:`self_test`): cuda-python, Polygraphy, PyCUDA. A wrapper that is installed but fails
    (a broken install, an API it does not have) is skipped, and its reason kept for the message
    if none works."""
    drivers = _DRIVERS if drivers is None else drivers
    if name is not None:
        if name not in drivers:
            raise UsageError(f"unknown CUDA wrapper {name!r}; choose from {', '.join(drivers)}")
        order = [name]
    else:
        order = list(drivers)
    problems: List[str] = []
    for key in order:
        try:
            driver = cast(Driver, drivers[key]())
        except BackendUnavailable as e:
            problems.append(str(e))
            continue
        except Exception as e:   # installed, but unusable here
            problems.append(f"{key} failed to start: {type(e).__name__}: {e}")
            continue
        try:
            self_test(driver)
        except Exception as e:
            problems.append(f"{key} failed its first copies: {type(e).__name__}: {e}")
            try:
                driver.close()
            except Exception:
                pass
            continue
        return driver
    if name is not None:
        raise BackendUnavailable(f"the CUDA wrapper {name} cannot be used: {problems[0]}")
    raise BackendUnavailable("the tensorrt backend needs one CUDA wrapper: "
                             "'pip install cuda-python' (or Polygraphy, or PyCUDA); "
                             + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# arrays

class DeviceArray:
    """A C-contiguous, batch-first array in device memory, freed when it is dropped."""

    __slots__ = ("driver", "ptr", "shape", "dtype", "nbytes", "_free", "__weakref__")

    def __init__(self, driver: Driver, shape: Sequence[int], dtype: Any) -> None:
        self.driver = driver
        self.shape: Tuple[int, ...] = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = driver.malloc(self.nbytes)
        self._free = weakref.finalize(self, driver.free, self.ptr)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0

    def __repr__(self) -> str:
        return f"DeviceArray({self.shape}, {self.dtype}, {self.driver.name})"


class CudaArrays:
    """The interpreter's row operations on :class:`DeviceArray` values, by memory copies."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def empty(self, shape: Sequence[int], dtype: Any) -> DeviceArray:
        return DeviceArray(self.driver, shape, dtype)

    def from_host(self, a: np.ndarray) -> DeviceArray:
        a = np.ascontiguousarray(a)
        out = DeviceArray(self.driver, a.shape, a.dtype)
        if out.nbytes:
            self.driver.copy(out.ptr, a.ctypes.data, out.nbytes, H2D)
            # An asynchronous copy from pageable host memory has no documented guarantee that
            # the source may be reused when the call returns (CUDA runtime API, "API
            # synchronization behavior"): wait, so that ``a`` may be freed or changed right away.
            # The runtime uploads once per call (the clips); values between pieces never leave
            # the device.
            self.driver.synchronize()
        return out

    def to_host(self, v: Any) -> np.ndarray:
        if isinstance(v, np.ndarray):
            return v
        out = np.empty(v.shape, dtype=v.dtype)
        if v.nbytes:
            self.driver.copy(out.ctypes.data, v.ptr, v.nbytes, D2H)
            self.driver.synchronize()
        return out

    def _copy_rows(self, dst: DeviceArray, src: DeviceArray, pairs: List[Tuple[int, int, int]],
                   src_is_index: bool) -> None:
        rb = src.row_bytes
        for pos, row, k in pairs:
            d, s = (pos, row) if src_is_index else (row, pos)
            self.driver.copy(dst.ptr + d * rb, src.ptr + s * rb, k * rb, D2D)

    def rows(self, v: DeviceArray, index: np.ndarray) -> DeviceArray:
        index = np.asarray(index, dtype=np.int64)
        out = DeviceArray(self.driver, (len(index),) + v.shape[1:], v.dtype)
        self._copy_rows(out, v, runs(index), src_is_index=True)
        return out

    def scatter(self, parts: Sequence[Tuple[np.ndarray, Any]], n: int) -> DeviceArray:
        first = parts[0][1]
        out = DeviceArray(self.driver, (n,) + first.shape[1:], first.dtype)
        for index, part in parts:
            self._copy_rows(out, part, runs(np.asarray(index)), src_is_index=False)
        return out

    def concat(self, parts: Sequence[DeviceArray]) -> DeviceArray:
        n = sum(p.shape[0] for p in parts)
        out = DeviceArray(self.driver, (n,) + parts[0].shape[1:], parts[0].dtype)
        at = 0
        for p in parts:
            if p.nbytes:
                self.driver.copy(out.ptr + at, p.ptr, p.nbytes, D2D)
            at += p.nbytes
        return out

    def put_rows(self, dst: DeviceArray, index: np.ndarray, v: DeviceArray) -> DeviceArray:
        out = DeviceArray(self.driver, dst.shape, dst.dtype)
        if dst.nbytes:
            self.driver.copy(out.ptr, dst.ptr, dst.nbytes, D2D)
        self._copy_rows(out, v, runs(np.asarray(index)), src_is_index=False)
        return out

    def shape(self, v: DeviceArray) -> Tuple[int, ...]:
        return v.shape
