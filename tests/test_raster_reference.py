"""The float64 oracle itself, and the math shared by every backend (SH, projection)."""

from __future__ import annotations

import math

import torch
from conftest_raster import (  # torch_one_thread: autouse fixture
    random_scene,
    torch_one_thread,  # noqa: F401
)

from gstalk.raster import RasterSettings, rasterize
from gstalk.raster.projection import covariance_3d, project_gaussians, quat_to_rotmat
from gstalk.raster.reference import rasterize_dense
from gstalk.raster.sh import sh_basis


def test_reference_gradcheck():
    """Autograd of the reference equals finite differences (smooth settings, float64)."""
    s = RasterSettings(alpha_min=0.0, transmittance_min=0.0, tile_size=64)
    scene = random_scene(3, width=8, height=6, seed=31)  # all three visible
    scene["opacities"] = torch.tensor([0.5, 0.7, 0.3])  # below alpha_max: no clamp kink
    names = ["means", "quats", "scales", "opacities", "colors", "backgrounds"]
    inputs = tuple(scene[k].double().requires_grad_(True) for k in names)
    fixed = {k: v.double() for k, v in scene.items() if k in ("viewmats", "Ks")}

    def fn(*params):
        kw = dict(zip(names, params))
        c, a, _ = rasterize_dense(**kw, **fixed, width=8, height=6, settings=s)
        return c, a

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_sh_basis_is_orthonormal():
    """Monte-Carlo ∫ Y_i Y_j dΩ ≈ δ_ij catches a wrong constant or sign pattern."""
    g = torch.Generator().manual_seed(0)
    d = torch.randn(400_000, 3, generator=g, dtype=torch.float64)
    y = sh_basis(3, d)  # [M, 16]
    gram = 4 * math.pi * (y.T @ y) / d.shape[0]
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=0.02)


def test_sh_degree0_colour_is_offset_dc():
    scene = random_scene(10, sh_degree=0, seed=2, backgrounds=False)
    coeffs = scene["colors"]
    c_sh, _, _ = rasterize(**scene, backend="torch")
    plain = dict(scene, colors=torch.clamp_min(0.28209479177387814 * coeffs[:, 0, :] + 0.5, 0.0))
    plain.pop("sh_degree")
    c_plain, _, _ = rasterize(**plain, backend="torch")
    assert torch.allclose(c_sh, c_plain, atol=1e-6)


def test_rotation_and_covariance():
    # identity (not normalised) and 60° about z
    q = torch.tensor([[2.0, 0.0, 0.0, 0.0], [math.cos(math.pi / 6), 0.0, 0.0, math.sin(math.pi / 6)]])
    R = quat_to_rotmat(q)
    assert torch.allclose(R[0], torch.eye(3), atol=1e-6)
    assert torch.allclose(R[1] @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2, 0.0]), atol=1e-6)
    cov = covariance_3d(q, torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]))
    assert torch.allclose(cov[0], torch.diag(torch.tensor([1.0, 4.0, 9.0])), atol=1e-5)


def test_projection_of_isotropic_gaussian():
    """On the optical axis: mean at the principal point, Σ' = (f σ / z)² I + eps2d I."""
    K = torch.tensor([[[100.0, 0, 32.0], [0, 100.0, 24.0], [0, 0, 1]]])
    p = project_gaussians(
        torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.1),
        torch.tensor([0.5]), torch.eye(4)[None], K, 64, 48, 0.01, 100.0, RasterSettings(),
    )  # fmt: skip
    assert torch.allclose(p.means2d[0, 0], torch.tensor([32.0, 24.0]))
    var = (100.0 * 0.1 / 2.0) ** 2 + 0.3
    assert torch.allclose(p.conics[0, 0], torch.tensor([1 / var, 0.0, 1 / var]), rtol=1e-5)
    assert p.radii[0, 0].item() == math.ceil(3 * math.sqrt(var))
    assert p.depths[0, 0].item() == 2.0


def test_reference_single_gaussian_closed_form():
    """One Gaussian, one pixel at its centre: colour = min(0.99, o)·c + (1 - α)·bg."""
    K = torch.tensor([[[50.0, 0, 2.5], [0, 50.0, 2.5], [0, 0, 1]]])
    kw = dict(
        means=torch.tensor([[0.0, 0.0, 1.0]]), quats=torch.tensor([[1.0, 0, 0, 0]]), scales=torch.full((1, 3), 0.02),
        opacities=torch.tensor([0.7]), colors=torch.tensor([[0.2, 0.4, 0.8]]), viewmats=torch.eye(4)[None], Ks=K,
        width=5, height=5, backgrounds=torch.tensor([[1.0, 1.0, 1.0]]),
    )  # fmt: skip
    c, a, _ = rasterize_dense(**kw)
    assert torch.allclose(a[0, 2, 2, 0], torch.tensor(0.7, dtype=torch.float64))
    assert torch.allclose(c[0, 2, 2], torch.tensor([0.2, 0.4, 0.8], dtype=torch.float64) * 0.7 + 0.3)
