"""The bundle format: a folder with ``manifest.json``, ``graphs/*.onnx`` and an ``engines/`` cache.

A bundle is untrusted input. :func:`load_manifest` checks every field it relies on, keeps every path
inside the bundle, refuses unknown schema versions, and :meth:`Bundle.piece_path` checks each
piece's SHA-256 before a backend reads it.

Manifest (schema version 1)::

    {
      "format": "adaedge-bundle", "schema_version": 1, "adaedge_version": "...",
      "model": {"name": str, "family": str, "config": {...}, "weights": {...}},
      "input": {"name": "clip", "layout": "NCTHW", "channels": 3, "frames": T, "size": [H, W],
                "dtype": "float32", "mean": [3 floats], "std": [3 floats], "labels": [str] | null},
      "output": value name of the class scores,
      "pieces": {name: {"file": "graphs/<name>.onnx", "sha256": hex, "flops": int,
                        "inputs": [{"name", "shape", "dtype"}], "outputs": [...]}},
      "program": [step, ...],
      "state": [{"name", "shape", "dtype"}],          # tensors carried from one call to the next
      "policies": {name: {switch name: branch index}}, # forced policies (static, all-half, ...)
      "constants": {"file": "graphs/<name>.npz", "sha256": hex,        # optional: tensors that
                    "tensors": [{"name", "shape", "dtype"}]},          # several pieces read
      "stream": {"window": T}                          # optional: a per-frame program (below)
    }

Constants are weights shared by several pieces (AdaFuse's bucketed pieces all read one block's
weights), stored once in a NumPy ``.npz`` (read with ``allow_pickle=False``) and fed to the pieces
as inputs; a program reads them by name like any value.

A *stream* bundle's program takes one frame per call (``input.frames`` is 1) and carries its state
from frame to frame; its scores are the mean of the last ``window`` frames' scores, so a stream
started from zero state and fed the T = ``window`` frames of a clip one by one gives the clip's scores.

Steps (``inputs``/``outputs`` map a piece's I/O names to program value names):

* ``{"op": "run", "name", "piece", "inputs", "outputs", ["layouts"]}``: run one piece. The
  optional ``layouts`` maps output values to ``"NTCHW"`` where a 5D value holds frames before
  channels (pieces that fold frames into the batch); others are ``NCTHW``.
* ``{"op": "switch", "name", "gate": {"piece", "inputs", "decision", "scores"},
  "branches": [{"name", "piece"}], "inputs", "outputs"}``: the gate piece's ``decision`` output
  (int64, one per clip) picks the branch; all branch pieces share I/O names. Instead of ``gate``, a
  switch may name ``"select": value``: an int64 value (one per clip) an earlier step computed. A
  branch ``{"name", "pass": {output: input}}`` runs no piece: it forwards inputs as outputs.
* ``{"op": "exit", "name", "scores", "criterion": "entropy" | "max_prob", "thresholds": {budget: t}}``:
  clips whose ``scores`` (softmax of) meet the criterion stop here with those scores.
* ``{"op": "carry", "name", "value", "state"}``: keep ``value`` as state for the next call.

FLOPs are multiply-accumulates of Conv, Gemm and MatMul nodes per clip, counted from the graphs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

FORMAT = "adaedge-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16", "int64", "int32", "bool", "uint8")
STEP_OPS = ("run", "switch", "exit", "carry")
CRITERIA = ("entropy", "max_prob")
LAYOUTS = ("NCTHW", "NTCHW")

Dim = Union[int, str]


class BundleError(ValueError):
    """A bundle that cannot be used: missing, corrupt, foreign, or from an unknown schema."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: List[Dim]
    dtype: str

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Piece:
    name: str
    file: str
    sha256: str
    flops: int
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]

    def to_json(self) -> Dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "flops": self.flops,
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}


@dataclass(frozen=True)
class Constants:
    file: str
    sha256: str
    tensors: List[TensorSpec]

    def to_json(self) -> Dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256,
                "tensors": [t.to_json() for t in self.tensors]}


@dataclass
class Manifest:
    model: Dict[str, Any]
    input: Dict[str, Any]
    output: str
    pieces: Dict[str, Piece]
    program: List[Dict[str, Any]]
    state: List[TensorSpec] = field(default_factory=list)
    policies: Dict[str, Dict[str, int]] = field(default_factory=dict)
    adaedge_version: str = ""
    constants: Optional[Constants] = None
    stream: Optional[Dict[str, int]] = None

    def to_json(self) -> Dict[str, Any]:
        out = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
               "adaedge_version": self.adaedge_version, "model": self.model, "input": self.input,
               "output": self.output,
               "pieces": {k: p.to_json() for k, p in self.pieces.items()},
               "program": self.program, "state": [s.to_json() for s in self.state],
               "policies": self.policies}
        if self.constants is not None:
            out["constants"] = self.constants.to_json()
        if self.stream is not None:
            out["stream"] = dict(self.stream)
        return out

    @property
    def window(self) -> Optional[int]:
        """Frames a stream bundle's scores average over (None: the program takes whole clips)."""
        return None if self.stream is None else int(self.stream["window"])

    @property
    def clip_shape(self) -> List[int]:
        """Shape of one call's input, without the batch dimension: (C, T, H, W) (T = 1 for a
        stream bundle)."""
        spec = self.input
        return [int(spec["channels"]), int(spec["frames"]), int(spec["size"][0]),
                int(spec["size"][1])]

    @property
    def full_clip_shape(self) -> List[int]:
        """Shape of the clip the model classifies: a stream bundle's has ``window`` frames."""
        shape = self.clip_shape
        if self.window is not None:
            shape[1] = self.window
        return shape

    def switches(self) -> List[Dict[str, Any]]:
        return [s for s in self.program if s["op"] == "switch"]

    def exits(self) -> List[Dict[str, Any]]:
        return [s for s in self.program if s["op"] == "exit"]

    def policy_flops(self, policy: str) -> int:
        """FLOPs per clip of the whole program under a forced policy (no gate runs, no exit):
        what a trace of ``classify(clips, force=policy)`` adds up to. A program without switches
        has one path, which every policy name (``static`` included) means."""
        if policy not in self.policies and not self.switches():
            table: Dict[str, int] = {}
        else:
            table = self.policies[policy]
        flops = 0
        for step in self.program:
            if step["op"] == "run":
                flops += self.pieces[step["piece"]].flops
            elif step["op"] == "switch":
                branch = step["branches"][table.get(step["name"], 0)]
                flops += self.pieces[branch["piece"]].flops if "piece" in branch else 0
        return flops


def budget_key(gflops: Union[float, str]) -> str:
    """The name an exit step stores a budget's threshold under: GFLOPs as ``format(x, "g")``."""
    return gflops if isinstance(gflops, str) else format(float(gflops), "g")


# ---------------------------------------------------------------------------------------------
# safe paths

def safe_join(root: Union[str, Path], relative: str) -> Path:
    """``root / relative``, refusing absolute paths, ``..`` and links that leave ``root``."""
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"bundle path must be a non-empty string, got {relative!r}")
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")) or ":" in rel.parts[0]:
        raise BundleError(f"bundle path {relative!r} is absolute: paths must stay inside the bundle")
    if any(part == ".." for part in rel.parts) or "\\" in relative:
        raise BundleError(f"bundle path {relative!r} leaves the bundle")
    base = Path(root).resolve()
    target = (base / rel).resolve()
    try:
        target.relative_to(base)
    except ValueError:
        raise BundleError(f"bundle path {relative!r} resolves to {target}, outside the bundle "
                          f"{base}") from None
    return target


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# validation

def _need(obj: Mapping[str, Any], key: str, kind: Any, where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise BundleError(f"manifest: {where} lacks {key!r}")
    val = obj[key]
    if kind is int and isinstance(val, bool):
        raise BundleError(f"manifest: {where}.{key} must be an integer")
    if not isinstance(val, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BundleError(f"manifest: {where}.{key} must be {names}, got {type(val).__name__}")
    return val


def _name(val: Any, where: str) -> str:
    if not isinstance(val, str) or not val or len(val) > 200:
        raise BundleError(f"manifest: {where} must be a non-empty name, got {val!r}")
    return val


def _digest(obj: Mapping[str, Any], where: str) -> str:
    sha = _need(obj, "sha256", str, where)
    if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise BundleError(f"manifest: {where}.sha256 is not a SHA-256 hex digest")
    return sha


def _tensor(obj: Any, where: str) -> TensorSpec:
    name = _name(_need(obj, "name", str, where), f"{where}.name")
    shape = _need(obj, "shape", list, where)
    for d in shape:
        if isinstance(d, bool) or not (isinstance(d, str) or (isinstance(d, int) and d >= 0)):
            raise BundleError(f"manifest: {where}.shape has a bad dimension {d!r}")
    dtype = _need(obj, "dtype", str, where)
    if dtype not in DTYPES:
        raise BundleError(f"manifest: {where}.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return TensorSpec(name, list(shape), dtype)


def _io_map(obj: Any, where: str, known: Sequence[str]) -> Dict[str, str]:
    if not isinstance(obj, dict) or not obj:
        raise BundleError(f"manifest: {where} must map the piece's tensor names to values")
    for k, v in obj.items():
        _name(v, f"{where}[{k!r}]")
        if k not in known:
            raise BundleError(f"manifest: {where} names {k!r}, which the piece does not have "
                              f"(it has {', '.join(known)})")
    return dict(obj)


def _check_step(step: Any, i: int, pieces: Dict[str, Piece]) -> None:
    where = f"program[{i}]"
    if not isinstance(step, dict):
        raise BundleError(f"manifest: {where} must be an object")
    op = _need(step, "op", str, where)
    if op not in STEP_OPS:
        raise BundleError(f"manifest: {where}.op {op!r} is unknown (known: {', '.join(STEP_OPS)})")
    _name(_need(step, "name", str, where), f"{where}.name")

    def piece(name: Any, w: str) -> Piece:
        _name(name, w)
        if name not in pieces:
            raise BundleError(f"manifest: {w} names piece {name!r}, which is not in pieces")
        return pieces[name]

    if op == "run":
        p = piece(_need(step, "piece", str, where), f"{where}.piece")
        _io_map(step.get("inputs"), f"{where}.inputs", [t.name for t in p.inputs])
        outputs = _io_map(step.get("outputs"), f"{where}.outputs", [t.name for t in p.outputs])
        layouts = step.get("layouts", {})
        if not isinstance(layouts, dict) or any(
                v not in outputs.values() or lay not in LAYOUTS for v, lay in layouts.items()):
            raise BundleError(f"manifest: {where}.layouts must map output values to one of "
                              f"{', '.join(LAYOUTS)}")
    elif op == "switch":
        if ("gate" in step) == ("select" in step):
            raise BundleError(f"manifest: {where} needs either a gate or a select value")
        if "select" in step:
            _name(step["select"], f"{where}.select")
        else:
            gate = _need(step, "gate", dict, where)
            g = piece(_need(gate, "piece", str, f"{where}.gate"), f"{where}.gate.piece")
            _io_map(gate.get("inputs"), f"{where}.gate.inputs", [t.name for t in g.inputs])
            outs = {t.name: t for t in g.outputs}
            decision = _need(gate, "decision", str, f"{where}.gate")
            if decision not in outs or outs[decision].dtype != "int64":
                raise BundleError(f"manifest: {where}.gate.decision must name an int64 output of "
                                  f"piece {g.name!r}")
            if "scores" in gate and gate["scores"] not in outs:
                raise BundleError(f"manifest: {where}.gate.scores is not an output of {g.name!r}")
        branches = _need(step, "branches", list, where)
        if not branches:
            raise BundleError(f"manifest: {where}.branches is empty")
        first: Optional[Piece] = None
        passes = []
        for j, b in enumerate(branches):
            _name(_need(b, "name", str, f"{where}.branches[{j}]"), f"{where}.branches[{j}].name")
            if isinstance(b, dict) and "pass" in b and "piece" not in b:
                passes.append((j, _need(b, "pass", dict, f"{where}.branches[{j}]")))
                continue
            p = piece(_need(b, "piece", str, f"{where}.branches[{j}]"),
                      f"{where}.branches[{j}].piece")
            if first is None:
                first = p
            elif ([t.name for t in p.inputs], [t.name for t in p.outputs]) != \
                    ([t.name for t in first.inputs], [t.name for t in first.outputs]):
                raise BundleError(f"manifest: {where}: branch {p.name!r} does not have the I/O "
                                  f"names of {first.name!r}")
        if first is None:
            raise BundleError(f"manifest: {where} has no branch that runs a piece")
        _io_map(step.get("inputs"), f"{where}.inputs", [t.name for t in first.inputs])
        _io_map(step.get("outputs"), f"{where}.outputs", [t.name for t in first.outputs])
        for j, mapping in passes:
            if set(mapping) != {t.name for t in first.outputs} or any(
                    v not in step["inputs"] for v in mapping.values()):
                raise BundleError(f"manifest: {where}.branches[{j}].pass must map every output "
                                  "of the branches to one of the step's inputs")
    elif op == "exit":
        _name(_need(step, "scores", str, where), f"{where}.scores")
        crit = _need(step, "criterion", str, where)
        if crit not in CRITERIA:
            raise BundleError(f"manifest: {where}.criterion {crit!r} is not one of "
                              f"{', '.join(CRITERIA)}")
        thresholds = step.get("thresholds", {})
        if not isinstance(thresholds, dict):
            raise BundleError(f"manifest: {where}.thresholds must be an object")
        for k, v in thresholds.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BundleError(f"manifest: {where}.thresholds[{k!r}] must be a finite number")
    elif op == "carry":
        _name(_need(step, "value", str, where), f"{where}.value")
        _name(_need(step, "state", str, where), f"{where}.state")


def parse_manifest(data: Any) -> Manifest:
    """Validate a decoded manifest.json and return it as a :class:`Manifest`."""
    if not isinstance(data, dict):
        raise BundleError("manifest: top level must be an object")
    fmt = data.get("format")
    if fmt != FORMAT:
        raise BundleError(f"not an adaedge bundle: manifest format is {fmt!r}, expected {FORMAT!r}")
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError("manifest: schema_version must be an integer")
    if version != SCHEMA_VERSION:
        raise BundleError(f"bundle schema version {version} is not supported by this adaedge "
                          f"(it reads version {SCHEMA_VERSION}); re-export the bundle with this "
                          "adaedge, or install the adaedge that wrote it")
    model = _need(data, "model", dict, "manifest")
    _name(_need(model, "name", str, "model"), "model.name")
    spec = _need(data, "input", dict, "manifest")
    _name(_need(spec, "name", str, "input"), "input.name")
    if _need(spec, "layout", str, "input") != "NCTHW":
        raise BundleError(f"manifest: input.layout {spec['layout']!r} is not supported (NCTHW)")
    for key in ("channels", "frames"):
        if _need(spec, key, int, "input") <= 0:
            raise BundleError(f"manifest: input.{key} must be positive")
    size = _need(spec, "size", list, "input")
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                 for s in size):
        raise BundleError("manifest: input.size must be [height, width] of positive integers")
    for key in ("mean", "std"):
        vals = _need(spec, key, list, "input")
        if len(vals) != spec["channels"] or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in vals):
            raise BundleError(f"manifest: input.{key} must hold one finite number per channel")
    if any(v == 0 for v in spec["std"]):
        raise BundleError("manifest: input.std must not hold zeros")
    labels = spec.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str)
                                                                     for x in labels)):
        raise BundleError("manifest: input.labels must be a list of strings or null")
    output = _name(_need(data, "output", str, "manifest"), "output")

    raw_pieces = _need(data, "pieces", dict, "manifest")
    pieces: Dict[str, Piece] = {}
    for pname, p in raw_pieces.items():
        where = f"pieces[{pname!r}]"
        _name(pname, where)
        file = _need(p, "file", str, where)
        if not file.endswith(".onnx"):
            raise BundleError(f"manifest: {where}.file {file!r} is not an .onnx file")
        sha = _digest(p, where)
        flops = _need(p, "flops", int, where)
        if flops < 0:
            raise BundleError(f"manifest: {where}.flops must not be negative")
        ins = [_tensor(t, f"{where}.inputs[{i}]")
               for i, t in enumerate(_need(p, "inputs", list, where))]
        outs = [_tensor(t, f"{where}.outputs[{i}]")
                for i, t in enumerate(_need(p, "outputs", list, where))]
        pieces[pname] = Piece(pname, file, sha, flops, ins, outs)

    program = _need(data, "program", list, "manifest")
    if not program:
        raise BundleError("manifest: program is empty")
    for i, step in enumerate(program):
        _check_step(step, i, pieces)
    state = [_tensor(t, f"state[{i}]") for i, t in enumerate(data.get("state", []) or [])]
    policies = data.get("policies", {}) or {}
    if not isinstance(policies, dict):
        raise BundleError("manifest: policies must be an object")
    switches = {s["name"]: len(s["branches"]) for s in program if s["op"] == "switch"}
    for pol, table in policies.items():
        if not isinstance(table, dict):
            raise BundleError(f"manifest: policies[{pol!r}] must be an object")
        for sw, idx in table.items():
            if sw not in switches:
                raise BundleError(f"manifest: policies[{pol!r}] names unknown switch {sw!r}")
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < switches[sw]:
                raise BundleError(f"manifest: policies[{pol!r}][{sw!r}] is not a branch index")
    constants = None
    if data.get("constants") is not None:
        c = _need(data, "constants", dict, "manifest")
        file = _need(c, "file", str, "constants")
        if not file.endswith(".npz"):
            raise BundleError(f"manifest: constants.file {file!r} is not an .npz file")
        sha = _digest(c, "constants")
        tensors = [_tensor(t, f"constants.tensors[{i}]")
                   for i, t in enumerate(_need(c, "tensors", list, "constants"))]
        for t in tensors:
            if not all(isinstance(d, int) for d in t.shape):
                raise BundleError(f"manifest: constant {t.name!r} must have a static shape")
        constants = Constants(file, sha, tensors)
    stream = None
    if data.get("stream") is not None:
        st = _need(data, "stream", dict, "manifest")
        if _need(st, "window", int, "stream") < 1:
            raise BundleError("manifest: stream.window must be positive")
        if spec["frames"] != 1:
            raise BundleError("manifest: a stream bundle takes one frame per call (input.frames 1)")
        stream = {"window": int(st["window"])}
    return Manifest(model=model, input=spec, output=output, pieces=pieces, program=program,
                    state=state, policies=policies,
                    adaedge_version=str(data.get("adaedge_version", "")),
                    constants=constants, stream=stream)


class Bundle:
    """An opened bundle folder with a validated manifest."""

    def __init__(self, root: Union[str, Path], manifest: Manifest) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self._verified: Dict[str, Path] = {}

    def piece_path(self, name: str, check_hash: bool = True) -> Path:
        """The piece's file inside the bundle, present and matching its recorded SHA-256."""
        if name in self._verified:
            return self._verified[name]
        piece = self.manifest.pieces[name]
        path = self._file(piece.file, piece.sha256 if check_hash else None, f"piece {name!r}")
        self._verified[name] = path
        return path

    def piece_bytes(self, name: str) -> bytes:
        """The piece's ONNX bytes, read once and checked against the manifest's SHA-256 (the
        bytes handed on are the bytes hashed)."""
        piece = self.manifest.pieces[name]
        data = self._file(piece.file, None, f"piece {name!r}").read_bytes()
        self._check_digest(hashlib.sha256(data).hexdigest(), piece.sha256, f"piece {name!r}",
                           piece.file)
        return data

    def piece_model(self, name: str) -> Any:
        """The piece as a checked ``onnx.ModelProto`` (external data is refused)."""
        import onnx
        try:
            model = onnx.load_model_from_string(self.piece_bytes(name))
        except BundleError:
            raise
        except Exception as e:   # protobuf's DecodeError and friends
            raise BundleError(f"bundle {self.root}: piece {name!r} is not an ONNX model: "
                              f"{e}") from None
        for init in model.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                raise BundleError(f"bundle {self.root}: piece {name!r} keeps tensor "
                                  f"{init.name!r} in an external file; adaedge pieces are "
                                  "self-contained")
        return model

    def _file(self, relative: str, sha256: Optional[str], what: str) -> Path:
        """A file of the bundle, inside it, present and (given ``sha256``) matching its hash."""
        path = safe_join(self.root, relative)
        if not path.is_file():
            raise BundleError(f"bundle {self.root}: {what} is missing its file {relative}")
        if sha256 is not None:
            self._check_digest(sha256_file(path), sha256, what, relative)
        return path

    def _check_digest(self, digest: str, sha256: str, what: str, relative: str) -> None:
        if digest != sha256:
            raise BundleError(f"bundle {self.root}: {what} ({relative}) is corrupt: SHA-256 "
                              f"{digest[:12]}… does not match the manifest's {sha256[:12]}…")

    def verify_files(self) -> None:
        for name in self.manifest.pieces:
            self.piece_path(name)
        self.constants()

    def constants(self) -> Dict[str, Any]:
        """The shared constants as NumPy arrays, hash-checked and matched against their specs."""
        import numpy as np
        spec = self.manifest.constants
        if spec is None:
            return {}
        path = self._file(spec.file, spec.sha256, "constants file")
        out: Dict[str, Any] = {}
        try:
            with np.load(path, allow_pickle=False) as data:
                for t in spec.tensors:
                    if t.name not in data.files:
                        raise BundleError(f"bundle {self.root}: constants file lacks {t.name!r}")
                    arr = data[t.name]
                    if list(arr.shape) != list(t.shape) or str(arr.dtype) != t.dtype:
                        raise BundleError(f"bundle {self.root}: constant {t.name!r} is "
                                          f"{arr.dtype}{list(arr.shape)}, the manifest says "
                                          f"{t.dtype}{list(t.shape)}")
                    out[t.name] = np.ascontiguousarray(arr)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"bundle {self.root}: cannot read constants {spec.file}: {e}") from None
        return out

    def engine_dir(self, key: str) -> Path:
        return safe_join(self.root, f"engines/{key}")


def load(root: Union[str, Path]) -> Bundle:
    """Open and validate a bundle folder (files are hash-checked when first used)."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle {root} is not a folder")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not an adaedge bundle: it has no {MANIFEST}")
    try:
        with open(mpath, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON: {e}") from None
    return Bundle(root, parse_manifest(data))


def write_manifest(root: Union[str, Path], manifest: Manifest) -> Path:
    """Validate and write ``manifest.json`` atomically."""
    data = manifest.to_json()
    parse_manifest(json.loads(json.dumps(data)))  # what we write must read back
    path = Path(root) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path
