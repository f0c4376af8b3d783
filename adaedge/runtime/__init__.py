"""The runtime: backends turn pieces into executables, the interpreter runs a bundle's program.

>>> import adaedge.runtime as rt
>>> runtime = rt.load("bundle/")                         # doctest: +SKIP
>>> result = runtime.classify(clips)                     # doctest: +SKIP
>>> result.scores, result.traces[0].branches             # doctest: +SKIP

This package imports the bundle format, NumPy and each backend's own library (lazily, when the
backend is created); torch only inside the PyTorch backend.
"""

from ..bundle import Bundle
from ..errors import BackendUnavailable, BundleError, InputError
from .backends import (Backend, BackendOption, Executable, available_backends, backend_class,
                       backend_options, create_backend)
from .interpreter import Result, Runtime, Stream, Trace, build, exit_measure, load

__all__ = ["load", "build", "Runtime", "Stream", "Result", "Trace", "InputError", "Bundle",
           "BundleError", "Backend", "BackendOption", "BackendUnavailable", "Executable",
           "available_backends", "backend_class", "backend_options", "create_backend",
           "exit_measure"]
