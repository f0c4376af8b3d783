"""Dynamic building blocks: gates, dynamic convolutions, cheap-operation fill.

Each block knows its static branches, which :mod:`adaedge.export` turns into ONNX pieces.
"""

from .tadaconv import RouteFuncMLP, TAdaConv2d, calibrated_conv2d
from .vared import Branch, DynamicConv3d, SoftModulationGate, efficiency_loss

__all__ = ["Branch", "DynamicConv3d", "SoftModulationGate", "efficiency_loss", "RouteFuncMLP",
           "TAdaConv2d", "calibrated_conv2d"]
