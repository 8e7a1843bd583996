"""Per-frame rendering of a trained workspace: audio windows + pose -> RGB frame.

The spatial encoding of the canonical Gaussians does not depend on the audio, so
:class:`HeadRenderer` computes it once; each frame then costs the audio encoder, the
deformation MLP, one rasterization and the composite over the pose frame's background
(its torso over the background plate).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from gstalk.dataset import Tracks, composite_background, load_background, load_frame, load_masks
from gstalk.deform.audio import neighbour_indices
from gstalk.deform.base import DeformationModel, apply_deltas
from gstalk.gaussians.splat import composite, splat
from gstalk.workspace import Workspace


def loop_poses(n_out: int, frames: range | list[int]) -> list[int]:
    """``--pose loop``: walk the training frames forwards then backwards (ping-pong), so the
    head never jumps: ``n_out`` workspace frame numbers."""
    f = list(frames)
    if len(f) == 1:
        return f * n_out
    cycle = f + f[-2:0:-1]
    return [cycle[i % len(cycle)] for i in range(n_out)]


def auto_blinks(n: int, fps: float, seed: int = 0, every_s: tuple[float, float] = (2.0, 6.0)) -> list[float]:
    """Eye blink values [n] in [0, 1] for ``render --blink auto``: a blink every 2-6 s
    (uniform; people blink about 15-20 times a minute when talking), each 200 ms long with
    the profile 0.3, 0.8, 1, 0.6, 0.2 at 25 fps (resampled for other rates)."""
    rng = np.random.default_rng(seed)
    profile = np.array([0.3, 0.8, 1.0, 0.6, 0.2])
    length = max(2, round(0.2 * fps))
    shape = np.interp(np.linspace(0, len(profile) - 1, length), np.arange(len(profile)), profile)
    out = np.zeros(n)
    t = rng.uniform(0.5, every_s[1]) * fps
    while t < n:
        i = int(t)
        seg = out[i:i + length]
        out[i:i + length] = np.maximum(seg, shape[:len(seg)])
        t += rng.uniform(*every_s) * fps
    return [float(x) for x in out]


def frontal_frame(tracks: Tracks, frames: range | list[int]) -> int:
    """``--pose still``: the workspace frame among ``frames`` whose head faces the camera
    most directly (smallest max(|yaw|, |pitch|) of
    :func:`~gstalk.tracking.pose.view_angles`)."""
    from gstalk.tracking.pose import view_angles

    f = list(frames)
    angles = view_angles(tracks.viewmats[f].double().numpy())
    return f[int(np.abs(angles).max(1).argmin())]


class HeadRenderer:
    """Render frames of a trained model.

    Args:
        ws: the workspace (for frames, masks and the background plate).
        params: canonical Gaussians (raw).
        model: the deformation model (eval mode).
        tracks: the track stage's per-frame data.
        backend: rasterizer backend.
        cache: how many composited backgrounds to keep in memory (uint8, H·W·3 bytes each).
        backdrop: [H, W, 3] uint8 RGB shown behind the head and torso instead of the
            background plate (``render --background``).
        alpha: render RGBA: the head over the torso over nothing; frames are [H, W, 4] with
            straight (not premultiplied) alpha (``render --alpha``).
        size: output width/height in pixels (square frames) when not the trained size: the
            Gaussians are re-projected with K scaled by size / trained size (sharp at any
            size, but detail beyond the training resolution is not there), the background and
            torso are resized (bilinear up, area down).
    """

    def __init__(self, ws: Workspace, params: dict[str, torch.Tensor], model: DeformationModel, tracks: Tracks, *,
                 backend: str = "auto", cache: int = 512, backdrop: np.ndarray | None = None, alpha: bool = False,
                 size: int | None = None):
        self.ws, self.params, self.model, self.tracks = ws, params, model, tracks
        self.backend = backend
        self.alpha = alpha
        plate = load_background(ws)
        native_h, native_w = plate.shape[:2]
        self.scale = 1.0 if size is None else size / native_w
        self.width, self.height = round(native_w * self.scale), round(native_h * self.scale)
        self.K = tracks.K.clone()
        self.K[:2] *= self.scale  # principal point at the image centre stays there
        if backdrop is not None and backdrop.shape[:2] != (native_h, native_w):
            raise ValueError(f"backdrop must be [{native_h}, {native_w}, 3], got {list(backdrop.shape)}")
        self.plate = plate if backdrop is None else backdrop
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cache_size = cache
        with torch.no_grad():
            self.spatial = model.spatial(params["means"])

    def background(self, frame: int) -> torch.Tensor:
        """[1, H, W, 3] float32: frame ``frame``'s torso over the background plate (or the
        backdrop); with ``alpha``, [1, H, W, 4]: the premultiplied torso and its alpha
        (cached)."""
        bg = self._cache.get(frame)  # kept as uint8: 4x less memory than float32
        if bg is None:
            masks = load_masks(self.ws, [frame])[0]
            if self.alpha:  # the torso, premultiplied, with its alpha
                torso = masks[..., 2:3].astype(np.float32) / 255.0
                rgb = (load_frame(self.ws, frame) * torso).round().astype(np.uint8)
                img = np.concatenate([rgb, masks[..., 2:3]], axis=-1)
            else:
                img = composite_background(load_frame(self.ws, frame), masks, self.plate)
            if self.scale != 1.0:
                import cv2

                img = cv2.resize(img, (self.width, self.height),
                                 interpolation=cv2.INTER_LINEAR if self.scale > 1 else cv2.INTER_AREA)
            bg = torch.from_numpy(np.ascontiguousarray(img))[None]
            self._cache[frame] = bg
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(frame)
        return bg.float() / 255.0

    @torch.no_grad()
    def render(self, windows: torch.Tensor, pose_frame: int, blink: float | None = None,
               timings: dict[str, list[float]] | None = None, viewmat: torch.Tensor | None = None) -> torch.Tensor:
        """One frame: condition windows [1, K, W, C'] of the K frames around it (from
        :meth:`conditions`), the workspace frame whose camera, blink and background to use.
        Returns [H, W, 3] float32 in [0, 1] ([H, W, 4] RGBA, straight alpha, with ``alpha``).

        ``timings``: when given, the seconds of each step (``background``, ``deform``,
        ``raster``, ``composite``) are appended to its lists (the render benchmark)."""
        t0 = time.perf_counter()
        bg = self.background(pose_frame)
        t1 = time.perf_counter()
        code = self.model.encode_audio(windows)[0]
        e = torch.tensor([float(self.tracks.blink[pose_frame]) if blink is None else blink])
        deformed = apply_deltas(self.params, self.model.deform(self.spatial, code, e))
        t2 = time.perf_counter()
        vm = self.tracks.viewmats[pose_frame:pose_frame + 1] if viewmat is None else viewmat.reshape(1, 4, 4)
        colors, alphas, _ = splat(deformed, vm, self.K, self.width, self.height, backend=self.backend)
        t3 = time.perf_counter()
        if self.alpha:
            rgb = composite(colors, alphas, bg[..., :3])  # premultiplied head over premultiplied torso
            a = alphas + (1.0 - alphas) * bg[..., 3:4]
            img = torch.cat([rgb / a.clamp_min(1e-6), a], dim=-1).clamp(0, 1)[0]
        else:
            img = composite(colors, alphas, bg).clamp(0, 1)[0]
        if timings is not None:
            for k, dt in (("background", t1 - t0), ("deform", t2 - t1), ("raster", t3 - t2),
                          ("composite", time.perf_counter() - t3)):
                timings.setdefault(k, []).append(dt)
        return img

    def conditions(self, audio_windows: np.ndarray) -> torch.Tensor:
        """The model's condition sequence for audio windows [N, W, C] (one per frame, in
        order): [N, W, C'] float32 (the predicted articulation code, or the audio)."""
        with torch.no_grad():
            return self.model.conditions(torch.from_numpy(np.ascontiguousarray(audio_windows, dtype=np.float32)))

    def frames(self, audio_windows: np.ndarray, poses: list[int], blinks: list[float] | None = None,
               viewmats: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Render a sequence: ``audio_windows`` [N, W, C] (one per output frame), ``poses``
        [N] workspace frames (background, torso and, unless ``viewmats`` [N, 4, 4] is given,
        the head's camera), ``blinks`` [N] in [0, 1] (default: the pose frames' own).
        Yields [H, W, 3] uint8 ([H, W, 4] with ``alpha``)."""
        win = self.conditions(audio_windows)
        for i in range(win.shape[0]):
            ids = neighbour_indices(i, self.model.smooth, win.shape[0])
            vm = None if viewmats is None else torch.from_numpy(np.ascontiguousarray(viewmats[i], dtype=np.float32))
            img = self.render(win[ids], poses[i], None if blinks is None else blinks[i], viewmat=vm)
            yield (img.numpy() * 255.0).round().astype(np.uint8)
