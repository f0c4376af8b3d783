"""VA-RED² building blocks: branch shapes, weight sharing, gate formula, training mix, efficiency loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaedge.nn import DynamicConv3d, SoftModulationGate, efficiency_loss

from .conftest import randomize


def _layer(kernel, stride, padding, s=2, activation=True, cin=6, cout=8):
    torch.manual_seed(0)
    layer = DynamicConv3d(cin, cout, kernel, stride, padding, search_space=s, activation=activation)
    return randomize(layer)


CASES = [((1, 3, 3), (1, 1, 1), (0, 1, 1)),    # (2+1)D spatial
         ((3, 1, 1), (1, 1, 1), (1, 0, 0)),    # (2+1)D temporal
         ((3, 1, 1), (2, 1, 1), (1, 0, 0)),    # temporal, stride 2
         ((1, 3, 3), (1, 2, 2), (0, 1, 1)),    # spatial, stride 2
         ((3, 3, 3), (1, 1, 1), (1, 1, 1)),    # full 3D
         ((1, 1, 1), (2, 2, 2), (0, 0, 0))]    # shortcut projection


@pytest.mark.parametrize("kernel,stride,padding", CASES)
@pytest.mark.parametrize("frames", [4, 5])
@pytest.mark.parametrize("s", [2, 3])
def test_every_branch_returns_the_full_shape(kernel, stride, padding, frames, s):
    layer = _layer(kernel, stride, padding, s)
    x = torch.randn(2, 6, frames, 9, 9)
    full = layer.branch_forward(x, layer.branches[0])
    assert len(layer.branches) == s * s
    for b in layer.branches:
        assert layer.branch_forward(x, b).shape == full.shape, b.name


@pytest.mark.parametrize("kernel,stride,padding", CASES[:3])
def test_channel_branch_computes_a_slice_of_the_same_filters(kernel, stride, padding):
    layer = _layer(kernel, stride, padding)
    x = torch.randn(2, 6, 4, 9, 9)
    full = layer.branch_forward(x, layer.branches[0])
    half = layer.branch_forward(x, layer.branches[1])
    assert layer.branches[1].name == "R1-r1/2"
    torch.testing.assert_close(half[:, :4], full[:, :4])
    assert not torch.allclose(half[:, 4:], full[:, 4:])   # the rest comes from the cheap op


def test_temporal_branch_computes_every_rth_frame_and_fills_the_rest():
    layer = _layer((3, 1, 1), (1, 1, 1), (1, 0, 0))
    x = torch.randn(2, 6, 6, 5, 5)
    full = layer.branch_forward(x, layer.branches[0])
    stride2 = layer.branch_forward(x, layer.branches[2])
    assert layer.branches[2].name == "R2-r1"
    torch.testing.assert_close(stride2[:, :, 0::2], full[:, :, 0::2])
    fill = layer.temporal_fill[0]
    torch.testing.assert_close(stride2[:, :, 1::2], torch.relu(fill(full[:, :, 0::2])))


def test_gate_is_the_soft_modulation_formula():
    torch.manual_seed(1)
    gate = randomize(SoftModulationGate(6, 2, 2))
    x = torch.randn(3, 6, 4, 5, 5)
    z = gate.bn(gate.fc1(x.mean(dim=(2, 3, 4))))
    want = torch.clamp(torch.tanh(gate.fc2(F.relu(z)) + gate.beta), min=0)
    got = gate(x)
    torch.testing.assert_close(got, want)
    assert (got >= 0).all() and (got < 1).all()
    logits = gate.logits(x)
    torch.testing.assert_close(gate.squash(logits), got)
    decision = gate.decide(logits)
    untied = (got[:, 0] != got[:, 1]) & (got[:, 2] != got[:, 3])
    want_choice = got[:, :2].argmax(1) * 2 + got[:, 2:].argmax(1)
    torch.testing.assert_close(decision[untied], want_choice[untied])


def test_saturated_gate_scores_tie_and_the_logits_break_the_tie():
    gate = SoftModulationGate(6, 2, 2)
    z = torch.tensor([[30.0, 20.0, -3.0, -1.0]])          # tanh saturates / clamps: ties in p
    p = gate.squash(z)
    assert p[0, 0] == p[0, 1] == 1.0 and p[0, 2] == p[0, 3] == 0.0
    assert gate.decide(z).tolist() == [0 * 2 + 1]          # larger logit wins each tie


def test_training_mixes_branches_by_gate_weights():
    layer = _layer((1, 3, 3), (1, 1, 1), (0, 1, 1))
    layer.train()
    layer.bn.eval()
    layer.gate.bn.eval()
    x = torch.randn(3, 6, 4, 7, 7)
    out = layer(x)
    v = layer.gate(x)
    want = sum((v[:, b.t] * v[:, 2 + b.c]).view(-1, 1, 1, 1, 1) * layer.branch_forward(x, b)
               for b in layer.branches)
    torch.testing.assert_close(out, want)


def test_eval_takes_the_branch_the_gate_picks_per_clip():
    layer = _layer((1, 3, 3), (1, 1, 1), (0, 1, 1))
    x = torch.randn(8, 6, 4, 7, 7) * 3
    with torch.no_grad():
        out = layer(x)
        choice = layer.last_branch
        assert choice is not None
        for i in range(8):
            one = layer.branch_forward(x[i:i + 1], layer.branches[int(choice[i])])
            torch.testing.assert_close(out[i:i + 1], one)


def test_force_overrides_the_gate():
    layer = _layer((1, 3, 3), (1, 1, 1), (0, 1, 1))
    x = torch.randn(2, 6, 4, 7, 7)
    layer.force = 3
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.branch_forward(x, layer.branches[3]))
    assert layer.last_branch.tolist() == [3, 3]


def test_a_per_clip_force_runs_each_clip_on_its_own_branch():
    """Gate-target training forces one branch per clip (a LongTensor). In eval mode each clip's
    output is its branch's; in train mode (batch statistics per branch group, so values differ)
    the same branches are taken; the gate's logits are kept either way."""
    layer = _layer((3, 3, 3), (2, 1, 1), (1, 1, 1))
    x = torch.randn(4, 6, 4, 7, 7)
    branches = [3, 0, 2, 1]
    layer.force = torch.tensor(branches)
    with torch.no_grad():
        layer.train(True)
        layer(x)
        assert layer.last_branch.tolist() == branches and layer.last_logits is not None
        layer.train(False)
        out = layer(x)
        assert layer.last_branch.tolist() == branches
        for i, b in enumerate(branches):
            torch.testing.assert_close(out[i:i + 1],
                                       layer.branch_forward(x[i:i + 1], layer.branches[b]))


def test_efficiency_loss_counts_only_correct_clips_and_trains_the_gate():
    layer = _layer((1, 3, 3), (1, 1, 1), (0, 1, 1))
    layer.train()
    layer(torch.randn(4, 6, 4, 7, 7))
    none = efficiency_loss([layer], [1.0], torch.zeros(4, dtype=torch.bool))
    assert float(none.detach()) == 0.0
    loss = efficiency_loss([layer], [1.0], torch.ones(4, dtype=torch.bool))
    assert float(loss.detach()) > 0
    loss.backward()
    assert layer.gate.beta.grad is not None and layer.gate.beta.grad.abs().sum() > 0
    ratio = layer.expected_cost_ratio()
    assert ((ratio > 0) & (ratio <= 1)).all()


def test_out_channels_must_split_into_whole_branches():
    with pytest.raises(ValueError, match="divisible"):
        DynamicConv3d(4, 6, 3, search_space=3)
