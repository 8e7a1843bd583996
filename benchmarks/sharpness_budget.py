"""Where a workspace's renders lose sharpness: the face box's Laplacian energy, split.

``gstalk eval`` reports one number, ``sharpness_ratio`` (the variance of the Laplacian of
the luma in the face box, renders over ground truth; :mod:`gstalk.metrics.sharpness`). This
script says where the shortfall lies, on the held-out frames of a trained workspace:

1. how fine the detail is that the metric counts: the ground truth blurred by a Gaussian of
   0.4, 0.5 and 0.7 px (its ratio against itself, and the PSNR the blur costs);
2. the static coarse head composited over the eval's background (the torso field's render
   over the plate, as eval draws it) and over each frame's own torso and background (which
   only the ground truth has): their ratios, and the Laplacian energy of each in three
   regions of the face box by the head's alpha (opaque ≥ 0.99, partial, < 0.5), each as a
   mean over the box's pixels, so the regions' shares add up to the box's.

Usage::

    python benchmarks/sharpness_budget.py WS [--json]

Reads the workspace only. Seconds on 2 CPU cores for a 45-frame test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch

BLURS = (0.4, 0.5, 0.7)  # px, Gaussian sigma
REGIONS = {"opaque": (0.99, 2.0), "partial": (0.5, 0.99), "transparent": (-1.0, 0.5)}  # head alpha [lo, hi)


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, 4] pixel boxes (x0, y0, x1, y1; x1/y1 exclusive, rounded and clamped to the image
    as :func:`gstalk.metrics.sharpness.laplacian_variance` does) -> [F, H, W] bool."""
    m = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for j, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
        m[j, max(y0, 0):min(max(y1, 0), height), max(x0, 0):min(max(x1, 0), width)] = True
    return m


def budget(ws_path: str) -> dict[str, Any]:
    """The numbers above for workspace ``ws_path``, on its held-out frames.

    Returns:
        {"workspace", "frames", "blur": {"0.4px": {"ratio", "psnr" (dB)}, ...},
        "eval_background" / "own_background": {"ratio", "psnr"} of the coarse head over
        each, "regions": {"opaque" / "partial" / "transparent": {"share_of_box",
        "truth", "eval_background", "own_background": Laplacian energy summed over the
        region's box pixels / the box's pixel count, (intensity units)²}}}.

    Raises:
        WorkspaceError: no such workspace, or its coarse or fine stage is not done.
    """
    import cv2

    from gstalk.avatar import Avatar
    from gstalk.dataset import build_frameset, load_tracks, split_indices
    from gstalk.gaussians.splat import composite, splat
    from gstalk.metrics.image import psnr
    from gstalk.metrics.sharpness import laplacian_energy, laplacian_variance
    from gstalk.render.driver import HeadRenderer
    from gstalk.tensorio import load_tensors
    from gstalk.workspace import Workspace

    ws = Workspace.open(ws_path)
    ws.require("eval")  # the stages eval reads (coarse, fine) are done and current
    _, test = split_indices(ws)
    frames = list(test)
    data = build_frameset(ws, frames)
    gt = data.images.float() / 255.0
    boxes = load_tracks(ws).face_box[torch.tensor(frames)]
    truth = float(laplacian_variance(gt, boxes).mean())
    out: dict[str, Any] = {"workspace": str(ws.root), "frames": len(frames), "blur": {}}
    for s in BLURS:
        b = torch.from_numpy(np.stack([cv2.GaussianBlur(g.numpy(), (0, 0), s) for g in gt]))
        out["blur"][f"{s}px"] = {"ratio": float(laplacian_variance(b, boxes).mean()) / truth,
                                 "psnr": float(psnr(b, gt).mean())}
    params, _ = load_tensors(ws.path("coarse/gaussians.safetensors"))
    renderer = HeadRenderer(Avatar.from_workspace(ws))
    own, eval_bg, alphas = [], [], []
    with torch.no_grad():
        for i, f in enumerate(frames):
            c, a, _ = splat(params, data.viewmats[i:i + 1], data.K, data.width, data.height)
            own.append(composite(c, a, data.background(i)).clamp(0, 1)[0])
            eval_bg.append(composite(c, a, renderer.background(f)).clamp(0, 1)[0])
            alphas.append(a[0, ..., 0])
    alpha = torch.stack(alphas)
    inside = box_mask(boxes, data.height, data.width)
    energy = {"truth": laplacian_energy(gt)}
    for name, x in (("eval_background", torch.stack(eval_bg)), ("own_background", torch.stack(own))):
        out[name] = {"ratio": float(laplacian_variance(x, boxes).mean()) / truth, "psnr": float(psnr(x, gt).mean())}
        energy[name] = laplacian_energy(x)
    n_box = float(inside.sum())
    out["regions"] = {}
    for region, (lo, hi) in REGIONS.items():
        m = inside & (alpha >= lo) & (alpha < hi)
        out["regions"][region] = {"share_of_box": float(m.sum()) / n_box,
                                  **{k: float(e[m].sum()) / n_box for k, e in energy.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args(argv)
    r = budget(args.workspace)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['workspace']}: {r['frames']} held-out frames")
    for k, v in r["blur"].items():
        print(f"  ground truth blurred {k}: ratio {v['ratio']:.2f} (PSNR {v['psnr']:.1f} dB)")
    for k in ("eval_background", "own_background"):
        print(f"  coarse head over the {k.replace('_', ' ')}: ratio {r[k]['ratio']:.2f} (PSNR {r[k]['psnr']:.2f} dB)")
    print("  Laplacian energy per face-box pixel (x1e-5): region, share | truth, eval background, own background")
    for k, v in r["regions"].items():
        print(f"    {k:12s} {v['share_of_box']:.2f} | {v['truth'] * 1e5:.1f}, {v['eval_background'] * 1e5:.1f}, "
              f"{v['own_background'] * 1e5:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
