"""AdaFuse on ONNX Runtime CPU, streaming at batch 1: gathered against dense against plain.

    python benchmarks/bench_adafuse.py [--reps 10] [--size 224] [--threads N] [--pool shared]
                                       [--mix 0.45,0.2,0.35] [--buckets 8] [--json]

Builds AdaFuse-TSN-ResNet-50 (8 frames at 224x224 by default; random weights, seed 0) and exports
it three ways as per-frame stream bundles, timed interleaved in one process on the same clip fed
one frame at a time:

* ``gathered``: each block computes only the first-convolution channels it keeps (and, late, the
  reused ones the previous frame did not compute), and its second convolution reads only the
  channels not skipped; bucketed static pieces;
* ``dense``: every channel computed, then combined by the decisions (the reference's arithmetic);
* ``plain``: the same network with no policy: the static baseline.

No trained AdaFuse ResNet-50 exists here, so the policy's last layer gets biases chosen (on this
clip) so that the decisions over all blocks, frames and channels follow ``--mix`` (skip, reuse,
keep); the default is near the savings the paper reports (about 40% of the FLOPs). Speed depends on
how many channels are used, not on what the network recognises.

Realisation = (1 - t_gathered / t_plain) / (1 - F / F_plain), with F the FLOPs of Eq. 5 (what the
policy saves, as the paper counts) and, beside it, the FLOPs the gathered pieces executed (Eq. 5
plus bucket padding). Issue target: at least 0.6.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np
import torch

from adaedge import models, runtime
from adaedge.bench import Config, print_report, run_configs
from adaedge.export import export
from adaedge.models.adafuse import AdaFuse


def set_mix(model: AdaFuse, clip: torch.Tensor, mix: List[float], rounds: int = 6) -> np.ndarray:
    """Random policy weights, then last-layer biases adjusted until the decisions on ``clip``
    follow ``mix`` (skip, reuse, keep); returns the mix reached."""
    g = torch.Generator().manual_seed(0)
    blocks = [b for b in model.base_model.blocks if b.policy_net is not None]
    bias = torch.zeros(3)
    with torch.no_grad():
        for b in blocks:
            fc0, fc1 = b.policy_net.gate_fc0, b.policy_net.gate_fc1
            fc0.weight.copy_(torch.randn(fc0.weight.shape, generator=g) * 4 / fc0.in_features ** .5)
            fc1.weight.copy_(torch.randn(fc1.weight.shape, generator=g) / fc1.in_features ** .5)
        reached = np.zeros(3)
        for _ in range(rounds):
            for b in blocks:
                b.policy_net.gate_fc1.bias.copy_(bias.repeat(b.policy_net.channels))
            d = torch.cat([x.flatten() for x in model.decisions(clip)])
            reached = np.bincount(d.numpy(), minlength=3) / d.numel()
            bias += torch.log(torch.tensor(mix) / torch.tensor(reached).clamp(min=1e-3)).float()
    return reached


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all)")
    p.add_argument("--pool", choices=["shared", "session"], default="shared",
                   help="onnxruntime thread pool: one for all pieces (default) or one per piece")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--shift", choices=["none", "online"], default="none",
                   help="TSN (default) or TSM with the online (causal) shift")
    p.add_argument("--mix", default="0.45,0.2,0.35", help="skip,reuse,keep shares to aim for")
    p.add_argument("--buckets", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=None, help="keep the bundles here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    mix = [float(v) for v in args.mix.split(",")]
    if len(mix) != 3 or abs(sum(mix) - 1) > 1e-6 or min(mix) <= 0:
        p.error("--mix takes three positive shares that add up to 1")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="adaedge-bench-adafuse-"))
    torch.manual_seed(0)
    name = "adafuse_tsn_r50" if args.shift == "none" else "adafuse_tsm_r50"
    model = models.create(name, num_classes=174, frames=args.frames, size=args.size,
                          shift=args.shift, hidden_dim=128).eval()
    clip = torch.randn(1, 3, args.frames, args.size, args.size,
                       generator=torch.Generator().manual_seed(1))
    reached = set_mix(model, clip, mix)
    eq5 = float(model.flops(clip)[0])
    plain_flops = float(model.plain_macs())
    t0 = time.perf_counter()
    options = {"threads": args.threads} if args.threads else {}
    runtimes = {}
    for form in ("gathered", "dense", "plain"):
        out = work / form
        export(model, out, execution=form, options={"stream": True, "buckets": args.buckets},
               weights={"source": "random", "seed": 0}, overwrite=True)
        runtimes[form] = runtime.load(out, pool=args.pool, **options)
    print(f"exported in {time.perf_counter() - t0:.1f}s under {work}", file=sys.stderr)
    configs = [Config(form, rt, None) for form, rt in runtimes.items()]
    report = run_configs(configs, clip.numpy(), reps=args.reps, warmup=args.warmup,
                         reference="plain")
    backend = runtimes["plain"].backend
    report.meta.update({"threads": getattr(backend, "threads", None),
                        "pool": getattr(backend, "pool", None),
                        "model": f"{name} {args.frames}x{args.size}x{args.size}, streamed frame "
                                 f"by frame, batch 1, buckets {args.buckets}"})
    t = {c.name: c.median_ms for c in report.configs}
    executed = report.get("gathered").gflops * 1e9
    summary = {
        "mix_skip_reuse_keep": [round(float(v), 3) for v in reached],
        "eq5_gflops_per_clip": eq5 / 1e9, "plain_gflops_per_clip": plain_flops / 1e9,
        "executed_gflops_per_clip": executed / 1e9,
        "ms_per_frame": {k: v / args.frames for k, v in t.items()},
        "realisation_eq5": (1 - t["gathered"] / t["plain"]) / (1 - eq5 / plain_flops),
        "realisation_executed": (1 - t["gathered"] / t["plain"]) / (1 - executed / plain_flops),
        "gathered_over_dense": t["gathered"] / t["dense"],
    }
    print_report(report, summary, args.json)
    if args.json:
        return 0
    print(f"decisions (skip, reuse, keep): {', '.join(f'{v:.3f}' for v in reached)}")
    print(f"FLOPs per clip: plain {plain_flops / 1e9:.2f} G, Eq. 5 {eq5 / 1e9:.2f} G "
          f"({100 * (1 - eq5 / plain_flops):.0f}% saved), gathered executed "
          f"{executed / 1e9:.2f} G (bucket padding included)")
    print("ms per frame: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["ms_per_frame"].items()))
    print(f"realisation (Eq. 5 FLOPs): {summary['realisation_eq5']:.2f}; "
          f"(executed FLOPs): {summary['realisation_executed']:.2f}; "
          f"gathered / dense time: {summary['gathered_over_dense']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
