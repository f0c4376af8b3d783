"""Each branch of a VA-RED² checkpoint forced at every gate: top-1 overall and per class, before
and after teaching the channel fills locally (``adaedge.training.vared.fit_channel_fills``).

    python benchmarks/bench_branches.py [--checkpoint CKPT] [--clips 135] [--fit-clips 128] [--json]

What it answers: can a branch serve clips on its own? "Every other frame" with the fill as a copy
is exact on still clips (edge-replicating temporal padding) and wrong on moving ones; the channel
branch depends on how well the cheap fill rebuilds the missing maps, which the local least-squares
fit measures as R^2 per layer. PyTorch on the CPU, the test split of the camera data set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from adaedge import models
from adaedge.demo import DEMO_CHECKPOINT
from adaedge.training.vared import (TrainConfig, branch_accuracy, classes, clips_uint8,
                                    fit_channel_fills)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    p.add_argument("--clips", type=int, default=135, help="test clips (a multiple of 9)")
    p.add_argument("--fit-clips", type=int, default=128, help="training clips for the fit")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    model = models.load_model(args.checkpoint).eval()
    cfg = TrainConfig(frames=model.frames, size=model.size)
    names = classes(cfg)
    x, y = clips_uint8(cfg, "test", args.clips)
    before = branch_accuracy(model, x, y, names)
    xt, _ = clips_uint8(cfg, "train", args.fit_clips)
    r2 = fit_channel_fills(model, xt, clips=args.fit_clips, log=lambda s: None)
    after = branch_accuracy(model, x, y, names)
    report = {"checkpoint": str(args.checkpoint), "clips": args.clips, "before": before,
              "fills_r2": r2, "after_local_fills": after, "torch": torch.__version__}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{'branch':<10} {'top-1':>6} {'after local fills':>18}")
    for b in before:
        print(f"{b:<10} {before[b]['all']:>6.3f} {after[b]['all']:>18.3f}")
    print("per class (after):")
    for b, row in after.items():
        print(f"  {b:<10} " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "all"))
    print("channel fill R^2 per layer: " + ", ".join(f"{k} {v:.2f}" for k, v in r2.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
