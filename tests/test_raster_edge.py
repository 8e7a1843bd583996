"""Edge cases: culling, off-screen, tile borders, huge/sub-pixel Gaussians, N=0, errors."""

from __future__ import annotations

import pytest
import torch
from conftest_raster import (  # torch_one_thread: autouse fixture
    check_parity,
    random_scene,
    require_backend,
    torch_one_thread,  # noqa: F401
)

from gstalk.errors import UsageError
from gstalk.raster import RasterSettings, rasterize

BACKENDS = ["torch", "cpu"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    require_backend(request.param, "cpu")
    return request.param


def _scene_with(means_px_depth, scale, opacity=0.8, width=40, height=32, f=32.0):
    """Gaussians given as (u px, v px, z m) with isotropic scale (m)."""
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])
    uvz = torch.tensor(means_px_depth, dtype=torch.float32)
    z = uvz[:, 2]
    means = torch.stack([(uvz[:, 0] - width / 2) * z / f, (uvz[:, 1] - height / 2) * z / f, z], -1)
    n = means.shape[0]
    g = torch.Generator().manual_seed(n)
    return dict(
        means=means, quats=torch.randn(n, 4, generator=g), scales=torch.full((n, 3), float(scale)),
        opacities=torch.full((n,), float(opacity)), colors=torch.rand(n, 3, generator=g),
        viewmats=torch.eye(4)[None], Ks=K[None], width=width, height=height,
        backgrounds=torch.tensor([[0.1, 0.2, 0.3]]),
    )  # fmt: skip


def test_behind_camera_and_beyond_far_are_culled(backend):
    base = random_scene(30, seed=31)
    extra = dict(base)
    extra["means"] = torch.cat([base["means"], torch.tensor([[0.0, 0.0, -1.0], [0.1, 0.0, 50.0], [0.0, 0.0, 0.005]])])
    for k, tail in (("quats", torch.tensor([[1.0, 0, 0, 0]] * 3)), ("scales", torch.full((3, 3), 0.5)),
                    ("opacities", torch.full((3,), 0.9)), ("colors", torch.rand(3, 3))):  # fmt: skip
        extra[k] = torch.cat([base[k], tail])
    c0, a0, _ = rasterize(**base, far_plane=20.0, backend=backend)
    c1, a1, m1 = rasterize(**extra, far_plane=20.0, backend=backend)
    assert m1["radii"][0, -3:].tolist() == [0, 0, 0]
    assert m1["tiles_touched"][0, -3:].tolist() == [0, 0, 0]
    assert torch.equal(c0, c1) and torch.equal(a0, a1)
    check_parity(backend, dict(extra, far_plane=20.0))


def test_off_screen(backend):
    scene = _scene_with([[-60.0, 10.0, 2.0], [10.0, 200.0, 2.0], [42.0, 16.0, 2.0], [20.0, 16.0, 2.0]], 0.1)
    c, a, m = rasterize(**scene, backend=backend)
    r = m["radii"][0].tolist()
    assert r[0] == 0 and r[1] == 0 and r[3] > 0
    assert r[2] > 0  # centre off-screen but its footprint reaches the image
    check_parity(backend, scene)


def test_straddling_tile_borders(backend):
    pts = [[16.0, 16.0, 2.0], [15.5, 8.0, 2.0], [32.0, 16.5, 3.0], [8.0, 15.9, 2.5], [31.9, 31.9, 2.0]]
    check_parity(backend, _scene_with(pts, 0.02, opacity=0.95))


def test_huge_gaussian_covers_image(backend):
    scene = _scene_with([[20.0, 16.0, 2.0], [5.0, 5.0, 1.0]], 1.5, opacity=0.6)
    _, a, m = rasterize(**scene, backend=backend)
    assert (m["radii"][0] > 40).all() and (a > 0.5).all()
    check_parity(backend, scene)


def test_sub_pixel_gaussians(backend):
    scene = _scene_with([[10.2, 10.7, 3.0], [20.5, 20.5, 3.0], [30.9, 5.1, 3.0]], 1e-4, opacity=0.9)
    _, _, m = rasterize(**scene, backend=backend)
    assert m["radii"][0].tolist() == [2, 2, 2]  # ceil(3 sqrt(0.3 + tiny))
    check_parity(backend, scene)


def test_zero_opacity_contributes_nothing(backend):
    scene = random_scene(20, seed=33)
    zero = dict(scene, opacities=torch.zeros_like(scene["opacities"]))
    c, a, _ = rasterize(**zero, backend=backend)
    assert torch.equal(a, torch.zeros_like(a))
    assert torch.allclose(c, scene["backgrounds"][:, None, None, :].expand_as(c))
    check_parity(backend, zero)


@pytest.mark.parametrize("cameras", [1, 2])
def test_no_gaussians_gives_background(backend, cameras):
    scene = random_scene(5, cameras=cameras, seed=34)
    for k in ("means", "quats", "scales", "opacities", "colors"):
        scene[k] = scene[k][:0]
    c, a, m = rasterize(**scene, backend=backend)
    assert c.shape == (cameras, 32, 40, 3) and a.shape == (cameras, 32, 40, 1)
    assert torch.equal(c, scene["backgrounds"][:, None, None, :].expand_as(c))
    assert torch.equal(a, torch.zeros_like(a))
    assert m["n_intersections"] == 0 and m["radii"].shape == (cameras, 0)


def test_everything_culled_is_still_differentiable(backend):
    scene = random_scene(5, seed=35)
    scene["means"] = scene["means"] * torch.tensor([1.0, 1.0, -1.0])  # all behind the camera
    means = scene["means"].clone().requires_grad_(True)
    c, a, _ = rasterize(**dict(scene, means=means), backend=backend)
    (c.sum() + a.sum()).backward()
    assert means.grad is not None and torch.equal(means.grad, torch.zeros_like(means))


def test_means2d_grad_is_retained(backend):
    scene = random_scene(20, seed=36)
    means = scene["means"].clone().requires_grad_(True)
    c, _, m = rasterize(**dict(scene, means=means), backend=backend)
    c.sum().backward()
    assert m["means2d"].grad is not None and m["means2d"].grad.shape == (1, 20, 2)
    assert m["radii"].dtype == torch.int32 and m["tiles_touched"].dtype == torch.int32
    assert m["conics"].shape == (1, 20, 3) and m["depths"].shape == (1, 20)


def test_background_broadcast_1d(backend):
    scene = random_scene(20, cameras=2, seed=37)
    bg = torch.tensor([0.3, 0.6, 0.9])
    c1, _, _ = rasterize(**dict(scene, backgrounds=bg), backend=backend)
    c2, _, _ = rasterize(**dict(scene, backgrounds=bg[None].repeat(2, 1)), backend=backend)
    assert torch.equal(c1, c2)


# ---- argument validation (backend-independent) ------------------------------------------

def _bad(**override):
    scene = random_scene(6, seed=38)
    scene.update(override)
    return scene


@pytest.mark.parametrize(
    "override, match",
    [
        (dict(means=torch.zeros(6, 2)), r"means must be \[N,3\], got \[6,2\]"),
        (dict(quats=torch.zeros(5, 4)), r"quats must be \[N,4\] with N=6 .*got \[5,4\]"),
        (dict(opacities=torch.zeros(6, 1)), r"opacities must be \[N\] with N=6 .*got \[6,1\]"),
        (dict(colors=torch.zeros(6)), r"colors must be \[N,C\].*got \[6\]"),
        (dict(viewmats=torch.eye(4)), r"viewmats must be \[B,4,4\].*got \[4,4\]"),
        (dict(Ks=torch.zeros(2, 3, 3)), r"Ks must be \[B,3,3\] with B=1 .*got \[2,3,3\]"),
        (dict(backgrounds=torch.zeros(1, 4)), r"backgrounds must be \[B,C\]=\[1,3\].*got \[1,4\]"),
        (dict(sh_degree=2), r"sh_degree=2, colors must be SH coefficients \[N,K,3\].*got \[6,3\]"),
        (dict(sh_degree=4, colors=torch.zeros(6, 25, 3)), r"sh_degree must be None or an int in 0..3"),
        (dict(scales=torch.zeros(6, 3, dtype=torch.float64)), r"scales has dtype torch.float64"),
        (dict(width=0), r"width must be a positive int"),
        (dict(near_plane=0.0), r"need 0 < near_plane < far_plane"),
        (dict(means=torch.zeros(6, 3, dtype=torch.int64)), r"means must be float32 \(or float64\), got torch.int64"),
    ],
)
def test_usage_errors(override, match):
    with pytest.raises(UsageError, match=match):
        rasterize(**_bad(**override), backend="torch")


def test_settings_errors():
    with pytest.raises(UsageError, match="radius_mode"):
        RasterSettings(radius_mode="2sigma")
    with pytest.raises(UsageError, match="tile_size"):
        RasterSettings(tile_size=0)
    with pytest.raises(UsageError, match="alpha_min < alpha_max"):
        RasterSettings(alpha_min=0.5, alpha_max=0.4)
    with pytest.raises(UsageError, match="settings must be a RasterSettings"):
        rasterize(**random_scene(3), settings={"eps2d": 0.3})


def test_unknown_backend_and_cpu_dtype():
    with pytest.raises(UsageError, match="unknown rasterizer backend 'nope'"):
        rasterize(**random_scene(3), backend="nope")
    scene = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in random_scene(3).items()}
    require_backend("cpu", "cpu")
    with pytest.raises(UsageError, match="float32"):
        rasterize(**scene, backend="cpu")
