"""Media I/O: probing (PyAV), decoding/encoding/muxing (ffmpeg-python + imageio-ffmpeg)."""

from gstalk.media.ffmpeg_io import VideoWriter, ffmpeg_exe, read_audio, read_video_frames, write_wav
from gstalk.media.probe import AudioInfo, MediaInfo, VideoInfo, probe

__all__ = ["AudioInfo", "MediaInfo", "VideoInfo", "VideoWriter", "ffmpeg_exe", "probe", "read_audio",
           "read_video_frames", "write_wav"]
