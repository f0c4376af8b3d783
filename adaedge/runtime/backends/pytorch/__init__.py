"""The PyTorch backend: each piece as a ``torch.export`` program, replayed through CUDA graphs.

For users who have PyTorch but not TensorRT, and our way to measure the dispatch design on a GPU.
Each piece's ONNX (hash-checked by the bundle) is translated to torch ops
(:mod:`.onnx_torch`) and exported with ``torch.export``, with a dynamic batch where the piece has
one. On CUDA each (piece, input shapes) is captured once into a CUDA graph and replayed: a piece
then costs one graph launch, with no Python or per-kernel launch overhead. Values stay on the
device from piece to piece; gate decisions and scores come to the host.

Programs are built from the ONNX when a bundle is loaded, not read from files: ``torch.export``'s
file loader falls back to unrestricted unpickling, and a bundle is untrusted input.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ....bundle import Bundle
from ....errors import BackendUnavailable, BundleError, UsageError
from ....progress import Progress
from ...arrays import as_slice
from ..base import Backend, BackendOption


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailable(f"the torch backends need PyTorch ({e}); install it with "
                                 "'pip install torch'") from None
    return torch


class TorchArrays:
    """Row operations on torch tensors of one device (the runtime's values)."""

    def __init__(self, device: str) -> None:
        self.torch = _torch()
        self.device = self.torch.device(device)

    def _index(self, index: np.ndarray) -> Any:
        return self.torch.as_tensor(np.asarray(index, dtype=np.int64), device=self.device)

    def from_host(self, a: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def to_host(self, v: Any) -> np.ndarray:
        if isinstance(v, np.ndarray):
            return v
        return v.detach().cpu().numpy()

    def rows(self, v: Any, index: np.ndarray) -> Any:
        run = as_slice(index)
        return v[run] if run is not None else v.index_select(0, self._index(index))

    def scatter(self, parts: Sequence[Tuple[np.ndarray, Any]], n: int) -> Any:
        first = parts[0][1]
        out = self.torch.empty((n,) + tuple(first.shape[1:]), dtype=first.dtype,
                               device=first.device)
        for index, part in parts:
            out.index_copy_(0, self._index(index), part)
        return out

    def concat(self, parts: Sequence[Any]) -> Any:
        return self.torch.cat(list(parts))

    def put_rows(self, dst: Any, index: np.ndarray, v: Any) -> Any:
        out = dst.clone()
        out.index_copy_(0, self._index(index), v)
        return out

    def shape(self, v: Any) -> Tuple[int, ...]:
        return tuple(v.shape)


def export_piece(model: Any, batch_dim: Sequence[bool], example: Sequence[Any]) -> Tuple[Any, bool]:
    """``torch.export`` a translated piece; the batch is dynamic for the inputs that have one.

    ``torch.export`` specialises an example dimension of size 1 to the constant 1 ("0/1
    specialisation"), so a batch-1 example is traced as a batch of 2 (its rows repeated): the
    program then takes any batch from 1 to 65536.

    Returns ``(callable, dynamic)``: a program whose batch is dynamic when the export allows it,
    otherwise (with a warning that says why) one exported for ``example``'s shapes.
    """
    torch = _torch()
    n = torch.export.Dim("batch", min=1, max=1 << 16)
    shapes = tuple({0: n} if b else None for b in batch_dim)
    if any(batch_dim):
        traced = [a.repeat(2, *([1] * (a.dim() - 1))) if b and a.shape[0] == 1 else a
                  for a, b in zip(example, batch_dim)]
        try:
            program = torch.export.export(model, tuple(traced), dynamic_shapes=(shapes,),
                                          strict=False)
            return program.module(), True
        except Exception as e:  # a piece that specialises its batch: export it for this shape
            warnings.warn(f"a piece exports with a static batch ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); each batch size gets "
                          "its own program", stacklevel=2)
    program = torch.export.export(model, tuple(example), strict=False)
    return program.module(), False


def exact_float32(torch: Any) -> None:
    """Convolutions and matrix products in exact float32 on CUDA: cuDNN's TF32 is on by default
    (the reference's tolerance, 1e-4, would not hold). The legacy flag is the one to set: setting
    only the newer ``fp32_precision`` makes ``torch.export`` fail in torch 2.9-2.13."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def batch_bucket(n: int) -> int:
    """The batch a group of ``n`` rows runs at on CUDA graphs: the next power of two, so that
    grouping a batch by branch captures at most log2(max batch) + 1 graphs per piece."""
    return 1 << max(0, (n - 1).bit_length())


class TorchExecutable:
    """One piece: its exported program, and on CUDA one captured graph per input shape."""

    def __init__(self, backend: "TorchBackend", model: Any, input_names: List[str],
                 output_names: List[str], batch_dim: List[bool]) -> None:
        self.backend = backend
        self.model = model
        self.input_names = input_names
        self.output_names = output_names
        self.batch_dim = batch_dim
        self._programs: Dict[Any, Callable[..., Any]] = {}
        self._graphs: "OrderedDict[Any, Tuple[Any, List[Any], List[Any]]]" = OrderedDict()
        self.dynamic: Optional[bool] = None

    def _program(self, args: List[Any]) -> Callable[..., Any]:
        key = None if self.dynamic else tuple(tuple(a.shape) for a in args)
        fn = self._programs.get(key)
        if fn is None:
            if not self.backend.export:
                fn = self.model
                self.dynamic = True
            else:
                fn, dynamic = export_piece(self.model, self.batch_dim, args)
                self.dynamic = dynamic
                key = None if dynamic else key
            self._programs[key] = fn
        return fn

    def _graph(self, fn: Callable[..., Any], args: List[Any]) -> Tuple[Any, List[Any], List[Any]]:
        """The captured graph for these input shapes (least recently used ones beyond the
        backend's ``graph_cache`` limit are reset, which frees their private memory pools)."""
        torch = self.backend.torch
        key = tuple(tuple(a.shape) for a in args)
        entry = self._graphs.pop(key, None)
        if entry is None:
            static_in = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):      # warm up kernels and allocator before capture
                    fn(*static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = list(fn(*static_in))
            entry = (graph, static_in, static_out)
        self._graphs[key] = entry                       # most recently used last
        while len(self._graphs) > self.backend.graph_cache:
            _, (old, _, _) = self._graphs.popitem(last=False)
            torch.cuda.current_stream().synchronize()
            old.reset()
        return entry

    def close(self) -> None:
        """Reset every captured graph (their memory returns to PyTorch's allocator)."""
        for graph, _, _ in self._graphs.values():
            graph.reset()
        self._graphs.clear()

    def _padded(self, args: List[Any]) -> Tuple[List[Any], int, int]:
        """Batched inputs padded with zero rows to the batch's bucket (rows are independent in
        every piece, so padding never changes the real rows): the inputs, the real row count
        and the padded one (equal when nothing was padded)."""
        rows = {a.shape[0] for a, b in zip(args, self.batch_dim) if b}
        if len(rows) != 1:
            return args, 0, 0
        n = rows.pop()
        size = batch_bucket(n)
        if size == n:
            return args, n, n
        torch = self.backend.torch
        return [torch.cat([a, a.new_zeros((size - n,) + tuple(a.shape[1:]))]) if b else a
                for a, b in zip(args, self.batch_dim)], n, size

    def run(self, feeds: Mapping[str, Any]) -> Dict[str, Any]:
        torch = self.backend.torch
        try:
            args = [feeds[n] for n in self.input_names]
        except KeyError as e:
            raise BundleError(f"piece input {e} is not fed") from None
        with torch.inference_mode():
            fn = self._program(args)
            if self.backend.cuda_graphs:
                args, real, size = self._padded(args) if self.dynamic else (args, 0, 0)
                graph, static_in, static_out = self._graph(fn, args)
                for s, a in zip(static_in, args):
                    s.copy_(a)
                graph.replay()
                # the next replay overwrites the graph's outputs: hand out copies (of the real
                # rows, where the batch was padded)
                outs = [(o[:real] if real != size and o.dim() and o.shape[0] == size else o)
                        .clone() for o in static_out]
            else:
                outs = list(fn(*args))
        return dict(zip(self.output_names, outs))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


class TorchBackend(Backend):
    """Pieces as ``torch.export`` programs on a PyTorch device; CUDA graphs on CUDA.

    The registry's ``torch-cuda`` and ``torch-cpu`` are its two subclasses.

    ``device``: ``"cuda"`` (default ``cuda_graphs=True``) or ``"cpu"`` (eager exported programs,
    used to check the translation where no GPU is present). ``export=False`` runs the translated
    modules without ``torch.export`` (to tell a translation problem from an export one).
    """

    name: ClassVar[str] = "torch"
    summary: ClassVar[str] = "PyTorch"

    def __init__(self, device: str = "cuda", cuda_graphs: Optional[bool] = None,
                 export: bool = True, threads: Optional[int] = None, tf32: bool = False,
                 graph_cache: int = 8) -> None:
        self.torch = _torch()
        self.tf32 = tf32
        if graph_cache < 1:
            raise UsageError("graph_cache must be at least 1")
        self.graph_cache = graph_cache
        self.executables: List[TorchExecutable] = []
        if threads is not None:
            if threads < 1:
                raise UsageError("threads must be at least 1")
            self.torch.set_num_threads(threads)
        self.threads = self.torch.get_num_threads()
        if device not in ("cuda", "cpu") and not device.startswith("cuda:"):
            raise UsageError(f"torch device must be 'cuda', 'cuda:N' or 'cpu', not {device!r}")
        if device.startswith("cuda") and not self.torch.cuda.is_available():
            raise BackendUnavailable(
                f"the torch-cuda backend needs a CUDA GPU and a PyTorch built with CUDA; this "
                f"PyTorch {self.torch.__version__} sees none (torch.cuda.is_available() is False)."
                " Use the onnxruntime backend here, or torch-cpu to check the translation")
        self.device = device
        self.cuda_graphs = device.startswith("cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not device.startswith("cuda"):
            raise UsageError("CUDA graphs need a CUDA device")
        self.export = export
        self.arrays = TorchArrays(device)
        if device.startswith("cuda"):
            self.torch.backends.cudnn.benchmark = True
            if not tf32:
                exact_float32(self.torch)

    def device_info(self) -> Dict[str, Any]:
        """What the benchmark records of the device: PyTorch and, on CUDA, the GPU."""
        torch = self.torch
        info: Dict[str, Any] = {"torch": torch.__version__, "cuda_graphs": self.cuda_graphs,
                                "tf32": self.tf32}
        if self.device.startswith("cuda"):
            props = torch.cuda.get_device_properties(torch.device(self.device))
            info.update(name=props.name, compute_capability=f"{props.major}.{props.minor}",
                        memory_gib=round(props.total_memory / 2**30, 1),
                        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        else:
            info.update(name="cpu", threads=self.threads)
        return info

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def load(self, bundle: Bundle, piece: str) -> TorchExecutable:
        from .translate import OnnxModule, UnsupportedPiece
        spec = bundle.manifest.pieces[piece]
        try:
            module = OnnxModule(bundle.piece_model(piece)).to(self.device).eval()
        except UnsupportedPiece as e:
            raise BundleError(f"piece {piece!r} cannot run on {self.name}: {e}") from None
        batch_dim = [bool(t.shape) and isinstance(t.shape[0], str) for t in spec.inputs]
        exe = TorchExecutable(self, module, [t.name for t in spec.inputs],
                              [t.name for t in spec.outputs], batch_dim)
        self.executables.append(exe)
        return exe

    def close(self) -> None:
        """Reset every captured CUDA graph and hand the cached memory back to the driver."""
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()
        for exe in self.executables:
            exe.close()
        self.executables.clear()
        if self.device.startswith("cuda"):
            self.torch.cuda.empty_cache()

    def build(self, bundle: Bundle, progress: Progress = None) -> Path:
        """Translate and export every piece once and run it on zeros, so that a bundle this
        backend cannot run fails here, with the piece named; nothing is written (see the module
        docstring)."""
        names = list(bundle.manifest.pieces)
        for i, name in enumerate(names):
            if progress:
                progress(i, len(names), name)
            exe = self.load(bundle, name)
            feeds = {}
            for t in bundle.manifest.pieces[name].inputs:
                shape = [1 if isinstance(d, str) else int(d) for d in t.shape]
                feeds[t.name] = self.arrays.from_host(np.zeros(shape, dtype=t.dtype))
            exe.run(feeds)
        if progress:
            progress(len(names), len(names), "done")
        return bundle.root


class TorchCudaBackend(TorchBackend):
    name: ClassVar[str] = "torch-cuda"
    summary: ClassVar[str] = "PyTorch with CUDA graphs on a CUDA GPU"
    options: ClassVar[Tuple[BackendOption, ...]] = (
        BackendOption("cuda_graphs", "launch each piece's kernels instead of replaying a CUDA "
                      "graph", flag="--no-cuda-graphs", negate=True),
        BackendOption("tf32", "allow TF32 convolutions (faster on Ampere and newer, about 1e-3 "
                              "relative error: verify then needs --rtol 1e-2)", switch=True),
        BackendOption("graph_cache", "CUDA graphs kept per piece (default 8; batches are padded "
                                     "to powers of two, so 8 serves batches up to 128)",
                      _positive),
    )

    def __init__(self, cuda_graphs: Optional[bool] = None, export: bool = True,
                 device: str = "cuda", tf32: bool = False, graph_cache: int = 8) -> None:
        super().__init__(device=device, cuda_graphs=cuda_graphs, export=export, tf32=tf32,
                         graph_cache=graph_cache)


class TorchCpuBackend(TorchBackend):
    name: ClassVar[str] = "torch-cpu"
    summary: ClassVar[str] = "PyTorch on the CPU (checks the translation that torch-cuda runs)"
    options: ClassVar[Tuple[BackendOption, ...]] = (
        BackendOption("threads", "CPU threads (default: all cores)", _positive),
    )

    def __init__(self, threads: Optional[int] = None, export: bool = True) -> None:
        super().__init__(device="cpu", threads=threads, export=export)


__all__ = ["TorchBackend", "TorchCudaBackend", "TorchCpuBackend", "TorchArrays", "TorchExecutable",
           "export_piece"]
