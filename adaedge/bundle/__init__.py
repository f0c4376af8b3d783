"""The bundle format: a folder with ``manifest.json``, ``graphs/*.onnx`` and an ``engines/`` cache.

A bundle is the only thing that crosses from export to the runtime. It is untrusted input:
:func:`load` checks every field of the manifest (:mod:`.manifest`, :mod:`.program`), keeps every
path inside the bundle (:mod:`.paths`), refuses unknown schema versions, and
:meth:`Bundle.piece_path` checks each piece's SHA-256 before a backend reads it.

This package imports the standard library, NumPy and ONNX only.
"""

from ..errors import BundleError
from .folder import Bundle, load, parse_onnx, write_manifest
from .manifest import Manifest, budget_key, parse_manifest
from .paths import safe_join, sha256_file, write_atomic
from .program import Branch, Carry, Exit, Gate, ProgramBuilder, Run, Step, Switch
from .specs import Constants, Dim, Piece, TensorSpec
from .vocabulary import (CRITERIA, CUSTOM_DOMAIN, DTYPES, FORMAT, LAYOUTS, MANIFEST, NTCHW, OPSET,
                         PLUGIN_OPS, SCHEMA_VERSION)

__all__ = ["Bundle", "BundleError", "load", "parse_onnx", "write_manifest", "Manifest", "parse_manifest",
           "budget_key", "safe_join", "sha256_file", "write_atomic", "Step", "Run", "Switch",
           "Gate", "Branch", "Exit", "Carry", "ProgramBuilder", "TensorSpec", "Piece",
           "Constants", "Dim", "FORMAT", "SCHEMA_VERSION", "MANIFEST", "DTYPES", "CRITERIA",
           "LAYOUTS", "NTCHW", "OPSET", "CUSTOM_DOMAIN", "PLUGIN_OPS"]
