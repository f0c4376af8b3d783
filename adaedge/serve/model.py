"""One bundle as a served model: what Triton's batches become in the runtime, without Triton.

Triton's dynamic batcher hands a model instance a list of requests; :meth:`ServedModel.infer`
turns them into ``Runtime.classify`` calls and back into one response per request. It knows
nothing of Triton (the server module binds it), so the same code answers in tests and on the
server.

Inputs per clip (the batch dimension is Triton's): ``clips`` (C, T, H, W) float32, normalised as
the manifest says; optional ``stream_id`` (uint64, 0 = no stream), ``stream_start`` and
``stream_end`` (bool). Outputs per clip: ``scores`` (the logits), ``label`` (int64), ``label_name``,
``branches`` (JSON: the branch each gate chose), ``flops`` (FLOPs spent), ``exit`` (the exit stage
taken, empty when the clip ran the whole program), ``stream_position`` (clips the stream has
served, this one included; 0 without a stream) and ``error`` (empty, or why this request was
refused).

A request whose clips the runtime refuses (NaN or infinite values, stream flags that do not
match its clips) is answered alone with its ``error`` (label -1, zero scores, its streams
untouched); the other requests of the batch run as if it had not come, so one camera's bad clip
never costs another camera its answer.

Clips of one batch run together, grouped by branch inside the runtime. Clips of a stream run in
the order they came, one clip of a stream per runtime call: a batch holding two clips of one
camera runs them one after the other, so each sees the state the one before left.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError
from ..runtime import Result, Runtime
from ..runtime.interpreter import MAX_CALL_CLIPS
from .metrics import ModelMetrics
from .streams import StreamTable


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the served model, per clip (Triton adds the batch dimension)."""

    name: str
    dtype: Any            # a NumPy dtype; ``object`` for strings (Triton BYTES)
    shape: Tuple[int, ...]
    optional: bool = False


class ServedModel:
    """A bundle served under a name: its runtimes (one per instance), streams and metrics."""

    def __init__(self, name: str, runtimes: Sequence[Runtime], policy: Optional[str] = None,
                 budget: Union[str, float, None] = None,
                 streams: Optional[StreamTable] = None) -> None:
        if not runtimes:
            raise InputError("a served model needs at least one runtime")
        self.name = name
        self.runtimes = list(runtimes)
        rt = self.runtimes[0]
        self.manifest = rt.manifest
        if policy is not None:
            rt.resolve_force(policy)          # an unknown policy fails here, before serving
        self.policy = policy
        self.budget = budget
        self.streams = streams if streams is not None else StreamTable()
        self.stateful = bool(self.manifest.state)
        self.window = self.manifest.window
        self.labels = self.manifest.labels
        n_classes = self.manifest.model.get("config", {}).get("num_classes")
        self.classes = len(self.labels) if self.labels else (
            int(n_classes) if isinstance(n_classes, int) and n_classes > 0 else 1)
        m = self.manifest
        static = None
        if "static" in m.policies or not m.switches():
            static = m.policy_flops("static")
        self.metrics = ModelMetrics(name, static_flops=static)
        self._busy: set = set()
        self._free = threading.Condition()

    def warm_up(self) -> None:
        """Run every runtime once on one clip and on two, under the served policy: the first
        call compiles the program (one clip) or warms the pieces (a batch), which must not be a
        request's wait."""
        c, t, h, w = self.manifest.clip_shape
        for rt in self.runtimes:
            for n in (1, 2):
                rt.classify(np.zeros((n, c, t, h, w), np.float32), force=self.policy,
                            budget=self.budget)

    # -- what Triton is told ----------------------------------------------------------------
    def inputs(self) -> List[TensorSpec]:
        c, t, h, w = self.manifest.clip_shape
        frames = -1 if self.window is not None else t
        return [TensorSpec("clips", np.float32, (c, frames, h, w)),
                TensorSpec("stream_id", np.uint64, (1,), optional=True),
                TensorSpec("stream_start", np.bool_, (1,), optional=True),
                TensorSpec("stream_end", np.bool_, (1,), optional=True)]

    def outputs(self) -> List[TensorSpec]:
        return [TensorSpec("scores", np.float32, (-1,)),
                TensorSpec("label", np.int64, (1,)),
                TensorSpec("label_name", object, (1,)),
                TensorSpec("branches", object, (1,)),
                TensorSpec("flops", np.int64, (1,)),
                TensorSpec("exit", object, (1,)),
                TensorSpec("stream_position", np.int64, (1,)),
                TensorSpec("error", object, (1,))]

    # -- serving ----------------------------------------------------------------------------
    def infer(self, requests: Sequence[Mapping[str, np.ndarray]],
              instance: int = 0) -> List[Dict[str, np.ndarray]]:
        """One response per request, in order; raises :class:`InputError` for a batch that
        cannot run (Triton returns the message to every request of the batch)."""
        runtime = self.runtimes[instance % len(self.runtimes)]
        refused: Dict[int, str] = {}
        rows: List[_Row] = []
        for r, one in enumerate(requests):      # each request on its own: one bad one is
            try:                                 # refused alone
                mine = _rows([one])
                runtime.check_clips(one["clips"])
            except InputError as e:
                refused[r] = str(e)
                continue
            except (ValueError, TypeError) as e:     # arrays NumPy cannot read as numbers
                refused[r] = f"a request's inputs cannot be read: {e}"
                continue
            rows += [(r, clip, sid, start, end) for _, clip, sid, start, end in mine]
        ids = [r[2] for r in rows]
        stream_ids = {i for i in ids if i != 0}
        self._acquire(stream_ids)
        try:
            outs = self._run(runtime, rows) if rows else []
        finally:
            self._release(stream_ids)
        responses: List[Dict[str, List[Any]]] = [{} for _ in requests]
        for (req, _row, _sid, _s, _e), out in zip(rows, outs):
            for k, v in out.items():
                responses[req].setdefault(k, []).append(v)
        done: List[Dict[str, np.ndarray]] = []
        for r, resp in enumerate(responses):
            if r in refused:
                n = _clip_count(requests[r])
                self.metrics.refuse(n)
                done.append(_refusal(n, self.classes, refused[r]))
                continue
            done.append({
                "scores": np.stack(resp["scores"]).astype(np.float32),
                "label": np.array(resp["label"], dtype=np.int64).reshape(-1, 1),
                "label_name": np.array(resp["label_name"], dtype=object).reshape(-1, 1),
                "branches": np.array(resp["branches"], dtype=object).reshape(-1, 1),
                "flops": np.array(resp["flops"], dtype=np.int64).reshape(-1, 1),
                "exit": np.array(resp["exit"], dtype=object).reshape(-1, 1),
                "stream_position": np.array(resp["stream_position"],
                                            dtype=np.int64).reshape(-1, 1),
                "error": np.array([b""] * len(resp["label"]), dtype=object).reshape(-1, 1)})
        return done

    def _acquire(self, ids: Iterable[int]) -> None:
        """Wait until no other instance runs a clip of these streams, then hold them."""
        ids = set(ids)
        if not ids:
            return
        with self._free:
            while self._busy & ids:
                self._free.wait()
            self._busy |= ids

    def _release(self, ids: Iterable[int]) -> None:
        ids = set(ids)
        if not ids:
            return
        with self._free:
            self._busy -= ids
            self._free.notify_all()

    def _run(self, runtime: Runtime, rows: List["_Row"]) -> List[Dict[str, Any]]:
        """Run the rows in waves: a stream's k-th clip of the batch runs in wave k."""
        seen: Counter = Counter()
        waves: Dict[int, List[int]] = {}
        for i, (_req, _row, sid, _start, _end) in enumerate(rows):
            wave = seen[sid] if sid != 0 else 0
            if sid != 0:
                seen[sid] += 1
            waves.setdefault(wave, []).append(i)
        outs: List[Optional[Dict[str, Any]]] = [None] * len(rows)
        with self.streams.lock:
            self.streams.expire()
        for wave in sorted(waves):
            members = waves[wave]
            by_frames: Dict[int, List[int]] = {}
            for i in members:
                by_frames.setdefault(rows[i][1].shape[1], []).append(i)
            for group in by_frames.values():
                for start in range(0, len(group), MAX_CALL_CLIPS):
                    part = group[start:start + MAX_CALL_CLIPS]
                    for i, out in zip(part, self._call(runtime, [rows[i] for i in part])):
                        outs[i] = out
        return [o for o in outs if o is not None]

    def _call(self, runtime: Runtime, rows: List["_Row"]) -> List[Dict[str, Any]]:
        x = np.stack([r[1] for r in rows])
        state = None
        positions = []
        table = self.streams
        with table.lock:
            opened = []
            for _req, _clip, sid, start, _end in rows:
                st = table.open(sid, start) if sid != 0 else None
                opened.append(st)
                positions.append(st.position + 1 if st is not None else 0)
        if self.stateful:
            fresh = runtime.initial_state(1)
            state = {}
            for spec in self.manifest.state:
                parts = []
                for st in opened:
                    have = None if st is None else st.state.get(spec.name)
                    parts.append(have if have is not None else runtime.ops.to_host(fresh[spec.name]))
                state[spec.name] = np.concatenate(parts)
        t0 = time.perf_counter()
        result: Result = runtime.classify(x, force=self.policy, budget=self.budget, state=state)
        seconds = time.perf_counter() - t0
        with table.lock:
            for i, ((_req, _clip, sid, _start, end), st) in enumerate(zip(rows, opened)):
                if st is None:
                    continue
                if self.stateful:
                    st.state = {k: np.ascontiguousarray(runtime.ops.to_host(v)[i:i + 1])
                                for k, v in result.state.items()}
                st.position += 1
                if end:
                    table.close(sid)
        frames = x.shape[2] if self.window is not None else 1
        self.metrics.record(result.traces, frames, len(table), seconds)
        out = []
        labels = result.labels
        for i, trace in enumerate(result.traces):
            k = int(labels[i])
            out.append({"scores": result.scores[i], "label": k,
                        "label_name": (self.labels[k] if self.labels and k < len(self.labels)
                                       else str(k)).encode(),
                        "branches": json.dumps(trace.branches, sort_keys=True).encode(),
                        "flops": int(trace.flops),
                        "exit": (trace.exit or "").encode(),
                        "stream_position": positions[i]})
        return out


_Row = Tuple[int, np.ndarray, int, bool, bool]   # request, clip, stream id, start, end


def _clip_count(req: Any) -> int:
    clips = req.get("clips") if isinstance(req, Mapping) else None
    shape = tuple(getattr(clips, "shape", ()))
    return int(shape[0]) if shape else 1


def _refusal(n: int, classes: int, message: str) -> Dict[str, np.ndarray]:
    """The answer to a refused request of ``n`` clips: label -1, zero scores, the reason."""
    return {"scores": np.zeros((n, classes), np.float32),
            "label": np.full((n, 1), -1, np.int64),
            "label_name": np.array([b""] * n, dtype=object).reshape(-1, 1),
            "branches": np.array([b"{}"] * n, dtype=object).reshape(-1, 1),
            "flops": np.zeros((n, 1), np.int64),
            "exit": np.array([b""] * n, dtype=object).reshape(-1, 1),
            "stream_position": np.zeros((n, 1), np.int64),
            "error": np.array([message.encode()] * n, dtype=object).reshape(-1, 1)}


def _flag(req: Mapping[str, np.ndarray], name: str, n: int, dtype: Any) -> np.ndarray:
    v = req.get(name)
    if v is None:
        return np.zeros(n, dtype=dtype)
    arr = np.asarray(v).reshape(-1)
    if arr.shape[0] != n:
        raise InputError(f"{name} holds {arr.shape[0]} values for {n} clips")
    # never coerced: a stream id is a non-negative integer, a flag a boolean (or 0/1)
    if dtype == np.bool_:
        if arr.dtype.kind == "b" or (arr.dtype.kind in "iu" and np.isin(arr, (0, 1)).all()):
            return arr.astype(np.bool_)
        raise InputError(f"{name} must be BOOL, got {arr.dtype}")
    if arr.dtype.kind not in "iu" or (arr.dtype.kind == "i" and (arr < 0).any()):
        raise InputError(f"{name} must be non-negative integers (UINT64), got {arr.dtype}")
    return arr.astype(dtype)


def _rows(requests: Sequence[Mapping[str, np.ndarray]]) -> List[_Row]:
    rows: List[_Row] = []
    for r, req in enumerate(requests):
        if not isinstance(req, Mapping):
            raise InputError("a request must map input names to arrays")
        if "clips" not in req:
            raise InputError("a request needs the input 'clips'")
        clips = np.asarray(req["clips"])
        if clips.ndim != 5:
            raise InputError(f"clips of shape {clips.shape[1:]} per clip: the model takes "
                             "(C, T, H, W)")
        n = clips.shape[0]
        ids = _flag(req, "stream_id", n, np.uint64)
        starts = _flag(req, "stream_start", n, np.bool_)
        ends = _flag(req, "stream_end", n, np.bool_)
        for i in range(n):
            rows.append((r, clips[i], int(ids[i]), bool(starts[i]), bool(ends[i])))
    return rows


__all__ = ["ServedModel", "TensorSpec"]
