"""Load test of `adaedge serve`: N camera-like streams against Triton, with Triton's own clients.

    python benchmarks/bench_serve.py [--bundle DIR] [--streams 1 4 16 64] [--protocols http grpc]
        [--models free all-half static] [--seconds 8] [--clips-per-s 2] [--max-requests 1500]
        [--max-batch 8] [--json]

Starts one server on 127.0.0.1 (free ports) serving the bundle (default: the shipped demo model,
exported into the cache on first use) three times: with free gates (``free``, what the demo
runs), under a forced cheaper policy (``all-half``) and as the static network (``static``). For
each model, protocol and stream count, N threads act as cameras: each sends one clip (with its
``stream_id``) every 1/``--clips-per-s`` seconds, waits for the answer, and skips the clips it
missed while waiting, as a camera that never waits for inference does (counted as "late").
Every run is bounded by ``--seconds`` and ``--max-requests``.

Every answer is checked against ``classify`` of the same clip in this process (scores within
1e-4 of their largest magnitude, the same label) and against the stream's own count of answers
(``stream_position``); every failure must be Triton's refusal (queue full, or queued past
``--queue-timeout-ms``). Prints per run: offered and served clips/s, p50/p99 latency of the
answers, the share refused, and how many were wrong or lost (both must be 0), the mean batch
Triton formed; then the serving overhead against ``classify`` in one process at that batch size,
and the served time saving of each policy against the static network served the same way.

Client and server share this machine's cores; see RESULTS.md for what that means here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from adaedge import __version__, runtime
from adaedge.serve import ModelSpec, Server, free_port

POOL = 48      # distinct clips the cameras send (each stream starts at its own offset)


def make_pool(rt: runtime.Runtime, n: int, seed: int = 0) -> np.ndarray:
    """Clips of varied contrast and brightness (so that free gates could choose differently)."""
    rng = np.random.default_rng(seed)
    shape = [n] + list(rt.manifest.clip_shape)
    x = rng.standard_normal(shape).astype(np.float32)
    scale = np.linspace(0.3, 2.5, n, dtype=np.float32).reshape(-1, 1, 1, 1, 1)
    shift = np.linspace(-0.8, 0.8, n, dtype=np.float32).reshape(-1, 1, 1, 1, 1)
    return np.ascontiguousarray(x * scale + shift)


def expected(rt: runtime.Runtime, pool: np.ndarray, policy: Optional[str]) -> np.ndarray:
    return np.concatenate([rt.classify(pool[i:i + 1], force=policy).scores
                           for i in range(len(pool))])


def in_process(rt: runtime.Runtime, pool: np.ndarray, policy: Optional[str], batch: int,
               seconds: float = 3.0) -> float:
    """clips/s of ``classify`` at ``batch`` in this process, on the same clips."""
    rt.classify(pool[:batch], force=policy)
    done, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        idx = [(i + k) % len(pool) for k in range(batch)]
        rt.classify(pool[idx], force=policy)
        done += batch
        i += batch
    return done / (time.perf_counter() - t0)


def in_process_paced(rt: runtime.Runtime, pool: np.ndarray, policy: Optional[str],
                     clips_per_s: float, n: int = 12) -> float:
    """Median ms of ``classify`` on one clip called at a camera's rate (idle between calls, as
    a lightly loaded server is), in this process."""
    rt.classify(pool[:1], force=policy)
    times = []
    for i in range(n):
        time.sleep(1.0 / clips_per_s)
        t0 = time.perf_counter()
        rt.classify(pool[i % len(pool):i % len(pool) + 1], force=policy)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


class Camera(threading.Thread):
    def __init__(self, index: int, server: Server, protocol: str, model: str, pool: np.ndarray,
                 want: np.ndarray, period: float, t0: float, deadline: float,
                 budget: "Budget", stream_base: int) -> None:
        super().__init__(daemon=True)
        self.index, self.server, self.protocol, self.model = index, server, protocol, model
        self.pool, self.want, self.period = pool, want, period
        self.t0 = t0 + (index * 0.6180339 % 1.0) * period      # cameras out of phase
        self.deadline, self.budget = deadline, budget
        self.stream = stream_base + index + 1
        self.latencies: List[float] = []
        self.refused: List[str] = []
        self.wrong: List[str] = []
        self.lost = 0
        self.late = 0
        self.sent = 0

    def run(self) -> None:
        if self.protocol == "http":
            import tritonclient.http as mod
            client = mod.InferenceServerClient(self.server.http_url, network_timeout=60.0)
        else:
            import tritonclient.grpc as mod      # type: ignore[no-redef]
            client = mod.InferenceServerClient(self.server.grpc_url)
        from tritonclient.utils import InferenceServerException
        k = 0
        answered = 0
        while True:
            target = self.t0 + k * self.period
            now = time.perf_counter()
            if target > now:
                time.sleep(target - now)
            if time.perf_counter() >= self.deadline or not self.budget.take():
                break
            j = (self.index * 7 + k) % len(self.pool)
            x = self.pool[j:j + 1]
            inputs = []
            for name, arr, dtype in (("clips", x, "FP32"),
                                     ("stream_id", np.array([[self.stream]], np.uint64), "UINT64"),
                                     ("stream_start", np.array([[answered == 0]]), "BOOL")):
                inp = mod.InferInput(name, list(arr.shape), dtype)
                inp.set_data_from_numpy(arr)
                inputs.append(inp)
            self.sent += 1
            t = time.perf_counter()
            try:
                r = client.infer(self.model, inputs)
                ms = (time.perf_counter() - t) * 1e3
                scores = r.as_numpy("scores")
                pos = int(r.as_numpy("stream_position").reshape(-1)[0])
                ref = self.want[j:j + 1]
                if scores is None or scores.shape != ref.shape:
                    self.lost += 1
                elif (np.abs(scores - ref).max() > 1e-4 * np.abs(ref).max()
                      or int(scores.argmax()) != int(ref.argmax()) or pos != answered + 1):
                    self.wrong.append(f"stream {self.stream} clip {k}: position {pos}, "
                                      f"want {answered + 1}")
                else:
                    self.latencies.append(ms)
                answered += 1
            except InferenceServerException as e:
                msg = str(e)
                if "maximum queue size" in msg or "timeout expired" in msg.lower():
                    self.refused.append(msg)
                else:
                    self.lost += 1
                    self.wrong.append(f"stream {self.stream} clip {k}: {msg[:200]}")
            # a camera skips the clips that came while it waited
            missed = int((time.perf_counter() - self.t0) // self.period) - k
            self.late += max(0, missed - 1)
            k += max(1, missed)
        client.close()


class Budget:
    def __init__(self, n: int) -> None:
        self.left = n
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True


def warm_up(server: Server, model: str, protocol: str, pool: np.ndarray, n: int = 4) -> None:
    """A few requests first: the first runs of a session (and of each batch size) are slow."""
    if protocol == "http":
        import tritonclient.http as mod
        client = mod.InferenceServerClient(server.http_url)
    else:
        import tritonclient.grpc as mod      # type: ignore[no-redef]
        client = mod.InferenceServerClient(server.grpc_url)
    for i in range(n):
        inp = mod.InferInput("clips", [1] + list(pool.shape[1:]), "FP32")
        inp.set_data_from_numpy(pool[i:i + 1])
        client.infer(model, [inp])
    client.close()


def run_load(server: Server, model: str, protocol: str, streams: int, pool: np.ndarray,
             want: np.ndarray, args: argparse.Namespace, stream_base: int) -> Dict[str, Any]:
    served = next(m for m in server.models if m.name == model)
    warm_up(server, model, protocol, pool)
    before = served.metrics.snapshot()
    t0 = time.perf_counter() + 0.2
    deadline = t0 + args.seconds
    budget = Budget(args.max_requests)
    cams = [Camera(i, server, protocol, model, pool, want, 1.0 / args.clips_per_s, t0, deadline,
                   budget, stream_base) for i in range(streams)]
    for c in cams:
        c.start()
    for c in cams:
        c.join(args.seconds + 120)
    elapsed = time.perf_counter() - t0
    after = served.metrics.snapshot()
    lat = np.array([x for c in cams for x in c.latencies]) if any(c.latencies for c in cams) \
        else np.zeros(0)
    sent = sum(c.sent for c in cams)
    refused = sum(len(c.refused) for c in cams)
    wrong = sum(len(c.wrong) for c in cams)
    clips = after["clips"] - before["clips"]
    calls = after["calls"] - before["calls"]
    return {"model": model, "protocol": protocol, "streams": streams,
            "offered_clips_per_s": streams * args.clips_per_s,
            "seconds": round(elapsed, 2), "sent": sent, "answered": int(len(lat)),
            "refused": refused, "wrong": wrong, "lost": sum(c.lost for c in cams),
            "late_skipped": sum(c.late for c in cams),
            "refused_share": round(refused / sent, 4) if sent else 0.0,
            "served_clips_per_s": round(len(lat) / elapsed, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "mean_batch": round(clips / calls, 2) if calls else None,
            "runtime_ms_per_clip": round(1e3 * (after["runtime_s"] - before["runtime_s"]) / clips,
                                         2) if clips else None,
            "gflops_per_clip": round((after["gflops"] - before["gflops"]) / clips, 5)
            if clips else None,
            "refusals": sorted({r.split("] ")[-1] for c in cams for r in c.refused}),
            "problems": [w for c in cams for w in c.wrong][:5]}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="bundle folder (default: the demo model's, in the cache)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--protocols", nargs="+", choices=["http", "grpc"], default=["http", "grpc"])
    p.add_argument("--models", nargs="+", default=["free", "all-half", "static"],
                   help="free (the gates choose) and/or policy names of the bundle")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each run")
    p.add_argument("--clips-per-s", type=float, default=2.0,
                   help="clips each camera sends per second (the demo: a clip every 8 frames "
                        "of every 2nd frame at 30 fps, about 1.9)")
    p.add_argument("--max-requests", type=int, default=1500, help="requests per run at most")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--queue-timeout-ms", type=float, default=500.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    if args.bundle is None:
        from adaedge.demo import demo_bundle
        bundle = Path(demo_bundle())
    else:
        bundle = Path(args.bundle)
    rt = runtime.load(bundle)
    pool = make_pool(rt, POOL)
    specs, wants, policies = [], {}, {}
    for name in args.models:
        policy = None if name == "free" else name
        model = "m_" + name.replace("-", "_")
        specs.append(ModelSpec(bundle, model, policy))
        wants[model] = expected(rt, pool, policy)
        policies[model] = policy
    port = free_port(count=4)
    import onnxruntime
    import tritonclient
    meta = {"bundle": bundle.name, "gflops_static": rt.manifest.policy_flops("static") / 1e9,
            "clip": rt.manifest.clip_shape, "processor": platform.processor() or platform.machine(),
            "cpus": __import__("os").cpu_count(), "python": sys.version.split()[0],
            "adaedge": __version__, "onnxruntime": onnxruntime.__version__,
            "tritonclient": getattr(tritonclient, "__version__", "?"),
            "pytriton": _version("nvidia-pytriton"), "numpy": np.__version__,
            "clips_per_s": args.clips_per_s, "seconds": args.seconds,
            "max_batch": args.max_batch, "max_queue_delay_ms": args.max_queue_delay_ms,
            "max_queue": args.max_queue, "queue_timeout_ms": args.queue_timeout_ms}
    runs = []
    with Server(specs, http_port=port, max_batch=args.max_batch,
                max_queue_delay_ms=args.max_queue_delay_ms, max_queue=args.max_queue,
                queue_timeout_ms=args.queue_timeout_ms) as server:
        base = 0
        for model in wants:
            for protocol in args.protocols:
                for n in args.streams:
                    base += 1000
                    r = run_load(server, model, protocol, n, pool, wants[model], args, base)
                    runs.append(r)
                    if not args.json:
                        print(_row(r), flush=True)
    # classify in one process at the batch sizes Triton formed, no server running
    reference = []
    for model, policy in policies.items():
        batches = sorted({1, args.max_batch} | {max(1, int(round(r["mean_batch"])))
                                                for r in runs if r["model"] == model
                                                and r["mean_batch"]})
        for b in batches:
            reference.append({"model": model, "batch": b,
                              "clips_per_s": round(in_process(rt, pool, policy, b), 2)})
        reference.append({"model": model, "batch": 1, "paced_clips_per_s": args.clips_per_s,
                          "median_ms": round(in_process_paced(rt, pool, policy,
                                                              args.clips_per_s), 2)})
    report = {"meta": meta, "runs": runs, "in_process": reference}
    if args.json:
        print(json.dumps(report))
    else:
        print(summary(report))
    bad = sum(r["wrong"] + r["lost"] for r in runs)
    return 1 if bad else 0


def _version(dist: str) -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _row(r: Dict[str, Any]) -> str:
    return (f"{r['model']:<12} {r['protocol']:<5} {r['streams']:>3} streams: offered "
            f"{r['offered_clips_per_s']:6.1f} clips/s, served {r['served_clips_per_s']:6.1f}, "
            f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, refused {r['refused']}/{r['sent']} "
            f"({100 * r['refused_share']:.1f}%), late {r['late_skipped']}, wrong {r['wrong']}, "
            f"lost {r['lost']}, mean batch {r['mean_batch']}, in the runtime "
            f"{r['runtime_ms_per_clip']} ms per clip")


def summary(report: Dict[str, Any]) -> str:
    lines = ["", "in-process classify (clips/s) at the batch sizes served, and one clip at a "
             "camera's rate (median ms):"]
    for ref in report["in_process"]:
        if "median_ms" in ref:
            lines.append(f"  {ref['model']:<12} batch  1, one call every "
                         f"{1 / ref['paced_clips_per_s']:.2f} s: {ref['median_ms']} ms")
        else:
            lines.append(f"  {ref['model']:<12} batch {ref['batch']:>2}: {ref['clips_per_s']}")
    lines.append("saturated serving (the run with the most clips served per model and protocol) "
                 "against classify at its mean batch:")
    best: Dict[Any, Dict[str, Any]] = {}
    for r in report["runs"]:
        key = (r["model"], r["protocol"])
        if key not in best or r["served_clips_per_s"] > best[key]["served_clips_per_s"]:
            best[key] = r
    for (model, protocol), r in best.items():
        b = max(1, int(round(r["mean_batch"] or 1)))
        ref = next(x for x in report["in_process"] if x["model"] == model and x["batch"] == b
                   and "clips_per_s" in x)
        lines.append(f"  {model:<12} {protocol:<5} served {r['served_clips_per_s']} clips/s at "
                     f"{r['streams']} streams (mean batch {r['mean_batch']}), in process "
                     f"{ref['clips_per_s']} at batch {b}: served/in-process "
                     f"{r['served_clips_per_s'] / ref['clips_per_s']:.2f}")
    if "m_static" in {m for m, _ in best}:
        lines.append("time per clip against the static network (1 / clips per second), "
                     "saturated:")
        ref_static = next(x for x in report["in_process"] if x["model"] == "m_static"
                          and x["batch"] == report["meta"]["max_batch"] and "clips_per_s" in x)
        for (model, protocol), r in best.items():
            if model == "m_static":
                continue
            st = best[("m_static", protocol)]
            ref = next(x for x in report["in_process"] if x["model"] == model
                       and x["batch"] == report["meta"]["max_batch"] and "clips_per_s" in x)
            lines.append(f"  {model:<12} {protocol:<5} served "
                         f"{st['served_clips_per_s'] / r['served_clips_per_s']:.2f}, inside the "
                         f"server's runtime {r['runtime_ms_per_clip'] / st['runtime_ms_per_clip']:.2f}"
                         f", in process at batch {report['meta']['max_batch']} "
                         f"{ref_static['clips_per_s'] / ref['clips_per_s']:.2f}; GFLOPs per clip "
                         f"{r['gflops_per_clip']} against {st['gflops_per_clip']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
