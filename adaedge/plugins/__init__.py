"""TensorRT plugins (C++/CUDA sources, CMake, a loader). Not yet implemented in this version.

Every custom node the exporters will emit carries a standard-op body, so bundles never depend on a
plugin being present.
"""
