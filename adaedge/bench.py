"""Latency of a bundle's policies against its static network, measured in one process, interleaved.

Configurations (names as ``adaedge bench --json`` prints them):

* ``static``: every gate forced to its full branch, no gates run: the static network;
* ``all-half``, ``all-stride2``, ``cheapest``: the bundle's forced policies of those names;
* ``free``: the gates choose.

A bundle without gates has only ``static``, its one path. A bundle with exit steps (AdaFocusV3)
has ``all-cubes`` (no exit taken), ``budget-<GFLOPs>`` for each threshold set stored in it, and
``random-exit-<GFLOPs>``: each clip leaves at a random stage, with the exit proportions its budget
showed on the same clips (what the thresholds' choice of *which* clips leave is worth).

Each repetition runs every configuration once, in a shuffled order, on the same clips, so that
drifts of a noisy machine fall on all of them alike. Realisation is the share of the FLOP saving
that became time: ``(1 - t_policy / t_static) / (1 - F_policy / F_static)`` (``None`` when the
policy saves no FLOPs).

This module never imports torch.
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .bundle import Bundle
from .errors import InputError, UsageError
from .progress import Progress
from .runtime.interpreter import Force, Runtime

DEFAULT_CONFIGS = ("static", "all-half", "all-stride2", "cheapest", "free")


@dataclass
class Config:
    """One thing to time: a runtime, the policy it runs under, and other ``classify`` arguments
    (``exit_at`` may hold one exit name per benchmark clip)."""

    name: str
    runtime: Runtime
    force: Force = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ConfigResult:
    name: str
    gflops: float
    median_ms: float
    p90_ms: float
    clips_per_s: float
    realization: Optional[float] = None
    samples_ms: List[float] = field(default_factory=list)
    decisions: float = 0.0       # gate decisions brought to the host, per clip
    decision_ms: float = 0.0     # their wall time per clip (median over repetitions)
    limit_ms: Optional[float] = None   # t_reference x F / F_reference: every saved FLOP saved time
    breakdown: Optional[Dict[str, float]] = None   # ms per clip by category (--breakdown)

    def to_json(self) -> Dict[str, Any]:
        out = {"name": self.name, "gflops": round(self.gflops, 4),
               "median_ms": round(self.median_ms, 3), "p90_ms": round(self.p90_ms, 3),
               "clips_per_s": round(self.clips_per_s, 3),
               "realization": None if self.realization is None else round(self.realization, 3),
               "limit_ms": None if self.limit_ms is None else round(self.limit_ms, 3),
               "decisions": round(self.decisions, 3), "decision_ms": round(self.decision_ms, 4)}
        if self.breakdown is not None:
            out["breakdown"] = {k: round(v, 4) for k, v in self.breakdown.items()}
        return out


@dataclass
class BenchReport:
    batch: int
    reps: int
    configs: List[ConfigResult]
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"configs": [c.to_json() for c in self.configs], "batch": self.batch,
                "reps": self.reps, "meta": self.meta}

    def get(self, name: str) -> ConfigResult:
        for c in self.configs:
            if c.name == name:
                return c
        raise KeyError(name)


def realization(t_policy: float, t_static: float, f_policy: float, f_static: float) -> Optional[float]:
    saved = 1.0 - f_policy / f_static
    if saved <= 1e-9:
        return None
    return (1.0 - t_policy / t_static) / saved


def exit_budgets(runtime: Runtime) -> List[str]:
    """The budgets whose thresholds every exit step holds ('default' aside), cheapest first."""
    return runtime.manifest.exit_budgets()


def exit_configs(runtime: Runtime, clips: np.ndarray, seed: int = 0,
                 budgets: Optional[Sequence[str]] = None) -> List[Config]:
    """``all-cubes``, then ``budget-<key>`` and ``random-exit-<key>`` for each stored budget.

    The random exits are drawn once: the budget's run on ``clips`` gives how many clips leave at
    each stage, and those counts are dealt to the clips in a random order.
    """
    configs = [Config("all-cubes", runtime, None, {"exits": False})]
    rng = np.random.default_rng(seed)
    for key in (budgets if budgets is not None else exit_budgets(runtime)):
        result = runtime.classify(clips, budget=key)
        stops = np.array([t.exit for t in result.traces], dtype=object)
        configs.append(Config(f"budget-{key}", runtime, None, {"budget": key}))
        configs.append(Config(f"random-exit-{key}", runtime, None,
                              {"exit_at": list(stops[rng.permutation(len(stops))])}))
    return configs


def standard_configs(runtime: Runtime, names: Sequence[str] = DEFAULT_CONFIGS) -> List[Config]:
    """The named configurations a bundle supports (policies it lacks are skipped, static first).

    A bundle without gates (TAda2D) has one configuration, ``static``: its only path. (Bundles
    with exit steps: :func:`exit_configs`.)
    """
    if not runtime.manifest.switches():
        return [Config("static", runtime, None)]
    out = []
    for name in names:
        if name == "free":
            out.append(Config("free", runtime, None))
        elif name in runtime.manifest.policies:
            out.append(Config(name, runtime, name))
    return out


def plain_config(runtime: Runtime) -> Optional[Config]:
    """``plain-graph``: the static network exported as one graph (every layer full, no gates), the
    graph a user would get from exporting the static model: what our pieces are compared with.
    None where the bundle has no static policy or needs state or exits."""
    m = runtime.manifest
    if m.state or m.exits() or not runtime.backend.runs_graphs or \
            (m.switches() and "static" not in m.policies):
        return None
    return Config("plain-graph", runtime, "static" if m.switches() else None, {"graph": True})


def run_configs(configs: Sequence[Config], clips: np.ndarray, reps: int = 20, warmup: int = 2,
                seed: int = 0, reference: str = "static", progress: Progress = None,
                batch: Optional[int] = None) -> BenchReport:
    """Time each configuration ``reps`` times, interleaved; realisation against ``reference``.

    One repetition of a configuration runs all ``clips`` in calls of ``batch`` clips (default:
    all at once); times and FLOPs are per clip, averaged over the clips.
    """
    if not configs:
        raise UsageError("nothing to benchmark")
    if reps < 1 or warmup < 0:
        raise UsageError("reps must be >= 1 and warmup >= 0")
    total_clips = int(clips.shape[0])
    batch = int(batch or total_clips)
    if not 1 <= batch <= total_clips:
        raise UsageError(f"batch {batch} must be between 1 and the {total_clips} clips")
    order = list(range(len(configs)))
    rng = random.Random(seed)
    times: Dict[int, List[float]] = {i: [] for i in order}
    flops: Dict[int, float] = {}
    decisions: Dict[int, float] = {}
    decision_ms: Dict[int, List[float]] = {i: [] for i in order}
    total = (warmup + reps) * len(configs)
    done = 0
    for rep in range(warmup + reps):
        rng.shuffle(order)
        for i in order:
            cfg = configs[i]
            t0 = time.perf_counter()
            result = cfg.runtime.classify_batches(clips, batch, force=cfg.force, **cfg.options)
            elapsed = time.perf_counter() - t0
            if rep >= warmup:
                times[i].append(elapsed)
                decision_ms[i].append(sum(t.decision_ms for t in result.traces) / total_clips)
            flops[i] = sum(t.flops for t in result.traces) / total_clips
            decisions[i] = sum(t.decisions for t in result.traces) / total_clips
            done += 1
            if progress:
                progress(done, total, cfg.name)
    results = []
    for i, cfg in enumerate(configs):
        per_clip = np.asarray(times[i]) * 1e3 / total_clips
        med = float(np.median(per_clip))
        results.append(ConfigResult(cfg.name, flops[i] / 1e9, med,
                                    float(np.percentile(per_clip, 90)), 1e3 / med,
                                    samples_ms=[float(v) for v in per_clip],
                                    decisions=decisions[i],
                                    decision_ms=float(np.median(decision_ms[i]))))
    ref = next((r for r in results if r.name == reference), None)
    if ref is not None:
        for r in results:
            r.limit_ms = ref.median_ms * r.gflops / ref.gflops if ref.gflops else None
            if r is not ref:
                r.realization = realization(r.median_ms, ref.median_ms, r.gflops, ref.gflops)
    return BenchReport(batch, reps, results, meta=machine_info())


def machine_info() -> Dict[str, Any]:
    from .runtime.processor import detected_class
    # the instruction-set class CPUID reports (what the kernels were chosen by; under emulation
    # /proc/cpuinfo names the host's processor, CPUID the emulated one)
    info: Dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version(),
                            "cpus": os.cpu_count(), "instruction_set": detected_class()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def random_clips(runtime: Union[Runtime, Bundle], batch: int, seed: int = 0) -> np.ndarray:
    """``batch`` standard-normal clips of the bundle's full clip shape (only the manifest is
    read: a runtime or a bundle)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal([batch] + runtime.manifest.full_clip_shape).astype(np.float32)


def bench(runtime: Runtime, batch: int = 1, reps: int = 20, warmup: int = 2,
          configs: Sequence[str] = DEFAULT_CONFIGS, seed: int = 0,
          clips: Optional[np.ndarray] = None, progress: Progress = None,
          budgets: Optional[Sequence[str]] = None, plain: bool = True,
          breakdown: bool = False) -> BenchReport:
    """Benchmark a runtime's standard configurations (see the module docstring).

    ``clips`` (default: ``batch`` random clips) are run in calls of ``batch``. Bundles with exits
    should be given real clips: how many clips leave early depends on them. ``plain`` adds
    ``plain-graph`` (:func:`plain_config`); ``breakdown`` profiles each configuration once more and
    attributes its time per clip to categories (:func:`profile_breakdown`).
    """
    if budgets and not runtime.manifest.exits():
        raise InputError(f"this bundle has no exits, so no budgets to time ({', '.join(budgets)} "
                         "asked); leave --budget out")
    x = runtime.check_clips(clips if clips is not None else random_clips(runtime, batch, seed))
    if runtime.manifest.exits():
        chosen = exit_configs(runtime, x, seed, budgets)
        reference = "all-cubes"
    else:
        chosen = standard_configs(runtime, configs)
        reference = "static"
    baseline = plain_config(runtime) if plain else None
    if baseline is not None:
        chosen.append(baseline)
    report = run_configs(chosen, x, reps, warmup, seed, reference=reference, progress=progress,
                         batch=batch)
    if breakdown:
        for cfg, result in zip(chosen, report.configs):
            result.breakdown = profile_breakdown(cfg, x, batch, reps=max(2, min(reps, 5)))
    report.meta["backend"] = runtime.backend.name
    report.meta["threads"] = runtime.backend.threads
    report.meta["device"] = runtime.backend.device_info()
    report.meta["path"] = runtime.path
    return report


# ---------------------------------------------------------------------------------------------
# where the time goes

CATEGORIES = ("conv", "fill", "movement", "quant", "gate", "other", "call", "interpreter")
_COMPUTE = {"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "Gemm", "MatMul", "FusedGemm",
            "FusedMatMul", "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"}
_MOVEMENT = {"Concat", "Reshape", "Transpose", "Slice", "Identity", "ReorderInput",
             "ReorderOutput", "Split", "Gather", "GatherElements", "GatherND", "Unsqueeze",
             "Squeeze", "Flatten", "Expand", "Tile", "Pad", "Cast", "ScatterElements",
             "ScatterND", "Shape", "MemcpyFromHost", "MemcpyToHost", "Copy"}
_CONTROL = {"If", "Loop", "Scan"}
_QUANT = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def category(op: str, node: str, piece: str) -> Optional[str]:
    """The category of one kernel run (None: control flow, whose time its subgraph's nodes
    already report). Gates first (anything in a gate piece), then cheap fills (convolutions the
    exporter tagged ``fill``), convolutions and matrix products, data movement, the rest."""
    if op in _CONTROL:
        return None
    if piece.endswith(".gate") or ".gate#" in node:
        return "gate"
    if op in _COMPUTE:
        return "fill" if "fill" in node else "conv"
    if op in _MOVEMENT:
        return "movement"
    if op in _QUANT:
        return "quant"
    return "other"


def parse_profile(path: Any, piece: str, skip_runs: int = 1) -> Dict[str, float]:
    """Microseconds by category in one ONNX Runtime session profile, and the session's own
    ``model_run`` time (``run``); the first ``skip_runs`` runs (warm-up) are left out."""
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    out: Dict[str, float] = {c: 0.0 for c in CATEGORIES}
    out["run"] = 0.0
    pending: List[Tuple[str, float]] = []
    runs = 0
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            op = str((e.get("args") or {}).get("op_name", ""))
            cat = category(op, str(e["name"])[:-len("_kernel_time")], piece)
            if cat is not None:
                pending.append((cat, float(e.get("dur", 0))))
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs += 1
            if runs > skip_runs:
                kernels = 0.0
                for cat, dur in pending:
                    out[cat] += dur
                    kernels += dur
                out["run"] += float(e.get("dur", 0))
                out["call"] += max(0.0, float(e.get("dur", 0)) - kernels)
            pending = []
    return out


def profile_breakdown(config: Config, clips: np.ndarray, batch: int,
                      reps: int = 3) -> Optional[Dict[str, float]]:
    """Milliseconds per clip by category for one configuration, from ONNX Runtime's profiler:
    ``conv`` (convolutions and matrix products of computed filters), ``fill`` (cheap fills),
    ``movement`` (concatenation, layout reorders, reshapes, copies inside pieces), ``quant``
    (int8 forms: quantizing and dequantizing between int8 and float), ``gate`` (gate pieces),
    ``other`` (element-wise, pooling, ...), ``call`` (each session run beyond its kernels: the
    call, its inputs and outputs), ``interpreter`` (the wall time beyond the runs: Python,
    grouping, copies between pieces). Profiling inflates times: read the proportions. None
    for a backend without a profiler."""
    rt = config.runtime
    if rt.backend.name != "onnxruntime":
        return None
    import tempfile

    from .runtime import load
    with tempfile.TemporaryDirectory(prefix="adaedge-profile-") as tmp:
        be = rt.backend
        options: Dict[str, Any] = {"threads": be.threads, "pool": getattr(be, "pool", "session"),
                                   "device": getattr(be, "device", "cpu"), "profile": tmp,
                                   "precision": be.precision}
        prof = load(rt.bundle, "onnxruntime", path=rt.path, **options)
        total = int(clips.shape[0])
        prof.classify_batches(clips, batch, force=config.force, **config.options)   # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            prof.classify_batches(clips, batch, force=config.force, **config.options)
        wall_us = (time.perf_counter() - t0) * 1e6
        sums: Dict[str, float] = {c: 0.0 for c in CATEGORIES}
        run = 0.0
        for piece, path in prof.backend.end_profiling():   # type: ignore[attr-defined]
            part = parse_profile(path, piece)
            run += part.pop("run")
            for k, v in part.items():
                sums[k] += v
        sums["interpreter"] = max(0.0, wall_us - run)
    scale = 1e-3 / (reps * total)
    out = {k: v * scale for k, v in sums.items()}
    out["total"] = wall_us * scale
    return out


def print_report(report: BenchReport, summary: Dict[str, Any], as_json: bool) -> None:
    """A benchmark script's output: JSON (the report with its ``summary``), or a header line
    (model, onnxruntime version, threads and pool, processor) and the table."""
    if as_json:
        out = report.to_json()
        out["summary"] = summary
        print(json.dumps(out))
        return
    meta = report.meta
    pool = f" ({meta['pool']} pool)" if meta.get("pool") else ""
    print(f"{meta['model']}, onnxruntime {meta.get('onnxruntime')}, {meta['threads']} "
          f"threads{pool}, {meta.get('cpu', '?')} ({meta.get('instruction_set', '?')})")
    print(format_table(report))


def format_table(report: BenchReport) -> str:
    """The table; a ``decide ms`` column (gate decisions' wall time per clip, as the host waits
    for them) appears where gates decided, and the breakdown below it where it was asked for."""
    decide = any(c.decisions for c in report.configs)
    device = report.meta.get("device")
    lines = [f"on {device['name']}" if isinstance(device, dict) and device.get("name")
             and device.get("name") not in ("cpu", "cuda") else "",
             f"batch {report.batch}, {report.reps} interleaved repetitions, per clip:",
             f"{'config':<22}{'GFLOPs':>9}{'median ms':>11}{'p90 ms':>9}{'limit ms':>10}"
             f"{'clips/s':>9}{'realisation':>13}" + (f"{'decide ms':>11}" if decide else "")]
    for c in report.configs:
        real = "-" if c.realization is None else f"{c.realization:.2f}"
        limit = "-" if c.limit_ms is None else f"{c.limit_ms:.2f}"
        extra = (f"{c.decision_ms:>11.3f}" if c.decisions else f"{'-':>11}") if decide else ""
        lines.append(f"{c.name:<22}{c.gflops:>9.3f}{c.median_ms:>11.2f}{c.p90_ms:>9.2f}"
                     f"{limit:>10}{c.clips_per_s:>9.2f}{real:>13}{extra}")
    if any(c.breakdown for c in report.configs):
        lines += ["", "where the time goes, ms per clip (ONNX Runtime's profiler, which inflates "
                  "times: read the proportions):",
                  f"{'config':<22}" + "".join(f"{k:>12}" for k in (*CATEGORIES, "total"))]
        for c in report.configs:
            if c.breakdown:
                lines.append(f"{c.name:<22}" + "".join(f"{c.breakdown.get(k, 0.0):>12.3f}"
                                                        for k in (*CATEGORIES, "total")))
    return "\n".join(line for line in lines if line)


__all__ = ["bench", "run_configs", "Config", "ConfigResult", "BenchReport", "realization",
           "plain_config", "profile_breakdown", "parse_profile", "category", "CATEGORIES",
           "standard_configs", "exit_configs", "exit_budgets", "format_table", "random_clips",
           "DEFAULT_CONFIGS"]
