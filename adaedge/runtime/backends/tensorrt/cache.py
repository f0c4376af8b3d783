"""``engines/tensorrt/``: the engines and ``index.json``, {piece: {"file", "key", "sha256"}}.

Pure bookkeeping (no TensorRT call): an engine is reused only when its key (everything it depends
on: the piece's ONNX hash, TensorRT version, GPU, precision, batch profile, plugin library, adaedge
version) equals this machine's and its file matches its recorded hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from .... import __version__
from ....bundle import Bundle, safe_join, write_atomic
from ....bundle.paths import child
from ....errors import BundleError

CACHE = "tensorrt"


def engine_key(onnx_sha256: str, tensorrt: str, device: Mapping[str, Any], precision: str,
               max_batch: int, plugins_sha256: Optional[str],
               version_compatible: bool = False) -> Dict[str, Any]:
    """Everything an engine depends on; two engines are interchangeable when keys are equal."""
    return {"onnx_sha256": onnx_sha256, "tensorrt": tensorrt, "gpu": device["name"],
            "compute_capability": device["compute_capability"], "precision": precision,
            "max_batch": int(max_batch), "plugins_sha256": plugins_sha256 or "none",
            "version_compatible": bool(version_compatible), "adaedge": __version__}


def key_digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:16]


def key_difference(have: Mapping[str, Any], want: Mapping[str, Any]) -> str:
    """What makes a cached engine foreign or stale, in words."""
    diffs = [f"{k} {have.get(k)!r} (this machine: {v!r})" for k, v in want.items()
             if have.get(k) != v]
    return "; ".join(diffs) or "nothing"


MAX_ENGINE_BYTES = 4 << 30


class EngineCache:
    """``engines/tensorrt/``: the engines and ``index.json``, {piece: {"file", "key",
    "sha256"}}. Pure bookkeeping; the TensorRT calls live in the backend."""

    def __init__(self, bundle: Bundle) -> None:
        self.folder = bundle.engine_dir(CACHE)
        self.index_path = self.folder / "index.json"

    def read(self) -> Dict[str, Dict[str, Any]]:
        if not self.index_path.is_file():
            return {}
        try:
            # read through safe_join: an index the bundle ships as a link out of it is refused
            text = safe_join(self.folder, "index.json").read_text(encoding="utf-8")
            data = json.loads(text)
        except (OSError, ValueError, RecursionError):      # nested 200k deep: unreadable too
            raise BundleError(f"engine cache index {self.index_path} is unreadable; delete "
                              f"{self.folder} and run 'adaedge build --backend tensorrt'") from None
        pieces = data.get("pieces") if isinstance(data, dict) else None
        if not isinstance(pieces, dict):
            raise BundleError(f"engine cache index {self.index_path} is not an adaedge index")
        return pieces

    def lookup(self, piece: str, key: Mapping[str, Any]) -> Tuple[Optional[bytes], str]:
        """The cached engine of ``piece`` under ``key`` (its bytes, read once and hash-checked:
        what is deserialized is what was checked), or None and why not."""
        entry = self.read().get(piece)
        if not isinstance(entry, dict):
            return None, "no engine built yet"
        if entry.get("key") != dict(key):
            old = entry.get("key")
            return None, "its engine was built for another setup: " + \
                key_difference(old if isinstance(old, dict) else {}, key)
        path = safe_join(self.folder, str(entry.get("file")))
        if not path.is_file():
            return None, f"its engine file {path.name} is missing"
        if path.stat().st_size > MAX_ENGINE_BYTES:       # from the file system, before reading
            return None, f"its engine file {path.name} is larger than any engine adaedge builds"
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            return None, f"its engine file {path.name} does not match its recorded hash"
        return data, ""

    def store(self, piece: str, key: Mapping[str, Any], engine: bytes) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{piece}.{key_digest(key)}.engine"
        # names are identifiers (checked with the manifest); a link the bundle ships at the
        # engine's or the index's place is replaced, never followed
        path = write_atomic(child(self.folder, name), engine)
        index = self.read()
        index[piece] = {"file": name, "key": dict(key),
                        "sha256": hashlib.sha256(engine).hexdigest()}
        write_atomic(child(self.folder, "index.json"), json.dumps({"pieces": index}, indent=1))
        return path


__all__ = ["CACHE", "EngineCache", "engine_key", "key_digest", "key_difference"]
