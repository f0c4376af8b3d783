"""What a VA-RED² network's gates cost, in CPU time at one thread (robust to other processes'
load, unlike wall time): the static network as one graph, free gates that all take the full
branch, and every other frame or both halved forced everywhere, all at batch 1 as the demo runs.

    python benchmarks/bench_gate_cost.py [--frames 16] [--size 40] [--no-motion] [--reps 30]

A fresh network of the demo's shape (width 0.75, one block per stage, 9 classes, replicated
edges), its cheap operations the initial copies, every gate's bias set to choose the full branch
(beta 5), so "free" runs exactly the static network's convolutions plus the gates and the If
nodes of the compiled program. Times are process CPU time (time.process_time), medians,
configurations interleaved.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adaedge import models, runtime
from adaedge.export import export


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=40)
    p.add_argument("--no-motion", action="store_true", help="gates without the clip's motion")
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    m = models.create("vared_r2plus1d_18", num_classes=9, frames=args.frames, size=args.size,
                      width_mult=0.75, layers=[1, 1, 1, 1], temporal_padding="replicate",
                      gate_motion=not args.no_motion).eval()
    with torch.no_grad():
        for _, layer in m.dynamic_layers():
            layer.gate.beta[0] = 5.0                       # temporal: full
            layer.gate.beta[layer.search_space] = 5.0      # channels: all
    out = Path(tempfile.mkdtemp(prefix="adaedge-gates-")) / "b"
    export(m, out, weights={"source": "bench_gate_cost"})
    rt = runtime.load(out, threads=1)
    x = np.random.default_rng(0).standard_normal((1, 3, args.frames, args.size, args.size))
    x = x.astype(np.float32)
    configs = {"static": dict(force="static", graph=True), "free": {},
               "all-stride2": dict(force="all-stride2"), "cheapest": dict(force="cheapest")}
    assert set(rt.classify(x).traces[0].branches.values()) == {"R1-r1"}
    for c in configs.values():
        for _ in range(3):
            rt.classify(x, **c)
    times = {k: [] for k in configs}
    for _ in range(args.reps):
        for k, c in configs.items():
            t0 = time.process_time()
            rt.classify(x, **c)
            times[k].append(time.process_time() - t0)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    print(f"{args.frames}x{args.size}x{args.size}, gates {'without' if args.no_motion else 'with'}"
          " the clip's motion, CPU ms per clip at 1 thread:")
    for k, v in med.items():
        print(f"  {k:<12} {v:7.2f} ms  {v / med['static']:.3f}x static")
    return 0


if __name__ == "__main__":
    sys.exit(main())
