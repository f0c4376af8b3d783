"""Calibration writes into a bundle: exit thresholds under compute budgets (:mod:`.exits`) and
int8 Q/DQ forms of the pieces, calibrated per branch (:mod:`.int8`). Gate bias for a budget is
not implemented.
"""
