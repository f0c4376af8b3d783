"""Training loops for the shipped checkpoints, on the procedural motion clips of :mod:`adaedge.data`.

``adaedge train`` dispatches to the loop its model's family names (``Family.trainer``):
:mod:`.vared` (the VA-RED² demo model) and :mod:`.adafocus` (the small AdaFocusV3).
"""
