"""Train a small AdaFocusV3 on the CPU: on the procedural motion clips (default, the shipped
checkpoint's data) or on what a camera does (real images, :mod:`adaedge.data.camera`,
``--data camera``).

    adaedge train --model adafocus_v3 --out focus.pt [--minutes 8] [--data motion|camera]

Every stage is trained at once: the loss is the mean cross-entropy of the glance's prediction and
of the prediction after each cube, so that every exit is worth stopping at; the policy learns the
cube centres end to end through the interpolating crop. Then the model is evaluated the way it is
deployed: exported, exit thresholds calibrated on the validation split for a few budgets, and
top-1 against mean GFLOPs measured on the test split through ONNX Runtime; the checkpoint is saved
with a model card holding that table.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import models
from ..models.adafocus_v3 import AdaFocusV3
from .vared import DATASETS, normalise

SIZES = {"camera": 32, "motion": 32}   # the default glance (16) divides 32


def _clips(data: str, split: str, frames: int, size: int, length: int) -> Any:
    kind: Any = DATASETS[data][0]
    ds = kind(split, frames=frames, size=size, length=length)
    x, y = ds.arrays_uint8() if hasattr(ds, "arrays_uint8") else ds.arrays()
    return normalise(x), y

Log = Callable[[str], None]


def train_focus(out: str, minutes: float = 8.0, train_clips: int = 12000, batch: int = 64,
                lr: float = 3e-3, seed: int = 0, config: Optional[Dict[str, Any]] = None,
                log: Log = print, data: str = "motion") -> AdaFocusV3:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = {"num_classes": len(DATASETS[data][1]), "frames": 8, "size": SIZES[data]}
    cfg.update(config or {})
    model = models.create("adafocus_v3", **cfg)
    assert isinstance(model, AdaFocusV3)
    t0 = time.perf_counter()
    x, y = _clips(data, "train", cfg["frames"], cfg["size"], train_clips)
    log(f"rendered {len(y)} training clips in {time.perf_counter() - t0:.0f}s")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x) / batch)
    budget = minutes * 60.0
    total = 10 ** 9
    step = 0
    t0 = time.perf_counter()
    run = np.zeros(model.num_cubes + 2)
    while True:
        order = rng.permutation(len(x))
        for b in range(steps_per_epoch):
            elapsed = time.perf_counter() - t0
            if step >= 10 and step % 10 == 0:
                total = max(step + 1, int(budget / (elapsed / step)))
            if elapsed > budget:
                model.eval()
                return model
            rate = lr * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
            for group in opt.param_groups:
                group["lr"] = rate
            idx = order[b * batch:(b + 1) * batch]
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            model.train()
            stages = model.stage_logits(xb)
            losses = [F.cross_entropy(s, yb) for s in stages]
            loss = torch.stack(losses).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            run[0] += 1
            run[1:] += [float((s.argmax(1) == yb).float().mean()) for s in stages]
            if step % 50 == 0:
                accs = " ".join(f"{a:.2f}" for a in run[1:] / run[0])
                log(f"step {step}/{total}  loss {float(loss.detach()):.3f}  train acc per stage {accs}  "
                    f"{elapsed / 60:.1f}/{minutes:g} min")
                run[:] = 0


def evaluate_focus(model: AdaFocusV3,
                   budgets_fraction: Sequence[float] = (0.01, 0.03, 0.08, 0.25),
                   val_clips: Optional[int] = None, test_clips: Optional[int] = None,
                   log: Log = print, data: str = "motion") -> Dict[str, Any]:
    """Export, calibrate exits on val for budgets between the glance's and all cubes' cost, and
    measure top-1 and GFLOPs on test for each budget, for all cubes and for the glance alone."""
    labels = list(DATASETS[data][1])
    standard = 900 if data == "camera" else 1000     # the splits' sizes (camera: 9 x 100)
    val_clips = val_clips or standard
    test_clips = test_clips or standard
    from .. import runtime
    from ..calibration.exits import calibrate_exits, evaluate_budgets
    from ..export import export
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "b"
        manifest = export(model, out, labels=labels, weights={"source": "training"})
        rt = runtime.load(out)
        costs = [manifest.pieces[p].flops for p in manifest.pieces]
        glance = manifest.pieces["glance"].flops / 1e9
        full = sum(costs) / 1e9
        budgets = [round(glance + f * (full - glance), 6) for f in budgets_fraction]
        xv, yv = _clips(data, "val", model.frames, model.size, val_clips)
        report = calibrate_exits(out, xv, yv, budgets)
        rt = runtime.load(out)
        xt, yt = _clips(data, "test", model.frames, model.size, test_clips)
        keys = [None] + [format(b, "g") for b in budgets]
        rows = evaluate_budgets(rt, xt, yt, keys)
        first = rt.manifest.exits()[0].name
        g = rt.classify_batches(xt, 64, exit_at=first)
        rows.append({"budget": "glance-only", "accuracy": float((g.labels == yt).mean()),
                     "gflops": float(np.mean([t.flops for t in g.traces]) / 1e9),
                     "exits": {first: len(yt)}})
    for r in rows:
        log(f"{r['budget']:>12}: top-1 {r['accuracy']:.3f}  {r['gflops']:.5f} GFLOPs  "
            f"exits {r['exits']}")
    return {"rows": rows, "calibration": report.to_json(), "glance_gflops": glance,
            "all_gflops": full, "data": data, "test_clips": test_clips, "val_clips": val_clips}


def write_card(path: Path, model: torch.nn.Module, result: Dict[str, Any], command: str) -> None:
    data = result.get("data", "motion")
    what = ("what the camera does (adaedge.data.camera: real photographs and video frames; the "
            "test split is held-out real footage)" if data == "camera"
            else "the procedural motion data set")
    rows = {r["budget"]: r for r in result["rows"]}
    margin = ""
    if "all-cubes" in rows and "glance-only" in rows:
        gain = rows["all-cubes"]["accuracy"] - rows["glance-only"]["accuracy"]
        margin = (f"Looking closer: all cubes {rows['all-cubes']['accuracy']:.3f} top-1 against "
                  f"{rows['glance-only']['accuracy']:.3f} for the glance alone "
                  f"({gain * 100:+.1f} points).")
    lines = [f"# {path.stem.replace('.pt', '')}: AdaFocusV3 on {what}", "",
             f"Config: `{models.model_config(model)}`.", "",
             "Trained by adaedge on the CPU with:", "", f"    {command}", "",
             "Evaluated as deployed (exported, ONNX Runtime, CPU): exit thresholds calibrated on "
             f"the validation split ({result.get('val_clips', 1000)} clips, criterion entropy), "
             "top-1 and mean GFLOPs per clip on the test split "
             f"({result.get('test_clips', 1000)} clips):", "",
             "| budget (GFLOPs) | top-1 | mean GFLOPs | clips leaving at each stage |",
             "| --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['budget']} | {r['accuracy']:.3f} | {r['gflops']:.5f} | {r['exits']} |")
    lines += ["", f"The glance alone costs {result['glance_gflops']:.5f} GFLOPs, the glance and "
              f"every cube {result['all_gflops']:.5f}. {margin}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="adaedge train --model adafocus_v3",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--train-clips", type=int, default=12000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=sorted(DATASETS), default="motion",
                   help="motion: the procedural motion clips (default: the shipped checkpoint's "
                        "data); camera: what a camera does, on real images")
    p.add_argument("--evaluate-only", action="store_true",
                   help="do not train: evaluate the checkpoint at --out and rewrite its card")
    args = p.parse_args(argv)
    log: Log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.evaluate_only:
        loaded = models.load_model(args.out).eval()
        assert isinstance(loaded, AdaFocusV3)
        model = loaded
    else:
        model = train_focus(args.out, args.minutes, args.train_clips, args.batch, args.lr,
                            args.seed, log=log, data=args.data)
    data = args.data
    if args.evaluate_only:
        _, meta = models.read_checkpoint(args.out)
        data = str(meta.get("data", "motion"))
    result = evaluate_focus(model, log=log, data=data)
    command = "adaedge train --model adafocus_v3 " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[3:]))
    if args.evaluate_only:
        _, meta = models.read_checkpoint(args.out)
        command = str(meta.get("command", command))
    models.save_checkpoint(model, args.out, extra={"labels": list(DATASETS[data][1]),
                                                   "command": command, "data": data,
                                                   "evaluation": {
        "rows": result["rows"], "glance_gflops": result["glance_gflops"],
        "all_gflops": result["all_gflops"]}})
    card = Path(str(args.out)).with_suffix(".md")
    write_card(card, model, result, command)
    print(f"wrote {args.out} and {card}")
    return 0
