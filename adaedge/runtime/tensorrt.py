"""The TensorRT backend's earlier import path; the backend lives in
:mod:`adaedge.runtime.backends.tensorrt` (this name stays so that existing imports keep working).
"""

import sys

from .backends import tensorrt as _backend

sys.modules[__name__] = _backend
