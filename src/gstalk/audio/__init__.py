"""Audio features per video frame (MFCC by default; extractors are pluggable)."""

from gstalk.audio.features import (
    AudioFeatureExtractor,
    MFCCExtractor,
    frame_windows,
    get_extractor,
    n_video_frames,
    normalise,
)

__all__ = ["AudioFeatureExtractor", "MFCCExtractor", "frame_windows", "get_extractor", "n_video_frames", "normalise"]
