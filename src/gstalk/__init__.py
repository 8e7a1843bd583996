"""gstalk: person-specific, audio-driven talking heads with 3D Gaussian Splatting.

The package is a library behind the ``gstalk`` command. Importing it loads no native
code and no CUDA library: rasterizer backends, MediaPipe and ffmpeg are imported where
they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
