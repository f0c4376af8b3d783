"""AdaFocusV3 on ONNX Runtime: early exit under calibrated budgets, against all cubes and random exits.

    python benchmarks/bench_adafocus.py [--clips 256] [--reps 10] [--plot curve.png] [--json]

Exports the shipped checkpoint (``adaedge/checkpoints/adafocus_v3_motion.pt``), calibrates exit
thresholds on the procedural validation split for the budgets of its model card, then on test
clips, at batch 1 and at batch 16, times interleaved in one process:

* ``all-cubes``: no exit taken, every clip runs the glance and every cube;
* ``budget-<GFLOPs>``: the calibrated thresholds of that budget;
* ``random-exit-<GFLOPs>``: each clip leaves at a random stage, with the same exit proportions.

Realisation = (1 - t / t_all) / (1 - F / F_all): the share of the FLOP saving that became time
(issue target: at least 0.85). It also reports top-1 of each configuration on the same clips, so
what the thresholds' choice of clips is worth shows beside the random exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


from adaedge import models, runtime
from adaedge.bench import bench, format_table
from adaedge.calibration.exits import calibrate_exits, load_data
from adaedge.export import export

CHECKPOINT = Path(__file__).resolve().parents[1] / "adaedge" / "checkpoints" / "adafocus_v3_motion.pt"


def accuracy(rt, clips, labels, **options) -> float:
    return float((rt.classify_batches(clips, 64, **options).labels == labels).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=256, help="test clips timed per repetition")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--plot", help="draw top-1 against GFLOPs (test clips) to this PNG")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    _, meta = models.read_checkpoint(CHECKPOINT)
    budgets = [float(r["budget"]) for r in meta["evaluation"]["rows"] if r["budget"] != "all-cubes"]
    work = Path(tempfile.mkdtemp(prefix="adaedge-bench-focus-"))
    model = models.load_model(CHECKPOINT).eval()
    export(model, work / "b", labels=meta.get("labels"), weights={"source": "checkpoint"})
    options = {"threads": args.threads} if args.threads else {}
    rt = runtime.load(work / "b", **options)
    val_x, val_y = load_data("motion:val:1000", rt)
    calibrate_exits(work / "b", val_x, val_y, budgets)
    rt = runtime.load(work / "b", **options)
    x, y = load_data(f"motion:test:{args.clips}", rt)
    out = {"model": "adafocus_v3 (shipped checkpoint) 8x32x32", "clips": len(y), "runs": []}
    for batch in [int(b) for b in args.batches.split(",")]:
        report = bench(rt, batch=batch, reps=args.reps, warmup=args.warmup, clips=x)
        report.meta["threads"] = getattr(rt.backend, "threads", None)
        from adaedge.bench import exit_configs
        acc = {c.name: accuracy(rt, x, y, **c.options) for c in exit_configs(rt, x)}
        out["runs"].append({"batch": batch, "report": report.to_json(), "top1": acc})
        if not args.json:
            print(f"batch {batch}, {len(y)} test clips, onnxruntime "
                  f"{report.meta.get('onnxruntime')}, {report.meta['threads']} threads, "
                  f"{report.meta.get('cpu', '?')}")
            print(format_table(report))
            print("top-1 on these clips: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
            print()
    if args.plot:
        from adaedge.plot import line_plot
        run = out["runs"][0]
        cfg = {c["name"]: c for c in run["report"]["configs"]}
        bud = sorted((c["gflops"], run["top1"][n]) for n, c in cfg.items() if n.startswith("budget"))
        rnd = sorted((c["gflops"], run["top1"][n]) for n, c in cfg.items() if n.startswith("random"))
        allc = cfg["all-cubes"]
        line_plot(args.plot, [
            ("calibrated budgets", [b[0] for b in bud], [b[1] for b in bud], (200, 90, 20), True),
            ("random exits, same proportions", [r[0] for r in rnd], [r[1] for r in rnd],
             (40, 40, 200), True),
            ("all cubes", [allc["gflops"]], [run["top1"]["all-cubes"]], (120, 120, 120), False)],
            f"AdaFocusV3, {len(y)} test clips", "mean GFLOPs per clip", "top-1")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
