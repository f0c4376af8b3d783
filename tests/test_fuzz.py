"""Fuzzing manifests: every mutation of a valid manifest is either loaded and run correctly, or
refused with adaedge's own error, never a traceback from deeper down. Bounded in examples and
time (Hypothesis, derandomised so that CI sees the same cases every run)."""

from __future__ import annotations

import copy as copy_mod
import json
import math
import shutil
from typing import Any, List, Tuple, Union

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from adaedge import runtime  # noqa: E402
from adaedge.errors import AdaedgeError  # noqa: E402


Path_ = Tuple[Union[str, int], ...]


def _paths(node: Any, here: Path_ = ()) -> List[Path_]:
    """Every place in a JSON tree (objects' keys and lists' items)."""
    out: List[Path_] = [here]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, here + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, here + (i,))
    return out


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.sampled_from([0, -1, 1, 2, 7, 2 ** 31, 2 ** 62, -2 ** 40])
    | st.sampled_from([0.5, -0.0, 1e300, math.nan, math.inf, -math.inf])
    | st.sampled_from(["", "x", "../x", "/etc/passwd", "graphs/../../x.onnx", ".hidden", "N",
                       "float64", "int64", "NCTHW", "all-half", "static", "a" * 300]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "piece", "file", "shape", "dtype", "op", "inputs"]), inner,
        max_size=3),
    max_leaves=6)


@st.composite
def mutations(draw: Any, manifest: Any) -> Tuple[str, Path_, Any]:
    paths = [p for p in _paths(manifest) if p]
    where = draw(st.sampled_from(paths))
    kind = draw(st.sampled_from(["replace", "delete", "duplicate"]))
    return kind, where, draw(JSON_VALUES) if kind == "replace" else None


def _apply(manifest: Any, kind: str, where: Path_, value: Any) -> Any:
    data = copy_mod.deepcopy(manifest)
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    last = where[-1]
    if kind == "replace":
        parent[last] = value
    elif kind == "delete":
        del parent[last]
    elif isinstance(parent, list):
        parent.insert(int(last), copy_mod.deepcopy(parent[last]))
    else:
        parent[f"{last}"] = copy_mod.deepcopy(parent[last])     # same key: a no-op for dicts
    return data


@pytest.fixture(scope="module", params=["vared", "focus"])
def fuzz_root(request, tiny_bundle, tmp_path_factory):
    """The tiny VA-RED² bundle (gates) and a tiny AdaFocusV3 bundle (exits with thresholds)."""
    root = tmp_path_factory.mktemp("fuzz") / "b"
    if request.param == "vared":
        shutil.copytree(tiny_bundle, root)
    else:
        from adaedge.export import export
        from .test_adafocus import tiny_focus
        export(tiny_focus(seed=1), root, weights={"source": "test"})
        data = json.loads((root / "manifest.json").read_text())
        for step in data["program"]:
            if step["op"] == "exit":
                step["thresholds"] = {"default": 0.5, "0.01": 1.0}
        (root / "manifest.json").write_text(json.dumps(data))
    return root


def test_every_manifest_mutation_runs_or_is_refused_with_our_error(fuzz_root, capsys):
    """Each mutation of one field: the bundle loads and classifies one clip and a batch of
    three (a value a step reads may be missed on one path and not another), and ``info``
    prints it, or each is refused with adaedge's own error."""
    from adaedge.cli import main
    manifest = json.loads((fuzz_root / "manifest.json").read_text())
    shape = json.loads((fuzz_root / "manifest.json").read_text())["input"]
    x = np.random.default_rng(0).standard_normal(
        (3, shape["channels"], shape["frames"], *shape["size"])).astype(np.float32)

    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutations(manifest))
    def check(mutation: Tuple[str, Path_, Any]) -> None:
        data = _apply(manifest, *mutation)
        (fuzz_root / "manifest.json").write_text(json.dumps(data))
        assert main(["info", str(fuzz_root)]) in (0, 2), mutation
        capsys.readouterr()
        try:
            rt = runtime.load(fuzz_root)
        except AdaedgeError:
            return
        for n in (1, 3):
            try:
                result = rt.classify(x[:n])
            except AdaedgeError:
                continue
            assert result.scores.shape[0] == n and np.isfinite(result.scores).all(), mutation

    try:
        check()
    finally:
        (fuzz_root / "manifest.json").write_text(json.dumps(manifest))


def _exit_reads_nothing(m):
    for s in m["program"]:
        if s["op"] == "exit":
            s["scores"] = "nothing"


CASES = {   # the manifest values a fuzz of every field found, each refused in one line
    "an integer of 5000 digits": (lambda m: m["pieces"]["head"].update(flops=12345),
                                  ('"flops": 12345', '"flops": ' + "9" * 5000),
                                  "an integer of 5000 digits"),
    "model.weights a string": (lambda m: m["model"].update(weights="x"), None,
                               "model.weights must be an object"),
    "state a number": (lambda m: m.update(state=5), None, "state must be a list"),
    "input.size unbounded": (lambda m: m["input"].update(size=[1000000, 1000000]), None,
                             "more than 268435456"),
    "input.frames unbounded": (lambda m: m["input"].update(frames=1000000), None,
                               "more than 268435456"),
    "a carry of nothing": (lambda m: m["program"].append(
        {"op": "carry", "name": "c", "value": "nothing", "state": "s"}), None,
        "reads the value 'nothing'"),
    "a carry into no state": (lambda m: m["program"].append(
        {"op": "carry", "name": "c", "value": m["output"], "state": "nowhere"}), None,
        "the state 'nowhere', which the manifest's state does not declare"),
    "exit scores of nothing": (_exit_reads_nothing, None, "reads the value 'nothing'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_manifest_value_the_fuzz_found_is_one_line_at_every_batch(case, tiny_bundle,
                                                                       tmp_path, capsys):
    from adaedge.cli import main
    edit, raw, message = CASES[case]
    root = tmp_path / "b"
    if case.startswith("exit"):
        from adaedge.export import export
        from .test_adafocus import tiny_focus
        export(tiny_focus(seed=1), root, weights={"source": "test"})
    else:
        shutil.copytree(tiny_bundle, root)
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    text = json.dumps(data)
    if raw:
        text = text.replace(*raw)
    (root / "manifest.json").write_text(text)
    for args in (["info", str(root)], ["info", str(root), "--json"],
                 *(["bench", str(root), "--batch", n, "--reps", "1", "--warmup", "0", "-q"]
                   for n in ("1", "3"))):
        assert main(args) == 2, (case, args)
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, (case, captured)
        assert message in captured.err, (case, captured.err)


def test_info_escapes_terminal_controls_and_bidi_overrides(tiny_bundle, tmp_path, capsys):
    from adaedge.cli import main
    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root)
    data = json.loads((root / "manifest.json").read_text())
    data["model"]["family"] = "\x1b[2J\x1b]0;owned\x07vared"
    data["input"]["labels"] = ["\x1b[31mred", "abc\u202edcba", "c", "d", "e"]
    (root / "manifest.json").write_text(json.dumps(data))
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "\\x1b[2J\\x1b]0;owned\\x07vared" in out and "abc\\u202edcba" in out
