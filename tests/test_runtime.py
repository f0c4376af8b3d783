"""The runtime against the PyTorch reference: free gates, every branch forced, batches grouped by branch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from adaedge import runtime
from adaedge.bundle import BundleError
from adaedge.runtime import BackendUnavailable, InputError
from adaedge.verify import relative_error as _rel

from .conftest import clips, varied_clips

RTOL = 1e-4


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    return runtime.load(tiny_bundle)


@pytest.mark.parametrize("force", [None, 0, 1, 2, 3])
def test_whole_runtime_matches_the_reference(rt, tiny, force):
    x = varied_clips(seed=1)
    tiny.set_policy(force)
    with torch.no_grad():
        ref = tiny(x).numpy()
    tiny.set_policy(None)
    got = rt.classify(x.numpy(), force=force)
    assert got.scores.shape == ref.shape
    assert _rel(got.scores, ref) <= RTOL


def test_free_gates_choose_what_the_reference_chooses(rt, tiny):
    x = varied_clips()
    with torch.no_grad():
        tiny(x)
    result = rt.classify(x.numpy())
    mixed = 0
    for name, layer in tiny.dynamic_layers():
        unit = name[: -len(".conv")]
        step = next(s for s in rt.manifest.switches() if s.name == unit)
        want = [step.branches[i].name for i in layer.last_branch.tolist()]
        assert [t.branches[unit] for t in result.traces] == want, unit
        mixed += len(set(want)) > 1
    assert mixed >= 5   # the batch really splits across branches at many gates


def test_a_mixed_batch_gives_each_clip_what_it_gets_alone(rt):
    x = varied_clips().numpy()
    batch = rt.classify(x)
    assert sum(len({t.branches[s.name] for t in batch.traces}) > 1
               for s in rt.manifest.switches()) >= 5
    for i in range(len(x)):
        alone = rt.classify(x[i:i + 1])
        assert _rel(batch.scores[i:i + 1], alone.scores) <= RTOL
        assert batch.traces[i].branches == alone.traces[0].branches
        assert batch.traces[i].flops == alone.traces[0].flops


def test_named_policies_force_every_gate(rt):
    x = clips(2).numpy()
    for policy, name in [("static", "R1-r1"), ("all-half", "R1-r1/2"),
                         ("all-stride2", "R2-r1"), ("cheapest", "R2-r1/2")]:
        result = rt.classify(x, force=policy)
        assert set(result.traces[0].branches.values()) == {name}
    one = rt.manifest.switches()[3].name
    result = rt.classify(x, force={one: 3})
    assert result.traces[0].branches[one] == "R2-r1/2"


def test_trace_accounts_flops_and_time_of_every_step(rt, tiny_bundle):
    result = rt.classify(clips(3).numpy(), force="all-half")
    m = rt.manifest
    want = sum(m.pieces[s.branches[1].piece].flops for s in m.switches()) + \
        m.pieces["head"].flops
    for t in result.traces:
        assert t.flops == want
        assert len(t.steps) == len(m.program)        # forced: no gate runs
        assert all(s.ms >= 0 and s.batch == 3 for s in t.steps)
    pieces = runtime.load(tiny_bundle, path="pieces")     # one clip, piece by piece
    free = pieces.classify(clips(1).numpy())
    assert len(free.traces[0].steps) == len(m.program) + len(m.switches())   # gates ran
    assert free.traces[0].to_json()["flops"] == free.traces[0].flops
    # one clip on the compiled program: one step, the same branches and FLOPs
    compiled = rt.classify(clips(1).numpy())
    assert [(s.step, s.piece) for s in compiled.traces[0].steps] == [("program", "compiled")]
    assert compiled.traces[0].branches == free.traces[0].branches
    assert compiled.traces[0].flops == free.traces[0].flops
    assert compiled.traces[0].decisions == free.traces[0].decisions == len(m.switches())


def test_runtime_never_imports_torch(tiny_bundle):
    code = textwrap.dedent(f"""
        import sys, numpy as np
        import adaedge.runtime as rt, adaedge.bench as bench
        r = rt.load({str(tiny_bundle)!r})
        r.classify(np.zeros((1, 3, 5, 32, 32), np.float32))
        bench.bench(r, reps=1, warmup=0)
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_clips_of_the_wrong_shape_are_refused_clearly(rt):
    with pytest.raises(InputError, match=r"do not match the bundle's input \(N, 3, 5, 32, 32\)"):
        rt.classify(np.zeros((1, 3, 8, 32, 32), np.float32))
    with pytest.raises(InputError, match="do not match"):
        rt.classify(np.zeros((3, 5, 32, 32), np.float32))
    with pytest.raises(InputError, match="numeric"):
        rt.classify(np.array([["a"]]))
    with pytest.raises(InputError, match="nested lists of unequal lengths"):
        rt.classify([[1.0, 2.0], [3.0]])


def test_bad_policies_are_refused_clearly(rt):
    with pytest.raises(InputError, match="unknown policy 'fast'; this bundle has all-half"):
        rt.classify(clips(1).numpy(), force="fast")
    with pytest.raises(InputError, match="branch 7 does not exist"):
        rt.classify(clips(1).numpy(), force=7)
    with pytest.raises(InputError, match="unknown switch"):
        rt.classify(clips(1).numpy(), force={"nope": 0})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_clips_are_refused_not_labelled_class_0(rt, bad):
    x = clips(3).numpy()
    x[1, 0, 2, 5, 5] = bad
    with pytest.raises(InputError, match="clip 1 holds NaN or infinite values"):
        rt.classify(x)                                  # piece by piece
    with pytest.raises(InputError, match="clip 0 holds NaN or infinite values"):
        rt.classify(x[1:2])                             # one clip: the compiled graph
    assert np.isfinite(rt.classify(np.delete(x, 1, axis=0)).scores).all()


@pytest.mark.parametrize("force,message", [
    ({"stem_s": 1.9}, "must be an integer index, not 1.9"),
    ({"stem_s": "1"}, "must be an integer index, not '1'"),
    ({"stem_s": True}, "must be an integer index, not True")])
def test_a_forced_branch_must_be_an_integer_index(rt, force, message):
    with pytest.raises(InputError, match=message):
        rt.classify(clips(1).numpy(), force=force)


def test_exit_at_names_must_be_exits_of_the_bundle(rt):
    with pytest.raises(InputError, match="exit_at names 'glance', not an exit of this bundle "
                                         r"\(its exits: none\)"):
        rt.classify(clips(2).numpy(), exit_at="glance")
    with pytest.raises(InputError, match="not an exit"):
        rt.classify(clips(2).numpy(), exit_at=[None, "glance"])


def test_a_huge_call_runs_in_bounded_calls_with_the_same_results(rt, monkeypatch):
    from adaedge.runtime import interpreter
    x = np.concatenate([varied_clips(12).numpy()] * 6)            # 72 clips
    want = np.concatenate([rt.classify(x[i:i + 12]).scores for i in range(0, 72, 12)])
    monkeypatch.setattr(interpreter, "MAX_CALL_CLIPS", 16)
    sizes = []
    real = interpreter.Runtime.classify_batches

    def spy(self, clips, batch, **kw):
        sizes.append(batch)
        return real(self, clips, batch, **kw)
    monkeypatch.setattr(interpreter.Runtime, "classify_batches", spy)
    got = rt.classify(x)
    assert sizes == [16] and len(got.traces) == 72
    np.testing.assert_allclose(got.scores, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="give at most 16 clips a call"):
        rt.classify(x, keep_values=True)
    with pytest.raises(InputError, match="exit_at holds 3 names for 72 clips"):
        rt.classify(x, exit_at=[None] * 3)


def test_unknown_backend_names_the_available_ones(tiny_bundle):
    with pytest.raises(BackendUnavailable,
                       match="unknown backend 'openvino'.*onnxruntime, tensorrt, torch-cpu, "
                             "torch-cuda"):
        runtime.load(tiny_bundle, backend="openvino")


def test_backend_whose_library_is_not_installed_says_how_to_install_it(tiny_bundle):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["onnxruntime"] = None      # as if the package were not installed
        import adaedge.runtime as rt
        try:
            rt.load({str(tiny_bundle)!r})
        except rt.BackendUnavailable as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install onnxruntime" in out.stdout, out.stderr


def test_cuda_device_without_the_provider_is_a_clear_error(tiny_bundle):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
        runtime.load(tiny_bundle, device="cuda")


def test_build_cache_is_used_and_stale_or_corrupt_engines_are_never_run(tiny, tmp_path):
    from adaedge.export import export
    out = tmp_path / "b"
    export(tiny, out)
    folder = runtime.build(out)
    index = json.loads((folder / "index.json").read_text())
    assert set(index["pieces"]) == set(runtime.load(out).manifest.pieces)
    x = clips(2).numpy()
    fresh = runtime.load(out, use_cache=False).classify(x).scores
    assert _rel(runtime.load(out).classify(x).scores, fresh) <= RTOL
    # a stale entry (the piece changed since the build) is ignored: the bundle's graph runs
    index["pieces"]["head"]["source_sha256"] = "0" * 64
    (folder / "index.json").write_text(json.dumps(index))
    assert _rel(runtime.load(out).classify(x).scores, fresh) <= RTOL
    # a corrupt engine is refused with a clear message, never run
    (folder / index["pieces"]["stem_s.gate"]["file"]).write_bytes(b"garbage")
    with pytest.raises(BundleError, match="corrupt; run 'adaedge build' again"):
        runtime.load(out)


def test_stream_keeps_independent_state_per_call(rt):
    # VA-RED² carries no state; a stream over it gives what classify gives
    s = runtime.Stream(rt)
    x = clips(1).numpy()
    assert _rel(s.step(x).scores, rt.classify(x).scores) <= RTOL


def test_policy_flops_from_the_manifest_equal_what_a_forced_run_spends(rt):
    x = clips(2).numpy()
    for policy in rt.policies:
        assert rt.manifest.policy_flops(policy) == rt.classify(x, force=policy).traces[0].flops


def test_a_non_finite_value_is_an_infinite_error_never_none():
    assert _rel(np.array([np.nan, 1.0]), np.array([1.0, 1.0])) == np.inf
    assert _rel(np.array([1.0]), np.array([np.inf])) == np.inf
    assert max(0.0, _rel(np.array([np.nan]), np.array([1.0]))) == np.inf
    assert _rel(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0
