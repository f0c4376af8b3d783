"""Shared fixtures: tiny VA-RED² networks with every parameter randomised, so branches differ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaedge import models
from adaedge.export import export

TINY = dict(num_classes=5, frames=5, size=32, width_mult=0.125)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give batch-norm statistics, cheap operations and gates non-trivial values.

    Freshly built networks have identity batch norms and copy-initialised cheap operations, which
    would hide folding or fill mistakes; gates get weights large enough to choose differently for
    different clips.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm3d, torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.6 - 0.3)
            elif isinstance(m, torch.nn.Conv3d) and m.groups > 1:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif m.__class__.__name__ == "SoftModulationGate":
                m.fc1.weight.copy_(torch.randn(m.fc1.weight.shape, generator=g) * 2.0)
                m.fc2.weight.copy_(torch.randn(m.fc2.weight.shape, generator=g) * 2.0)
                m.beta.copy_(torch.randn(m.beta.shape, generator=g) * 0.2)
    return model.eval()


def tiny_model(seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = dict(TINY)
    config.update(overrides)
    return randomize(models.create("vared_r2plus1d_18", **config), seed)


@pytest.fixture(scope="session")
def tiny() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny: torch.nn.Module) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    models.save_checkpoint(tiny, path, extra={"labels": [f"class{i}" for i in range(5)]})
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny: torch.nn.Module) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export(tiny, out, weights={"source": "test"})
    return out


def clips(n: int = 4, seed: int = 0, frames: int = 5, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def varied_clips(n: int = 12, seed: int = 2) -> torch.Tensor:
    """Clips of different contrast and brightness, so that gates split the batch across branches."""
    x = clips(n, seed=seed)
    return x * torch.linspace(0.2, 4, n).view(-1, 1, 1, 1, 1) + \
        torch.linspace(-1, 1, n).view(-1, 1, 1, 1, 1)
