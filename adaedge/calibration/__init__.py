"""Calibration writes into a bundle: INT8 Q/DQ scales, exit thresholds under a budget, gate bias.

Nothing is implemented here yet: exit thresholds arrive with AdaFocusV3 and Q/DQ INT8 with the
TensorRT path. The runtime already reads exit thresholds from a bundle's ``exit`` steps.
"""
