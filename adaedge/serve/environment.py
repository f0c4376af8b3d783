"""Can this Python serve? PyTriton's Triton needs the libpython of the interpreter it serves from.

PyTriton runs each model's proxy in Triton's Python backend: a stub program
(``pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub``) that links
``libpython3.X.so.1.0`` and, once started, imports the standard library of the interpreter
adaedge runs in. The dynamic loader finds the system's libpython first (Debian's 3.11.2 in
``/usr/lib``); with another 3.11 (pyenv's 3.11.7) the library and the standard library disagree
and the model fails to start (``'_thread.RLock' object has no attribute '_recursion_count'``).

:func:`serving_environment` puts this interpreter's own libpython first on the loader's path
(``LD_LIBRARY_PATH``), which pyenv's shared build and Debian's python3 both provide, checks with
``ldd`` that the stub then resolves exactly that file, and otherwise refuses with one line saying
what to use instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, Optional

from ..errors import AdaedgeError, require


class ServeUnavailable(AdaedgeError, RuntimeError):
    """This machine or Python cannot run Triton Inference Server through PyTriton."""


def _stub() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServeUnavailable("PyTriton is not importable")
    root = Path(list(spec.submodule_search_locations)[0])
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeUnavailable(f"the installed PyTriton ships no Triton Python backend stub for "
                               f"Python {version} (looked for {stub})")
    return stub


def own_libpython() -> Optional[Path]:
    """This interpreter's shared libpython (``LIBDIR/INSTSONAME``), if it has one."""
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname:
        return None
    path = Path(libdir) / soname
    return path if path.is_file() else None


def _resolved_libpython(stub: Path, env: Dict[str, str]) -> Optional[str]:
    """The libpython ``ldd`` says the stub loads under ``env`` (None without ldd)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return None
    out = subprocess.run([ldd, str(stub)], capture_output=True, text=True, env=env, timeout=30)
    for line in out.stdout.splitlines():
        if "libpython" in line and "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" (")[0].strip()
            return target or "not found"
    return "not found"


def serving_environment() -> Dict[str, str]:
    """The environment Triton must start with to serve from this Python (``os.environ`` with
    this interpreter's libpython first on ``LD_LIBRARY_PATH``); raises
    :class:`~adaedge.errors.MissingExtra` without PyTriton and :class:`ServeUnavailable` where
    Triton's Python stub would load a libpython other than this interpreter's."""
    require("pytriton", "adaedge serve", "serve")
    require("tritonclient", "adaedge serve", "serve")
    if not sys.platform.startswith("linux"):
        raise ServeUnavailable("Triton Inference Server (PyTriton) runs on Linux only")
    stub = _stub()
    env = dict(os.environ)
    lib = own_libpython()
    version = sys.version.split()[0]
    if lib is None:
        raise ServeUnavailable(
            f"this Python ({sys.executable}, {version}) has no shared libpython, which Triton's "
            "Python backend needs: use a Python built with --enable-shared (pyenv: "
            "PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install), or a venv of the system "
            "python3")
    paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    env["LD_LIBRARY_PATH"] = ":".join([str(lib.parent)] + [p for p in paths
                                                           if p != str(lib.parent)])
    found = _resolved_libpython(stub, env)
    if found is not None and (found == "not found" or
                              os.path.realpath(found) != os.path.realpath(lib)):
        raise ServeUnavailable(
            f"Triton's Python backend stub would load {found}, not this Python's {lib} "
            f"({version}): their standard libraries differ and the models would fail to start; "
            "serve from the Python that library belongs to")
    return env


__all__ = ["ServeUnavailable", "serving_environment", "own_libpython"]
