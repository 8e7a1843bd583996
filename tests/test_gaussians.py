"""Gaussian parameters: PLY round trip, activations, densification keeps optimizers consistent."""

from __future__ import annotations

import numpy as np
import torch

from gstalk.config import DensifyConfig
from gstalk.gaussians import Densifier, activated, init_params, load_ply, save_ply, sh_degree_of
from gstalk.gaussians.model import head_init_points, rgb_to_sh0, sh0_to_rgb
from gstalk.train.coarse import gaussian_optimizers


def _params(n=50, deg=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return init_params(torch.rand(n, 3, generator=g) * 0.1, torch.rand(n, 3, generator=g), deg, seed=seed)


def test_ply_round_trip_and_standard_layout(tmp_path):
    from plyfile import PlyData

    p = _params(40, deg=2)
    with torch.no_grad():
        p["shN"].normal_()
    save_ply(tmp_path / "g.ply", dict(p.items()))
    names = PlyData.read(str(tmp_path / "g.ply"))["vertex"].data.dtype.names
    assert names[:9] == ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2")
    assert sum(n.startswith("f_rest_") for n in names) == 3 * 8
    assert names[-8:] == ("opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
    back = load_ply(tmp_path / "g.ply")
    for k, v in p.items():
        torch.testing.assert_close(back[k], v.detach(), rtol=0, atol=0)


def test_activations_and_sh_degree():
    p = _params(10, deg=3)
    a = activated(p)
    assert sh_degree_of(p) == 3 and a["sh"].shape == (10, 16, 3)
    torch.testing.assert_close(a["quats"].norm(dim=-1), torch.ones(10))
    assert (a["opacities"] > 0).all() and (a["opacities"] < 1).all() and (a["scales"] > 0).all()
    rgb = torch.rand(5, 3)
    torch.testing.assert_close(sh0_to_rgb(rgb_to_sh0(rgb)), rgb)


def test_head_init_points_cover_face_and_skull():
    v = np.random.default_rng(0).normal(size=(100, 3)) * 0.05
    pts = head_init_points(v, 500)
    assert pts.shape == (600, 3) and pts.dtype == np.float32
    assert pts[100:, 2].min() < v[:, 2].min()  # points behind the face mesh


def _fake_meta(n, grad_rows, value):
    m2d = torch.zeros(1, n, 2, requires_grad=True)
    m2d.grad = torch.zeros(1, n, 2)
    m2d.grad[0, grad_rows, 0] = value
    return {"means2d": m2d, "radii": torch.full((1, n), 3, dtype=torch.int32)}


def test_densify_clone_split_prune_edit_adam_state_together():
    n = 20
    p = _params(n)
    with torch.no_grad():
        p["scales"][:10] = np.log(1e-4)  # small -> clone
        p["scales"][10:] = np.log(0.05)  # large -> split
        p["opacities"][19] = -10.0  # pruned
    opts = gaussian_optimizers(p, {"means": 1e-3, "scales": 1e-3, "quats": 1e-3, "opacities": 1e-3,
                                   "sh0": 1e-3, "shN": 1e-3})
    loss = sum(v.sum() for v in p.values())
    loss.backward()
    for o in opts.values():
        o.step()
    cfg = DensifyConfig(start=0, stop=100, every=1, reset_opacity_every=0, grad_threshold=1e-3, max_gaussians=1000)
    d = Densifier(cfg, scene_scale=1.0)
    state = d.initialize_state(n)
    parents = p["scales"].detach()[[10, 11]].clone()
    grad_rows = [0, 1, 10, 11]
    out = d.step_post_backward(p, opts, state, step=1, meta=_fake_meta(n, grad_rows, 1.0), width=2, height=2)
    assert out["cloned"] == 2 and out["split"] == 2 and out["pruned"] == 1
    n_new = n + 2 + 2 - 1  # clones add 2; splits replace 2 by 4; one pruned
    for k, v in p.items():
        assert v.shape[0] == n_new, k
        st = opts[k].state[v]
        assert st["exp_avg"].shape == v.shape and st["exp_avg_sq"].shape == v.shape
    # split children are smaller than their parent (scale / 1.6)
    torch.testing.assert_close(p["scales"].detach()[-4:], (parents - np.log(1.6)).repeat(2, 1))
    # optimizers still step after the edit
    sum(v.sum() for v in p.values()).backward()
    for o in opts.values():
        o.step()


def test_densify_respects_budget():
    n = 30
    p = _params(n)
    opts = gaussian_optimizers(p, {k: 1e-3 for k in p.keys()})
    cfg = DensifyConfig(start=0, stop=100, every=1, reset_opacity_every=0, grad_threshold=1e-3, max_gaussians=33,
                        prune_opacity=0.0)
    d = Densifier(cfg, scene_scale=1.0)
    d.step_post_backward(p, opts, d.initialize_state(n), 1, _fake_meta(n, list(range(n)), 1.0), 2, 2)
    assert p["means"].shape[0] == 33  # 3 of room: each clone or split adds one
