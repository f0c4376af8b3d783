"""The TensorRT backend: one engine per piece, cached in the bundle, run with name-based I/O.

* **Engines.** ``build`` parses each piece (custom nodes mapped to the plugin library where one is
  loaded, to their standard-op bodies otherwise: :mod:`adaedge.runtime.onnx_prep`) and builds one engine with
  static shapes: batch 1, or with ``max_batch > 1`` an optimisation profile over batches
  1..max_batch, so that the runtime can group a batch by branch.
* **Precision.** ``fp32`` (TF32 off, so that engines match the reference), ``fp16`` (the builder
  flag where this TensorRT has it, otherwise a float16 copy of the graph built as a strongly typed
  network), ``int8`` for the bundle's int8 forms (``adaedge calibrate int8``: explicit Q/DQ,
  symmetric int8, built as INT8) or pieces that carry Q/DQ nodes (TensorRT 11 has no implicit
  calibration; pieces without Q/DQ, such as gates kept in float, are built in fp32).
* **Cache.** ``engines/tensorrt/index.json`` records each engine's key: the piece's ONNX hash,
  the TensorRT version, the GPU's name and compute capability, the precision, the batch profile,
  the plugin library's hash and adaedge's version. An engine whose key differs from this
  machine's, or whose file does not match its recorded hash, is rebuilt where TensorRT's builder
  is installed and refused with the reason otherwise; it is never run.
* **Execution.** Name-based I/O only (``set_input_shape``, ``set_tensor_address``,
  ``execute_async_v3``): TensorRT 8.6 (JetPack 6.0), 10.x and 11.x. Device memory and the stream
  come from :mod:`.cuda`; values stay on the device from piece to piece.

TensorRT cannot be installed on adaedge's CI, so this module is checked statically against
``tensorrt-stubs`` there, and its tests run where TensorRT and a GPU are present.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ....bundle import PLUGIN_OPS, Bundle, sha256_file
from ....errors import BackendUnavailable, BundleError, UsageError
from ....progress import Progress
from ...onnx_prep import custom_ops, has_qdq, map_custom_ops, to_float16
from ..base import Backend, BackendOption
from .cache import CACHE, EngineCache, engine_key, key_difference, key_digest
from .cuda import CudaArrays, DeviceArray, Driver, open_driver

if TYPE_CHECKING:
    import tensorrt as trt
else:
    trt = None      # imported by load_tensorrt(), when a backend is created


def load_tensorrt() -> Any:
    """TensorRT's Python module (the full one, else the lean runtime), or None where neither is
    installed; imported once, on first use, so that this module imports everywhere."""
    global trt
    if trt is None:
        try:
            import tensorrt as module
        except ImportError:   # the lean runtime runs engines but cannot build them
            try:
                import tensorrt_lean as module  # type: ignore[no-redef]
            except ImportError:
                return None
        if not hasattr(module, "Runtime"):
            return None       # a stubs-only install: a namespace, not TensorRT
        trt = module
    return trt

PRECISIONS = ("fp32", "fp16", "int8")
MISSING = ("the tensorrt backend needs TensorRT's Python package: on a desktop 'pip install "
           "tensorrt' (with an NVIDIA driver); on Jetson it comes with JetPack "
           "(python3-libnvinfer). It also needs cuda-python, Polygraphy or PyCUDA for device "
           "memory")


def version_tuple(version: str) -> Tuple[int, ...]:
    parts = []
    for p in version.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def dims(d: "trt.Dims") -> Tuple[int, ...]:
    """TensorRT dimensions as a tuple (Dims has __len__ and __getitem__ in every version)."""
    return tuple(int(d[i]) for i in range(len(d)))


class TensorRTExecutable:
    """One engine and its execution context; runs in chunks of at most ``max_batch`` rows."""

    def __init__(self, backend: "TensorRTBackend", engine: "trt.ICudaEngine", piece: str,
                 input_names: List[str], output_names: List[str], max_batch: int) -> None:
        self.backend = backend
        self.engine = engine
        self.piece = piece
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BundleError(f"TensorRT could not create an execution context for {piece!r}")
        self.input_names = input_names
        self.output_names = output_names
        self.max_batch = max_batch
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        missing = [n for n in input_names + output_names if n not in names]
        if missing:
            raise BundleError(f"engine of {piece!r} lacks I/O tensors {missing}")
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.batched = {n: engine.get_tensor_shape(n)[0] == -1 for n in input_names}

    def _run_once(self, feeds: Mapping[str, DeviceArray]) -> Dict[str, DeviceArray]:
        ctx, arrays = self.context, self.backend.arrays
        keep: List[DeviceArray] = []
        for name in self.input_names:
            v = feeds[name]
            if v.dtype != self.dtypes[name]:     # e.g. int64 values into TensorRT 8.6's int32
                v = arrays.from_host(arrays.to_host(v).astype(self.dtypes[name]))
            keep.append(v)
            if self.batched[name] and not ctx.set_input_shape(name, v.shape):
                raise BundleError(f"{self.piece!r}: input {name!r} of shape {v.shape} is outside "
                                  f"the engine's profile (batch 1..{self.max_batch})")
            ctx.set_tensor_address(name, v.ptr)
        outs: Dict[str, DeviceArray] = {}
        for name in self.output_names:
            shape = dims(ctx.get_tensor_shape(name))
            outs[name] = arrays.empty(shape, self.dtypes[name])
            ctx.set_tensor_address(name, outs[name].ptr)
        if not ctx.execute_async_v3(self.backend.driver.stream):
            raise BundleError(f"TensorRT failed to run the engine of {self.piece!r}")
        del keep          # inputs are freed stream-ordered, after the engine read them
        return outs

    def run(self, feeds: Mapping[str, Any]) -> Dict[str, Any]:
        arrays = self.backend.arrays
        dev = {k: (arrays.from_host(v) if isinstance(v, np.ndarray) else v)
               for k, v in feeds.items()}
        rows = max((dev[n].shape[0] for n in self.input_names if self.batched[n]), default=1)
        if rows <= self.max_batch:
            return self._run_once(dev)
        parts = []
        for start in range(0, rows, self.max_batch):
            index = np.arange(start, min(rows, start + self.max_batch))
            parts.append(self._run_once({k: (arrays.rows(v, index) if self.batched.get(k) else v)
                                         for k, v in dev.items()}))
        return {k: arrays.concat([p[k] for p in parts]) for k in parts[0]}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


class TensorRTBackend(Backend):
    """TensorRT engines per piece (see the module docstring).

    ``precision``: fp32, fp16 or int8; ``max_batch``: 1 (static shapes, default) or the largest
    batch of a profile; ``plugins``: path of ``libadaedge_plugins.so`` (the plugins take the place
    of the custom nodes they implement); ``cuda``: the CUDA wrapper (cuda-python, polygraphy,
    pycuda; default: the first installed); ``workspace_mib``: the builder's workspace limit.
    """

    arrays: CudaArrays
    name: ClassVar[str] = "tensorrt"
    summary: ClassVar[str] = ("TensorRT on NVIDIA GPUs and Jetson (needs TensorRT, and cuda-python, "
                              "Polygraphy or PyCUDA)")
    options: ClassVar[Tuple[BackendOption, ...]] = (
        BackendOption("precision", "engine precision (default fp32; int8 builds the bundle's "
                                   "int8 forms from 'adaedge calibrate int8', or pieces that "
                                   "carry Q/DQ nodes, the others in fp32)",
                      choices=PRECISIONS),
        BackendOption("max_batch", "largest batch the engines take (default 1: static shapes; "
                                   "more builds a batch profile, so that batches dispatch by "
                                   "branch)", _positive),
        BackendOption("plugins", "the adaedge plugin library (libadaedge_plugins.so) to map "
                                 "CheapFill and CalibratedConv nodes to"),
        BackendOption("cuda", "the CUDA wrapper for device memory (default: the first installed)",
                      choices=("cuda-python", "polygraphy", "pycuda")),
        BackendOption("version_compatible", "build version-compatible engines (TensorRT 8.6+), "
                      "which the lean runtime (tensorrt_lean) and later TensorRT versions run; "
                      "they embed host code, so load only engines you built", switch=True),
    )

    def __init__(self, precision: str = "fp32", max_batch: int = 1,
                 plugins: Optional[str] = None, cuda: Optional[str] = None,
                 version_compatible: bool = False, workspace_mib: int = 1024,
                 driver: Optional[Driver] = None) -> None:
        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if max_batch < 1:
            raise UsageError("max_batch must be at least 1")
        if load_tensorrt() is None:
            raise BackendUnavailable(MISSING)
        self.version = str(trt.__version__)
        if version_tuple(self.version) < (8, 6):
            raise BackendUnavailable(f"TensorRT {self.version} is too old: adaedge needs 8.6 or "
                                     "newer (name-based I/O)")
        self.precision = precision
        self.max_batch = max_batch
        self.workspace = workspace_mib << 20
        # the lean runtime (tensorrt_lean) has no builder and runs only version-compatible engines
        self.lean = not self._can_build()
        self.version_compatible = bool(version_compatible) or self.lean
        if self.version_compatible and not hasattr(trt.BuilderFlag, "VERSION_COMPATIBLE") \
                and not self.lean:
            raise BackendUnavailable(f"TensorRT {self.version} cannot build version-compatible "
                                     "engines (TensorRT 8.6 and newer can)")
        self.driver = driver if driver is not None else open_driver(cuda)
        self.arrays = CudaArrays(self.driver)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if self.version_compatible:
            # a version-compatible plan carries the lean runtime as host code, which TensorRT
            # runs only when allowed (as trtexec does for such plans)
            self.runtime.engine_host_code_allowed = True
        self.plugins_sha256: Optional[str] = None
        self.plugin_ops: List[str] = []
        self.notes: List[str] = []
        if plugins is not None:
            if version_tuple(self.version) < (10,):
                # IPluginV3 is TensorRT 10+: on 8.6 (JetPack 6.0) custom nodes run their bodies
                note = (f"TensorRT {self.version} has no IPluginV3 (10.0+): adaedge's plugins "
                        "cannot load, so custom nodes run their standard-op bodies")
                warnings.warn(note, stacklevel=2)
                self.notes.append(note)
            else:
                self.plugin_ops, self.plugins_sha256 = load_plugin_library(
                    trt.get_plugin_registry(), plugins)
        self.device = self.driver.device()

    # -- info ---------------------------------------------------------------------------------
    def device_info(self) -> Dict[str, Any]:
        return {"name": self.device["name"], "compute_capability": self.device["compute_capability"],
                "tensorrt": self.version, "precision": self.precision, "cuda": self.driver.name,
                "plugins": self.plugin_ops, "version_compatible": self.version_compatible,
                "notes": self.notes}

    def synchronize(self) -> None:
        self.driver.synchronize()

    def close(self) -> None:
        self.driver.synchronize()
        self.driver.close()

    def bundle_for(self, bundle: Bundle) -> Bundle:
        """int8: the bundle's int8 forms (explicit Q/DQ) where it has them; a bundle without
        them builds its own pieces (those that carry Q/DQ as INT8, the others in fp32)."""
        forms = bundle.base.manifest.int8
        if self.precision == "int8" and forms is not None:
            if forms.calibration.get("target") != "tensorrt":
                raise BundleError(
                    f"the int8 forms of {bundle.root} were written for "
                    f"{forms.calibration.get('target') or 'another backend'} (activations "
                    f"{forms.calibration.get('activations', '?')}); TensorRT's explicit INT8 "
                    "takes symmetric int8 activations: write them with 'adaedge calibrate int8 "
                    f"{bundle.root} --for tensorrt --data ...'")
            return bundle.with_precision("int8")
        return bundle.with_precision("fp32")

    def key(self, bundle: Bundle, piece: str) -> Dict[str, Any]:
        return engine_key(bundle.manifest.pieces[piece].sha256, self.version, self.device,
                          self.precision, self.max_batch, self.plugins_sha256,
                          self.version_compatible)

    # -- building -----------------------------------------------------------------------------
    @staticmethod
    def _can_build() -> bool:
        return hasattr(trt, "Builder") and hasattr(trt, "OnnxParser")

    def _network_onnx(self, bundle: Bundle, piece: str) -> Tuple[bytes, str]:
        """The ONNX the builder parses, and the precision the piece gets."""
        model = map_custom_ops(bundle.piece_model(piece), self.plugin_ops)
        precision = self.precision
        if precision == "int8" and not has_qdq(model):
            precision = "fp32"         # no Q/DQ: nothing says how to quantise this piece
        if precision == "fp16" and not self._has_flag("FP16"):
            # plugins run float32: their nodes keep float32 I/O inside the float16 graph
            model = to_float16(model, keep_float32=self.plugin_ops)
        return model.SerializeToString(), precision

    def _has_flag(self, name: str) -> bool:
        # TensorRT 11 dropped the weak-typing precision flags: precision comes from the types
        return version_tuple(self.version) < (11,) and hasattr(trt.BuilderFlag, name)

    def build_engine(self, bundle: Bundle, piece: str) -> bytes:
        if not self._can_build():
            raise BackendUnavailable(
                f"this TensorRT ({self.version}) has no builder (the lean or dispatch runtime "
                "only runs engines); build the engines where the full TensorRT is installed "
                "with 'adaedge build --backend tensorrt', for the same GPU and TensorRT version")
        onnx_bytes, precision = self._network_onnx(bundle, piece)
        strongly_typed = (precision == "fp16" and not self._has_flag("FP16")) or \
            (precision == "int8" and not self._has_flag("INT8"))
        flags = 0
        if version_tuple(self.version) < (10,):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        if strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        builder = trt.Builder(self.logger)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BundleError(f"TensorRT's ONNX parser rejects piece {piece!r}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        if self.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if not strongly_typed:
            if precision == "fp16":
                config.set_flag(trt.BuilderFlag.FP16)
            elif precision == "int8":
                config.set_flag(trt.BuilderFlag.INT8)
        profile = builder.create_optimization_profile()
        dynamic = False
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = list(dims(tensor.shape))
            if shape and shape[0] == -1:
                dynamic = True
                rest = shape[1:]
                if any(d < 0 for d in rest):
                    raise BundleError(f"piece {piece!r}: input {tensor.name!r} has dynamic "
                                      f"dimensions besides the batch ({shape})")
                lo = trt.Dims([1] + rest)
                hi = trt.Dims([self.max_batch] + rest)
                profile.set_shape(tensor.name, lo, hi, hi)
        if dynamic:
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BundleError(f"TensorRT could not build an engine for piece {piece!r} (see its "
                              "log above)")
        return bytes(memoryview(serialized))

    def build(self, bundle: Bundle, progress: Progress = None) -> Path:
        cache = EngineCache(bundle)
        names = list(bundle.manifest.pieces)
        for i, name in enumerate(names):
            if progress:
                progress(i, len(names), name)
            key = self.key(bundle, name)
            if cache.lookup(name, key)[0] is None:
                cache.store(name, key, self.build_engine(bundle, name))
        if progress:
            progress(len(names), len(names), "done")
        return cache.folder

    # -- loading ------------------------------------------------------------------------------
    def load(self, bundle: Bundle, piece: str) -> TensorRTExecutable:
        cache = EngineCache(bundle)
        key = self.key(bundle, piece)
        data, why = cache.lookup(piece, key)
        if data is None:
            if self.lean:
                raise BundleError(f"piece {piece!r} has no usable TensorRT engine: {why}. The lean "
                                  "runtime (tensorrt_lean) cannot build engines and runs only "
                                  "version-compatible ones: build them where the full TensorRT "
                                  f"{self.version} is installed with 'adaedge build --backend "
                                  "tensorrt --version-compatible'")
            data = self.build_engine(bundle, piece)
            cache.store(piece, key, data)
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(f"TensorRT {self.version} cannot deserialize the engine of "
                              f"{piece!r} in {cache.folder}; delete it and run 'adaedge build "
                              "--backend tensorrt'")
        spec = bundle.manifest.pieces[piece]
        return TensorRTExecutable(self, engine, piece, [t.name for t in spec.inputs],
                                  [t.name for t in spec.outputs], self.max_batch)


# ---------------------------------------------------------------------------------------------
# the plugin library, once per process

_PLUGIN_LIBRARIES: Dict[str, Tuple[Any, str]] = {}   # resolved path -> (handle or None, sha256)
_PLUGIN_LOCK = threading.Lock()


def registered_plugins(registry: Any) -> List[str]:
    """adaedge's plugin ops whose creators the registry holds (IPluginV3 creators are found with
    ``get_creator``, TensorRT 10+; the older lookups see only V1 creators)."""
    get = getattr(registry, "get_creator", None)
    if get is None:
        return []
    return [op for op in PLUGIN_OPS if get(op, "1", "") is not None]


def load_plugin_library(registry: Any, path: str) -> Tuple[List[str], str]:
    """Load adaedge's plugin library into TensorRT's registry once per process; returns the ops
    it provides and the SHA-256 of the library file.

    TensorRT's ``load_library`` fails (returns None) when the plugins are already registered, so a
    second backend in the same process reuses the first load. Two different libraries cannot
    both provide the ops: the second is refused, as is a library that changed since it was loaded.
    """
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise BackendUnavailable(f"plugin library {path} does not exist; build it with "
                                 "'cmake -S adaedge/plugins -B build/plugins && cmake --build "
                                 "build/plugins'")
    sha = sha256_file(real)
    with _PLUGIN_LOCK:
        loaded = _PLUGIN_LIBRARIES.get(real)
        if loaded is not None and loaded[1] != sha:
            raise BackendUnavailable(f"plugin library {real} changed since this process loaded "
                                     "it; restart the process to load the new one")
        if loaded is None:
            if any(other != sha for _, other in _PLUGIN_LIBRARIES.values()):
                raise BackendUnavailable(f"another adaedge plugin library is already loaded in "
                                         f"this process; TensorRT cannot hold two ({real})")
            if registered_plugins(registry):     # loaded by other means (trtexec-style preload)
                handle = None
            else:
                handle = registry.load_library(real)
                if handle is None:
                    raise BackendUnavailable(f"TensorRT could not load the plugin library {real} "
                                             "(see TensorRT's log above)")
            _PLUGIN_LIBRARIES[real] = (handle, sha)
        ops = registered_plugins(registry)
    if not ops:
        raise BackendUnavailable(f"plugin library {real} registered none of adaedge's plugins "
                                 f"({', '.join(PLUGIN_OPS)})")
    return ops, sha


def custom_nodes(bundle: Bundle) -> Dict[str, Sequence[str]]:
    """The custom ops of each piece (what a plugin library can take over)."""
    return {name: sorted(custom_ops(bundle.piece_model(name))) for name in bundle.manifest.pieces}


__all__ = ["TensorRTBackend", "TensorRTExecutable", "EngineCache", "CACHE", "engine_key",
           "load_plugin_library", "registered_plugins",
           "key_digest", "key_difference", "load_tensorrt", "custom_nodes", "PRECISIONS", "MISSING"]
