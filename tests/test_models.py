"""The registry, the R(2+1)D-18 layout, and checkpoint loading with clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from adaedge import models
from adaedge.errors import AdaedgeError
from adaedge.models import CheckpointError

from .conftest import TINY, tiny_model


def test_registry_builds_and_refuses_unknown_names():
    assert "vared_r2plus1d_18" in models.available()
    with pytest.raises(KeyError, match="unknown model 'nope'.*vared_r2plus1d_18"):
        models.create("nope")
    with pytest.raises(TypeError, match="bad config"):
        models.create("vared_r2plus1d_18", no_such_option=1)


def test_r2plus1d_18_layout():
    m = models.create("vared_r2plus1d_18")
    # 2 stem convs + 8 blocks x 4 convs + 3 shortcut projections, every one dynamic
    assert len(m.dynamic_layers()) == 37
    assert [len(stage) for stage in m.stages] == [2, 2, 2, 2]
    b = m.stages[0][0]
    assert b.conv1_s.conv.out_channels == 144            # Tran et al.'s M_i for 64 -> 64
    assert b.conv1_s.conv.kernel_size == (1, 3, 3) and b.conv1_t.conv.kernel_size == (3, 1, 1)
    assert m.stem_s.conv.out_channels == 46              # 45 rounded to whole half-branches
    # torchvision's R(2+1)D-18 at 8x112x112 costs 20.4 GMACs; ours adds nothing to the convs
    assert abs(sum(m.layer_costs()) / 1e9 - 20.7) < 0.1


def test_tiny_model_runs_every_policy():
    m = tiny_model()
    x = torch.randn(2, 3, 5, 32, 32)
    for force in (None, 0, 1, 2, 3):
        m.set_policy(force)
        with torch.no_grad():
            assert m(x).shape == (2, 5)
    m.set_policy(None)


def test_checkpoint_round_trip(tmp_path):
    m = tiny_model()
    path = tmp_path / "c.pt"
    models.save_checkpoint(m, path)
    again = models.load_model(path)
    assert models.model_config(again) == models.model_config(m)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)


def test_checkpoint_of_another_shape_names_missing_and_unexpected_keys(tmp_path):
    m = tiny_model()
    state = m.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.fc.bias"]
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, path)
    fresh = models.create("vared_r2plus1d_18", **TINY)
    with pytest.raises(CheckpointError) as err:
        models.load_checkpoint(fresh, path)
    msg = str(err.value)
    assert "missing keys (1): head.fc.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg


def test_checkpoint_of_another_width_names_shape_mismatches(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(tiny_model(width_mult=0.25).state_dict(), path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        models.load_checkpoint(models.create("vared_r2plus1d_18", **TINY), path)


def test_checkpoint_for_another_model_is_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="is for model 'vared_r2plus1d_18', not 'other'"):
        models.load_model(tiny_checkpoint, name="other")


def test_dataparallel_prefix_is_stripped(tmp_path):
    m = tiny_model()
    path = tmp_path / "dp.pt"
    torch.save({"model": {"module." + k: v for k, v in m.state_dict().items()}}, path)
    fresh = models.create("vared_r2plus1d_18", **TINY)
    models.load_checkpoint(fresh, path)
    torch.testing.assert_close(fresh.head.fc.weight, m.head.fc.weight)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_are_loaded_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(CheckpointError, match="a safe load refuses") as info:
        models.read_checkpoint(path)
    assert "weights_only=False" not in str(info.value)     # torch's unsafe advice never shown


def test_missing_and_garbage_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        models.read_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        models.read_checkpoint(junk)
    with pytest.raises(CheckpointError, match="is a folder; give the checkpoint file"):
        models.read_checkpoint(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        models.read_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x08\x12\x07adaedge")
    with pytest.raises(CheckpointError, match="is an ONNX graph, not a PyTorch checkpoint"):
        models.read_checkpoint(tmp_path / "m.onnx")
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.zeros(1000)}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="is it a complete file torch.save wrote"):
        models.read_checkpoint(cut)


def test_a_small_file_cannot_demand_a_huge_model(tmp_path):
    """A config edited to ask for a model thousands of times the file's size is refused before
    anything that size is allocated (the model is sized on PyTorch's meta device)."""
    import resource
    from .conftest import tiny_model
    path = tmp_path / "t.pt"
    models.save_checkpoint(tiny_model(), path)
    obj = torch.load(path, weights_only=True)
    obj["adaedge"]["config"]["width_mult"] = 16.0           # thousands of times the file
    obj["adaedge"]["config"]["num_classes"] = 1_000_000
    torch.save(obj, path)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"asks for a model of [0-9.]+M values but the "
                                              "file holds 0.6M"):
        models.load_model(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 * 1024   # KiB


@pytest.mark.parametrize("bad,message", [
    ({"model": 5}, "'model' must be a model name, not int"),
    ({"config": "x"}, "'config' must be an object of settings"),
    ({"labels": 3}, "'labels' must be a list of class names"),
    ({"labels": [1, 2]}, "labels must be strings")])
def test_checkpoint_metadata_of_the_wrong_type_is_one_clear_error(tmp_path, bad, message):
    from .conftest import tiny_model
    path = tmp_path / "t.pt"
    models.save_checkpoint(tiny_model(), path)
    obj = torch.load(path, weights_only=True)
    obj["adaedge"].update(bad)
    torch.save(obj, path)
    with pytest.raises(AdaedgeError, match=message):
        models.load_model(path)
