"""A bundle's INT8 forms: Q/DQ copies of its pieces, a second precision beside the float one.

``adaedge calibrate int8`` writes them (:mod:`adaedge.calibration.int8`); the manifest records them
under ``"int8"``::

    "int8": {
      "pieces": {name: {"file": "graphs/int8/<name>.onnx", "sha256": hex,
                        "observed": clips whose gates chose the piece,
                        "forced": clips forced through it to calibrate it}},
      "float": {name: why the piece stays in float},
      "calibration": {"data": str, "clips": int, "method": str, ...},
      "thresholds": {exit name: {budget: threshold}},     # exits solved on the int8 forms
      "form": "u8s8-7bit",                 # the arithmetic's kind (FORMS); absent: full range
      "processors": {"made_on": class, "verified_on": [class, ...]}    # PROCESSORS
    }

**Forms and processors.** ONNX Runtime's int8 kernels on x86 without VNNI (AVX2, and AVX-512
without VNNI) multiply uint8 activations by int8 weights with VPMADDUBSW, which adds two products
into a saturating int16: with full-range weights (|w| <= 127) a pair reaches 2 x 255 x 127 =
64770 and is clipped at 32767, so a form right on an AVX-512-VNNI machine computes something else
there. Weights of 7 bits (|w| <= 64, ``reduce_range``) keep every pair within 2 x 255 x 64 =
32640 <= 32767, so the ``-7bit`` forms are right on every x86 kernel; symmetric int8 activations
are shifted to uint8 by the same kernels, so the bound is the same. :data:`WRONG_ON` says where
each kind is known wrong; the runtime refuses a form there (:func:`wrong_here`).

An int8 piece takes and gives the float piece's tensors (its Q/DQ nodes are inside), so it has
the float piece's I/O spec and FLOPs; only its file and hash differ. :meth:`Bundle.with_precision`
(``"int8"``) gives the view every backend runs: the manifest with each int8 piece's file in place
of the float one and the exits' int8 thresholds, and its own engine caches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..errors import BundleError, UsageError
from .specs import digest, name, need

PRECISIONS = ("fp32", "int8")
MAX_TEXT = 2000

# processor classes, by the instruction sets ONNX Runtime's int8 kernels choose from
PROCESSORS = ("x86-vnni", "x86-avx512", "x86-avx2", "x86-sse", "arm64", "other")
# the kinds of int8 form: activations x weights; "-7bit": weights within [-64, 64]
FORMS = ("u8s8-7bit", "s8s8-7bit", "u8s8", "s8s8", "u8u8")
# where a kind is known to compute wrong on ONNX Runtime's CPU kernels (saturating VPMADDUBSW):
# x86-avx2 measured (emulated Haswell, issue 24); x86-avx512 without VNNI from the kernels'
# instructions (not measured: no such machine or emulator here)
WRONG_ON: Dict[str, Tuple[str, ...]] = {"u8s8": ("x86-avx512", "x86-avx2"),
                                        "s8s8": ("x86-avx512", "x86-avx2")}


@dataclass(frozen=True)
class Int8Piece:
    file: str
    sha256: str
    observed: int = 0           # calibration clips whose gates chose this piece
    forced: int = 0             # clips forced through it (a branch few or no clips chose)

    def to_json(self) -> Dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "observed": self.observed,
                "forced": self.forced}


@dataclass
class Int8Forms:
    pieces: Dict[str, Int8Piece]
    kept_float: Dict[str, str] = field(default_factory=dict)       # piece -> reason
    calibration: Dict[str, Any] = field(default_factory=dict)
    thresholds: Dict[str, Dict[str, float]] = field(default_factory=dict)
    form: str = ""                      # FORMS; "" reads as the full-range kind of the target
    made_on: str = ""                   # the processor class it was calibrated on ("": unknown)
    verified_on: List[str] = field(default_factory=list)   # classes where verify passed

    @property
    def kind(self) -> str:
        """The form's kind; forms written before kinds were recorded have full-range weights."""
        if self.form:
            return self.form
        return "s8s8" if self.calibration.get("target") == "tensorrt" else "u8s8"

    def to_json(self) -> Dict[str, Any]:
        out = {"pieces": {k: p.to_json() for k, p in self.pieces.items()},
               "float": dict(self.kept_float), "calibration": dict(self.calibration),
               "thresholds": {k: dict(v) for k, v in self.thresholds.items()}}
        if self.form:
            out["form"] = self.form
        if self.made_on or self.verified_on:
            out["processors"] = {"made_on": self.made_on, "verified_on": list(self.verified_on)}
        return out

    @classmethod
    def from_json(cls, data: Any, pieces: Mapping[str, Any], exits: Mapping[str, Any]) -> "Int8Forms":
        if not isinstance(data, dict):
            raise BundleError("manifest: int8 must be an object")
        forms: Dict[str, Int8Piece] = {}
        for pname, p in need(data, "pieces", dict, "int8").items():
            where = f"int8.pieces[{pname!r}]"
            if name(pname, where) not in pieces:
                raise BundleError(f"manifest: {where} is not a piece of this bundle")
            file = need(p, "file", str, where)
            if not file.endswith(".onnx"):
                raise BundleError(f"manifest: {where}.file {file!r} is not an .onnx file")
            counts = [need(p, k, int, where) for k in ("observed", "forced")]
            if any(c < 0 for c in counts):
                raise BundleError(f"manifest: {where} clip counts must not be negative")
            forms[pname] = Int8Piece(file, digest(p, where), *counts)
        kept = data.get("float", {}) or {}
        if not isinstance(kept, dict):
            raise BundleError("manifest: int8.float must be an object")
        for pname, why in kept.items():
            if name(pname, "int8.float") not in pieces or pname in forms:
                raise BundleError(f"manifest: int8.float names {pname!r}, not a float-only piece "
                                  "of this bundle")
            if not isinstance(why, str) or len(why) > MAX_TEXT:
                raise BundleError(f"manifest: int8.float[{pname!r}] must be a short text")
        calibration = data.get("calibration", {}) or {}
        if not isinstance(calibration, dict) or len(str(calibration)) > 20 * MAX_TEXT:
            raise BundleError("manifest: int8.calibration must be a small object")
        thresholds = data.get("thresholds", {}) or {}
        if not isinstance(thresholds, dict):
            raise BundleError("manifest: int8.thresholds must be an object")
        out: Dict[str, Dict[str, float]] = {}
        for ename, table in thresholds.items():
            if ename not in exits:
                raise BundleError(f"manifest: int8.thresholds names {ename!r}, not an exit step")
            if not isinstance(table, dict):
                raise BundleError(f"manifest: int8.thresholds[{ename!r}] must be an object")
            for k, v in table.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise BundleError(f"manifest: int8.thresholds[{ename!r}][{k!r}] must be a "
                                      "finite number")
            out[ename] = {k: float(v) for k, v in table.items()}
        form = data.get("form", "")
        if form not in FORMS + ("",):
            raise BundleError(f"manifest: int8.form must be one of {', '.join(FORMS)}, not "
                              f"{str(form)[:40]!r}")
        processors = data.get("processors", {}) or {}
        if not isinstance(processors, dict):
            raise BundleError("manifest: int8.processors must be an object")
        made_on = processors.get("made_on", "")
        verified_on = processors.get("verified_on", [])
        if not isinstance(verified_on, list) or len(verified_on) > len(PROCESSORS):
            raise BundleError("manifest: int8.processors.verified_on must be a short list")
        for cls_name in [made_on] + verified_on:
            if cls_name not in PROCESSORS + ("",):
                raise BundleError(f"manifest: int8.processors names {str(cls_name)[:40]!r}, "
                                  f"not a processor class ({', '.join(PROCESSORS)})")
        return cls(forms, dict(kept), dict(calibration), out, form, made_on, list(verified_on))


def wrong_here(forms: Int8Forms, processor: str) -> Optional[str]:
    """Why ``forms`` compute wrong on ``processor`` (one clause), or None where they are right
    or not known to be wrong."""
    kind = forms.kind
    if processor not in WRONG_ON.get(kind, ()):
        return None
    return (f"their {kind} arithmetic (int8 weights of full range) saturates on {processor} "
            "(ONNX Runtime's int8 kernels without VNNI add weight-activation pairs into int16)")


def check_precision(precision: Any) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return str(precision)


__all__ = ["Int8Forms", "Int8Piece", "PRECISIONS", "PROCESSORS", "FORMS", "WRONG_ON",
           "check_precision", "wrong_here"]
