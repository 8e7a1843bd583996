"""How much a trained avatar's mouth changes with the viewpoint alone.

The renders of new speech take their head poses from the training clip (``render --pose
loop``). If the avatar's mouth is consistent in 3D, a head that nods shows the same mouth,
seen from a little above or below; if the mouth is made of layers at the wrong depths, the
lip gap seen between them opens and closes with the head's pitch, whatever the speech says,
and the sync read on the renders falls (docs/methods.md, "The mouth seen from another
angle"). This script holds the mouth code fixed (the neutral code, 0: the speaker's average
mouth) and renders:

- ``loop``: the first ``--frames`` poses of the loop over the training frames, as ``render``
  and ``eval --audio`` use them;
- ``still``: the most frontal training pose, held (the noise floor: identical frames).

MediaPipe reads each frame's inner-lip gap (landmarks 13-14, px), and the script reports its
mean and spread, and for ``loop`` its least-squares slope against the camera's pitch
(degrees, :func:`gstalk.tracking.pose.view_angles`) and their correlation.

Usage::

    python benchmarks/mouth_view.py WS [--frames 250] [--json]

Reads the workspace only; 15 s on 2 CPU cores for 250 frames at 256 px (obama, 1 thread).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch


def lip_gaps(ws_path: str, frames: int = 250, still_frame: int | None = None) -> dict[str, Any]:
    """The numbers above for workspace ``ws_path``; ``still_frame``: the pose held in the
    "still" rows (a frame number; default the most frontal training frame).

    Returns:
        {"workspace", "frames", "loop": {"gap_px", "gap_sd_px", "slope_px_per_deg",
        "corr_pitch", "pitch_sd_deg", "read"}, "still": {"gap_px", "gap_sd_px", "read"}}
        ("read": frames in which MediaPipe found the face; slopes and correlations NaN when
        fewer than 3 were read).

    Raises:
        WorkspaceError: no such workspace, or its fine stage is not done.
    """
    from gstalk.avatar import Avatar
    from gstalk.render.driver import HeadRenderer, frontal_frame, loop_poses
    from gstalk.tracking.detector import MediaPipeDetector
    from gstalk.tracking.pose import view_angles
    from gstalk.workspace import Workspace

    ws = Workspace.open(ws_path)
    ws.require("fine")
    avatar = Avatar.from_workspace(ws)
    model = avatar.model
    renderer = HeadRenderer(avatar, backend="auto")
    n = int(frames)
    if model.articulator is not None:
        fixed = model.code_windows(torch.zeros(n, model.articulator.out_dim))
    else:  # driven by the audio features directly: their (normalised) mean, 0
        fixed = torch.zeros(n, avatar.audio.window, int(avatar.audio.tensors["mean"].shape[-1]))
    fixed = fixed.to(renderer.device)
    out: dict[str, Any] = {"workspace": str(ws.root), "frames": n}
    viewmats = avatar.viewmats.numpy().astype(np.float64)
    front = frontal_frame(avatar.viewmats, avatar.train) if still_frame is None else int(still_frame)
    with MediaPipeDetector(video=False, num_faces=1) as det:
        for mode in ("loop", "still"):
            poses = loop_poses(n, avatar.train) if mode == "loop" else [front] * n
            gap = np.full(n, np.nan)
            for i, pose in enumerate(poses):  # as eval renders its oracle and neutral rows
                img = (renderer.render(renderer.head.windows(fixed, i), pose) * 255.0).round().to(torch.uint8)
                faces = det.detect(np.ascontiguousarray(img.numpy()))
                if faces:
                    lm = faces[0].landmarks
                    gap[i] = float(np.linalg.norm(lm[14, :2] - lm[13, :2]))
            ok = np.isfinite(gap)
            row: dict[str, Any] = {"gap_px": float(np.nanmean(gap)) if ok.any() else float("nan"),
                                   "gap_sd_px": float(np.nanstd(gap)) if ok.any() else float("nan"),
                                   "read": int(ok.sum())}
            if mode == "loop":
                pitch = view_angles(viewmats[poses])[:, 1]
                row["pitch_sd_deg"] = float(pitch.std())
                enough = ok.sum() >= 3 and pitch[ok].std() > 0 and gap[ok].std() > 0
                row["slope_px_per_deg"] = float(np.polyfit(pitch[ok], gap[ok], 1)[0]) if enough else float("nan")
                row["corr_pitch"] = float(np.corrcoef(pitch[ok], gap[ok])[0, 1]) if enough else float("nan")
            out[mode] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace")
    ap.add_argument("--frames", type=int, default=250, help="loop poses to render (default 250)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    r = lip_gaps(args.workspace, args.frames)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    lo, st = r["loop"], r["still"]
    print(f"{r['workspace']}: neutral mouth code, {r['frames']} frames")
    print(f"  loop poses  : lip gap {lo['gap_px']:.2f} px (sd {lo['gap_sd_px']:.2f}), "
          f"{lo['slope_px_per_deg']:+.3f} px per degree of pitch (r {lo['corr_pitch']:+.2f}; "
          f"pitch sd {lo['pitch_sd_deg']:.1f} deg), read in {lo['read']} frames")
    print(f"  still, frontal: lip gap {st['gap_px']:.2f} px (sd {st['gap_sd_px']:.2f}), read in {st['read']} frames")
    return 0


if __name__ == "__main__":
    sys.exit(main())
