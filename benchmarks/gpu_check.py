"""Everything a lent GPU should run, as one command with one JSON of results (under 8 minutes).

    benchmarks/gpu_check.sh [OUT_DIR]          # or: python3 benchmarks/gpu_check.py [OUT_DIR]

Steps, each under its own time limit, its log kept beside the JSON:

1. ``env``: the GPU (nvidia-smi), Python, PyTorch, CUDA, cuDNN, ONNX Runtime, CuPy, TensorRT;
2. ``tests``: the CUDA tests (torch-cuda verifies every family with CUDA graphs, bounded graph
   caches, replays that do not alias, kernels against their bodies; TensorRT's tests where
   TensorRT is installed), as a JUnit summary;
3. ``verify``: ``adaedge verify`` of a full-size VA-RED² R(2+1)D-18 (8x112x112) on torch-cuda,
   every branch forced (tolerance 1e-4, TF32 off);
4. ``bench``: ``bench_gpu.py`` on torch-cuda at batch 1 and 16 (realisation of all-half,
   all-stride2, cheapest; the gates' decision time);
5. ``kernels``: ``bench_kernels.py``, the plugin kernels against their standard-op bodies.

The JSON (``gpu_check.json``) holds each step's exit status, seconds, and parsed results; the
figures go into ``benchmarks/RESULTS.md`` with the device. Steps run from the repository root with
the repository on ``PYTHONPATH`` (nothing is installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

ENV_PROBE = r"""
import json, platform
out = {"python": platform.python_version()}
try:
    import torch
    out.update(torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), gpu_visible=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1))
except Exception as e:
    out["torch_error"] = str(e)
for name in ("onnxruntime", "onnx", "cupy", "tensorrt", "numpy"):
    try:
        out[name] = __import__(name).__version__
    except Exception:
        out[name] = None
try:
    import onnxruntime
    out["onnxruntime_providers"] = onnxruntime.get_available_providers()
except Exception:
    pass
print(json.dumps(out))
"""


def run(name: str, cmd: List[str], limit: int, out: Path, env: Dict[str, str]) -> Dict[str, Any]:
    t0 = time.perf_counter()
    log = out / f"{name}.log"
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")) + \
            f"\n[gpu_check: {name} passed its {limit} s limit]"
    log.write_text(f"$ {' '.join(cmd)}\n{stdout}\n--- stderr ---\n{stderr}")
    seconds = round(time.perf_counter() - t0, 1)
    print(f"gpu_check: {name}: exit {rc} in {seconds} s", file=sys.stderr, flush=True)
    return {"rc": rc, "seconds": seconds, "stdout": stdout, "log": log.name}


def last_json(text: str) -> Optional[Any]:
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def junit(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {}
    cases: Dict[str, str] = {}
    for case in suite.iter("testcase"):
        key = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            cases[key] = "failed"
        elif case.find("skipped") is not None:
            cases[key] = "skipped: " + (case.find("skipped").get("message") or "")[:120]
        else:
            cases[key] = "passed"
    return {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out = Path(args[0] if args else os.environ.get("OUT") or "gpu-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    work = out / "work"
    work.mkdir(exist_ok=True)
    results: Dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}

    env_step = run("env", [PY, "-c", ENV_PROBE], 120, out, env)
    results["env"] = last_json(env_step["stdout"]) or {}
    smi = run("nvidia-smi", ["nvidia-smi", "-L"], 30, out, env) if \
        any((Path(p) / "nvidia-smi").exists() for p in os.environ.get("PATH", "").split(":")) else None
    if smi:
        results["env"]["nvidia_smi"] = smi["stdout"].strip()

    tests = run("tests", [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          f"--junitxml={out / 'junit.xml'}",
                          "tests/test_gpu_path.py", "tests/test_torch_backend.py",
                          "tests/test_plugins.py", "tests/test_tensorrt.py"], 240, out, env)
    results["tests"] = {"rc": tests["rc"], "seconds": tests["seconds"],
                        **junit(out / "junit.xml")}

    bundle = work / "r2plus1d"
    verify = run("verify", [PY, "-m", "adaedge.cli", "export", "vared_r2plus1d_18",
                            "--random-weights", "--out", str(bundle), "--overwrite", "-q"],
                 150, out, env)
    if verify["rc"] == 0:
        verify = run("verify", [PY, "-m", "adaedge.cli", "verify", str(bundle), "--backend",
                                "torch-cuda", "--json", "-q"], 150, out, env)
    results["verify"] = {"rc": verify["rc"], "seconds": verify["seconds"],
                         "report": last_json(verify["stdout"])}

    bench = run("bench", [PY, "benchmarks/bench_gpu.py", "--backend", "torch-cuda", "--batch",
                          "1", "16", "--reps", "30", "--workdir", str(work / "bench"), "--json"],
                180, out, env)
    results["bench"] = {"rc": bench["rc"], "seconds": bench["seconds"],
                        "report": last_json(bench["stdout"])}

    kernels = run("kernels", [PY, "benchmarks/bench_kernels.py", "--json"], 90, out, env)
    results["kernels"] = {"rc": kernels["rc"], "seconds": kernels["seconds"],
                          "report": last_json(kernels["stdout"])}

    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: (v.get("rc") if isinstance(v, dict) and "rc" in v else None)
                      for k, v in results.items() if isinstance(v, dict)}))
    return 0 if all(results[k]["rc"] == 0 for k in ("tests", "verify", "bench", "kernels")) else 1


if __name__ == "__main__":
    sys.exit(main())
