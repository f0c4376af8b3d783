"""Serving on Triton Inference Server: the batch-to-runtime logic, stream state, and the real
server on 127.0.0.1.

The first part runs everywhere: :class:`ServedModel` (what a Triton batch becomes in the runtime)
on real bundles, the stream table, the metrics and the CLI's one-line errors. The second starts
Triton for real through PyTriton on free ports of 127.0.0.1 and talks to it with Triton's own
clients over HTTP and gRPC; where PyTriton is not installed (it is the 'serve' extra, which pins
numpy<2) or this Python cannot serve, those tests skip with the reason.

Tolerance: served scores equal ``classify`` on the same clips within 1e-4 of their largest
magnitude (a batch runs piece by piece, one clip as the compiled graph: float rounding differs).
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import numpy as np
import pytest
import torch

from adaedge.errors import BundleError, MissingExtra
from adaedge.export import export
from adaedge.runtime import Stream, load
from adaedge.serve import ModelSpec, ServedModel, ServeUnavailable, Server, StreamTable, free_port
from adaedge.serve.metrics import render
from adaedge.verify import relative_error as close

from .conftest import varied_clips
from .test_adafuse import tiny_adafuse

RTOL = 1e-4


@pytest.fixture(scope="module")
def stream_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "adafuse"
    export(tiny_adafuse(), out, options={"stream": True})
    return out


def frames(n: int, t: int = 1, seed: int = 3) -> np.ndarray:
    return torch.randn(n, 3, t, 48, 48, generator=torch.Generator().manual_seed(seed)).numpy()


def request(x: np.ndarray, stream: int = 0, start: bool = False,
            end: bool = False) -> Dict[str, np.ndarray]:
    n = x.shape[0]
    req = {"clips": x}
    if stream:
        req.update(stream_id=np.full((n, 1), stream, np.uint64),
                   stream_start=np.full((n, 1), start), stream_end=np.full((n, 1), end))
    return req


# -- what a batch becomes in the runtime (no server) --------------------------------------------

def test_a_batch_of_requests_gets_what_classify_gives(tiny_bundle):
    rt = load(tiny_bundle)
    model = ServedModel("tiny", [rt])
    x = varied_clips(6).numpy()
    out = model.infer([request(x[:1]), request(x[1:4]), request(x[4:])])
    assert [o["scores"].shape[0] for o in out] == [1, 3, 2]
    want = rt.classify(x)
    scores = np.concatenate([o["scores"] for o in out])
    assert close(scores, want.scores) < RTOL
    labels = np.concatenate([o["label"] for o in out]).ravel()
    assert (labels == want.labels).all()
    got = [json.loads(b) for o in out for b in o["branches"].ravel()]
    assert got == [t.branches for t in want.traces]
    assert len({json.dumps(b, sort_keys=True) for b in got}) > 1      # the gates did split it
    flops = np.concatenate([o["flops"] for o in out]).ravel()
    assert flops.tolist() == [t.flops for t in want.traces]
    names = {n.decode() for o in out for n in o["label_name"].ravel()}
    assert names <= {f"class{i}" for i in range(5)} | {str(i) for i in range(5)}
    assert all(o["stream_position"].ravel().tolist() == [0] * len(o["scores"]) for o in out)
    snap = model.metrics.snapshot()
    assert snap["clips"] == 6 and snap["calls"] == 1
    assert snap["gflops"] == pytest.approx(sum(t.flops for t in want.traces) / 1e9)
    assert sum(c for k, c in snap["branches"].items() if k.startswith("stem_s=")) == 6


def test_a_bad_request_is_refused_alone_and_the_rest_of_its_batch_is_answered(stream_bundle,
                                                                               tiny_bundle):
    rt = load(tiny_bundle)
    model = ServedModel("tiny", [rt])
    x = varied_clips(5).numpy()
    bad = x[1:3].copy()
    bad[1, 0, 0, 0, 0] = np.nan
    out = model.infer([request(x[:1]), request(bad), request(x[3:])])
    want = rt.classify(np.concatenate([x[:1], x[3:]]))
    assert close(np.concatenate([out[0]["scores"], out[2]["scores"]]), want.scores) < RTOL
    assert [o["error"].ravel().tolist() for o in (out[0], out[2])] == [[b""], [b"", b""]]
    assert out[1]["label"].ravel().tolist() == [-1, -1]
    assert out[1]["scores"].shape == (2, 5) and not out[1]["scores"].any()
    assert all(b"clip 1 holds NaN or infinite values" in e for e in out[1]["error"].ravel())
    snap = model.metrics.snapshot()
    assert snap["clips"] == 3 and snap["refused"] == 2
    # stream flags are never coerced, and a request that is not one is refused alone too
    for hostile, message in [({"clips": x[:1], "stream_id": np.array([[-1]])}, b"UINT64"),
                             ({"clips": x[:1], "stream_id": np.array([[np.nan]])}, b"UINT64"),
                             ({"clips": x[:1], "stream_id": np.array([["abc"]])}, b"UINT64"),
                             ({"clips": x[:1], "stream_start": np.array([[b"no"]], dtype=object)},
                              b"BOOL"),
                             (None, b"map input names")]:
        out = model.infer([request(x[:1]), hostile])
        assert close(out[0]["scores"], want.scores[:1]) < RTOL
        assert message in out[1]["error"].ravel()[0] and out[1]["label"].ravel()[0] == -1
    # a refused clip of a stream leaves that stream's state as it was
    srt = load(stream_bundle)
    streamed = ServedModel("s", [srt])
    clip = frames(1)
    first = streamed.infer([request(clip, stream=7, start=True)])[0]
    nan = clip.copy()
    nan[0, 0, 0, 0, 0] = np.inf
    refused = streamed.infer([request(nan, stream=7)])[0]
    assert refused["error"].ravel()[0] and refused["stream_position"].ravel()[0] == 0
    second = streamed.infer([request(clip, stream=7)])[0]
    assert first["stream_position"].ravel()[0] == 1 and second["stream_position"].ravel()[0] == 2
    alone = Stream(srt)
    alone.step(clip)
    assert close(second["scores"], alone.step(clip).scores) < RTOL      # state as if no NaN came


def test_a_forced_policy_serves_the_static_network(tiny_bundle):
    rt = load(tiny_bundle)
    model = ServedModel("tiny_static", [rt], policy="static")
    x = varied_clips(4).numpy()
    out = model.infer([request(x)])[0]
    assert close(out["scores"], rt.classify(x, force="static").scores) < RTOL
    assert (out["flops"].ravel() == rt.manifest.policy_flops("static")).all()
    assert model.metrics.snapshot()["gflops_saved"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(Exception, match="unknown policy"):
        ServedModel("x", [rt], policy="no-such-policy")


def test_two_cameras_never_see_each_others_state(stream_bundle):
    """Two streams interleaved in batches, one clip each per batch and then two clips of one
    stream in one batch: each gets exactly what its own Stream gives alone."""
    rt = load(stream_bundle)
    model = ServedModel("fuse", [rt], streams=StreamTable(idle_timeout_s=60))
    a, b = frames(5, seed=1), frames(5, seed=2)
    alone_a, alone_b = Stream(rt), Stream(rt)
    want_a = [alone_a.step(a[i:i + 1]).scores for i in range(5)]
    want_b = [alone_b.step(b[i:i + 1]).scores for i in range(5)]
    got_a, got_b = [], []
    for i in range(3):                       # one clip of each camera per batch, b first
        out = model.infer([request(b[i:i + 1], 2, start=i == 0),
                           request(a[i:i + 1], 1, start=i == 0)])
        got_b.append(out[0]["scores"])
        got_a.append(out[1]["scores"])
        assert out[0]["stream_position"].item() == out[1]["stream_position"].item() == i + 1
    # camera 1 sends two clips in one batch: they run one after the other, in order
    out = model.infer([request(a[3:4], 1), request(a[4:5], 1, end=True),
                       request(b[3:5], 2)])
    got_a += [out[0]["scores"], out[1]["scores"]]
    got_b += [out[2]["scores"][:1], out[2]["scores"][1:]]
    assert out[2]["stream_position"].ravel().tolist() == [4, 5]
    for got, want in ((got_a, want_a), (got_b, want_b)):
        for g, w in zip(got, want):
            assert close(g, w) < RTOL
    assert 1 not in model.streams and 2 in model.streams      # ended; still open
    # a stream the server does not hold starts afresh, and says so (position 1)
    again = model.infer([request(a[:1], 1)])[0]
    assert again["stream_position"].item() == 1
    assert close(again["scores"], want_a[0]) < RTOL
    # without a stream id every clip starts from zero state
    plain = model.infer([request(a[1:2])])[0]
    assert close(plain["scores"], Stream(rt).step(a[1:2]).scores) < RTOL


def test_idle_streams_are_freed_and_the_table_is_bounded():
    now = [0.0]
    table = StreamTable(idle_timeout_s=10, max_streams=2, clock=lambda: now[0])
    table.open(1, start=True)
    now[0] = 5
    table.open(2, start=True)
    now[0] = 12                              # stream 1 idle 12 s, stream 2 idle 7 s
    assert table.expire() == [1] and 2 in table and table.expired == 1
    table.open(3, start=True)
    now[0] = 13
    table.open(4, start=True)                # full: the least recently used (2) goes
    assert 2 not in table and {3, 4} == {k for k in (3, 4) if k in table}
    assert table.evicted == 1
    table.close(3)
    assert 3 not in table and table.ended == 1
    with pytest.raises(Exception, match="timeout must be positive"):
        StreamTable(idle_timeout_s=0)


def test_the_server_frees_idle_streams_without_traffic(tiny_bundle):
    """The sweep the server runs frees a stream idle past the timeout though no request comes."""
    import threading
    import time
    s = Server([tiny_bundle], stream_idle_s=0.2)
    s.models = s.load()                  # the bundles, without Triton
    table = s.models[0].streams
    with table.lock:
        table.open(5, start=True)
    sweeper = threading.Thread(target=s._sweep, daemon=True)
    sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while 5 in table and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 5 not in table and table.expired == 1
    finally:
        s.stop()
        sweeper.join(5)
    assert not sweeper.is_alive()


def test_metrics_render_in_prometheus_text(tiny_bundle):
    model = ServedModel("tiny", [load(tiny_bundle)])
    model.infer([request(varied_clips(3).numpy())])
    text = render([model.metrics])
    assert 'adaedge_clips_total{model="tiny"} 3' in text
    assert 'adaedge_batch_clips_bucket{model="tiny",le="4"} 1' in text
    assert "adaedge_gflops_saved_total" in text and "adaedge_branch_clips_total" in text
    assert "# TYPE adaedge_batch_clips histogram" in text


def test_without_pytriton_serving_says_which_extra(monkeypatch, capsys, tiny_bundle):
    from adaedge.cli import main
    from adaedge.serve import serving_environment
    monkeypatch.setitem(sys.modules, "pytriton", None)
    with pytest.raises(MissingExtra, match="'serve' extra"):
        serving_environment()
    assert main(["serve", str(tiny_bundle), "--port", "18123"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'adaedge[serve]'" in err


def test_a_python_whose_libpython_the_stub_would_not_load_is_refused(monkeypatch):
    """Triton's Python stub must load this interpreter's own libpython (the cause of the
    '_recursion_count' failure with pyenv's 3.11.7 and Debian's 3.11.2 library): it is put first
    on LD_LIBRARY_PATH, and where the stub would still load another, or there is none, serving
    is refused in one line."""
    from adaedge.serve import environment as env
    monkeypatch.setattr(env, "require", lambda *a: None)
    monkeypatch.setattr(env, "_stub", lambda: Path("/nowhere/stub"))
    monkeypatch.setattr(env, "own_libpython", lambda: None)
    with pytest.raises(ServeUnavailable, match="no shared libpython"):
        env.serving_environment()
    ours = Path("/opt/py/lib/libpython3.11.so.1.0")
    monkeypatch.setattr(env, "own_libpython", lambda: ours)
    monkeypatch.setattr(env, "_resolved_libpython", lambda stub, e: "/usr/lib/libpython3.11.so.1.0")
    with pytest.raises(ServeUnavailable, match="would load /usr/lib/libpython3.11.so.1.0"):
        env.serving_environment()
    monkeypatch.setattr(env, "_resolved_libpython", lambda stub, e: str(ours))
    monkeypatch.setenv("LD_LIBRARY_PATH", "/x:/opt/py/lib")
    assert env.serving_environment()["LD_LIBRARY_PATH"] == "/opt/py/lib:/x"


def test_bad_options_are_one_line_errors(capsys, tiny_bundle):
    from adaedge.cli import main
    assert main(["serve", str(tiny_bundle), "--queue-timeout-ms", "0"]) == 2
    assert main(["serve", f"a={tiny_bundle}", f"a={tiny_bundle}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("adaedge: error:") for e in err)


# -- the real server ------------------------------------------------------------------------------

def _can_serve() -> str:
    """Empty where Triton can be started here; otherwise why not."""
    try:
        from adaedge.serve import serving_environment
        serving_environment()
    except (MissingExtra, ServeUnavailable) as e:
        return str(e)
    return ""


WHY_NOT = _can_serve()
needs_server = pytest.mark.skipif(bool(WHY_NOT), reason=f"cannot start Triton here: {WHY_NOT}")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def server(tiny_bundle, stream_bundle) -> Iterator[Server]:
    if WHY_NOT:
        pytest.skip(f"cannot start Triton here: {WHY_NOT}")
    port = free_port(count=4)
    s = Server([ModelSpec(tiny_bundle, "tiny"), ModelSpec(tiny_bundle, "tiny_static", "static"),
                ModelSpec(stream_bundle, "fuse")], http_port=port, max_batch=8,
               max_queue_delay_ms=20)
    with s:
        yield s


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_answers_equal_classify(server, tiny_bundle, protocol):
    """Concurrent requests that Triton batches: every answer equals classify on its clips."""
    client, mod = _client(server, protocol)
    assert client.is_server_ready() and client.is_model_ready("tiny")
    rt = load(tiny_bundle)
    x = varied_clips(12).numpy()
    want = rt.classify(x)

    def ask(i: int) -> Dict[str, np.ndarray]:
        c, _ = _client(server, protocol)
        return _infer(c, mod, "tiny", x[i:i + 1])

    with futures.ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(ask, range(12)))
    for i, out in enumerate(outs):
        assert close(out["scores"], want.scores[i:i + 1]) < RTOL, i
        assert out["label"].item() == want.labels[i]
        assert json.loads(out["branches"].item()) == want.traces[i].branches
        assert out["flops"].item() == want.traces[i].flops
    static = _infer(client, mod, "tiny_static", x[:2])
    assert close(static["scores"], rt.classify(x[:2], force="static").scores) < RTOL


@needs_server
def test_served_streams_keep_their_own_state(server, stream_bundle):
    import tritonclient.grpc as grpc
    client = grpc.InferenceServerClient(server.grpc_url)
    rt = load(stream_bundle)
    a, b = frames(3, seed=4), frames(3, seed=5)
    sa, sb = Stream(rt), Stream(rt)
    for i in range(3):
        for cam, x, alone in ((7, a, sa), (8, b, sb)):
            out = _infer(client, grpc, "fuse", x[i:i + 1], stream=cam, start=i == 0, end=i == 2)
            assert close(out["scores"], alone.step(x[i:i + 1]).scores) < RTOL
            assert out["stream_position"].item() == i + 1
    # a whole clip of T frames in one request runs frame by frame on the stream's state
    clip = frames(1, t=4, seed=6)
    out = _infer(client, grpc, "fuse", clip, stream=9, start=True, end=True)
    assert close(out["scores"], rt.classify(clip).scores) < RTOL


@needs_server
def test_ready_metrics_and_adaptation_counters(server):
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as r:
        assert r.status == 200
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        triton = r.read().decode()
    assert 'nv_inference_request_success{model="tiny"' in triton
    with urllib.request.urlopen(server.adaedge_metrics_url, timeout=5) as r:
        ours = r.read().decode()
    assert 'adaedge_clips_total{model="tiny"}' in ours and "adaedge_branch_clips_total" in ours


def test_a_bundle_that_fails_to_load_keeps_the_server_from_starting(tmp_path, tiny_bundle,
                                                                     capsys):
    """Every bundle loads before Triton starts: a broken one raises, and nothing listens."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json", encoding="utf-8")
    port = free_port(count=4)
    s = Server([tiny_bundle, bad], http_port=port)
    if WHY_NOT:
        with pytest.raises((MissingExtra, ServeUnavailable)):
            s.start()
    else:
        with pytest.raises(BundleError):
            s.start()
        assert not listening(port) and not listening(port + 1)
    from adaedge.cli import main
    assert main(["serve", str(tiny_bundle), str(bad), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("adaedge: error:")


@needs_server
def test_overload_is_refused_with_tritons_error_never_dropped(tiny_bundle):
    """A queue of one request and a burst of 48 requests of 8 clips each: every request gets
    its answer or Triton's refusal, none is lost."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException
    port = free_port(count=4)
    x = varied_clips(8).numpy()
    want = load(tiny_bundle).classify(x).scores
    results: List[Any] = []
    with Server([ModelSpec(tiny_bundle, "tiny")], http_port=port, max_batch=8, max_queue=1,
                max_queue_delay_ms=0) as s:
        client = grpc.InferenceServerClient(s.grpc_url)
        inp = grpc.InferInput("clips", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        done = futures.Future()                     # type: ignore[var-annotated]

        def callback(result: Any, error: Any) -> None:
            results.append(error if error is not None else result.as_numpy("scores"))
            if len(results) == 48:
                done.set_result(True)

        for _ in range(48):
            client.async_infer("tiny", [inp], callback)
        done.result(timeout=120)
        client.close()
    answered = [r for r in results if not isinstance(r, InferenceServerException)]
    refused = [str(r) for r in results if isinstance(r, InferenceServerException)]
    assert len(answered) + len(refused) == 48
    assert all(close(a, want) < RTOL for a in answered)
    assert answered and refused, (len(answered), refused[:1])
    # Triton's own refusals: the queue was full, or a request waited past the queue timeout
    assert all("Exceeds maximum queue size" in r or "Request timeout expired" in r
               for r in refused), refused[:3]


@needs_server
def test_the_command_serves_until_interrupted(tiny_bundle, tmp_path):
    """`adaedge serve --json` prints its endpoints when ready, answers, and stops on SIGTERM
    (what an orchestrator sends; Ctrl-C's SIGINT takes the same path)."""
    import signal
    import subprocess
    import tritonclient.http as http
    port = free_port(count=4)
    proc = subprocess.Popen([sys.executable, "-m", "adaedge", "serve", f"tiny={tiny_bundle}",
                             "--port", str(port), "--json", "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()          # printed once ready
        info = json.loads(line)
        assert info["http"] == f"127.0.0.1:{port}" and info["models"][0]["name"] == "tiny"
        client = http.InferenceServerClient(info["http"])
        assert client.is_server_ready()
        x = varied_clips(2).numpy()
        out = _infer(client, http, "tiny", x)
        assert close(out["scores"], load(tiny_bundle).classify(x).scores) < RTOL
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _client(server: Server, protocol: str) -> Tuple[Any, Any]:
    if protocol == "http":
        import tritonclient.http as http
        return http.InferenceServerClient(server.http_url), http
    import tritonclient.grpc as grpc
    return grpc.InferenceServerClient(server.grpc_url), grpc


def _infer(client: Any, mod: Any, model: str, x: np.ndarray, stream: int = 0,
           start: bool = False, end: bool = False) -> Dict[str, np.ndarray]:
    inputs: List[Any] = []
    n = x.shape[0]
    arrays = [("clips", x, "FP32")]
    if stream:
        arrays += [("stream_id", np.full((n, 1), stream, np.uint64), "UINT64"),
                   ("stream_start", np.full((n, 1), start), "BOOL"),
                   ("stream_end", np.full((n, 1), end), "BOOL")]
    for name, arr, dtype in arrays:
        inp = mod.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    result = client.infer(model, inputs)
    return {k: result.as_numpy(k) for k in ("scores", "label", "branches", "flops", "exit",
                                            "stream_position")}


@needs_server
def test_ready_only_when_every_model_answers(tiny_bundle, stream_bundle, tmp_path):
    """A client (a Kubernetes readiness probe) polls /v2/health/ready from the first moment the
    port listens; at its first 200 it asks every model for its metadata and an answer at once:
    none may be missing ('404 unknown model') or fail."""
    import subprocess
    import time
    import urllib.error
    import tritonclient.http as http
    port = free_port(count=4)
    proc = subprocess.Popen([sys.executable, "-m", "adaedge", "serve", f"tiny={tiny_bundle}",
                             f"fuse={stream_bundle}", "--port", str(port), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 180
        polls = 0
        while True:
            assert proc.poll() is None, "the server ended before it was ready"
            assert time.monotonic() < end, "never ready"
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            polls += 1
            time.sleep(0.01)
        for name in ("tiny", "fuse"):            # at once: no sleep after readiness
            with urllib.request.urlopen(f"{base}/v2/models/{name}", timeout=5) as r:
                assert r.status == 200 and json.loads(r.read())["name"] == name
        client = http.InferenceServerClient(f"127.0.0.1:{port}")
        x = varied_clips(1).numpy()
        out = _infer(client, http, "tiny", x)
        assert close(out["scores"], load(tiny_bundle).classify(x).scores) < RTOL
        out = _infer(client, http, "fuse", frames(1), stream=7, start=True)
        assert out["stream_position"].ravel().tolist() == [1]
        assert polls > 0                      # it was asked before it was ready, and said no
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
