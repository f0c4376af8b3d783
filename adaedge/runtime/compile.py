"""A bundle's whole program as one ONNX graph, for one clip per call: the gates decide inside it.

Piece by piece, the interpreter pays per step a backend call, its Python around it, and a copy of
every output into host arrays; a small model spends more there than in its convolutions. For a
batch of one clip the program can instead run as a single graph: each piece's nodes are inlined
(their names prefixed), a free switch becomes its gate followed by a chain of ``If`` nodes on the
gate's decision (one branch piece per ``If`` subgraph), a forced switch inlines its chosen branch,
an ``exit`` becomes an ``If`` on the exit criterion whose ``else`` holds the rest of the program,
and ``carry`` steps become state outputs. One backend call per clip.

What the compiled graph outputs besides the scores keeps traces whole: the branch index each
switch took (``-1`` where an exit came first), the exit taken (``-1``: none), and the carried state.

``If`` conditions must hold one element, so compiled graphs take one clip (or one stream) per call;
the runtime uses the pieces for batches, where grouping by branch pays.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..bundle import Bundle, Carry, Exit, Run, Step, Switch
from ..bundle.vocabulary import CUSTOM_DOMAIN, OPSET
from ..errors import BundleError

DECISION = "decision:"      # output name prefix: the branch index a switch took
STATE = "state:"            # output name prefix: a carried state's next value
EXIT = "exit"               # output: the index of the exit taken, -1 for none
SCORES = "scores"           # output: the class scores

_DTYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
          "int64": TensorProto.INT64, "int32": TensorProto.INT32, "bool": TensorProto.BOOL,
          "uint8": TensorProto.UINT8}


@dataclass
class _Scope:
    """The nodes and initializers of one graph (the main graph or an If branch)."""

    nodes: List[onnx.NodeProto] = field(default_factory=list)
    initializers: List[onnx.TensorProto] = field(default_factory=list)
    value_info: List[onnx.ValueInfoProto] = field(default_factory=list)


class _Compiler:
    def __init__(self, bundle: Bundle, forced: Mapping[str, int],
                 thresholds: Optional[Mapping[str, float]]) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.forced = dict(forced)
        self.thresholds = thresholds            # exit name -> threshold; None: no exits taken
        self.fresh = itertools.count()
        self.models: Dict[str, onnx.ModelProto] = {}
        self.switches = [s.name for s in self.manifest.switches()]
        self.known = {self.manifest.input["name"], *(s.name for s in self.manifest.state),
                      *(t.name for t in (self.manifest.constants.tensors
                                         if self.manifest.constants else []))}
        # static: every switch forced and no exit taken (then nothing needs one clip per call)
        self.static = all(s in self.forced for s in self.switches) and not thresholds
        self.exits = [s.name for s in self.manifest.exits()]
        self.states = [s.name for s in self.manifest.state]
        self.dtypes: Dict[str, str] = {}        # program value -> dtype, as the pieces say
        self.shapes: Dict[str, List[Any]] = {}
        for step in self.manifest.program:
            for piece, outputs in _piece_outputs(step):
                spec = {t.name: t for t in self.manifest.pieces[piece].outputs}
                for k, v in outputs.items():
                    self.dtypes[v] = spec[k].dtype
                    self.shapes[v] = [1] + list(spec[k].shape[1:])

    # -- pieces -----------------------------------------------------------------------------
    def model(self, piece: str) -> onnx.ModelProto:
        """The piece with its custom nodes replaced by their bodies (one graph of standard ops)."""
        m = self.models.get(piece)
        if m is None:
            m = self.bundle.piece_model(piece)
            if m.functions:
                from onnx import inliner
                m = inliner.inline_local_functions(m)
            if any(n.domain == CUSTOM_DOMAIN for n in m.graph.node):
                raise BundleError(f"piece {piece!r} has custom nodes without bodies")
            self.models[piece] = m
        return m

    def inline(self, piece: str, inputs: Mapping[str, str], outputs: Mapping[str, str],
               scope: _Scope) -> None:
        """Add ``piece``'s nodes to ``scope``: its inputs read the program values ``inputs``
        names, the outputs ``outputs`` names are written as those program values, and everything
        else is renamed under a prefix unique to this use."""
        m = self.model(piece)
        prefix = f"{piece}#{next(self.fresh)}/"
        rename: Dict[str, str] = {}
        for v in m.graph.input:
            if v.name not in inputs:
                raise BundleError(f"program feeds piece {piece!r} no value for {v.name!r}")
            rename[v.name] = inputs[v.name]
        for v in m.graph.output:
            rename[v.name] = outputs.get(v.name, prefix + v.name)

        def name(n: str) -> str:
            return n if not n else rename.get(n, prefix + n)
        for init in m.graph.initializer:
            t = onnx.TensorProto()
            t.CopyFrom(init)
            t.name = name(init.name)
            scope.initializers.append(t)
        # the pieces' inferred value_info is left out: its symbolic batch "N" means the
        # piece's batch, which a compiled graph fixes to one clip while a piece may hold
        # several rows per clip (frames folded into the batch)
        for node in m.graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in node.attribute):
                raise BundleError(f"piece {piece!r} has subgraphs; it cannot be compiled")
            n = onnx.NodeProto()
            n.CopyFrom(node)
            n.input[:] = [name(i) for i in node.input]
            n.output[:] = [name(o) for o in node.output]
            n.name = prefix + (node.name or node.op_type)
            scope.nodes.append(n)

    # -- helpers ----------------------------------------------------------------------------
    def const(self, scope: _Scope, value: Any, dtype: Any = np.int64) -> str:
        name = f"const#{next(self.fresh)}"
        scope.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, scope: _Scope, op: str, inputs: Sequence[str], outputs: int = 1,
             **attrs: Any) -> List[str]:
        outs = [f"{op.lower()}#{next(self.fresh)}" for _ in range(outputs)]
        scope.nodes.append(helper.make_node(op, list(inputs), outs,
                                            name=f"{op}#{next(self.fresh)}", **attrs))
        return outs

    def info(self, name: str, value: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, _DTYPE[self.dtypes.get(value, "float32")],
                                             self.shapes.get(value))

    def subgraph(self, scope: _Scope, outputs: Sequence[Tuple[str, str]]) -> onnx.GraphProto:
        """A branch graph of ``scope``'s nodes that outputs the values ``outputs`` lists as
        (inner value, dtype key value); each is copied to a fresh output name."""
        outs = []
        for inner, like in outputs:
            out = f"out#{next(self.fresh)}"
            scope.nodes.append(helper.make_node("Identity", [inner], [out],
                                                name=f"Identity#{next(self.fresh)}"))
            outs.append(self.info(out, like))
        return helper.make_graph(scope.nodes, f"branch{next(self.fresh)}", [], outs,
                                 scope.initializers, value_info=scope.value_info)

    # -- steps ------------------------------------------------------------------------------
    def emit(self, steps: Sequence[Step], scope: _Scope, values: Dict[str, str]) -> Dict[str, str]:
        """Emit ``steps`` into ``scope``; returns the results (scores, exit, decisions, state) by
        key, as value names in that scope."""
        results: Dict[str, str] = {}
        for i, step in enumerate(steps):
            self.check_reads(step, values)
            if isinstance(step, Run):
                self.inline(step.piece, {k: values.get(v, v) for k, v in step.inputs.items()},
                            step.outputs, scope)
                values.update({v: v for v in step.outputs.values()})
            elif isinstance(step, Switch):
                results[DECISION + step.name] = self.switch(step, scope, values)
            elif isinstance(step, Carry):
                results[STATE + step.state] = values.get(step.value, step.value)
            elif isinstance(step, Exit):
                if self.thresholds is None or step.name not in self.thresholds:
                    continue
                results.update(self.exit(step, steps[i + 1:], scope, values, results))
                return results
        final = self.manifest.output
        results[SCORES] = values.get(final, final)
        results[EXIT] = self.const(scope, [-1])
        return results

    def check_reads(self, step: Step, values: Mapping[str, str]) -> None:
        """Every value a step reads must be the clip, state, a constant or an earlier output."""
        reads: List[str] = []
        if isinstance(step, (Run, Switch)):
            reads += list(step.inputs.values())
        if isinstance(step, Switch):
            reads += list(step.gate.inputs.values()) if step.gate is not None else [step.select or ""]
        elif isinstance(step, Exit):
            reads.append(step.scores)
        elif isinstance(step, Carry):
            reads.append(step.value)
        for v in reads:
            if v not in values and v not in self.known:
                raise BundleError(f"program step {step.name!r} reads value {v!r} before any "
                                  "step writes it")

    def switch(self, step: Switch, scope: _Scope, values: Dict[str, str]) -> str:
        inputs = {k: values.get(v, v) for k, v in step.inputs.items()}
        if step.name in self.forced:
            k = self.forced[step.name]
            self.branch(step, k, inputs, scope)
            values.update({v: v for v in step.outputs.values()})
            return self.const(scope, [k])
        if step.gate is not None:
            gate = step.gate
            outs = {gate.decision: f"{step.name}#decision"}
            self.inline(gate.piece, {k: values.get(v, v) for k, v in gate.inputs.items()}, outs,
                        scope)
            decision = outs[gate.decision]
        else:
            assert step.select is not None
            decision = values.get(step.select, step.select)
        # If k: branch k, else the chain over the branches after it
        out_values = list(step.outputs.values())
        chain = self.if_chain(step, 0, decision, inputs, scope)
        for inner, value in zip(chain, out_values):
            scope.nodes.append(helper.make_node("Identity", [inner], [value],
                                                name=f"Identity#{next(self.fresh)}"))
        values.update({v: v for v in out_values})
        return decision

    def if_chain(self, step: Switch, k: int, decision: str, inputs: Mapping[str, str],
                 scope: _Scope) -> List[str]:
        """Value names (in ``scope``) of the switch's outputs, choosing branch k or a later one."""
        last = len(step.branches) - 1
        then = _Scope()
        self.branch(step, k, inputs, then, renamed=True)
        then_graph = self.subgraph(then, [(self.inner(step, v, k), v)
                                          for v in step.outputs.values()])
        if k == last:   # the last branch needs no condition (the decision was range-checked)
            return self.unwrap(then_graph, scope)
        rest = _Scope()
        inner = self.if_chain(step, k + 1, decision, inputs, rest)
        else_graph = self.subgraph(rest, list(zip(inner, step.outputs.values())))
        cond = self.node(scope, "Equal", [decision, self.const(scope, [k])])[0]
        return self.node(scope, "If", [cond], outputs=len(step.outputs),
                         then_branch=then_graph, else_branch=else_graph)

    def unwrap(self, graph: onnx.GraphProto, scope: _Scope) -> List[str]:
        """A branch graph's nodes put straight into ``scope`` (the chain's last branch)."""
        scope.nodes.extend(graph.node)
        scope.initializers.extend(graph.initializer)
        scope.value_info.extend(graph.value_info)
        return [o.name for o in graph.output]

    def inner(self, step: Switch, value: str, k: int) -> str:
        return f"{step.name}#{k}#{value}"

    def branch(self, step: Switch, k: int, inputs: Mapping[str, str], scope: _Scope,
               renamed: bool = False) -> None:
        b = step.branches[k]
        outputs = {name: (self.inner(step, value, k) if renamed else value)
                   for name, value in step.outputs.items()}
        if b.passes is not None:
            for out, inp in b.passes.items():
                scope.nodes.append(helper.make_node("Identity", [inputs[inp]], [outputs[out]],
                                                    name=f"Identity#{next(self.fresh)}"))
            return
        assert b.piece is not None
        self.inline(b.piece, inputs, outputs, scope)

    def exit(self, step: Exit, rest: Sequence[Step], scope: _Scope, values: Dict[str, str],
             before: Mapping[str, str]) -> Dict[str, str]:
        """An If on the exit criterion: then the early scores, else the rest of the program."""
        assert self.thresholds is not None
        scores = values.get(step.scores, step.scores)
        cond = self.criterion(step, scores, float(self.thresholds[step.name]), scope)
        index = self.exits.index(step.name)
        else_scope = _Scope()
        later = self.emit(rest, else_scope, dict(values))
        keys = sorted(k for k in later if k not in (SCORES, EXIT))
        then_scope = _Scope()
        then_values: Dict[str, str] = {SCORES: scores, EXIT: self.const(then_scope, [index])}
        for key in keys:
            if key.startswith(DECISION):
                then_values[key] = self.const(then_scope, [-1])
            else:                               # state: an exited clip keeps its state
                then_values[key] = before.get(key, key[len(STATE):])
        order = [SCORES, EXIT] + keys
        like = {SCORES: self.manifest.output}
        for k in order:     # the results' types, for the branches' outputs
            if k == EXIT or k.startswith(DECISION):
                self.dtypes[k], self.shapes[k] = "int64", [1]
            elif k.startswith(STATE):
                spec = next(s for s in self.manifest.state if s.name == k[len(STATE):])
                self.dtypes[k], self.shapes[k] = spec.dtype, [1] + list(spec.shape[1:])
        then_graph = self.subgraph(then_scope, [(then_values[k], like.get(k, k)) for k in order])
        else_graph = self.subgraph(else_scope, [(later[k], like.get(k, k)) for k in order])
        outs = self.node(scope, "If", [cond], outputs=len(order), then_branch=then_graph,
                         else_branch=else_graph)
        return dict(zip(order, outs))

    def criterion(self, step: Exit, scores: str, threshold: float, scope: _Scope) -> str:
        """The exit's condition: entropy of softmax(scores) <= t, max probability >= t, or the
        largest raw score >= t."""
        if step.criterion == "max_logit":
            top = self.node(scope, "ReduceMax", [scores], axes=[-1], keepdims=0)[0]
            return self.node(scope, "GreaterOrEqual", [top, self.const(scope, [threshold],
                                                                        np.float32)])[0]
        p = self.node(scope, "Softmax", [scores], axis=-1)[0]
        if step.criterion == "entropy":
            logp = self.node(scope, "Log", [self.node(scope, "Clip", [
                p, self.const(scope, np.float32(1e-12), np.float32)])[0]])[0]
            ent = self.node(scope, "Neg", [self.node(scope, "ReduceSum", [
                self.node(scope, "Mul", [p, logp])[0], self.const(scope, [-1])],
                keepdims=0)[0]])[0]
            return self.node(scope, "LessOrEqual", [ent, self.const(scope, [threshold],
                                                                     np.float32)])[0]
        top = self.node(scope, "ReduceMax", [p], axes=[-1], keepdims=0)[0]
        return self.node(scope, "GreaterOrEqual", [top, self.const(scope, [threshold],
                                                                    np.float32)])[0]


def _piece_outputs(step: Step) -> List[Tuple[str, Dict[str, str]]]:
    if isinstance(step, Run):
        return [(step.piece, step.outputs)]
    if isinstance(step, Switch):
        return [(b.piece, step.outputs) for b in step.branches if b.piece is not None]
    return []


def compile_program(bundle: Bundle, forced: Optional[Mapping[str, int]] = None,
                    thresholds: Optional[Mapping[str, float]] = None) -> onnx.ModelProto:
    """The program of ``bundle`` as one ONNX graph for one clip (or stream) per call.

    ``forced`` fixes switches ({switch: branch}; the others decide); ``thresholds`` gives each exit
    its threshold (None: no exit is taken). Inputs: the clip, then the state; outputs: ``scores``,
    ``exit``, ``decision:<switch>`` for every switch, ``state:<name>`` for every carried state.
    """
    m = bundle.manifest
    c = _Compiler(bundle, forced or {}, thresholds)
    main = _Scope()
    clip = m.input["name"]
    values: Dict[str, str] = {}
    results = c.emit(m.program, main, values)
    outputs = [(SCORES, results[SCORES], m.output), (EXIT, results[EXIT], EXIT)]
    for sw in c.switches:
        key = DECISION + sw
        if key not in results:           # a switch no path reaches (a bundle with exits only)
            results[key] = c.const(main, [-1])
        outputs.append((key, results[key], key))
    for state in c.states:
        key = STATE + state
        outputs.append((key, results.get(key, state), key))
    for key in (EXIT, *[DECISION + s for s in c.switches]):
        c.dtypes.setdefault(key, "int64")
        c.shapes.setdefault(key, [1])
    for spec in m.state:
        c.dtypes.setdefault(STATE + spec.name, spec.dtype)
        c.shapes.setdefault(STATE + spec.name, [1] + list(spec.shape[1:]))
    graph_outputs = []
    for name, inner, like in outputs:
        main.nodes.append(helper.make_node("Identity", [inner], [name],
                                           name=f"Identity#{next(c.fresh)}"))
        graph_outputs.append(c.info(name, like))
    # without a free switch or an exit there is no condition: the graph takes any batch
    batch: Any = "N" if c.static else 1
    c_, t_, h_, w_ = m.clip_shape
    inputs = [helper.make_tensor_value_info(clip, TensorProto.FLOAT, [batch, c_, t_, h_, w_])]
    inputs += [helper.make_tensor_value_info(s.name, _DTYPE[s.dtype], [batch] + list(s.shape[1:]))
               for s in m.state]
    if c.static:
        for out in graph_outputs:
            dims = out.type.tensor_type.shape.dim
            if len(dims) and (out.name == SCORES or out.name.startswith(STATE)):
                dims[0].ClearField("dim_value")
                dims[0].dim_param = "N"
    constants = bundle.constants()
    main.initializers += [numpy_helper.from_array(v, k) for k, v in constants.items()]
    graph = helper.make_graph(main.nodes, "adaedge_compiled", inputs, graph_outputs,
                              main.initializers, value_info=main.value_info)
    prune(graph, [o.name for o in graph_outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="adaedge")
    model.ir_version = 8
    return model


def _graph_reads(graph: onnx.GraphProto) -> set:
    """Every value a graph's nodes read, its subgraphs' reads of outer values included."""
    reads = set()
    for node in graph.node:
        reads.update(node.input)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                reads |= _graph_reads(a.g)
    return reads


def prune(graph: onnx.GraphProto, keep: Sequence[str]) -> None:
    """Remove the nodes (and initializers) no output in ``keep`` depends on, in this graph and,
    recursively, in its If branches: the gates' score outputs, which only traces of the pieces
    use, cost nodes in a compiled graph."""
    needed = set(keep)
    nodes = list(graph.node)
    live: List[onnx.NodeProto] = []
    for node in reversed(nodes):
        if not any(o in needed for o in node.output):
            continue
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                prune(a.g, [o.name for o in a.g.output])
                needed |= _graph_reads(a.g)
        needed.update(node.input)
        live.append(node)
    del graph.node[:]
    graph.node.extend(reversed(live))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def compiled_outputs(model: onnx.ModelProto) -> List[str]:
    return [o.name for o in model.graph.output]


__all__ = ["compile_program", "compiled_outputs", "DECISION", "STATE", "EXIT", "SCORES"]
