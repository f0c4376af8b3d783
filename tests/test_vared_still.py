"""VA-RED²'s still-scene options: edge-replicating temporal padding makes the temporal branch exact
on a still clip, every gate reads the clip's motion, and a fill that copies is written as a repeat.

Tolerances: a branch that computes every other frame runs other convolution shapes than the full
branch (stride 2 in time), so ONNX Runtime and PyTorch may sum each output in another order; in
float32 each layer's sums then agree to a few units in the last place (about 1e-6 relative), and
the network's depth (6 to 21 layers with batch norms) compounds that to well under 1e-5. The
bounds below (1e-4 relative, verify's own) leave a margin of 10x over that, on any x86-64 or ARM
kernel choice; "not exact" means an error above 1e-2, four orders of magnitude away.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from adaedge import models, runtime
from adaedge.export import export
from adaedge.export.vared import is_copy
from adaedge.nn.vared import MOTION_FLOOR, clip_motion
from adaedge.verify import relative_error, verify

SMALL = dict(num_classes=5, frames=6, size=32, width_mult=0.125)


def trained_like(seed: int = 0, **config: object) -> torch.nn.Module:
    """A fresh network (cheap operations as copies, as before their training) with non-trivial
    batch norms and gates, so that folding mistakes and the gates' choices show."""
    torch.manual_seed(seed)
    model = models.create("vared_r2plus1d_18", **dict(SMALL, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm3d, torch.nn.BatchNorm1d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)
            elif m.__class__.__name__ == "SoftModulationGate":
                m.fc1.weight.copy_(torch.randn(m.fc1.weight.shape, generator=g) * 2.0)
                m.fc2.weight.copy_(torch.randn(m.fc2.weight.shape, generator=g) * 2.0)
    return model.eval()


def still_clips(n: int, frames: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    frame = torch.randn(n, 3, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return frame.expand(-1, -1, frames, -1, -1).contiguous()


def forced(model: torch.nn.Module, x: torch.Tensor, branch: int) -> torch.Tensor:
    model.set_policy(branch)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.set_policy(None)


@pytest.mark.parametrize("padding, exact", [("replicate", True), ("zeros", False)])
def test_every_other_frame_is_exact_on_a_still_clip_only_with_replicated_edges(padding, exact):
    model = trained_like(temporal_padding=padding)
    x = still_clips(3)
    full, every_other = forced(model, x, 0), forced(model, x, 2)   # R1-r1, R2-r1 everywhere
    err = relative_error(every_other.numpy(), full.numpy())
    assert (err <= 1e-4) if exact else (err > 1e-2), err


def test_a_still_clip_has_equal_frames_at_every_layer_with_replicated_edges():
    model = trained_like(temporal_padding="replicate")
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(o))
             for _, m in model.dynamic_layers()]
    forced(model, still_clips(2), 0)
    for h in hooks:
        h.remove()
    for y in seen:
        assert relative_error(y.numpy(), y[:, :, :1].expand_as(y).numpy()) <= 1e-5


def test_clip_motion_is_the_floor_for_a_still_clip_and_rises_with_motion():
    still = still_clips(2, frames=8)
    assert torch.allclose(clip_motion(still), torch.full((2, 51), float(np.log(MOTION_FLOOR))))
    moving = torch.roll(still, shifts=0, dims=2).clone()
    for t in range(8):
        moving[:, :, t] = torch.roll(still[:, :, t], shifts=2 * t, dims=-1)
    assert (clip_motion(moving) > clip_motion(still) + 1.0).float().mean() > 0.9
    assert clip_motion(still[:, :, :1]).abs().sum() == 0          # one frame: zeros


def test_the_fresh_fills_are_copies_and_are_written_as_a_repeat(tmp_path):
    model = trained_like(temporal_padding="replicate", gate_motion=True)
    assert all(is_copy(m.temporal_fill_conv(1)) for _, m in model.dynamic_layers())
    export(model, tmp_path / "b", weights={"source": "test"})
    piece = onnx.load(str(tmp_path / "b" / "graphs" / "stem_s.R2-r1.onnx"))
    ops = [n.op_type for n in piece.graph.node]
    assert "Expand" in ops
    assert ops.count("Conv") == 1                 # the computed filters only: no fill convolution
    with torch.no_grad():
        model.stem_s.conv.temporal_fill_conv(1).weight[0, 0, 0, 0, 0] = 0.5
    assert not is_copy(model.stem_s.conv.temporal_fill_conv(1))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch-cpu"])
def test_still_scene_options_export_and_verify_every_branch(tmp_path, backend):
    model = trained_like(temporal_padding="replicate", gate_motion=True)
    with torch.no_grad():              # one trained temporal fill: the convolution path too
        model.stem_t.conv.temporal_fill_conv(1).weight.mul_(0.7)
    ckpt = tmp_path / "m.pt"
    models.save_checkpoint(model, ckpt, extra={"labels": [f"c{i}" for i in range(5)]})
    export(models.load_model(ckpt), tmp_path / "b", weights={"source": "test"})
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    first = manifest["program"][0]
    assert first["op"] == "run" and first["piece"] == "motion"
    gates = [s["gate"]["inputs"] for s in manifest["program"] if s["op"] == "switch"]
    assert gates and all(g.get("motion") == "motion" for g in gates)
    report = verify(tmp_path / "b", ckpt, clips=3, backend=backend)
    assert report.ok, [c.to_json() for c in report.cases if not c.ok]
    assert len(report.cases) >= 5          # free gates and every branch forced


def test_gates_that_read_motion_tell_a_still_clip_from_a_moving_one_in_the_bundle(tmp_path):
    """Gates set by hand to read only the motion: hidden unit h = -sum(clip_motion) (331 for a
    still clip, whose motion is the floor log(1e-3) in all 51 features; about 110 for these moving
    ones), temporal logits (150, h): still clips take every other frame, moving ones the full
    branch, on ONNX Runtime as in PyTorch."""
    model = trained_like(temporal_padding="replicate", gate_motion=True)
    with torch.no_grad():
        for _, m in model.dynamic_layers():
            gate = m.gate
            gate.fc1.weight.zero_()
            gate.fc1.weight[0, -gate.context_features:] = -1.0
            gate.bn.running_mean.zero_()
            gate.bn.running_var.fill_(1.0)
            gate.bn.weight.fill_(1.0)
            gate.bn.bias.zero_()
            gate.fc2.weight.zero_()
            gate.fc2.weight[1, 0] = 1.0
            gate.beta.copy_(torch.tensor([150.0, 0.0, 1.0, 0.0]))
    x = still_clips(4)
    moving = x.clone()
    for t in range(6):
        moving[2:, :, t] = torch.roll(x[2:, :, t], shifts=3 * t, dims=-1)
    export(model, tmp_path / "b", weights={"source": "test"})
    rt = runtime.load(tmp_path / "b")
    res = rt.classify(moving.numpy())
    with torch.no_grad():
        ref = model(moving)
    assert relative_error(res.scores, ref.numpy()) <= 1e-4
    taken = [t.branches["stem_s"] for t in res.traces]
    assert taken[:2] == ["R2-r1"] * 2 and taken[2:] == ["R1-r1"] * 2, taken
    assert res.traces[0].flops < res.traces[2].flops
