"""A stand-in for FAN, shaped like it, that reads the synthetic mannequin: for tests only.

FAN's weights cannot be shipped or downloaded, so the tests script this small module with
``torch.jit.script`` and save it as a TorchScript archive; ``--fan-weights`` then loads it
exactly as it would load face-alignment's ``2DFAN4-cd938726ad.zip``. Like FAN it maps a
[B, 3, 256, 256] RGB crop in [0, 1] to 68 heatmaps of 64x64.

It is not a landmark detector: it places 68 Gaussian blobs at a fixed template (the
mannequin's closed-mouth iBUG points in the crop, see :func:`mannequin_fan`) and moves
the jaw and lower-lip points down by the height of the dark mouth interior it finds by
colour, so the mouth code it yields follows the clip's known jaw opening.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn


class MannequinFAN(nn.Module):
    """Input [B, 3, 256, 256] float32 RGB in [0, 1] -> [B, 68, 64, 64] float32 heatmaps.

    Args:
        template: [68, 2] float32 (x, y) heatmap pixels of the closed-mouth points (cell
            (0, 0) centred on (0.5, 0.5), face-alignment's convention).
        jaw_weight: [68] float32, how far each point moves down per heatmap pixel of mouth
            interior height (1 for the lower inner lip, 0 for points above the mouth).
        closed_rows: crop rows of mouth interior seen with the mouth closed.
        sigma: blob width in heatmap pixels.
    """

    def __init__(self, template: torch.Tensor, jaw_weight: torch.Tensor, closed_rows: float = 0.0,
                 sigma: float = 1.5):
        super().__init__()
        self.register_buffer("template", template.float().reshape(68, 2))
        self.register_buffer("jaw_weight", jaw_weight.float().reshape(68))
        self.closed_rows = float(closed_rows)
        self.sigma = float(sigma)

    def interior_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, 256, 256] -> [B] float32: crop rows showing the dark red inside of the mouth."""
        r, g = x[:, 0], x[:, 1]
        interior = (r > 0.1) & (r < 0.33) & (g < 0.55 * r)
        return interior.any(dim=2).float().sum(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = (self.interior_rows(x) - self.closed_rows).clamp(min=0.0)
        drop = (rows / 4.0)[:, None] * self.jaw_weight[None]  # [B, 68] in heatmap pixels
        pts = self.template[None].expand(x.shape[0], 68, 2)
        px = pts[..., 0]
        py = pts[..., 1] + drop
        grid = torch.arange(64, dtype=torch.float32, device=x.device) + 0.5
        dx = grid[None, None, None, :] - px[:, :, None, None]
        dy = grid[None, None, :, None] - py[:, :, None, None]
        return torch.exp(-(dx * dx + dy * dy) / (2.0 * self.sigma * self.sigma))


def mannequin_fan(pose: np.ndarray, focal: float, size: int) -> MannequinFAN:
    """A :class:`MannequinFAN` for the mannequin: its 68 iBUG points with the mouth closed, in
    the heatmap pixels of the crop FAN gets from MediaPipe's box of that frame, each point's
    jaw weight, and the mouth interior seen closed.

    Args:
        pose: [4, 4] head-to-camera transform; focal: px; size: frame side px (the clip's).

    Raises:
        RuntimeError: MediaPipe finds no face in the rendered frame.
    """
    from gstalk.testing.mannequin import deformed_vertices, render
    from gstalk.tracking.detector import MediaPipeDetector
    from gstalk.tracking.heatmaps import CROP_SIZE, HEATMAP_SIZE, box_center_scale, crop_image, to_crop
    from gstalk.tracking.schemes import IBUG68_MESH_IDS

    img, uv = render(0.0, pose, focal, 2 * size)  # room around the head, as in extracted frames
    with MediaPipeDetector(video=False, num_faces=1) as det:
        faces = det.detect(img)
    if not faces:
        raise RuntimeError("MediaPipe found no face in the mannequin frame")
    center, scale = box_center_scale(faces[0].bbox)
    ids = list(IBUG68_MESH_IDS)
    template = to_crop(uv[ids], center, scale, HEATMAP_SIZE)
    drop = (deformed_vertices(0.0) - deformed_vertices(1.0))[:, 1]  # metres each vertex moves down when open
    weight = np.clip(drop[ids] / max(drop[IBUG68_MESH_IDS[66]], 1e-12), 0.0, None)
    module = MannequinFAN(torch.from_numpy(template.astype(np.float32)), torch.from_numpy(weight.astype(np.float32)))
    crop = crop_image(img, center, scale, CROP_SIZE)
    x = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))).float()[None] / 255.0
    module.closed_rows = float(module.interior_rows(x)[0])
    return module


def save_mannequin_fan(path: str | Path, pose: np.ndarray, focal: float, size: int) -> Path:
    """Script :class:`MannequinFAN` for the mannequin seen with ``pose``/``focal``/``size`` and
    save it as a TorchScript archive at ``path``; returns the path."""
    import warnings

    with warnings.catch_warnings():  # torch marks TorchScript deprecated; FAN's archives are TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(mannequin_fan(pose, focal, size)), str(path))
    return Path(path)
