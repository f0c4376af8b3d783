"""Backends turn a bundle's pieces into executables. One small interface, one module per library.

A backend has a ``name``, ``build(bundle, progress)`` that prepares its engines into the bundle's
``engines/`` cache, and ``load(bundle, piece)`` that returns an :class:`Executable`.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol

import numpy as np

from ..bundle import Bundle, BundleError, safe_join, sha256_file

Progress = Optional[Callable[[int, int, str], None]]


class BackendUnavailable(RuntimeError):
    """The backend's library, or the device it needs, is not installed here."""


class Executable(Protocol):
    """One piece, ready to run: feeds and results are the backend's arrays, by I/O name."""

    def run(self, feeds: Mapping[str, Any]) -> Dict[str, Any]: ...


class Backend(Protocol):
    name: str

    def build(self, bundle: Bundle, progress: Progress = None) -> Path: ...

    def load(self, bundle: Bundle, piece: str) -> Executable: ...


# ---------------------------------------------------------------------------------------------
# ONNX Runtime

class OrtExecutable:
    def __init__(self, session: "object", output_names: List[str]) -> None:
        self.session = session
        self.output_names = output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, dict(feeds))  # type: ignore[attr-defined]
        return dict(zip(self.output_names, outs))


_SHARED_POOL: List[int] = []   # threads of the process-wide ONNX Runtime pool, once created


def _shared_pool(ort: "object", threads: int) -> bool:
    """Create ONNX Runtime's process-wide intra-op pool of ``threads`` threads (once: it cannot
    be resized or removed); False where this onnxruntime cannot."""
    if _SHARED_POOL:
        return True
    try:
        from onnxruntime.capi import _pybind_state
        _pybind_state.set_global_thread_pool_sizes(threads, 1)
    except Exception:  # an older onnxruntime, or a pool another library created
        return False
    _SHARED_POOL.append(threads)
    return True


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU (default) or CUDA (``device="cuda"``, needs onnxruntime-gpu).

    ``pool="shared"`` runs all sessions on one process-wide thread pool, much faster for bundles
    of many small pieces (AdaFuse's gathered form), but every ONNX Runtime session created later
    in the process must then set ``use_per_session_threads = False``.

    ``build`` runs ONNX Runtime's graph optimisations once per piece and saves the optimised graphs
    under ``engines/<key>/``, the key naming the onnxruntime version, device and processor; ``load``
    uses them when their key and source hashes match, and the bundle's own graphs otherwise.
    """

    name = "onnxruntime"

    def __init__(self, device: str = "cpu", threads: Optional[int] = None,
                 use_cache: bool = True, pool: str = "session") -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable(
                f"the onnxruntime backend needs the onnxruntime package ({e}); install it with "
                "'pip install onnxruntime' (or onnxruntime-gpu for CUDA)") from None
        self.ort = ort
        if device not in ("cpu", "cuda"):
            raise ValueError(f"onnxruntime device must be 'cpu' or 'cuda', not {device!r}")
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(
                "onnxruntime's CUDA execution provider is not installed here (this onnxruntime "
                f"has {', '.join(available)}); install onnxruntime-gpu on a machine with a CUDA GPU")
        self.device = device
        self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" \
            else ["CPUExecutionProvider"]
        self.threads = threads if threads is not None else (os.cpu_count() or 1)
        if self.threads < 1:
            raise ValueError("threads must be at least 1")
        if pool not in ("shared", "session"):
            raise ValueError(f"pool must be 'shared' or 'session', not {pool!r}")
        # pool="shared": one intra-op pool for all sessions of the process (measured: a sweep
        # over the 24 gathered pieces of an AdaFuse stage ran 15x faster than with a pool per
        # session on 2 cores, whose idle threads contend). ONNX Runtime then requires every
        # later session in the process to use it too, so it is opt-in; once it exists, every
        # backend uses it, with the thread count it was created with.
        if pool == "shared" or _SHARED_POOL:
            if _shared_pool(ort, self.threads):
                pool, self.threads = "shared", _SHARED_POOL[0]
            else:
                pool = "session"
        self.pool = pool
        self.use_cache = use_cache

    @property
    def cache_key(self) -> str:
        return f"onnxruntime-{self.ort.__version__}-{self.device}-{platform.machine()}"

    def _options(self, optimize: bool, save_to: Optional[Path] = None) -> "object":
        ort = self.ort
        so = ort.SessionOptions()
        if self.pool == "shared":
            so.use_per_session_threads = False
        else:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        # Many small sessions run one after another: a spinning pool would steal the cores from
        # the next session's threads (measured: 4x slower on 2 cores).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if save_to is not None:
            so.optimized_model_filepath = str(save_to)
        return so

    def _index_path(self, bundle: Bundle) -> Path:
        return bundle.engine_dir(self.cache_key) / "index.json"

    def _read_index(self, bundle: Bundle) -> Dict[str, Dict[str, str]]:
        path = self._index_path(bundle)
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise BundleError(f"engine cache index {path} is unreadable; delete the engines/ "
                              "folder or run 'adaedge build' again") from None
        if not isinstance(data, dict) or data.get("key") != self.cache_key or \
                not isinstance(data.get("pieces"), dict):
            return {}
        return data["pieces"]

    def build(self, bundle: Bundle, progress: Progress = None) -> Path:
        folder = bundle.engine_dir(self.cache_key)
        folder.mkdir(parents=True, exist_ok=True)
        index: Dict[str, Dict[str, str]] = {}
        names = list(bundle.manifest.pieces)
        for i, name in enumerate(names):
            if progress:
                progress(i, len(names), name)
            source = bundle.piece_path(name)
            target = folder / f"{name}.onnx"
            tmp = folder / f".{name}.tmp.onnx"
            self.ort.InferenceSession(str(source), self._options(True, tmp),
                                      providers=self.providers)
            os.replace(tmp, target)
            index[name] = {"file": target.name, "source_sha256": bundle.manifest.pieces[name].sha256,
                           "sha256": sha256_file(target)}
        if progress:
            progress(len(names), len(names), "done")
        path = self._index_path(bundle)
        path.write_text(json.dumps({"key": self.cache_key, "threads": self.threads,
                                    "pieces": index}, indent=1), encoding="utf-8")
        return folder

    def load(self, bundle: Bundle, piece: str) -> OrtExecutable:
        spec = bundle.manifest.pieces[piece]
        cached: Optional[Path] = None
        if self.use_cache:
            entry = self._read_index(bundle).get(piece)
            if entry and entry.get("source_sha256") == spec.sha256:
                path = safe_join(bundle.engine_dir(self.cache_key), str(entry.get("file")))
                if not path.is_file() or sha256_file(path) != entry.get("sha256"):
                    raise BundleError(f"engine for piece {piece!r} in {path.parent} is missing or "
                                      "corrupt; run 'adaedge build' again")
                cached = path
        if cached is not None:
            session = self.ort.InferenceSession(str(cached), self._options(False),
                                                providers=self.providers)
        else:
            try:
                session = self.ort.InferenceSession(str(bundle.piece_path(piece)),
                                                    self._options(True), providers=self.providers)
            except BundleError:
                raise
            except Exception as e:  # onnxruntime's own errors for malformed graphs
                raise BundleError(f"piece {piece!r} cannot be loaded by onnxruntime: {e}") from None
        return OrtExecutable(session, [t.name for t in spec.outputs])


def _torch_backend(device: str) -> Callable[..., Backend]:
    def create(**options: object) -> Backend:
        from .torch_backend import TorchBackend    # imports torch: only when asked for
        return TorchBackend(device=device, **options)  # type: ignore[arg-type]
    return create


def _tensorrt_backend(**options: object) -> Backend:
    from .tensorrt import TensorRTBackend
    return TensorRTBackend(**options)  # type: ignore[arg-type]


_BACKENDS: Dict[str, Callable[..., Backend]] = {
    "onnxruntime": OnnxRuntimeBackend,
    "torch-cuda": _torch_backend("cuda"),
    "torch-cpu": _torch_backend("cpu"),
    "tensorrt": _tensorrt_backend,
}


def available_backends() -> List[str]:
    return sorted(_BACKENDS)


def create_backend(name: str, **options: object) -> Backend:
    if name not in _BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; this adaedge has "
                                 f"{', '.join(available_backends())}")
    return _BACKENDS[name](**options)
