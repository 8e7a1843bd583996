"""Shared helpers for the rasterizer tests (imported by tests/test_raster*.py)."""

from __future__ import annotations

import math

import pytest
import torch

from gstalk.raster import RasterSettings, available_backends, rasterize
from gstalk.raster.reference import rasterize_dense

PARAM_NAMES = ("means", "quats", "scales", "opacities", "colors", "backgrounds")


@pytest.fixture(autouse=True)
def torch_one_thread():
    """Run the raster tests single-threaded (tests that vary the thread count set it).

    The scenes are tiny: intra-op threads only add wake-up latency, which becomes seconds
    per test when other processes compete for the cores. Autouse in every test module
    that imports it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_scene(
    n: int = 60,
    width: int = 40,
    height: int = 32,
    *,
    cameras: int = 1,
    channels: int = 3,
    sh_degree: int | None = None,
    seed: int = 0,
    backgrounds: bool = True,
    device: str = "cpu",
) -> dict:
    """Small random scene: Gaussians from sub-pixel to ~10 px, some off-screen, some with
    opacity 1 (exercises the alpha clamp), an off-centre principal point, and up to
    two cameras (the second one rotated and shifted)."""
    g = torch.Generator().manual_seed(seed)
    f = 0.8 * width
    cx, cy = 0.45 * width, 0.55 * height
    z = 1.5 + 2.5 * torch.rand(n, generator=g)
    u = torch.rand(n, generator=g) * (width + 10) - 5
    v = torch.rand(n, generator=g) * (height + 10) - 5
    means = torch.stack([(u - cx) * z / f, (v - cy) * z / f, z], dim=-1)
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.empty(n, 3).uniform_(math.log(0.004), math.log(0.25), generator=g))
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    opacities[:: max(1, n // 6)] = 1.0
    if sh_degree is None:
        colors = torch.rand(n, channels, generator=g)
    else:
        colors = 0.4 * torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g)
        channels = 3
    views = [torch.eye(4)]
    if cameras > 1:
        ang = 0.15
        rot = torch.tensor([[math.cos(ang), 0.0, math.sin(ang)], [0.0, 1.0, 0.0], [-math.sin(ang), 0.0, math.cos(ang)]])
        v2 = torch.eye(4)
        v2[:3, :3] = rot
        v2[:3, 3] = torch.tensor([-0.3, 0.05, 0.2])
        views.append(v2)
    views = views[:cameras] + [views[-1]] * max(0, cameras - len(views))
    K = torch.tensor([[f, 0.0, cx], [0.0, f * 1.05, cy], [0.0, 0.0, 1.0]])
    scene = dict(
        means=means, quats=quats, scales=scales, opacities=opacities, colors=colors,
        viewmats=torch.stack(views), Ks=K[None].repeat(cameras, 1, 1),
    )  # fmt: skip
    if backgrounds:
        scene["backgrounds"] = torch.rand(cameras, channels, generator=g)
    scene = {k: t.to(device) for k, t in scene.items()}
    scene.update(width=width, height=height)
    if sh_degree is not None:
        scene["sh_degree"] = sh_degree
    return scene


def render_with_grads(fn, scene: dict, seed: int = 123, **kwargs) -> dict:
    """Render, backprop a fixed random cotangent on colours and alphas; return the
    outputs and the gradients of every tensor parameter and of meta['means2d']."""
    leaves = {k: scene[k].detach().clone().requires_grad_(True) for k in PARAM_NAMES if k in scene}
    args = dict(scene)
    args.update(leaves)
    colors, alphas, meta = fn(**args, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    gc = torch.randn(colors.shape, generator=gen).to(colors)
    ga = torch.randn(alphas.shape, generator=gen).to(alphas)
    ((colors * gc).sum() + (alphas * ga).sum()).backward()
    out = {"colors": colors.detach(), "alphas": alphas.detach(), "meta": meta}
    for k, t in leaves.items():
        out["grad_" + k] = t.grad
    out["grad_means2d"] = meta["means2d"].grad
    return out


def assert_close_rel(actual, expected, rel: float, what: str, floor: float = 1e-6) -> None:
    """max |actual - expected| <= rel * max |expected| + floor."""
    assert actual is not None, f"{what}: no gradient"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double().cpu(), expected.double().cpu()
    err = (a - e).abs().max().item() if e.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    assert err <= rel * scale + floor, f"{what}: max error {err:.3e} vs scale {scale:.3e} (rel {rel})"


def check_parity(
    backend: str,
    scene: dict,
    settings: RasterSettings | None = None,
    *,
    img_atol: float = 1e-5,
    grad_rel: float = 2e-4,
    check_radii: bool = True,
    ref_settings: RasterSettings | None = None,
):
    """Backend vs the dense float64 reference: images and every gradient."""
    ref = render_with_grads(rasterize_dense, scene, settings=ref_settings or settings)
    got = render_with_grads(rasterize, scene, settings=settings, backend=backend)
    assert got["meta"]["backend"] == backend
    assert got["colors"].dtype == scene["means"].dtype
    assert_close_rel(got["colors"], ref["colors"], 0.0, "colors", floor=img_atol)
    assert_close_rel(got["alphas"], ref["alphas"], 0.0, "alphas", floor=img_atol)
    if check_radii:
        assert torch.equal(got["meta"]["radii"].cpu(), ref["meta"]["radii"].cpu()), "radii differ"
    for k in ref:
        if k.startswith("grad_"):
            assert_close_rel(got[k], ref[k], grad_rel, f"{backend} {k}")
    return ref, got


def require_backend(name: str, device: str | None = None) -> None:
    """Skip the test (with the reason) when the backend cannot run here."""
    reason = available_backends(device)[name]
    if reason != "ok":
        pytest.skip(f"backend {name!r} unavailable: {reason}")
