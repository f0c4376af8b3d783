"""Putting a freshly written bundle in place without losing anything.

``export --overwrite`` replaces what the old bundle's manifest lists (its manifest, pieces, their
int8 forms and constants) and its engine caches, nothing else: files a user keeps beside a bundle (the
checkpoint being exported, notes) move into the new bundle. The old bundle stays whole until the
new one is complete:

1. the new bundle is written into a hidden temporary folder beside the destination;
2. the user's files move from the old bundle into the new one (each move recorded);
3. the old bundle is renamed aside, the new one renamed in, the old one deleted.

SIGINT and SIGTERM are held back during steps 2 and 3 (a handful of renames), and a failure
anywhere undoes the recorded moves and renames, so at every instant the destination holds the
whole old bundle or the whole new one. SIGTERM during the long step 1 is turned into an
interruption (:func:`terminate_as_interrupt`), so the temporary folder is removed as for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, List, Set, Tuple

from ..bundle import MANIFEST
from ..bundle.lock import LOCK, locked
from ..bundle.manifest import FORMAT
from ..errors import ExportError

ENGINES = "engines"


class Terminated(KeyboardInterrupt):
    """SIGTERM received while a bundle was being written (handled as an interruption)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) so that
    cleanup runs; outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated("terminated (SIGTERM) while writing a bundle")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done (then they are delivered)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def old_bundle_files(out: Path) -> Set[str]:
    """The relative paths an adaedge bundle at ``out`` owns: its manifest, the files it lists
    and its engine caches. A folder whose manifest is not an adaedge bundle's is refused."""
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExportError(f"{out} holds a {MANIFEST} that is not an adaedge bundle's; nothing "
                          "was changed: choose an empty or new folder")
    owned = {MANIFEST, ENGINES}
    int8 = data.get("int8")
    for pieces in (data.get("pieces"), int8.get("pieces") if isinstance(int8, dict) else None):
        for piece in pieces.values() if isinstance(pieces, dict) else ():
            if isinstance(piece, dict) and _bundle_file(piece.get("file"), ".onnx"):
                owned.add(os.path.normpath(piece["file"]))
    constants = data.get("constants")
    if isinstance(constants, dict) and _bundle_file(constants.get("file"), ".npz"):
        owned.add(os.path.normpath(constants["file"]))
    return owned


def _bundle_file(relative: Any, suffix: str) -> bool:
    """Whether a path an old manifest names is one adaedge writes: under ``graphs/``, with the
    piece's (``.onnx``) or constants' (``.npz``) suffix. Anything else a manifest names (a
    hostile one may name the user's ``ckpt.pt`` or ``./notes.txt``) is the user's file: kept."""
    if not isinstance(relative, str) or not relative or relative.startswith(("/", "\\")) \
            or "\\" in relative or "\0" in relative:
        return False
    norm = os.path.normpath(relative)
    parts = norm.split(os.sep)
    return len(parts) >= 2 and parts[0] == "graphs" and ".." not in parts and \
        norm.endswith(suffix)


def _user_files(out: Path, owned: Set[str]) -> List[str]:
    """Relative paths of the files and links in ``out`` (links not followed) the old bundle does
    not own."""
    found: List[str] = []
    for dirpath, dirnames, filenames in os.walk(out, followlinks=False):
        rel_dir = os.path.relpath(dirpath, out)
        if rel_dir == ENGINES or rel_dir.startswith(ENGINES + os.sep):
            dirnames[:] = []
            continue
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel not in owned:
                found.append(rel)
    return found


def hold_temporary(tmp: Path) -> int:
    """Mark ``tmp`` (the new bundle being written) as in use: an exclusive lock on its lock
    file, held until the process ends or the descriptor is closed. A folder of this kind whose
    lock is free belongs to an export that was killed (:func:`remove_stale_temporaries`)."""
    import fcntl
    fd = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_stale_temporaries(out: Path) -> None:
    """Remove what exports to ``out`` that were killed (kill -9, a power cut) left beside it:
    hidden folders ``.NAME.XXXXXXXX`` (tempfile's names) holding a lock file that no process
    holds. The asides of an interrupted swap (``.NAME.old.*``) may hold the only copy of the old
    bundle and are never removed."""
    import fcntl
    import re
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}")
    for folder in out.parent.glob(f".{glob_escape(out.name)}.*"):
        lock = folder / LOCK
        if not pattern.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir() \
                or lock.is_symlink() or not lock.is_file():
            continue
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue                     # an export at work
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)


def glob_escape(name: str) -> str:
    import glob
    return glob.escape(name)


def _claim(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out`` where nothing is, or only an empty folder: ``rename`` does it
    atomically and fails where a folder with files is, so of two exports to one new folder
    exactly one wins and the other is told, whatever the timing."""
    try:
        os.rename(new, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise ExportError(f"{out} was written by another process while this export ran "
                              "(it holds a bundle now); nothing of it was changed: pass "
                              "overwrite=True (--overwrite) to replace it") from None
        raise


def replace_bundle(new: Path, out: Path, overwrite: bool = True) -> None:
    """Put the complete bundle folder ``new`` at ``out`` (see the module docstring); without
    ``overwrite`` only where there is no bundle (nor any file) at the moment of the rename."""
    if not out.exists() or not overwrite:
        _claim(new, out)
        return
    if not any(out.iterdir()):
        _claim(new, out)
        return
    with locked(out, what="export --overwrite"):   # no build or calibration is writing it
        _swap(new, out)


def _swap(new: Path, out: Path) -> None:
    owned = old_bundle_files(out)
    moves: List[Tuple[Path, Path]] = []
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    swapped = False
    with signals_held():
        try:
            for rel in _user_files(out, owned):
                src, dst = out / rel, new / rel
                if dst.exists() or dst.is_symlink():
                    continue                     # a stale file of the bundle's own kind
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                moves.append((src, dst))
            os.replace(out, aside / "bundle")
            swapped = True
            os.replace(new, out)
        except BaseException:
            if swapped and not out.exists():
                os.replace(aside / "bundle", out)
            for src, dst in reversed(moves):
                if dst.exists() or dst.is_symlink():
                    os.replace(dst, src)
            shutil.rmtree(aside, ignore_errors=True)
            raise
    shutil.rmtree(aside, ignore_errors=True)


__all__ = ["hold_temporary", "remove_stale_temporaries", "replace_bundle",
           "terminate_as_interrupt", "old_bundle_files", "Terminated"]
