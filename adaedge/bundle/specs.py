"""The manifest's leaf records (tensor specs, pieces, constants) and the checks every field passes.

Every check raises :class:`~adaedge.errors.BundleError` naming the field, so a hostile or
damaged manifest is refused with one clear line before anything is sized from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Union

from ..errors import BundleError
from .vocabulary import DTYPES

Dim = Union[int, str]


def need(obj: Mapping[str, Any], key: str, kind: Any, where: str) -> Any:
    """``obj[key]``, which must exist and be of ``kind`` (a bool is never an int)."""
    if not isinstance(obj, Mapping) or key not in obj:
        raise BundleError(f"manifest: {where} lacks {key!r}")
    val = obj[key]
    if kind is int and isinstance(val, bool):
        raise BundleError(f"manifest: {where}.{key} must be an integer")
    if not isinstance(val, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BundleError(f"manifest: {where}.{key} must be {names}, got {type(val).__name__}")
    return val


NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-+:@[]")


def name(val: Any, where: str) -> str:
    """A non-empty identifier of at most 200 characters: letters, digits and ``_ . - + : @ [ ]``,
    not starting with a dot. Piece, step and value names are identifiers, never paths: tools
    build file names from them (the engine caches), so a slash, a backslash, ``..`` or a leading
    dot is refused here, once, for every name a manifest holds."""
    if not isinstance(val, str) or not val or len(val) > 200:
        raise BundleError(f"manifest: {where} must be a non-empty name, got {val!r}")
    if val.startswith(".") or not NAME_CHARS.issuperset(val):
        raise BundleError(f"manifest: {where} {val[:60]!r} is not a name (letters, digits and "
                          "_ . - + : @ [ ], not starting with a dot): names are never paths")
    return val


def label(val: Any, where: str) -> str:
    """A non-empty printable label of at most 200 characters (a branch's name: shown, never
    used to name a file)."""
    if not isinstance(val, str) or not val or len(val) > 200 or not val.isprintable():
        raise BundleError(f"manifest: {where} must be a non-empty printable label, got {val!r}")
    return val


def digest(obj: Mapping[str, Any], where: str) -> str:
    sha = need(obj, "sha256", str, where)
    if len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha):
        raise BundleError(f"manifest: {where}.sha256 is not a SHA-256 hex digest")
    return sha


def io_map(obj: Any, where: str, known: Sequence[str]) -> Dict[str, str]:
    """A step's {piece tensor name: program value name}; every key must be one of ``known``."""
    if not isinstance(obj, dict) or not obj:
        raise BundleError(f"manifest: {where} must map the piece's tensor names to values")
    for k, v in obj.items():
        name(v, f"{where}[{k!r}]")
        if k not in known:
            raise BundleError(f"manifest: {where} names {k!r}, which the piece does not have "
                              f"(it has {', '.join(known)})")
    return dict(obj)


MAX_RANK = 8
MAX_ELEMENTS = 1 << 28    # per clip: 1 GiB of float32; a video network's inputs and state are far less


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: List[Dim]
    dtype: str

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "TensorSpec":
        n = name(need(obj, "name", str, where), f"{where}.name")
        shape = need(obj, "shape", list, where)
        if len(shape) > MAX_RANK:
            raise BundleError(f"manifest: {where}.shape has {len(shape)} dimensions (at most "
                              f"{MAX_RANK})")
        elements = 1
        for d in shape:
            if isinstance(d, bool) or not (isinstance(d, str) or (isinstance(d, int) and d >= 0)):
                raise BundleError(f"manifest: {where}.shape has a bad dimension {d!r}")
            if isinstance(d, str) and not 0 < len(d) <= 64:
                raise BundleError(f"manifest: {where}.shape has a bad symbolic dimension")
            elements *= d if isinstance(d, int) else 1
        if elements > MAX_ELEMENTS:       # sized before anything is allocated from it
            raise BundleError(f"manifest: {where}.shape {shape} holds {elements} values per "
                              f"clip, more than {MAX_ELEMENTS}")
        dtype = need(obj, "dtype", str, where)
        if dtype not in DTYPES:
            raise BundleError(f"manifest: {where}.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return cls(n, list(shape), dtype)


@dataclass(frozen=True)
class Piece:
    name: str
    file: str
    sha256: str
    flops: int
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]

    @property
    def input_names(self) -> List[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> List[str]:
        return [t.name for t in self.outputs]

    def to_json(self) -> Dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "flops": self.flops,
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, pname: Any, p: Any, where: str) -> "Piece":
        name(pname, where)
        file = need(p, "file", str, where)
        if not file.endswith(".onnx"):
            raise BundleError(f"manifest: {where}.file {file!r} is not an .onnx file")
        sha = digest(p, where)
        flops = need(p, "flops", int, where)
        if flops < 0:
            raise BundleError(f"manifest: {where}.flops must not be negative")
        ins = [TensorSpec.from_json(t, f"{where}.inputs[{i}]")
               for i, t in enumerate(need(p, "inputs", list, where))]
        outs = [TensorSpec.from_json(t, f"{where}.outputs[{i}]")
                for i, t in enumerate(need(p, "outputs", list, where))]
        return cls(pname, file, sha, flops, ins, outs)


@dataclass(frozen=True)
class Constants:
    file: str
    sha256: str
    tensors: List[TensorSpec]

    def to_json(self) -> Dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256,
                "tensors": [t.to_json() for t in self.tensors]}

    @classmethod
    def from_json(cls, c: Any) -> "Constants":
        file = need(c, "file", str, "constants")
        if not file.endswith(".npz"):
            raise BundleError(f"manifest: constants.file {file!r} is not an .npz file")
        sha = digest(c, "constants")
        tensors = [TensorSpec.from_json(t, f"constants.tensors[{i}]")
                   for i, t in enumerate(need(c, "tensors", list, "constants"))]
        for t in tensors:
            if not all(isinstance(d, int) for d in t.shape):
                raise BundleError(f"manifest: constant {t.name!r} must have a static shape")
        return cls(file, sha, tensors)


__all__ = ["Dim", "TensorSpec", "Piece", "Constants", "need", "name", "digest", "io_map"]
