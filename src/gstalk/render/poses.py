"""Head pose tracks for ``gstalk render --pose FILE``.

A pose is a 4x4 world(canonical head)-to-camera matrix ``[R | t; 0 0 0 1]`` in the OpenCV
convention (x right, y down, z forward; t in metres of the canonical face model, the head
in front of the camera: t_z > 0), the same as the track stage's ``viewmats``. Every
workspace shares MediaPipe's canonical face space, so one workspace's poses drive another.

Accepted files: ``.npy`` (float [M, 4, 4] or [4, 4]; never unpickled), ``.json`` (a list of
4x4 nested lists, or an object with a ``"viewmats"`` list), a workspace folder or its
``track/tracks.safetensors`` (the tracked ``viewmats``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gstalk.errors import UsageError


def read_pose_file(path: str | Path) -> np.ndarray:
    """Read and validate a pose track.

    Returns:
        [M, 4, 4] float32 world-to-camera matrices, M >= 1.

    Raises:
        UsageError: missing/unreadable file, unknown format, wrong shape, non-finite values,
            a last row other than (0, 0, 0, 1), a rotation that is not orthonormal with
            det +1 (tolerance 1e-2), or a head behind the camera (t_z <= 0). The message
            names the file and the first bad pose.
    """
    p = Path(path)
    fix = "give a .npy/.json of 4x4 world-to-camera matrices, or a workspace (docs/cli.md, render --pose)"
    if not p.exists():
        raise UsageError(f"Pose file {p} does not exist.", hint=fix)
    try:
        if p.is_dir() or p.suffix == ".safetensors":
            from gstalk.tensorio import load_tensors

            t, _ = load_tensors(p / "track" / "tracks.safetensors" if p.is_dir() else p)
            if "viewmats" not in t:
                raise UsageError(f"{p} holds no 'viewmats' tensor.", hint=fix)
            data = np.asarray(t["viewmats"])
        elif p.suffix == ".npy":
            data = np.load(p, allow_pickle=False)
        elif p.suffix == ".json":
            obj = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(obj, dict):
                obj = obj.get("viewmats")
            data = np.asarray(obj, dtype=np.float64)
        else:
            raise UsageError(f"Pose file {p} has an unknown type '{p.suffix}'.", hint=fix)
    except UsageError:
        raise
    except (OSError, ValueError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"Pose file {p} could not be read: {why}.", hint=fix) from None
    except Exception as exc:  # e.g. a corrupt safetensors header
        raise UsageError(f"Pose file {p} could not be read ({type(exc).__name__}).", hint=fix) from None
    return validate_poses(data, p)


def validate_poses(data: object, source: str | Path = "poses") -> np.ndarray:
    """Check an array of poses (see :func:`read_pose_file`): [M, 4, 4] or [4, 4] -> [M, 4, 4]
    float32. Raises UsageError naming ``source``."""
    try:
        a = np.asarray(data, dtype=np.float64)
    except (ValueError, TypeError):
        raise UsageError(f"{source}: the poses are not a numeric array.",
                         hint="give 4x4 world-to-camera matrices") from None
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1:] != (4, 4) or a.shape[0] == 0:
        raise UsageError(f"{source}: expected an array of 4x4 matrices [M, 4, 4], got shape {list(a.shape)}.",
                         hint="give 4x4 world-to-camera matrices")
    bad = ~np.isfinite(a).all(axis=(1, 2))
    if bad.any():
        raise UsageError(f"{source}: pose {int(np.argmax(bad))} contains NaN or infinity.")
    row = np.abs(a[:, 3] - np.array([0.0, 0.0, 0.0, 1.0])).max(1) > 1e-3
    if row.any():
        raise UsageError(f"{source}: pose {int(np.argmax(row))} does not end with the row (0, 0, 0, 1).",
                         hint="give homogeneous 4x4 matrices [R | t; 0 0 0 1]")
    r = a[:, :3, :3]
    ortho = np.abs(np.einsum("mji,mjk->mik", r, r) - np.eye(3)).max((1, 2)) > 1e-2
    det = np.linalg.det(r) <= 0
    if (ortho | det).any():
        k = int(np.argmax(ortho | det))
        raise UsageError(f"{source}: pose {k} has no valid rotation (R is not orthonormal with det +1).",
                         hint="the 3x3 block must be a rotation; are these camera-to-world matrices or scaled?")
    behind = a[:, 2, 3] <= 0
    if behind.any():
        raise UsageError(f"{source}: pose {int(np.argmax(behind))} puts the head behind the camera (t_z <= 0).",
                         hint="use world-to-camera matrices (OpenCV: z forward), not camera-to-world")
    return a.astype(np.float32)


def ping_pong(n_out: int, m: int) -> list[int]:
    """Indices into M poses for ``n_out`` frames, back and forth: 0..M-1, M-2..0, 1, ..."""
    if m == 1:
        return [0] * n_out
    period = 2 * (m - 1)
    return [k % period if k % period < m else period - k % period for k in range(n_out)]

