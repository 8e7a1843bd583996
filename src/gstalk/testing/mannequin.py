"""A synthetic talking "mannequin": the canonical face mesh, shaded and animated, as test data.

MediaPipe detects this rendering as a face, so the whole pipeline (extract -> eval) can run
on a clip made on the spot, with no third-party footage. The mouth opens with the loudness
of a beeping tone, so lip-sync and A/V offset code can be checked against a known answer;
the head pose and focal length are known exactly, so pose recovery can be checked too.

Rendering is a painter's-algorithm rasterizer over the mesh triangles (OpenCV polygons),
Lambertian shading, lips and brows coloured, eyes drawn on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from gstalk.tracking.canonical import (
    BROW_LEFT,
    BROW_RIGHT,
    EYE_LEFT,
    EYE_RIGHT,
    LIPS_INNER,
    LIPS_OUTER,
    MOUTH_LEFT,
    MOUTH_RIGHT,
    canonical_face,
)

# canonical (y up, z towards the viewer) -> OpenCV camera axes (y down, z forward)
FLIP = np.diag([1.0, -1.0, -1.0])


def _inside(poly: np.ndarray, pts: np.ndarray) -> np.ndarray:
    import cv2

    c = poly.astype(np.float32).reshape(-1, 1, 2)
    return np.array([cv2.pointPolygonTest(c, (float(x), float(y)), False) >= 0 for x, y in pts])


@lru_cache(maxsize=1)
def _triangle_classes() -> np.ndarray:
    """0 skin, 1 lips, 2 brows, per triangle of the canonical mesh."""
    face = canonical_face()
    v = face.vertices[:, :2]
    cent = v[face.triangles].mean(1)
    lips = _inside(v[list(LIPS_OUTER)], cent) & ~_inside(v[list(LIPS_INNER)], cent)
    brows = np.zeros(len(cent), bool)
    for brow in (BROW_LEFT, BROW_RIGHT):
        ids = set(brow)
        brows |= np.array([sum(int(i) in ids for i in t) >= 2 for t in face.triangles])
    return np.where(lips, 1, np.where(brows, 2, 0))


def head_pose(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0, t: tuple[float, float, float] = (0, 0, 0.5)
              ) -> np.ndarray:
    """[4, 4] head-to-camera transform: rotations in radians (yaw about y, pitch about x,
    roll about z of the canonical head), translation in metres (OpenCV camera)."""
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = FLIP @ rz @ ry @ rx
    pose[:3, 3] = t
    return pose


def deformed_vertices(opening: float) -> np.ndarray:
    """Canonical vertices (metres) with the jaw lowered by ``opening`` in [0, 1] (0 closed)."""
    v = canonical_face().vertices.copy()
    y_mouth = v[[MOUTH_LEFT, MOUTH_RIGHT], 1].mean()
    below = np.clip((y_mouth - v[:, 1]) / 0.004, 0.0, 1.0)  # lower lip and chin, soft edge at the corners
    lateral = np.exp(-(v[:, 0] / 0.05) ** 2)
    v[:, 1] -= opening * 0.018 * below * lateral
    return v


def render(opening: float, pose: np.ndarray, focal: float, size: int,
           background: tuple[int, int, int] = (70, 120, 170), blink: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Render the mannequin.

    Args:
        opening: jaw opening in [0, 1].
        pose: [4, 4] head-to-camera transform (OpenCV camera, metres).
        focal: focal length in pixels (principal point at the image centre).
        size: image side in pixels.
        blink: eyelid closure in [0, 1]: the eye's white and iris shrink to its horizontal
            midline (1: closed, a dark lash line on skin).

    Returns:
        ([size, size, 3] uint8 RGB image, [468, 2] projected vertex positions in pixels).
    """
    import cv2

    face = canonical_face()
    v = deformed_vertices(opening)
    pc = v @ pose[:3, :3].T + pose[:3, 3]
    uv = pc[:, :2] / pc[:, 2:3] * focal + size / 2.0
    img = np.empty((size, size, 3), np.uint8)
    img[:] = background
    s = 16  # sub-pixel precision of cv2's fixed-point polygons

    def poly(pts: np.ndarray, color: tuple[int, int, int]) -> None:
        cv2.fillPoly(img, [np.round(pts * s).astype(np.int32)], color, lineType=cv2.LINE_AA, shift=4)

    # shoulders and neck below the head
    chin = uv[152]
    cv2.ellipse(img, (int(size / 2), int(size * 1.05)), (int(size * 0.45), int(size * 0.3)), 0, 180, 360,
                (45, 45, 70), -1, cv2.LINE_AA)
    nw = 0.22 * np.ptp(uv[:, 0])
    poly(np.array([[chin[0] - nw, chin[1] - 5], [chin[0] + nw, chin[1] - 5], [chin[0] + nw, size * 0.9],
                   [chin[0] - nw, size * 0.9]]), (200, 160, 130))
    poly(uv[list(LIPS_INNER)], (60, 20, 30))  # the inside of the mouth, behind the mesh
    tri = face.triangles
    n = np.cross(pc[tri[:, 1]] - pc[tri[:, 0]], pc[tri[:, 2]] - pc[tri[:, 0]])
    n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
    centre = pc[tri].mean(1)
    facing = (n * centre).sum(1) < 0
    light = np.array([0.3, -0.4, -1.0])
    light /= np.linalg.norm(light)
    shade = 0.35 + 0.65 * np.abs(n @ light)
    base = np.array([[225, 180, 150], [190, 70, 80], [70, 50, 40]], np.float64)
    cls = _triangle_classes()
    inner = set(LIPS_INNER)
    gap = np.array([all(int(i) in inner for i in t) for t in tri])  # triangles spanning the mouth opening
    for t in np.argsort(-centre[:, 2]):
        if facing[t] and not gap[t]:
            col = tuple(int(c) for c in np.clip(base[cls[t]] * shade[t], 0, 255))
            poly(uv[tri[t]], col)
    for eye in (EYE_LEFT, EYE_RIGHT):
        pts = uv[list(eye)]
        c = pts.mean(0)
        r = 0.3 * np.ptp(pts[:, 1]) + 1.0
        if blink <= 0.0:
            poly(pts, (240, 240, 240))
            cv2.circle(img, tuple(np.round(c * s).astype(int)), int(r * s), (40, 30, 25), -1, cv2.LINE_AA, 4)
            continue
        open_ = 1.0 - min(float(blink), 1.0)
        lids = pts.copy()
        lids[:, 1] = c[1] + (pts[:, 1] - c[1]) * open_  # the lids meet at the eye's midline
        if open_ > 0.05:
            poly(lids, (240, 240, 240))
            cv2.circle(img, tuple(np.round(c * s).astype(int)), int(max(r * open_, 0.5) * s), (40, 30, 25), -1,
                       cv2.LINE_AA, 4)
        left, right = pts[np.argmin(pts[:, 0])], pts[np.argmax(pts[:, 0])]
        cv2.line(img, tuple(np.round(left * s).astype(int)), tuple(np.round(right * s).astype(int)), (50, 35, 30),
                 max(1, int(round(r * 0.6))), cv2.LINE_AA, 4)  # the lashes
    return img, uv


def beep_track(duration_s: float, sample_rate: int = 16000, fps: float = 25.0, period_s: float = 0.6,
               on_s: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A tone that beeps on and off, and the matching per-frame loudness envelope.

    Returns:
        ([S] float32 samples in [-1, 1], [round(duration·fps)] float32 envelope in [0, 1]).
    """
    rng = np.random.default_rng(seed)
    n = int(round(duration_s * sample_rate))
    t = np.arange(n) / sample_rate
    phase = (t % period_s) / on_s
    env = np.where(phase < 1.0, np.sin(np.pi * np.clip(phase, 0, 1)), 0.0)
    tone = 0.5 * np.sin(2 * np.pi * 220 * t) + 0.25 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 880 * t)
    audio = (0.6 * env * tone + 0.003 * rng.normal(size=n)).astype(np.float32)
    frames = int(round(duration_s * fps))
    tf = (np.arange(frames) + 0.5) / fps
    fphase = (tf % period_s) / on_s
    fenv = np.where(fphase < 1.0, np.sin(np.pi * np.clip(fphase, 0, 1)), 0.0).astype(np.float32)
    return audio, fenv


@dataclass(frozen=True)
class Clip:
    """What :func:`make_clip` wrote and the ground truth behind it.

    Attributes:
        path: the .mp4 file.
        poses: [F, 4, 4] head-to-camera transforms (metres).
        focal: focal length in pixels; size: frame side in pixels.
        opening: [F] jaw opening per frame; audio: [S] samples at ``sample_rate``.
        offset_frames: frames the audio was shifted late against the mouth.
        blink: [F] eyelid closure per frame in [0, 1] (zeros without blinks).
    """

    path: Path
    poses: np.ndarray
    focal: float
    size: int
    opening: np.ndarray
    audio: np.ndarray
    sample_rate: int
    offset_frames: int
    blink: np.ndarray | None = None


def blink_track(n: int, fps: float, every_s: float) -> np.ndarray:
    """[n] eyelid closure per frame: a blink every ``every_s`` seconds (the first after half
    of it), each over 5 frames at 25 fps with the profile 0.3, 0.8, 1, 0.8, 0.3."""
    out = np.zeros(n, np.float32)
    profile = np.array([0.3, 0.8, 1.0, 0.8, 0.3], np.float32)
    t = 0.5 * every_s
    while t * fps < n:
        i = int(round(t * fps))
        seg = out[i:i + len(profile)]
        out[i:i + len(profile)] = np.maximum(seg, profile[:len(seg)])
        t += every_s
    return out


def make_clip(path: str | Path, duration_s: float = 3.0, size: int = 256, fps: float = 25.0, focal: float | None = None,
              offset_frames: int = 0, motion: float = 1.0, seed: int = 0, blink_every_s: float | None = None) -> Clip:
    """Write a synthetic talking-mannequin video (H.264 + AAC) with known ground truth.

    Args:
        path: output .mp4.
        duration_s: length in seconds.
        size: frame side in pixels.
        fps: frames per second.
        focal: focal length in pixels (default 2·size).
        offset_frames: delay the audio by this many frames against the mouth (positive =
            audio late, like ``obama.mp4``).
        motion: scale of the slow head sway (0 = still).
        blink_every_s: close the eyes every this many seconds (:func:`blink_track`); None:
            never (the clip is then exactly what it was before blinks existed).
    """
    import tempfile

    from gstalk.media import VideoWriter, write_wav

    path = Path(path)
    sr = 16000
    focal = float(focal or 2.0 * size)
    audio, env = beep_track(duration_s, sr, fps, seed=seed)
    shift = int(round(offset_frames / fps * sr))
    if shift > 0:
        audio = np.concatenate([np.zeros(shift, np.float32), audio[:-shift]])
    n = len(env)
    k = np.arange(n) / fps
    poses = np.stack([head_pose(yaw=motion * 0.12 * np.sin(2 * np.pi * 0.23 * ti),
                                pitch=motion * 0.06 * np.sin(2 * np.pi * 0.31 * ti + 1.0),
                                roll=motion * 0.03 * np.sin(2 * np.pi * 0.17 * ti),
                                t=(motion * 0.005 * np.sin(2 * np.pi * 0.2 * ti), 0.012, 0.42)) for ti in k])
    blinks = np.zeros(n, np.float32) if blink_every_s is None else blink_track(n, fps, blink_every_s)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "audio.wav"
        write_wav(wav, audio, sr)
        with VideoWriter(path, size, size, fps, audio_path=wav, crf=12) as w:
            for i in range(n):
                w.write(render(float(env[i]), poses[i], focal, size, blink=float(blinks[i]))[0])
    return Clip(path=path, poses=poses, focal=focal, size=size, opening=env, audio=audio, sample_rate=sr,
                offset_frames=offset_frames, blink=blinks)
