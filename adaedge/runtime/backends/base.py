"""The one contract every backend keeps: what the interpreter, the benchmarks and the CLI use.

A backend turns a bundle's pieces into executables (:meth:`Backend.load`), prepares its engines
into the bundle's ``engines/`` cache (:meth:`Backend.build`), and says where its values live
(:attr:`Backend.arrays`: row operations on its own arrays, so that values stay in the backend's
memory from piece to piece). It declares its own command-line options (:attr:`Backend.options`),
which the CLI adds as flags; the same names are the keyword arguments of its constructor.

A backend module imports its library lazily (when the backend is created), so every module of
the runtime imports on a machine that lacks it; creating the backend there raises
:class:`~adaedge.errors.BackendUnavailable` with what to install.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Protocol, Sequence, Tuple

from ...bundle import Bundle
from ...progress import Progress
from ..arrays import NUMPY, ArrayOps


@dataclass(frozen=True)
class BackendOption:
    """One option of a backend: a keyword of its constructor and a flag of the CLI.

    ``flag`` defaults to ``--<name with dashes>``; ``negate`` makes a ``--no-...`` flag that
    passes False, ``switch`` a flag that passes True.
    """

    name: str
    help: str
    type: Callable[[str], Any] = str
    choices: Optional[Sequence[Any]] = None
    flag: Optional[str] = None
    negate: bool = False
    switch: bool = False

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


class Executable(Protocol):
    """One piece, ready to run: feeds and results are the backend's arrays, by I/O name."""

    def run(self, feeds: Mapping[str, Any]) -> Dict[str, Any]: ...


class Backend(ABC):
    """What every backend provides (see the module docstring)."""

    name: ClassVar[str]
    summary: ClassVar[str]                          # one line for the CLI's --backend help
    options: ClassVar[Tuple[BackendOption, ...]] = ()

    arrays: ArrayOps = NUMPY            # where values live and how rows are picked and joined
    threads: Optional[int] = None       # CPU threads per piece, where the backend has them
    runs_graphs: ClassVar[bool] = False  # load_graph runs a whole compiled program (If nodes)
    precision: str = "fp32"             # the pieces' precision: int8 runs the bundle's Q/DQ forms

    def bundle_for(self, bundle: Bundle) -> Bundle:
        """The view of ``bundle`` this backend runs: its int8 forms at ``precision="int8"``
        (:meth:`Bundle.with_precision`), the bundle as exported otherwise."""
        return bundle.with_precision("int8" if self.precision == "int8" else "fp32")

    @abstractmethod
    def build(self, bundle: Bundle, progress: Progress = None) -> Path:
        """Prepare engines for every piece into the bundle's cache; returns the cache folder."""

    @abstractmethod
    def load(self, bundle: Bundle, piece: str) -> Executable:
        """The executable of one (hash-checked) piece."""

    def load_graph(self, model: Any, name: str) -> Executable:
        """An executable for an ONNX graph adaedge made from a bundle's pieces (the program
        compiled into one graph, :mod:`adaedge.runtime.compile`); backends whose
        ``runs_graphs`` is False do not take one."""
        raise NotImplementedError(f"the {self.name} backend does not run compiled programs")

    def synchronize(self) -> None:
        """Wait until every piece launched so far has finished (asynchronous devices)."""

    def device_info(self) -> Dict[str, Any]:
        """What a benchmark records of the device: at least its ``name``."""
        return {"name": "cpu", "threads": self.threads}

    def close(self) -> None:
        """Release what the backend holds beyond Python's reach (streams, captured graphs)."""


__all__ = ["Backend", "BackendOption", "Executable", "Progress"]
