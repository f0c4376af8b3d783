"""adaedge's main job on the embedded default (ONNX Runtime on the CPU), end to end:

1. build VA-RED² R(2+1)D-18 (random weights, seed 0: no trained checkpoint ships yet),
2. export it at 8x112x112 into a bundle of static ONNX pieces (one per branch of each of its 37
   dynamic convolutions, their gates, the head),
3. build ONNX Runtime's optimised graphs into the bundle's engine cache,
4. verify the runtime against the PyTorch reference (free gates and every branch forced),
5. benchmark the static network against the all-half, all-stride2 and cheapest policies.

    python examples/quickstart.py [--out DIR [--overwrite]] [--reps 10]

The bundle (about 780 MB) goes into adaedge's cache, ``~/.cache/adaedge/bundles/quickstart-
vared_r2plus1d_18`` (``$ADAEDGE_CACHE`` moves it), replacing the quickstart's own earlier one;
``--out DIR`` writes it there instead (an existing bundle only with ``--overwrite``). It says
where at the start.

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
from adaedge.demo import cache_dir
from adaedge.errors import AdaedgeError
from adaedge.export import export
from adaedge.verify import verify


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="bundle folder (default: in adaedge's cache, "
                                             "~/.cache/adaedge/bundles/quickstart-...)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--reps", type=int, default=10, help="benchmark repetitions")
    args = p.parse_args(argv)
    overwrite = args.overwrite
    if args.out is None:         # the quickstart's own folder in the cache: replaced each run
        args.out = cache_dir() / "bundles" / "quickstart-vared_r2plus1d_18"
        overwrite = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing the bundle (about 780 MB) into {args.out}"
          + (" (replacing the earlier one)" if overwrite and args.out.exists() else ""))

    t0 = time.perf_counter()
    seed = 0
    torch.manual_seed(seed)
    model = models.create("vared_r2plus1d_18", num_classes=400, frames=8, size=112)
    print(f"[1/5] VA-RED² R(2+1)D-18: {len(model.dynamic_layers())} dynamic convolutions, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    try:
        manifest = export(model, args.out, weights={"source": "random", "seed": seed},
                          overwrite=overwrite, progress=ProgressBar("[2/5] export"))
    except AdaedgeError as e:
        print(f"quickstart: error: {e}", file=sys.stderr)
        return 2
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
