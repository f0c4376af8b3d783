"""Soak: does memory stay flat over many calls? Resident memory while a bundle classifies
``--clips`` clips in calls of varied batch sizes (free gates, so the branches mix).

    python benchmarks/soak.py [--bundle DIR] [--clips 10000] [--every 1000] [--json]

Default bundle: the demo's (the shipped checkpoint, exported into the cache on first use).
Batch sizes are drawn from 1, 2, 3, 4, 8 and 16 (seeded); the clips are random (the gates still
choose per clip). Resident memory (``/proc/self/statm``) is read after every ``--every`` clips;
the first reading after warm-up (``--warmup`` clips, default 500) is the baseline. Prints the
readings and the growth after warm-up; exits 1 when it exceeds ``--limit-mb`` (default 50).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from adaedge import runtime


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="bundle folder (default: the demo's)")
    p.add_argument("--clips", type=int, default=10000)
    p.add_argument("--every", type=int, default=1000, help="read memory every N clips")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--limit-mb", type=float, default=50.0)
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.clips < 1 or args.every < 1 or args.warmup < 0 or args.warmup >= args.clips:
        p.error("need --clips >= 1, --every >= 1 and 0 <= --warmup < --clips")
    if args.bundle is None:
        from adaedge.demo import demo_bundle
        args.bundle = demo_bundle(log=lambda s: print(s, file=sys.stderr))
    options = {"threads": args.threads} if args.threads else {}
    rt = runtime.load(args.bundle, **options)
    shape = tuple(int(d) for d in rt.manifest.clip_shape)
    rng = np.random.default_rng(args.seed)
    sizes = [1, 2, 3, 4, 8, 16]
    pool = rng.standard_normal((32,) + shape).astype(np.float32)   # reused: no allocation growth
    readings: List[Dict[str, float]] = [{"clips": 0, "rss_mb": rss_mb()}]
    done, next_read, baseline = 0, args.every, None
    t0 = time.perf_counter()
    while done < args.clips:
        n = min(int(rng.choice(sizes)), args.clips - done)
        start = int(rng.integers(0, len(pool) - n + 1))
        rt.classify(pool[start:start + n])
        done += n
        if baseline is None and done >= args.warmup:
            baseline = {"clips": done, "rss_mb": rss_mb()}
        if done >= next_read or done == args.clips:
            readings.append({"clips": done, "rss_mb": rss_mb(),
                             "seconds": round(time.perf_counter() - t0, 1)})
            next_read += args.every
            if not args.json:
                print(f"{done:7d} clips  {readings[-1]['rss_mb']:8.1f} MB  "
                      f"{readings[-1]['seconds']:7.1f} s", flush=True)
    assert baseline is not None
    growth = readings[-1]["rss_mb"] - baseline["rss_mb"]
    peak = max(r["rss_mb"] for r in readings if r["clips"] >= baseline["clips"])
    out = {"bundle": str(args.bundle), "clips": args.clips, "baseline": baseline,
           "final_mb": round(readings[-1]["rss_mb"], 1), "peak_after_warmup_mb": round(peak, 1),
           "growth_mb": round(growth, 1), "limit_mb": args.limit_mb,
           "flat": growth <= args.limit_mb, "readings": readings,
           "machine": {"processor": platform.processor() or platform.machine(),
                       "python": platform.python_version(),
                       "onnxruntime": __import__("onnxruntime").__version__}}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"after warm-up ({baseline['clips']} clips): {baseline['rss_mb']:.1f} MB; final "
              f"{out['final_mb']} MB; peak {out['peak_after_warmup_mb']} MB; growth "
              f"{out['growth_mb']} MB (limit {args.limit_mb:g}): "
              f"{'flat' if out['flat'] else 'GROWING'}")
    return 0 if out["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
