"""VA-RED² R(2+1)D-18 on a CUDA GPU: realised speed-up of the static pieces, in one process.

    python benchmarks/bench_gpu.py [--backend torch-cuda] [--batch 1 16] [--reps 50] [--json]

Exports R(2+1)D-18 (random weights, seed 0, gates set to choose the full branch) at 8x112x112 and
times, interleaved in one process on the same clips, on the chosen GPU backend:

* ``static`` (every gate forced to the full branch), ``all-half``, ``all-stride2``, ``cheapest``;
* ``free``: the gates run and their decisions come to the host (they choose full, so ``free``
  against ``static`` is what deciding costs); the ``decide ms`` column is the wall time the host
  waits for the decisions, per clip.

Realisation = (1 - t_policy / t_static) / (1 - FLOPs_policy / FLOPs_static). The issue's target is
at least 0.8 for all-half and all-stride2 at batch 1 and 16 on torch-cuda. The script records the
GPU, PyTorch, CUDA and cuDNN versions with the figures. Without a CUDA GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from adaedge import models, runtime
from adaedge.bench import Config, format_table, random_clips, run_configs
from adaedge.export import export
from adaedge.runtime import BackendUnavailable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vared import gates_always_full  # noqa: E402


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="torch-cuda", choices=["torch-cuda", "tensorrt", "torch-cpu"],
                   help="torch-cpu only checks that the script runs where no GPU is present")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--precision", default="fp32", help="tensorrt only")
    p.add_argument("--no-cuda-graphs", action="store_true", help="torch-cuda only")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    options: Dict[str, Any] = {}
    if args.backend == "torch-cuda" and args.no_cuda_graphs:
        options["cuda_graphs"] = False
    if args.backend == "tensorrt":
        options.update(precision=args.precision, max_batch=max(args.batch))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="adaedge-gpu-"))
    torch.manual_seed(0)
    model = models.create("vared_r2plus1d_18", num_classes=400, frames=args.frames,
                          size=args.size).eval()
    gates_always_full(model)
    out = work / "dynamic"
    if not (out / "manifest.json").is_file():
        export(model, out, weights={"source": "random", "seed": 0})
    try:
        t0 = time.perf_counter()
        rt = runtime.load(out, args.backend, **options)
    except BackendUnavailable as e:
        print(f"bench_gpu: {e}", file=sys.stderr)
        return 2
    print(f"loaded on {args.backend} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    device = rt.backend.device_info()  # type: ignore[attr-defined]
    reports: List[Dict[str, Any]] = []
    for batch in args.batch:
        configs = [Config(n, rt, None if n == "free" else n)
                   for n in ("static", "all-half", "all-stride2", "cheapest", "free")]
        clips = random_clips(rt, batch, seed=0)
        report = run_configs(configs, clips, reps=args.reps, warmup=args.warmup)
        report.meta.update(backend=args.backend, device=device, model="vared_r2plus1d_18",
                           frames=args.frames, size=args.size)
        reports.append(report.to_json())
        if not args.json:
            print(format_table(report))
            print()
    if args.json:
        print(json.dumps({"reports": reports}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
