"""Per-frame masks from landmarks + OpenCV, and the background plate.

No segmentation network ships with a licence and a size we can package, so gstalk builds
masks from the MediaPipe landmarks and refines the person/background split with OpenCV's
GrabCut (Rother et al. 2004), seeded from the landmarks:

- ``head``: the face oval, widened and extended upwards to take in hair and ears, kept
  where GrabCut says "person" (and always the face oval itself);
- ``mouth``: the outer-lip polygon, dilated by 6 % of the face height;
- ``person``: GrabCut foreground;
- ``torso``: person and not head (neck, shoulders, hair outside the head polygon).

All masks are [H, W] uint8 in {0, 255} at the frame's resolution.
"""

from __future__ import annotations

import numpy as np

from gstalk.tracking.canonical import CHIN, FACE_OVAL, FOREHEAD, LIPS_INNER, LIPS_OUTER

MASK_CHANNELS = ("head", "mouth", "torso", "person")


def _poly(img_shape: tuple[int, int], pts: np.ndarray) -> np.ndarray:
    import cv2

    m = np.zeros(img_shape, np.uint8)
    cv2.fillPoly(m, [np.round(pts * 16).astype(np.int32)], 255, lineType=cv2.LINE_8, shift=4)
    return m


def face_geometry(lm: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(centre [2] px, face width px, face height px) of one frame's [478, >=2] landmarks."""
    oval = lm[list(FACE_OVAL), :2]
    centre = oval.mean(0)
    width = float(np.ptp(oval[:, 0]))
    height = float(np.linalg.norm(lm[FOREHEAD, :2] - lm[CHIN, :2]))
    return centre, width, height


def head_polygon(lm: np.ndarray, widen: float = 1.18, up: float = 0.30) -> np.ndarray:
    """The face oval widened by ``widen`` about its centre, with points above the centre
    pushed up by up to ``up`` x face height (hair): [36, 2] px."""
    oval = lm[list(FACE_OVAL), :2].astype(np.float64)
    c, _, h = face_geometry(lm)
    p = c + (oval - c) * np.array([widen, 1.0])
    above = np.clip((c[1] - p[:, 1]) / (0.5 * h), 0.0, 1.0)
    p[:, 1] -= up * h * above
    return p


def mouth_mask(lm: np.ndarray, shape: tuple[int, int], dilate_frac: float = 0.06) -> np.ndarray:
    """Outer-lip polygon dilated by ``dilate_frac`` x face height: [H, W] uint8 {0, 255}."""
    import cv2

    _, _, h = face_geometry(lm)
    m = _poly(shape, lm[list(LIPS_OUTER), :2]) | _poly(shape, lm[list(LIPS_INNER), :2])
    r = max(1, int(round(dilate_frac * h)))
    return cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))


def person_mask(image: np.ndarray, lm: np.ndarray, work_size: int = 128, iterations: int = 3) -> np.ndarray:
    """Person vs background with GrabCut seeded from the landmarks.

    Seeds (at ``work_size`` px): sure foreground = the face oval and a neck block under the
    chin; sure background = the image's top corners beside the head, above the chin line;
    probable foreground = the head polygon and everything below the chin between the
    shoulders; probable background elsewhere.

    Args:
        image: [H, W, 3] uint8 RGB.
        lm: [478, >=2] landmarks in pixels of ``image``.

    Returns:
        [H, W] uint8 {0, 255}.
    """
    import cv2

    hgt, wid = image.shape[:2]
    s = work_size / max(hgt, wid)
    sw, sh = max(8, int(round(wid * s))), max(8, int(round(hgt * s)))
    small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
    lms = lm[:, :2] * np.array([sw / wid, sh / hgt])
    c, fw, fh = face_geometry(lms)
    chin_y = lms[CHIN, 1]
    mask = np.full((sh, sw), cv2.GC_PR_BGD, np.uint8)
    yy, xx = np.mgrid[0:sh, 0:sw]
    below = yy > chin_y
    mask[below & (np.abs(xx - c[0]) < 1.6 * fw)] = cv2.GC_PR_FGD
    mask[_poly((sh, sw), head_polygon(lms, 1.25, 0.45)) > 0] = cv2.GC_PR_FGD
    far_side = (np.abs(xx - c[0]) > 1.05 * fw) & (yy < chin_y - 0.15 * fh)
    far_top = yy < (c[1] - 1.05 * fh)
    mask[far_side | far_top] = cv2.GC_BGD
    mask[_poly((sh, sw), lms[list(FACE_OVAL)]) > 0] = cv2.GC_FGD
    neck = below & (yy < chin_y + 0.35 * fh) & (np.abs(xx - c[0]) < 0.2 * fw)
    mask[neck] = cv2.GC_FGD
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    try:
        cv2.grabCut(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
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
    return np.where(fg >= 128, 255, 0).astype(np.uint8)


def frame_masks(image: np.ndarray, lm: np.ndarray, work_size: int = 128, iterations: int = 3) -> np.ndarray:
    """All masks of one frame: [H, W, 4] uint8 {0, 255} in :data:`MASK_CHANNELS` order
    (GrabCut at ``work_size`` px with ``iterations``, see :func:`person_mask`)."""
    shape = image.shape[:2]
    person = person_mask(image, lm, work_size, iterations)
    oval = _poly(shape, lm[list(FACE_OVAL), :2])
    head = (_poly(shape, head_polygon(lm)) & person) | oval
    mouth = mouth_mask(lm, shape)
    torso = person & ~head
    return np.stack([head, mouth, torso, person | head], axis=-1)


def background_plate(frames: np.ndarray, person: np.ndarray, margin: int = 4) -> tuple[np.ndarray, float]:
    """One background image for the video: the per-pixel median over the frames where the
    pixel is background (person masks dilated by ``margin`` px); pixels never seen are
    inpainted (Telea).

    Args:
        frames: [F, H, W, 3] uint8 RGB (a subsample of the video is enough).
        person: [F, H, W] uint8 person masks.

    Returns:
        ([H, W, 3] uint8 RGB plate, fraction of pixels that had to be inpainted).
    """
    import cv2

    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
    bg = np.stack([cv2.dilate(m, k) == 0 for m in person])  # [F, H, W] True where background
    data = frames.astype(np.float32)
    data[~bg] = np.nan
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            plate = np.nanmedian(data, axis=0)
    unseen = ~bg.any(0)
    plate[unseen] = 0
    plate = np.clip(np.nan_to_num(plate), 0, 255).astype(np.uint8)
    if unseen.any():
        plate = cv2.inpaint(plate, unseen.astype(np.uint8) * 255, 5, cv2.INPAINT_TELEA)
    return plate, float(unseen.mean())
