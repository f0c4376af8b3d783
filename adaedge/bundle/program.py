"""The program a bundle's runtime interprets: typed steps, read from and written to the manifest.

Steps (``inputs``/``outputs`` map a piece's I/O names to program value names):

* :class:`Run` ``{"op": "run", "name", "piece", "inputs", "outputs", ["layouts"]}``: run one
  piece. ``layouts`` maps output values to ``"NTCHW"`` where a 5D value holds frames before
  channels (pieces that fold frames into the batch); others are ``NCTHW``.
* :class:`Switch` ``{"op": "switch", "name", "gate": {"piece", "inputs", "decision", "scores"},
  "branches": [{"name", "piece"}], "inputs", "outputs"}``: the gate piece's ``decision`` output
  (int64, one per clip) picks the branch; all branch pieces share I/O names. Instead of ``gate``,
  a switch may name ``"select": value``, an int64 value (one per clip) an earlier step computed.
  A branch ``{"name", "pass": {output: input}}`` runs no piece: it forwards inputs as outputs.
* :class:`Exit` ``{"op": "exit", "name", "scores", "criterion": "entropy" | "max_prob" | "max_logit",
  "thresholds": {budget: t}}``: clips whose ``scores`` (softmax of) meet the criterion stop here.
* :class:`Carry` ``{"op": "carry", "name", "value", "state"}``: keep ``value`` as state for the
  next call.

Every step is validated once, when the manifest is read (:func:`parse_program`); the interpreter
then trusts its fields. Exporters write programs with :class:`ProgramBuilder`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..errors import BundleError
from .specs import Piece, io_map, label, name, need
from .vocabulary import CRITERIA, LAYOUTS, STEP_OPS


def _piece(pieces: Mapping[str, Piece], val: Any, where: str) -> Piece:
    name(val, where)
    if val not in pieces:
        raise BundleError(f"manifest: {where} names piece {val!r}, which is not in pieces")
    return pieces[val]


@dataclass
class Run:
    """Run one piece on the values ``inputs`` names; store its outputs as ``outputs`` says."""

    name: str
    piece: str
    inputs: Dict[str, str]
    outputs: Dict[str, str]
    layouts: Dict[str, str] = field(default_factory=dict)
    op = "run"

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"op": self.op, "name": self.name, "piece": self.piece,
                               "inputs": dict(self.inputs), "outputs": dict(self.outputs)}
        if self.layouts:
            out["layouts"] = dict(self.layouts)
        return out

    @classmethod
    def from_json(cls, step: Mapping[str, Any], where: str, pieces: Mapping[str, Piece]) -> "Run":
        p = _piece(pieces, need(step, "piece", str, where), f"{where}.piece")
        inputs = io_map(step.get("inputs"), f"{where}.inputs", p.input_names)
        outputs = io_map(step.get("outputs"), f"{where}.outputs", p.output_names)
        layouts = step.get("layouts", {})
        if not isinstance(layouts, dict) or any(
                v not in outputs.values() or lay not in LAYOUTS for v, lay in layouts.items()):
            raise BundleError(f"manifest: {where}.layouts must map output values to one of "
                              f"{', '.join(LAYOUTS)}")
        return cls(step["name"], p.name, inputs, outputs, dict(layouts))


@dataclass
class Gate:
    """The piece that decides a switch: its ``decision`` output holds one branch index per clip."""

    piece: str
    inputs: Dict[str, str]
    decision: str
    scores: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"piece": self.piece, "inputs": dict(self.inputs),
                               "decision": self.decision}
        if self.scores is not None:
            out["scores"] = self.scores
        return out


@dataclass
class Branch:
    """One branch of a switch: a piece, or a pass-through (``passes``: {output: input})."""

    name: str
    piece: Optional[str] = None
    passes: Optional[Dict[str, str]] = None

    def to_json(self) -> Dict[str, Any]:
        if self.passes is not None:
            return {"name": self.name, "pass": dict(self.passes)}
        return {"name": self.name, "piece": self.piece}


@dataclass
class Switch:
    """Pick one branch per clip (by a gate piece, or by a value an earlier step computed); the
    batch is grouped by branch and each group runs its branch."""

    name: str
    branches: List[Branch]
    inputs: Dict[str, str]
    outputs: Dict[str, str]
    gate: Optional[Gate] = None
    select: Optional[str] = None
    op = "switch"

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"op": self.op, "name": self.name}
        if self.gate is not None:
            out["gate"] = self.gate.to_json()
        if self.select is not None:
            out["select"] = self.select
        out.update(branches=[b.to_json() for b in self.branches], inputs=dict(self.inputs),
                   outputs=dict(self.outputs))
        return out

    @property
    def pieces(self) -> List[str]:
        """The pieces this switch may run: its gate's, then each branch's."""
        out = [self.gate.piece] if self.gate is not None else []
        return out + [b.piece for b in self.branches if b.piece is not None]

    @classmethod
    def from_json(cls, step: Mapping[str, Any], where: str,
                  pieces: Mapping[str, Piece]) -> "Switch":
        if ("gate" in step) == ("select" in step):
            raise BundleError(f"manifest: {where} needs either a gate or a select value")
        gate: Optional[Gate] = None
        select: Optional[str] = None
        if "select" in step:
            select = name(step["select"], f"{where}.select")
        else:
            raw = need(step, "gate", dict, where)
            g = _piece(pieces, need(raw, "piece", str, f"{where}.gate"), f"{where}.gate.piece")
            inputs = io_map(raw.get("inputs"), f"{where}.gate.inputs", g.input_names)
            outs = {t.name: t for t in g.outputs}
            decision = need(raw, "decision", str, f"{where}.gate")
            if decision not in outs or outs[decision].dtype != "int64":
                raise BundleError(f"manifest: {where}.gate.decision must name an int64 output of "
                                  f"piece {g.name!r}")
            scores = raw.get("scores")
            if scores is not None and scores not in outs:
                raise BundleError(f"manifest: {where}.gate.scores is not an output of {g.name!r}")
            gate = Gate(g.name, inputs, decision, scores)
        raw_branches = need(step, "branches", list, where)
        if not raw_branches:
            raise BundleError(f"manifest: {where}.branches is empty")
        first: Optional[Piece] = None
        branches: List[Branch] = []
        for j, b in enumerate(raw_branches):
            bw = f"{where}.branches[{j}]"
            bname = label(need(b, "name", str, bw), f"{bw}.name")
            if isinstance(b, dict) and "pass" in b and "piece" not in b:
                branches.append(Branch(bname, passes=dict(need(b, "pass", dict, bw))))
                continue
            p = _piece(pieces, need(b, "piece", str, bw), f"{bw}.piece")
            if first is None:
                first = p
            elif (p.input_names, p.output_names) != (first.input_names, first.output_names):
                raise BundleError(f"manifest: {where}: branch {p.name!r} does not have the I/O "
                                  f"names of {first.name!r}")
            branches.append(Branch(bname, piece=p.name))
        if first is None:
            raise BundleError(f"manifest: {where} has no branch that runs a piece")
        inputs = io_map(step.get("inputs"), f"{where}.inputs", first.input_names)
        outputs = io_map(step.get("outputs"), f"{where}.outputs", first.output_names)
        for j, b in enumerate(branches):
            if b.passes is not None and (set(b.passes) != set(first.output_names) or any(
                    v not in inputs for v in b.passes.values())):
                raise BundleError(f"manifest: {where}.branches[{j}].pass must map every output "
                                  "of the branches to one of the step's inputs")
        return cls(step["name"], branches, inputs, outputs, gate, select)


@dataclass
class Exit:
    """Stop the clips whose ``scores`` meet the criterion under the budget's threshold."""

    name: str
    scores: str
    criterion: str = "entropy"
    thresholds: Dict[str, float] = field(default_factory=dict)
    op = "exit"

    def to_json(self) -> Dict[str, Any]:
        return {"op": self.op, "name": self.name, "scores": self.scores,
                "criterion": self.criterion, "thresholds": dict(self.thresholds)}

    def leaves(self, measure: Any, threshold: float) -> Any:
        """Which clips leave, given their exit measure (entropy: at or under the threshold;
        max probability and max logit: at or over it)."""
        return measure <= threshold if self.criterion == "entropy" else measure >= threshold

    @classmethod
    def from_json(cls, step: Mapping[str, Any], where: str,
                  pieces: Mapping[str, Piece]) -> "Exit":
        scores = name(need(step, "scores", str, where), f"{where}.scores")
        crit = need(step, "criterion", str, where)
        if crit not in CRITERIA:
            raise BundleError(f"manifest: {where}.criterion {crit!r} is not one of "
                              f"{', '.join(CRITERIA)}")
        thresholds = step.get("thresholds", {})
        if not isinstance(thresholds, dict):
            raise BundleError(f"manifest: {where}.thresholds must be an object")
        for k, v in thresholds.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BundleError(f"manifest: {where}.thresholds[{k!r}] must be a finite number")
        return cls(step["name"], scores, crit, {k: float(v) for k, v in thresholds.items()})


@dataclass
class Carry:
    """Keep ``value`` as the state ``state`` for the next call (streams)."""

    name: str
    value: str
    state: str
    op = "carry"

    def to_json(self) -> Dict[str, Any]:
        return {"op": self.op, "name": self.name, "value": self.value, "state": self.state}

    @classmethod
    def from_json(cls, step: Mapping[str, Any], where: str,
                  pieces: Mapping[str, Piece]) -> "Carry":
        return cls(step["name"], name(need(step, "value", str, where), f"{where}.value"),
                   name(need(step, "state", str, where), f"{where}.state"))


Step = Union[Run, Switch, Exit, Carry]
_KINDS = {"run": Run, "switch": Switch, "exit": Exit, "carry": Carry}


def parse_step(step: Any, i: int, pieces: Mapping[str, Piece]) -> Step:
    """One manifest step, validated against the bundle's pieces."""
    where = f"program[{i}]"
    if not isinstance(step, dict):
        raise BundleError(f"manifest: {where} must be an object")
    op = need(step, "op", str, where)
    if op not in STEP_OPS:
        raise BundleError(f"manifest: {where}.op {op!r} is unknown (known: {', '.join(STEP_OPS)})")
    name(need(step, "name", str, where), f"{where}.name")
    kind: Any = _KINDS[op]
    parsed: Step = kind.from_json(step, where, pieces)
    return parsed


def parse_program(raw: Any, pieces: Mapping[str, Piece]) -> List[Step]:
    if not isinstance(raw, list):
        raise BundleError(f"manifest: program must be list, got {type(raw).__name__}")
    if not raw:
        raise BundleError("manifest: program is empty")
    steps = [parse_step(step, i, pieces) for i, step in enumerate(raw)]
    seen: Dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.name in seen:       # traces, policies and exit_at name steps: one name, one step
            raise BundleError(f"manifest: program[{i}] and program[{seen[step.name]}] are both "
                              f"named {step.name!r}")
        seen[step.name] = i
    return steps


class ProgramBuilder:
    """Writes a program step by step; every exporter uses it.

    >>> p = ProgramBuilder()
    >>> _ = p.run("stem", {"x": "clip"}, {"y": "stem"})
    >>> _ = p.switch("unit1", [Branch("full", "unit1.full")], {"x": "stem"}, {"y": "unit1"},
    ...              gate=Gate("unit1.gate", {"x": "stem"}, "branch", "scores"))
    >>> [s.op for s in p.steps]
    ['run', 'switch']
    """

    def __init__(self) -> None:
        self.steps: List[Step] = []

    def run(self, piece: str, inputs: Mapping[str, str], outputs: Mapping[str, str],
            name: Optional[str] = None, layouts: Optional[Mapping[str, str]] = None) -> Run:
        step = Run(name or piece, piece, dict(inputs), dict(outputs), dict(layouts or {}))
        self.steps.append(step)
        return step

    def switch(self, name: str, branches: Sequence[Branch], inputs: Mapping[str, str],
               outputs: Mapping[str, str], gate: Optional[Gate] = None,
               select: Optional[str] = None) -> Switch:
        if (gate is None) == (select is None):
            raise ValueError("a switch needs either a gate or a select value")
        step = Switch(name, list(branches), dict(inputs), dict(outputs), gate, select)
        self.steps.append(step)
        return step

    def exit(self, name: str, scores: str, criterion: str = "entropy",
             thresholds: Optional[Mapping[str, float]] = None) -> Exit:
        step = Exit(name, scores, criterion, dict(thresholds or {}))
        self.steps.append(step)
        return step

    def carry(self, name: str, value: str, state: str) -> Carry:
        step = Carry(name, value, state)
        self.steps.append(step)
        return step


__all__ = ["Run", "Switch", "Gate", "Branch", "Exit", "Carry", "Step", "parse_step",
           "parse_program", "ProgramBuilder"]
