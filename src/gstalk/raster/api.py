"""The rasterizer entry point :func:`rasterize` and backend selection."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from gstalk.errors import DependencyError
from gstalk.raster.backends import Backend, get_backend
from gstalk.raster.settings import RasterSettings
from gstalk.raster.validation import RasterInputs, validate_inputs


def _gpu_library_usable(name: str, device: torch.device) -> bool:
    return get_backend(name).unavailable_reason(device) is None


def resolve_backend(name: str, inp: RasterInputs) -> Backend:
    """Pick the backend for ``name`` (``"auto"`` resolved as documented in :func:`rasterize`).

    Raises:
        UsageError: unknown backend name.
    """
    if name != "auto":
        return get_backend(name)
    device = inp.device
    if device.type == "cuda":
        for cand in ("gsplat", "inria"):
            if _gpu_library_usable(cand, device):
                return get_backend(cand)
        return get_backend("torch")
    if device.type == "cpu" and inp.means.dtype == torch.float32:
        reason = get_backend("cpu").unavailable_reason(device)
        if reason is None:
            return get_backend("cpu")
        msg = f"gstalk.raster: falling back to the slow 'torch' backend: {reason}"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return get_backend("torch")


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,
    settings: RasterSettings | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, dict]:
    """Render N 3D Gaussians into B pinhole cameras (3D Gaussian Splatting, Kerbl et al. 2023).

    Pipeline: ``Σ = R S Sᵀ Rᵀ`` (quaternion ``R``, ``S = diag(scales)``); EWA projection
    ``Σ' = J W Σ Wᵀ Jᵀ + eps2d·I`` with the frustum-clamped Jacobian; culling (depth outside
    ``[near, far]``, radius 0, bounding box off-screen); tile binning with a front-to-back
    depth sort per tile; alpha blending (Eq. 2-3)
    ``C = Σ_i c_i α_i T_i + T_final·background``, ``α_i = min(alpha_max, o_i exp(-½ dᵀΣ'⁻¹d))``
    (skipped if the exponent is positive or ``α_i < alpha_min``), ``T_i = Π_{j<i}(1-α_j)``;
    a pixel stops before the Gaussian that would bring ``T`` below ``transmittance_min``.
    Pixel ``(row i, column j)`` has its centre at ``(j + 0.5, i + 0.5)``.

    Args:
        means: ``[N, 3]`` float32 centres, world coordinates (metres).
        quats: ``[N, 4]`` rotations as wxyz quaternions (normalised internally).
        scales: ``[N, 3]`` activated (positive) standard deviations (metres).
        opacities: ``[N]`` activated opacities in [0, 1].
        colors: ``[N, C]`` features, any ``C >= 1`` (e.g. RGB + depth + a dynamism weight),
            or SH coefficients ``[N, K, 3]`` when ``sh_degree`` is set
            (``K >= (sh_degree+1)²``); SH colour = ``max(SH(dir) + 0.5, 0)`` with
            ``dir`` from the camera centre to the mean.
        viewmats: ``[B, 4, 4]`` world-to-camera matrices, OpenCV convention
            (x right, y down, z forward), B >= 1.
        Ks: ``[B, 3, 3]`` pinhole intrinsics in pixels.
        width, height: image size in pixels.
        near_plane, far_plane: depth range (metres) outside of which Gaussians are culled.
        sh_degree: None for plain features, else 0..3.
        backgrounds: ``[B, C]`` (or ``[C]``) colour behind the Gaussians, default black.
        settings: :class:`RasterSettings` (eps2d, antialiasing, radius mode, tiles, thresholds).
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"gsplat"``, ``"inria"`` or a registered
            name. ``"auto"``: CPU float32 tensors → ``cpu`` if it builds (else ``torch`` with
            a warning); CUDA tensors → ``gsplat`` if importable, else ``inria``, else
            ``torch``.

    Returns:
        ``(render_colors, render_alphas, meta)``: ``[B, H, W, C]`` and ``[B, H, W, 1]``
        (``alpha = 1 - T_final``) in the input dtype, differentiable w.r.t. means, quats,
        scales, opacities, colors/SH and backgrounds; ``meta`` holds ``means2d``
        ``[B, N, 2]`` (pixels; ``retain_grad()`` is called so ``.grad`` is available after
        backward, for densification), ``radii`` ``[B, N]`` int32 (0 = culled), ``depths``
        ``[B, N]`` (camera z, metres), ``conics`` ``[B, N, 3]`` (``Σ'⁻¹`` as ``a, b, c``),
        ``tiles_touched`` ``[B, N]`` int32, ``n_intersections`` (int) and ``backend``
        (name actually used), plus backend-specific extras.

    Raises:
        UsageError: bad shapes, dtypes, devices or settings (the message states the shape
            received), or an unknown backend name.
        DependencyError: an explicitly requested backend cannot run here (library or
            compiler missing, tensors not on CUDA); the message lists the working ones.
    """
    inp = validate_inputs(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height,
        near_plane, far_plane, sh_degree, backgrounds, settings,
    )  # fmt: skip
    impl = resolve_backend(backend, inp)
    render_colors, render_alphas, meta = impl.rasterize(inp)
    m2d = meta.get("means2d")
    if isinstance(m2d, Tensor) and m2d.requires_grad and not m2d.is_leaf:
        m2d.retain_grad()
    return render_colors, render_alphas, meta


def ensure_backend(name: str, device: torch.device | None = None) -> None:
    """Raise :class:`DependencyError` unless backend ``name`` can run (for CLI checks)."""
    reason = get_backend(name).unavailable_reason(device)
    if reason is not None:
        raise DependencyError(f"rasterizer backend {name!r} is unavailable: {reason}")
