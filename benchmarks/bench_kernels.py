"""The plugin kernels against their standard-op bodies on a CUDA GPU: same results, and the time
of each (CUDA events, median of repetitions), at VA-RED² and TAda2D sizes, batch 1 and 16.

    python benchmarks/bench_kernels.py [--reps 50] [--json]

Kernels come from ``adaedge/plugins/kernels/adaedge_kernels.cu`` (the file the TensorRT plugins
compile), built with CuPy's RawModule; the bodies are what the custom nodes' ONNX functions compute,
run by PyTorch (cuDNN, TF32 off). A kernel worth making a plugin's default must beat its body here.
Without CuPy or a CUDA GPU it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

KERNELS = Path(__file__).resolve().parents[1] / "adaedge" / "plugins" / "kernels" / "adaedge_kernels.cu"


def _timed(torch: Any, fn: Callable[[], Any], reps: int) -> float:
    """Median milliseconds of ``fn`` on the GPU (CUDA events around each call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def _grid(total: int) -> tuple:
    return (min((total + 255) // 256, 65535 * 4),)


def main(argv: Any = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        import cupy as cp
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"bench_kernels: needs CuPy and PyTorch ({e})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    module = cp.RawModule(code=KERNELS.read_text())
    fill_c = module.get_function("adaedge_channel_fill")
    fill_t = module.get_function("adaedge_temporal_fill")
    calconv = module.get_function("adaedge_calibrated_conv")
    dev = torch.device("cuda")
    i32 = np.int32
    rows: List[Dict[str, Any]] = []

    def record(name: str, batch: int, kernel: Callable[[], Any], body: Callable[[], Any],
               out: Any) -> None:
        kernel()
        torch.cuda.synchronize()
        want = body()
        err = float((out - want).abs().max() / want.abs().max().clamp_min(1e-12))
        rows.append({"kernel": name, "batch": batch, "rel_error": err,
                     "kernel_ms": _timed(torch, kernel, args.reps),
                     "body_ms": _timed(torch, body, args.reps)})

    for n in (1, 16):
        # channel fill, R(2+1)D-18 stage 1 (64 filters, half computed, 8 frames of 56x56)
        cc, t, h, w, k = 72, 8, 56, 56, 3
        y = torch.rand(n, cc, t, h, w, device=dev)
        wt, b = torch.randn(cc, k, k, device=dev), torch.randn(cc, device=dev)
        out = torch.empty(n, 2 * cc, t, h, w, device=dev)
        total = out.numel()
        record("channel_fill", n,
               lambda: fill_c(_grid(total), (256,), (y.data_ptr(), wt.data_ptr(), b.data_ptr(),
                                                     out.data_ptr(), i32(n), i32(cc), i32(1),
                                                     i32(t), i32(h), i32(w), i32(k), i32(1))),
               lambda: torch.cat([y, F.relu(F.conv3d(y, wt.reshape(-1, 1, 1, k, k), b,
                                                     padding=(0, 1, 1), groups=cc))], 1),
               out)
        # temporal fill at stride 2: 4 computed frames rebuild 8
        c, tc, r = 64, 4, 2
        y2 = torch.rand(n, c, tc, h, w, device=dev)
        wt2, b2 = torch.randn(c * (r - 1), k, k, device=dev), torch.randn(c * (r - 1), device=dev)
        out2 = torch.empty(n, c, tc * r, h, w, device=dev)
        total2 = out2.numel()

        def temporal_body() -> Any:
            f = F.relu(F.conv3d(y2, wt2.reshape(-1, 1, 1, k, k), b2, padding=(0, 1, 1), groups=c))
            return torch.stack([F.relu(y2), f], 3).reshape(n, c, tc * r, h, w)
        record("temporal_fill", n,
               lambda: fill_t(_grid(total2), (256,), (y2.data_ptr(), wt2.data_ptr(), b2.data_ptr(),
                                                      out2.data_ptr(), i32(n), i32(c), i32(tc),
                                                      i32(r), i32(tc * r), i32(h), i32(w), i32(k),
                                                      i32(1))),
               temporal_body, out2)
        # calibrated convolution: TAda2D-R50 stage 2's 3x3 (128 channels, 28x28), 8 frames
        nt, cin, cout, hh = n * 8, 128, 128, 28
        x = torch.randn(nt, cin, hh, hh, device=dev)
        wc = torch.randn(cout, cin, 3, 3, device=dev) * 0.05
        alpha = torch.rand(nt, cin, device=dev) + 0.5
        bias = torch.randn(cout, device=dev)
        out3 = torch.empty(nt, cout, hh, hh, device=dev)
        total3 = out3.numel()
        record("calibrated_conv", n,
               lambda: calconv(_grid(total3), (256,), (x.data_ptr(), wc.data_ptr(), alpha.data_ptr(),
                                                       bias.data_ptr(), out3.data_ptr(), i32(nt),
                                                       i32(cin), i32(hh), i32(hh), i32(cout), i32(1),
                                                       i32(3), i32(3), i32(1), i32(1), i32(1), i32(1),
                                                       i32(1), i32(1), i32(hh), i32(hh), i32(1))),
               lambda: F.conv2d(x * alpha[:, :, None, None], wc, bias, padding=1), out3)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cupy": cp.__version__, "reps": args.reps, "rows": rows}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['device']}, torch {report['torch']}, CuPy {report['cupy']}")
        print(f"{'kernel':<16}{'batch':>6}{'kernel ms':>11}{'body ms':>10}{'rel err':>10}")
        for r in rows:
            print(f"{r['kernel']:<16}{r['batch']:>6}{r['kernel_ms']:>11.3f}{r['body_ms']:>10.3f}"
                  f"{r['rel_error']:>10.1e}")
    return 0 if all(r["rel_error"] <= 1e-4 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
