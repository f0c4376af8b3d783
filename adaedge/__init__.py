"""adaedge: deploy input-adaptive video networks as static pieces on ONNX Runtime and TensorRT.

The runtime (:mod:`adaedge.runtime`) never imports torch; the model, export and verify paths do.
"""

__version__ = "0.1.0"
