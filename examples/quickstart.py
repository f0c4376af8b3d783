"""adaedge's main job on the embedded default (ONNX Runtime on the CPU), end to end:

1. build VA-RED² R(2+1)D-18 (random weights, seed 0: no trained checkpoint ships yet),
2. export it at 8x112x112 into a bundle of static ONNX pieces (one per branch of each of its 37
   dynamic convolutions, their gates, the head),
3. build ONNX Runtime's optimised graphs into the bundle's engine cache,
4. verify the runtime against the PyTorch reference (free gates and every branch forced),
5. benchmark the static network against the all-half, all-stride2 and cheapest policies.

    python examples/quickstart.py [--out bundles/vared_r2plus1d_18] [--reps 10]

The same with the command line: adaedge export vared_r2plus1d_18 --random-weights --out DIR &&
adaedge build DIR && adaedge verify DIR && adaedge bench DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from adaedge import models, runtime
from adaedge.bench import bench, format_table
from adaedge.cli import ProgressBar
from adaedge.export import export
from adaedge.verify import verify


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bundles/vared_r2plus1d_18"))
    p.add_argument("--reps", type=int, default=10, help="benchmark repetitions")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    seed = 0
    torch.manual_seed(seed)
    model = models.create("vared_r2plus1d_18", num_classes=400, frames=8, size=112)
    print(f"[1/5] VA-RED² R(2+1)D-18: {len(model.dynamic_layers())} dynamic convolutions, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    manifest = export(model, args.out, weights={"source": "random", "seed": seed},
                      overwrite=True, progress=ProgressBar("[2/5] export"))
    print(f"[2/5] bundle {args.out}: {len(manifest.pieces)} static ONNX pieces")
    runtime.build(args.out, progress=ProgressBar("[3/5] build"))
    report = verify(args.out, clips=1, progress=ProgressBar("[4/5] verify"))
    for case in report.cases:
        print(f"[4/5] {'ok  ' if case.ok else 'FAIL'} {case.name}: max relative error "
              f"{case.max_rel_error:.1e} (tolerance {report.rtol:g})")
    if not report.ok:
        print("verification failed", file=sys.stderr)
        return 1
    rt = runtime.load(args.out)
    result = bench(rt, reps=args.reps, configs=("static", "all-half", "all-stride2", "cheapest"),
                   progress=ProgressBar("[5/5] bench"))
    print(format_table(result))
    print(f"done in {time.perf_counter() - t0:.0f}s. Realisation = share of the FLOP saving that "
          "became time; see benchmarks/RESULTS.md for the recorded figures.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
