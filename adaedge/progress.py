"""Progress of long steps (export, build, verify, bench, calibrate, the demo's first use).

Library functions take a ``progress`` callback, ``progress(done, total, what)``, and know nothing
of how it is shown. The command line shows it with tqdm on stderr where tqdm is installed (every
extra brings it; the core runtime install does not, and then stays quiet).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

Progress = Optional[Callable[[int, int, str], None]]


class ProgressBar:
    """A ``progress`` callback drawing one tqdm bar on stderr; closes itself when done."""

    def __init__(self, label: str, enabled: bool = True) -> None:
        self.label = label
        self.enabled = enabled
        self._bar: Any = None
        self._tqdm: Any = None
        if enabled:
            try:
                from tqdm import tqdm
                self._tqdm = tqdm
            except ImportError:
                self.enabled = False

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled:
            return
        if self._bar is None or self._bar.total != total:
            self.close()
            self._bar = self._tqdm(total=total, desc=self.label, unit="step", file=sys.stderr,
                                   leave=True, dynamic_ncols=True,
                                   mininterval=0.1 if sys.stderr.isatty() else 2.0)
        self._bar.set_postfix_str(what[:40], refresh=False)
        self._bar.update(max(0, done - self._bar.n))
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


__all__ = ["Progress", "ProgressBar"]
