"""Train a small VA-RED² R(2+1)D on the procedural motion data set (:mod:`adaedge.data`) on the CPU.

    adaedge train --out demo.pt [--minutes 15] [--width-mult 0.25] [--layers 1,1,1,1]

Loss: cross-entropy + ``eff_weight`` x the paper's efficiency loss (clips the network gets right
are pushed towards cheaper branches). The dynamic layers train with straight-through hard branch
selection (``DynamicConv3d.mix = "hard"``, see :mod:`adaedge.nn.vared`). At the end the model is
evaluated the way it is deployed: exported to a bundle and run on ONNX Runtime over the test split,
reporting top-1 and mean GFLOPs per clip for each class.
"""

from __future__ import annotations

import math
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import models
from ..data import CLASSES, MotionDataset
from ..models.registry import KINETICS_MEAN, KINETICS_STD
from ..models.vared_r2plus1d import VaRedR2Plus1D

Log = Callable[[str], None]


@dataclass
class TrainConfig:
    out: str = "demo.pt"
    frames: int = 8
    size: int = 32
    width_mult: float = 0.25
    layers: Sequence[int] = (1, 1, 1, 1)
    train_clips: int = 6000
    test_clips: int = 1000
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    eff_weight: float = 0.5
    minutes: float = 15.0
    static_share: float = 0.45
    branch_share: float = 0.15

    max_epochs: int = 50
    seed: int = 0
    threads: Optional[int] = None
    command: str = ""


@dataclass
class TrainResult:
    accuracy: float
    gflops_per_class: Dict[str, float]
    static_gflops: float
    epochs: float
    minutes: float
    losses: List[float] = field(default_factory=list)

    @property
    def still_gflops(self) -> float:
        return self.gflops_per_class["still"]

    @property
    def moving_gflops(self) -> float:
        moving = [v for k, v in self.gflops_per_class.items() if k != "still"]
        return float(np.mean(moving))


def normalise(clips: np.ndarray) -> np.ndarray:
    mean = np.asarray(KINETICS_MEAN, np.float32).reshape(1, 3, 1, 1, 1)
    std = np.asarray(KINETICS_STD, np.float32).reshape(1, 3, 1, 1, 1)
    return (clips - mean) / std


def build_model(cfg: TrainConfig) -> VaRedR2Plus1D:
    torch.manual_seed(cfg.seed)
    model = models.create("vared_r2plus1d_18", num_classes=len(CLASSES), frames=cfg.frames,
                          size=cfg.size, width_mult=cfg.width_mult, layers=list(cfg.layers))
    assert isinstance(model, VaRedR2Plus1D)
    for _, layer in model.dynamic_layers():
        layer.mix = "hard"
    return model


PHASES = ("static", "branches", "gates")


def _trainable(model: VaRedR2Plus1D, phase: str) -> List[torch.nn.Parameter]:
    """What a phase trains: everything but the gates (static); after that the backbone is frozen,
    batch-norm statistics included, and only the cheap operations (branches) and the cheap
    operations with the gates (gates) learn. A half-channel branch computes exactly the full
    branch's first filters, so the frozen statistics stay right for every branch, and the network
    keeps the static network's accuracy wherever the gates choose the full branch."""
    layers = [m for _, m in model.dynamic_layers()]
    if phase == "static":
        chosen = [p for n, p in model.named_parameters() if ".gate." not in n]
    else:
        chosen = [p for m in layers for p in list(m.channel_fill.parameters())
                  + list(m.temporal_fill.parameters())]
        if phase == "gates":
            chosen += [p for m in layers for p in m.gate.parameters()]
    ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return chosen


def _phase(model: VaRedR2Plus1D, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, name: str,
           minutes: float, lr: float, costs: List[float], rng: np.random.Generator,
           log: Log) -> "tuple[float, List[float]]":
    """One training phase under a time budget with a cosine learning rate; returns epochs, losses.

    ``static``: every gate forced to the full branch. ``branches``: every layer forced to a branch
    drawn at random each step, so that shared weights and cheap operations serve every branch.
    ``gates``: the gates choose (straight-through), with the efficiency loss.
    """
    if name not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}")
    layers = [m for _, m in model.dynamic_layers()]
    model.set_policy(0 if name == "static" else None)
    trainable = _trainable(model, name)
    gate_ids = {id(p) for m in layers for p in m.gate.parameters()}
    groups = [{"params": [p for p in trainable if id(p) not in gate_ids], "scale": 1.0},
              {"params": [p for p in trainable if id(p) in gate_ids], "scale": 4.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr,
                            weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch)
    budget = minutes * 60.0
    losses: List[float] = []
    step, epochs = 0, 0.0
    total = cfg.max_epochs * steps_per_epoch
    t0 = time.perf_counter()
    run_loss, run_acc, n = 0.0, 0.0, 0
    done = False
    for epoch in range(cfg.max_epochs):
        order = rng.permutation(len(x))
        model.train()
        if name != "static":   # the backbone's batch norms keep the static network's statistics
            for layer in layers:
                layer.bn.eval()
        for b in range(steps_per_epoch):
            elapsed = time.perf_counter() - t0
            if step >= 10 and step % 10 == 0:   # schedule length: measured speed x budget
                total = min(cfg.max_epochs * steps_per_epoch,
                            max(step + 1, int(budget / (elapsed / step))))
            if elapsed > budget:
                done = True
                break
            rate = lr * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
            for group in opt.param_groups:
                group["lr"] = rate * group["scale"]   # the small gates learn 4x faster
            idx = order[b * cfg.batch:(b + 1) * cfg.batch]
            xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
            if name == "branches":
                for layer in layers:
                    layer.force = int(rng.integers(len(layer.branches)))
            elif name == "gates":   # anneal the choice from a sample towards the arg-max
                for layer in layers:
                    layer.tau = max(0.2, 1.0 - 0.8 * step / total)
            logits = model(xb)
            ce = F.cross_entropy(logits, yb)
            loss = ce
            if name == "gates":
                loss = ce + cfg.eff_weight * model.efficiency_loss(logits, yb, costs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            epochs = epoch + (b + 1) / steps_per_epoch
            losses.append(float(ce.detach()))
            run_loss += float(ce.detach()) * len(idx)
            run_acc += float((logits.argmax(1) == yb).float().sum())
            n += len(idx)
            if step % 25 == 0:
                speed = step * cfg.batch / (time.perf_counter() - t0)
                log(f"{name} epoch {epoch + 1} step {step}/{total}  loss {run_loss / n:.3f}  "
                    f"train acc {run_acc / n:.3f}  lr {rate:.2e}  {speed:.0f} clips/s  "
                    f"{(time.perf_counter() - t0) / 60:.1f}/{minutes:g} min")
                run_loss, run_acc, n = 0.0, 0.0, 0
        if done:
            break
    model.set_policy(None)
    for p in model.parameters():
        p.requires_grad_(True)
    return epochs, losses


def train(cfg: TrainConfig, log: Log = print) -> "tuple[VaRedR2Plus1D, TrainResult]":
    """Train, evaluate on ONNX Runtime, save the checkpoint (with its model card) to cfg.out.

    Three phases share the time budget (see :func:`_phase` and :func:`_trainable`): the static
    network (fast: it learns the features); then, with the backbone frozen, the cheap operations
    under random forced branches; then the cheap operations and the gates with the efficiency loss.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    log(f"generating {cfg.train_clips} training clips ({cfg.frames}x{cfg.size}x{cfg.size}) ...")
    x_train, y_train = MotionDataset("train", cfg.frames, cfg.size, cfg.train_clips).arrays()
    x_train = normalise(x_train)
    model = build_model(cfg)
    costs = model.layer_costs()
    rng = np.random.default_rng(cfg.seed)
    log(f"training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters for "
        f"{cfg.minutes:g} minutes: static network, then random branches, then the gates")
    t_train = time.perf_counter()
    shares = {"static": cfg.static_share, "branches": cfg.branch_share,
              "gates": 1.0 - cfg.static_share - cfg.branch_share}
    rates = {"static": cfg.lr, "branches": cfg.lr * 0.5, "gates": cfg.lr * 0.5}
    epochs: Dict[str, float] = {}
    losses: List[float] = []
    for name in PHASES:
        left = cfg.minutes - (time.perf_counter() - t_train) / 60
        minutes = left if name == "gates" else cfg.minutes * shares[name]
        done, phase_losses = _phase(model, x_train, y_train, cfg, name, max(minutes, 0.05),
                                    rates[name], costs, rng, log)
        epochs[name] = done
        losses += phase_losses
    train_minutes = (time.perf_counter() - t_train) / 60
    log("trained " + " + ".join(f"{e:.1f} {n}" for n, e in epochs.items()) +
        f" epochs in {train_minutes:.1f} min; evaluating on ONNX Runtime ...")
    result = evaluate(model.eval(), cfg)
    result.epochs, result.minutes, result.losses = sum(epochs.values()), train_minutes, losses
    save(model, cfg, result)
    log(f"test top-1 {result.accuracy:.3f}; GFLOPs per clip: still {result.still_gflops:.4f}, "
        f"moving {result.moving_gflops:.4f}, static network {result.static_gflops:.4f}")
    log(f"saved {cfg.out} and {model_card_path(cfg.out)} "
        f"({(time.perf_counter() - t_start) / 60:.1f} min in all)")
    return model, result


def evaluate(model: VaRedR2Plus1D, cfg: TrainConfig, clips: int = 0) -> TrainResult:
    """Top-1 and GFLOPs per class, measured on the exported bundle with ONNX Runtime."""
    from .. import runtime
    from ..export import export

    n = clips or cfg.test_clips
    x, y = MotionDataset("test", cfg.frames, cfg.size, n).arrays()
    x = normalise(x)
    with tempfile.TemporaryDirectory() as tmp:
        export(model, Path(tmp) / "b", weights={"source": "training"})
        rt = runtime.load(Path(tmp) / "b")
        scores: List[np.ndarray] = []
        flops: List[int] = []
        for i in range(0, n, 50):
            res = rt.classify(x[i:i + 50])
            scores.append(res.scores)
            flops.extend(t.flops for t in res.traces)
        static = rt.manifest.policy_flops("static")
    pred = np.concatenate(scores).argmax(1)
    flops_arr = np.asarray(flops, dtype=np.float64)
    per_class = {c: float(flops_arr[y == k].mean() / 1e9) for k, c in enumerate(CLASSES)}
    return TrainResult(float((pred == y).mean()), per_class, static / 1e9, 0.0, 0.0)


def model_card_path(out: str) -> Path:
    return Path(out).with_suffix(".md")


def save(model: VaRedR2Plus1D, cfg: TrainConfig, result: TrainResult) -> None:
    meta: Dict[str, Any] = {
        "labels": list(CLASSES), "mean": KINETICS_MEAN, "std": KINETICS_STD,
        "trained_on": "adaedge.data.MotionDataset (procedural motion clips)",
        "command": cfg.command, "test_top1": result.accuracy,
        "gflops_per_class": result.gflops_per_class, "static_gflops": result.static_gflops,
    }
    models.save_checkpoint(model, cfg.out, extra=meta)
    rows = "\n".join(f"| {c} | {g:.4f} | {g / result.static_gflops:.2f} |"
                     for c, g in result.gflops_per_class.items())
    card = f"""# Model card: VA-RED² R(2+1)D demo checkpoint

* **What it is**: `vared_r2plus1d_18` with width x{cfg.width_mult}, blocks per stage
  {list(cfg.layers)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, input
  {cfg.frames} frames of {cfg.size}x{cfg.size} RGB normalised with the Kinetics mean and std;
  {len(CLASSES)} classes: {", ".join(CLASSES)}.
* **Made by**: `{cfg.command or "adaedge train"}` on a 2-core CPU in {result.minutes:.1f} minutes
  ({result.epochs:.1f} epochs of {cfg.train_clips} clips in three phases: the static network
  ({cfg.static_share * 100:.0f}% of the time), then, with the backbone and its batch-norm
  statistics frozen, the cheap operations with every layer on a random branch each step
  ({cfg.branch_share * 100:.0f}%), then the gates with loss = cross-entropy + {cfg.eff_weight} x
  the VA-RED² efficiency loss and straight-through hard branch selection, its Gumbel temperature
  annealed from 1 to 0.2 so that training ends on the choices evaluation makes).
* **Accuracy**: top-1 {result.accuracy:.3f} on the {cfg.test_clips} clips of the test split of
  `adaedge.data.MotionDataset`, measured on the exported bundle with ONNX Runtime (free gates).
* **Cost**: the static network costs {result.static_gflops:.4f} GFLOPs per clip. Mean GFLOPs per
  clip with free gates, by class (ratio to static):

| class | GFLOPs | of static |
| --- | --- | --- |
{rows}

Still clips: {result.still_gflops:.4f} GFLOPs; moving clips (mean of the other classes):
{result.moving_gflops:.4f} GFLOPs.

* **What it is not**: it knows synthetic motion of one textured object on a noisy background, not
  Kinetics or any real action. On real video its labels describe the dominant motion at best; it is
  a demonstration of gates adapting to what they see, not a recogniser to rely on.
"""
    model_card_path(cfg.out).write_text(card, encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="adaedge train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo.pt")
    p.add_argument("--minutes", type=float, default=15.0, help="training time budget")
    p.add_argument("--max-epochs", type=int, default=50)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--width-mult", type=float, default=0.25)
    p.add_argument("--layers", default="1,1,1,1", help="blocks per stage")
    p.add_argument("--train-clips", type=int, default=6000)
    p.add_argument("--test-clips", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eff-weight", type=float, default=0.5)
    p.add_argument("--static-share", type=float, default=0.45,
                   help="share of the time budget for the static network (first phase)")
    p.add_argument("--branch-share", type=float, default=0.15,
                   help="share for random forced branches (second phase); the gates get the rest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    cfg = TrainConfig(out=args.out, frames=args.frames, size=args.size,
                      width_mult=args.width_mult,
                      layers=tuple(int(v) for v in args.layers.split(",")),
                      train_clips=args.train_clips, test_clips=args.test_clips, batch=args.batch,
                      lr=args.lr, eff_weight=args.eff_weight, minutes=args.minutes,
                      static_share=args.static_share, branch_share=args.branch_share,
                      max_epochs=args.max_epochs, seed=args.seed, threads=args.threads,
                      command="adaedge train " + " ".join(
                          shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)))
    train(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
