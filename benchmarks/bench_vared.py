"""VA-RED² R(2+1)D-18 on ONNX Runtime: realised speed-up of the static pieces, in one process.

    python benchmarks/bench_vared.py [--batch 1] [--reps 30] [--threads N] [--json]

Exports R(2+1)D-18 (random weights, seed 0) at 8x112x112 twice: as adaedge's static pieces and as
the papers' masked execution (every branch computes all filters and frames, then keeps its part).
Gates are set to always choose the full branch, so ``free`` measures what running the gates costs.
Then, interleaved in one process on the same clips, it times:

* ``static``: every gate forced to the full branch (the static network, no gates);
* ``all-half``, ``all-stride2``, ``cheapest``: adaedge's pieces under those policies;
* ``free``: gates run (and choose full);
* ``masked-all-half``, ``masked-all-stride2``, ``masked-cheapest``: the masked execution.

It prints the table, the realisation of each policy against ``static``, the cost of the gates, and
how much faster the static pieces are than masked execution. Weights do not change the timing of a
forced policy; they only decide what free gates choose.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from adaedge import models, runtime
from adaedge.bench import Config, print_report, profile_breakdown, random_clips, run_configs
from adaedge.export import export


def gates_always_full(model: torch.nn.Module) -> None:
    """Make every gate choose R=1, r=1 whatever the clip (its pieces still run)."""
    with torch.no_grad():
        for _, layer in model.dynamic_layers():
            gate = layer.gate
            gate.fc2.weight.zero_()
            gate.beta.fill_(-1.0)
            gate.beta[0] = 1.0
            gate.beta[gate.temporal_choices] = 1.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--workdir", type=Path, default=None, help="keep the bundles here")
    p.add_argument("--path", choices=["auto", "pieces", "compiled"], default="auto",
                   help="auto: batch 1 runs the compiled program, batches the pieces")
    p.add_argument("--breakdown", action="store_true",
                   help="also profile each configuration: ms per clip by category")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="adaedge-bench-"))
    torch.manual_seed(0)
    model = models.create("vared_r2plus1d_18", num_classes=400, frames=args.frames,
                          size=args.size).eval()
    gates_always_full(model)
    t0 = time.perf_counter()
    for execution in ("dynamic", "masked"):
        out = work / execution
        if not (out / "manifest.json").is_file():
            export(model, out, execution=execution, weights={"source": "random", "seed": 0})
            runtime.build(out, threads=args.threads) if args.threads else runtime.build(out)
    print(f"exported and built in {time.perf_counter() - t0:.1f}s under {work}", file=sys.stderr)
    options = {"threads": args.threads} if args.threads else {}
    dynamic = runtime.load(work / "dynamic", path=args.path, **options)
    masked = runtime.load(work / "masked", path=args.path, **options)
    configs = [Config("static", dynamic, "static"), Config("all-half", dynamic, "all-half"),
               Config("all-stride2", dynamic, "all-stride2"), Config("cheapest", dynamic, "cheapest"),
               Config("free", dynamic, None),
               Config("masked-all-half", masked, "all-half"),
               Config("masked-all-stride2", masked, "all-stride2"),
               Config("masked-cheapest", masked, "cheapest"),
               Config("plain-graph", dynamic, "static", {"graph": True})]
    clips = random_clips(dynamic, args.batch, seed=0)
    report = run_configs(configs, clips, reps=args.reps, warmup=args.warmup)
    if args.breakdown:
        for cfg, result in zip(configs, report.configs):
            if not cfg.name.startswith("masked"):
                result.breakdown = profile_breakdown(cfg, clips, args.batch, reps=3)
    report.meta["threads"] = dynamic.backend.threads  # type: ignore[attr-defined]
    report.meta["model"] = f"vared_r2plus1d_18 {args.frames}x{args.size}x{args.size}"
    static = report.get("static")
    free = report.get("free")
    summary = {"gate_overhead": free.median_ms / static.median_ms - 1.0,
               "static_over_plain_graph": static.median_ms / report.get("plain-graph").median_ms}
    for pol in ("all-half", "all-stride2", "cheapest"):
        summary[f"masked_over_static_pieces:{pol}"] = (report.get(f"masked-{pol}").median_ms
                                                       / report.get(pol).median_ms)
    print_report(report, summary, args.json)
    if args.json:
        return 0
    print(f"free gates (always choosing full) vs static: {summary['gate_overhead'] * 100:+.1f}%")
    print(f"static (path {args.path}) vs the static network as one graph: "
          f"{(summary['static_over_plain_graph'] - 1) * 100:+.1f}%")
    for pol in ("all-half", "all-stride2", "cheapest"):
        ratio = summary[f"masked_over_static_pieces:{pol}"]
        print(f"{pol}: masked execution takes {ratio:.2f}x the time of adaedge's static pieces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
