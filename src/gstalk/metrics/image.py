"""Image-quality metrics: PSNR (torchmetrics) and SSIM (pytorch_msssim), full frame and in boxes.

Images are [F, H, W, 3] float32 in [0, 1] (channels last); boxes are pixel rectangles
(x0, y0, x1, y1), x right and y down.
"""

from __future__ import annotations

import torch


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (data range 1): [F, H, W, C] x2 -> [F].

    Identical images give +inf (torchmetrics convention: capped by float precision).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return torch.stack([peak_signal_noise_ratio(p, t, data_range=1.0) for p, t in zip(pred, target)])


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; 11x11 Gaussian window, σ 1.5): [F, H, W, C] -> [F].

    Raises:
        ValueError: images smaller than 11 px on a side.
    """
    from pytorch_msssim import ssim as _ssim

    if min(pred.shape[1], pred.shape[2]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 px, got {pred.shape[2]}x{pred.shape[1]}")
    return _ssim(pred.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2), data_range=1.0, size_average=False)


def crop(images: torch.Tensor, boxes: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Cut one box per image and resample all to a common square side.

    Args:
        images: [F, H, W, C].
        boxes: [F, 4] (x0, y0, x1, y1) pixels.
        size: output side in pixels (default: the rounded mean box side, at least 11).

    Returns:
        [F, size, size, C] (bilinear resampling when a box differs from ``size``).
    """
    sides = (boxes[:, 2] - boxes[:, 0]).clamp_min(1)
    size = size or max(11, int(round(float(sides.mean()))))
    out = []
    for img, b in zip(images, boxes):
        x0, y0, x1, y1 = (int(round(float(v))) for v in b)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(max(x1, x0 + 1), img.shape[1]), min(max(y1, y0 + 1), img.shape[0])
        patch = img[y0:y1, x0:x1].permute(2, 0, 1)[None]
        patch = torch.nn.functional.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False)
        out.append(patch[0].permute(1, 2, 0))
    return torch.stack(out)


def image_metrics(pred: torch.Tensor, target: torch.Tensor, mouth_boxes: torch.Tensor,
                  face_boxes: torch.Tensor | None = None) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over frames: full frame, mouth box and (optionally) face box.

    Args:
        pred, target: [F, H, W, 3] in [0, 1].
        mouth_boxes, face_boxes: [F, 4] pixel boxes from the ground truth's landmarks.
    """
    out = {"psnr": float(psnr(pred, target).mean()), "ssim": float(ssim(pred, target).mean())}
    mp, mt = crop(pred, mouth_boxes), crop(target, mouth_boxes)
    out["mouth_psnr"] = float(psnr(mp, mt).mean())
    out["mouth_ssim"] = float(ssim(mp, mt).mean())
    if face_boxes is not None:
        fp, ft = crop(pred, face_boxes), crop(target, face_boxes)
        out["face_psnr"] = float(psnr(fp, ft).mean())
        out["face_ssim"] = float(ssim(fp, ft).mean())
    return out
