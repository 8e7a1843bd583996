"""``inria`` backend: adapter for the original 3DGS CUDA rasterizer
(``diff_gaussian_rasterization``, graphdeco-inria; build it from source, CUDA only).

Mapping (one rasterizer call per camera and per group of 3 channels):

* camera: ``viewmatrix = viewmat.T`` and ``projmatrix = (P·viewmat).T`` (the library uses
  row-vector/column-major matrices) with the off-centre OpenGL-style projection
  ``P = [[2fx/W, 0, (2cx-W)/W, 0], [0, 2fy/H, (2cy-H)/H, 0], [0, 0, f/(f-n), -fn/(f-n)],
  [0, 0, 1, 0]]``, which puts the Gaussian at pixel ``fx·x/z + cx`` in our pixel-centre
  convention; ``tanfovx = W/(2fx)``, ``tanfovy = H/(2fy)``;
* channels: the library renders exactly 3 channels, so the features (RGB, SH evaluated by
  :mod:`gstalk.raster.sh`, or any C) get one extra channel of ones (its render is
  ``1 - T_final``, our alpha), are zero-padded to a multiple of 3 and rendered in groups;
  the background is blended here, so its gradient is exact;
* ``meta["means2d"]``: a leaf tensor in pixels whose ``.grad`` receives the library's
  screen-space gradient rescaled from NDC to pixels (×2/W, ×2/H); depths, conics and
  tile counts in meta come from gstalk's own projection/binning (the library does not
  return them);
* near/far: Gaussians outside ``[near_plane, far_plane]`` get opacity 0; note the library
  also culls everything closer than 0.2 m on its own.

Settings the library hard-codes (eps2d = 0.3, 16-px tiles, 3σ radius, alpha in
[1/255, 0.99], T_min = 1e-4, no radius clip) must keep their defaults: anything else raises
:class:`UsageError`. ``antialiased=True`` needs a build with the ``antialiasing`` setting.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from gstalk.errors import DependencyError, UsageError
from gstalk.raster.binning import bin_gaussians
from gstalk.raster.pipeline import attach_to_graph
from gstalk.raster.projection import camera_centers, project_gaussians
from gstalk.raster.settings import RasterSettings
from gstalk.raster.sh import sh_to_color
from gstalk.raster.validation import RasterInputs

INSTALL_HINT = (
    "build diff-gaussian-rasterization from source on a CUDA machine "
    "(pip install git+https://github.com/graphdeco-inria/diff-gaussian-rasterization)"
)
_FIXED = {"eps2d": 0.3, "tile_size": 16, "radius_mode": "3sigma", "alpha_min": 1.0 / 255.0, "alpha_max": 0.99,
          "transmittance_min": 1e-4, "radius_clip": 0.0}  # fmt: skip


def projection_matrix(K: Tensor, width: int, height: int, near: float, far: float) -> Tensor:
    """``[4, 4]`` OpenGL-style projection (column-vector convention) for intrinsics ``K``."""
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    P = torch.zeros(4, 4, dtype=K.dtype, device=K.device)
    P[0, 0] = 2.0 * fx / width
    P[0, 2] = (2.0 * cx - width) / width
    P[1, 1] = 2.0 * fy / height
    P[1, 2] = (2.0 * cy - height) / height
    P[2, 2] = far / (far - near)
    P[2, 3] = -far * near / (far - near)
    P[3, 2] = 1.0
    return P


class InriaBackend:
    """The reference CUDA rasterizer of Kerbl et al. 2023."""

    name = "inria"

    def unavailable_reason(self, device: torch.device | None = None) -> str | None:
        if importlib.util.find_spec("diff_gaussian_rasterization") is None:
            return f"diff_gaussian_rasterization is not installed ({INSTALL_HINT})"
        if not torch.cuda.is_available():
            return "no CUDA device is available (diff_gaussian_rasterization runs on NVIDIA GPUs only)"
        if device is not None and device.type != "cuda":
            return f"diff_gaussian_rasterization needs CUDA tensors, got tensors on {device}"
        return None

    @staticmethod
    def _check_settings(s: RasterSettings, fields: tuple[str, ...]) -> None:
        bad = [f"{k}={getattr(s, k)!r} (fixed at {v!r})" for k, v in _FIXED.items() if getattr(s, k) != v]
        if bad:
            raise UsageError(
                "the 'inria' backend cannot honour these settings: " + ", ".join(bad) + "; use backend 'gsplat', "
                "'cpu' or 'torch'."
            )
        if s.antialiased and "antialiasing" not in fields:
            raise UsageError("this diff_gaussian_rasterization build has no antialiasing; use antialiased=False.")

    def rasterize(self, inp: RasterInputs) -> tuple[Tensor, Tensor, dict]:
        from gstalk.raster.backends import working_backends_text

        reason = self.unavailable_reason(inp.device)
        if reason is not None:
            raise DependencyError(
                f"rasterizer backend 'inria' is unavailable: {reason}.",
                hint=f"{INSTALL_HINT}, or use a working backend: {working_backends_text(inp.device)}.",
            )
        if inp.means.dtype != torch.float32:
            raise UsageError(f"the 'inria' backend needs float32 tensors, got {inp.means.dtype}.")
        try:
            import diff_gaussian_rasterization as dgr
        except ImportError as exc:
            raise DependencyError(f"importing diff_gaussian_rasterization failed: {exc}", hint=INSTALL_HINT) from exc
        fields = tuple(dgr.GaussianRasterizationSettings._fields)
        s = inp.settings
        self._check_settings(s, fields)
        if inp.n_gaussians == 0:  # nothing to draw; the CUDA code does not accept N = 0
            from gstalk.raster.backends import get_backend

            colors, alphas, meta = get_backend("torch").rasterize(inp)
            meta["backend"] = self.name
            return colors, alphas, meta

        B, N, W, H, C = inp.n_cameras, inp.n_gaussians, inp.width, inp.height, inp.n_channels
        dev = inp.device
        with torch.no_grad():
            proj = project_gaussians(inp.means, inp.quats, inp.scales, inp.opacities, inp.viewmats, inp.Ks,
                                     W, H, inp.near_plane, inp.far_plane, s)  # fmt: skip
            bins = bin_gaussians(proj.means2d, proj.radii, proj.depths, W, H, s.tile_size)
        means2d = proj.means2d.detach().clone().requires_grad_(torch.is_grad_enabled())
        if inp.sh_degree is not None:
            feats = sh_to_color(inp.sh_degree, inp.colors, inp.means, camera_centers(inp.viewmats))  # [B, N, 3]
        else:
            feats = inp.colors[None].expand(B, -1, -1)
        groups = (C + 1 + 2) // 3
        pad = 3 * groups - (C + 1)
        quats = F.normalize(inp.quats, dim=-1)
        campos = camera_centers(inp.viewmats)
        far = min(inp.far_plane, 1e4)
        images, radii = [], []
        for b in range(B):
            in_range = ((proj.depths[b] >= inp.near_plane) & (proj.depths[b] <= inp.far_plane)).to(inp.means.dtype)
            opac = (inp.opacities * in_range)[:, None]
            f_b = torch.cat([feats[b], feats.new_ones(N, 1), feats.new_zeros(N, pad)], dim=-1)  # [N, 3·groups]
            scale = means2d.new_tensor([2.0 / W, 2.0 / H])
            screen = torch.cat([means2d[b] * scale, means2d.new_zeros(N, 1)], dim=-1)  # NDC-scaled, values unused
            view = inp.viewmats[b]
            full = projection_matrix(inp.Ks[b], W, H, inp.near_plane, far) @ view
            kw = dict(
                image_height=H, image_width=W, tanfovx=float(W / (2.0 * inp.Ks[b, 0, 0])),
                tanfovy=float(H / (2.0 * inp.Ks[b, 1, 1])), bg=torch.zeros(3, device=dev), scale_modifier=1.0,
                viewmatrix=view.T.contiguous(), projmatrix=full.T.contiguous(), sh_degree=0, campos=campos[b],
                prefiltered=False, debug=False, antialiasing=s.antialiased,
            )  # fmt: skip
            try:
                settings = dgr.GaussianRasterizationSettings(**{k: v for k, v in kw.items() if k in fields})
            except TypeError as exc:
                msg = f"unsupported diff_gaussian_rasterization variant: {exc}"
                raise DependencyError(msg, hint=INSTALL_HINT) from exc
            rasterizer = dgr.GaussianRasterizer(raster_settings=settings)
            chans = []
            for gi in range(groups):
                out = rasterizer(
                    means3D=inp.means, means2D=screen, opacities=opac,
                    colors_precomp=f_b[:, 3 * gi : 3 * gi + 3].contiguous(), scales=inp.scales, rotations=quats,
                )  # fmt: skip
                chans.append(out[0])  # [3, H, W]
                if gi == 0:
                    radii.append(out[1])
            images.append(torch.cat(chans, dim=0)[: C + 1].permute(1, 2, 0))  # [H, W, C+1]
        img = torch.stack(images)
        colors, trans = attach_to_graph(img[..., :C], 1.0 - img[..., C], inp)
        if inp.backgrounds is not None:
            colors = colors + trans[..., None] * inp.backgrounds[:, None, None, :]
        meta = {
            "means2d": means2d,
            "radii": torch.stack(radii).to(torch.int32) * (proj.radii > 0).to(torch.int32),
            "depths": proj.depths,
            "conics": proj.conics,
            "opacities": proj.opacities,
            "tiles_touched": bins.tiles_touched,
            "n_intersections": bins.n_intersections,
            "tile_size": s.tile_size,
            "backend": self.name,
        }
        return colors, 1.0 - trans[..., None], meta
