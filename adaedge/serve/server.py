"""Bundles served by NVIDIA Triton Inference Server, through PyTriton.

:class:`Server` loads every bundle first (one runtime per model instance), and only when all
loaded does it start Triton and bind them: a bundle that fails to load raises before anything
listens, so the server never claims readiness without it. Triton's dynamic batcher forms the
batches (up to ``max_batch`` clips, waiting at most ``max_queue_delay_ms`` for more), holds at
most ``max_queue`` requests and refuses with its own error what does not fit or waits longer
than ``queue_timeout_ms``; each batch then runs through :class:`~.model.ServedModel`.

Ports: HTTP, gRPC and Triton's metrics as given; adaedge's own metrics (branches, exits,
GFLOPs saved) on ``adaedge_metrics_port``. Everything binds to ``host`` (127.0.0.1 unless told).
"""

from __future__ import annotations

import math

import logging
import os
import re
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..bundle import load as load_bundle
from ..errors import AdaedgeError, UsageError
from ..runtime import load as load_runtime
from .environment import ServeUnavailable, serving_environment
from .metrics import MetricsServer, render
from .model import ServedModel
from .streams import StreamTable

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


@dataclass
class ModelSpec:
    """A bundle to serve: the folder, the model name clients use, and a forced policy or exit
    budget if it is to be served that way (``policy="static"``: the static network)."""

    bundle: Union[str, Path]
    name: Optional[str] = None
    policy: Optional[str] = None
    budget: Union[str, float, None] = None

    @classmethod
    def parse(cls, text: str, policy: Optional[str] = None,
              budget: Union[str, float, None] = None) -> "ModelSpec":
        """``PATH`` or ``NAME=PATH`` (the CLI's form)."""
        name, sep, path = text.partition("=")
        if sep and NAME.match(name):
            return cls(path, name, policy, budget)
        return cls(text, None, policy, budget)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: Optional[int] = None            # default http_port + 1
    metrics_port: Optional[int] = None         # Triton's; default http_port + 2
    adaedge_metrics_port: Optional[int] = None  # default http_port + 3
    backend: str = "onnxruntime"
    backend_options: Dict[str, Any] = field(default_factory=dict)
    instances: int = 1
    max_batch: int = 8
    max_queue_delay_ms: float = 2.0
    max_queue: int = 64
    queue_timeout_ms: float = 1000.0
    stream_idle_s: float = 60.0
    max_streams: int = 1024
    log_verbose: int = 0
    log_file: Optional[str] = None             # Triton's log (default: a new temporary file)

    def check(self) -> None:
        for key in ("instances", "max_batch", "max_queue", "max_streams"):
            if getattr(self, key) < 1:
                raise UsageError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key, low in (("max_queue_delay_ms", 0.0), ("queue_timeout_ms", None),
                         ("stream_idle_s", None)):
            value = float(getattr(self, key))
            if not math.isfinite(value) or value < 0 or (low is None and value == 0):
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"{flag} must be a finite number {'>= 0' if low is not None else '> 0'}, "
                                 f"not {getattr(self, key)!r}")
        for port in self.ports().values():
            if not 0 < port < 65536:
                raise UsageError(f"port {port} is out of range")
        if len(set(self.ports().values())) != 4:
            raise UsageError(f"the four ports must differ: {self.ports()}")

    def ports(self) -> Dict[str, int]:
        p = self.http_port
        return {"http": p, "grpc": self.grpc_port or p + 1, "metrics": self.metrics_port or p + 2,
                "adaedge_metrics": self.adaedge_metrics_port or p + 3}


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A port where ``count`` consecutive ports were free just now (for tests and benchmarks)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + count >= 65536:
            continue
        ok = True
        for p in range(base + 1, base + count):
            with socket.socket() as t:
                try:
                    t.bind((host, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise UsageError("no free ports found")


class Server:
    """Triton serving bundles. ``with Server([...]) as s:`` starts it and waits until ready."""

    def __init__(self, models: Sequence[Union[ModelSpec, str, Path]],
                 config: Optional[ServeConfig] = None, **overrides: Any) -> None:
        self.config = config or ServeConfig()
        for k, v in overrides.items():
            if not hasattr(self.config, k):
                raise UsageError(f"unknown serve option {k!r}")
            setattr(self.config, k, v)
        self.config.check()
        self.specs = [m if isinstance(m, ModelSpec) else ModelSpec(m) for m in models]
        if not self.specs:
            raise UsageError("give at least one bundle to serve")
        self.models: List[ServedModel] = []
        self.log_file: Optional[Path] = None
        self._triton: Any = None
        self._metrics: Optional[MetricsServer] = None
        self._sweeping = threading.Event()
        self._sweeper: Optional[threading.Thread] = None

    # -- endpoints --------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.config.ports()['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.ports()['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.ports()['metrics']}/metrics"

    @property
    def adaedge_metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.ports()['adaedge_metrics']}/metrics"

    # -- life -------------------------------------------------------------------------------
    def load(self) -> List[ServedModel]:
        """Load every bundle (a runtime per instance) and run each once; raises on the first
        that fails."""
        cfg = self.config
        names: Dict[str, str] = {}
        models = []
        for spec in self.specs:
            bundle = load_bundle(spec.bundle)
            name = spec.name or _model_name(Path(spec.bundle))
            if not NAME.match(name):
                raise UsageError(f"model name {name!r} is not a Triton model name (letters, "
                                 "digits, '_', '.', '-'); give NAME=PATH")
            if name in names:
                raise UsageError(f"two bundles would be served as {name!r} ({names[name]} and "
                                 f"{spec.bundle}); give NAME=PATH")
            names[name] = str(spec.bundle)
            runtimes = [load_runtime(bundle, cfg.backend, **cfg.backend_options)
                        for _ in range(cfg.instances)]
            streams = StreamTable(cfg.stream_idle_s, cfg.max_streams)
            model = ServedModel(name, runtimes, spec.policy, spec.budget, streams)
            model.warm_up()
            models.append(model)
        return models

    def start(self) -> "Server":
        env = serving_environment()        # refuses first where Triton could not serve
        self.models = self.load()          # every bundle, before Triton claims anything
        from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor
        from pytriton.model_config.common import TimeoutAction
        from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
        cfg = self.config
        ports = cfg.ports()
        for name in ("pytriton", "pytriton.server", "pytriton.client", "pytriton.models"):
            logging.getLogger(name).setLevel(logging.WARNING if cfg.log_verbose == 0
                                             else logging.INFO)
        if cfg.log_file is not None:
            self.log_file = Path(cfg.log_file)
        else:             # kept after the server stops, for what went wrong
            self.log_file = Path(tempfile.mkdtemp(prefix="adaedge-serve-")) / "triton.log"
        saved = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = env["LD_LIBRARY_PATH"]   # PyTriton copies os.environ
        try:
            triton = Triton(config=TritonConfig(
                http_address=cfg.host, http_port=ports["http"], grpc_address=cfg.host,
                grpc_port=ports["grpc"], metrics_address=cfg.host,
                metrics_port=ports["metrics"], allow_metrics=True, allow_gpu_metrics=False,
                log_verbose=cfg.log_verbose, log_file=self.log_file, exit_timeout_secs=5,
                strict_readiness=True),
                # the models are written into Triton's repository before it starts, and loaded
                # as it starts: /v2/health/ready says 200 only once every model is there (by
                # default PyTriton starts Triton empty and adds the models after it is ready,
                # so for seconds a ready server answered 404 for every model)
                triton_lifecycle_policy=TritonLifecyclePolicy(launch_triton_on_startup=False,
                                                              local_model_store=True))
            self._triton = triton
            for model in self.models:
                batcher = DynamicBatcher(
                    max_queue_delay_microseconds=int(cfg.max_queue_delay_ms * 1000),
                    default_queue_policy=QueuePolicy(
                        timeout_action=TimeoutAction.REJECT,
                        default_timeout_microseconds=int(cfg.queue_timeout_ms * 1000),
                        allow_timeout_override=True, max_queue_size=cfg.max_queue))
                triton.bind(
                    model_name=model.name,
                    infer_func=[_instance(model, i) for i in range(cfg.instances)],
                    inputs=[Tensor(name=t.name, dtype=t.dtype, shape=t.shape,
                                   optional=t.optional) for t in model.inputs()],
                    outputs=[Tensor(name=t.name, dtype=t.dtype, shape=t.shape)
                             for t in model.outputs()],
                    config=ModelConfig(max_batch_size=cfg.max_batch, batcher=batcher),
                    strict=False)
            triton.run()
        except AdaedgeError:
            self.stop()
            raise
        except Exception as e:          # PyTriton's and Triton's failures to start: one line
            self.stop()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ServeUnavailable(f"Triton Inference Server did not start: {first} (its log: "
                                   f"{self.log_file})") from e
        except BaseException:
            self.stop()
            raise
        finally:
            if saved is None:
                os.environ.pop("LD_LIBRARY_PATH", None)
            else:
                os.environ["LD_LIBRARY_PATH"] = saved
        self._metrics = MetricsServer(cfg.host, ports["adaedge_metrics"],
                                      lambda: render([m.metrics for m in self.models]))
        self._metrics.start()
        self._sweeping.clear()
        self._sweeper = threading.Thread(target=self._sweep, daemon=True, name="adaedge-streams")
        self._sweeper.start()
        return self

    def _sweep(self) -> None:
        """Free idle streams even when no request comes to do it."""
        period = min(5.0, self.config.stream_idle_s / 2)
        while not self._sweeping.wait(period):
            for model in self.models:
                with model.streams.lock:
                    model.streams.expire()
                model.metrics.streams = len(model.streams)

    def wait(self) -> None:
        """Serve until interrupted (Ctrl-C) or Triton stops."""
        if self._triton is None:
            raise UsageError("the server is not started")
        self._triton.serve()

    def is_alive(self) -> bool:
        return self._triton is not None and self._triton.is_alive()

    def stop(self) -> None:
        self._sweeping.set()
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        if self._triton is not None:
            triton, self._triton = self._triton, None
            triton.stop()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _instance(model: ServedModel, index: int) -> Any:
    """The inference callable of one model instance: PyTriton's requests in, responses out."""
    def infer(requests: List[Any]) -> List[Dict[str, Any]]:
        return model.infer([r.data for r in requests], instance=index)
    infer.__name__ = f"{model.name}_instance{index}"
    return infer


def _model_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.resolve().name) or "model"
    return name if NAME.match(name) else "model_" + name[:56]


def serve(bundles: Sequence[Union[ModelSpec, str, Path]], **options: Any) -> Server:
    """Start Triton serving ``bundles`` (options: :class:`ServeConfig`'s fields); returns the
    running :class:`Server` (``server.wait()`` blocks, ``server.stop()`` ends it)."""
    return Server(bundles, **options).start()


__all__ = ["ModelSpec", "ServeConfig", "Server", "serve", "free_port"]
