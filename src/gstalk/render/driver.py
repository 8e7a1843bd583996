"""Per-frame rendering of a trained avatar: audio windows + pose -> RGB frame.

The spatial encoding of the canonical Gaussians does not depend on the audio, so
:class:`HeadRenderer` computes it once; each frame then goes through the one audio → pixels
path (:class:`gstalk.render.head.TalkingHead`: the audio encoder, the deformation MLP, one
rasterization and the composite) over the pose frame's background:
the torso over the background plate, where the torso is the torso field
(:mod:`gstalk.deform.torso`) rendered for the frame's head pose or, in a workspace trained
without one, the pose frame's own torso (from the avatar's background source, which reads
it from the workspace: :class:`gstalk.dataset.PoseFrameTorso`). The renderer takes an
:class:`~gstalk.avatar.Avatar` (tensors and arrays) and reads no file itself. Backgrounds
are made on a worker thread a few frames ahead (:func:`prefetch`), so a long render streams
in constant memory.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

from gstalk.avatar import Avatar
from gstalk.dataset import composite_torso
from gstalk.device import synchronize
from gstalk.gaussians.splat import composite
from gstalk.render.head import TalkingHead


def _clock(timings: dict | None, device: torch.device | None = None) -> float:
    """perf_counter() for the step timings, after the GPU's queued work when rendering on
    CUDA (kernels are asynchronous: without it a step's time lands on the next one)."""
    if timings is not None:
        synchronize(device)
    return time.perf_counter()


T = TypeVar("T")
R = TypeVar("R")


def prefetch(fn: Callable[[T], R], items: Iterable[T], depth: int = 8) -> Iterator[R]:
    """``map(fn, items)`` computed ``depth`` items ahead on a worker thread.

    The queue between the thread and the consumer holds at most ``depth`` results, so memory
    stays bounded whatever the length of ``items``; the work overlaps the consumer's when
    ``fn`` releases the GIL (PNG decoding, numpy). An exception in ``fn`` is re-raised in the
    consumer; a consumer that stops early stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((fn(item), None))
        except BaseException as exc:  # handed to the consumer
            q.put((None, exc))
            return
        q.put((done, None))

    t = threading.Thread(target=work, name="gstalk-prefetch", daemon=True)
    t.start()
    try:
        while True:
            value, exc = q.get()
            if exc is not None:
                raise exc
            if value is done:
                return
            yield value
    finally:
        stop.set()
        while t.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.01)


def loop_pose(i: int, frames: range | list[int]) -> int:
    """``--pose loop`` for output frame ``i`` >= 0 of a stream of any length: the workspace
    frame number whose pose (background, blink) it uses, walking ``frames`` forwards then
    backwards (ping-pong, period 2n - 2 for n frames), so the head never jumps."""
    n = len(frames)
    if n == 1:
        return int(frames[0])
    k = i % (2 * n - 2)
    return int(frames[k] if k < n else frames[2 * n - 2 - k])


def loop_poses(n_out: int, frames: range | list[int]) -> list[int]:
    """``--pose loop`` for a whole render: :func:`loop_pose` of output frames 0..n_out-1."""
    return [loop_pose(i, frames) for i in range(n_out)]


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


def frontal_frame(viewmats: torch.Tensor, frames: range | list[int]) -> int:
    """``--pose still``: the frame among ``frames`` whose head faces the camera most directly
    (smallest max(|yaw|, |pitch|) of :func:`~gstalk.tracking.pose.view_angles`).

    Args:
        viewmats: [N, 4, 4] float32 W2C head poses of the clip (``Avatar.viewmats``,
            ``Tracks.viewmats``).
        frames: the candidate frame numbers.
    """
    from gstalk.tracking.pose import view_angles

    f = list(frames)
    angles = view_angles(viewmats[f].double().numpy())
    return f[int(np.abs(angles).max(1).argmin())]


class HeadRenderer:
    """Render frames of a trained avatar, on one device.

    Args:
        avatar: the trained avatar (:class:`~gstalk.avatar.Avatar`: canonical Gaussians,
            deformation model in eval mode, per-frame poses, blinks, K, background plate and,
            without a torso field, the background source of the pose frames' torsos).
        backend: rasterizer backend.
        cache: how many composited backgrounds :meth:`background` keeps in memory (uint8,
            H·W·3 bytes each); :meth:`frames` streams them instead (a bounded prefetch queue),
            so its memory does not grow with the length of the audio.
        backdrop: [H, W, 3] uint8 RGB shown behind the head and torso instead of the
            background plate (``render --background``).
        alpha: render RGBA: the head over the torso over nothing; frames are [H, W, 4] with
            straight (not premultiplied) alpha (``render --alpha``).
        articulation_gain: scales the predicted mouth articulation code (``render
            --articulation-gain``; see :meth:`~gstalk.deform.base.DeformationModel.conditions`);
            None: the model's default (:func:`~gstalk.config.default_articulation_gain`: 0.85 for a
            model carrying the articulation basis, else :data:`~gstalk.config.DEFAULT_ARTICULATION_GAIN`).
        size: output width/height in pixels (square frames) when not the trained size: the
            Gaussians are re-projected with K scaled by size / trained size (sharp at any
            size, but detail beyond the training resolution is not there), the background and
            torso are resized (bilinear up, area down).
        device: where the Gaussians, the model, the conditions and the frames being drawn
            live (``torch.device`` or ``auto``/``cpu``/``cuda[:N]``, :func:`gstalk.device.resolve_device`;
            default the CPU). Frames come back to the CPU (:meth:`render`, :meth:`frames`) only to be
            encoded or written.

    Raises:
        ValueError: a backdrop of the wrong size, or an avatar with neither a torso field
            nor a background source.
    """

    def __init__(self, avatar: Avatar, *, backend: str = "auto", cache: int = 64,
                 backdrop: np.ndarray | None = None, alpha: bool = False, size: int | None = None,
                 articulation_gain: float | None = None, device: torch.device | str = "cpu"):
        from gstalk.config import check_articulation_gain, default_articulation_gain
        from gstalk.device import resolve_device

        self.device = resolve_device(device, backend)
        avatar = avatar.on(self.device)
        self.avatar = avatar
        self.params, self.model = avatar.params, avatar.model
        self.viewmats, self.blink = avatar.viewmats, avatar.blink
        self.articulation_gain = check_articulation_gain(articulation_gain,
                                                         default_articulation_gain(avatar.has_articulation_basis))
        self.backend = backend
        self.alpha = alpha
        plate = avatar.plate
        native_h, native_w = plate.shape[:2]
        self.scale = 1.0 if size is None else size / native_w
        self.width, self.height = round(native_w * self.scale), round(native_h * self.scale)
        self.K = avatar.K.clone()
        self.K[:2] *= self.scale  # principal point at the image centre stays there
        if backdrop is not None and backdrop.shape[:2] != (native_h, native_w):
            raise ValueError(f"backdrop must be [{native_h}, {native_w}, 3], got {list(backdrop.shape)}")
        self.plate = plate if backdrop is None else backdrop
        self.torso = self.model.torso  # GSTalker's torso field, or None: paste the pose frame's torso
        self.torso_frames = avatar.torso_frames
        if self.torso is None and self.torso_frames is None:
            raise ValueError(f"avatar '{avatar.name}' has no torso field and no background source for its torso")
        if self.torso is not None:
            import cv2

            interp = cv2.INTER_LINEAR if self.scale > 1 else cv2.INTER_AREA
            p = self.plate if self.scale == 1.0 else cv2.resize(self.plate, (self.width, self.height),
                                                                interpolation=interp)
            self._plate_f = torch.from_numpy(np.ascontiguousarray(p))[None].float().to(self.device) / 255.0
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cache_size = cache
        self.head = TalkingHead(self.params, self.model, self.K, self.width, self.height, backend=backend,
                                cache_spatial=True)
        self.spatial = self.head.spatial()

    def load_background(self, frame: int, viewmat: torch.Tensor | None = None) -> torch.Tensor:
        """[1, H, W, 3] uint8 on the CPU (``alpha``: [1, H, W, 4], the premultiplied torso and
        its alpha): the torso over the background plate or the backdrop. With a torso field,
        the torso is rendered (on the renderer's device) for the head pose ``viewmat``
        [1, 4, 4] W2C (default: frame ``frame``'s); without one it is frame ``frame``'s torso,
        from the avatar's background source."""
        if self.torso is not None:
            return self.render_torso(self.viewmats[frame:frame + 1] if viewmat is None else viewmat, frame)
        assert self.torso_frames is not None
        rgb_frame, torso_mask = self.torso_frames(frame)
        if self.alpha:  # the torso, premultiplied, with its alpha
            torso = torso_mask[..., None].astype(np.float32) / 255.0
            rgb = (rgb_frame * torso).round().astype(np.uint8)
            img = np.concatenate([rgb, torso_mask[..., None]], axis=-1)
        else:
            img = composite_torso(rgb_frame, torso_mask, self.plate)
        if self.scale != 1.0:
            import cv2

            img = cv2.resize(img, (self.width, self.height),
                             interpolation=cv2.INTER_LINEAR if self.scale > 1 else cv2.INTER_AREA)
        return torch.from_numpy(np.ascontiguousarray(img))[None]

    @torch.no_grad()
    def render_torso(self, viewmat: torch.Tensor, frame: int | None = None) -> torch.Tensor:
        """The torso field rendered for head pose W2C ``viewmat`` [1, 4, 4] (and, when
        given, pose frame ``frame``'s registered torso offset) over the plate or backdrop:
        [1, H, W, 3] uint8 on the CPU (``alpha``: [1, H, W, 4], premultiplied RGB and alpha)."""
        from gstalk.deform.torso import render_torso

        assert self.torso is not None
        colors, alphas = render_torso(self.torso, viewmat.reshape(1, 4, 4), self.K, self.width, self.height,
                                      backend=self.backend, frame=frame)
        img = torch.cat([colors, alphas], -1) if self.alpha else composite(colors, alphas, self._plate_f)
        return (img.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu()

    def background(self, frame: int) -> torch.Tensor:
        """[1, H, W, 3] float32 on the renderer's device: frame ``frame``'s torso over the
        background plate (or the backdrop); with ``alpha``, [1, H, W, 4]: the premultiplied
        torso and its alpha (an LRU cache of ``cache`` frames, kept as uint8 on the CPU)."""
        bg = self._cache.get(frame)  # kept as uint8: 4x less memory than float32
        if bg is None:
            bg = self.load_background(frame)
            self._cache[frame] = bg
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(frame)
        return bg.to(self.device).float() / 255.0

    @torch.no_grad()
    def render_on_device(self, windows: torch.Tensor, pose_frame: int, blink: float | None = None,
                         timings: dict[str, list[float]] | None = None, viewmat: torch.Tensor | None = None,
                         bg: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`render`, leaving the frame on the renderer's device: [H, W, 3] (or 4) float32."""
        t0 = time.perf_counter()
        bg = self.background(pose_frame) if bg is None else bg.to(self.device, non_blocking=True).float() / 255.0
        if timings is not None:
            timings.setdefault("background", []).append(_clock(timings, self.device) - t0)
        vm = self.viewmats[pose_frame:pose_frame + 1] if viewmat is None else viewmat.reshape(1, 4, 4)
        e = float(self.blink[pose_frame]) if blink is None else blink
        out = self.head.render(windows.to(self.device), e, vm, bg, timings=timings)
        assert out.image is not None
        return out.image.clamp(0, 1)[0]

    def render(self, windows: torch.Tensor, pose_frame: int, blink: float | None = None,
               timings: dict[str, list[float]] | None = None, viewmat: torch.Tensor | None = None,
               bg: torch.Tensor | None = None) -> torch.Tensor:
        """One frame: condition windows [1, K, W, C'] of the K frames around it (from
        :meth:`conditions`), the clip frame whose camera, blink and background to use.
        Returns [H, W, 3] float32 in [0, 1] on the CPU ([H, W, 4] RGBA, straight alpha,
        with ``alpha``).

        ``timings``: when given, the seconds of each step (``background``, ``deform``,
        ``raster``, ``composite``) are appended to its lists (the render benchmark).
        ``bg``: the pose frame's background as :meth:`load_background` gives it (uint8), when
        the caller has it already; otherwise it comes from :meth:`background`'s cache."""
        return self.render_on_device(windows, pose_frame, blink, timings, viewmat, bg).cpu()

    def conditions(self, audio_windows: np.ndarray) -> torch.Tensor:
        """The model's condition sequence for audio windows [N, W, C] (one per frame, in
        order): [N, W, C'] float32 on the renderer's device (the predicted articulation code,
        or the audio)."""
        x = torch.from_numpy(np.ascontiguousarray(audio_windows, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            return self.model.conditions(x, self.articulation_gain)

    def frames(self, audio_windows: np.ndarray, poses: list[int], blinks: list[float] | None = None,
               viewmats: np.ndarray | None = None, prefetch_depth: int = 8) -> Iterator[np.ndarray]:
        """Render a sequence: ``audio_windows`` [N, W, C] (one per output frame), ``poses``
        [N] clip frames (background, torso and, unless ``viewmats`` [N, 4, 4] is given,
        the head's camera), ``blinks`` [N] in [0, 1] (default: the pose frames' own).
        Yields [H, W, 3] uint8 ([H, W, 4] with ``alpha``) on the CPU.

        Streaming: the backgrounds are made ``prefetch`` frames ahead on a worker thread
        (:func:`prefetch`), overlapping the rendering, and not kept, so memory is the same
        for 10 s or an hour of frames (the condition sequence, [N, W, C'] float32, ~0.5 kB a
        frame, is the one exception). On CUDA a frame is turned to uint8 on the GPU, so a
        quarter of the bytes cross to the CPU."""
        win = self.conditions(audio_windows)

        def vm(i: int) -> torch.Tensor | None:  # frame i's head pose from the pose file, [4, 4] float32
            return None if viewmats is None else torch.from_numpy(np.ascontiguousarray(viewmats[i], dtype=np.float32))

        backgrounds = prefetch(lambda i: self.load_background(poses[i], vm(i)), range(len(poses)),
                               depth=prefetch_depth)
        for i, bg in zip(range(win.shape[0]), backgrounds):
            img = self.render_on_device(self.head.windows(win, i), poses[i], None if blinks is None else blinks[i],
                                        viewmat=vm(i), bg=bg)
            yield (img * 255.0).round().to(torch.uint8).cpu().numpy()
