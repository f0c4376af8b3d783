"""The format's vocabulary: names and numbers that the exporter writes and every reader checks.

Kept with the format (not with the exporter) so that the runtime, which must not import the
exporter, reads the same words.
"""

from __future__ import annotations

FORMAT = "adaedge-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

DTYPES = ("float32", "float16", "int64", "int32", "bool", "uint8")
STEP_OPS = ("run", "switch", "exit", "carry")
CRITERIA = ("entropy", "max_prob", "max_logit")   # exit criteria (max_logit: the largest raw score)
LAYOUTS = ("NCTHW", "NTCHW")
NTCHW = "NTCHW"   # a 5D value holding frames before channels (pieces that fold frames into the batch)

OPSET = 17                  # the ONNX opset every piece uses
CUSTOM_DOMAIN = "adaedge"   # custom ops, each carrying a standard-op function body
CUSTOM_OPSET = 1
PLUGIN_OPS = ("CheapFill", "CalibratedConv")   # the custom ops a TensorRT plugin may implement
IR_VERSION = 8              # pieces of standard ops
IR_VERSION_FUNCTIONS = 10   # pieces with custom nodes (function overloads need IR 10, ONNX 1.16)

GRAPHS = "graphs"           # the folder of a bundle's pieces and constants
ENGINES = "engines"         # the folder of the backends' caches

__all__ = ["FORMAT", "SCHEMA_VERSION", "MANIFEST", "DTYPES", "STEP_OPS", "CRITERIA", "LAYOUTS",
           "NTCHW", "OPSET", "CUSTOM_DOMAIN", "CUSTOM_OPSET", "PLUGIN_OPS", "IR_VERSION",
           "IR_VERSION_FUNCTIONS", "GRAPHS", "ENGINES"]
