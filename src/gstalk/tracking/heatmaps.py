"""FAN's crop and heatmap geometry, as face-alignment computes it (pure numpy).

FAN (Bulat and Tzimiropoulos 2017) sees a 256x256 crop around a face box and answers with
68 heatmaps of 64x64. face-alignment (github.com/1adrianb/face-alignment, BSD-3-Clause)
turns a box into the crop and the heatmap maxima back into image pixels with a handful of
small functions; these are the same computations, re-implemented here because the
package's own install would replace gstalk's OpenCV build (it requires ``opencv-python``,
which cannot live beside MediaPipe's ``opencv-contrib-python``) and pull numba for two
loops.

Conventions (face-alignment's): a box (x0, y0, x1, y1) in pixels gives the centre
``((x0+x1)/2, (y0+y1)/2 - 0.12 (y1-y0))`` and the scale ``((x1-x0) + (y1-y0)) / 195``;
the crop is a square of side ``200 scale`` px about the centre. A point maps to a
``resolution``-pixel crop by ``x' = resolution (x - cx) / (200 scale) + resolution / 2``.
face-alignment truncates image coordinates to integers (``int()``, towards zero) at two
places: the crop's corners and the decoded landmarks; ``truncate=True`` does the same.
"""

from __future__ import annotations

import numpy as np

REFERENCE_SCALE = 195.0  # face-alignment's S3FD box size that maps to scale 1
SCALE_FACTOR = 200.0  # crop side in px at scale 1
CENTER_Y_OFFSET = 0.12  # the crop centre sits this fraction of the box height above the box centre
CROP_SIZE = 256
HEATMAP_SIZE = 64


def box_center_scale(box: np.ndarray | tuple[float, float, float, float]) -> tuple[np.ndarray, float]:
    """The crop centre [2] float64 px and scale (crop side / 200 px) of a face box.

    Args:
        box: (x0, y0, x1, y1) pixels, x right, y down.

    Raises:
        ValueError: an empty or inverted box.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"face box {box} is empty")
    center = np.array([x1 - (x1 - x0) / 2.0, y1 - (y1 - y0) / 2.0 - (y1 - y0) * CENTER_Y_OFFSET])
    return center, ((x1 - x0) + (y1 - y0)) / REFERENCE_SCALE


def crop_matrix(center: np.ndarray, scale: float, resolution: float) -> np.ndarray:
    """[3, 3] float64 affine map from image pixels to the pixels of a ``resolution``-pixel crop
    (face-alignment's ``transform``)."""
    h = SCALE_FACTOR * scale
    return np.array([[resolution / h, 0.0, resolution * (-center[0] / h + 0.5)],
                     [0.0, resolution / h, resolution * (-center[1] / h + 0.5)],
                     [0.0, 0.0, 1.0]])


def to_crop(points: np.ndarray, center: np.ndarray, scale: float, resolution: float) -> np.ndarray:
    """Image pixels [..., 2] -> crop pixels [..., 2] float64."""
    t = crop_matrix(center, scale, resolution)
    return np.asarray(points, np.float64) @ t[:2, :2].T + t[:2, 2]


def from_crop(points: np.ndarray, center: np.ndarray, scale: float, resolution: float,
              truncate: bool = False) -> np.ndarray:
    """Crop pixels [..., 2] -> image pixels [..., 2] float64, the inverse of :func:`to_crop`;
    ``truncate`` rounds towards zero as face-alignment does (its landmarks are integers)."""
    h = SCALE_FACTOR * scale
    out = (np.asarray(points, np.float64) / resolution - 0.5) * h + np.asarray(center, np.float64)
    return np.trunc(out) if truncate else out


def crop_image(image: np.ndarray, center: np.ndarray, scale: float, resolution: int = CROP_SIZE) -> np.ndarray:
    """The square crop FAN sees: [H, W, C] uint8 -> [resolution, resolution, C] uint8.

    The region between the (truncated) images of crop pixels (1, 1) and (resolution,
    resolution) is copied onto a black canvas (the parts outside the image stay black) and
    resized with bilinear interpolation, as face-alignment's ``crop`` does.
    """
    import cv2

    ul = np.trunc(from_crop(np.array([1.0, 1.0]), center, scale, resolution)).astype(np.int64)
    br = np.trunc(from_crop(np.array([float(resolution)] * 2), center, scale, resolution)).astype(np.int64)
    ht, wd = image.shape[:2]
    canvas = np.zeros((int(br[1] - ul[1]), int(br[0] - ul[0]), *image.shape[2:]), np.uint8)
    # 1-based inclusive ranges, as in the reference
    new_x = (max(1, -ul[0] + 1), min(br[0], wd) - ul[0])
    new_y = (max(1, -ul[1] + 1), min(br[1], ht) - ul[1])
    old_x = (max(1, ul[0] + 1), min(br[0], wd))
    old_y = (max(1, ul[1] + 1), min(br[1], ht))
    if new_x[1] >= new_x[0] and new_y[1] >= new_y[0]:
        canvas[new_y[0] - 1:new_y[1], new_x[0] - 1:new_x[1]] = image[old_y[0] - 1:old_y[1], old_x[0] - 1:old_x[1]]
    return cv2.resize(canvas, (resolution, resolution), interpolation=cv2.INTER_LINEAR)


def decode_heatmaps(heatmaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks from heatmaps: the maximum of each, moved a quarter pixel towards its higher
    neighbour in x and in y (the sub-pixel refinement of face-alignment's
    ``get_preds_fromhm``; none on the border).

    Args:
        heatmaps: [B, C, H, W] float.

    Returns:
        ([B, C, 2] float32 (x, y) in heatmap pixels, in face-alignment's convention: the
        maximum's 1-based column/row, +-0.25, minus 0.5 -- so cell (0, 0) is centred on
        (0.5, 0.5); [B, C] float32 the maxima (FAN's confidence)).

    Raises:
        ValueError: not 4-D.
    """
    hm = np.asarray(heatmaps, np.float32)
    if hm.ndim != 4:
        raise ValueError(f"heatmaps must be [B, C, H, W], got shape {list(hm.shape)}")
    b, c, h, w = hm.shape
    flat = hm.reshape(b, c, h * w)
    idx = flat.argmax(-1)
    scores = np.take_along_axis(flat, idx[..., None], -1)[..., 0]
    col, row = idx % w, idx // w
    inner = (col > 0) & (col < w - 1) & (row > 0) & (row < h - 1)
    bi, ci = np.meshgrid(np.arange(b), np.arange(c), indexing="ij")
    cl, cr = np.clip(col - 1, 0, w - 1), np.clip(col + 1, 0, w - 1)
    ru, rd = np.clip(row - 1, 0, h - 1), np.clip(row + 1, 0, h - 1)
    dx = hm[bi, ci, row, cr].astype(np.float64) - hm[bi, ci, row, cl]
    dy = hm[bi, ci, rd, col].astype(np.float64) - hm[bi, ci, ru, col]
    pts = np.stack([col + 1.0, row + 1.0], -1)
    pts += np.where(inner[..., None], 0.25 * np.sign(np.stack([dx, dy], -1)), 0.0)
    return (pts - 0.5).astype(np.float32), scores.astype(np.float32)


def heatmaps_to_image(heatmaps: np.ndarray, center: np.ndarray, scale: float,
                      truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One face's heatmaps [1, C, H, W] (H = W) -> ([C, 2] float64 image pixels, [C] float32
    scores): :func:`decode_heatmaps`, then :func:`from_crop` at the heatmap resolution."""
    pts, scores = decode_heatmaps(heatmaps)
    res = float(np.asarray(heatmaps).shape[-1])
    return from_crop(pts[0].astype(np.float64), center, scale, res, truncate=truncate), scores[0]
