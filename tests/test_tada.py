"""TAdaConv and TAda2D: layer and network parity of the exported pieces, official checkpoints.

Reference for a layer: the definition (Eq. 2) computed literally, frame by frame, with the weights
alpha_t * W_b; tolerance 1e-4 relative to the largest reference value, float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from adaedge import models, runtime
from adaedge.cli import main
from adaedge.export import ExportError, export
from adaedge.export.tada import calibrated_conv_graph
from adaedge.models import CheckpointError
from adaedge.nn import RouteFuncMLP, TAdaConv2d
from adaedge.verify import relative_error as rel
from adaedge.verify import verify

from .conftest import randomize

DATA = Path(__file__).parent / "data"
TADA_TINY = dict(num_classes=5, frames=4, size=32, width_mult=0.125, stage_blocks=[1, 2, 1, 1])
RTOL = 1e-4


def randomize_tada(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random batch norms (conftest) and routing functions whose alpha varies by frame and channel
    (a fresh one gives alpha = 1 everywhere, which would hide calibration mistakes)."""
    randomize(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RouteFuncMLP):
                m.b.weight.copy_(torch.randn(m.b.weight.shape, generator=g) * 0.5)
    return model.eval()


def tiny_tada(seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = dict(TADA_TINY)
    config.update(overrides)
    return randomize_tada(models.create("tada2d", **config), seed)


def literal_tadaconv(conv: TAdaConv2d, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Eq. 2 frame by frame: y[b, :, t] = conv2d(x[b, :, t], alpha[b, :, t] * W_b)."""
    w = conv.weight[0, 0]
    out = []
    for b in range(x.shape[0]):
        frames = []
        for t in range(x.shape[2]):
            a = alpha[b, :, t, 0, 0]
            wt = w * (a.view(1, -1, 1, 1) if conv.cal_dim == "cin" else a.view(-1, 1, 1, 1))
            frames.append(F.conv2d(x[b:b + 1, :, t], wt, conv.base_bias, conv.stride[1:],
                                   conv.padding[1:], conv.dilation[1:], conv.groups))
        out.append(torch.stack(frames, dim=2))
    return torch.cat(out)


LAYER_CASES = [
    dict(in_channels=8, out_channels=12, kernel_size=[1, 3, 3], padding=[0, 1, 1], cal_dim="cin"),
    dict(in_channels=8, out_channels=12, kernel_size=[1, 3, 3], padding=[0, 1, 1], cal_dim="cout"),
    dict(in_channels=8, out_channels=8, kernel_size=[1, 3, 3], stride=[1, 2, 2], padding=[0, 1, 1],
         cal_dim="cin", bias=False),
    dict(in_channels=8, out_channels=8, kernel_size=[1, 3, 3], stride=[1, 2, 2], padding=[0, 1, 1],
         cal_dim="cout"),
    dict(in_channels=8, out_channels=16, kernel_size=[1, 3, 3], padding=[0, 2, 2],
         dilation=[1, 2, 2], groups=4, cal_dim="cin"),
    dict(in_channels=8, out_channels=16, kernel_size=[1, 3, 5], padding=[0, 1, 2], groups=4,
         cal_dim="cout"),
    dict(in_channels=8, out_channels=8, kernel_size=[1, 3, 3], padding=[0, 1, 1], groups=8,
         cal_dim="cin"),    # depthwise
    dict(in_channels=8, out_channels=8, kernel_size=[1, 3, 3], stride=[1, 2, 2], padding=[0, 1, 1],
         groups=8, cal_dim="cout"),  # depthwise, strided
    dict(in_channels=6, out_channels=10, kernel_size=[1, 1, 1], cal_dim="cin"),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: f"{c['cal_dim']}-g{c.get('groups', 1)}-"
                         f"s{c.get('stride', [1, 1, 1])[1]}-k{c['kernel_size'][1]}")
def test_tadaconv_layer_matches_the_definition_in_torch_and_onnx(case):
    torch.manual_seed(0)
    conv = TAdaConv2d(**case).eval()
    n, t, h, w = 2, 3, 9, 11
    c_a = case["in_channels"] // case.get("groups", 1) if case["cal_dim"] == "cin" \
        else case["out_channels"]
    x = torch.randn(n, case["in_channels"], t, h, w)
    alpha = torch.rand(n, c_a, t, 1, 1) * 1.5 + 0.25
    with torch.no_grad():
        ref = literal_tadaconv(conv, x, alpha)
        for form in ("weights", "features"):
            conv.form = form
            assert rel(conv(x, alpha), ref) <= RTOL, form
    folded_x = x.permute(0, 2, 1, 3, 4).reshape(n * t, case["in_channels"], h, w).numpy()
    folded_a = alpha.permute(0, 2, 1, 3, 4).reshape(n * t, c_a, 1, 1).numpy()
    want = ref.permute(0, 2, 1, 3, 4).reshape(n * t, ref.shape[1], ref.shape[3], ref.shape[4])
    proto = calibrated_conv_graph(conv, t, h, w)
    node = next(nd for nd in proto.graph.node if nd.domain == "adaedge")
    assert node.op_type == "CalibratedConv" and node.overload == case["cal_dim"]
    assert {(f.name, f.overload) for f in proto.functions} == {("CalibratedConv", case["cal_dim"])}
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": folded_x, "alpha": folded_a})
    assert rel(got, want.numpy()) <= RTOL
    # The official formulation (per-clip weights, grouped convolution), one clip.
    proto = calibrated_conv_graph(conv, t, h, w, execution="official")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": folded_x[:t], "alpha": folded_a[:t]})
    assert rel(got, want[:t].numpy()) <= RTOL


def test_routing_function_starts_at_one_and_refuses_bad_kernels():
    rf = RouteFuncMLP(16, 4, [3, 3]).eval()
    alpha = rf(torch.randn(2, 16, 5, 7, 7))
    assert alpha.shape == (2, 16, 5, 1, 1) and torch.equal(alpha, torch.ones_like(alpha))
    with pytest.raises(ValueError, match="odd"):
        RouteFuncMLP(16, 4, [2, 3])
    with pytest.raises(ValueError, match="temporal"):
        TAdaConv2d(4, 4, [3, 3, 3])


def test_randomised_calibration_varies_by_frame_and_channel():
    model = tiny_tada()
    rf = model.backbone.conv2.res_1.conv_branch.b_rf
    with torch.no_grad():
        alpha = rf(torch.randn(2, rf.c_in, 4, 8, 8))
    assert float(alpha.std(dim=2).mean()) > 0.05 and float(alpha.std(dim=1).mean()) > 0.05


@pytest.mark.parametrize("execution,routing,cal_dim", [
    ("calibrated", "fused", "cin"), ("calibrated", "separate", "cin"),
    ("calibrated", "fused", "cout"), ("official", "fused", "cin"), ("official", "fused", "cout")])
def test_whole_tada2d_matches_the_reference(tmp_path, execution, routing, cal_dim):
    model = tiny_tada(cal_dim=cal_dim)
    out = tmp_path / "b"
    manifest = export(model, out, execution=execution, options={"routing": routing},
                      weights={"source": "test"})
    nodes = [n for p in manifest.pieces.values()
             for n in onnx.load(str(out / p.file)).graph.node]
    custom = [n for n in nodes if n.domain == "adaedge"]
    assert len(custom) == (0 if execution == "official" else 5)
    rt = runtime.load(out)
    batch = 1 if execution == "official" else 3
    x = torch.randn(batch, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    result = rt.classify(x.numpy(), keep_values=True)
    with torch.no_grad():
        ref = model(x)
        block = model.backbone.conv3.res_2(model.backbone.conv3.res_1(model.backbone.conv2(
            model.backbone.conv1(x))))
    assert rel(result.scores, ref.numpy()) <= RTOL
    # Values between pieces are (N, T, C, H, W).
    assert rel(result.values["backbone.conv3.res_2"], block.permute(0, 2, 1, 3, 4).numpy()) <= RTOL


def test_verify_compares_every_block_and_names_the_piece_that_differs(tmp_path):
    model = tiny_tada(seed=3)
    out = tmp_path / "b"
    models.save_checkpoint(model, tmp_path / "ckpt.pt")
    export(model, out, weights={"source": "test"})
    report = verify(out, checkpoint=tmp_path / "ckpt.pt")
    assert report.ok and [c.name for c in report.cases] == [   # the one path, both ways
        "free gates", "free gates (compiled, one clip per call)"]
    with torch.no_grad():
        model.backbone.conv3.res_2.conv_branch.b_rf.b.weight.mul_(-1.0)
    models.save_checkpoint(model, tmp_path / "changed.pt")
    bad = verify(out, checkpoint=tmp_path / "changed.pt")
    assert not bad.ok
    assert "backbone.conv3.res_2" in bad.cases[0].problem


def test_flops_count_every_frame_and_match_the_model(tmp_path):
    model = tiny_tada()
    manifest = export(model, tmp_path / "b", weights={"source": "test"})
    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        if isinstance(mod, (torch.nn.Conv3d, TAdaConv2d)):
            k = mod.kernel_size if isinstance(mod, torch.nn.Conv3d) else mod.kernel_size
            macs += out.numel() * (mod.in_channels // mod.groups) * int(np.prod(k))
        elif isinstance(mod, torch.nn.Linear):
            macs += out.numel() * mod.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (torch.nn.Conv3d, TAdaConv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, 4, 32, 32))
    for h in hooks:
        h.remove()
    assert manifest.policy_flops("static") == macs
    uncal = export(model, tmp_path / "u", execution="uncalibrated", weights={"source": "test"})
    assert uncal.policy_flops("static") < macs   # no routing functions


def test_official_checkpoint_file_loads_and_matches_the_official_outputs(tmp_path):
    """tests/data/official_tada2d_tiny.pyth was written by the official TAdaConv code's
    save_checkpoint layout (model_state, optimizer_state, cfg as JSON) from its own TAda2D, with
    the official model's softmax outputs for two clips; see tests/data/README.md."""
    path = DATA / "official_tada2d_tiny.pyth"
    io = np.load(DATA / "official_tada2d_tiny_io.npz")
    model = models.load_model(path).eval()
    assert models.model_name(model) == "tada2d"
    cfg = models.model_config(model)
    assert cfg["num_filters"] == [8, 16, 32, 64, 128] and cfg["num_classes"] == 7
    assert cfg["frames"] == 4 and cfg["size"] == 32
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(io["clips"])), dim=-1).numpy()
    assert rel(probs, io["probs"]) <= RTOL
    assert np.abs(np.log(probs) - np.log(io["probs"])).max() < 1e-4   # the logits too
    # With a DataParallel prefix, and through export and the runtime.
    raw = torch.load(path, weights_only=True)
    raw["model_state"] = {"module." + k: v for k, v in raw["model_state"].items()}
    torch.save(raw, tmp_path / "dp.pyth")
    out = tmp_path / "b"
    assert main(["export", "tada2d", "--checkpoint", str(tmp_path / "dp.pyth"), "--out", str(out),
                 "-q"]) == 0
    scores = runtime.load(out).classify(io["clips"]).probabilities()
    assert rel(scores, io["probs"]) <= RTOL


def test_foreign_checkpoints_are_refused_with_the_keys_named(tmp_path):
    raw = torch.load(DATA / "official_tada2d_tiny.pyth", weights_only=True)
    state = dict(raw["model_state"])
    state.pop("backbone.conv2.res_1.conv_branch.b_rf.g.weight")
    state["backbone.conv2.res_1.conv_branch.b_extra.weight"] = torch.zeros(1)
    torch.save({**raw, "model_state": state}, tmp_path / "bad.pyth")
    with pytest.raises(CheckpointError) as e:
        models.load_model(tmp_path / "bad.pyth")
    assert "b_rf.g.weight" in str(e.value) and "b_extra.weight" in str(e.value)
    cfg = json.loads(raw["cfg"])
    cfg["VIDEO"]["BACKBONE"]["BRANCH"]["NAME"] = "CSNBranch"
    torch.save({**raw, "cfg": json.dumps(cfg)}, tmp_path / "csn.pyth")
    with pytest.raises(CheckpointError, match="not a TAda2D"):
        models.load_model(tmp_path / "csn.pyth")


def test_export_refuses_what_it_cannot_write(tmp_path):
    model = tiny_tada()
    with pytest.raises(ExportError, match="execution"):
        export(model, tmp_path / "a", execution="masked")
    with pytest.raises(ExportError, match="routing"):
        export(model, tmp_path / "b", options={"routing": "elsewhere"})
    with pytest.raises(ExportError, match="pools over space"):
        export(tiny_tada(pool_k=[3, 3, 3]), tmp_path / "c")


def test_cli_export_verify_bench_for_a_network_without_gates(tmp_path, capsys):
    out = tmp_path / "b"
    args = ["--config", "width_mult=0.125", "--config", "num_classes=5", "--config",
            "stage_blocks=[1,1,1,1]", "--frames", "4", "--size", "32", "-q"]
    assert main(["export", "tada2d", "--random-weights", "--out", str(out), *args]) == 0
    assert "0 gates" in capsys.readouterr().out
    assert main(["verify", str(out), "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    assert main(["bench", str(out), "--reps", "2", "--warmup", "0", "--json", "-q"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in bench["configs"]] == ["static", "plain-graph"]
    assert bench["configs"][0]["gflops"] > 0
