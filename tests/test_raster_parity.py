"""CPU backends (`torch`, `cpu`) against the dense float64 reference: images and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest_raster import (  # torch_one_thread: autouse fixture
    check_parity,
    random_scene,
    require_backend,
    torch_one_thread,  # noqa: F401
)

from gstalk.raster import RasterSettings

BACKENDS = ["torch", "cpu"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    require_backend(request.param, "cpu")
    return request.param


@pytest.mark.parametrize("seed", [0, 1])
def test_random_scene(backend, seed):
    check_parity(backend, random_scene(80, seed=seed))


def test_two_cameras(backend):
    check_parity(backend, random_scene(50, cameras=2, seed=3))


@pytest.mark.parametrize("channels", [1, 5])
def test_channel_counts(backend, channels):
    check_parity(backend, random_scene(40, channels=channels, seed=4))


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_spherical_harmonics(backend, degree):
    scene = random_scene(40, sh_degree=degree, cameras=2 if degree == 3 else 1, seed=5 + degree)
    check_parity(backend, scene)


def test_sh_extra_coefficients_ignored(backend):
    """K larger than (degree+1)^2: only the first bases are read."""
    scene = random_scene(30, sh_degree=3, seed=9)
    scene["sh_degree"] = 1
    check_parity(backend, scene)


def test_odd_non_square_image(backend):
    check_parity(backend, random_scene(60, width=37, height=23, seed=6))


def test_antialiased_and_opacity_radius(backend):
    s = RasterSettings(antialiased=True, radius_mode="opacity", eps2d=0.4)
    check_parity(backend, random_scene(60, seed=7), s)


def test_small_tiles_and_thresholds(backend):
    s = RasterSettings(tile_size=8, alpha_min=0.02, alpha_max=0.95, transmittance_min=0.05)
    check_parity(backend, random_scene(70, seed=8), s)


def test_tile_size_not_multiple_of_8(backend):
    check_parity(backend, random_scene(50, seed=10), RasterSettings(tile_size=12))


def test_no_alpha_threshold(backend):
    """alpha_min = 0 and transmittance_min = 0 (no footprint bound, no early stop)."""
    check_parity(backend, random_scene(40, seed=11), RasterSettings(alpha_min=0.0, transmittance_min=0.0))


def test_torch_backend_float64():
    scene = random_scene(40, seed=12)
    scene = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in scene.items()}
    check_parity("torch", scene, img_atol=1e-10, grad_rel=1e-8)


def test_dense_scene_early_termination(backend):
    """Many overlapping opaque Gaussians: most pixels stop early (T < 1e-4)."""
    scene = random_scene(100, seed=13)
    scene["opacities"] = torch.full_like(scene["opacities"], 0.95)
    scene["scales"] = scene["scales"] * 6
    ref, _ = check_parity(backend, scene)
    # the early stop keeps T >= 1e-4, so alpha <= 0.9999; many pixels reach that bound
    assert ref["alphas"].max() <= 1 - 1e-4 + 1e-12
    assert (ref["alphas"] > 0.999).float().mean() > 0.2
