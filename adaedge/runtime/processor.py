"""The processor class this process runs on, as ONNX Runtime's CPU kernels see it.

ONNX Runtime (MLAS) picks its int8 kernels from CPUID at run time, and what they compute depends
on it (see :mod:`adaedge.bundle.int8`): on x86 with AVX-512 VNNI a multiply-add into int32
(``x86-vnni``), without VNNI (``x86-avx512``, ``x86-avx2``) VPMADDUBSW's saturating int16 pair
sums, on SSE4.1 widened 16-bit products (``x86-sse``). The class is read from NumPy's own CPUID
detection (``numpy``'s ``__cpu_features__``), not from ``/proc/cpuinfo``, so that an emulated
processor (QEMU's user mode reports the CPU it emulates through CPUID, not through /proc) is seen
as ONNX Runtime sees it.

Set ``ADAEDGE_PROCESSOR`` to one of :data:`~adaedge.bundle.int8.PROCESSORS` to override it (a
test of what the runtime does elsewhere, or a processor NumPy misreads). AVX-VNNI without
AVX-512 (Intel since Alder Lake) is not told apart by NumPy and reads as ``x86-avx2``: the
conservative side (forms right there are refused, none wrong is run).
"""

from __future__ import annotations

import os
import platform
from typing import Dict

from ..bundle.int8 import PROCESSORS
from ..errors import UsageError

ENV = "ADAEDGE_PROCESSOR"


def _features() -> Dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:                         # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features  # type: ignore
    return dict(features)


def detected_class() -> str:
    """The class CPUID reports (never the override)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if machine not in ("x86_64", "amd64"):
        return "other"
    f = _features()
    if f.get("AVX512VNNI") or f.get("AVX512_CLX"):
        return "x86-vnni"
    if f.get("AVX512BW") or f.get("AVX512_SKX"):
        return "x86-avx512"
    if f.get("AVX2"):
        return "x86-avx2"
    return "x86-sse"


def processor_class() -> str:
    """``ADAEDGE_PROCESSOR`` when set (checked), the detected class otherwise."""
    override = os.environ.get(ENV, "").strip()
    if override:
        if override not in PROCESSORS:
            raise UsageError(f"{ENV}={override[:40]!r} is not a processor class; use one of "
                             f"{', '.join(PROCESSORS)} (or unset it to detect the processor)")
        return override
    return detected_class()


__all__ = ["ENV", "detected_class", "processor_class"]
