"""Sharpness and stability along a split: the variance of the Laplacian in a box, and the
linear trend of a per-frame series.

Sharpness is the classic focus measure (Pech-Pacheco et al. 2000): the variance of the
image's Laplacian, here of its luma, inside the face box, with no resampling (a resampled
crop would filter the very frequencies it measures). A render as sharp as the footage scores
about the ground truth's value; a blurred one much less; speckle or noise can score more.

Images are [F, H, W, 3] float in [0, 1], channels last; boxes are pixel rectangles
(x0, y0, x1, y1), x right and y down.
"""

from __future__ import annotations

import numpy as np
import torch

# ITU-R BT.601 luma weights (what OpenCV's RGB -> grey uses)
LUMA = (0.299, 0.587, 0.114)
# the 4-neighbour Laplacian (OpenCV's cv2.Laplacian with ksize=1)
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def laplacian_variance(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Variance of the 4-neighbour Laplacian of the luma inside one box per image.

    The box is rounded to whole pixels and clamped to the image; the Laplacian is taken
    at the pixels whose four neighbours lie in the box (a "valid" convolution), and its
    population variance (mean of squares minus squared mean) over those pixels is returned.

    Args:
        images: [F, H, W, 3] float in [0, 1] (RGB).
        boxes: [F, 4] (x0, y0, x1, y1) pixels, x1/y1 exclusive.

    Returns:
        [F] float64, in (intensity units)² with intensities in [0, 1]. A box narrower or
        shorter than 3 px gives NaN.

    Raises:
        ValueError: images not [F, H, W, 3], or boxes not [F, 4].
    """
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [F, H, W, 3], got {list(images.shape)}")
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must be [{images.shape[0]}, 4], got {list(boxes.shape)}")
    w = torch.tensor(LUMA, dtype=torch.float64)
    kernel = torch.tensor(LAPLACIAN, dtype=torch.float64)[None, None]
    h_img, w_img = images.shape[1], images.shape[2]
    out = torch.full((images.shape[0],), float("nan"), dtype=torch.float64)
    for k, (img, b) in enumerate(zip(images, boxes)):
        x0, y0, x1, y1 = (int(round(float(v))) for v in b)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, w_img), min(y1, h_img)
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue
        luma = (img[y0:y1, x0:x1].double() * w).sum(-1)
        lap = torch.nn.functional.conv2d(luma[None, None], kernel)[0, 0]
        out[k] = lap.var(unbiased=False)
    return out


def laplacian_energy(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared 4-neighbour Laplacian of the luma (the quantity whose variance
    :func:`laplacian_variance` takes in a box), for splitting it by region.

    Args:
        images: [F, H, W, 3] float in [0, 1] (RGB).

    Returns:
        [F, H, W] float64, (intensity units)²; pixels on the image border see zeros beyond it
        (zero padding).

    Raises:
        ValueError: images not [F, H, W, 3].
    """
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [F, H, W, 3], got {list(images.shape)}")
    luma = (images.double() * torch.tensor(LUMA, dtype=torch.float64)).sum(-1)[:, None]
    kernel = torch.tensor(LAPLACIAN, dtype=torch.float64)[None, None]
    return torch.nn.functional.conv2d(luma, kernel, padding=1)[:, 0] ** 2


def sharpness_ratio(renders: torch.Tensor, truth: torch.Tensor, boxes: torch.Tensor) -> dict[str, float]:
    """How much of the footage's fine detail the renders keep, in the face boxes.

    Args:
        renders, truth: [F, H, W, 3] float in [0, 1].
        boxes: [F, 4] face boxes (x0, y0, x1, y1) px, from the ground truth's landmarks.

    Returns:
        {"face_sharpness": mean Laplacian variance of the renders (:func:`laplacian_variance`),
        "face_sharpness_truth": the same of the ground truth, "sharpness_ratio": their
        ratio (1 = as sharp as the footage; NaN when the truth has none)}.
    """
    r = laplacian_variance(renders, boxes)
    t = laplacian_variance(truth, boxes)
    ok = torch.isfinite(r) & torch.isfinite(t)
    rm = float(r[ok].mean()) if ok.any() else float("nan")
    tm = float(t[ok].mean()) if ok.any() else float("nan")
    ratio = rm / tm if ok.any() and tm > 0 else float("nan")
    return {"face_sharpness": rm, "face_sharpness_truth": tm, "sharpness_ratio": ratio}


def linear_trend(values: np.ndarray | list[float], fps: float | None = None) -> dict[str, float]:
    """The least-squares line through a per-frame series (e.g. PSNR along the test split).

    Args:
        values: [F] per consecutive frame; non-finite entries (a perfect frame's PSNR) are
            left out of the fit.
        fps: frames per second, to also give the slope per second.

    Returns:
        {"slope_per_frame": units per frame, "trend": the fitted line's change from the first
        to the last frame (slope x (F - 1)), and with ``fps`` "slope_per_s"}; NaN with fewer
        than two finite values.
    """
    y = np.asarray(values, dtype=np.float64)
    x = np.arange(len(y), dtype=np.float64)
    ok = np.isfinite(y)
    if ok.sum() < 2:
        slope = float("nan")
    else:
        slope = float(np.polyfit(x[ok], y[ok], 1)[0])
    out = {"slope_per_frame": slope, "trend": slope * max(len(y) - 1, 0)}
    if fps is not None:
        out["slope_per_s"] = slope * fps
    return out
