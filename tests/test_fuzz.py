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

from .conftest import clips  # noqa: E402

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


@pytest.fixture(scope="module")
def fuzz_root(tiny_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "b"
    shutil.copytree(tiny_bundle, root)
    return root


def test_every_manifest_mutation_runs_or_is_refused_with_our_error(fuzz_root):
    manifest = json.loads((fuzz_root / "manifest.json").read_text())
    x = clips(2).numpy()

    @settings(max_examples=80, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutations(manifest))
    def check(mutation: Tuple[str, Path_, Any]) -> None:
        data = _apply(manifest, *mutation)
        (fuzz_root / "manifest.json").write_text(json.dumps(data))
        try:
            rt = runtime.load(fuzz_root)
            result = rt.classify(x)
        except AdaedgeError:
            return
        assert result.scores.shape[0] == 2 and np.isfinite(result.scores).all(), mutation

    try:
        check()
    finally:
        (fuzz_root / "manifest.json").write_text(json.dumps(manifest))
