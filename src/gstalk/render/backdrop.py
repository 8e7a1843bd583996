"""Backdrops and RGBA output for ``gstalk render --background`` / ``--alpha``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from gstalk.errors import UsageError

NAMED_COLOURS = {"black": (0, 0, 0), "white": (255, 255, 255), "green": (0, 177, 64), "blue": (0, 71, 187),
                 "grey": (128, 128, 128), "gray": (128, 128, 128)}
"""``--background`` colour names (green and blue are the usual chroma-key colours)."""


def parse_backdrop(value: str, width: int, height: int) -> np.ndarray | None:
    """``render --background``: ``plate`` (None: the workspace's background plate), a colour
    (a name of :data:`NAMED_COLOURS` or ``#rrggbb``), or an image file, scaled to cover the
    frame and centre-cropped.

    Returns:
        [height, width, 3] uint8 RGB, or None for ``plate``.

    Raises:
        UsageError: not a colour and not a readable image (the message names it).
    """
    v = value.strip()
    if v.lower() == "plate":
        return None
    rgb: tuple[int, ...] | None = NAMED_COLOURS.get(v.lower())
    hexa = v[1:] if v.startswith("#") else v
    if rgb is None and len(hexa) == 6 and all(c in "0123456789abcdefABCDEF" for c in hexa) and not Path(v).exists():
        rgb = tuple(int(hexa[i:i + 2], 16) for i in (0, 2, 4))
    if rgb is not None:
        return np.broadcast_to(np.array(rgb, np.uint8), (height, width, 3)).copy()
    p = Path(v)
    if not p.is_file():
        raise UsageError(f"--background '{value}' is neither a colour nor an image file.",
                         hint=f"use plate, a colour ({', '.join(NAMED_COLOURS)} or #rrggbb) or an image path")
    import cv2

    img = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if img is None:
        raise UsageError(f"--background image {p} could not be read.", hint="use a PNG or JPEG image")
    s = max(width / img.shape[1], height / img.shape[0])
    img = cv2.resize(img, (max(width, round(img.shape[1] * s)), max(height, round(img.shape[0] * s))),
                     interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    y0, x0 = (img.shape[0] - height) // 2, (img.shape[1] - width) // 2
    return np.ascontiguousarray(img[y0:y0 + height, x0:x0 + width, ::-1])



class PngSequenceWriter:
    """Write RGBA frames as ``NNNNNN.png`` (8-bit, straight alpha) into a folder, with the
    audio copied beside them as ``audio`` + its suffix: the usual hand-off to a video editor.
    Same interface as :class:`~gstalk.media.ffmpeg_io.VideoWriter` (``write``, context
    manager).

    Args:
        folder: output folder (created).
        audio_path: audio file to copy, or None.
    """

    def __init__(self, folder: str | Path, audio_path: str | Path | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0
        if audio_path is not None:
            shutil.copyfile(audio_path, self.folder / f"audio{Path(audio_path).suffix or '.wav'}")

    def write(self, frame: np.ndarray) -> None:
        """One [H, W, 4] uint8 RGBA frame."""
        import cv2

        ok, buf = cv2.imencode(".png", np.ascontiguousarray(frame[..., [2, 1, 0, 3]]))
        (self.folder / f"{self.count:06d}.png").write_bytes(buf.tobytes())
        self.count += 1

    def __enter__(self) -> PngSequenceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
