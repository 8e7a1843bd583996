"""What the background plate costs on a workspace's held-out frames, by how it is made.

Behind the person, every held-out render shows the plate (the track stage's
``background.png``), so the plate alone decides the error there. This script remakes the
plate from the workspace's frames and person masks four ways, the per-pixel statistic
(``median`` or ``mean``, :func:`gstalk.tracking.masks.background_plate`) times the frames
it sees (``all`` the clip's, as the track stage took them before issue 23's fix, or only the
``training`` split's, as it does now; :func:`gstalk.tracking.masks.plate_frame_ids` of each),
and scores each against the held-out frames where their person mask, dilated as the plate's
are, is off:

- ``psnr_background``: PSNR over those pixels (8-bit, all channels);
- ``mse_share_of_frame``: their squared error summed and divided by the whole frames'
  pixel count, i.e. what the background adds to a full frame's MSE (8-bit² units), to set
  against the MSE of eval's PSNR;
- ``workspace``: the same for the workspace's own plate.

Found for issue 23: on woman-grey-coat (a curtain and plants that move) the mean of the
training frames scores ~1 dB better than their median behind her (docs/methods.md, "The
background plate").

Usage::

    python benchmarks/plate_error.py WS [--json]

Reads the workspace only; seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import numpy as np


def plate_error(ws_path: str) -> dict[str, Any]:
    """The numbers above for workspace ``ws_path``.

    Returns:
        {"background_area": the fraction of the held-out frames' pixels scored,
        "workspace" | "median_all" | "mean_all" | "median_training" | "mean_training":
        {"psnr_background": dB, "mse_share_of_frame": 8-bit² units}}.

    Raises:
        WorkspaceError: no such workspace; FileNotFoundError: its track stage has not run.
    """
    import cv2

    from gstalk.dataset import load_background, load_frames, load_masks, split_indices
    from gstalk.tracking.masks import background_plate, plate_frame_ids
    from gstalk.workspace import Workspace

    ws = Workspace.open(ws_path)
    train, test = split_indices(ws)
    n = int(ws.stage("extract").summary["n_frames"])
    sets = {"all": plate_frame_ids(range(n)), "training": plate_frame_ids(train)}
    test_frames = load_frames(ws, list(test)).astype(np.float64)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))  # background_plate's margin of 4 px
    behind = np.stack([cv2.dilate(m, k) == 0 for m in load_masks(ws, list(test))[..., 3]])  # [T, H, W]

    def score(plate: np.ndarray) -> dict[str, float]:
        err = ((test_frames - plate.astype(np.float64)[None]) ** 2).mean(-1)
        mse = float(err[behind].mean())
        return {"psnr_background": 10 * math.log10(255.0**2 / mse),
                "mse_share_of_frame": float(err[behind].sum() / behind.size)}

    out: dict[str, Any] = {"background_area": float(behind.mean()), "workspace": score(load_background(ws))}
    for frames, ids in sets.items():
        images, person = load_frames(ws, ids), load_masks(ws, ids)[..., 3]
        for statistic in ("median", "mean"):
            out[f"{statistic}_{frames}"] = score(background_plate(images, person, statistic=statistic)[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = plate_error(a.workspace)
    if a.json:
        json.dump(r, sys.stdout, indent=2)
        print()
        return
    print(f"background: {r['background_area']:.1%} of the held-out frames' pixels")
    print(f"{'plate':<18} {'PSNR behind, dB':>16} {'MSE added to a frame':>21}")
    for k, v in r.items():
        if isinstance(v, dict):
            print(f"{k:<18} {v['psnr_background']:>16.2f} {v['mse_share_of_frame']:>21.2f}")


if __name__ == "__main__":
    main()
