"""Train a small AdaFocusV3 on the procedural motion data set (:mod:`adaedge.data`) on the CPU.

    adaedge train --model adafocus_v3 --out focus.pt [--minutes 8] [--train-clips 12000]

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
from ..data import CLASSES, MotionDataset
from ..models.adafocus_v3 import AdaFocusV3
from .vared import normalise

Log = Callable[[str], None]


def train_focus(out: str, minutes: float = 8.0, train_clips: int = 12000, batch: int = 64,
                lr: float = 3e-3, seed: int = 0, config: Optional[Dict[str, Any]] = None,
                log: Log = print) -> AdaFocusV3:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = {"num_classes": len(CLASSES), "frames": 8, "size": 32}
    cfg.update(config or {})
    model = models.create("adafocus_v3", **cfg)
    assert isinstance(model, AdaFocusV3)
    t0 = time.perf_counter()
    ds = MotionDataset("train", frames=cfg["frames"], size=cfg["size"], length=train_clips)
    x, y = ds.arrays()
    x = normalise(x)
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
                   val_clips: int = 1000, test_clips: int = 1000,
                   log: Log = print) -> Dict[str, Any]:
    """Export, calibrate exits on val for budgets between the glance's and all cubes' cost, and
    measure top-1 and GFLOPs on test for each budget and for all cubes."""
    from .. import runtime
    from ..calibration.exits import calibrate_exits, evaluate_budgets
    from ..export import export
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "b"
        manifest = export(model, out, labels=list(CLASSES), weights={"source": "training"})
        rt = runtime.load(out)
        costs = [manifest.pieces[p].flops for p in manifest.pieces]
        glance = manifest.pieces["glance"].flops / 1e9
        full = sum(costs) / 1e9
        budgets = [round(glance + f * (full - glance), 6) for f in budgets_fraction]
        xv, yv = MotionDataset("val", frames=model.frames, size=model.size,
                               length=val_clips).arrays()
        report = calibrate_exits(out, normalise(xv), yv, budgets)
        rt = runtime.load(out)
        xt, yt = MotionDataset("test", frames=model.frames, size=model.size,
                               length=test_clips).arrays()
        keys = [None] + [format(b, "g") for b in budgets]
        rows = evaluate_budgets(rt, normalise(xt), yt, keys)
    for r in rows:
        log(f"{r['budget']:>12}: top-1 {r['accuracy']:.3f}  {r['gflops']:.5f} GFLOPs  "
            f"exits {r['exits']}")
    return {"rows": rows, "calibration": report.to_json(), "glance_gflops": glance,
            "all_gflops": full}


def write_card(path: Path, model: torch.nn.Module, result: Dict[str, Any], command: str) -> None:
    lines = [f"# {path.stem.replace('.pt', '')}: AdaFocusV3 on the procedural motion data set", "",
             f"Config: `{models.model_config(model)}`.", "",
             "Trained by adaedge on the CPU with:", "", f"    {command}", "",
             "Evaluated as deployed (exported, ONNX Runtime, CPU): exit thresholds calibrated on "
             "the validation split (1000 clips, criterion entropy), top-1 and mean GFLOPs per "
             "clip on the test split (1000 clips):", "",
             "| budget (GFLOPs) | top-1 | mean GFLOPs | clips leaving at each stage |",
             "| --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['budget']} | {r['accuracy']:.3f} | {r['gflops']:.5f} | {r['exits']} |")
    lines += ["", f"The glance alone costs {result['glance_gflops']:.5f} GFLOPs, the glance and "
              f"every cube {result['all_gflops']:.5f}.", ""]
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
                            args.seed, log=log)
    result = evaluate_focus(model, log=log)
    command = "adaedge train --model adafocus_v3 " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[3:]))
    if args.evaluate_only:
        _, meta = models.read_checkpoint(args.out)
        command = str(meta.get("command", command))
    models.save_checkpoint(model, args.out, extra={"labels": list(CLASSES), "command": command,
                                                   "evaluation": {
        "rows": result["rows"], "glance_gflops": result["glance_gflops"],
        "all_gflops": result["all_gflops"]}})
    card = Path(str(args.out)).with_suffix(".md")
    write_card(card, model, result, command)
    print(f"wrote {args.out} and {card}")
    return 0
