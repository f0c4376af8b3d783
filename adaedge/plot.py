"""Small plots drawn with OpenCV (a dependency already), written as PNG: no plotting library needed.

:func:`budget_curve` draws top-1 against mean GFLOPs per clip for an exit calibration: each stage
when every clip stops there (grey squares) and each budget's solution (blue dots, joined).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

import numpy as np

from .errors import require

W, H, MARGIN = 720, 480, 70


def _scale(values: Sequence[float], lo_px: int, hi_px: int) -> Tuple[float, float, Any]:
    lo, hi = float(min(values)), float(max(values))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
    pad = 0.06 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    return lo, hi, lambda v: int(round(lo_px + (float(v) - lo) / (hi - lo) * (hi_px - lo_px)))


def line_plot(path: Union[str, Path], series: List[Tuple[str, Sequence[float], Sequence[float],
                                                          Tuple[int, int, int], bool]],
              title: str, xlabel: str, ylabel: str) -> Path:
    """Draw ``(label, xs, ys, bgr colour, joined)`` series on shared axes and save a PNG."""
    require("cv2", "plotting", "demo")
    import cv2
    img = np.full((H, W, 3), 255, np.uint8)
    xs_all = [x for s in series for x in s[1]]
    ys_all = [y for s in series for y in s[2]]
    x_lo, x_hi, fx = _scale(xs_all, MARGIN, W - 30)
    y_lo, y_hi, fy = _scale(ys_all, H - MARGIN, 40)
    cv2.rectangle(img, (MARGIN, 40), (W - 30, H - MARGIN), (0, 0, 0), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i in range(5):
        xv = x_lo + (x_hi - x_lo) * i / 4
        yv = y_lo + (y_hi - y_lo) * i / 4
        cv2.putText(img, f"{xv:.4g}", (fx(xv) - 20, H - MARGIN + 18), font, 0.4, (0, 0, 0), 1)
        cv2.putText(img, f"{yv:.3f}", (5, fy(yv) + 4), font, 0.4, (0, 0, 0), 1)
        cv2.line(img, (fx(xv), H - MARGIN), (fx(xv), H - MARGIN + 4), (0, 0, 0), 1)
        cv2.line(img, (MARGIN - 4, fy(yv)), (MARGIN, fy(yv)), (0, 0, 0), 1)
    cv2.putText(img, title, (MARGIN, 25), font, 0.55, (0, 0, 0), 1)
    cv2.putText(img, xlabel, (W // 2 - 60, H - 20), font, 0.5, (0, 0, 0), 1)
    cv2.putText(img, ylabel, (5, 30), font, 0.45, (0, 0, 0), 1)
    for k, (label, xs, ys, colour, joined) in enumerate(series):
        pts = [(fx(x), fy(y)) for x, y in zip(xs, ys)]
        if joined and len(pts) > 1:
            cv2.polylines(img, [np.asarray(pts, np.int32)], False, colour, 2)
        for p in pts:
            if joined:
                cv2.circle(img, p, 5, colour, -1)
            else:
                cv2.rectangle(img, (p[0] - 4, p[1] - 4), (p[0] + 4, p[1] + 4), colour, -1)
        cv2.putText(img, label, (W - 260, 60 + 20 * k), font, 0.45, colour, 1)
    out = Path(path)
    if not cv2.imwrite(str(out), img):
        raise OSError(f"cannot write {out}")
    return out


def budget_curve(report: Any, path: Union[str, Path]) -> Path:
    """Top-1 against GFLOPs of an exit calibration report (:mod:`adaedge.calibration.exits`)."""
    sols = sorted(report.solutions, key=lambda s: s.gflops)
    return line_plot(path, [
        ("each stage, every clip", report.stage_gflops, report.stage_accuracy, (150, 150, 150),
         False),
        ("calibrated budgets", [s.gflops for s in sols], [s.accuracy for s in sols],
         (200, 90, 20), True)],
        f"exits, criterion {report.criterion}, {report.clips} clips", "mean GFLOPs per clip",
        "top-1")
