"""A bundle's INT8 forms: Q/DQ copies of its pieces, a second precision beside the float one.

``adaedge calibrate int8`` writes them (:mod:`adaedge.calibration.int8`); the manifest records them
under ``"int8"``::

    "int8": {
      "pieces": {name: {"file": "graphs/int8/<name>.onnx", "sha256": hex,
                        "observed": clips whose gates chose the piece,
                        "forced": clips forced through it to calibrate it}},
      "float": {name: why the piece stays in float},
      "calibration": {"data": str, "clips": int, "method": str, ...},
      "thresholds": {exit name: {budget: threshold}}      # exits solved on the int8 forms
    }

An int8 piece takes and gives the float piece's tensors (its Q/DQ nodes are inside), so it has
the float piece's I/O spec and FLOPs; only its file and hash differ. :meth:`Bundle.with_precision`
(``"int8"``) gives the view every backend runs: the manifest with each int8 piece's file in place
of the float one and the exits' int8 thresholds, and its own engine caches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping

from ..errors import BundleError, UsageError
from .specs import digest, name, need

PRECISIONS = ("fp32", "int8")
MAX_TEXT = 2000


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

    def to_json(self) -> Dict[str, Any]:
        return {"pieces": {k: p.to_json() for k, p in self.pieces.items()},
                "float": dict(self.kept_float), "calibration": dict(self.calibration),
                "thresholds": {k: dict(v) for k, v in self.thresholds.items()}}

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
        return cls(forms, dict(kept), dict(calibration), out)


def check_precision(precision: Any) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return str(precision)


__all__ = ["Int8Forms", "Int8Piece", "PRECISIONS", "check_precision"]
