"""The backends, by name: one registry line each, each imported only when asked for.

>>> from adaedge.runtime.backends import available_backends, create_backend
>>> available_backends()
['onnxruntime', 'tensorrt', 'torch-cpu', 'torch-cuda']
>>> backend = create_backend("onnxruntime", threads=2)          # doctest: +SKIP

A new backend is one module (a :class:`~.base.Backend` subclass that declares its options and
imports its library lazily) and one line in ``_REGISTRY``.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Tuple, Type, cast

from ...errors import BackendUnavailable
from .base import Backend, BackendOption, Executable

# name -> (module, class)
_REGISTRY: Dict[str, Tuple[str, str]] = {
    "onnxruntime": ("adaedge.runtime.backends.onnxruntime", "OnnxRuntimeBackend"),
    "tensorrt": ("adaedge.runtime.backends.tensorrt", "TensorRTBackend"),
    "torch-cuda": ("adaedge.runtime.backends.pytorch", "TorchCudaBackend"),
    "torch-cpu": ("adaedge.runtime.backends.pytorch", "TorchCpuBackend"),
}


def available_backends() -> List[str]:
    return sorted(_REGISTRY)


def backend_class(name: str) -> Type[Backend]:
    """The backend's class (its module is imported; its library is not)."""
    if name not in _REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r}; this adaedge has "
                                 f"{', '.join(available_backends())}")
    module, cls = _REGISTRY[name]
    return cast(Type[Backend], getattr(importlib.import_module(module), cls))


def backend_options(name: str) -> Tuple[BackendOption, ...]:
    return backend_class(name).options


def create_backend(name: str, **options: Any) -> Backend:
    """The backend ``name`` with its options (see :func:`backend_options`)."""
    return backend_class(name)(**options)


__all__ = ["Backend", "BackendOption", "Executable", "available_backends", "backend_class",
           "backend_options", "create_backend"]
