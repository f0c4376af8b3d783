"""An opened bundle folder: its validated manifest, and its files read safely.

Every file is reached through :func:`~adaedge.bundle.paths.safe_join` (inside the bundle, never
through a link that leaves it) and hash-checked against the manifest before anything uses it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Union

from ..errors import BundleError
from .int8 import check_precision
from .manifest import Manifest, parse_manifest
from .operators import check_operators, check_shapes
from .program import Exit
from .paths import safe_join, sha256_file, write_atomic
from .vocabulary import ENGINES, MANIFEST


class Bundle:
    """An opened bundle folder with a validated manifest.

    ``precision`` is ``"fp32"`` for the bundle as exported, ``"int8"`` for the view
    :meth:`with_precision` gives (``base`` is then the bundle it views).
    """

    def __init__(self, root: Union[str, Path], manifest: Manifest, precision: str = "fp32",
                 base: Optional["Bundle"] = None) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.precision = precision
        self.base = base if base is not None else self
        self._verified: Dict[str, Path] = {}
        self._graphs_checked: Set[str] = set()

    def with_precision(self, precision: str) -> "Bundle":
        """The bundle as a backend runs it at ``precision``: ``"fp32"`` is the bundle itself;
        ``"int8"`` puts each int8 piece's file in place of the float one (same I/O and FLOPs),
        gives the exits the thresholds solved on the int8 forms, and its own engine caches."""
        check_precision(precision)
        base = self.base
        if precision == "fp32":
            return base
        forms = base.manifest.int8
        if forms is None:
            raise BundleError(f"bundle {self.root} has no int8 pieces; write them with 'adaedge "
                              f"calibrate int8 {self.root} --data ...'")
        m = copy.copy(base.manifest)
        m.pieces = {n: (dataclasses.replace(p, file=forms.pieces[n].file,
                                            sha256=forms.pieces[n].sha256)
                        if n in forms.pieces else p) for n, p in base.manifest.pieces.items()}
        m.program = [dataclasses.replace(s, thresholds=dict(forms.thresholds.get(s.name, {})))
                     if isinstance(s, Exit) else s for s in base.manifest.program]
        return Bundle(base.root, m, "int8", base)

    def piece_path(self, name: str, check_hash: bool = True) -> Path:
        """The piece's file inside the bundle, present and matching its recorded SHA-256."""
        if name in self._verified:
            return self._verified[name]
        piece = self.manifest.pieces[name]
        path = self._file(piece.file, piece.sha256 if check_hash else None, f"piece {name!r}")
        self._verified[name] = path
        return path

    def piece_bytes(self, name: str) -> bytes:
        """The piece's ONNX bytes, read once and checked against the manifest's SHA-256 (the
        bytes handed on are the bytes hashed)."""
        piece = self.manifest.pieces[name]
        path = self._file(piece.file, None, f"piece {name!r}")
        check_size(path, MAX_PIECE_BYTES, f"bundle {self.root}: piece {name!r}")
        data = path.read_bytes()
        self._check_digest(hashlib.sha256(data).hexdigest(), piece.sha256, f"piece {name!r}",
                           piece.file)
        if name not in self._graphs_checked:     # before any backend sees it
            what = f"bundle {self.root}: piece {name!r}"
            model = parse_onnx(data, what)
            check_operators(model, what)
            check_io(model, piece, f"piece {name!r}")
            check_shapes(model, what)
            self._graphs_checked.add(name)
        return data

    def piece_model(self, name: str) -> Any:
        """The piece as a checked, self-contained ``onnx.ModelProto`` (external data refused),
        whose inputs and outputs are the ones the manifest states."""
        model = parse_onnx(self.piece_bytes(name), f"bundle {self.root}: piece {name!r}")
        check_io(model, self.manifest.pieces[name], f"piece {name!r}")
        return model

    def _file(self, relative: str, sha256: Optional[str], what: str) -> Path:
        """A file of the bundle, inside it, present and (given ``sha256``) matching its hash."""
        path = safe_join(self.root, relative)
        if not path.is_file():
            raise BundleError(f"bundle {self.root}: {what} is missing its file {relative}")
        if sha256 is not None:
            check_size(path, MAX_PIECE_BYTES, f"bundle {self.root}: {what}")
            self._check_digest(sha256_file(path), sha256, what, relative)
        return path

    def _check_digest(self, digest: str, sha256: str, what: str, relative: str) -> None:
        if digest != sha256:
            raise BundleError(f"bundle {self.root}: {what} ({relative}) is corrupt: SHA-256 "
                              f"{digest[:12]}… does not match the manifest's {sha256[:12]}…")

    def verify_files(self) -> None:
        for name in self.manifest.pieces:
            self.piece_path(name)
        self.constants()

    def constants(self) -> Dict[str, Any]:
        """The shared constants as NumPy arrays, hash-checked and matched against their specs."""
        import numpy as np
        spec = self.manifest.constants
        if spec is None:
            return {}
        path = self._file(spec.file, None, "constants file")
        out: Dict[str, Any] = {}
        try:
            self._check_constant_sizes(path, spec)     # from the file system and the headers
            self._check_digest(sha256_file(path), spec.sha256, "constants file", spec.file)
            with np.load(path, allow_pickle=False) as data:
                for t in spec.tensors:
                    if t.name not in data.files:
                        raise BundleError(f"bundle {self.root}: constants file lacks {t.name!r}")
                    arr = data[t.name]
                    if list(arr.shape) != list(t.shape) or str(arr.dtype) != t.dtype:
                        raise BundleError(f"bundle {self.root}: constant {t.name!r} is "
                                          f"{arr.dtype}{list(arr.shape)}, the manifest says "
                                          f"{t.dtype}{list(t.shape)}")
                    out[t.name] = np.ascontiguousarray(arr)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"bundle {self.root}: cannot read constants {spec.file}: {e}") from None
        return out

    def _check_constant_sizes(self, path: Path, spec: Any) -> None:
        """The constants file, each array's size in the zip and its .npy header must be the
        manifest's before anything is decompressed: a few MB of deflated zeros can claim
        gigabytes."""
        import numpy as np
        from numpy.lib import format as npy
        where = f"bundle {self.root}: constants {spec.file}"
        expected = {t.name: int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
                    for t in spec.tensors}
        header = 1 << 16                    # an .npy header is far smaller
        check_size(path, sum(expected.values()) + header * (len(expected) + 1), where)
        with zipfile.ZipFile(path) as zf:
            for t in spec.tensors:
                try:
                    info = zf.getinfo(f"{t.name}.npy")
                except KeyError:
                    raise BundleError(f"{where} lacks {t.name!r}") from None
                if info.file_size > expected[t.name] + header:
                    raise BundleError(f"{where}: {t.name!r} unpacks to {info.file_size} bytes, "
                                      f"but the manifest's {t.dtype}{list(t.shape)} is "
                                      f"{expected[t.name]}")
                with zf.open(info) as f:
                    version = npy.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = npy.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = npy.read_array_header_2_0(f)
                    else:
                        raise BundleError(f"{where}: {t.name!r} has an .npy header of version "
                                          f"{version}")
                if list(shape) != list(t.shape) or str(dtype) != t.dtype:
                    raise BundleError(f"bundle {self.root}: constant {t.name!r} is "
                                      f"{dtype}{list(shape)}, the manifest says "
                                      f"{t.dtype}{list(t.shape)}")

    def engine_dir(self, key: str) -> Path:
        """A backend's cache folder (each precision has its own)."""
        suffix = "" if self.precision == "fp32" else f"-{self.precision}"
        return safe_join(self.root, f"{ENGINES}/{key}{suffix}")


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph holds: initializers (sparse too), Constant values and tensor
    attributes, in its subgraphs (If, Loop, Scan bodies) as well."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node.attribute)


def _attribute_tensors(attributes: Any) -> Iterator[Any]:
    for attr in attributes:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sp in attr.sparse_tensors:
            yield sp.values
            yield sp.indices
        if attr.HasField("g"):
            yield from _tensors(attr.g)
        for g in attr.graphs:
            yield from _tensors(g)


def parse_onnx(data: bytes, what: str) -> Any:
    """ONNX bytes as a ``ModelProto``, refused unless every tensor is stored inside them.

    A tensor kept in an external file names a path that a runtime would open (some ONNX Runtime
    versions follow it out of the model's folder); adaedge pieces never use one, so any is
    refused, in the graph, its subgraphs and its functions alike.
    """
    import onnx
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:   # protobuf's DecodeError and friends
        raise BundleError(f"{what} is not an ONNX model: {e}") from None
    tensors = list(_tensors(model.graph))
    for fn in model.functions:
        for node in fn.node:
            tensors.extend(_attribute_tensors(node.attribute))
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            raise BundleError(f"{what} keeps tensor {t.name!r} in an external file; adaedge "
                              "pieces are self-contained")
    return model


def value_shape(v: Any) -> List[Union[int, str]]:
    """An ONNX value's dimensions: ints where static, the symbol's name (or ``"?"``) where not;
    the manifest's ``shape`` of a tensor."""
    return [int(d.dim_value) if d.HasField("dim_value") else
            (d.dim_param if d.HasField("dim_param") else "?") for d in v.type.tensor_type.shape.dim]


def value_dtype(v: Any) -> str:
    """An ONNX value's element type as the manifest names it (``float32``, ``int64``, ...)."""
    import onnx
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
    except Exception:            # undefined or not a NumPy type
        return "unknown"


def check_io(model: Any, piece: Any, what: str) -> None:
    """The graph's inputs and outputs (names, dtypes, static dimensions) must be the manifest's,
    as the exporter wrote them from the graph (:func:`value_shape`, :func:`value_dtype`): a
    piece replaced by a graph of other shapes is named here, not deep inside a backend."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    for side, values, specs in (("inputs", [v for v in graph.input if v.name not in inits],
                                 piece.inputs), ("outputs", list(graph.output), piece.outputs)):
        have = {v.name: v for v in values}
        if set(have) != {t.name for t in specs}:
            raise BundleError(f"{what}: its graph's {side} {sorted(have)} are not the manifest's "
                              f"{sorted(t.name for t in specs)}")
        for spec in specs:
            dtype, dims = value_dtype(have[spec.name]), value_shape(have[spec.name])
            if dtype != spec.dtype or len(dims) != len(spec.shape) or any(
                    isinstance(m, int) and isinstance(g, int) and g != m
                    for g, m in zip(dims, spec.shape)):
                raise BundleError(f"{what}: {side[:-1]} {spec.name!r} is {dtype} "
                                  f"{[g if isinstance(g, int) else '?' for g in dims]} in its "
                                  f"graph but {spec.dtype} {spec.shape} in the manifest")


def load(root: Union[str, Path]) -> Bundle:
    """Open and validate a bundle folder (files are hash-checked when first used)."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle {root} is not a folder")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not an adaedge bundle: it has no {MANIFEST}")
    if mpath.is_symlink():
        safe_join(root, MANIFEST)        # a manifest linked from outside the bundle is refused
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath} is {mpath.stat().st_size} bytes, more than a manifest's "
                          f"{MAX_MANIFEST_BYTES}")
    try:
        with open(mpath, "r", encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_no_duplicate_keys, parse_int=_bounded_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON: {e}") from None
    except RecursionError:
        raise BundleError(f"{mpath} is nested too deeply to be a manifest") from None
    return Bundle(root, parse_manifest(data))


MAX_MANIFEST_BYTES = 64 << 20
MAX_PIECE_BYTES = 2 << 30        # protobuf's own limit: no ONNX file of a piece is larger


def check_size(path: Path, limit: int, what: str) -> None:
    """Refuse a file over ``limit`` bytes from the file system, before reading or hashing it
    (a sparse file of 30 GB costs nothing to make and minutes to read)."""
    size = path.stat().st_size
    if size > limit:
        raise BundleError(f"{what} ({path.name}) is {size} bytes, more than the {limit} any "
                          "adaedge file of its kind holds")


def _bounded_int(text: str) -> int:
    """JSON integers of at most 19 digits (int64): a 5000-digit one is refused as such, not by
    Python's limit on converting long digit strings."""
    if len(text.lstrip("-")) > 19:
        raise BundleError(f"manifest: an integer of {len(text.lstrip('-'))} digits; no field "
                          "of a manifest holds more than 19")
    return int(text)


def _no_duplicate_keys(pairs: "list[tuple[str, Any]]") -> Dict[str, Any]:
    """JSON objects with a key twice (two pieces or switches of one name) are refused: the last
    would silently win."""
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise BundleError(f"manifest: the key {key!r} appears twice in one object")
        out[key] = value
    return out


def write_manifest(root: Union[str, Path], manifest: Manifest) -> Path:
    """Validate and write ``manifest.json`` atomically."""
    data = manifest.to_json()
    parse_manifest(json.loads(json.dumps(data)))  # what we write must read back
    return write_atomic(Path(root) / MANIFEST, json.dumps(data, indent=1) + "\n")


__all__ = ["Bundle", "check_io", "load", "write_manifest", "parse_onnx", "value_dtype",
           "value_shape"]
