"""INT8 forms of a bundle's pieces through explicit Q/DQ, calibrated per branch on real clips.

:func:`calibrate_int8` runs the float bundle over calibration clips and records what each piece
is fed. A piece sees only the clips that reach it: a branch piece the rows whose gate chose it,
an exit stage every clip (exits are not taken while calibrating). A branch that fewer than
``min_clips`` clips chose is topped up with clips forced through it (that switch forced, the
other gates free), and the manifest says how many of each it saw. Each piece is then quantized
by ONNX Runtime's static quantizer into QDQ form: weights symmetric int8 per output channel, of
7 bits by default (within [-64, 64], so that no x86 kernel saturates: see
:mod:`adaedge.bundle.int8`; ``form`` chooses another kind, to measure); activations per tensor as
the target backend wants them (:data:`TARGETS`: uint8 asymmetric for ONNX Runtime, whose CPU
kernels then fold a convolution's ReLU; symmetric int8 with zero point 0 for TensorRT's explicit
INT8); ranges by ``minmax``, ``entropy`` or ``percentile``. The manifest records the form's kind
and the processor class it was made on; :func:`verify_int8` with ``record`` adds the class it
passed on.

What stays in float, and why, is recorded: pieces named by ``keep_float``; pieces fed shared
constants (their weights arrive as inputs, so no per-channel scale can be fixed); pieces with no
convolution or matrix product (nothing to gain); and gates whose int8 decisions agree with the
float gate's on fewer than ``GATE_AGREEMENT`` (99%) of the calibration clips, fed the same
inputs. Exit thresholds stored in the bundle are solved again on the int8 forms (labels needed),
since confidences move.

:func:`verify_int8` checks the int8 forms against the float ones on held-out clips: each piece's
error fed the float network's own inputs, each gate's agreement in the whole int8 network, and
the top-1 change when labels are given, against stated thresholds.

This module imports NumPy, ONNX and ONNX Runtime (its quantization tools), never torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from ..bundle import (Bundle, Run, Switch, budget_key, safe_join, sha256_file, write_atomic,
                      write_manifest)
from ..bundle import load as load_bundle
from ..bundle.lock import writes_bundle
from ..bundle.folder import check_io, parse_onnx
from ..bundle.int8 import Int8Forms, Int8Piece
from ..bundle.paths import child
from ..bundle.vocabulary import GRAPHS
from ..errors import BundleError, CalibrationError, InputError
from ..progress import Progress
from ..runtime.backends.onnxruntime import _SHARED_POOL, OnnxRuntimeBackend
from ..runtime.interpreter import Result, Runtime

METHODS = ("minmax", "entropy", "percentile")
# activations as each backend wants them: ONNX Runtime's CPU kernels fold a ReLU into an
# asymmetric uint8 output (zero point at the ReLU's 0) and run U8S8; TensorRT's explicit INT8
# takes symmetric int8 only
TARGETS = {"onnxruntime": "uint8", "tensorrt": "int8"}
# the kinds of form each target can be written in, the default first: for ONNX Runtime 7-bit
# weights, right on every x86 (adaedge.bundle.int8); for TensorRT full-range weights (its int8
# kernels accumulate in int32: nothing saturates), which ONNX Runtime refuses without VNNI
TARGET_FORMS = {"onnxruntime": ("u8s8-7bit", "u8s8", "u8u8"), "tensorrt": ("s8s8", "s8s8-7bit")}
WEIGHTS = {"u8s8-7bit": "int8 within [-64, 64] (7 bits), symmetric, per output channel",
           "s8s8-7bit": "int8 within [-64, 64] (7 bits), symmetric, per output channel",
           "u8s8": "int8, symmetric, per output channel",
           "s8s8": "int8, symmetric, per output channel",
           "u8u8": "uint8, symmetric (zero point 128), per output channel"}
GATE_AGREEMENT = 0.99       # a gate stays int8 only if its decisions agree this often with float
MIN_CLIPS = 16              # a branch seen by fewer clips is topped up with forced ones
BATCH = 8                   # clips per recorded call
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# verify_int8's thresholds (stated in the README and the report)
PIECE_RTOL = 0.1            # ||int8 - float||_2 <= 0.1 x ||float||_2 per output, fed float inputs
VERIFY_GATE_AGREEMENT = 0.97
TOP1_DROP = 0.01            # at most one point of top-1 lost, on labelled clips


# ---------------------------------------------------------------------------------------------
# recording what each piece is fed

class _Store:
    """The feeds each wanted piece received, one ``.npz`` per call in a temporary folder (a large
    network's activations over many clips would not fit in memory)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: Dict[str, List[Path]] = {}
        self.rows: Dict[str, Dict[str, int]] = {}       # piece -> {"observed"/"forced": clips}
        self.wanted: Optional[Set[str]] = None          # None: every piece
        self.mode = "observed"

    def add(self, piece: str, feeds: Mapping[str, Any]) -> None:
        if self.wanted is not None and piece not in self.wanted:
            return
        arrays = {k: np.asarray(v) for k, v in feeds.items()}
        files = self.files.setdefault(piece, [])
        path = self.folder / f"{piece}-{len(files)}.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        files.append(path)
        rows = next(iter(arrays.values())).shape[0] if arrays else 0
        counts = self.rows.setdefault(piece, {"observed": 0, "forced": 0})
        counts[self.mode] += int(rows)

    def feeds(self, piece: str) -> Iterator[Dict[str, np.ndarray]]:
        for path in self.files.get(piece, []):
            with np.load(path, allow_pickle=False) as data:
                yield {k: data[k] for k in data.files}


class _Recording:
    """An executable that hands its feeds to a store before running."""

    def __init__(self, exe: Any, piece: str, store: _Store) -> None:
        self.exe, self.piece, self.store = exe, piece, store

    def run(self, feeds: Mapping[str, Any]) -> Dict[str, Any]:
        self.store.add(self.piece, feeds)
        out: Dict[str, Any] = self.exe.run(feeds)
        return out


def _record(runtime: Runtime, store: _Store) -> None:
    runtime.executables = {n: _Recording(e, n, store) for n, e in runtime.executables.items()}


# ---------------------------------------------------------------------------------------------
# which pieces are what

def gate_pieces(bundle: Bundle) -> Dict[str, str]:
    """{gate piece: its decision output} of every switch with a gate."""
    return {s.gate.piece: s.gate.decision for s in bundle.manifest.switches() if s.gate is not None}


def branch_pieces(bundle: Bundle) -> Dict[str, Tuple[str, int]]:
    """{branch piece: (switch, branch index)}."""
    out: Dict[str, Tuple[str, int]] = {}
    for s in bundle.manifest.switches():
        for k, b in enumerate(s.branches):
            if b.piece is not None:
                out.setdefault(b.piece, (s.name, k))
    return out


def constant_fed(bundle: Bundle) -> Set[str]:
    """Pieces that read one of the bundle's shared constants (weights fed as inputs)."""
    m = bundle.manifest
    names = {t.name for t in m.constants.tensors} if m.constants is not None else set()
    out: Set[str] = set()
    for step in m.program:
        if isinstance(step, Run) and names & set(step.inputs.values()):
            out.add(step.piece)
        elif isinstance(step, Switch):
            if names & set(step.inputs.values()):
                out.update(b.piece for b in step.branches if b.piece is not None)
            if step.gate is not None and names & set(step.gate.inputs.values()):
                out.add(step.gate.piece)
    return out


def _computes(model: Any) -> bool:
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:
        ops.update(n.op_type for n in fn.node)
    return bool(ops & set(COMPUTE_OPS))


# ---------------------------------------------------------------------------------------------
# the report

@dataclass
class PieceReport:
    piece: str
    precision: str                    # int8 or float
    observed: int = 0
    forced: int = 0
    rel_error: Optional[float] = None  # on the calibration feeds: relative L2, worst output
    agreement: Optional[float] = None  # gates: share of decisions equal to float's
    reason: str = ""                   # why it stays in float

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"piece": self.piece, "precision": self.precision,
                               "observed": self.observed, "forced": self.forced}
        if self.rel_error is not None:
            out["rel_error"] = round(self.rel_error, 5)
        if self.agreement is not None:
            out["agreement"] = round(self.agreement, 4)
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class Int8Report:
    clips: int
    method: str
    data: str
    pieces: List[PieceReport] = field(default_factory=list)
    exits: Optional[Dict[str, Any]] = None      # thresholds solved again on the int8 forms

    def to_json(self) -> Dict[str, Any]:
        return {"clips": self.clips, "method": self.method, "data": self.data,
                "pieces": [p.to_json() for p in self.pieces], "exits": self.exits}

    def text(self) -> str:
        q = [p for p in self.pieces if p.precision == "int8"]
        lines = [f"{len(q)} of {len(self.pieces)} pieces in int8, calibrated on {self.clips} "
                 f"clips ({self.data}), ranges by {self.method}"]
        for p in self.pieces:
            seen = f"{p.observed} clips" + (f" + {p.forced} forced" if p.forced else "")
            err = f"error {p.rel_error:.3f}" if p.rel_error is not None else ""
            agree = f"decisions agree {p.agreement:.1%}" if p.agreement is not None else ""
            what = ", ".join(x for x in (seen, err, agree) if x)
            lines.append(f"  {p.precision:<5} {p.piece:<32} {what}"
                         + (f"; float: {p.reason}" if p.reason else ""))
        if self.exits:
            lines.append(f"exit thresholds solved again on the int8 forms: budgets "
                         f"{', '.join(str(s['key']) for s in self.exits['solutions'])}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# quantizing one piece

class _Reader:
    """ONNX Runtime's calibration data reader over a piece's recorded feeds."""

    def __init__(self, feeds: Iterator[Dict[str, np.ndarray]]) -> None:
        self._it = feeds

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._it, None)

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        return self._it


def _quantize(model: Any, store: _Store, piece: str, method: str, folder: Path,
              target: str = "tensorrt", form: str = "s8s8") -> bytes:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    # minmax keeps only each tensor's per-call minimum and maximum; entropy and percentile keep
    # every activation of the piece over all calibration clips until the histograms are made.
    # (CalibMaxIntermediateOutputs would bound that for minmax, but onnxruntime 1.32 discards
    # the ranges collected before each flush: measured, "No data is collected".)
    symmetric = TARGETS[target] == "int8"
    extra: Dict[str, Any] = {"ActivationSymmetric": symmetric, "WeightSymmetric": True}
    out = folder / f"{piece}.int8.onnx"
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)     # the quantizer's advice to pre-process, once per piece
        fresh = type(model)()
        fresh.CopyFrom(model)    # the quantizer moves the weights of the model it is given out
        quantize_static(fresh, str(out), _Reader(store.feeds(piece)),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                        weight_type=QuantType.QUInt8 if form == "u8u8" else QuantType.QInt8,
                        reduce_range=form.endswith("-7bit"),   # weights only: [-64, 64]
                        calibrate_method=methods[method], extra_options=extra)
    finally:
        root.setLevel(level)
    return out.read_bytes()


def _session(data: bytes, threads: Optional[int]) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if _SHARED_POOL:              # ONNX Runtime then refuses sessions with threads of their own
        so.use_per_session_threads = False
    elif threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _compare(float_data: bytes, int8_data: bytes, feeds: Iterator[Dict[str, np.ndarray]],
             decision: Optional[str], threads: Optional[int]) -> Tuple[float, Optional[float]]:
    """The int8 piece's relative error against the float piece, fed the same inputs: the
    largest over its float outputs of ||int8 - float||_2 / ||float||_2 (a saturated outlier
    weighs what it changes, not the whole verdict), and (for a gate) the share of decisions
    that agree."""
    fs, qs = _session(float_data, threads), _session(int8_data, threads)
    names = [o.name for o in fs.get_outputs()]
    diff: Dict[str, float] = {}
    ref: Dict[str, float] = {}
    same = total = 0
    for feed in feeds:
        fo = dict(zip(names, fs.run(names, feed)))
        qo = dict(zip(names, qs.run(names, feed)))
        for n in names:
            if n == decision or np.asarray(fo[n]).dtype.kind != "f":
                continue
            a = np.asarray(fo[n], np.float32).reshape(-1)
            d = a - np.asarray(qo[n], np.float32).reshape(-1)
            with np.errstate(over="ignore", invalid="ignore"):   # overflow: refused by the caller
                diff[n] = diff.get(n, 0.0) + float(np.dot(d, d))  # BLAS, float32 accumulation
                ref[n] = ref.get(n, 0.0) + float(np.dot(a, a))
        if decision is not None:
            d_f, d_q = np.asarray(fo[decision]).reshape(-1), np.asarray(qo[decision]).reshape(-1)
            same += int((d_f == d_q).sum())
            total += d_f.size
    rel = max((float(np.sqrt(diff[n] / ref[n])) if ref[n] > 0 else float(np.sqrt(diff[n]))
               for n in diff), default=0.0)
    return rel, (same / total if total else None) if decision is not None else None


# ---------------------------------------------------------------------------------------------
# calibrate

def _int8_folder(root: Path) -> Path:
    graphs = safe_join(root, GRAPHS)
    folder = graphs / "int8"
    if folder.is_symlink():
        raise BundleError(f"bundle {root}: {GRAPHS}/int8 is a link; adaedge writes only inside "
                          "the bundle")
    folder.mkdir(exist_ok=True)
    return folder


def _collect(runtime: Runtime, store: _Store, x: np.ndarray,
             branches: Mapping[str, Tuple[str, int]], min_clips: int) -> Result:
    """Record every piece's feeds over ``x`` with the gates choosing (no exit taken), then top up
    each branch fewer than ``min_clips`` clips chose with the first ``min_clips`` clips forced
    through it (that switch forced, the other gates free). Returns the gates-choosing run."""
    store.wanted, store.mode = None, "observed"
    observed = runtime.classify_batches(x, BATCH, exits=False)
    need = min(len(x), min_clips)
    for piece, (switch, k) in branches.items():
        if store.rows.get(piece, {}).get("observed", 0) < need:
            store.wanted, store.mode = {piece}, "forced"
            runtime.classify_batches(x[:need], BATCH, exits=False, force={switch: k})
    store.wanted, store.mode = None, "observed"
    return observed


@writes_bundle("calibrate int8")   # one writer at a time: read, solve, write
def calibrate_int8(bundle: Union[str, Path], clips: Any, labels: Any = None, data: str = "",
                   method: str = "minmax", keep_float: Sequence[str] = (),
                   min_clips: int = MIN_CLIPS, threads: Optional[int] = None,
                   target: str = "onnxruntime", progress: Progress = None,
                   form: Optional[str] = None) -> Int8Report:
    """Write the int8 forms of ``bundle``'s pieces, calibrated on ``clips`` (normalised, as the
    bundle takes them), and return what was done (see the module docstring). ``labels`` are
    needed when the bundle's exits hold thresholds (they are solved again on the int8 forms);
    ``data`` describes the clips for the manifest. ``form``: the kind of arithmetic
    (:data:`TARGET_FORMS`; default the target's first)."""
    if method not in METHODS:
        raise CalibrationError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if target not in TARGETS:
        raise CalibrationError(f"the int8 forms are for {' or '.join(TARGETS)}, not {target!r}")
    form = TARGET_FORMS[target][0] if form is None else form
    if form not in TARGET_FORMS[target]:
        raise CalibrationError(f"int8 forms for {target} are of kind "
                               f"{', '.join(TARGET_FORMS[target])}, not {form!r}")
    if _SHARED_POOL:
        raise CalibrationError("int8 calibration cannot run in a process that created ONNX "
                               "Runtime's shared thread pool (pool='shared'): ONNX Runtime's "
                               "quantizer makes sessions with threads of their own; calibrate "
                               "in a fresh process (the CLI always is one)")
    b = load_bundle(bundle)
    m = b.manifest
    previous = m.int8
    unknown = sorted(set(keep_float) - set(m.pieces))
    if unknown:
        names = list(m.pieces)
        raise CalibrationError(f"--keep-float names {', '.join(map(repr, unknown[:5]))}"
                               f"{' ...' if len(unknown) > 5 else ''}, not pieces of this bundle "
                               f"(it has {len(names)}: {', '.join(names[:8])}"
                               f"{' ...' if len(names) > 8 else ''}; 'adaedge info --json' "
                               "lists them)")
    backend = OnnxRuntimeBackend(threads=threads)
    runtime = Runtime(b, backend, path="pieces")
    try:
        x = runtime.check_clips(clips)
    except InputError as e:
        raise CalibrationError(f"calibration {e}") from None
    exit_budgets = _stored_budgets(b)
    y = None
    if exit_budgets:
        if labels is None:
            raise CalibrationError("this bundle's exits hold thresholds, which must be solved "
                                   "again on the int8 forms: give labelled calibration data")
        from .exits import check_data
        check_data(runtime, x, labels)          # before any work: nothing is written on error
        y = np.asarray(labels)
    folder = _int8_folder(b.root)               # a link there is refused before any work
    used = m.used_pieces()
    gates = gate_pieces(b)
    branches = branch_pieces(b)
    fed_constants = constant_fed(b)
    steps = 4 + len(used)
    tick = progress or (lambda done, total, what: None)
    with tempfile.TemporaryDirectory(prefix="adaedge-int8-") as tmp:
        work = Path(tmp)
        store = _Store(work)
        _record(runtime, store)
        tick(0, steps, "running the float bundle")
        _collect(runtime, store, x, branches, min_clips)
        report = Int8Report(len(x), method, data)
        forms: Dict[str, Int8Piece] = {}
        kept: Dict[str, str] = {}
        written: Dict[str, bytes] = {}
        for i, piece in enumerate(used):
            tick(1 + i, steps, piece)
            counts = store.rows.get(piece, {"observed": 0, "forced": 0})
            pr = PieceReport(piece, "float", counts["observed"], counts["forced"])
            report.pieces.append(pr)
            float_data = b.piece_bytes(piece)
            model = parse_onnx(float_data, f"piece {piece!r}")
            if piece in keep_float:
                pr.reason = "kept in float as asked (--keep-float)"
            elif piece in fed_constants:
                pr.reason = ("its weights arrive as inputs (shared constants), so no per-channel "
                             "scale can be fixed")
            elif not _computes(model):
                pr.reason = "no convolution or matrix product: nothing to gain"
            elif not counts["observed"] + counts["forced"]:
                pr.reason = "no calibration clip reached it"
            if pr.reason:
                kept[piece] = pr.reason
                continue
            try:
                data_q = _quantize(model, store, piece, method, work, target, form)
                check_io(parse_onnx(data_q, f"int8 form of {piece!r}"), m.pieces[piece],
                         f"int8 form of {piece!r}")
            except (BundleError, ValueError, RuntimeError) as e:
                pr.reason = f"ONNX Runtime's quantizer could not quantize it: {e}"
                kept[piece] = pr.reason
                continue
            decision = gates.get(piece)
            pr.rel_error, pr.agreement = _compare(float_data, data_q, store.feeds(piece),
                                                  decision, threads)
            if not np.isfinite(pr.rel_error):
                raise CalibrationError(f"piece {piece!r}: the float network's values overflow on "
                                       "these clips (the int8 form's error is not finite): are "
                                       "the clips normalised with the manifest's mean and std?")
            if decision is not None and (pr.agreement is None or pr.agreement < GATE_AGREEMENT):
                pr.reason = (f"its int8 decisions agree with float on "
                             f"{(pr.agreement or 0.0):.1%} of the calibration clips "
                             f"(below {GATE_AGREEMENT:.0%})")
                kept[piece] = pr.reason
                continue
            pr.precision = "int8"
            written[piece] = data_q
            forms[piece] = Int8Piece("", "", counts["observed"], counts["forced"])
    tick(steps - 3, steps, "writing")
    # New forms go to files named by their content, so that no file the current manifest lists
    # is replaced: until the manifest is written the old forms stay whole, and a failure removes
    # what this call wrote.
    new_files: List[Path] = []
    try:
        for piece, data_q in written.items():
            digest = hashlib.sha256(data_q).hexdigest()
            name = f"{piece}.{digest[:16]}.onnx"
            path = child(folder, name)
            if not (path.is_file() and not path.is_symlink() and sha256_file(path) == digest):
                write_atomic(path, data_q)
                new_files.append(path)
            forms[piece] = dataclasses.replace(forms[piece], file=f"{GRAPHS}/int8/{name}",
                                               sha256=digest)
        import onnxruntime

        from ..runtime.processor import processor_class
        m.int8 = Int8Forms(forms, kept, {
            "data": data or "given clips", "clips": int(len(x)), "method": method,
            "target": target, "weights": WEIGHTS[form],
            "activations": ("int8, symmetric, per tensor" if TARGETS[target] == "int8" else
                            "uint8, asymmetric, per tensor"),
            "min_clips_per_branch": int(min_clips), "gate_agreement": GATE_AGREEMENT,
            "tool": f"onnxruntime.quantization {onnxruntime.__version__} (QDQ)"}, {},
            form=form, made_on=processor_class())
        write_manifest(b.root, m)
    except BaseException as e:
        for path in new_files:
            path.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CalibrationError(f"cannot write the int8 forms into {folder}: {e}; the "
                                   "bundle's earlier int8 forms are unchanged") from None
        raise
    keep = {f.file for f in forms.values()}
    for old in previous.pieces.values() if previous is not None else ():
        if old.file not in keep:                 # a form no longer listed
            path = safe_join(b.root, old.file)
            if path.is_file():
                path.unlink()
    if exit_budgets and y is not None:
        tick(steps - 2, steps, "exit thresholds")
        from .exits import calibrate_exits
        budgets, criterion, default = exit_budgets
        exits = calibrate_exits(b.root, x, y, budgets, criterion=criterion, default=default,
                                precision="int8", threads=threads)
        report.exits = exits.to_json()
    tick(steps, steps, "done")
    return report


def _stored_budgets(b: Bundle) -> Optional[Tuple[List[float], str, Optional[float]]]:
    """The budgets (GFLOPs) whose thresholds the float exits hold, their criterion and which
    of them is the default; None where no exit holds thresholds."""
    steps = b.manifest.exits()
    budgets = [float(k) for k in b.manifest.exit_budgets() if _is_number(k)]
    if not budgets:
        return None
    default = None
    if "default" in steps[0].thresholds:
        for k in budgets:
            key = budget_key(k)
            if all(s.thresholds.get(key) == s.thresholds.get("default") for s in steps):
                default = k
                break
    return budgets, steps[0].criterion, default


def _is_number(text: str) -> bool:
    try:
        return bool(np.isfinite(float(text)))
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# verify

@dataclass
class VerifyInt8Report:
    clips: int
    data: str
    piece_rtol: float
    pieces: List[Dict[str, Any]] = field(default_factory=list)   # piece, rel_error, ok
    gates: List[Dict[str, Any]] = field(default_factory=list)    # switch, agreement, ok
    top1: Optional[Dict[str, Any]] = None                        # float, int8, drop, ok
    processor: str = ""                                          # the class it ran on
    form: str = ""                                               # the forms' kind

    @property
    def ok(self) -> bool:
        return all(p["ok"] for p in self.pieces) and all(g["ok"] for g in self.gates) and \
            (self.top1 is None or self.top1["ok"])

    def to_json(self) -> Dict[str, Any]:
        return {"ok": self.ok, "clips": self.clips, "data": self.data,
                "processor": self.processor, "form": self.form,
                "thresholds": {"piece_rel_error": self.piece_rtol,
                               "gate_agreement": VERIFY_GATE_AGREEMENT, "top1_drop": TOP1_DROP},
                "pieces": self.pieces, "gates": self.gates, "top1": self.top1}

    def text(self) -> str:
        lines = [f"int8 against float on {self.clips} clips ({self.data}); thresholds: "
                 f"each piece ||int8 - float||_2 <= {self.piece_rtol:g} x ||float||_2 fed "
                 f"the float network's inputs, each gate agreeing on >= {VERIFY_GATE_AGREEMENT:.0%} "
                 f"of clips in the whole int8 network, top-1 drop <= {TOP1_DROP * 100:g} point; "
                 f"{self.form} forms on {self.processor}"]
        for p in self.pieces:
            lines.append(f"{'ok  ' if p['ok'] else 'FAIL'} piece {p['piece']:<36} error "
                         f"{p['rel_error']:.4f} ({p['clips']} clips)")
        for g in self.gates:
            lines.append(f"{'ok  ' if g['ok'] else 'FAIL'} gate  {g['switch']:<36} agrees "
                         f"{g['agreement']:.1%}")
        if self.top1 is not None:
            t = self.top1
            lines.append(f"{'ok  ' if t['ok'] else 'FAIL'} top-1 float {t['float']:.4f}, int8 "
                         f"{t['int8']:.4f} (drop {t['drop'] * 100:+.2f} points)")
        else:
            lines.append("     top-1 not checked: give labelled --data")
        lines.append("verified" if self.ok else "MISMATCH")
        return "\n".join(lines)


def verify_int8(bundle: Union[str, Path], clips: Any, labels: Any = None, data: str = "",
                piece_rtol: float = PIECE_RTOL, threads: Optional[int] = None,
                min_clips: int = MIN_CLIPS, progress: Progress = None,
                record: bool = False) -> VerifyInt8Report:
    """The int8 forms against the float bundle on held-out ``clips`` (see the module docstring);
    ``labels`` add the top-1 change. ``record``: where they pass, add this processor class to
    the manifest's ``int8.processors.verified_on``."""
    from ..runtime.processor import processor_class
    b = load_bundle(bundle)
    forms = b.manifest.int8
    if forms is None:
        raise BundleError(f"bundle {b.root} has no int8 pieces; write them with 'adaedge "
                          f"calibrate int8 {b.root} --data ...'")
    fp = Runtime(b, OnnxRuntimeBackend(threads=threads), path="pieces")
    try:
        x = fp.check_clips(clips)
    except InputError as e:
        raise CalibrationError(f"verification {e}") from None
    q = Runtime(b, OnnxRuntimeBackend(threads=threads, precision="int8"), path="pieces")
    report = VerifyInt8Report(len(x), data or "given clips", piece_rtol,
                              processor=processor_class(), form=forms.kind)
    names = [n for n in b.manifest.used_pieces() if n in forms.pieces]
    tick = progress or (lambda done, total, what: None)
    steps = len(names) + 2
    tick(0, steps, "float bundle")
    with tempfile.TemporaryDirectory(prefix="adaedge-int8-") as tmp:
        store = _Store(Path(tmp))
        _record(fp, store)      # the float run records each piece's feeds as it goes
        float_run = _collect(fp, store, x, branch_pieces(b), min_clips)
        qb = b.with_precision("int8")
        for i, piece in enumerate(names):
            tick(1 + i, steps, piece)
            rel, _ = _compare(b.piece_bytes(piece), qb.piece_bytes(piece), store.feeds(piece),
                              None, threads)
            counts = store.rows.get(piece, {})
            report.pieces.append({"piece": piece, "rel_error": round(rel, 6),
                                  "clips": sum(counts.values()), "ok": rel <= piece_rtol})
    tick(steps - 1, steps, "int8 bundle")
    int8_run = q.classify_batches(x, BATCH, exits=False)
    keys = sorted({k for t in float_run.traces for k in t.branches})
    for key in keys:
        same = [t.branches.get(key) == u.branches.get(key)
                for t, u in zip(float_run.traces, int8_run.traces)]
        agreement = float(np.mean(same))
        report.gates.append({"switch": key, "agreement": round(agreement, 4),
                             "ok": agreement >= VERIFY_GATE_AGREEMENT})
    if labels is not None:
        y = np.asarray(labels)
        if y.shape != (len(x),) or y.dtype.kind not in "iu":
            raise CalibrationError(f"labels must be one integer per clip ({len(x)})")
        a_f = float((float_run.labels == y).mean())
        a_q = float((int8_run.labels == y).mean())
        report.top1 = {"float": round(a_f, 4), "int8": round(a_q, 4), "drop": round(a_f - a_q, 4),
                       "ok": a_f - a_q <= TOP1_DROP + 1e-9}
    if record and report.ok:
        m = load_bundle(bundle).manifest        # as it is now (the forms checked above)
        if m.int8 is not None and m.int8.pieces == forms.pieces and \
                report.processor not in m.int8.verified_on:
            m.int8.verified_on.append(report.processor)
            write_manifest(b.root, m)
    tick(steps, steps, "done")
    return report


__all__ = ["calibrate_int8", "verify_int8", "VerifyInt8Report", "Int8Report", "PieceReport",
           "METHODS", "TARGET_FORMS", "GATE_AGREEMENT", "PIECE_RTOL", "VERIFY_GATE_AGREEMENT", "TOP1_DROP",
           "gate_pieces", "branch_pieces", "constant_fed"]
