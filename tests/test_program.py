"""The program format beyond switches: early exits with thresholds and state carried between calls.

A small synthetic bundle of real ONNX graphs (no torch) exercises the interpreter the way the
AdaFocusV3 (exits) and AdaFuse (state) exporters will:

    feat   = encode(clip)                      mean over frames and pixels, then x2
    early  = head1(feat)                       scores after the first stage
    exit   when entropy(softmax(early)) <= threshold
    mixed  = feat + prev                       prev: the state from the last call
    carry  mixed -> prev
    scores = head2(mixed)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from adaedge import bundle as bundle_mod
from adaedge import runtime
from adaedge.bundle import (Manifest, Piece, ProgramBuilder, TensorSpec, sha256_file,
                            write_manifest)
from adaedge.export.graph import Graph
from adaedge.runtime import InputError

C, T, S = 3, 2, 4


def _piece(root, name, model: onnx.ModelProto) -> Piece:
    path = root / "graphs" / f"{name}.onnx"
    onnx.save(model, str(path))
    io = lambda vs: [TensorSpec(v.name, ["N", 3], "float32") for v in vs]  # noqa: E731
    return Piece(name, f"graphs/{name}.onnx", sha256_file(path), 0, io(model.graph.input),
                 io(model.graph.output))


def make_bundle(root, thresholds):
    (root / "graphs").mkdir(parents=True)
    g = Graph("encode")
    x = g.input("x", ["N", C, T, S, S])
    feat = g.op("Mul", g.op("ReduceMean", x, axes=[2, 3, 4], keepdims=0),
                g.const(np.float32(2.0), "two"))
    g.output(feat, "feat")
    enc = g.model()
    g = Graph("head1")
    g.output(g.op("Identity", g.input("f", ["N", 3])), "early")
    h1 = g.model()
    g = Graph("mix")
    g.output(g.op("Add", g.input("f", ["N", 3]), g.input("prev", ["N", 3])), "mixed")
    mix = g.model()
    g = Graph("head2")
    g.output(g.op("Mul", g.input("f", ["N", 3]), g.const(np.float32(3.0), "three")), "scores")
    h2 = g.model()
    pieces = {p.name: p for p in [_piece(root, "encode", enc), _piece(root, "head1", h1),
                                  _piece(root, "mix", mix), _piece(root, "head2", h2)]}
    for p in pieces.values():   # fix the clip input's shape
        if p.name == "encode":
            p.inputs[0] = TensorSpec("x", ["N", C, T, S, S], "float32")
    program = ProgramBuilder()
    program.run("encode", {"x": "clip"}, {"feat": "feat"})
    program.run("head1", {"f": "feat"}, {"early": "early"})
    program.exit("exit1", "early", "entropy", thresholds)
    program.run("mix", {"f": "feat", "prev": "prev"}, {"mixed": "mixed"})
    program.carry("keep", "mixed", "prev")
    program.run("head2", {"f": "mixed"}, {"scores": "scores"})
    manifest = Manifest(model={"name": "synthetic"},
                        input={"name": "clip", "layout": "NCTHW", "channels": C, "frames": T,
                               "size": [S, S], "dtype": "float32", "mean": [0.0] * 3,
                               "std": [1.0] * 3, "labels": None},
                        output="scores", pieces=pieces, program=program.steps,
                        state=[TensorSpec("prev", ["N", 3], "float32")])
    write_manifest(root, manifest)
    return root


def _clip(values):
    """Clips whose encoded feature is 2 * values (per channel)."""
    v = np.asarray(values, np.float32)
    return np.broadcast_to(v[:, :, None, None, None], (len(v), C, T, S, S)).copy()


@pytest.fixture()
def synthetic(tmp_path):
    return runtime.load(make_bundle(tmp_path / "b", {"default": 0.5, "tight": 0.05}))


def _entropy(scores):
    return runtime.exit_measure(np.asarray(scores, np.float64), "entropy")


def test_sure_clips_exit_early_and_unsure_ones_run_on(synthetic):
    sure, unsure = [5.0, 0.0, 0.0], [0.1, 0.0, 0.0]
    assert _entropy([[10, 0, 0]])[0] <= 0.5 < _entropy([[0.2, 0, 0]])[0]
    result = synthetic.classify(_clip([sure, unsure]))
    assert [t.exit for t in result.traces] == ["exit1", None]
    np.testing.assert_allclose(result.scores[0], [10, 0, 0])          # early scores
    np.testing.assert_allclose(result.scores[1], [0.6, 0, 0])         # head2(feat + 0)
    assert [len(t.steps) for t in result.traces] == [2, 4]            # the exited clip stopped


def test_batched_exit_gives_each_clip_what_it_gets_alone(synthetic):
    x = _clip([[0.1, 0, 0], [5, 0, 0], [0.2, 0.1, 0], [0, 0, 9]])
    batch = synthetic.classify(x)
    for i in range(4):
        alone = synthetic.classify(x[i:i + 1])
        np.testing.assert_allclose(batch.scores[i], alone.scores[0])
        assert batch.traces[i].exit == alone.traces[0].exit


def test_budgets_pick_thresholds_and_missing_ones_are_clear(synthetic):
    x = _clip([[3, 0, 0]])            # entropy of softmax([6, 0, 0]) ~ 0.03
    assert synthetic.classify(x).traces[0].exit == "exit1"
    assert synthetic.classify(x, budget="tight").traces[0].exit == "exit1"
    x = _clip([[1.5, 0, 0]])          # entropy ~ 0.2: exits at 0.5, not at 0.05
    assert synthetic.classify(x).traces[0].exit == "exit1"
    assert synthetic.classify(x, budget="tight").traces[0].exit is None
    with pytest.raises(InputError, match="no thresholds for budget '1.5'.*default, tight"):
        synthetic.classify(x, budget="1.5")


def test_exit_can_be_forced_for_verification(synthetic):
    x = _clip([[0.1, 0, 0]])
    assert synthetic.classify(x, exit_at="exit1").traces[0].exit == "exit1"


def test_state_is_carried_from_one_call_to_the_next(synthetic):
    stream = runtime.Stream(synthetic)
    x = _clip([[0.1, 0.2, 0.0]])
    first = stream.step(x)
    np.testing.assert_allclose(first.scores[0], 3 * np.array([0.2, 0.4, 0]), rtol=1e-6)
    second = stream.step(x)                                  # feat + previous mixed
    np.testing.assert_allclose(second.scores[0], 3 * np.array([0.4, 0.8, 0]), rtol=1e-6)
    stream.reset()
    np.testing.assert_allclose(stream.step(x).scores, first.scores)
    # classify on its own always starts from zero state
    np.testing.assert_allclose(synthetic.classify(x).scores, first.scores)


def test_exited_clips_keep_their_previous_state(synthetic):
    stream = runtime.Stream(synthetic, batch=2)
    stream.step(_clip([[0.1, 0, 0], [0.1, 0, 0]]))
    before = stream.state["prev"].copy()
    stream.step(_clip([[5, 0, 0], [0.1, 0, 0]]))               # clip 0 exits before the carry
    np.testing.assert_allclose(stream.state["prev"][0], before[0])
    np.testing.assert_allclose(stream.state["prev"][1], before[1] + [0.2, 0, 0])


def test_the_synthetic_bundle_validates(tmp_path):
    b = bundle_mod.load(make_bundle(tmp_path / "b", {}))
    b.verify_files()
    assert [s.op for s in b.manifest.program] == ["run", "run", "exit", "run", "carry", "run"]
