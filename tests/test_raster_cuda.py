"""CUDA adapters (`gsplat`, `inria`).

The parity tests need a GPU and the library; they are skipped with the reason otherwise.
The adapter tests run everywhere against stand-in modules that follow the libraries'
Python APIs (gsplat 1.5.3 ``rasterization`` keyword names; diff_gaussian_rasterization's
``GaussianRasterizationSettings``/``GaussianRasterizer`` and its matrix conventions), so
argument plumbing, channel grouping, background and meta mapping are exercised here too.
"""

from __future__ import annotations

import types
from typing import NamedTuple

import pytest
import torch
from conftest_raster import (  # torch_one_thread: autouse fixture
    assert_close_rel,
    check_parity,
    random_scene,
    render_with_grads,
    require_backend,
    torch_one_thread,  # noqa: F401
)

from gstalk.errors import DependencyError, UsageError
from gstalk.raster import RasterSettings, rasterize
from gstalk.raster.backends.gsplat_backend import GsplatBackend
from gstalk.raster.backends.inria_backend import InriaBackend
from gstalk.raster.reference import rasterize_dense

CUDA_BACKENDS = ["gsplat", "inria"]
# settings each library hard-codes (used for the reference it is compared with)
LIB_SETTINGS = {"gsplat": RasterSettings(alpha_max=0.999), "inria": RasterSettings()}


# ---- real libraries on a GPU ----------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("name", CUDA_BACKENDS)
@pytest.mark.parametrize("kind", ["rgb", "channels5", "sh3", "two_cameras"])
def test_cuda_parity(name, kind):
    require_backend(name, "cuda")
    kw = {"rgb": {}, "channels5": {"channels": 5}, "sh3": {"sh_degree": 3}, "two_cameras": {"cameras": 2}}[kind]
    scene = random_scene(80, seed=51, device="cuda", **kw)
    check_parity(name, scene, LIB_SETTINGS[name], img_atol=2e-3, grad_rel=2e-2, check_radii=False)


@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_cuda_backend_refuses_cpu_tensors(name):
    with pytest.raises(DependencyError, match=name) as exc:
        rasterize(**random_scene(5), backend=name)
    assert "torch" in str(exc.value)  # lists the backends that do work


# ---- adapters against stand-in modules (CPU) -------------------------------------------

def _fake_gsplat():
    def rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane=0.01,
                      far_plane=1e10, radius_clip=0.0, eps2d=0.3, sh_degree=None, packed=True, tile_size=16,
                      backgrounds=None, render_mode="RGB", sparse_grad=False, absgrad=False,
                      rasterize_mode="classic", channel_chunk=32, distributed=False, camera_model="pinhole",
                      segmented=False, covars=None, with_ut=False, with_eval3d=False, radial_coeffs=None,
                      tangential_coeffs=None, thin_prism_coeffs=None, ftheta_coeffs=None, rolling_shutter=None,
                      viewmats_rs=None):  # fmt: skip
        assert packed is False and backgrounds is None and render_mode == "RGB"
        s = RasterSettings(eps2d=eps2d, antialiased=rasterize_mode == "antialiased", tile_size=tile_size,
                           radius_clip=radius_clip)  # fmt: skip
        c, a, m = rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                            near_plane=near_plane, far_plane=far_plane, sh_degree=sh_degree, settings=s,
                            backend="torch")  # fmt: skip
        native = {"radii": torch.stack([m["radii"], m["radii"]], -1), "means2d": m["means2d"],
                  "depths": m["depths"], "conics": m["conics"], "opacities": m["opacities"],
                  "tiles_per_gauss": m["tiles_touched"], "isect_ids": torch.zeros(m["n_intersections"])}  # fmt: skip
        return c, a, native

    return types.SimpleNamespace(rasterization=rasterization, __version__="1.5.3")


def _fake_inria():
    class GaussianRasterizationSettings(NamedTuple):
        image_height: int
        image_width: int
        tanfovx: float
        tanfovy: float
        bg: torch.Tensor
        scale_modifier: float
        viewmatrix: torch.Tensor
        projmatrix: torch.Tensor
        sh_degree: int
        campos: torch.Tensor
        prefiltered: bool
        debug: bool

    class GaussianRasterizer(torch.nn.Module):
        """Decodes the camera the way the CUDA code reads it, then renders densely."""

        def __init__(self, raster_settings):
            super().__init__()
            self.raster_settings = raster_settings

        def forward(self, means3D, means2D, opacities, shs=None, colors_precomp=None, scales=None, rotations=None,
                    cov3D_precomp=None):  # fmt: skip
            s = self.raster_settings
            W, H = s.image_width, s.image_height
            view = s.viewmatrix.T  # the library stores matrices transposed
            P = s.projmatrix.T @ torch.linalg.inv(view)
            # pixel = ((ndc + 1)·S - 1)/2 with pixel centres on integers -> our centre convention
            fx, fy = P[0, 0] * W / 2, P[1, 1] * H / 2
            cx, cy = (P[0, 2] + 1) * W / 2, (P[1, 2] + 1) * H / 2
            assert torch.allclose(fx, torch.tensor(W / (2 * s.tanfovx)), rtol=1e-5)
            assert torch.allclose(rotations.norm(dim=-1), torch.ones(len(rotations)), atol=1e-5)
            assert colors_precomp.shape[-1] == 3 and shs is None and s.sh_degree == 0
            assert means2D.shape == (len(means3D), 3) and opacities.shape == (len(means3D), 1)
            K = torch.stack([torch.stack([fx, fx * 0, cx]), torch.stack([fy * 0, fy, cy]),
                             torch.tensor([0.0, 0.0, 1.0])])  # fmt: skip
            c, _, m = rasterize_dense(means3D, rotations, scales, opacities[:, 0], colors_precomp, view[None],
                                      K[None], W, H, near_plane=0.2, backgrounds=s.bg[None])  # fmt: skip
            return c[0].permute(2, 0, 1).float(), m["radii"][0]

    return types.SimpleNamespace(GaussianRasterizationSettings=GaussianRasterizationSettings,
                                 GaussianRasterizer=GaussianRasterizer)  # fmt: skip


@pytest.fixture
def fake_libs(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gsplat", _fake_gsplat())
    monkeypatch.setitem(sys.modules, "diff_gaussian_rasterization", _fake_inria())
    monkeypatch.setattr(GsplatBackend, "unavailable_reason", lambda self, device=None: None)
    monkeypatch.setattr(InriaBackend, "unavailable_reason", lambda self, device=None: None)


@pytest.mark.parametrize("kw", [{}, {"channels": 5, "cameras": 2}, {"sh_degree": 2}, {"channels": 1}])
def test_gsplat_adapter_with_stand_in(fake_libs, kw):
    scene = random_scene(40, seed=52, **kw)
    ref = render_with_grads(rasterize, scene, backend="torch")
    got = render_with_grads(rasterize, scene, backend="gsplat")
    assert got["meta"]["backend"] == "gsplat" and got["meta"]["radii"].shape == ref["meta"]["radii"].shape
    for k in ref:
        if k != "meta":
            assert_close_rel(got[k], ref[k], 1e-6, k, floor=1e-7)


@pytest.mark.parametrize("kw", [{}, {"channels": 5, "cameras": 2}, {"sh_degree": 3}, {"channels": 1}])
def test_inria_adapter_with_stand_in(fake_libs, kw):
    scene = random_scene(40, seed=53, **kw)
    ref = render_with_grads(rasterize_dense, scene)
    got = render_with_grads(rasterize, scene, backend="inria")
    assert got["meta"]["backend"] == "inria"
    assert torch.equal(got["meta"]["radii"], ref["meta"]["radii"])
    for k in ref:
        if k not in ("meta", "grad_means2d"):  # the stand-in does not emit screen-space gradients
            assert_close_rel(got[k], ref[k], 2e-4, k, floor=1e-5)


def test_inria_rejects_settings_it_cannot_honour(fake_libs):
    with pytest.raises(UsageError, match="eps2d=0.5"):
        rasterize(**random_scene(5), settings=RasterSettings(eps2d=0.5), backend="inria")
    with pytest.raises(UsageError, match="antialiasing"):
        rasterize(**random_scene(5), settings=RasterSettings(antialiased=True), backend="inria")


@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_empty_scene_with_stand_in(fake_libs, name):
    scene = random_scene(3, seed=54)
    for k in ("means", "quats", "scales", "opacities", "colors"):
        scene[k] = scene[k][:0]
    c, a, m = rasterize(**scene, backend=name)
    assert torch.equal(a, torch.zeros_like(a)) and m["backend"] == name
