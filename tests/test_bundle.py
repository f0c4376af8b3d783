"""A bundle is untrusted input: every way it can be wrong gives a clear error, and nothing runs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from adaedge import bundle as bundle_mod
from adaedge import runtime
from adaedge.bundle import BundleError


@pytest.fixture()
def copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit(root, change):
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_folder_without_a_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="is not an adaedge bundle: it has no manifest.json"):
        bundle_mod.load(tmp_path)
    with pytest.raises(BundleError, match="is not a folder"):
        bundle_mod.load(tmp_path / "missing")


def test_a_manifest_that_is_not_json(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="is not valid JSON"):
        bundle_mod.load(copy)


def test_a_foreign_manifest(copy):
    _edit(copy, lambda d: d.update(format="somebody-elses-format"))
    with pytest.raises(BundleError, match="not an adaedge bundle: manifest format"):
        bundle_mod.load(copy)


def test_an_unknown_schema_version_is_refused(copy):
    _edit(copy, lambda d: d.update(schema_version=99))
    with pytest.raises(BundleError, match="schema version 99 is not supported.*reads version 1"):
        bundle_mod.load(copy)


def test_a_missing_piece(copy):
    os.remove(copy / "graphs" / "head.onnx")
    with pytest.raises(BundleError, match="piece 'head' is missing its file graphs/head.onnx"):
        runtime.load(copy)


def test_a_corrupt_piece(copy):
    path = copy / "graphs" / "stem_s.R1-r1.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"piece 'stem_s.R1-r1' .* is corrupt: SHA-256"):
        runtime.load(copy)


@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/passwd.onnx", "graphs/../../x.onnx",
                                 "graphs\\..\\..\\x.onnx"])
def test_paths_that_leave_the_bundle_are_refused(copy, bad):
    _edit(copy, lambda d: d["pieces"]["head"].update(file=bad))
    with pytest.raises(BundleError, match="absolute|leaves the bundle"):
        runtime.load(copy)


def test_a_link_that_leaves_the_bundle_is_refused(copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(copy / "graphs" / "head.onnx", outside)
    os.symlink(outside, copy / "graphs" / "link.onnx")
    _edit(copy, lambda d: d["pieces"]["head"].update(file="graphs/link.onnx"))
    with pytest.raises(BundleError, match="outside the bundle"):
        runtime.load(copy)


@pytest.mark.parametrize("change,message", [
    (lambda d: d["program"].append({"op": "teleport", "name": "x"}), "op 'teleport' is unknown"),
    (lambda d: d["program"][0]["branches"][1].update(piece="nope"), "names piece 'nope'"),
    (lambda d: d["program"][0]["branches"][1].update(piece="head"), "does not have the I/O names"),
    (lambda d: d["program"][0]["gate"].update(decision="scores"), "must name an int64 output"),
    (lambda d: d["program"][0]["inputs"].update(bogus="clip"), "names 'bogus'"),
    (lambda d: d["policies"]["static"].update(nope=0), "unknown switch 'nope'"),
    (lambda d: d["policies"]["static"].update(stem_s=9), "is not a branch index"),
    (lambda d: d["input"].update(layout="NHWC"), "layout 'NHWC' is not supported"),
    (lambda d: d["input"].update(std=[1, 0, 1]), "std must not hold zeros"),
    (lambda d: d["input"].update(size=[32]), "input.size"),
    (lambda d: d["pieces"]["head"].update(sha256="xyz"), "not a SHA-256"),
    (lambda d: d["pieces"]["head"].update(flops=-1), "flops must not be negative"),
    (lambda d: d["pieces"]["head"]["inputs"][0].update(dtype="complex128"), "dtype"),
    (lambda d: d.pop("program"), "lacks 'program'"),
    (lambda d: d.update(program=[]), "program is empty"),
    (lambda d: d["program"].append({"op": "exit", "name": "e", "scores": "logits",
                                    "criterion": "vibes"}), "criterion 'vibes'"),
])
def test_malformed_manifests_name_what_is_wrong(copy, change, message):
    _edit(copy, change)
    with pytest.raises(BundleError, match=message):
        bundle_mod.load(copy)


def test_a_program_reading_a_value_nothing_wrote(copy):
    _edit(copy, lambda d: d["program"][1]["inputs"].update(x="never_written"))
    # refused when the manifest is read, whatever path or batch a call would take
    with pytest.raises(BundleError, match="reads the value 'never_written', which no earlier "
                                          "step writes"):
        runtime.load(copy)


def test_an_onnx_file_that_is_not_onnx(copy):
    import hashlib
    path = copy / "graphs" / "head.onnx"
    path.write_bytes(b"this is not a model")
    _edit(copy, lambda d: d["pieces"]["head"].update(
        sha256=hashlib.sha256(b"this is not a model").hexdigest()))
    with pytest.raises(BundleError, match="piece 'head' is not an ONNX model"):
        runtime.load(copy)


def test_safe_join_keeps_paths_inside(tmp_path):
    assert bundle_mod.safe_join(tmp_path, "graphs/a.onnx") == (tmp_path / "graphs/a.onnx").resolve()
    for bad in ["", "..", "a/../../b", "/abs", "C:\\x"]:
        with pytest.raises(BundleError):
            bundle_mod.safe_join(tmp_path, bad)


def _external(tensor, location):
    tensor.data_location = 1                       # onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location


def _hostile_places():
    """Every place an ONNX file can keep a tensor: an edit that puts one there, external."""
    from onnx import helper

    def initializer(m, loc):
        _external(m.graph.initializer[0], loc)

    def sparse(m, loc):
        values = helper.make_tensor("sv", 1, [1], [1.0])
        _external(values, loc)
        indices = helper.make_tensor("si", 7, [1], [0])
        m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))

    def constant(m, loc):
        t = helper.make_tensor("c", 1, [1], [1.0])
        _external(t, loc)
        m.graph.node.append(helper.make_node("Constant", [], ["c_out"], value=t))

    def subgraph(m, loc):
        t = helper.make_tensor("w_in_branch", 1, [1], [1.0])
        _external(t, loc)
        branch = helper.make_graph([helper.make_node("Identity", ["w_in_branch"], ["o"])], "b",
                                   [], [helper.make_tensor_value_info("o", 1, [1])], [t])
        m.graph.node.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=branch,
                                             else_branch=branch))

    def function(m, loc):
        t = helper.make_tensor("fc", 1, [1], [1.0])
        _external(t, loc)
        m.functions.append(helper.make_function(
            "evil", "F", [], ["y"], [helper.make_node("Constant", [], ["y"], value=t)],
            [helper.make_opsetid("", 17)]))

    return {"initializer": initializer, "sparse": sparse, "constant": constant,
            "subgraph": subgraph, "function": function}


@pytest.mark.parametrize("place", sorted(_hostile_places()))
@pytest.mark.parametrize("location", ["../../secret.bin", "/etc/hostname", "secret.bin"])
def test_external_data_anywhere_in_a_piece_is_refused(copy, tmp_path, monkeypatch, place,
                                                      location):
    """A piece that keeps a tensor in an external file is refused before ONNX Runtime sees it
    (some versions follow such paths out of the model's folder, or resolve them against the
    working directory), wherever in the file the tensor is; the cached-graph path too."""
    import hashlib

    import onnx
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    monkeypatch.chdir(tmp_path)
    path = copy / "graphs" / "head.onnx"
    model = onnx.load(str(path))
    _hostile_places()[place](model, location)
    data = model.SerializeToString()
    path.write_bytes(data)
    _edit(copy, lambda d: d["pieces"]["head"].update(sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(BundleError, match="in an external file; adaedge pieces are self-contained"):
        runtime.load(copy)
    with pytest.raises(BundleError, match="external file"):
        bundle_mod.load(copy).piece_model("head")


def test_a_cached_graph_with_external_data_is_refused(copy):
    """The engine cache travels with the bundle: a cached graph is checked like a piece."""
    import hashlib

    import onnx
    runtime.build(copy)
    folder = next((copy / "engines").iterdir())
    index = json.loads((folder / "index.json").read_text())
    path = folder / index["pieces"]["head"]["file"]
    model = onnx.load(str(path))
    _external(model.graph.initializer[0], "../../../secret.bin")
    data = model.SerializeToString()
    path.write_bytes(data)
    index["pieces"]["head"]["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(BundleError, match="engine for piece 'head'.*external file"):
        runtime.load(copy)


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", ".hidden", "..", "a\x00b"])
def test_piece_and_value_names_are_never_paths(copy, bad):
    """Tools name files after pieces (the engine caches): a name that could be a path is refused
    when the manifest is read, wherever it stands."""
    _edit(copy, lambda d: d["pieces"].update({bad: d["pieces"]["head"]}))
    with pytest.raises(BundleError, match="names are never paths|non-empty name"):
        runtime.load(copy)
    _edit(copy, lambda d: (d["pieces"].pop(bad), d.update(output=bad)))
    with pytest.raises(BundleError, match="names are never paths|non-empty name"):
        runtime.load(copy)


def test_build_writes_nothing_through_links_the_bundle_ships(copy, tmp_path):
    """A hostile bundle ships links where 'build' writes (the engines, their temporary files,
    the index): build replaces what lies inside the bundle and never writes through a link."""
    from adaedge.runtime import build, create_backend
    key = create_backend("onnxruntime").cache_key
    folder = copy / "engines" / key
    folder.mkdir(parents=True)
    victims = []
    names = list(json.loads((copy / "manifest.json").read_text())["pieces"])
    for i, file in enumerate(["index.json"] + [f"{n}.onnx" for n in names] +
                             [f".{n}.tmp.onnx" for n in names]):
        victim = tmp_path / f"victim{i}"
        victim.write_text("keep me")
        os.symlink(victim, folder / file)
        victims.append(victim)
    build(copy, "onnxruntime")
    assert all(v.read_text() == "keep me" for v in victims)
    index = json.loads((folder / "index.json").read_text())["pieces"]
    for n in names:      # engines are named by their content; the links are removed, not followed
        engine = folder / index[n]["file"]
        assert engine.is_file() and not engine.is_symlink()
        assert not (folder / f"{n}.onnx").is_symlink() and not (folder / f".{n}.tmp.onnx").exists()
    assert not (folder / "index.json").is_symlink()
    runtime.load(copy).classify(np.zeros((1, 3, 5, 32, 32), np.float32))
    # an engines folder that is itself a link out of the bundle is refused
    other = copy.parent / "other"
    shutil.copytree(copy, other, symlinks=True)
    shutil.rmtree(other / "engines")
    os.symlink(tmp_path, other / "engines")
    with pytest.raises(BundleError, match="outside the bundle"):
        build(other, "onnxruntime")
    assert not (tmp_path / key).exists()


def test_a_key_twice_in_one_object_is_refused(copy):
    text = (copy / "manifest.json").read_text()
    data = json.loads(text)
    head = json.dumps(data["pieces"]["head"])
    (copy / "manifest.json").write_text(text.replace('"pieces": {', '"pieces": {"head": ' + head
                                                     + ", ", 1))
    with pytest.raises(BundleError, match="the key 'head' appears twice"):
        runtime.load(copy)


def test_two_steps_of_one_name_are_refused(copy):
    _edit(copy, lambda d: d["program"][1].update(name=d["program"][0]["name"]))
    with pytest.raises(BundleError, match=r"program\[1\] and program\[0\] are both named"):
        runtime.load(copy)


def test_a_manifest_linked_from_outside_is_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(copy / "manifest.json", outside)
    os.symlink(outside, copy / "manifest.json")
    with pytest.raises(BundleError, match="outside the bundle"):
        runtime.load(copy)


def test_a_deeply_nested_or_huge_manifest_is_refused(copy):
    (copy / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(BundleError, match="nested too deeply|not valid JSON"):
        runtime.load(copy)


@pytest.mark.parametrize("shape,message", [
    (["N", 1 << 20, 1 << 20], "more than 268435456"),
    (["N"] + [1] * 9, "10 dimensions"),
    (["N", -1], "bad dimension")])
def test_shapes_are_bounded_before_anything_is_allocated(copy, shape, message):
    _edit(copy, lambda d: d["pieces"]["head"]["outputs"][0].update(shape=shape))
    with pytest.raises(BundleError, match=message):
        runtime.load(copy)


def test_a_piece_replaced_by_a_graph_of_other_shapes_is_named(copy):
    import hashlib

    import onnx
    path = copy / "graphs" / "head.onnx"
    model = onnx.load(str(path))
    dim = model.graph.output[0].type.tensor_type.shape.dim[1]
    dim.dim_value = dim.dim_value + 1                        # one more class than the manifest's
    onnx.save(model, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    _edit(copy, lambda d: d["pieces"]["head"].update(sha256=digest))   # the hash made to fit
    with pytest.raises(BundleError, match=r"piece 'head': output .* in its graph but .* in the "
                                          "manifest"):
        runtime.load(copy).classify(np.zeros((1, 3, 5, 32, 32), np.float32), force="static")
    gate = copy / "graphs" / "stem_s.gate.onnx"
    shutil.copy(gate, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    _edit(copy, lambda d: d["pieces"]["head"].update(sha256=digest))
    with pytest.raises(BundleError, match=r"piece 'head': (input 'x' is float32|its graph's)"):
        runtime.load(copy).classify(np.zeros((1, 3, 5, 32, 32), np.float32), force="static")
