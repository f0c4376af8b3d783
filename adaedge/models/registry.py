"""What a model family is, in one place: a :class:`Family` entry per family.

An entry names the family's model builders, its exporter (imported only when exporting), its
executions and export options (which the CLI turns into flags), the checkpoint formats it reads
besides adaedge's own (an official code's files), the reference's branch decisions that ``verify``
compares, the names people read for its branches, and its training loop. Adding a family means a
model file (with its entry), an exporter file, and one line in :data:`adaedge.models.FAMILIES`;
nothing in the CLI, verify, demo, bench or the runtime changes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import UsageError

# Kinetics statistics, the usual normalisation of video backbones (torchvision's video models).
KINETICS_MEAN = [0.43216, 0.394666, 0.37645]
KINETICS_STD = [0.22803, 0.22145, 0.216989]


@dataclass(frozen=True)
class ExportOption:
    """A choice of a family's exporter: a keyword of its export function and a CLI flag."""

    name: str
    help: str
    type: Callable[[str], Any] = str
    choices: Optional[Sequence[Any]] = None
    flag: Optional[str] = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


# (state dict, adaedge metadata, the model name a user gave) -> (model name, config), or None
# when the file is not in this family's official format; raises CheckpointError when it is but
# cannot be read as one.
Sniffer = Callable[[Mapping[str, Any], Mapping[str, Any], Optional[str]],
                   Optional[Tuple[str, Dict[str, Any]]]]


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring)."""

    name: str                                   # "vared": the manifest's model.family
    title: str                                  # "VA-RED²": what people read
    builders: Mapping[str, Callable[..., Any]]  # model name -> builder(**config)
    exporter: str                               # "module:function", imported when exporting
    executions: Tuple[Tuple[str, str], ...]     # (name, help); the first is the default
    options: Tuple[ExportOption, ...] = ()
    official: Optional[Sniffer] = None          # official checkpoint formats
    checkpoint_help: str = ""                   # which official files load, in words
    # model name -> config keys an official file does not record and a user must give (a guess
    # there would load and compute something else), each with an example value
    official_needs: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    check_state: Optional[Callable[[Mapping[str, Any], Any, str], None]] = None
    decisions: Optional[Callable[[Any, str], Optional[List[int]]]] = None  # verify: branch per clip
    branch_titles: Mapping[str, str] = field(default_factory=dict)         # branch name -> words
    trainer: Optional[str] = None               # "module:main" of its training command
    # verify's tolerance where the family states one (relative to each value's largest
    # magnitude; None: adaedge's 1e-4), and why
    verify_rtol: Optional[float] = None
    verify_rtol_why: str = ""
    # verify's random clips: "noise" (independent values) or "smooth" (random fields, as natural
    # frames are: for families that sample frames at positions they compute, where white noise
    # turns float rounding of a position into large differences)
    verify_clips: str = "noise"

    @property
    def default_execution(self) -> str:
        return self.executions[0][0]

    def execution_names(self) -> List[str]:
        return [e for e, _ in self.executions]

    def check_execution(self, execution: Optional[str]) -> str:
        execution = execution or self.default_execution
        if execution not in self.execution_names():
            raise UsageError(f"{self.title} has no execution {execution!r} (it has "
                             f"{', '.join(self.execution_names())})")
        return execution

    def check_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        known = {o.name for o in self.options}
        wrong = sorted(set(options) - known)
        if wrong:
            flags = ", ".join("--" + w.replace("_", "-") for w in wrong)
            raise UsageError(f"{flags} do{'es' if len(wrong) == 1 else ''} not apply to "
                             f"{self.title} (its options: "
                             f"{', '.join(o.cli_flag for o in self.options) or 'none'})")
        return dict(options)

    def export_function(self) -> Callable[..., Any]:
        return _resolve(self.exporter)

    def train_function(self) -> Optional[Callable[[List[str]], int]]:
        return _resolve(self.trainer) if self.trainer else None


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


__all__ = ["Family", "ExportOption", "Sniffer", "KINETICS_MEAN", "KINETICS_STD"]
