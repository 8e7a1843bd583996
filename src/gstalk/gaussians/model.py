"""The set of 3D Gaussians in canonical head space, its activations and initialisation.

Parameters are stored raw (pre-activation) in a ``torch.nn.ParameterDict``, as 3DGS and
gsplat do (Kerbl et al. 2023, Sec. 4):

==========  ===============  ==========================================================
name        shape / dtype    meaning (activation)
==========  ===============  ==========================================================
means       [N, 3] float32   centres, metres, canonical head space (identity)
scales      [N, 3] float32   log of the standard deviations along the local axes (exp)
quats       [N, 4] float32   rotation quaternion, wxyz, unnormalised (normalise)
opacities   [N] float32      logit of the opacity (sigmoid)
sh0         [N, 1, 3]        degree-0 SH coefficient of RGB (colour = SH + 0.5)
shN         [N, K-1, 3]      higher-degree SH coefficients, K = (sh_degree + 1)^2
==========  ===============  ==========================================================
"""

from __future__ import annotations

import math

import numpy as np
import torch

SH_C0 = 0.28209479177387814  # Y_0^0 = 1 / (2 sqrt(pi))

PARAM_NAMES = ("means", "scales", "quats", "opacities", "sh0", "shN")


def rgb_to_sh0(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3] colours in [0, 1] -> degree-0 SH coefficients (3DGS: (rgb - 0.5) / C0)."""
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_sh0`."""
    return sh0 * SH_C0 + 0.5


def num_sh_bases(degree: int) -> int:
    """K = (degree + 1)^2 SH coefficients per channel."""
    return (degree + 1) ** 2


def knn_mean_distance(points: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """Mean distance of each point to its ``k`` nearest neighbours: [P, 3] -> [P] (metres)."""
    out = torch.empty(points.shape[0], dtype=points.dtype)
    for s in range(0, points.shape[0], chunk):
        d = torch.cdist(points[s:s + chunk], points)
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
        out[s:s + chunk] = d.topk(min(k, points.shape[0] - 1), largest=False).values.mean(1)
    return out


def init_params(points: torch.Tensor, rgb: torch.Tensor, sh_degree: int, init_opacity: float = 0.1,
                scale_factor: float = 1.0, seed: int = 0) -> torch.nn.ParameterDict:
    """Create Gaussians at ``points`` with colours ``rgb``.

    Scales start isotropic at the mean distance to the 3 nearest neighbours (as 3DGS);
    rotations random; opacities ``init_opacity``.

    Args:
        points: [N, 3] float32, metres, canonical space.
        rgb: [N, 3] float32 in [0, 1].
        sh_degree: highest SH degree stored (0-3).

    Returns:
        ParameterDict with :data:`PARAM_NAMES`.
    """
    n = points.shape[0]
    g = torch.Generator().manual_seed(seed)
    dist = knn_mean_distance(points).clamp_min(1e-4) if n > 1 else torch.full((n,), 0.01)
    scales = torch.log(dist * scale_factor)[:, None].repeat(1, 3)
    quats = torch.randn(n, 4, generator=g)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    opac = torch.full((n,), math.log(init_opacity / (1 - init_opacity)))
    k = num_sh_bases(sh_degree)
    sh0 = rgb_to_sh0(rgb.clamp(0, 1))[:, None, :]
    shN = torch.zeros(n, k - 1, 3)
    return torch.nn.ParameterDict({
        "means": torch.nn.Parameter(points.float().clone()),
        "scales": torch.nn.Parameter(scales.float()),
        "quats": torch.nn.Parameter(quats.float()),
        "opacities": torch.nn.Parameter(opac.float()),
        "sh0": torch.nn.Parameter(sh0.float()),
        "shN": torch.nn.Parameter(shN.float()),
    })


def params_to(params: torch.nn.ParameterDict | dict[str, torch.Tensor],
              device: torch.device | str) -> torch.nn.ParameterDict:
    """Gaussians as a trainable ``ParameterDict`` on ``device``: ``params`` itself when it is
    one already there, else new leaf parameters holding copies (or the same tensors on their
    device) of its values."""
    device = torch.device(device)
    if isinstance(params, torch.nn.ParameterDict) and all(v.device == device for v in params.values()):
        return params
    return torch.nn.ParameterDict({k: torch.nn.Parameter(v.detach().to(device)) for k, v in params.items()})


def sh_degree_of(params: torch.nn.ParameterDict) -> int:
    """Highest SH degree stored in ``params``."""
    k = 1 + params["shN"].shape[1]
    return int(round(math.sqrt(k))) - 1


def activated(params: torch.nn.ParameterDict | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Activated tensors for the rasterizer: means [N,3], quats [N,4] (normalised), scales
    [N,3] (metres), opacities [N] in (0,1), sh [N,K,3]."""
    return {
        "means": params["means"],
        "quats": torch.nn.functional.normalize(params["quats"], dim=-1),
        "scales": torch.exp(params["scales"]),
        "opacities": torch.sigmoid(params["opacities"]),
        "sh": torch.cat([params["sh0"], params["shN"]], dim=1),
    }


def head_init_points(vertices: np.ndarray, n_random: int, seed: int = 0) -> np.ndarray:
    """Initial points for the head: the canonical mesh vertices plus ``n_random`` points in an
    ellipsoidal shell that covers the skull, hair and ears behind the face mesh.

    Args:
        vertices: [V, 3] canonical face mesh (metres, y up, z towards the viewer).

    Returns:
        [V + n_random, 3] float32 points.
    """
    rng = np.random.default_rng(seed)
    lo, hi = vertices.min(0), vertices.max(0)
    centre = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2 + 0.015, lo[2] - 0.01])
    radii = np.array([(hi[0] - lo[0]) / 2 * 1.15, (hi[1] - lo[1]) / 2 * 1.15, (hi[2] - lo[2]) * 0.95])
    d = rng.normal(size=(n_random, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    r = rng.uniform(0.8, 1.0, size=(n_random, 1)) ** (1 / 3)
    pts = centre + d * r * radii
    return np.concatenate([vertices, pts], 0).astype(np.float32)


def mouth_init_points(vertices: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Initial points inside the mouth, behind the lips: where the teeth and the inside of
    the mouth show when it opens. The static head of the coarse stage has a closed (average)
    mouth, so without them nothing lies there for the fine stage's field to reveal.

    The points fill the space between the mouth corners (inset by a fifth), from the upper
    inner lip down half the mouth's width (the jaw's opening), and from 3 to 12 mm behind an
    arch through the inner lips (the dental arch: front teeth ahead of the corners).

    Args:
        vertices: [V, 3] the canonical face mesh (metres, y up, z towards the viewer),
            MediaPipe's 468 vertices.
        n: how many points (0: none).

    Returns:
        [n, 3] float32 points.
    """
    from gstalk.tracking.canonical import LIPS_INNER, MOUTH_LEFT, MOUTH_RIGHT, UPPER_LIP_INNER

    if n <= 0:
        return np.zeros((0, 3), np.float32)
    rng = np.random.default_rng(seed)
    left, right = vertices[MOUTH_LEFT], vertices[MOUTH_RIGHT]
    half = abs(left[0] - right[0]) / 2 * 0.8
    cx = (left[0] + right[0]) / 2
    top = vertices[UPPER_LIP_INNER, 1] - 0.001
    bottom = top - 0.5 * abs(left[0] - right[0])
    front_mid = vertices[list(LIPS_INNER), 2].max()
    front_corner = (left[2] + right[2]) / 2
    x = rng.uniform(-half, half, n)
    y = rng.uniform(bottom, top, n)
    front = front_mid - (front_mid - front_corner) * (x / (half / 0.8)) ** 2
    z = front - rng.uniform(0.003, 0.012, n)
    return np.stack([cx + x, y, z], 1).astype(np.float32)


def count(params: torch.nn.ParameterDict) -> int:
    """Number of Gaussians."""
    return int(params["means"].shape[0])
