"""Cut a dynamic network into static ONNX pieces and write them as a bundle.

>>> from adaedge import models, export
>>> model = models.create("vared_r2plus1d_18", num_classes=5, width_mult=0.125)
>>> export.export(model, "bundle/", frames=4, size=32)   # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import onnx

from .. import __version__
from ..bundle import (MANIFEST, Constants, Manifest, Piece, TensorSpec, sha256_file,
                      write_manifest)
from ..models import family, model_config, model_name
from .flops import count_flops
from .graph import value_dtype, value_shape

# Kinetics statistics, the usual normalisation of video backbones (torchvision's video models).
KINETICS_MEAN = [0.43216, 0.394666, 0.37645]
KINETICS_STD = [0.22803, 0.22145, 0.216989]

Progress = Optional[Callable[[int, int, str], None]]
EXECUTIONS = {"vared": ("dynamic", "masked"), "tada": ("calibrated", "official", "uncalibrated"),
              "adafocus": ("stages",), "adafuse": ("dense", "gathered", "plain")}


class ExportError(ValueError):
    """An export that cannot be done as asked (bad destination, unknown family, bad sizes)."""


def _family_pieces(fam: str, model: Any, frames: int, size: int, execution: Optional[str],
                   progress: Progress, options: Mapping[str, Any]) -> Any:
    if fam == "vared":
        from .vared import export_vared
        if options:
            raise ExportError(f"VA-RED² export takes no options ({', '.join(options)})")
        return export_vared(model, frames, size, execution or "dynamic", progress)
    if fam == "adafocus":
        from .adafocus import export_adafocus
        if options:
            raise ExportError(f"AdaFocusV3 export takes no options ({', '.join(options)})")
        return export_adafocus(model, frames, size, execution, progress)
    if fam == "tada":
        from .tada import export_tada
        return export_tada(model, frames, size, execution, progress, **options)
    if fam == "adafuse":
        from .adafuse import export_adafuse
        return export_adafuse(model, frames, size, execution, progress, **options)
    raise ExportError(f"no exporter for model family {fam!r}")


def _prepare_destination(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            if not (out / MANIFEST).is_file():
                raise ExportError(f"{out} is a non-empty folder that is not a bundle; "
                                  "choose an empty or new folder")
            if not overwrite:
                raise ExportError(f"{out} already holds a bundle; pass overwrite=True "
                                  "(--overwrite) to replace it")


def export(model: Any, out: Union[str, os.PathLike], frames: Optional[int] = None,
           size: Optional[int] = None, *, execution: Optional[str] = None,
           labels: Optional[Sequence[str]] = None, mean: Sequence[float] = KINETICS_MEAN,
           std: Sequence[float] = KINETICS_STD, weights: Optional[Dict[str, Any]] = None,
           overwrite: bool = False, progress: Progress = None,
           options: Optional[Mapping[str, Any]] = None) -> Manifest:
    """Write ``model`` as a bundle at ``out``; returns the manifest.

    ``frames`` and ``size`` fix the static input (default: the model's config). ``execution``
    picks the family's form (VA-RED²: ``dynamic`` or ``masked``; TAda2D: ``calibrated``,
    ``official`` or ``uncalibrated``; default: the first), ``options`` the family's other
    choices (TAda2D: ``routing``). The bundle is built
    in a temporary folder beside ``out`` and moved into place only when complete, so a failed
    export leaves nothing half-written, and an existing bundle is replaced only with ``overwrite``.
    """
    name = model_name(model)
    fam = family(name)
    frames = int(frames or getattr(model, "frames"))
    size = int(size or getattr(model, "size"))
    if frames < 1 or size < 8:
        raise ExportError(f"frames must be >= 1 and size >= 8, got frames={frames} size={size}")
    num_classes = getattr(model, "num_classes", None)
    if labels is not None and num_classes is not None and len(labels) != num_classes:
        raise ExportError(f"{len(labels)} labels for a model with {num_classes} classes")
    out = Path(out)
    _prepare_destination(out, overwrite)
    try:
        parts = _family_pieces(fam, model, frames, size, execution, progress,
                               dict(options or {}))
    except (ValueError, TypeError) as e:
        if isinstance(e, ExportError):
            raise
        raise ExportError(str(e)) from None
    pieces, program, policies, output = parts[:4]
    extras: Dict[str, Any] = parts[4] if len(parts) > 4 else {}
    stream = extras.get("stream")
    execution = execution or next(iter(EXECUTIONS[fam]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "graphs").mkdir()
        specs: Dict[str, Piece] = {}
        for pname, proto in pieces.items():
            rel = f"graphs/{pname}.onnx"
            path = tmp / rel
            onnx.save(proto, str(path))
            specs[pname] = Piece(
                name=pname, file=rel, sha256=sha256_file(path), flops=count_flops(proto),
                inputs=[TensorSpec(v.name, value_shape(v), value_dtype(v)) for v in proto.graph.input],
                outputs=[TensorSpec(v.name, value_shape(v), value_dtype(v))
                         for v in proto.graph.output])
        constants = None
        if extras.get("constants"):
            arrays = {k: np.ascontiguousarray(v) for k, v in extras["constants"].items()}
            np.savez(tmp / "graphs" / "constants.npz", **arrays)  # type: ignore[arg-type]
            constants = Constants("graphs/constants.npz",
                                  sha256_file(tmp / "graphs" / "constants.npz"),
                                  [TensorSpec(k, list(v.shape), str(v.dtype))
                                   for k, v in arrays.items()])
        manifest = Manifest(
            model={"name": name, "family": fam, "config": model_config(model),
                   "execution": execution, "options": dict(options or {}),
                   "weights": weights or {"source": "unknown"}},
            input={"name": "clip", "layout": "NCTHW", "channels": 3,
                   "frames": 1 if stream else frames,
                   "size": [size, size], "dtype": "float32", "mean": [float(m) for m in mean],
                   "std": [float(s) for s in std],
                   "labels": list(labels) if labels is not None else None},
            output=output, pieces=specs, program=program, policies=policies,
            state=list(extras.get("state", [])), constants=constants, stream=stream,
            adaedge_version=__version__)
        write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


__all__ = ["export", "ExportError", "count_flops", "KINETICS_MEAN", "KINETICS_STD"]

