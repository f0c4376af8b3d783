"""The runtime: backends turn pieces into executables, the interpreter runs a bundle's program.

>>> import adaedge.runtime as rt
>>> runtime = rt.load("bundle/")                         # doctest: +SKIP
>>> result = runtime.classify(clips)                     # doctest: +SKIP
>>> result.scores, result.traces[0].branches             # doctest: +SKIP

This package never imports torch.
"""

from ..bundle import Bundle, BundleError
from .backends import Backend, BackendUnavailable, Executable, available_backends, create_backend
from .program import InputError, Result, Runtime, Stream, Trace, build, exit_measure, load

__all__ = ["load", "build", "Runtime", "Stream", "Result", "Trace", "InputError", "Bundle",
           "BundleError", "Backend", "BackendUnavailable", "Executable", "available_backends",
           "create_backend", "exit_measure"]
