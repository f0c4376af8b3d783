"""TAda2D on ONNX Runtime: what calibration costs, adaedge's form against the official one.

    python benchmarks/bench_tada.py [--batch 1] [--reps 20] [--size 224] [--threads N] [--json]

Exports TAda2D-ResNet-50 (random weights, seed 0; 8 frames at 224x224 by default) four ways and
times them interleaved in one process on the same clips:

* ``tada2d``: adaedge's export: calibration as a per-frame, per-channel multiply on the
  convolution's input (the ``CalibratedConv`` node, run through its standard-op body), the
  routing function fused into each block's piece;
* ``tada2d-separate-routing``: the same with each routing function as a piece of its own;
* ``official-formulation``: the official code's form: per-clip, per-frame weights built at run
  time and one grouped convolution with the batch folded into the groups (batch 1 only);
* ``uncalibrated``: the same network with alpha fixed at 1 and no routing function: the lower
  bound.

It prints each one's latency over the lower bound's (issue target for ``tada2d``: at most 1.15).
Weights do not change the timing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from adaedge import models, runtime
from adaedge.bench import Config, print_report, random_clips, run_configs
from adaedge.export import export

FORMS = {"tada2d": ("calibrated", "fused"),
         "tada2d-separate-routing": ("calibrated", "separate"),
         "official-formulation": ("official", "fused"),
         "uncalibrated": ("uncalibrated", "fused")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--workdir", type=Path, default=None, help="keep the bundles here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="adaedge-bench-tada-"))
    torch.manual_seed(0)
    model = models.create("tada2d", depth=args.depth, num_classes=400, frames=args.frames,
                          size=args.size).eval()
    forms = dict(FORMS)
    if args.batch != 1:  # the official formulation's grouped convolution is built for one clip
        forms.pop("official-formulation")
    t0 = time.perf_counter()
    options = {"threads": args.threads} if args.threads else {}
    runtimes = {}
    for name, (execution, routing) in forms.items():
        out = work / name
        if not (out / "manifest.json").is_file():
            export(model, out, execution=execution, options={"routing": routing},
                   weights={"source": "random", "seed": 0})
            runtime.build(out, **options)
        runtimes[name] = runtime.load(out, **options)
    print(f"exported and built in {time.perf_counter() - t0:.1f}s under {work}", file=sys.stderr)
    configs = [Config(name, rt, None) for name, rt in runtimes.items()]
    clips = random_clips(runtimes["tada2d"], args.batch, seed=0)
    report = run_configs(configs, clips, reps=args.reps, warmup=args.warmup,
                         reference="uncalibrated")
    report.meta["threads"] = runtimes["tada2d"].backend.threads  # type: ignore[attr-defined]
    report.meta["model"] = f"tada2d depth {args.depth} {args.frames}x{args.size}x{args.size}"
    lower = report.get("uncalibrated").median_ms
    summary = {f"{c.name}/uncalibrated": c.median_ms / lower for c in report.configs
               if c.name != "uncalibrated"}
    print_report(report, summary, args.json)
    if args.json:
        return 0
    for key, ratio in summary.items():
        print(f"{key}: {ratio:.3f}x the lower bound's latency")
    return 0


if __name__ == "__main__":
    sys.exit(main())
