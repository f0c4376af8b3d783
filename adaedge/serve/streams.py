"""Per-camera state on the server: a table of streams keyed by the client's stream id.

A stream bundle (AdaFuse's per-frame program) carries state from one call to the next; a server
that serves many cameras keeps one state per camera. A client names its camera with a
``stream_id`` (any non-zero integer), marks the first clip with ``stream_start`` (fresh state) and
the last with ``stream_end`` (state freed after that clip). A stream that sends nothing for
``idle_timeout_s`` seconds is freed too (at the next batch, and by the server's sweep every few
seconds), so a camera that vanished without ending its stream does
not hold memory for ever. A clip of an id the table does not hold (never started, ended, or
expired) starts a fresh stream: its ``position`` is 1, which tells the client that the state
started again.

The table holds host (NumPy) arrays and is safe to use from several model instances at once; a
stream is only ever touched by one batch at a time (the caller holds :meth:`StreamTable.lock`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from ..errors import UsageError


@dataclass
class StreamState:
    """One camera: its carried state (one row of each state value), clips seen, last use."""

    state: Dict[str, np.ndarray] = field(default_factory=dict)
    position: int = 0                   # clips served so far on this stream
    last_used: float = 0.0


class StreamTable:
    """Streams by id, bounded in number and freed when ended or idle."""

    def __init__(self, idle_timeout_s: float = 60.0, max_streams: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if idle_timeout_s <= 0:
            raise UsageError(f"the stream idle timeout must be positive, got {idle_timeout_s}")
        if max_streams < 1:
            raise UsageError(f"max_streams must be at least 1, got {max_streams}")
        self.idle_timeout_s = float(idle_timeout_s)
        self.max_streams = int(max_streams)
        self._clock = clock
        self._streams: Dict[int, StreamState] = {}
        self.lock = threading.Lock()
        self.started = 0
        self.ended = 0
        self.expired = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def expire(self) -> List[int]:
        """Free the streams idle for longer than the timeout; their ids."""
        now = self._clock()
        old = [k for k, s in self._streams.items() if now - s.last_used > self.idle_timeout_s]
        for k in old:
            del self._streams[k]
        self.expired += len(old)
        return old

    def open(self, stream_id: int, start: bool) -> StreamState:
        """The stream ``stream_id`` for its next clip: a fresh one if ``start`` or unknown."""
        now = self._clock()
        st = None if start else self._streams.get(stream_id)
        if st is None:
            if stream_id not in self._streams and len(self._streams) >= self.max_streams:
                oldest = min(self._streams, key=lambda k: self._streams[k].last_used)
                del self._streams[oldest]         # the least recently used camera goes
                self.evicted += 1
            st = StreamState(last_used=now)
            self._streams[stream_id] = st
            self.started += 1
        st.last_used = now
        return st

    def close(self, stream_id: int) -> None:
        """End a stream: its state is freed."""
        if self._streams.pop(stream_id, None) is not None:
            self.ended += 1

    def get(self, stream_id: int) -> Optional[StreamState]:
        return self._streams.get(stream_id)


__all__ = ["StreamState", "StreamTable"]
