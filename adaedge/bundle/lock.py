"""One writer at a time per bundle: an advisory lock on ``.adaedge.lock`` inside the bundle.

Every command that changes a bundle (``export --overwrite``'s swap, ``build``, ``calibrate exits``,
``calibrate int8``) holds the lock exclusively from reading the manifest to writing it, so that
two writers never lose each other's update: the second waits (saying so on stderr) and then
reads what the first wrote; it also removes the temporary files a killed writer left. Readers
(``load``: a runtime loading its pieces and engines) hold it
shared, so they see the engines and manifest before a writer or after it, never a mix.

The lock is ``fcntl.flock`` on a file of the bundle's own (created without following a link the
bundle ships; a read-only bundle is read without a lock, since nothing can write it). The lock is
per process and reentrant: a writer that loads a runtime of its own bundle does not wait for
itself. After the lock is taken, the file is checked to be still the bundle's (``export
--overwrite`` replaces the whole folder): a waiter that was locking the old folder's file locks
the new one's instead.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, TypeVar, Union

from ..errors import BundleError
from .vocabulary import MANIFEST

LOCK = ".adaedge.lock"

try:                                # POSIX; elsewhere bundles are not locked
    import fcntl
except ImportError:                 # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_held: Dict[str, List[Any]] = {}     # resolved bundle -> [fd, depth, exclusive]
_guard = threading.RLock()


def _say(text: str) -> None:
    print(f"adaedge: {text}", file=sys.stderr, flush=True)


def _open(path: Path, exclusive: bool) -> int:
    """The lock file's descriptor (-1: no lock: a folder that is no bundle, which the caller
    goes on to refuse, or a read-only bundle, which a reader reads unlocked)."""
    if not os.path.isfile(path.parent / MANIFEST):
        return -1
    flags = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags | os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            try:
                return os.open(path, flags | os.O_RDONLY)
            except OSError:
                if exclusive:
                    raise BundleError(f"bundle {path.parent} is not writable here ({e.strerror}):"
                                      " nothing was changed") from None
                return -1
        if e.errno == errno.ELOOP:
            raise BundleError(f"bundle {path.parent}: {LOCK} is a link; adaedge makes that "
                              "file itself") from None
        if e.errno == errno.ENOENT:
            raise BundleError(f"bundle {path.parent} is not a folder") from None
        raise


def _acquire(root: Path, exclusive: bool, what: str) -> int:
    path = root / LOCK
    while True:
        fd = _open(path, exclusive)
        if fd < 0 or fcntl is None:
            return fd
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another adaedge process that is writing {root}"
                 + (f" ({what} goes on when it is done)" if what else ""))
            try:
                fcntl.flock(fd, mode)
            except BaseException:
                os.close(fd)
                raise
        try:
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)                # the folder was replaced meanwhile: lock the new one


def _remove_stale(root: Path) -> None:
    """The temporary files of a writer that was killed (``write_atomic``'s ``.NAME.*.tmp``):
    under the exclusive lock no other writer can own them."""
    for folder, pattern in ((root, f".{MANIFEST}.*.tmp"), (root / "graphs" / "int8",
                                                           ".*.onnx.*.tmp")):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for stale in folder.glob(pattern):      # only adaedge's own names, never a user's file
            if stale.is_file() or stale.is_symlink():
                try:
                    stale.unlink()
                except OSError:
                    pass


@contextlib.contextmanager
def locked(root: Union[str, Path], exclusive: bool = True, what: str = "") -> Iterator[None]:
    """Hold the bundle's lock (exclusive for a writer, shared for a reader) within the block."""
    root = Path(root)
    key = str(root.resolve())
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            if exclusive and not entry[2] and entry[0] >= 0 and fcntl is not None:
                fcntl.flock(entry[0], fcntl.LOCK_EX)     # a reader of its own that now writes
                entry[2] = True
            entry[1] += 1
        else:
            entry = [_acquire(root, exclusive, what), 1, exclusive]
            _held[key] = entry
            if exclusive and entry[0] >= 0:
                _remove_stale(root)
    try:
        yield
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                _held.pop(key, None)
                if entry[0] >= 0:
                    os.close(entry[0])       # closing the descriptor releases the lock


F = TypeVar("F", bound=Callable[..., Any])


def writes_bundle(what: str) -> Callable[[F], F]:
    """A function whose first argument is a bundle (folder or :class:`Bundle`) that it reads and
    writes: it runs holding the bundle's exclusive lock (``write=False`` in its keywords: shared)."""
    def wrap(func: F) -> F:
        @functools.wraps(func)
        def inner(bundle: Any, *args: Any, **kwargs: Any) -> Any:
            root = getattr(bundle, "root", bundle)
            with locked(root, exclusive=kwargs.get("write", True) is not False, what=what):
                return func(bundle, *args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap


__all__ = ["LOCK", "locked", "writes_bundle"]
