"""Where a workspace's held-out error lies: the head, the torso, or outside the person.

``gstalk eval`` reports the full frame's PSNR. This script splits the squared error of the
held-out renders by the tracked masks of each frame: the head mask, the torso mask (person
and not head) and the rest (outside the person), for

- ``model``: the fine model's renders, as eval draws them (its audio, its torso);
- ``coarse_own_background``: the static coarse head over each frame's *own* torso and
  background (which only the ground truth has): what the head alone costs;
- ``denoised_truth``: the ground truth through OpenCV's non-local means (``h`` = 3, 7 × 7
  patches, 21 × 21 search): what a render with every detail of the footage but not its noise
  would score, so what the footage's noise alone costs (woman-grey-coat: SSIM 0.972, so
  her 0.93 target is not out of reach for noise).

For each, the PSNR of the split's mean squared error (lower than eval's mean of per-frame
PSNR), and per region its share of the image (``area``), its share of the squared error
(``share``) and the PSNR the frames would reach were that region perfect
(``psnr_if_perfect``); the same for SSIM: the SSIM map's mean over the region (``ssim``) and
its share of the map's loss, 1 − SSIM (``ssim_loss_share``). It found, for issue 23, that
61 % of man-black-sweater's error lay outside the person, where the torso field drew the
shoulders too high (docs/methods.md, "Torso: residual flow").

Usage::

    python benchmarks/error_split.py WS [--json]

Reads the workspace only. Seconds on 2 CPU cores for a 45-frame test split.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import torch

REGIONS = ("head", "torso", "outside")


def split_error(pred: torch.Tensor, gt: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The squared error of ``pred`` against ``gt`` ([F, H, W, 3] in [0, 1]) split over the
    boolean ``masks`` ([F, H, W] each; they should tile the frames).

    Returns:
        {"psnr_of_mean_mse": dB, "ssim": the mean of the SSIM map, region: {"area", "share",
        "psnr_if_perfect" (dB), "ssim" (the map's mean over the region), "ssim_loss_share"
        (the region's share of the map's 1 − SSIM, summed over the frames' pixels)}}. The SSIM
        map is torchmetrics' (11 × 11 Gaussian window, σ 1.5, the channels' mean), whose mean
        is eval's SSIM to within the borders' handling.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    se = (pred.double() - gt.double()).pow(2).mean(-1)  # [F, H, W]
    total = float(se.sum())
    mse = float(se.mean())
    maps = []
    for p, t in zip(pred, gt):  # frame by frame: torchmetrics' full map holds several copies of its input
        _, m = structural_similarity_index_measure(p.permute(2, 0, 1)[None].double(), t.permute(2, 0, 1)[None].double(),
                                                   data_range=1.0, return_full_image=True)
        maps.append(m[0].mean(0))
    ssim_map = torch.stack(maps)  # [F, H, W]
    loss = (1.0 - ssim_map).clamp_min(0.0)
    loss_total = float(loss.sum())
    out: dict[str, Any] = {"psnr_of_mean_mse": -10.0 * math.log10(max(mse, 1e-20)), "ssim": float(ssim_map.mean())}
    for name, m in masks.items():
        share = float(se[m].sum()) / total if total > 0 else 0.0
        left = mse * (1.0 - share)
        out[name] = {"area": float(m.double().mean()), "share": share,
                     "psnr_if_perfect": -10.0 * math.log10(left) if left > 0 else math.inf,
                     "ssim": float(ssim_map[m].mean()) if m.any() else math.nan,
                     "ssim_loss_share": float(loss[m].sum()) / loss_total if loss_total > 0 else 0.0}
    return out


def error_split(ws_path: str) -> dict[str, Any]:
    """The numbers above for workspace ``ws_path``, on its held-out frames.

    Returns:
        {"workspace", "frames", "model": :func:`split_error`, "coarse_own_background": ...}.

    Raises:
        WorkspaceError: no such workspace, or its coarse or fine stage is not done.
    """
    from gstalk.avatar import Avatar
    from gstalk.dataset import build_frameset, split_indices
    from gstalk.progress import SILENT
    from gstalk.render.driver import HeadRenderer
    from gstalk.stages.evaluate import render_split
    from gstalk.tensorio import load_tensors
    from gstalk.train.coarse import render_frames
    from gstalk.workspace import COARSE_GAUSSIANS, Workspace

    ws = Workspace.open(ws_path)
    ws.require("eval")  # the stages eval reads (coarse, fine) are done and current
    _, test = split_indices(ws)
    avatar = Avatar.from_workspace(ws)
    # the test frames with the whole clip's audio windows at the training A/V offset, as eval
    data = build_frameset(ws, test, audio_offset=int(avatar.meta.get("av_offset_frames", 0)))
    assert data.audio is not None
    gt = data.images.float() / 255.0
    renderer = HeadRenderer(avatar)
    model = render_split(renderer, renderer.conditions(data.audio.numpy()), test, SILENT, "test frames")
    coarse, _ = load_tensors(ws.path(COARSE_GAUSSIANS))
    own = render_frames(coarse, data)  # over each frame's own torso and background
    head = data.head_masks > 127
    torso = (data.torso_masks > 127) & ~head if data.torso_masks is not None else torch.zeros_like(head)
    masks = {"head": head, "torso": torso, "outside": ~(head | torso)}
    return {"workspace": str(ws.root), "frames": len(test),
            "model": split_error(model, gt, masks), "coarse_own_background": split_error(own, gt, masks),
            "denoised_truth": split_error(denoised(data.images), gt, masks)}


def denoised(images: torch.Tensor, h: float = 3.0) -> torch.Tensor:
    """``images`` [F, H, W, 3] uint8 RGB through OpenCV's colour non-local means (strength
    ``h`` for luminance and colour, 7 × 7 patches, 21 × 21 search) -> [F, H, W, 3] float32 in
    [0, 1]."""
    import cv2
    import numpy as np

    out = [cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(im), None, h, h, 7, 21) for im in images.numpy()]
    return torch.from_numpy(np.stack(out)).float() / 255.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args(argv)
    r = error_split(args.workspace)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['workspace']}: {r['frames']} held-out frames")
    for key, label in (("model", "fine model"), ("coarse_own_background", "coarse head over each frame's own torso"),
                       ("denoised_truth", "the ground truth denoised (non-local means, h 3)")):
        v = r[key]
        parts = ", ".join(f"{k} {v[k]['share'] * 100:.0f} % (area {v[k]['area'] * 100:.0f} %, "
                          f"{v[k]['psnr_if_perfect']:.2f} dB if perfect)" for k in REGIONS)
        print(f"  {label}: {v['psnr_of_mean_mse']:.2f} dB; error in {parts}")
        parts = ", ".join(f"{k} {v[k]['ssim']:.3f} ({v[k]['ssim_loss_share'] * 100:.0f} % of the loss)"
                          for k in REGIONS)
        print(f"    SSIM {v['ssim']:.4f}: {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
