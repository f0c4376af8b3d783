"""ONNX Runtime: the embedded default, on the CPU (or CUDA with onnxruntime-gpu).

``build`` runs ONNX Runtime's graph optimisations once per piece and saves the optimised graphs
under ``engines/<key>/``, the key naming the onnxruntime version, device and processor; ``load``
uses them when their key and source hashes match, and the bundle's own graphs otherwise.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ...bundle import Bundle, parse_onnx, safe_join, sha256_file, write_atomic
from ...bundle.folder import check_io
from ...bundle.int8 import wrong_here
from ...bundle.operators import check_operators
from ...bundle.paths import child, current_umask, free_bytes
from ...errors import BackendUnavailable, BundleError, ProcessorError, UsageError
from ...progress import Progress
from .base import Backend, BackendOption


class OrtExecutable:
    def __init__(self, session: Any, output_names: List[str], label: str = "") -> None:
        self.session = session
        self.output_names = output_names
        self.label = label

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, dict(feeds))
        return dict(zip(self.output_names, outs))


_SHARED_POOL: List[int] = []   # threads of the process-wide ONNX Runtime pool, once created
_SHARED_ARENA: List[bool] = []   # the process-wide CPU arena, once registered


def _shared_arena(ort: Any) -> bool:
    """Register one CPU arena for the process (once), which sessions opt into; False where
    this onnxruntime cannot."""
    if not _SHARED_ARENA:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                     ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        except Exception:
            _SHARED_ARENA.append(False)
            return False
        _SHARED_ARENA.append(True)
    return _SHARED_ARENA[0]


def _shared_pool(ort: Any, threads: int) -> bool:
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


MAX_INDEX_BYTES = 16 << 20   # an index names each piece once: far smaller
MAX_THREADS = 1024     # far above any CPU here; a huge count made ONNX Runtime crash


def _positive(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_THREADS}, not "
                                         f"{text!r}")
    return value


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU (default) or CUDA (``device="cuda"``, needs onnxruntime-gpu).

    ``pool="shared"`` runs all sessions on one process-wide thread pool, much faster for bundles
    of many small pieces (AdaFuse's gathered form), but every ONNX Runtime session created later
    in the process must then set ``use_per_session_threads = False``.
    """

    name: ClassVar[str] = "onnxruntime"
    summary: ClassVar[str] = "ONNX Runtime (CPU, the default; CUDA with onnxruntime-gpu)"
    runs_graphs: ClassVar[bool] = True
    options: ClassVar[Tuple[BackendOption, ...]] = (
        BackendOption("threads", "CPU threads per piece (default: all cores)", _positive),
        BackendOption("pool", "a thread pool per piece (default) or one for all pieces (much "
                              "faster for bundles of many small pieces, like AdaFuse gathered)",
                      choices=("session", "shared")),
        BackendOption("device", "cpu (default) or cuda (needs onnxruntime-gpu)",
                      choices=("cpu", "cuda")),
        BackendOption("precision", "fp32 (default) or int8: the bundle's Q/DQ forms, which "
                                   "'adaedge calibrate int8' writes", choices=("fp32", "int8")),
    )

    def __init__(self, device: str = "cpu", threads: Optional[int] = None,
                 use_cache: bool = True, pool: str = "session",
                 profile: Optional[str] = None, precision: str = "fp32") -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailable(
                f"the onnxruntime backend needs the onnxruntime package ({e}); install it with "
                "'pip install onnxruntime' (or onnxruntime-gpu for CUDA)") from None
        self.ort = ort
        if device not in ("cpu", "cuda"):
            raise UsageError(f"onnxruntime device must be 'cpu' or 'cuda', not {device!r}")
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise BackendUnavailable(
                "onnxruntime's CUDA execution provider is not installed here (this onnxruntime "
                f"has {', '.join(available)}); install onnxruntime-gpu on a machine with a CUDA GPU")
        if precision not in ("fp32", "int8"):
            raise UsageError(f"the onnxruntime backend runs precision fp32 or int8, not "
                             f"{precision!r} (fp16 engines: --backend tensorrt)")
        self.precision = precision
        self.device = device
        self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" \
            else ["CPUExecutionProvider"]
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or not 1 <= threads <= MAX_THREADS):
            raise UsageError(f"threads must be an integer from 1 to {MAX_THREADS}, not "
                             f"{threads!r}")
        self.threads = threads if threads is not None else (os.cpu_count() or 1)
        if self.threads < 1:
            raise UsageError("threads must be at least 1")
        if pool not in ("shared", "session"):
            raise UsageError(f"pool must be 'shared' or 'session', not {pool!r}")
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
        # profile: a folder for ONNX Runtime's per-session profiles (bench --breakdown)
        self.profile = Path(profile) if profile is not None else None
        self.executables: List[OrtExecutable] = []

    def device_info(self) -> Dict[str, Any]:
        from ..processor import processor_class
        return {"name": self.device, "threads": self.threads, "pool": self.pool,
                "precision": self.precision, "onnxruntime": self.ort.__version__,
                "processor": processor_class() if self.device == "cpu" else self.device}

    def bundle_for(self, bundle: Bundle) -> Bundle:
        """As :meth:`Backend.bundle_for`; on the CPU, int8 forms known to compute wrong on this
        processor (:func:`~adaedge.bundle.int8.wrong_here`) are refused in one line."""
        view = super().bundle_for(bundle)
        forms = view.base.manifest.int8
        if view.precision == "int8" and self.device == "cpu" and forms is not None:
            from ..processor import processor_class
            here = processor_class()
            why = wrong_here(forms, here)
            if why is not None:
                made = f", calibrated on {forms.made_on}" if forms.made_on else ""
                raise ProcessorError(
                    f"the int8 forms of {bundle.root} are wrong on this processor{made}: {why}; "
                    f"write forms right here with 'adaedge calibrate int8 {bundle.root} --data "
                    "...' (7-bit weights, right on every x86), or run --precision fp32")
        return view

    @property
    def cache_key(self) -> str:
        # the processor class too: the optimised graphs hold layouts chosen for this instruction
        # set (NCHWc blocks of 16 floats on AVX-512, 8 on AVX2)
        from ..processor import processor_class
        where = processor_class() if self.device == "cpu" else platform.machine()
        return f"onnxruntime-{self.ort.__version__}-{self.device}-{platform.machine()}-{where}"

    def _options(self, optimize: bool, save_to: Optional[Path] = None,
                 shared_arena: bool = True) -> Any:
        """Session options. Piece sessions share one memory arena (``shared_arena``): each
        session's own arena would keep its largest batch's tensors, so memory would grow with
        the pieces times the batch (measured: 10 GB after two batches of 8 clips of R(2+1)D-18,
        against 2 GB shared, at the same speed)."""
        ort = self.ort
        so = ort.SessionOptions()
        if self.pool == "shared":
            so.use_per_session_threads = False
        else:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if shared_arena and self.device == "cpu" and _shared_arena(ort):
            so.add_session_config_entry("session.use_env_allocators", "1")
        # Many small sessions run one after another: a spinning pool would steal the cores from
        # the next session's threads (measured: 4x slower on 2 cores).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if save_to is not None:
            so.optimized_model_filepath = str(save_to)
        elif self.profile is not None:
            self.profile.mkdir(parents=True, exist_ok=True)
            so.enable_profiling = True
            so.profile_file_prefix = str(self.profile / f"s{len(self.executables)}")
        return so

    def end_profiling(self) -> List[Tuple[str, Path]]:
        """(piece, profile file) of every session this backend made (with ``profile=``)."""
        return [(exe.label, Path(exe.session.end_profiling())) for exe in self.executables]

    def _index_path(self, bundle: Bundle) -> Path:
        return bundle.engine_dir(self.cache_key) / "index.json"

    def _read_index(self, bundle: Bundle) -> Dict[str, Dict[str, str]]:
        path = self._index_path(bundle)
        if not path.is_file():
            return {}
        path = safe_join(path.parent, path.name)      # a link out of the bundle is refused
        if not path.is_file():
            return {}
        unreadable = (f"engine cache index {path} is unreadable; delete the engines/ folder or "
                      "run 'adaedge build' again")
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise BundleError(f"{unreadable} (it is over {MAX_INDEX_BYTES} bytes)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            raise BundleError(unreadable) from None
        if not isinstance(data, dict) or data.get("key") != self.cache_key or \
                not isinstance(data.get("pieces"), dict):
            return {}
        pieces: Dict[str, Dict[str, str]] = data["pieces"]
        for name, entry in pieces.items():      # as build writes it: three strings per piece
            if not isinstance(entry, dict) or set(entry) != {"file", "source_sha256", "sha256"} \
                    or not all(isinstance(v, str) for v in entry.values()):
                raise BundleError(f"{unreadable} (its entry for {name!r} is not "
                                  '{"file", "source_sha256", "sha256"} strings)')
        return pieces

    def build(self, bundle: Bundle, progress: Progress = None) -> Path:
        folder = bundle.engine_dir(self.cache_key)
        folder.mkdir(parents=True, exist_ok=True)
        # build runs holding the bundle's lock: temporary files left by a killed build are stale
        for stale in folder.glob(".*.tmp*"):
            if stale.is_file() or stale.is_symlink():
                stale.unlink(missing_ok=True)
        index: Dict[str, Dict[str, str]] = {}
        names = list(bundle.manifest.pieces)
        for i, name in enumerate(names):
            if progress:
                progress(i, len(names), name)
            # the piece name is an identifier (checked with the manifest); ONNX Runtime writes to
            # a fresh file of our own (never to a path the bundle may ship as a link), renamed to
            # a name of its content: the files the current index names are never replaced, so a
            # build killed half way leaves the earlier engine set whole
            fd, tmp_name = tempfile.mkstemp(prefix=".piece.", suffix=".tmp.onnx", dir=folder)
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                data = self._checked(bundle, name)
                try:
                    self._session(data, name, True, tmp)
                except BundleError:
                    # ONNX Runtime says "Protobuf serialization failed" for a full disk
                    if 0 <= free_bytes(folder) < 2 * len(data) + (1 << 20):
                        raise OSError(errno.ENOSPC, "no space left on the device",
                                      str(folder)) from None
                    raise
                os.chmod(tmp, 0o666 & ~current_umask())     # not mkstemp's private 0600
                digest = sha256_file(tmp)
                target = child(folder, f"{name}.{digest[:16]}.onnx")
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
            index[name] = {"file": target.name, "source_sha256": bundle.manifest.pieces[name].sha256,
                           "sha256": digest}
        if progress:
            progress(len(names), len(names), "done")
        write_atomic(child(folder, "index.json"), json.dumps(
            {"key": self.cache_key, "threads": self.threads, "pieces": index}, indent=1))
        keep = {e["file"] for e in index.values()}
        for old in folder.glob("*.onnx"):            # engines of earlier builds
            if old.name not in keep and (old.is_file() or old.is_symlink()):
                old.unlink(missing_ok=True)
        return folder

    def _checked(self, bundle: Bundle, piece: str) -> bytes:
        """The piece's hash-checked bytes, refused unless self-contained (ONNX Runtime is handed
        these bytes, never a path it could resolve external data against)."""
        data = bundle.piece_bytes(piece)
        model = parse_onnx(data, f"piece {piece!r} cannot be loaded by onnxruntime: its file")
        check_io(model, bundle.manifest.pieces[piece], f"piece {piece!r}")
        return data

    def _session(self, data: bytes, piece: str, optimize: bool,
                 save_to: Optional[Path] = None, shared_arena: bool = True) -> Any:
        try:
            return self.ort.InferenceSession(data, self._options(optimize, save_to, shared_arena),
                                             providers=self.providers)
        except Exception as e:  # onnxruntime's own errors for malformed graphs
            raise BundleError(f"piece {piece!r} cannot be loaded by onnxruntime: {e}") from None

    def _cached(self, bundle: Bundle, piece: str) -> Optional[bytes]:
        """The optimised graph ``build`` saved for ``piece``, if its key and source match; its
        bytes hash-checked against the index and refused unless self-contained (the cache comes
        with the bundle, so it is as untrusted as the bundle)."""
        entry = self._read_index(bundle).get(piece)
        if not entry or entry.get("source_sha256") != bundle.manifest.pieces[piece].sha256:
            return None
        path = safe_join(bundle.engine_dir(self.cache_key), str(entry.get("file")))
        data = path.read_bytes() if path.is_file() else None
        if data is None or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise BundleError(f"engine for piece {piece!r} in {path.parent} is missing or "
                              "corrupt; run 'adaedge build' again")
        model = parse_onnx(data, f"engine for piece {piece!r} in {path.parent}")
        # an engine of another piece (its hash recorded with it) is named here, not by a backend
        check_io(model, bundle.manifest.pieces[piece], f"engine for piece {piece!r} in "
                 f"{path.parent}")
        check_operators(model, f"engine for piece {piece!r} in {path.parent}", optimized=True)
        return data

    def load_graph(self, model: Any, name: str) -> OrtExecutable:
        data = model if isinstance(model, bytes) else model.SerializeToString()
        session = self._session(data, name, True, shared_arena=False)  # one session: its own
        exe = OrtExecutable(session, [o.name for o in session.get_outputs()], name)
        self.executables.append(exe)
        return exe

    def load(self, bundle: Bundle, piece: str) -> OrtExecutable:
        spec = bundle.manifest.pieces[piece]
        cached = self._cached(bundle, piece) if self.use_cache else None
        if cached is not None:
            session = self._session(cached, piece, False)
        else:
            session = self._session(self._checked(bundle, piece), piece, True)
        exe = OrtExecutable(session, spec.output_names, piece)
        self.executables.append(exe)
        return exe


__all__ = ["OnnxRuntimeBackend", "OrtExecutable"]
