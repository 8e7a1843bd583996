"""Small image helpers: PNG grids written atomically (previews, eval reports)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from gstalk.workspace import atomic_write


def write_png(path: Any, image: np.ndarray) -> None:
    """Write an [H, W, 3] uint8 RGB (or [H, W] grey) image as PNG, atomically."""
    import cv2

    img = image[:, :, ::-1] if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise ValueError(f"could not encode a {image.shape} image as PNG")
    with atomic_write(path) as f:
        f.write(buf.tobytes())


def to_uint8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float image(s) in [0, 1] -> uint8."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_preview(path: Any, gt: torch.Tensor, renders: torch.Tensor) -> None:
    """PNG with one row per frame: ground truth | render. Inputs [F, H, W, 3] in [0, 1]."""
    rows = [torch.cat([g, r], dim=1) for g, r in zip(gt, renders)]
    write_png(path, to_uint8(torch.cat(rows, dim=0)))
