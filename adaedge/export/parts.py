"""What an exporter returns: the pieces and the program, before they are written as a bundle."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import onnx

from ..bundle import ProgramBuilder, TensorSpec


@dataclass
class Parts:
    """One family's export of one model: :func:`adaedge.export.export` writes it as a bundle.

    ``program`` is written with its :class:`~adaedge.bundle.ProgramBuilder`; ``state`` lists what
    a stream carries from call to call, ``constants`` weights that several pieces read (stored
    once), ``stream`` the window of a per-frame program (None: whole clips).
    """

    output: str = "logits"
    pieces: Dict[str, onnx.ModelProto] = field(default_factory=dict)
    program: ProgramBuilder = field(default_factory=ProgramBuilder)
    policies: Dict[str, Dict[str, int]] = field(default_factory=dict)
    state: List[TensorSpec] = field(default_factory=list)
    constants: Dict[str, Any] = field(default_factory=dict)
    stream: Optional[Dict[str, int]] = None

    def add(self, name: str, model: onnx.ModelProto) -> str:
        """Add a piece; returns its name."""
        if name in self.pieces:
            raise ValueError(f"piece {name!r} is exported twice")
        self.pieces[name] = model
        return name


__all__ = ["Parts"]
