"""The kinds of int8 form against each other on this processor: one bundle calibrated in each kind
(``adaedge calibrate int8 B --form KIND``), their static networks and free gates timed
interleaved in one process on the same clips, with the float static network as the reference.

    python benchmarks/bench_int8_forms.py B_u8s8-7bit B_u8s8 [B_u8u8 ...] [--threads 1] [--reps 20]

Each bundle must hold int8 forms (of the kind its manifest records); the first bundle's float
pieces are the reference. Prints the processor class: timings belong to it (emulated processors
time nothing meaningful). Full-range forms are refused on x86 without VNNI, so there they cannot
be timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaedge import runtime
from adaedge.bench import Config, print_report, random_clips, run_configs
from adaedge.runtime.processor import processor_class


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    options = {"threads": args.threads} if args.threads else {}
    fp = runtime.load(args.bundles[0], **options)
    configs = [Config("fp32-static", fp, "static")]
    for b in args.bundles:
        q = runtime.load(b, precision="int8", **options)
        kind = q.bundle.base.manifest.int8.kind
        configs += [Config(f"{kind}-static", q, "static"), Config(f"{kind}-free", q, None)]
    clips = random_clips(fp, 1, seed=0)
    report = run_configs(configs, clips, reps=args.reps, warmup=args.warmup,
                         reference="fp32-static")
    report.meta["processor"] = processor_class()
    m = fp.manifest
    report.meta["model"] = f"{m.model.get('name')} {'x'.join(map(str, m.clip_shape[1:]))}"
    report.meta["threads"] = fp.backend.threads  # type: ignore[attr-defined]
    ref = report.get("fp32-static").median_ms
    summary = {f"speedup:{c.name}": ref / report.get(c.name).median_ms for c in configs[1:]}
    print_report(report, summary, args.json)
    if not args.json:
        print(f"processor {processor_class()}; speed-up over fp32 static: " + ", ".join(
            f"{k.split(':', 1)[1]} {v:.2f}x" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
