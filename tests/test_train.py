"""Training: a short run reduces the loss, and the whole command writes a checkpoint and its card."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaedge import models
from adaedge.errors import CheckpointError
from adaedge.data.camera import CLASSES, CameraDataset
from adaedge.training.vared import (TrainConfig, _phase, build_model, fit_gates, gate_examples,
                                    normalise, train)


def test_a_short_run_reduces_the_loss_and_every_phase_runs():
    cfg = TrainConfig(frames=4, size=16, width_mult=0.125, batch=16, lr=3e-3, max_epochs=15)
    x, y = CameraDataset("train", 4, 16, 32).arrays()
    x = normalise(x)
    model = build_model(cfg)
    costs = model.layer_costs()
    rng = np.random.default_rng(0)
    _, static = _phase(model, x, y, cfg, "static", 5.0, cfg.lr, costs, rng, lambda s: None)
    assert len(static) == 30
    assert np.mean(static[-5:]) < 0.8 * np.mean(static[:5])   # from chance (2.2) downwards
    cfg.max_epochs = 3
    for name in ("branches", "gates"):
        _, losses = _phase(model, x, y, cfg, name, 5.0, cfg.lr, costs, rng, lambda s: None)
        assert len(losses) == 6 and np.isfinite(losses).all()
    assert all(layer.force is None for _, layer in model.dynamic_layers())


def test_the_training_command_writes_checkpoint_and_model_card(tmp_path):
    out = tmp_path / "m.pt"
    cfg = TrainConfig(out=str(out), frames=4, size=16, width_mult=0.125, train_clips=32,
                      test_clips=20, batch=16, minutes=0.05, command="adaedge train (test)")
    model, result = train(cfg, log=lambda s: None)
    assert list(result.gflops_per_class) == list(CLASSES)
    again = models.load_model(out).eval()
    x, y = CameraDataset("test", 4, 16, 20).arrays()         # the reported top-1 is the model's
    with torch.no_grad():
        pred = again(torch.from_numpy(normalise(x))).argmax(1).numpy()
    assert result.accuracy == pytest.approx(float((pred == y).mean()))
    _, meta = models.read_checkpoint(out)
    assert meta["labels"][0] == "still" and meta["test_top1"] == result.accuracy
    card = out.with_suffix(".md").read_text()
    assert "adaedge train (test)" in card and "What it is not" in card
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


def test_init_continues_from_a_checkpoint_and_the_card_records_both_commands(tmp_path):
    first = tmp_path / "a.pt"
    small = dict(frames=4, size=16, width_mult=0.125, train_clips=32, test_clips=18, batch=16,
                 minutes=0.02)
    train(TrainConfig(out=str(first), command="adaedge train (first)", **small),
          log=lambda s: None)
    second = tmp_path / "b.pt"
    cfg = TrainConfig(out=str(second), init=str(first), static_share=0.0, branch_share=0.0,
                      command="adaedge train (gates)", **small)
    model, _ = train(cfg, log=lambda s: None)
    _, meta = models.read_checkpoint(second)
    assert meta["made_by"] == ["adaedge train (first)", "adaedge train (gates)"]
    card = second.with_suffix(".md").read_text()
    assert "`adaedge train (first)`, then `adaedge train (gates)`" in card
    # only the gates learnt: every other weight is the first checkpoint's
    a = models.load_model(first).state_dict()
    for name, value in model.state_dict().items():
        if ".gate." not in name and value.is_floating_point():
            assert torch.equal(value.float(), a[name].float()), name
    # a checkpoint of another width is refused with one clear error; another clip shape is not
    # (the network is convolutional: weights trained on 4 frames of 16x16 serve 6 frames of 24)
    with pytest.raises(CheckpointError, match="not a VA-RED² checkpoint of this configuration"):
        train(TrainConfig(out=str(tmp_path / "c.pt"), init=str(first), static_share=0.0,
                          branch_share=0.0, **dict(small, width_mult=0.25)), log=lambda s: None)
    other, _ = train(TrainConfig(out=str(tmp_path / "d.pt"), init=str(first), static_share=0.0,
                                 branch_share=0.0, **dict(small, frames=6, size=24)),
                     log=lambda s: None)
    assert (other.frames, other.size) == (6, 24)
    assert torch.equal(other.stem_s.conv.conv.weight.float(), a["stem_s.conv.conv.weight"].float())


def test_gate_targets_are_the_cheapest_branch_that_stays_right_and_gates_learn_them():
    """On a still clip every other frame is exact (replicated edges), so its target is the
    temporal branch whenever the full network is right; the gates then learn their targets from
    the cached features (the loss falls well below chance's log 2 per policy)."""
    cfg = TrainConfig(frames=4, size=16, width_mult=0.125, batch=16, lr=3e-3, max_epochs=15)
    x, y = CameraDataset("train", 4, 16, 48).arrays()
    model = build_model(cfg)
    costs = model.layer_costs()
    _phase(model, x, y, cfg, "static", 5.0, cfg.lr, costs, np.random.default_rng(0),
           lambda s: None)
    model.eval()
    still = torch.from_numpy(normalise(x[:8, :, :1])).expand(-1, -1, 4, -1, -1).contiguous()
    yb = torch.from_numpy(y[:8])
    model.set_policy(0)
    with torch.no_grad():
        right = model(still).argmax(1) == yb
    model.set_policy(None)
    target, feats = gate_examples(model, still, yb, margin=0.05)
    layers = model.dynamic_layers()
    assert len(feats) == len(layers) and feats[0].shape[0] == 8
    # the cheapest acceptable: every other frame (2) or both halved (3); never full where right
    assert bool((target[right] >= 2).all()), (target, right)
    target, feats = gate_examples(model, torch.from_numpy(normalise(x)), torch.from_numpy(y),
                                  margin=0.05)
    losses = fit_gates(model, target, feats, minutes=0.05, lr=1e-2, seed=0, log=lambda s: None)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert not any(m.gate.training for _, m in layers)


def test_an_interrupted_run_resumes_where_it_was_killed(tmp_path):
    """A real kill -9 in the static phase, then --resume: the run continues from the saved step
    (not from scratch) and ends with the checkpoint; the resume state is removed at the end."""
    import os
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "r.pt"
    cmd = [sys.executable, "-m", "adaedge", "train", "--out", str(out), "--frames", "4", "--size",
           "16", "--width-mult", "0.125", "--train-clips", "64", "--test-clips", "18", "--batch",
           "8", "--minutes", "0.4", "--max-epochs", "400", "--static-share", "1",
           "--save-every", "0.01", "--threads", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                            text=True)
    state = out.with_suffix(".resume.pt")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state.is_file():
            saved = torch.load(state, weights_only=True)
            if saved["phase"] == "static" and saved["step"] >= 20:
                break
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and state.is_file()
    step = int(torch.load(state, weights_only=True)["step"])
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = [line for line in done.stderr.splitlines() if "resuming at step" in line]
    assert resumed and int(resumed[0].split("resuming at step ")[1].split()[0]) >= step
    assert out.is_file() and not state.exists()


def test_channel_fills_fitted_locally_rebuild_the_missing_maps_better_than_a_copy():
    """The least-squares fill explains a share R^2 >= 0 of each layer's missing maps (0 would be
    their mean alone), and more than the copy it starts as, on the frozen network's own inputs."""
    from adaedge.training.vared import fit_channel_fills
    cfg = TrainConfig(frames=4, size=16, width_mult=0.125)
    x, _ = CameraDataset("train", 4, 16, 24).arrays()
    model = build_model(cfg).eval()
    for m in model.modules():                       # non-trivial maps to rebuild
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    r2 = fit_channel_fills(model, x, clips=24, batch=8, log=lambda s: None)
    assert len(r2) == len(model.dynamic_layers()) and all(0.0 <= v <= 1.0 for v in r2.values())
    again = fit_channel_fills(model, x, clips=24, batch=8, log=lambda s: None)
    assert again == pytest.approx(r2, abs=1e-3)     # a fit of the same data: the same optimum
