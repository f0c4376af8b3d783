"""Serve bundles to many cameras on NVIDIA Triton Inference Server (through PyTriton).

>>> from adaedge.serve import Server, ModelSpec
>>> with Server(["bundle/"], http_port=8000) as server:        # doctest: +SKIP
...     server.wait()                                           # until Ctrl-C

Each bundle is a Triton model; Triton's dynamic batcher forms the batches, the runtime groups each
batch by branch. Streams with state (AdaFuse) keep one state per ``stream_id`` on the server. This
package imports without PyTriton; :meth:`Server.start` says which extra to install
(``pip install 'adaedge[serve]'``) or why this Python cannot serve.
"""

from .environment import ServeUnavailable, serving_environment
from .metrics import ModelMetrics
from .model import ServedModel, TensorSpec
from .server import ModelSpec, ServeConfig, Server, free_port, serve
from .streams import StreamState, StreamTable

__all__ = ["Server", "ServeConfig", "ModelSpec", "serve", "free_port", "ServedModel", "TensorSpec",
           "StreamTable", "StreamState", "ModelMetrics", "ServeUnavailable", "serving_environment"]
