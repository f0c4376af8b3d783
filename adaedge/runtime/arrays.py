"""Where a backend keeps its values, and the few row operations the program needs on them.

The interpreter never computes on values itself: it picks rows (grouping a batch by branch,
dropping clips that exited), puts rows back, joins row groups, and brings small results (gate
decisions, scores) to the host. A backend whose values live on a device gives the interpreter an
:class:`ArrayOps` for them, so intermediate tensors stay on the device from piece to piece and only
decisions and scores cross to the host.
"""

from __future__ import annotations

from typing import Any, List, Protocol, Sequence, Tuple

import numpy as np


class ArrayOps(Protocol):
    """Row operations on one backend's values (batch first)."""

    def from_host(self, a: np.ndarray) -> Any: ...

    def to_host(self, v: Any) -> np.ndarray: ...

    def rows(self, v: Any, index: np.ndarray) -> Any:
        """The rows ``index`` (host int64 indices) of ``v``, as a new value."""
        ...

    def scatter(self, parts: Sequence[Tuple[np.ndarray, Any]], n: int) -> Any:
        """A new value of ``n`` rows whose rows ``index`` are ``part``, for each (index, part);
        the indices cover 0..n-1 once."""
        ...

    def concat(self, parts: Sequence[Any]) -> Any: ...

    def put_rows(self, dst: Any, index: np.ndarray, v: Any) -> Any:
        """``dst`` with rows ``index`` replaced by ``v``; ``dst`` itself is left as it was."""
        ...

    def shape(self, v: Any) -> Tuple[int, ...]: ...


class NumpyOps:
    """Host values: NumPy arrays."""

    def from_host(self, a: np.ndarray) -> np.ndarray:
        return a

    def to_host(self, v: Any) -> np.ndarray:
        return np.asarray(v)

    def rows(self, v: np.ndarray, index: np.ndarray) -> np.ndarray:
        run = as_slice(index)
        return v[run] if run is not None else v[index]

    def scatter(self, parts: Sequence[Tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
        first = parts[0][1]
        out = np.empty((n,) + first.shape[1:], dtype=first.dtype)
        for index, part in parts:
            out[index] = part
        return out

    def concat(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(list(parts))

    def put_rows(self, dst: np.ndarray, index: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = dst.copy()
        out[index] = v
        return out

    def shape(self, v: np.ndarray) -> Tuple[int, ...]:
        return tuple(v.shape)


NUMPY = NumpyOps()


def as_slice(index: np.ndarray) -> "slice | None":
    """Host row indices that are one ascending run as a slice (rows by a slice are a view, with
    no copy: values are never written in place), else None."""
    index = np.asarray(index, dtype=np.int64)
    if len(index) == 0 or np.any(np.diff(index) != 1):
        return None
    return slice(int(index[0]), int(index[-1]) + 1)


def runs(index: np.ndarray) -> List[Tuple[int, int, int]]:
    """Host row indices as runs of consecutive rows: (first position in ``index``, first row,
    length). Device backends without gather kernels copy each run with one memory copy."""
    out: List[Tuple[int, int, int]] = []
    for pos, row in enumerate(np.asarray(index, dtype=np.int64).tolist()):
        if out and out[-1][1] + out[-1][2] == row and out[-1][0] + out[-1][2] == pos:
            p, r, k = out[-1]
            out[-1] = (p, r, k + 1)
        else:
            out.append((pos, row, 1))
    return out
