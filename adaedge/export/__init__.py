"""Cut a dynamic network into static ONNX pieces and write them as a bundle.

>>> from adaedge import models, export
>>> model = models.create("vared_r2plus1d_18", num_classes=5, width_mult=0.125)
>>> export.export(model, "bundle/", frames=4, size=32)   # doctest: +SKIP

:func:`export` finds the model's family in the registry (:mod:`adaedge.models`), calls its exporter
(which returns :class:`~.parts.Parts`: pieces and a program), and writes the bundle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import onnx

from .. import __version__
from ..bundle.paths import current_umask
from ..bundle import (MANIFEST, Constants, Manifest, Piece, TensorSpec, sha256_file,
                      write_manifest)
from ..bundle.folder import value_dtype, value_shape
from ..bundle.operators import MAX_VALUES
from ..errors import ExportError
from ..models import family_of, model_config, model_name
from ..models.registry import KINETICS_MEAN, KINETICS_STD
from ..progress import Progress
from .flops import count_flops
from .parts import Parts
from .replace import (hold_temporary, old_bundle_files, remove_stale_temporaries,
                      replace_bundle, terminate_as_interrupt)


def _warn_non_finite(model: Any) -> None:
    """NaN or infinite weights export (a bundle can carry them) but every clip would score NaN:
    say which tensors hold them."""
    import warnings

    import torch
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        warnings.warn(f"{len(bad)} weight tensors hold NaN or infinite values ({', '.join(bad[:3])}"
                      f"{', ...' if len(bad) > 3 else ''}): the bundle will score NaN",
                      RuntimeWarning, stacklevel=3)


def _prepare_destination(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            if not (out / MANIFEST).is_file():
                raise ExportError(f"{out} is a non-empty folder that is not a bundle; "
                                  "choose an empty or new folder")
            old_bundle_files(out)           # refuses a manifest that is not an adaedge bundle's
            if not overwrite:
                raise ExportError(f"{out} already holds a bundle; pass overwrite=True "
                                  "(--overwrite) to replace it")


def _write(parts: Parts, root: Path, model: Dict[str, Any], input_spec: Dict[str, Any],
           progress: Progress = None) -> Manifest:
    """Write the pieces, constants and manifest of ``parts`` into the folder ``root``."""
    (root / "graphs").mkdir()
    specs: Dict[str, Piece] = {}
    total = len(parts.pieces)
    for i, (pname, proto) in enumerate(parts.pieces.items()):
        if progress:
            progress(i, total, f"writing {pname}")
        rel = f"graphs/{pname}.onnx"
        path = root / rel
        onnx.save(proto, str(path))
        specs[pname] = Piece(
            name=pname, file=rel, sha256=sha256_file(path), flops=count_flops(proto),
            inputs=[TensorSpec(v.name, value_shape(v), value_dtype(v)) for v in proto.graph.input],
            outputs=[TensorSpec(v.name, value_shape(v), value_dtype(v))
                     for v in proto.graph.output])
    constants = None
    if parts.constants:
        arrays = {k: np.ascontiguousarray(v) for k, v in parts.constants.items()}
        np.savez(root / "graphs" / "constants.npz", **arrays)  # type: ignore[arg-type]
        constants = Constants("graphs/constants.npz", sha256_file(root / "graphs" / "constants.npz"),
                              [TensorSpec(k, list(v.shape), str(v.dtype)) for k, v in arrays.items()])
    if progress:
        progress(total, total, "written")
    manifest = Manifest(model=model, input=input_spec, output=parts.output, pieces=specs,
                        program=list(parts.program.steps), policies=parts.policies,
                        state=list(parts.state), constants=constants, stream=parts.stream,
                        adaedge_version=__version__)
    write_manifest(root, manifest)
    return manifest


def export(model: Any, out: Union[str, os.PathLike], frames: Optional[int] = None,
           size: Optional[int] = None, *, execution: Optional[str] = None,
           labels: Optional[Sequence[str]] = None, mean: Sequence[float] = KINETICS_MEAN,
           std: Sequence[float] = KINETICS_STD, weights: Optional[Dict[str, Any]] = None,
           overwrite: bool = False, progress: Progress = None,
           options: Optional[Mapping[str, Any]] = None) -> Manifest:
    """Write ``model`` as a bundle at ``out``; returns the manifest.

    ``frames`` and ``size`` fix the static input (default: the model's config). ``execution``
    picks the family's form and ``options`` its other choices (``adaedge models`` and the
    family's registry entry list them; default: the family's first execution). The bundle is
    built in a temporary folder beside ``out`` and moved into place only when complete, so a
    failed export leaves nothing half-written, and an existing bundle is replaced only with
    ``overwrite``.
    """
    name = model_name(model)
    fam = family_of(name)
    for what, value in (("frames", frames), ("size", size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 1 <= value <= 4096):
            raise ExportError(f"{what} must be an integer from 1 to 4096, not {value!r} "
                              "(leave it out for the model's own)")
    frames = int(frames or getattr(model, "frames"))
    size = int(size or getattr(model, "size"))
    if frames < 1 or size < 8:
        raise ExportError(f"frames must be >= 1 and size >= 8, got frames={frames} size={size}")
    if 3 * frames * size * size > MAX_VALUES:       # before the model runs at that size
        raise ExportError(f"a clip of {frames}x{size}x{size} holds {3 * frames * size * size} "
                          f"values, more than a bundle's {MAX_VALUES} per tensor")
    num_classes = getattr(model, "num_classes", None)
    if labels is not None and num_classes is not None and len(labels) != num_classes:
        raise ExportError(f"{len(labels)} labels for a model with {num_classes} classes")
    if not os.fspath(out):
        raise ExportError("the bundle folder to write (--out) is empty; name a folder")
    out = Path(out)
    _prepare_destination(out, overwrite)
    _warn_non_finite(model)
    try:
        execution = fam.check_execution(execution)
        chosen = fam.check_options(dict(options or {}))
        parts: Parts = fam.export_function()(model, frames, size, execution, progress, **chosen)
    except (ValueError, TypeError) as e:     # the family's own refusals, and bad options
        if isinstance(e, ExportError):
            raise
        raise ExportError(str(e)) from None
    info = {"name": name, "family": fam.name, "config": model_config(model),
            "execution": execution, "options": chosen,
            "weights": weights or {"source": "unknown"}}
    if fam.branch_titles:
        info["branch_titles"] = dict(fam.branch_titles)
    input_spec = {"name": "clip", "layout": "NCTHW", "channels": 3,
                  "frames": 1 if parts.stream else frames, "size": [size, size],
                  "dtype": "float32", "mean": [float(m) for m in mean],
                  "std": [float(s) for s in std],
                  "labels": list(labels) if labels is not None else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    # the old bundle stays whole until the new one is complete; only what it lists is replaced
    remove_stale_temporaries(out)      # what killed exports to the same folder left
    with terminate_as_interrupt():
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        held = -1
        try:
            os.chmod(tmp, 0o777 & ~current_umask())    # mkdtemp's 0700 would hide the bundle
            held = hold_temporary(tmp)
            manifest = _write(parts, tmp, info, input_spec, progress)
            replace_bundle(tmp, out, overwrite)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and not e.filename:   # a full disk: name the folder
                raise OSError(e.errno, e.strerror or str(e), str(out)) from None
            raise
        finally:
            if held >= 0:
                os.close(held)
    return manifest


__all__ = ["export", "ExportError", "Parts", "count_flops", "KINETICS_MEAN", "KINETICS_STD"]
