"""What adaedge's data sets share: a split of seeded clips drawn on demand.

Clip ``i`` of a split is always the same: it is drawn from
``numpy.random.default_rng((seeds[split], i))`` and its class is ``i % len(classes)``, so every
split is balanced and any clip can be redrawn alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Mapping, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class SplitDataset:
    """The skeleton: ``split``, clip ``frames`` and ``size``, and ``length`` (0: the split's
    standard size). Subclasses set ``seeds``, ``sizes`` and ``classes`` and draw with
    :meth:`draw`; ``ds[i] -> (clip, label index)``."""

    split: str = "train"
    frames: int = 8
    size: int = 32
    length: int = 0

    seeds: ClassVar[Mapping[str, int]] = {}
    sizes: ClassVar[Mapping[str, int]] = {}
    classes: ClassVar[Sequence[str]] = ()

    def __post_init__(self) -> None:
        if self.split not in self.seeds:
            raise ValueError(f"unknown split {self.split!r}; splits: {', '.join(self.seeds)}")
        if self.length == 0:
            object.__setattr__(self, "length", self.sizes[self.split])

    def __len__(self) -> int:
        return self.length

    def draw(self, i: int) -> Tuple[int, np.random.Generator]:
        """Clip ``i``'s label index and its own random generator."""
        if not 0 <= i < self.length:
            raise IndexError(i)
        return i % len(self.classes), np.random.default_rng((self.seeds[self.split], i))

    def __getitem__(self, i: int) -> Tuple[np.ndarray, int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Tuple[np.ndarray, int]]:
        for i in range(self.length):
            yield self[i]


__all__ = ["SplitDataset"]
