"""``manifest.json``: what a bundle's input is, which pieces exist, and the program that runs them.

Manifest (schema version 1)::

    {
      "format": "adaedge-bundle", "schema_version": 1, "adaedge_version": "...",
      "model": {"name": str, "family": str, "config": {...}, "weights": {...}, ...},
      "input": {"name": "clip", "layout": "NCTHW", "channels": 3, "frames": T, "size": [H, W],
                "dtype": "float32", "mean": [3 floats], "std": [3 floats], "labels": [str] | null},
      "output": value name of the class scores,
      "pieces": {name: {"file": "graphs/<name>.onnx", "sha256": hex, "flops": int,
                        "inputs": [{"name", "shape", "dtype"}], "outputs": [...]}},
      "program": [step, ...],                          # see adaedge.bundle.program
      "state": [{"name", "shape", "dtype"}],           # tensors carried from one call to the next
      "policies": {name: {switch name: branch index}}, # forced policies (static, all-half, ...)
      "constants": {"file": "graphs/<name>.npz", "sha256": hex,        # optional: tensors that
                    "tensors": [{"name", "shape", "dtype"}]},          # several pieces read
      "stream": {"window": T},                         # optional: a per-frame program (below)
      "int8": {...}                                    # optional: Q/DQ forms (adaedge.bundle.int8)
    }

Constants are weights shared by several pieces (AdaFuse's bucketed pieces all read one block's
weights), stored once in a NumPy ``.npz`` (read with ``allow_pickle=False``) and fed to the pieces
as inputs; a program reads them by name like any value.

A *stream* bundle's program takes one frame per call (``input.frames`` is 1) and carries its state
from frame to frame; its scores are the mean of the last ``window`` frames' scores, so a stream
started from zero state and fed the T = ``window`` frames of a clip one by one gives the clip's
scores.

FLOPs are multiply-accumulates of Conv, Gemm and MatMul nodes per clip, counted from the graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from ..errors import BundleError
from .int8 import Int8Forms
from .program import Carry, Exit, Run, Step, Switch, parse_program
from .specs import Constants, Piece, TensorSpec, name, need
from .vocabulary import FORMAT, SCHEMA_VERSION


@dataclass
class Manifest:
    model: Dict[str, Any]
    input: Dict[str, Any]
    output: str
    pieces: Dict[str, Piece]
    program: List[Step]
    state: List[TensorSpec] = field(default_factory=list)
    policies: Dict[str, Dict[str, int]] = field(default_factory=dict)
    adaedge_version: str = ""
    constants: Optional[Constants] = None
    stream: Optional[Dict[str, int]] = None
    int8: Optional[Int8Forms] = None

    def to_json(self) -> Dict[str, Any]:
        out = {"format": FORMAT, "schema_version": SCHEMA_VERSION,
               "adaedge_version": self.adaedge_version, "model": self.model, "input": self.input,
               "output": self.output,
               "pieces": {k: p.to_json() for k, p in self.pieces.items()},
               "program": [s.to_json() for s in self.program],
               "state": [s.to_json() for s in self.state], "policies": self.policies}
        if self.constants is not None:
            out["constants"] = self.constants.to_json()
        if self.stream is not None:
            out["stream"] = dict(self.stream)
        if self.int8 is not None:
            out["int8"] = self.int8.to_json()
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

    @property
    def labels(self) -> Optional[List[str]]:
        return self.input.get("labels")

    def switches(self) -> List[Switch]:
        return [s for s in self.program if isinstance(s, Switch)]

    def exits(self) -> List[Exit]:
        return [s for s in self.program if isinstance(s, Exit)]

    def exit_budgets(self) -> List[str]:
        """The budgets whose thresholds every exit step holds (``default`` aside), cheapest
        first; keys that are not numbers come last."""
        steps = self.exits()
        if not steps:
            return []
        keys = set.intersection(*(set(s.thresholds) for s in steps)) - {"default"}

        def as_number(k: str) -> float:
            try:
                return float(k)
            except ValueError:
                return float("inf")
        return sorted(keys, key=lambda k: (as_number(k), k))

    def carries(self) -> List[Carry]:
        return [s for s in self.program if isinstance(s, Carry)]

    def used_pieces(self) -> List[str]:
        """The pieces the program may run, in program order, each once."""
        used: List[str] = []
        for step in self.program:
            if isinstance(step, Run):
                used.append(step.piece)
            elif isinstance(step, Switch):
                used.extend(step.pieces)
        return list(dict.fromkeys(used))

    def policy_flops(self, policy: str) -> int:
        """FLOPs per clip of the whole program under a forced policy (no gate runs, no exit):
        what a trace of ``classify(clips, force=policy)`` adds up to. A program without switches
        has one path, which every policy name (``static`` included) means."""
        table: Dict[str, int] = {}
        if policy in self.policies or self.switches():
            table = self.policies[policy]
        flops = 0
        for step in self.program:
            if isinstance(step, Run):
                flops += self.pieces[step.piece].flops
            elif isinstance(step, Switch):
                branch = step.branches[table.get(step.name, 0)]
                flops += self.pieces[branch.piece].flops if branch.piece is not None else 0
        return flops


def budget_key(gflops: Union[float, str]) -> str:
    """The name an exit step stores a budget's threshold under: GFLOPs as ``format(x, "g")``."""
    return gflops if isinstance(gflops, str) else format(float(gflops), "g")


def _input_spec(data: Dict[str, Any]) -> Dict[str, Any]:
    spec = need(data, "input", dict, "manifest")
    name(need(spec, "name", str, "input"), "input.name")
    if need(spec, "layout", str, "input") != "NCTHW":
        raise BundleError(f"manifest: input.layout {spec['layout']!r} is not supported (NCTHW)")
    for key in ("channels", "frames"):
        if need(spec, key, int, "input") <= 0:
            raise BundleError(f"manifest: input.{key} must be positive")
    size = need(spec, "size", list, "input")
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                 for s in size):
        raise BundleError("manifest: input.size must be [height, width] of positive integers")
    for key in ("mean", "std"):
        vals = need(spec, key, list, "input")
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
    values = spec["channels"] * spec["frames"] * size[0] * size[1]
    if values > MAX_CLIP_VALUES:        # before anything (bench's random clips) is sized by it
        raise BundleError(f"manifest: a clip of input.channels x frames x size "
                          f"({spec['channels']}x{spec['frames']}x{size[0]}x{size[1]}) holds "
                          f"{values} values, more than {MAX_CLIP_VALUES}")
    return spec


MAX_CLIP_VALUES = 1 << 28        # one clip's values (the bound on every tensor of a piece too)


def _model_info(data: Dict[str, Any]) -> Dict[str, Any]:
    """``model``: the fields the tools print, of the types they print."""
    model = need(data, "model", dict, "manifest")
    name(need(model, "name", str, "model"), "model.name")
    for key, kind in (("family", str), ("execution", str), ("config", dict), ("options", dict),
                      ("weights", dict), ("branch_titles", dict)):
        if model.get(key) is not None and not isinstance(model[key], kind):
            raise BundleError(f"manifest: model.{key} must be {'a string' if kind is str else 'an object'}, "
                              f"not {type(model[key]).__name__}")
    return model


def _check_dataflow(program: List[Step], available: set, state: List[TensorSpec],
                    output: str) -> None:
    """Every value a step reads is the input, a constant, a state or written by an earlier step;
    a carry names a declared state; the output is written. (The interpreter would otherwise find
    the gap only on the path that reaches it, with some batches and not others.)"""
    have = set(available)
    states = {t.name for t in state}

    def reads(values: Any, where: str) -> None:
        for v in values:
            if v not in have:
                raise BundleError(f"manifest: {where} reads the value {v!r}, which no earlier "
                                  "step writes (nor the input, a constant or a state)")
    for i, step in enumerate(program):
        where = f"program[{i}] ({step.name!r})"
        if isinstance(step, Run):
            reads(step.inputs.values(), where)
            have.update(step.outputs.values())
        elif isinstance(step, Switch):
            if step.gate is not None:
                reads(step.gate.inputs.values(), f"{where}.gate")
            if step.select is not None:
                reads([step.select], where)
            reads(step.inputs.values(), where)
            have.update(step.outputs.values())
        elif isinstance(step, Exit):
            reads([step.scores], where)
        elif isinstance(step, Carry):
            reads([step.value], where)
            if step.state not in states:
                raise BundleError(f"manifest: {where} carries into the state {step.state!r}, "
                                  "which the manifest's state does not declare")
    if output not in have:
        raise BundleError(f"manifest: the output value {output!r} is never written")


def _policies(data: Dict[str, Any], program: List[Step]) -> Dict[str, Dict[str, int]]:
    policies = data.get("policies", {}) or {}
    if not isinstance(policies, dict):
        raise BundleError("manifest: policies must be an object")
    switches = {s.name: len(s.branches) for s in program if isinstance(s, Switch)}
    for pol, table in policies.items():
        if not isinstance(table, dict):
            raise BundleError(f"manifest: policies[{pol!r}] must be an object")
        for sw, idx in table.items():
            if sw not in switches:
                raise BundleError(f"manifest: policies[{pol!r}] names unknown switch {sw!r}")
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < switches[sw]:
                raise BundleError(f"manifest: policies[{pol!r}][{sw!r}] is not a branch index")
    return policies


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
    model = _model_info(data)
    spec = _input_spec(data)
    output = name(need(data, "output", str, "manifest"), "output")
    pieces = {pname: Piece.from_json(pname, p, f"pieces[{pname!r}]")
              for pname, p in need(data, "pieces", dict, "manifest").items()}
    program = parse_program(need(data, "program", list, "manifest"), pieces)
    raw_state = data.get("state", []) or []
    if not isinstance(raw_state, list):
        raise BundleError(f"manifest: state must be a list, not {type(raw_state).__name__}")
    state = [TensorSpec.from_json(t, f"state[{i}]") for i, t in enumerate(raw_state)]
    policies = _policies(data, program)
    constants = None
    if data.get("constants") is not None:
        constants = Constants.from_json(need(data, "constants", dict, "manifest"))
    stream = None
    if data.get("stream") is not None:
        st = need(data, "stream", dict, "manifest")
        if need(st, "window", int, "stream") < 1:
            raise BundleError("manifest: stream.window must be positive")
        if spec["frames"] != 1:
            raise BundleError("manifest: a stream bundle takes one frame per call (input.frames 1)")
        stream = {"window": int(st["window"])}
    _check_dataflow(program, {spec["name"], *(t.name for t in state),
                              *(t.name for t in (constants.tensors if constants else []))},
                    state, output)
    int8 = None
    if data.get("int8") is not None:
        int8 = Int8Forms.from_json(data["int8"], pieces,
                                   {s.name: s for s in program if isinstance(s, Exit)})
    return Manifest(model=model, input=spec, output=output, pieces=pieces, program=program,
                    state=state, policies=policies,
                    adaedge_version=str(data.get("adaedge_version", "")),
                    constants=constants, stream=stream, int8=int8)


__all__ = ["Manifest", "parse_manifest", "budget_key"]
