"""Gaussians as a standard 3DGS PLY point cloud (plyfile), readable by common 3DGS viewers.

Layout per vertex (Kerbl et al.'s ``save_ply``): ``x y z nx ny nz f_dc_0..2
f_rest_0..(3(K-1)-1) opacity scale_0..2 rot_0..3``, all float32, with raw (pre-activation)
values: opacity as a logit, scales as logs, rotation as an unnormalised wxyz quaternion,
``f_rest`` channel-major (all coefficients of R, then G, then B).
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import torch

from gstalk.errors import WorkspaceError
from gstalk.workspace import atomic_write


def _attribute_names(n_rest: int) -> list[str]:
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(n_rest)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def save_ply(path: str | Path, params: dict[str, torch.Tensor]) -> None:
    """Write raw Gaussian parameters (see :mod:`gstalk.gaussians.model`) as a 3DGS PLY, atomically."""
    from plyfile import PlyData, PlyElement

    means = params["means"].detach().cpu().numpy()
    n = means.shape[0]
    f_dc = params["sh0"].detach().cpu().reshape(n, 3).numpy()
    f_rest = params["shN"].detach().cpu().transpose(1, 2).reshape(n, -1).numpy()
    cols = [means, np.zeros_like(means), f_dc, f_rest,
            params["opacities"].detach().cpu().reshape(n, 1).numpy(),
            params["scales"].detach().cpu().numpy(), params["quats"].detach().cpu().numpy()]
    data = np.concatenate(cols, axis=1).astype(np.float32)
    names = _attribute_names(f_rest.shape[1])
    arr = np.ascontiguousarray(data).view(np.dtype([(a, "<f4") for a in names])).reshape(n)
    buf = BytesIO()
    PlyData([PlyElement.describe(arr, "vertex")]).write(buf)
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def load_ply(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a 3DGS PLY into raw parameters: means, scales, quats, opacities, sh0, shN.

    Raises:
        WorkspaceError: missing file or missing attributes.
    """
    from plyfile import PlyData

    path = Path(path)
    try:
        v = PlyData.read(str(path))["vertex"]
        names = v.data.dtype.names
        get = lambda ks: np.stack([np.asarray(v[k], np.float32) for k in ks], axis=1)  # noqa: E731
        rest = sorted((k for k in names if k.startswith("f_rest_")), key=lambda k: int(k.split("_")[-1]))
        n = len(v.data)
        shN = get(rest).reshape(n, 3, -1).transpose(0, 2, 1) if rest else np.zeros((n, 0, 3), np.float32)
        return {
            "means": torch.from_numpy(get(["x", "y", "z"])),
            "scales": torch.from_numpy(get(["scale_0", "scale_1", "scale_2"])),
            "quats": torch.from_numpy(get(["rot_0", "rot_1", "rot_2", "rot_3"])),
            "opacities": torch.from_numpy(np.asarray(v["opacity"], np.float32)),
            "sh0": torch.from_numpy(get(["f_dc_0", "f_dc_1", "f_dc_2"]))[:, None, :],
            "shN": torch.from_numpy(np.ascontiguousarray(shN)),
        }
    except (OSError, ValueError, KeyError) as exc:
        raise WorkspaceError(f"{path} is not a readable 3DGS PLY ({exc}).", path=path) from None
