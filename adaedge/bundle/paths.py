"""Paths inside a bundle: every file read or written stays inside it.

A bundle is untrusted input: a relative path from its manifest may be absolute, climb out with
``..`` or pass through a link that leads elsewhere; :func:`safe_join` refuses all three.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Union

from ..errors import BundleError


def safe_join(root: Union[str, Path], relative: str) -> Path:
    """``root / relative``, refusing absolute paths, ``..`` and links that leave ``root``."""
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"bundle path must be a non-empty string, got {relative!r}")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or ":" in rel.parts[0]:
        raise BundleError(f"bundle path {relative!r} is absolute: paths must stay inside the bundle")
    if any(part == ".." for part in rel.parts) or "\\" in relative:
        raise BundleError(f"bundle path {relative!r} leaves the bundle")
    base = Path(root).resolve()
    target = (base / rel).resolve()
    try:
        target.relative_to(base)
    except ValueError:
        raise BundleError(f"bundle path {relative!r} resolves to {target}, outside the bundle "
                          f"{base}") from None
    return target


def child(folder: Union[str, Path], filename: str) -> Path:
    """``folder / filename`` for a file a tool is about to replace: ``filename`` must be one plain
    name (no separator, not ``.`` or ``..``); the last component is not resolved, so that a link
    the bundle ships there is replaced (``os.replace``), never followed. ``folder`` must already
    be checked (:func:`safe_join`)."""
    if not filename or filename in (".", "..") or "/" in filename or "\\" in filename or \
            "\0" in filename:
        raise BundleError(f"{filename!r} is not a plain file name")
    return Path(folder) / filename


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Union[str, Path], data: Union[bytes, str]) -> Path:
    """Write ``data`` to ``path`` through a temporary file created beside it and renamed into
    place: a reader never sees half a file, and an existing link at ``path`` is replaced, not
    followed."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            # mkstemp makes the file private (0600); a written file gets the mode any new file
            # would (0644 under the usual umask), so a server running as another user reads it
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not e.filename:    # a full disk names no file: say which
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    return path


def free_bytes(folder: Union[str, Path]) -> int:
    """Bytes a process may still write in ``folder``'s file system (-1 when unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


__all__ = ["child", "current_umask", "free_bytes", "safe_join", "sha256_file", "write_atomic"]
