"""Training: a short run reduces the loss, and the whole command writes a checkpoint and its card."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaedge import models
from adaedge.errors import CheckpointError
from adaedge.data.camera import CLASSES, CameraDataset
from adaedge.training.vared import TrainConfig, _phase, build_model, normalise, train


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
    # a checkpoint of another configuration is refused with one clear error
    with pytest.raises(CheckpointError, match="not a VA-RED² checkpoint of this configuration"):
        train(TrainConfig(out=str(tmp_path / "c.pt"), init=str(first), static_share=0.0,
                          branch_share=0.0, **dict(small, size=24)), log=lambda s: None)
