"""Calibration writes into a bundle: exit thresholds under compute budgets (:mod:`.exits`).

INT8 Q/DQ scales arrive with the TensorRT path; gate bias for a budget is not implemented.
"""
