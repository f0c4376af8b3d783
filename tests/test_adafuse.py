"""AdaFuse: the reference (Eq. 3 and 5), official checkpoints, and parity of the dense and gathered
exports, whole clips and frame-by-frame streams, on decisions that vary by frame and channel.

Tolerance: max |bundle - reference| <= 1e-4 * max |reference| (float32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from adaedge import models
from adaedge.bundle import BundleError, load as load_bundle
from adaedge.export import ExportError, export
from adaedge.models import CheckpointError
from adaedge.models.adafuse import KEEP, REUSE, SKIP, AdaFuse, previous_frame, temporal_shift
from adaedge.runtime import InputError, Stream, load
from adaedge.verify import relative_error as close

from .conftest import randomize

RTOL = 1e-4
TINY = dict(depth=50, num_classes=5, frames=4, size=48, base_width=8, hidden_dim=16)


def tiny_adafuse(seed: int = 0, **overrides: object) -> AdaFuse:
    """A small AdaFuse whose batch norms and policies are randomised so that all three actions
    occur, varying by frame, channel and clip."""
    torch.manual_seed(seed)
    config: Dict[str, object] = dict(TINY)
    config.update(overrides)
    name = "adafuse_tsm_r50" if config.get("shift", "none") != "none" else "adafuse_tsn_r50"
    model = models.create(name, **config)
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model.eval()


def clips(n: int = 2, frames: int = 4, size: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def block_outputs(model: AdaFuse, x: torch.Tensor) -> Dict[str, np.ndarray]:
    """Every block's output (N*T, C, H, W) in the reference, by module name."""
    out: Dict[str, np.ndarray] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: out.__setitem__(n, o.detach().numpy()))
             for n, m in model.named_modules() if n.count(".") == 2 and "layer" in n]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


# ---------------------------------------------------------------------------------------------
# the reference

def test_policy_decisions_vary_by_frame_channel_and_clip():
    model = tiny_adafuse()
    d = model.decisions(clips())
    counts = np.bincount(torch.cat([x.flatten() for x in d]).numpy(), minlength=3)
    assert (counts > 0.1 * counts.sum()).all(), counts          # every action is common
    first = d[0]
    assert (first[:, 1:] != first[:, :-1]).any()                # differ from frame to frame
    assert (first[0] != first[1]).any()                         # and from clip to clip


def test_fusion_follows_eq3():
    """keep -> y_t, reuse -> y_{t-1} (zero at t = 0), skip -> 0, checked on one block."""
    model = tiny_adafuse()
    block = model.base_model.blocks[1]
    x = torch.randn(2 * 4, block.conv1.in_channels, 12, 12)
    captured: List[torch.Tensor] = []
    hook = block.conv2.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    record: List[torch.Tensor] = []
    with torch.no_grad():
        block(x, 4, record=record)
        y = block.relu(block.bn1(block.conv1(x)))
    hook.remove()
    action = record[0].argmax(dim=2)
    prev = previous_frame(y, 4)
    want = torch.where((action == KEEP)[..., None, None], y,
                       torch.where((action == REUSE)[..., None, None], prev, torch.zeros_like(y)))
    assert torch.allclose(captured[0], want)
    assert (action == SKIP).any() and (action == REUSE).any() and (action == KEEP).any()


def test_temporal_shift_moves_the_documented_channels():
    x = torch.arange(2 * 3 * 16, dtype=torch.float32).view(2 * 3, 16, 1, 1)   # 2 clips, 3 frames
    v = x.view(2, 3, 16)
    bi = temporal_shift(x, 3, "bidirectional", 8).view(2, 3, 16)
    assert torch.equal(bi[:, :2, :2], v[:, 1:, :2]) and (bi[:, 2, :2] == 0).all()
    assert torch.equal(bi[:, 1:, 2:4], v[:, :2, 2:4]) and (bi[:, 0, 2:4] == 0).all()
    assert torch.equal(bi[:, :, 4:], v[:, :, 4:])
    on = temporal_shift(x, 3, "online", 8).view(2, 3, 16)
    assert torch.equal(on[:, 1:, :2], v[:, :2, :2]) and (on[:, 0, :2] == 0).all()
    assert torch.equal(on[:, :, 2:], v[:, :, 2:])


def test_flops_follow_eq5_and_the_plain_count_matches_hooks():
    model = tiny_adafuse()
    x = clips(1)
    per_conv: Dict[str, int] = {}

    def hook(mod, inp, out, name):
        per_conv[name] = out.numel() // out.shape[0] * mod.in_channels * \
            mod.kernel_size[0] * mod.kernel_size[1]

    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    plain = (sum(per_conv.values()) + model.new_fc.in_features * model.num_classes) * 4
    assert model.plain_macs() == plain
    # Eq. 5 by hand for the first block, against the model's accounting
    d = model.decisions(x)
    macs = model.block_macs()
    total = float(model.flops(x)[0])
    by_hand = model.fixed_macs() * 4.0
    for di, m in zip(d, macs):
        di = di[0]
        c = di.shape[1]
        for t in range(4):
            needed = (di[t] == KEEP) | ((di[t + 1] == REUSE) if t < 3 else False)
            by_hand += needed.sum().item() / c * m["conv1"]
            by_hand += (di[t] != SKIP).sum().item() / c * m["conv2"]
    assert total == pytest.approx(by_hand)
    assert total < plain


# ---------------------------------------------------------------------------------------------
# official checkpoints

def official_file(model: AdaFuse, path: Path) -> Path:
    """The official code's file layout: {'state_dict': DataParallel(TSN_Gate).state_dict()}."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path


def test_official_checkpoint_with_shared_policy_loads(tmp_path):
    model = tiny_adafuse(shared_policy=True, hidden_quota=1024, hidden_dim=1)
    keys = list(model.state_dict())
    assert any(k.startswith("base_model.gate_fc0s.") for k in keys)
    assert "base_model.layer1.1.policy_net.gate_fc0.weight" in keys     # the same tensor, twice
    path = official_file(model, tmp_path / "ckpt.best.pth.tar")
    with pytest.raises(CheckpointError, match="adafuse_tsn_r50 or adafuse_tsm_r50"):
        models.load_model(path)
    loaded = models.load_model(path, name="adafuse_tsn_r50", frames=4, size=48).eval()
    assert loaded.base_model.gate_fc0s is not None
    x = clips()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_official_checkpoint_whose_shared_copies_differ_is_refused(tmp_path):
    model = tiny_adafuse(shared_policy=True, hidden_quota=1024, hidden_dim=1)
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    state["module.base_model.layer1.1.policy_net.gate_fc0.weight"] += 1
    torch.save({"state_dict": state}, tmp_path / "bad.pth.tar")
    with pytest.raises(CheckpointError, match="shared tensor"):
        models.load_model(tmp_path / "bad.pth.tar", name="adafuse_tsn_r50", frames=4)


def test_wrong_checkpoint_names_missing_and_unexpected_keys(tmp_path):
    model = tiny_adafuse()
    state = model.state_dict()
    state.pop("base_model.layer2.0.policy_net.gate_bn.running_mean")
    state["base_model.layer2.0.policy_net.gate_conv_embed.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "x.pth")
    target = models.create("adafuse_tsn_r50", **TINY)
    with pytest.raises(CheckpointError) as e:
        models.load_checkpoint(target, tmp_path / "x.pth")
    assert "gate_bn.running_mean" in str(e.value) and "gate_conv_embed" in str(e.value)


# ---------------------------------------------------------------------------------------------
# export parity

@pytest.mark.parametrize("shift", ["none", "bidirectional", "online"])
def test_dense_clip_bundle_matches_the_reference(tmp_path, shift):
    model = tiny_adafuse(shift=shift)
    x = clips()
    export(model, tmp_path / "b", execution="dense", options={"stream": False})
    with torch.no_grad():
        ref = model(x).numpy()
    blocks = block_outputs(model, x)
    r = load(tmp_path / "b").classify(x.numpy(), keep_values=True)
    assert close(r.scores, ref) < RTOL
    for name, want in blocks.items():          # every block, frames folded in the reference
        got = r.values[name]
        assert close(got.reshape(want.shape), want) < RTOL, name


@pytest.mark.parametrize("execution,shift", [("dense", "none"), ("dense", "online"),
                                             ("gathered", "none"), ("gathered", "online")])
def test_stream_matches_the_reference_frame_by_frame(tmp_path, execution, shift):
    """Every block's output at every frame, and the scores after the last frame; two streams
    at once whose decisions differ."""
    model = tiny_adafuse(shift=shift)
    x = clips()
    export(model, tmp_path / "b", execution=execution, options={"stream": True, "buckets": 4})
    rt = load(tmp_path / "b")
    with torch.no_grad():
        ref = model(x).numpy()
    blocks = block_outputs(model, x)
    stream = Stream(rt, batch=2)
    for t in range(4):
        r = stream.step(x[:, :, t:t + 1].numpy(), keep_values=True)
        for name, want in blocks.items():
            want_t = want.reshape((2, 4) + want.shape[1:])[:, t]
            assert close(r.values[name], want_t) < RTOL, (name, t)
    assert close(r.scores, ref) < RTOL
    whole = rt.classify(x.numpy())                    # the clip through classify, frame by frame
    assert close(whole.scores, ref) < RTOL
    one = rt.classify(x[1:].numpy())                  # a stream alone gives what it gave in a batch
    assert close(one.scores, ref[1:]) < RTOL


def test_stream_state_of_the_wrong_shape_is_refused(tmp_path):
    export(tiny_adafuse(), tmp_path / "b", options={"stream": True})
    rt = load(tmp_path / "b")
    frame = clips()[:, :, :1].numpy()
    state = rt.classify(frame).state
    name = rt.manifest.state[0].name
    bad = dict(state)
    bad[name] = np.asarray(state[name])[..., :1]                 # one element short
    with pytest.raises(InputError, match=f"state '{name}' has shape"):
        rt.classify(frame, state=bad)
    bad[name] = np.asarray(state[name])[0]                        # rank one lower
    with pytest.raises(InputError, match=f"state '{name}'"):
        rt.classify(frame, state=bad)


def test_gathered_stream_runs_fewer_flops_and_every_bucket_is_exact(tmp_path):
    model = tiny_adafuse()
    x = clips()
    export(model, tmp_path / "g", execution="gathered", options={"buckets": 4})
    rt = load(tmp_path / "g")
    with torch.no_grad():
        ref = model(x).numpy()
    free = rt.classify(x.numpy())
    widest = rt.classify(x.numpy(), force="widest")   # every switch at its largest bucket
    assert close(free.scores, ref) < RTOL and close(widest.scores, ref) < RTOL
    eq5 = model.flops(x).numpy()
    plain = model.plain_macs()
    for tr, want in zip(free.traces, eq5):
        # executed FLOPs: Eq. 5 plus bucket padding, well under the plain network
        assert want <= tr.flops < plain
        assert tr.flops < widest.traces[0].flops
    chosen = {v for tr in free.traces for k, v in tr.branches.items()}
    assert len(chosen) > 2                            # several buckets served these clips
    manifest = load_bundle(tmp_path / "g").manifest
    assert manifest.window == 4 and manifest.input["frames"] == 1
    assert manifest.constants is not None and any(s.op == "switch" and s.select is not None
                                                  for s in manifest.program)


def test_export_refuses_what_cannot_stream(tmp_path):
    with pytest.raises(ExportError, match="next frame"):
        export(tiny_adafuse(shift="bidirectional"), tmp_path / "a", options={"stream": True})
    with pytest.raises(ExportError, match="stream=True"):
        export(tiny_adafuse(), tmp_path / "b", execution="gathered", options={"stream": False})
    with pytest.raises(ExportError, match="buckets"):
        export(tiny_adafuse(), tmp_path / "c", execution="gathered", options={"buckets": 0})


def test_corrupt_or_tampered_constants_are_refused(tmp_path):
    model = tiny_adafuse()
    export(model, tmp_path / "g", execution="gathered", options={"buckets": 2})
    const = tmp_path / "g" / "graphs" / "constants.npz"
    data = bytearray(const.read_bytes())
    data[len(data) // 2] ^= 0xFF
    const.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="constants file .* is corrupt"):
        load(tmp_path / "g")
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    manifest["constants"]["file"] = "../elsewhere.npz"
    (tmp_path / "g" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="leaves the bundle"):
        load(tmp_path / "g")


def test_switch_select_and_pass_branches_are_validated(tmp_path):
    export(tiny_adafuse(), tmp_path / "g", execution="gathered", options={"buckets": 2})
    path = tmp_path / "g" / "manifest.json"
    original = json.loads(path.read_text())
    step = next(i for i, s in enumerate(original["program"]) if s.get("select"))
    for edit, message in ((lambda s: s.update(gate={"piece": "stem"}), "either a gate or"),
                          (lambda s: s["branches"][0].update(**{"pass": {"nope": "x"}}),
                           "pass must map")):
        manifest = json.loads(json.dumps(original))
        edit(manifest["program"][step])
        path.write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=message):
            load_bundle(tmp_path / "g")


def test_cli_export_verify_bench_for_streams(tmp_path, capsys):
    from adaedge.cli import main
    config = [f"--config={k}={json.dumps(v)}" for k, v in TINY.items()] + ['--config=shift="online"']
    for execution in ("gathered", "dense"):
        out = tmp_path / execution
        assert main(["export", "adafuse_tsm_r50", "--random-weights", "--out", str(out),
                     "--execution", execution, "--buckets", "4", "--quiet"] + config) == 0
        assert "a stream of one 48x48 frame per call" in capsys.readouterr().out
        assert main(["verify", str(out), "--json", "--quiet"]) == 0
        report = json.loads(capsys.readouterr().out)
        names = [c["name"] for c in report["cases"]]
        assert report["ok"] and names[0] == "stream, free decisions"
        assert ("stream, every switch by 'widest'" in names) == (execution == "gathered")
    assert main(["export", "adafuse_tsm_r50", "--random-weights", "--out",
                 str(tmp_path / "clip"), "--execution", "dense", "--quiet"] +
                config[:-1] + ["--stream", "no"]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "clip"), "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    assert main(["bench", str(tmp_path / "gathered"), "--reps", "2", "--warmup", "0", "--json",
                 "--quiet"]) == 0
    bench = json.loads(capsys.readouterr().out)
    widest = load_bundle(tmp_path / "gathered").manifest.policy_flops("widest") * 4 / 1e9
    assert [c["name"] for c in bench["configs"]] == ["free"]
    assert 0 < bench["configs"][0]["gflops"] < widest     # the policy saved compute


def test_demo_streams_a_video_frame_by_frame(tmp_path):
    """The demo offers a stream bundle every sampled frame once, as a one-frame call."""
    pytest.importorskip("cv2")
    from adaedge.demo import default_video, run_demo
    model = tiny_adafuse(shift="online")
    export(model, tmp_path / "b", execution="gathered", options={"buckets": 4},
           labels=[f"c{i}" for i in range(5)])
    summary = run_demo(source=default_video(), bundle=tmp_path / "b", headless=True,
                       output=tmp_path / "out.mp4", frame_step=2, pace=False, max_frames=12,
                       log=lambda s: None)
    assert summary.frames_read == 12 and summary.frames_written == 12
    assert summary.clips_submitted == 6
    assert summary.clips_inferred + summary.clips_skipped == 6 and summary.clips_inferred >= 1


def test_file_written_by_the_official_code_loads_and_matches_it(tmp_path):
    """tests/data/official_adafuse_tsm_tiny.pth.tar (see tests/data/README.md): the official
    model's scores and every block's actions, directly and through a dense clip bundle."""
    data = Path(__file__).parent / "data"
    io = np.load(data / "official_adafuse_tsm_tiny_io.npz")
    model = models.load_model(data / "official_adafuse_tsm_tiny.pth.tar", name="adafuse_tsm_r50",
                              frames=4, size=48).eval()
    assert models.model_config(model)["enabled_stages"] == [1, 2, 3]
    x = torch.from_numpy(io["clip"])
    with torch.no_grad():
        assert close(model(x).numpy(), io["logits"]) < RTOL
    for i, d in enumerate(model.decisions(x)):
        assert np.array_equal(d.numpy(), io[f"actions{i}"]), i
    export(model, tmp_path / "b", options={"stream": False})
    assert close(load(tmp_path / "b").classify(io["clip"]).scores, io["logits"]) < RTOL
