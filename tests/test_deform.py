"""Deformation parts: hash grid (C++ vs torch, dense level vs a direct grid), tri-plane,
audio encoders, the GSTalker field."""

from __future__ import annotations

import math

import pytest
import torch

from gstalk.deform.audio import AudioAttNet, AudioEncoder, AudioNet, neighbour_indices
from gstalk.deform.base import apply_deltas
from gstalk.deform.encoders import TriPlaneHash
from gstalk.deform.gstalker import GSTalkerDeformation
from gstalk.deform.hashgrid import NATIVE, HashGrid


def _native_or_skip():
    reason = NATIVE.unavailable_reason()
    if reason:
        pytest.skip(f"C++ hash grid unavailable: {reason}")


@pytest.mark.parametrize("dim", [2, 3])
def test_cpu_kernel_matches_torch_reference(dim):
    _native_or_skip()
    torch.manual_seed(0)
    g = HashGrid(dim, levels=6, features=2, log2_table=10, base_res=4, max_res=128)
    with torch.no_grad():
        g.table.normal_()
    x = torch.rand(500, dim)
    x[:5] = torch.tensor([0.0, 1.0])[torch.randint(0, 2, (5, dim))]  # cell borders and the box faces
    y, ref = g(x), g.forward_torch(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(y)
    (a,) = torch.autograd.grad(g(x), g.table, go)
    (b,) = torch.autograd.grad(g.forward_torch(x), g.table, go)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # deterministic backward
    (c,) = torch.autograd.grad(g(x), g.table, go)
    assert torch.equal(a, c)


def test_dense_level_equals_bilinear_interpolation_of_a_direct_grid():
    g = HashGrid(2, levels=1, features=1, log2_table=12, base_res=8, max_res=8, implementation="torch")
    assert g.dense == [True]
    grid = torch.randn(9, 9)  # vertex (ix, iy) -> row ix + 9 * iy
    with torch.no_grad():
        g.table[:, 0] = grid.t().reshape(-1)
    x = torch.rand(200, 2)
    pos = x * 8
    i0 = pos.floor().clamp(max=7).long()
    f = pos - i0
    v = lambda dx, dy: grid[i0[:, 0] + dx, i0[:, 1] + dy]  # noqa: E731
    expect = (v(0, 0) * (1 - f[:, 0]) * (1 - f[:, 1]) + v(1, 0) * f[:, 0] * (1 - f[:, 1])
              + v(0, 1) * (1 - f[:, 0]) * f[:, 1] + v(1, 1) * f[:, 0] * f[:, 1])
    torch.testing.assert_close(g(x)[:, 0], expect, rtol=1e-5, atol=1e-5)


def test_hashed_levels_use_the_table_size_and_levels_grow_geometrically():
    g = HashGrid(2, levels=8, features=2, log2_table=8, base_res=4, max_res=256, implementation="torch")
    assert g.resolutions[0] == 4 and g.resolutions[-1] in (255, 256)
    ratios = [b / a for a, b in zip(g.resolutions, g.resolutions[1:])]
    assert max(ratios) / min(ratios) < 1.2
    assert not all(g.dense) and g.table.shape[0] == g.offsets[-1]
    assert all(s <= 2 ** 8 for s in (b - a for a, b in zip(g.offsets, g.offsets[1:])))


def test_triplane_shapes_and_gradient_reaches_tables():
    tp = TriPlaneHash(torch.tensor([[-1.0, -1, -1], [1, 1, 1]]), levels=3, features=2, log2_table=8, max_res=32)
    x = torch.rand(100, 3) * 2 - 1
    y = tp(x)
    assert y.shape == (100, 3 * 3 * 2) == (100, tp.out_dim)
    y.square().sum().backward()
    assert all(g.table.grad is not None and g.table.grad.abs().sum() > 0 for g in tp.grids)


def test_audio_encoders_shapes_and_smoothing_weights():
    net = AudioNet(13, 16, 32)
    assert net(torch.randn(4, 16, 13)).shape == (4, 32)
    with pytest.raises(ValueError, match=r"expects \[B, 16, 13\]"):
        net(torch.randn(4, 8, 13))
    att = AudioAttNet(32, 8)
    codes = torch.randn(2, 8, 32)
    same = codes[:, :1].expand(2, 8, 32)
    torch.testing.assert_close(att(same), same[:, 0], rtol=1e-5, atol=1e-6)  # a convex combination
    enc = AudioEncoder(13, 16, 32, smooth=8)
    assert enc(torch.randn(3, 8, 16, 13)).shape == (3, 32)
    assert neighbour_indices(0, 4, 10).tolist() == [[0, 0, 0, 1]]
    assert neighbour_indices(9, 4, 10).tolist() == [[7, 8, 9, 9]]


def test_gstalker_starts_at_zero_and_learns():
    torch.manual_seed(0)
    m = GSTalkerDeformation(torch.tensor([[-0.1, -0.1, -0.1], [0.1, 0.1, 0.1]]), audio_in_dim=13, levels=4,
                            log2_table=10, max_res=64, hidden=32, smooth=4)
    means = torch.rand(200, 3) * 0.2 - 0.1
    windows = torch.randn(1, 4, 16, 13)
    d = m(means, windows, torch.tensor([0.3]))
    assert d.means.shape == (200, 3) and d.quats.shape == (200, 4) and d.scales.shape == (200, 3)
    assert d.means.abs().max() == 0 and d.quats.abs().max() == 0  # zero-initialised head
    params = {"means": means, "quats": torch.randn(200, 4), "scales": torch.randn(200, 3),
              "opacities": torch.randn(200), "sh0": torch.randn(200, 1, 3)}
    out = apply_deltas(params, d)
    for k, v in params.items():
        torch.testing.assert_close(out[k], v)
    # a few steps teach it an offset that depends on the audio: window a moves the points up
    # by 2 mm, window b down by 2 mm
    other = torch.randn(1, 4, 16, 13)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        da, db = m(means, windows, torch.tensor([0.3])), m(means, other, torch.tensor([0.3]))
        loss = (da.means - 0.002).square().mean() + (db.means + 0.002).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0] and math.isfinite(losses[-1])
    with torch.no_grad():
        up, down = m(means, windows, torch.tensor([0.3])).means, m(means, other, torch.tensor([0.3])).means
    # the same points, the same blink: only the audio differs, and the offsets follow it
    assert up.mean() > 0.001 and down.mean() < -0.001


def test_remove_rigid_cache_follows_in_place_changes_of_the_means():
    from gstalk.deform.base import remove_rigid

    torch.manual_seed(0)
    means = torch.randn(50, 3)
    omega, tau = torch.tensor([0.01, -0.02, 0.03]), torch.tensor([0.1, 0.0, -0.1])
    rigid = torch.cross(omega.expand(50, 3), means - means.mean(0), dim=1) + tau
    torch.testing.assert_close(remove_rigid(means, rigid), torch.zeros(50, 3), atol=1e-5, rtol=0)
    means.mul_(2.0)  # same storage, new values: the cached basis must not be reused
    rigid2 = torch.cross(omega.expand(50, 3), means - means.mean(0), dim=1) + tau
    torch.testing.assert_close(remove_rigid(means, rigid2), torch.zeros(50, 3), atol=1e-5, rtol=0)
    nonrigid = torch.zeros(50, 3)
    nonrigid[0, 0] = 1.0
    out = remove_rigid(means, nonrigid)
    assert out.abs().sum() > 0.5  # a single moving point is mostly non-rigid
