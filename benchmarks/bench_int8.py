"""VA-RED² R(2+1)D-18 in int8 (explicit Q/DQ) against float, on ONNX Runtime's CPU, in one process.

    python benchmarks/bench_int8.py [--threads 1] [--batch 1] [--reps 10] [--workdir DIR] [--json]
    python benchmarks/bench_int8.py --bundle DIR [--data camera:test:64] ...   # a bundle with int8 forms

Exports R(2+1)D-18 (random weights, seed 0, every gate choosing the full branch, as
``bench_vared.py``) at 8x112x112, writes its int8 forms with ``calibrate_int8`` (on
``--calib-clips`` random clips; a branch no clip chose is calibrated on clips forced through it),
then times, interleaved in one process on the same clips:

* ``fp32-static``: the float static network (every gate forced to the full branch);
* ``int8-static``: the int8 static network, the reference of the int8 realisations;
* ``int8-all-half``, ``int8-all-stride2``, ``int8-cheapest``: the int8 pieces under those policies;
* ``int8-free``, ``fp32-free``: the gates run (and choose; in the exported R(2+1)D-18, full).

It prints the table (realisation against ``int8-static``), the int8 static network's speed-up
over the float one, and the targets. Weights and calibration data do not change the timing of a
forced policy (they only set the scales); random clips are used so nothing is downloaded.
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
from adaedge.bundle import load as load_bundle
from adaedge.calibration.int8 import calibrate_int8
from adaedge.export import export
from adaedge.runtime.processor import processor_class

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vared import gates_always_full  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--calib-clips", type=int, default=8, help="calibration clips (default 8)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the bundle here")
    p.add_argument("--bundle", type=Path, default=None,
                   help="time this bundle's float and int8 forms instead (it must hold int8 forms: "
                        "'adaedge calibrate int8')")
    p.add_argument("--data", default=None,
                   help="with --bundle: time these clips (camera|motion[:split[:count]]; default: "
                        "--batch random clips)")
    p.add_argument("--for", dest="target", choices=["onnxruntime", "tensorrt"],
                   default="onnxruntime", help="the int8 forms' activations: onnxruntime "
                   "(uint8, asymmetric; default) or tensorrt (int8, symmetric)")
    p.add_argument("--form", choices=["u8s8-7bit", "u8s8", "u8u8", "s8s8-7bit", "s8s8"],
                   default=None, help="the int8 arithmetic (default: --for's default, 7-bit "
                   "weights); a bundle holding another kind is calibrated again")
    p.add_argument("--path", choices=["auto", "pieces", "compiled"], default="auto",
                   help="auto: batch 1 runs the compiled program, batches the pieces")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="adaedge-int8-bench-"))
    out = args.bundle or work / "dynamic"
    t0 = time.perf_counter()
    if args.bundle is None and not (out / "manifest.json").is_file():
        torch.manual_seed(0)
        model = models.create("vared_r2plus1d_18", num_classes=400, frames=args.frames,
                              size=args.size).eval()
        gates_always_full(model)
        export(model, out, execution="dynamic", weights={"source": "random", "seed": 0})
    forms = load_bundle(out).manifest.int8
    from adaedge.calibration.int8 import TARGET_FORMS
    form = args.form or TARGET_FORMS[args.target][0]
    if args.bundle is None and (forms is None or forms.calibration.get("target") != args.target
                                or forms.kind != form):
        calib = random_clips(load_bundle(out), args.calib_clips, seed=1)
        calibrate_int8(out, calib, data=f"{args.calib_clips} random clips, seed 1",
                       min_clips=args.calib_clips, target=args.target, form=form)
    elif args.bundle is not None and args.form and (forms is None or forms.kind != form):
        p.error(f"--bundle {args.bundle} holds {forms.kind if forms else 'no'} int8 forms, not "
                f"{form}: calibrate it with 'adaedge calibrate int8 --form {form}' first")
    print(f"bundle exported and calibrated in {time.perf_counter() - t0:.1f}s under {work}",
          file=sys.stderr)
    options = {"threads": args.threads} if args.threads else {}
    float_rt = runtime.load(out, path=args.path, **options)
    int8_rt = runtime.load(out, path=args.path, precision="int8", **options)
    configs = [Config("fp32-static", float_rt, "static"),
               Config("int8-static", int8_rt, "static"),
               Config("int8-all-half", int8_rt, "all-half"),
               Config("int8-all-stride2", int8_rt, "all-stride2"),
               Config("int8-cheapest", int8_rt, "cheapest"),
               Config("int8-free", int8_rt, None),
               Config("fp32-free", float_rt, None)]
    clips = random_clips(float_rt, args.batch, seed=0)
    if args.data:
        from adaedge.calibration.exits import load_data
        clips = load_data(args.data, float_rt)[0][:args.batch]
    report = run_configs(configs, clips, reps=args.reps, warmup=args.warmup,
                         reference="int8-static")
    report.meta["threads"] = float_rt.backend.threads  # type: ignore[attr-defined]
    m = int8_rt.bundle.base.manifest
    shape = "x".join(map(str, m.clip_shape[1:]))
    report.meta["model"] = (f"{m.model.get('name')} {shape}, {m.int8.kind} int8 forms for "
                            f"{m.int8.calibration.get('target')}")
    report.meta["processor"] = processor_class()
    fp, q = report.get("fp32-static"), report.get("int8-static")
    summary = {"int8_speedup_static": fp.median_ms / q.median_ms,
               "int8_speedup_free": report.get("fp32-free").median_ms /
               report.get("int8-free").median_ms,
               "int8_gate_overhead": report.get("int8-free").median_ms / q.median_ms - 1.0}
    for pol in ("all-half", "all-stride2", "cheapest"):
        summary[f"int8_realization:{pol}"] = report.get(f"int8-{pol}").realization
    print_report(report, summary, args.json)
    if args.json:
        return 0
    print(f"int8 static is {summary['int8_speedup_static']:.2f}x faster than fp32 static "
          f"(target: 2.5x at one thread, 2x at two)")
    print("realisation within int8 (against int8-static; target 0.85): " + ", ".join(
        f"{pol} {summary[f'int8_realization:{pol}']:.2f}"
        for pol in ("all-half", "all-stride2", "cheapest")))
    print(f"free gates: int8 {summary['int8_speedup_free']:.2f}x faster than fp32")
    print(f"int8 free gates vs int8 static: "
          f"{summary['int8_gate_overhead'] * 100:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
