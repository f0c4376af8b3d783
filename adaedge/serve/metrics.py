"""What the adaptation did, as Prometheus metrics: clips, batch sizes, branches, exits, GFLOPs.

Triton's own metrics endpoint counts requests, failures, queue and compute time per model; it
cannot know what happened inside a bundle. These counters add that, one set per served model,
exposed in Prometheus' text format on their own port (:class:`MetricsServer`, stdlib only).
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ModelMetrics:
    """Counters of one served model; :meth:`record` is called once per runtime call."""

    def __init__(self, model: str, static_flops: Optional[int] = None) -> None:
        self.model = model
        self.static_flops = static_flops       # per clip (per frame for a stream bundle)
        self._lock = threading.Lock()
        self.clips = 0
        self.calls = 0
        self.flops = 0
        self.static_total = 0
        self.batch_hist: Counter = Counter()    # upper bound -> calls
        self.batch_sum = 0
        self.branches: Counter = Counter()      # (switch, branch) -> clips
        self.exits: Counter = Counter()         # exit name ("" = none) -> clips
        self.streams = 0
        self.seconds = 0.0                      # wall time inside the runtime's calls
        self.refused = 0                        # clips of requests refused for their input

    def refuse(self, clips: int) -> None:
        with self._lock:
            self.refused += clips

    def record(self, traces: Sequence[Any], frames: int = 1, streams: int = 0,
               seconds: float = 0.0) -> None:
        with self._lock:
            n = len(traces)
            self.calls += 1
            self.seconds += seconds
            self.clips += n
            self.batch_sum += n
            for bound in BATCH_BUCKETS:
                if n <= bound:
                    self.batch_hist[bound] += 1
            for tr in traces:
                self.flops += tr.flops
                for switch, branch in tr.branches.items():
                    self.branches[(switch.split("@")[0], branch)] += 1
                self.exits[tr.exit or ""] += 1
            if self.static_flops is not None:
                self.static_total += self.static_flops * frames * n
            self.streams = streams

    def snapshot(self) -> Dict[str, Any]:
        """The counters as plain values (for tests and the CLI's summary)."""
        with self._lock:
            return {"clips": self.clips, "calls": self.calls, "gflops": self.flops / 1e9,
                    "runtime_s": self.seconds,
                    "gflops_saved": ((self.static_total - self.flops) / 1e9
                                     if self.static_flops is not None else None),
                    "batch_sizes": {b: self.batch_hist[b] for b in BATCH_BUCKETS},
                    "branches": {f"{s}={b}": c for (s, b), c in sorted(self.branches.items())},
                    "exits": dict(self.exits), "streams": self.streams,
                    "refused": self.refused}

    def lines(self) -> List[Tuple[str, str, float]]:
        """(metric, labels, value) rows."""
        m = f'model="{_label(self.model)}"'
        with self._lock:
            rows = [("adaedge_clips_total", m, self.clips),
                    ("adaedge_runtime_calls_total", m, self.calls),
                    ("adaedge_runtime_seconds_total", m, self.seconds),
                    ("adaedge_gflops_total", m, self.flops / 1e9),
                    ("adaedge_streams_active", m, self.streams),
                    ("adaedge_refused_clips_total", m, self.refused)]
            if self.static_flops is not None:
                rows += [("adaedge_gflops_static_total", m, self.static_total / 1e9),
                         ("adaedge_gflops_saved_total", m,
                          (self.static_total - self.flops) / 1e9)]
            for bound in BATCH_BUCKETS:
                rows.append(("adaedge_batch_clips_bucket", f'{m},le="{bound}"',
                             self.batch_hist[bound]))
            rows += [("adaedge_batch_clips_bucket", f'{m},le="+Inf"', self.calls),
                     ("adaedge_batch_clips_sum", m, self.batch_sum),
                     ("adaedge_batch_clips_count", m, self.calls)]
            for (switch, branch), c in sorted(self.branches.items()):
                rows.append(("adaedge_branch_clips_total",
                             f'{m},switch="{_label(switch)}",branch="{_label(branch)}"', c))
            for name, c in sorted(self.exits.items()):
                rows.append(("adaedge_exit_clips_total", f'{m},exit="{_label(name or "none")}"', c))
        return rows


HELP = {
    "adaedge_clips_total": ("counter", "clips classified"),
    "adaedge_runtime_calls_total": ("counter", "runtime calls (one per batch, per stream wave)"),
    "adaedge_runtime_seconds_total": ("counter", "wall time inside the runtime's calls"),
    "adaedge_gflops_total": ("counter", "GFLOPs spent"),
    "adaedge_streams_active": ("gauge", "streams whose state the server holds"),
    "adaedge_refused_clips_total": ("counter", "clips of requests refused for their input "
                                               "(NaN or infinite values, bad stream flags)"),
    "adaedge_gflops_static_total": ("counter", "GFLOPs the static network would have spent"),
    "adaedge_gflops_saved_total": ("counter", "static GFLOPs minus GFLOPs spent"),
    "adaedge_batch_clips": ("histogram", "clips per runtime call"),
    "adaedge_branch_clips_total": ("counter", "clips (or frames) per gate and branch taken"),
    "adaedge_exit_clips_total": ("counter", "clips per exit stage (none: the whole program)"),
}


def render(models: Sequence[ModelMetrics]) -> str:
    """Prometheus text exposition of every model's counters."""
    rows: Dict[str, List[Tuple[str, str, float]]] = {}
    for mm in models:
        for name, labels, value in mm.lines():
            family = name
            for suffix in ("_bucket", "_sum", "_count"):
                if name.startswith("adaedge_batch_clips") and name.endswith(suffix):
                    family = "adaedge_batch_clips"
            rows.setdefault(family, []).append((name, labels, value))
    out = []
    for family, items in rows.items():
        kind, text = HELP.get(family, ("untyped", family))
        out.append(f"# HELP {family} {text}")
        out.append(f"# TYPE {family} {kind}")
        out += [f"{name}{{{labels}}} {value:g}" for name, labels, value in items]
    return "\n".join(out) + "\n"


class MetricsServer:
    """``GET /metrics`` in Prometheus text format, on a thread of its own."""

    def __init__(self, host: str, port: int, source: Callable[[], str]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:          # noqa: N802 (the stdlib's name)
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = source().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                        name="adaedge-metrics")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


__all__ = ["ModelMetrics", "MetricsServer", "render"]
