"""Per-frame masks from landmarks + OpenCV, and the background plate.

No segmentation network ships with a licence and a size we can package, so gstalk builds
masks from the tracked landmarks (MediaPipe's 478 or FAN's 68, see
:mod:`gstalk.tracking.schemes`) and refines the person/background split with OpenCV's
GrabCut (Rother et al. 2004), seeded from the landmarks:

- ``head``: the face oval, widened and extended upwards to take in the hair and the ears
  (:func:`head_polygon`), kept where GrabCut says "person" (and always the face oval itself);
- ``mouth``: the outer-lip polygon, dilated by 6 % of the face height;
- ``person``: GrabCut foreground;
- ``torso``: person and not head (neck, shoulders, hair outside the head polygon).

All masks are [H, W] uint8 in {0, 255} at the frame's resolution.
"""

from __future__ import annotations

import threading
import typing
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from gstalk.config import PlateStatistic
from gstalk.tracking.schemes import face_height, face_outline, scheme_of

MASK_CHANNELS = ("head", "mouth", "torso", "person")


def _poly(img_shape: tuple[int, int], pts: np.ndarray) -> np.ndarray:
    import cv2

    m = np.zeros(img_shape, np.uint8)
    cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
    return m


def face_geometry(lm: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(centre [2] px, face width px, face height px) of one frame's [L, >=2] landmarks (478 or
    68): the centre and width of :func:`~gstalk.tracking.schemes.face_outline`, and
    :func:`~gstalk.tracking.schemes.face_height`."""
    oval = face_outline(lm)
    centre = oval.mean(0)
    width = float(np.ptp(oval[:, 0]))
    height = float(face_height(np.asarray(lm)[None])[0])
    return centre, width, height


def head_polygon(lm: np.ndarray, widen: float = 1.18, up: float = 0.8) -> np.ndarray:
    """The face oval widened by ``widen`` about its centre, with points above the centre
    pushed up by up to ``up`` x face height (hair): [K, 2] px (K = 36 for MediaPipe, 27 for iBUG 68).

    :func:`frame_masks` cuts it with the person mask, so ``up`` reaches for the whole top of
    the head: the hair there moves with the head and belongs to the head layer, not to the
    torso field (0.8 face heights, measured against 0.30; widening the oval further, which
    also takes in the neck and collar beside the jaw, cost obama 1.8 dB: docs/methods.md,
    "The head mask takes in the hair")."""
    oval = face_outline(lm)
    c, _, h = face_geometry(lm)
    p = c + (oval - c) * np.array([widen, 1.0])
    above = np.clip((c[1] - p[:, 1]) / (0.5 * h), 0.0, 1.0)
    p[:, 1] -= up * h * above
    return p


def mouth_mask(lm: np.ndarray, shape: tuple[int, int], dilate_frac: float = 0.06) -> np.ndarray:
    """Outer-lip polygon dilated by ``dilate_frac`` x face height: [H, W] uint8 {0, 255}."""
    import cv2

    _, _, h = face_geometry(lm)
    r = max(1, int(round(dilate_frac * h)))
    s = scheme_of(lm)
    lips = lm[list(s.lips_outer) + list(s.lips_inner), :2]
    # dilate only a box around the lips (the kernel is large, the frame is mostly empty)
    x0, y0 = np.floor(lips.min(0)).astype(int) - r - 1
    x1, y1 = np.ceil(lips.max(0)).astype(int) + r + 2
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, shape[1]), min(y1, shape[0])
    out = np.zeros(shape, np.uint8)
    if x1 <= x0 or y1 <= y0:
        return out
    off = np.array([x0, y0])
    roi = (y1 - y0, x1 - x0)
    m = _poly(roi, lm[list(s.lips_outer), :2] - off) | _poly(roi, lm[list(s.lips_inner), :2] - off)
    out[y0:y1, x0:x1] = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    return out


GrabCutModel = tuple[np.ndarray, np.ndarray]
"""GrabCut's colour models: background and foreground GMMs, each [1, 65] float64."""


def person_mask(image: np.ndarray, lm: np.ndarray, work_size: int = 128, iterations: int = 3,
                model: GrabCutModel | None = None) -> tuple[np.ndarray, GrabCutModel]:
    """Person vs background with GrabCut seeded from the landmarks.

    Seeds (at ``work_size`` px): sure foreground = the face oval and a neck block under the
    chin; sure background = the image's top corners beside the head, above the chin line;
    probable foreground = the head polygon and everything below the chin between the
    shoulders; probable background elsewhere.

    Args:
        image: [H, W, 3] uint8 RGB.
        lm: [L, >=2] landmarks (478 or 68) in pixels of ``image``.
        work_size: GrabCut runs on the image resized so its longer side is this many px.
        iterations: GrabCut iterations.
        model: colour models from an earlier frame of the same video: when given they are
            kept fixed (``GC_EVAL_FREEZE_MODEL``, about 20 % faster, no k-means) instead of
            being fitted to this frame's seeds.

    Returns:
        ([H, W] uint8 {0, 255} mask, the colour models used).
    """
    import cv2

    hgt, wid = image.shape[:2]
    s = work_size / max(hgt, wid)
    sw, sh = max(8, int(round(wid * s))), max(8, int(round(hgt * s)))
    small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
    lms = lm[:, :2] * np.array([sw / wid, sh / hgt])
    c, fw, fh = face_geometry(lms)
    chin_y = lms[scheme_of(lms).chin, 1]
    mask = np.full((sh, sw), cv2.GC_PR_BGD, np.uint8)
    yy, xx = np.mgrid[0:sh, 0:sw]
    below = yy > chin_y
    mask[below & (np.abs(xx - c[0]) < 1.6 * fw)] = cv2.GC_PR_FGD
    mask[_poly((sh, sw), head_polygon(lms, 1.25, 0.45)) > 0] = cv2.GC_PR_FGD
    far_side = (np.abs(xx - c[0]) > 1.05 * fw) & (yy < chin_y - 0.15 * fh)
    far_top = yy < (c[1] - 1.05 * fh)
    mask[far_side | far_top] = cv2.GC_BGD
    mask[_poly((sh, sw), face_outline(lms)) > 0] = cv2.GC_FGD
    neck = below & (yy < chin_y + 0.35 * fh) & (np.abs(xx - c[0]) < 0.2 * fw)
    mask[neck] = cv2.GC_FGD
    if model is not None:
        bgd, fgd, mode = model[0].copy(), model[1].copy(), cv2.GC_EVAL_FREEZE_MODEL
    else:
        bgd, fgd, mode = np.zeros((1, 65)), np.zeros((1, 65)), cv2.GC_INIT_WITH_MASK
    try:
        cv2.grabCut(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), mask, None, bgd, fgd, iterations, mode)
    except cv2.error:  # degenerate seeds (e.g. a face filling the frame): keep the seeds
        pass
    fg = np.where((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD), 255, 0).astype(np.uint8)
    # keep the component(s) touching the face, smooth the border
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=4)
    if n > 2:
        ci = labels[int(np.clip(round(c[1]), 0, sh - 1)), int(np.clip(round(c[0]), 0, sw - 1))]
        if ci > 0:
            fg = np.where(labels == ci, 255, 0).astype(np.uint8)
    fg = cv2.resize(fg, (wid, hgt), interpolation=cv2.INTER_LINEAR)
    fg = cv2.GaussianBlur(fg, (0, 0), max(0.5, 0.5 / s))
    return np.where(fg >= 128, 255, 0).astype(np.uint8), (bgd, fgd)


def frame_masks(image: np.ndarray, lm: np.ndarray, work_size: int = 128, iterations: int = 3,
                model: GrabCutModel | None = None) -> tuple[np.ndarray, GrabCutModel]:
    """All masks of one frame: ([H, W, 4] uint8 {0, 255} in :data:`MASK_CHANNELS` order, the
    GrabCut colour models), GrabCut at ``work_size`` px with ``iterations`` (and fixed
    colour ``model`` if given), see :func:`person_mask`."""
    shape = image.shape[:2]
    person, model = person_mask(image, lm, work_size, iterations, model)
    oval = _poly(shape, face_outline(lm))
    head = (_poly(shape, head_polygon(lm)) & person) | oval
    mouth = mouth_mask(lm, shape)
    torso = person & ~head
    return np.stack([head, mouth, torso, person | head], axis=-1), model


PLATE_EVERY = 100  # the plate sees about this many frames (every n // 100-th)


def plate_frame_ids(frames: range) -> list[int]:
    """The frames of ``frames`` (the track stage: the training split) whose image and person
    mask :class:`MaskWriter` keeps for :func:`background_plate`: every
    ``max(1, len(frames) // PLATE_EVERY)``-th, from the first."""
    return list(frames)[:: max(1, len(frames) // PLATE_EVERY)]


def background_plate(frames: np.ndarray, person: np.ndarray, margin: int = 4,
                     statistic: PlateStatistic = "mean") -> tuple[np.ndarray, float]:
    """One background image for the video: per pixel, the mean or the median over the frames
    where the pixel is background (person masks dilated by ``margin`` px); pixels never seen
    are inpainted (Telea).

    The mean is the plate with the least squared error against those frames, so against
    held-out frames of the same background it is what PSNR rewards: a curtain or plants that
    move become their average, where the median picks one of their states. The median stays
    right where a person mask misses part of the person in a minority of the frames.

    Args:
        frames: [F, H, W, 3] uint8 RGB (a subsample of the video is enough).
        person: [F, H, W] uint8 person masks.
        margin: px the person masks are dilated by.
        statistic: ``"mean"`` or ``"median"`` (of an even count: the mean of the middle two).

    Returns:
        ([H, W, 3] uint8 RGB plate, fraction of pixels that had to be inpainted).

    Raises:
        ValueError: an unknown ``statistic``.
    """
    import cv2

    if statistic not in typing.get_args(PlateStatistic):
        raise ValueError(f"plate statistic {statistic!r}: use one of {', '.join(typing.get_args(PlateStatistic))}")
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    f, h, w = person.shape
    bg = np.stack([cv2.dilate(m, k) == 0 for m in person]).reshape(f, h * w)  # True where background
    count = bg.sum(0)  # [H*W] frames that see each pixel
    plate = np.zeros((h * w, 3), np.uint8)
    for c in range(3):
        channel = frames[..., c].reshape(f, h * w)
        if statistic == "mean":
            total = np.where(bg, channel, 0).sum(0, dtype=np.float64)
            value = total / np.maximum(count, 1)
        else:  # per-pixel median of the background samples: sort, invalid (256) last
            vals = np.where(bg, channel.astype(np.uint16), np.uint16(256)).T.copy()
            vals.sort(axis=1)
            lo = np.take_along_axis(vals, np.maximum(count - 1, 0)[:, None] // 2, 1)[:, 0].astype(np.float32)
            hi = np.take_along_axis(vals, np.maximum(count, 1)[:, None] // 2, 1)[:, 0].astype(np.float32)
            value = (lo + np.where(count % 2 == 1, lo, hi)) / 2
        plate[:, c] = np.clip(np.round(value), 0, 255).astype(np.uint8)
    unseen = (count == 0).reshape(h, w)
    plate = plate.reshape(h, w, 3)
    plate[unseen] = 0
    if unseen.any():
        plate = cv2.inpaint(plate, unseen.astype(np.uint8) * 255, 5, cv2.INPAINT_TELEA)
    return plate, float(unseen.mean())


class MaskWriter:
    """Computes :func:`frame_masks` and writes them as PNG on one worker thread, so the masks
    of frame i are made while the landmark detector works on frame i+1 (MediaPipe keeps one
    core busy, GrabCut and the PNG encoder release the GIL and use the other). GrabCut's
    colour models are fitted on one frame in ``refit_every`` and kept fixed in between.

    At most ``max_pending`` frames wait in the queue, so memory stays bounded whatever the
    video's length. The frames in ``plate_ids`` (:func:`plate_frame_ids`) are kept with their
    person masks for :func:`background_plate`.

    Use as a context manager; leaving it waits for the queued work and re-raises the first
    error of the worker.
    """

    def __init__(self, folder: Path, work_size: int, iterations: int, plate_ids: Collection[int],
                 max_pending: int = 16, refit_every: int = 25):
        self.folder, self.work_size, self.iterations = Path(folder), work_size, iterations
        self.refit_every = refit_every
        self._model: GrabCutModel | None = None
        self._model_age = 0
        self.plate_ids = frozenset(plate_ids)
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gstalk-masks")
        self._futures: list[Future] = []
        self.plate: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.written = 0

    def submit(self, index: int, image: np.ndarray, lm: np.ndarray) -> None:
        """Queue frame ``index`` ([H, W, 3] uint8 RGB) with its [L, >=2] px landmarks; blocks
        while ``max_pending`` frames are queued. Raises the worker's first error, if any."""
        self._raise_failed()
        self._slots.acquire()
        try:
            self._futures.append(self._pool.submit(self._work, index, image, np.array(lm, copy=True)))
        except BaseException:
            self._slots.release()
            raise

    def _work(self, index: int, image: np.ndarray, lm: np.ndarray) -> None:
        import cv2

        try:
            if self._model_age >= self.refit_every:
                self._model = None
            m, model = frame_masks(image, lm, self.work_size, self.iterations, self._model)
            if self._model is None:
                self._model, self._model_age = model, 0
            self._model_age += 1
            ok, buf = cv2.imencode(".png", m)
            (self.folder / f"{index:06d}.png").write_bytes(buf.tobytes())
            if index in self.plate_ids:
                self.plate[index] = (image, m[..., 3])
            self.written += 1
        finally:
            self._slots.release()

    def _raise_failed(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        self._futures = [f for f in self._futures if not f.done()]

    def plate_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """The kept frames [F, H, W, 3] and person masks [F, H, W] in frame order."""
        keys = sorted(self.plate)
        return np.stack([self.plate[k][0] for k in keys]), np.stack([self.plate[k][1] for k in keys])

    def __enter__(self) -> MaskWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            for f in self._futures:
                f.cancel()
        self._pool.shutdown(wait=True)
        if exc_type is None:
            self._raise_failed()
