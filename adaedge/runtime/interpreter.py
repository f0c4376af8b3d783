"""The program interpreter: gate -> branch -> ... -> exit, per clip, with the batch grouped by branch.

No torch here: values are the backend's arrays with the batch first (NumPy for the CPU backends,
device tensors for the GPU ones, see :mod:`.arrays`), and every piece runs through a backend. Only
gate decisions and scores come to the host.

:meth:`Runtime.classify` checks its arguments and hands one batch to a :class:`_Call`, which
interprets the program with one method per step kind (:meth:`_Call.run`, :meth:`_Call.switch`,
:meth:`_Call.exit`, :meth:`_Call.carry`); a stream bundle's clips go through it frame by frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..bundle import Bundle, Carry, Exit, Manifest, Run, Switch, budget_key
from ..bundle import load as load_bundle
from ..bundle.lock import locked
from ..bundle.program import Branch, Step
from ..errors import BundleError, InputError, UsageError
from ..progress import Progress
from .arrays import ArrayOps
from .backends import Backend, Executable, create_backend
from .compile import DECISION as _DECISION
from .compile import EXIT as _EXIT
from .compile import SCORES as _SCORES
from .compile import STATE as _STATE

Force = Union[None, str, int, Mapping[str, int]]
PATHS = ("auto", "pieces", "compiled")


@dataclass
class StepRecord:
    step: str
    piece: str
    ms: float
    batch: int

    def to_json(self) -> Dict[str, Any]:
        return {"step": self.step, "piece": self.piece, "ms": round(self.ms, 4), "batch": self.batch}


@dataclass
class Trace:
    """What one clip went through: the branch at each gate, FLOPs spent, each step's time.

    ``ms`` of a step is the wall time of the run that served this clip; a run serves a group of
    ``batch`` clips at once.
    """

    branches: Dict[str, str] = field(default_factory=dict)
    flops: int = 0
    steps: List[StepRecord] = field(default_factory=list)
    exit: Optional[str] = None
    decisions: int = 0          # gate decisions brought to the host
    decision_ms: float = 0.0    # their wall time (on a device: the wait for the gate, and the copy)

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def to_json(self) -> Dict[str, Any]:
        return {"branches": self.branches, "flops": self.flops, "exit": self.exit,
                "decisions": self.decisions, "decision_ms": round(self.decision_ms, 4),
                "steps": [s.to_json() for s in self.steps]}


@dataclass
class Result:
    scores: np.ndarray                      # (N, classes)
    traces: List[Trace]
    values: Dict[str, np.ndarray] = field(default_factory=dict)  # with keep_values=True
    state: Dict[str, Any] = field(default_factory=dict)   # state for the next call (backend arrays)

    @property
    def labels(self) -> np.ndarray:
        return self.scores.argmax(axis=1)

    def probabilities(self) -> np.ndarray:
        """Softmax of the scores (the scores are logits), per clip."""
        return _softmax(self.scores.astype(np.float64))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def exit_measure(scores: np.ndarray, criterion: str) -> np.ndarray:
    """Entropy (nats, lower is surer) or max probability (higher is surer) of softmax(scores),
    or the largest raw score (``max_logit``, higher is surer: the official AdaFocus evaluation's
    "confidence")."""
    if criterion == "max_logit":
        return np.asarray(scores).max(axis=1)
    p = _softmax(scores.astype(np.float64))
    if criterion == "entropy":
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return p.max(axis=1)


def _check_arguments(budget: Any, exit_at: Any, state: Any) -> None:
    """``classify``'s keyword arguments of the types it takes, or an :class:`InputError`."""
    if budget is not None and not isinstance(budget, str) and (
            isinstance(budget, bool) or not isinstance(budget, (int, float, np.number))
            or not np.isfinite(budget)):
        raise InputError(f"budget must be a stored budget's name or a finite number of GFLOPs, "
                         f"not {budget!r}")
    if exit_at is not None and not isinstance(exit_at, str):
        if not isinstance(exit_at, (list, tuple, np.ndarray)) or not all(
                e is None or isinstance(e, str) for e in exit_at):
            raise InputError(f"exit_at must be an exit's name, or one name (or None) per clip, "
                             f"not {exit_at!r}")
    if state is not None and not isinstance(state, Mapping):
        raise InputError(f"state must be a mapping of state names to arrays (as Result.state "
                         f"holds it), not {type(state).__name__}")


class Runtime:
    """A loaded bundle: one executable per piece, and the program that strings them together."""

    def __init__(self, bundle: Bundle, backend: Backend, progress: Progress = None,
                 sync_steps: bool = False, path: str = "auto") -> None:
        if path not in PATHS:
            raise InputError(f"path must be one of {', '.join(PATHS)}, not {path!r}")
        if path == "compiled" and not backend.runs_graphs:
            raise InputError(f"the {backend.name} backend does not run compiled programs; use "
                             "path='pieces'")
        self.path = path
        self._compiled: Dict[Any, Executable] = {}
        bundle = backend.bundle_for(bundle)      # the int8 forms at precision int8
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.backend = backend
        self.ops: ArrayOps = backend.arrays
        # a device backend runs pieces asynchronously: a step's time is its launch, unless every
        # step waits for the device (per-piece timings, slower overall)
        self._sync: Optional[Callable[[], None]] = backend.synchronize if sync_steps else None
        used = self.manifest.used_pieces()
        # pieces exported for one clip (or stream) per call: a group of several runs row by row
        self._single = {n for n, p in self.manifest.pieces.items()
                        if p.inputs and p.inputs[0].shape[:1] == [1]}
        self.executables: Dict[str, Executable] = {}
        # a reader: the files as they are before a writer (build, calibrate) or after it
        with locked(bundle.root, exclusive=False):
            self.constants: Dict[str, Any] = {k: self.ops.from_host(v)
                                              for k, v in bundle.constants().items()}
            for i, name in enumerate(used):
                if progress:
                    progress(i, len(used), name)
                self.executables[name] = backend.load(bundle, name)
        if progress:
            progress(len(used), len(used), "loaded")
        self._flops = {n: p.flops for n, p in self.manifest.pieces.items()}
        self._branch_flops = {s.name: [self._flops[b.piece] if b.piece is not None else 0
                                       for b in s.branches] for s in self.manifest.switches()}
        # what compiled runs need per call, worked out once
        program = self.manifest.program
        self._clip_tuple = tuple(self.manifest.clip_shape)
        self._input_name = self.manifest.input["name"]
        self._switch_names = [s.name for s in self.manifest.switches()]
        self._switch_steps = [(i, s) for i, s in enumerate(program) if isinstance(s, Switch)]
        self._exit_positions = [i for i, s in enumerate(program) if isinstance(s, Exit)]
        self._exit_names = [s.name for s in program if isinstance(s, Exit)]
        self._run_flops_before = [0]
        for s in program:
            self._run_flops_before.append(self._run_flops_before[-1] +
                                          (self._flops[s.piece] if isinstance(s, Run) else 0))
        self._calls: Dict[Any, Tuple[Dict[str, int], Optional[Dict[str, float]], Executable]] = {}

    # -- policies ---------------------------------------------------------------------------
    @property
    def policies(self) -> List[str]:
        return sorted(self.manifest.policies)

    def resolve_force(self, force: Force) -> Dict[str, int]:
        """A forced policy as {switch name: branch index} (empty: gates choose)."""
        switches = {s.name: len(s.branches) for s in self.manifest.switches()}
        if force is None:
            return {}
        if isinstance(force, str):
            if force not in self.manifest.policies:
                raise InputError(f"unknown policy {force!r}; this bundle has "
                                 f"{', '.join(self.policies) or 'none'}")
            return dict(self.manifest.policies[force])
        if isinstance(force, (int, np.integer)) and not isinstance(force, bool):
            bad = [n for n, k in switches.items() if not 0 <= int(force) < k]
            if bad:
                raise InputError(f"branch {force} does not exist at switch {bad[0]!r}")
            return {n: int(force) for n in switches}
        if isinstance(force, Mapping):
            out = {}
            for name, idx in force.items():
                if name not in switches:
                    raise InputError(f"unknown switch {name!r}")
                if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)):
                    raise InputError(f"the branch forced at switch {name!r} must be an integer "
                                     f"index, not {idx!r}")
                if not 0 <= int(idx) < switches[name]:
                    raise InputError(f"branch {idx} does not exist at switch {name!r}")
                out[name] = int(idx)
            return out
        raise InputError(f"force must be None, a policy name, a branch index or a mapping, "
                         f"not {type(force).__name__}")

    # -- input ------------------------------------------------------------------------------
    def check_clips(self, clips: Any) -> np.ndarray:
        """Clips as contiguous float32 (N, C, T, H, W); a stream bundle takes any T >= 1."""
        try:
            arr = np.asarray(clips)
        except ValueError:        # ragged nested lists
            raise InputError("clips must be an array (N, C, T, H, W); got nested lists of "
                             "unequal lengths") from None
        if arr.dtype == np.float32 and arr.shape[1:] == self._clip_tuple and arr.shape[0] >= 1 \
                and arr.flags.c_contiguous:
            return self._finite(arr)            # the common case, checked in a few comparisons
        expected = self.manifest.clip_shape
        if arr.dtype.kind not in "fiu":
            raise InputError(f"clips must be numeric, got dtype {arr.dtype}")
        got = list(arr.shape[1:])
        if self.manifest.window is not None and arr.ndim == 5 and arr.shape[2] >= 1:
            got[1] = 1
        if arr.ndim != 5 or got != expected or arr.shape[0] < 1:
            frames = "T" if self.manifest.window is not None else str(expected[1])
            raise InputError(f"clips of shape {tuple(arr.shape)} do not match the bundle's input "
                             f"(N, {expected[0]}, {frames}, {expected[2]}, {expected[3]}) in "
                             "layout NCTHW, normalised with the manifest's mean and std")
        return self._finite(np.ascontiguousarray(arr, dtype=np.float32))

    @staticmethod
    def _finite(arr: np.ndarray) -> np.ndarray:
        """NaN or infinite inputs give NaN scores that arg-max calls class 0: refused."""
        if not np.isfinite(arr).all():
            bad = np.unique(np.nonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)))[0])
            which = (f"clip {bad[0]} holds" if len(bad) == 1 else
                     f"clips {', '.join(map(str, bad[:5].tolist()))}"
                     f"{' ...' if len(bad) > 5 else ''} hold")
            raise InputError(f"{which} NaN or infinite values: check the decoding and "
                             "normalisation upstream")
        return arr

    def initial_state(self, batch: int) -> Dict[str, Any]:
        state = {}
        for spec in self.manifest.state:
            shape = [batch] + [int(d) for d in spec.shape[1:]]
            state[spec.name] = self.ops.from_host(np.zeros(shape, dtype=spec.dtype))
        return state

    # -- running pieces ---------------------------------------------------------------------
    def run_piece(self, piece: str, step: str, feeds: Mapping[str, Any], rows: np.ndarray,
                  traces: List[Trace], shared: Sequence[str] = ()) -> Dict[str, Any]:
        """Run ``piece`` on ``feeds`` (the rows ``rows`` of the batch), charging its FLOPs and
        time to those rows' traces. Inputs named in ``shared`` (constants) are not split by row."""
        t0 = time.perf_counter()
        exe = self.executables[piece]
        if piece in self._single and len(rows) > 1:
            ops = self.ops
            parts = [exe.run({k: (v if k in shared else ops.rows(v, np.array([i])))
                              for k, v in feeds.items()}) for i in range(len(rows))]
            out = {k: ops.concat([p[k] for p in parts]) for k in parts[0]}
        else:
            out = exe.run(feeds)
        if self._sync is not None:
            self._sync()
        ms = (time.perf_counter() - t0) * 1e3
        flops = self._flops[piece]
        for r in rows:
            tr = traces[r]
            tr.flops += flops
            tr.steps.append(StepRecord(step, piece, ms, len(rows)))
        return out

    # -- the interpreter --------------------------------------------------------------------
    def classify(self, clips: Any, force: Force = None, budget: Union[str, float, None] = None,
                 exit_at: Union[str, Sequence[Optional[str]], None] = None,
                 keep_values: bool = False,
                 state: Optional[Mapping[str, Any]] = None, exits: bool = True,
                 graph: bool = False) -> Result:
        """Scores and a trace per clip for a batch of clips (N, C, T, H, W).

        ``force`` fixes the branches (a policy name from the manifest, one branch index for every
        switch, or {switch: index}); ``budget`` picks the exit thresholds stored under that name
        (a number of GFLOPs is looked up as ``budget_key(gflops)``); ``exit_at`` stops every clip
        at the named exit step, or each clip at its own (a sequence of names, None for no exit);
        ``state`` is the carried state of a stream (default: zeros; NumPy arrays or the backend's
        own, as ``Result.state`` returns them); ``exits=False`` takes no
        exit (every clip runs the whole program) unless ``exit_at`` says otherwise.
        ``graph=True`` runs a fully forced policy (or a program without switches) as one graph
        for the whole batch: the static network as one graph, a benchmark's baseline.

        A stream bundle (``manifest.window``) takes the T frames of ``clips`` one call each, in
        order, carrying the state from frame to frame; the scores are those after the last frame,
        and each trace adds up all frames (its branches are keyed ``"<switch>@<frame>"``).

        More than ``MAX_CALL_CLIPS`` (64) clips run as calls of 64, with the same results, so
        that memory stays bounded however many clips one call is given.
        """
        _check_arguments(budget, exit_at, state)
        return self._classify(self.check_clips(clips), force, budget, exit_at, keep_values,
                              state, exits, graph)

    def _classify(self, x: np.ndarray, force: Force = None,
                  budget: Union[str, float, None] = None,
                  exit_at: Union[str, Sequence[Optional[str]], None] = None,
                  keep_values: bool = False, state: Optional[Mapping[str, Any]] = None,
                  exits: bool = True, graph: bool = False) -> Result:
        """``classify`` for clips ``check_clips`` already passed: the frame-by-frame and
        batch-by-batch paths call it on their slices without checking the clips again."""
        n = x.shape[0]
        if n > MAX_CALL_CLIPS:           # bounded memory: a huge batch runs as calls of 64 clips
            if keep_values or state is not None:
                raise InputError(f"{n} clips in one call with keep_values or state: give at most "
                                 f"{MAX_CALL_CLIPS} clips a call")
            return self.classify_batches(x, MAX_CALL_CLIPS, force=force, budget=budget,
                                         exit_at=exit_at, exits=exits, graph=graph)
        if self.manifest.window is not None and x.shape[2] > 1:
            return self._classify_frames(x, force, budget, exit_at, keep_values, state, exits)
        if graph or self._use_compiled(n, exit_at, keep_values):
            return self._classify_compiled(x, force, budget, exits and not graph, state)
        per_clip_exit: Optional[np.ndarray] = None
        if exit_at is not None:
            named = [exit_at] if isinstance(exit_at, str) else list(exit_at)
            unknown = sorted({str(e) for e in named if e is not None} - set(self._exit_names))
            if unknown:
                raise InputError(f"exit_at names {', '.join(map(repr, unknown))}, not an exit of "
                                 f"this bundle (its exits: "
                                 f"{', '.join(self._exit_names) or 'none'})")
        if exit_at is not None and not isinstance(exit_at, str):
            per_clip_exit = np.asarray(list(exit_at), dtype=object)
            if per_clip_exit.shape != (n,):
                raise InputError(f"exit_at holds {per_clip_exit.shape[0]} names for {n} clips")
        call = _Call(self, x, self.resolve_force(force),
                     budget_key(budget) if budget is not None else None,
                     exit_at if isinstance(exit_at, str) else None, per_clip_exit, exits,
                     keep_values, self._check_state(state, n))
        return call.execute(self.manifest.program)

    # -- one clip per call: the program compiled into one graph --------------------------------
    def _use_compiled(self, n: int, exit_at: Any, keep_values: bool) -> bool:
        """The compiled graph serves one clip per call, when nothing asks for what only the
        pieces give (every value, a forced exit)."""
        return (self.path == "compiled" or (self.path == "auto" and self.backend.runs_graphs)) \
            and n == 1 and exit_at is None and not keep_values

    def _thresholds(self, budget: Union[str, float, None], exits: bool) -> Optional[Dict[str, float]]:
        """The threshold of each exit under ``budget`` (as the interpreter picks them)."""
        steps = self.manifest.exits()
        if not exits or not steps:
            return None
        key = budget_key(budget) if budget is not None else "default"
        out = {}
        for step in steps:
            if budget is not None and key not in step.thresholds:
                raise InputError(f"exit {step.name!r} has no thresholds for budget {key!r}; "
                                 f"it has {', '.join(sorted(step.thresholds)) or 'none'} "
                                 f"{self._calibrate_hint()}")
            if key in step.thresholds:
                out[step.name] = step.thresholds[key]
        return out

    def _calibrate_hint(self) -> str:
        if self.bundle.precision == "int8":
            return ("at int8 (run 'adaedge calibrate exits --precision int8', or 'adaedge "
                    "calibrate int8' with labelled data)")
        return "(run 'adaedge calibrate exits')"

    def compiled(self, forced: Mapping[str, int],
                 thresholds: Optional[Mapping[str, float]]) -> Executable:
        """The executable of the program compiled for these forced switches and thresholds
        (compiled and loaded on first use, then kept)."""
        key = (tuple(sorted(forced.items())),
               None if thresholds is None else tuple(sorted(thresholds.items())))
        exe = self._compiled.get(key)
        if exe is None:
            from .compile import compile_program
            model = compile_program(self.bundle, forced, thresholds)
            exe = self.backend.load_graph(model, "compiled program")
            self._compiled[key] = exe
        return exe

    def _compiled_call(self, force: Force, budget: Union[str, float, None],
                       exits: bool) -> Tuple[Dict[str, int], Optional[Dict[str, float]], Executable]:
        """The forced switches, thresholds and compiled executable of a call (memoised per
        policy name, budget and exits, so that a call costs a dictionary lookup)."""
        memo = (force, budget, exits) if force is None or isinstance(force, (str, int)) else None
        hit = self._calls.get(memo) if memo is not None else None
        if hit is not None:
            return hit
        forced = self.resolve_force(force)
        thresholds = self._thresholds(budget, exits)
        call = (forced, thresholds, self.compiled(forced, thresholds))
        if memo is not None:
            self._calls[memo] = call
        return call

    def _classify_compiled(self, x: np.ndarray, force: Force, budget: Union[str, float, None],
                           exits: bool, state: Optional[Mapping[str, Any]]) -> Result:
        forced, thresholds, exe = self._compiled_call(force, budget, exits)
        n = x.shape[0]
        if n > 1 and (thresholds or len(forced) < len(self._switch_names)):
            raise InputError("a batch runs as one graph only under a policy that forces every "
                             "switch and with no exit taken")
        feeds = {self._input_name: x}
        if self.manifest.state:
            st = self._check_state(state, n)
            feeds.update({k: self.ops.to_host(v) for k, v in st.items()})
        t0 = time.perf_counter()
        out = exe.run(feeds)
        ms = (time.perf_counter() - t0) * 1e3
        trace = self._compiled_trace(out, forced, ms, n)
        traces = [trace] + [Trace(dict(trace.branches), trace.flops, list(trace.steps), trace.exit,
                                  trace.decisions) for _ in range(n - 1)]
        new_state = {spec.name: out[_STATE + spec.name] for spec in self.manifest.state}
        return Result(scores=out[_SCORES], traces=traces, state=new_state)

    def _compiled_trace(self, out: Mapping[str, np.ndarray], forced: Mapping[str, int],
                        ms: float, n: int) -> Trace:
        """A compiled run's trace: the branch each switch took and the FLOPs of the pieces that
        ran (the steps before the exit taken)."""
        trace = Trace()
        exit_index = int(out[_EXIT].reshape(-1)[0])
        end = self._exit_positions[exit_index] if exit_index >= 0 else len(self.manifest.program)
        flops = self._run_flops_before[end]
        for position, step in self._switch_steps:
            if position >= end:
                break
            k = int(out[_DECISION + step.name].reshape(-1)[0])
            trace.branches[step.name] = step.branches[k].name
            flops += self._branch_flops[step.name][k]
            if step.gate is not None and step.name not in forced:
                flops += self._flops[step.gate.piece]
                trace.decisions += 1
        trace.flops = flops
        trace.exit = self._exit_names[exit_index] if exit_index >= 0 else None
        trace.steps.append(StepRecord("program", "compiled", ms, n))
        return trace

    def _check_state(self, state: Optional[Mapping[str, Any]], n: int) -> Dict[str, Any]:
        ops = self.ops
        st = dict(state) if state is not None else self.initial_state(n)
        for spec in self.manifest.state:
            if spec.name not in st:
                raise InputError(f"state {spec.name!r} is missing")
            if isinstance(st[spec.name], np.ndarray):
                st[spec.name] = ops.from_host(np.ascontiguousarray(st[spec.name]))
            shape = tuple(ops.shape(st[spec.name]))
            want = (n,) + tuple(spec.shape[1:])
            if shape[:1] != (n,):
                raise InputError(f"state {spec.name!r} is not for a batch of {n}")
            if len(shape) != len(want) or any(isinstance(w, int) and w != g
                                              for g, w in zip(shape, want)):
                raise InputError(f"state {spec.name!r} has shape {shape}; this bundle carries "
                                 f"{want} (start from None, or pass the state a call returned)")
        return st

    def _classify_frames(self, x: np.ndarray, force: Force, budget: Union[str, float, None],
                         exit_at: Union[str, Sequence[Optional[str]], None], keep_values: bool,
                         state: Optional[Mapping[str, Any]], exits: bool) -> Result:
        """A stream bundle fed a clip frame by frame; traces add up the frames."""
        frames: List[Result] = []
        for t in range(x.shape[2]):
            r = self._classify(np.ascontiguousarray(x[:, :, t:t + 1]), force, budget, exit_at,
                               keep_values, state, exits)
            state = r.state
            frames.append(r)
        traces = []
        for i in range(x.shape[0]):
            tr = Trace()
            for t, r in enumerate(frames):
                one = r.traces[i]
                tr.flops += one.flops
                tr.steps += one.steps
                tr.decisions += one.decisions
                tr.decision_ms += one.decision_ms
                tr.branches.update({f"{k}@{t}": v for k, v in one.branches.items()})
                tr.exit = one.exit
            traces.append(tr)
        return Result(scores=frames[-1].scores, traces=traces, values=frames[-1].values,
                      state=frames[-1].state)

    def classify_batches(self, clips: Any, batch: int,
                         exit_at: Union[str, Sequence[Optional[str]], None] = None,
                         **options: Any) -> Result:
        """``classify`` over ``clips`` in calls of ``batch`` clips; scores and traces in order.

        A per-clip ``exit_at`` is split with the clips. Values and state are not collected.
        """
        if batch < 1:
            raise InputError(f"batch must be at least 1, got {batch}")
        x = self.check_clips(clips)
        stops = None if exit_at is None or isinstance(exit_at, str) else list(exit_at)
        if stops is not None and len(stops) != len(x):
            raise InputError(f"exit_at holds {len(stops)} names for {len(x)} clips")
        scores, traces = [], []
        for start in range(0, len(x), batch):
            part = exit_at if stops is None else stops[start:start + batch]
            r = self._classify(x[start:start + batch], exit_at=part, **options)
            scores.append(r.scores)
            traces += r.traces
        return Result(scores=np.concatenate(scores), traces=traces)


MAX_CALL_CLIPS = 64     # more clips in one classify call run as calls of this many


class _Call:
    """One ``classify`` call over one batch: the program's values, the rows still running, and
    each clip's trace; one method per step kind."""

    def __init__(self, runtime: Runtime, x: np.ndarray, forced: Dict[str, int],
                 budget: Optional[str], exit_at: Optional[str],
                 per_clip_exit: Optional[np.ndarray], exits: bool, keep_values: bool,
                 state: Dict[str, Any]) -> None:
        self.rt = runtime
        self.ops = runtime.ops
        self.n = n = x.shape[0]
        self.forced = forced
        self.budget = budget
        self.exit_at = exit_at
        self.per_clip_exit = per_clip_exit
        self.exits = exits
        self.keep_values = keep_values
        self.values: Dict[str, Any] = {runtime.manifest.input["name"]: self.ops.from_host(x)}
        self.values.update(state)
        self.new_state = dict(state)
        self.traces = [Trace() for _ in range(n)]
        self.active = np.arange(n)            # original clip index of each row still running
        self.results: List[Optional[np.ndarray]] = [None] * n
        self.kept: Dict[str, np.ndarray] = {}

    def execute(self, program: Sequence[Step]) -> Result:
        for step in program:
            if len(self.active) == 0:
                break
            _METHODS[type(step)](self, step)
        return self.finish()

    # -- values -----------------------------------------------------------------------------
    def feed(self, mapping: Mapping[str, str], step: str) -> Dict[str, Any]:
        out = {}
        constants = self.rt.constants
        for k, v in mapping.items():
            arr = self.values.get(v)
            if arr is None:
                arr = constants.get(v)
            if arr is None:
                raise BundleError(f"program step {step!r} reads value {v!r} before any "
                                  "step writes it")
            out[k] = arr
        return out

    def shared(self, mapping: Mapping[str, str]) -> List[str]:
        """Inputs fed from constants: the same for every row, never split by row."""
        constants = self.rt.constants
        return [k for k, v in mapping.items() if v in constants and v not in self.values]

    def store(self, mapping: Mapping[str, str], outs: Mapping[str, Any]) -> None:
        for k, v in mapping.items():
            self.values[v] = outs[k]
            if self.keep_values:
                self.kept[v] = self.ops.to_host(outs[k])

    def decide(self, value: Any, what: str, count: int) -> np.ndarray:
        """Branch indices (of ``count`` branches) to the host: the one transfer a gate costs,
        timed per clip."""
        t0 = time.perf_counter()
        choice = self.ops.to_host(value).reshape(-1).astype(np.int64)
        ms = (time.perf_counter() - t0) * 1e3
        for row in self.active:
            self.traces[row].decision_ms += ms
            self.traces[row].decisions += 1
        if choice.shape[0] != len(self.active) or choice.min() < 0 or choice.max() >= count:
            raise BundleError(f"{what} holds branch indices {choice} outside 0..{count - 1}")
        return choice

    # -- steps ------------------------------------------------------------------------------
    def run(self, step: Run) -> None:
        outs = self.rt.run_piece(step.piece, step.name, self.feed(step.inputs, step.name),
                                 self.active, self.traces, self.shared(step.inputs))
        self.store(step.outputs, outs)

    def _branch(self, branch: Branch, step: str, feeds: Mapping[str, Any], rows: np.ndarray,
                shared: Sequence[str]) -> Dict[str, Any]:
        if branch.passes is not None:    # a branch that computes nothing forwards its inputs
            return {out: feeds[inp] for out, inp in branch.passes.items()}
        assert branch.piece is not None
        return self.rt.run_piece(branch.piece, step, feeds, rows, self.traces, shared)

    def switch(self, step: Switch) -> None:
        name, branches, ops = step.name, step.branches, self.ops
        feeds = self.feed(step.inputs, name)
        fixed = self.shared(step.inputs)
        if name in self.forced:
            choice = np.full(len(self.active), self.forced[name], dtype=np.int64)
        elif step.select is not None:
            choice = self.decide(self.feed({"select": step.select}, name)["select"],
                                 f"{name}.select", len(branches))
        else:
            gate = step.gate
            assert gate is not None
            gouts = self.rt.run_piece(gate.piece, name + ".gate", self.feed(gate.inputs, name),
                                      self.active, self.traces)
            choice = self.decide(gouts[gate.decision], f"{name}.decision", len(branches))
        for row, c in zip(self.active, choice):
            self.traces[row].branches[name] = branches[int(c)].name
        uniq = np.unique(choice)
        if len(uniq) == 1:
            outs = self._branch(branches[int(uniq[0])], name, feeds, self.active, fixed)
        else:
            parts: Dict[str, List[Any]] = {}
            for b in uniq:
                sel = np.nonzero(choice == b)[0]
                sub = {k: (v if k in fixed else ops.rows(v, sel)) for k, v in feeds.items()}
                part = self._branch(branches[int(b)], name, sub, self.active[sel], fixed)
                for k, v in part.items():
                    parts.setdefault(k, []).append((sel, v))
            outs = {k: ops.scatter(p, len(self.active)) for k, p in parts.items()}
        self.store(step.outputs, outs)

    def exit(self, step: Exit) -> None:
        name = step.name
        scores = self.ops.to_host(self.values[step.scores])
        if self.per_clip_exit is not None:
            done = self.per_clip_exit[self.active] == name
        elif self.exit_at is not None:
            done = np.full(len(self.active), self.exit_at == name)
        elif not self.exits:
            return
        else:
            key = self.budget if self.budget is not None else "default"
            if self.budget is not None and key not in step.thresholds:
                raise InputError(f"exit {name!r} has no thresholds for budget {self.budget!r}; "
                                 f"it has {', '.join(sorted(step.thresholds)) or 'none'} "
                                 f"{self.rt._calibrate_hint()}")
            if key not in step.thresholds:
                return
            done = step.leaves(exit_measure(scores, step.criterion), step.thresholds[key])
        if done.any():
            for row, s in zip(self.active[done], scores[done]):
                self.results[row] = s
                self.traces[row].exit = name
            keep = np.nonzero(~done)[0]
            self.active = self.active[keep]
            self.values = {k: self.ops.rows(v, keep) for k, v in self.values.items()}

    def carry(self, step: Carry) -> None:
        value = self.values[step.value]
        ops = self.ops
        if len(self.active) == self.n and ops.shape(value) == ops.shape(self.new_state[step.state]):
            self.new_state[step.state] = value     # pieces return fresh arrays: no copy
        else:
            self.new_state[step.state] = ops.put_rows(self.new_state[step.state], self.active,
                                                      value)

    def finish(self) -> Result:
        m = self.rt.manifest
        if len(self.active):
            final = self.values.get(m.output)
            if final is None:
                raise BundleError(f"program never writes its output value {m.output!r}")
            for row, s in zip(self.active, self.ops.to_host(final)):
                self.results[row] = s
        scores_out = np.stack([r for r in self.results if r is not None])
        return Result(scores=scores_out, traces=self.traces, values=self.kept,
                      state=self.new_state)


_METHODS: Dict[type, Callable[[_Call, Any], None]] = {
    Run: _Call.run, Switch: _Call.switch, Exit: _Call.exit, Carry: _Call.carry}


class Stream:
    """A batch of streams with carried state: each ``step(clips)`` continues from the last one."""

    def __init__(self, runtime: Runtime, batch: int = 1) -> None:
        self.runtime = runtime
        self.batch = batch
        self.state = runtime.initial_state(batch)

    def reset(self) -> None:
        self.state = self.runtime.initial_state(self.batch)

    def step(self, clips: Any, **kwargs: Any) -> Result:
        result = self.runtime.classify(clips, state=self.state, **kwargs)
        self.state = result.state
        return result


def load(bundle: Union[str, Path, Bundle], backend: Union[str, Backend] = "onnxruntime",
         progress: Progress = None, sync_steps: bool = False, path: str = "auto",
         **options: Any) -> Runtime:
    """Open a bundle on a backend (``"onnxruntime"`` by default; options go to the backend).

    ``sync_steps`` makes every step wait for the device, so that step times are device times
    (only matters for GPU backends, whose pieces run asynchronously). ``path``: ``"auto"`` runs
    one clip per call as the program compiled into one graph where the backend can
    (:mod:`.compile`) and batches piece by piece; ``"pieces"`` always piece by piece;
    ``"compiled"`` requires the compiled graph for single clips."""
    if not isinstance(backend, (str, Backend)):
        raise UsageError(f"backend must be a backend's name or a Backend, not "
                         f"{type(backend).__name__}")
    be = create_backend(backend, **options) if isinstance(backend, str) else backend
    if isinstance(bundle, Bundle):
        return Runtime(bundle, be, progress, sync_steps, path)
    with locked(bundle, exclusive=False):        # the manifest and its files of one moment
        return Runtime(load_bundle(bundle), be, progress, sync_steps, path)


def build(bundle: Union[str, Path, Bundle], backend: str = "onnxruntime",
          progress: Progress = None, **options: Any) -> Path:
    """Prepare the backend's engines into the bundle's cache; returns the cache folder."""
    be = create_backend(backend, **options)
    root = bundle.root if isinstance(bundle, Bundle) else Path(bundle)
    if not root.is_dir():
        load_bundle(root)                 # says what is wrong with it
    with locked(root, what="build"):      # one writer at a time; the manifest read under it
        b = load_bundle(root) if not isinstance(bundle, Bundle) else bundle
        return be.build(be.bundle_for(b), progress)


__all__ = ["Runtime", "Stream", "Result", "Trace", "StepRecord", "Force", "load", "build",
           "exit_measure"]
