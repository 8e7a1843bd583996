"""The fine stage's model parts and the three models: dense planes, the audio factorization
plane (against a hand computation), KAN layers (B-spline basis against scipy), the
spatial-audio attention, periodic encoding, the mask-margin loss, and each model learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gstalk.config import FineConfig, with_settings
from gstalk.deform.attention import SpatialAudioAttention, periodic_encoding
from gstalk.deform.base import apply_deltas
from gstalk.deform.kan import KAN, KANLinear, bspline_basis, uniform_cubic_basis
from gstalk.deform.planes import AudioFactorizationPlane, DensePlanes, LineGrids, sample_line, sample_plane
from gstalk.deform.registry import MODELS, build_model, model_spec
from gstalk.train.losses import dilate_mask, mask_margin_loss

AABB = torch.tensor([[-0.1, -0.1, -0.1], [0.1, 0.1, 0.1]])


def test_sample_plane_and_line_match_hand_interpolation():
    plane = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)  # [D, rows (v), cols (u)]
    uv = torch.tensor([[0.25, 0.75], [0.0, 0.0], [1.0, 1.0]])
    # u = 0.25 -> col 0.5, v = 0.75 -> row 1.5
    expect0 = 0.25 * (plane[:, 1, 0] + plane[:, 1, 1] + plane[:, 2, 0] + plane[:, 2, 1])
    out = sample_plane(plane, uv)
    torch.testing.assert_close(out[0], expect0)
    torch.testing.assert_close(out[1], plane[:, 0, 0])
    torch.testing.assert_close(out[2], plane[:, 2, 2])
    line = torch.tensor([[0.0, 10.0, 30.0]])
    torch.testing.assert_close(sample_line(line, torch.tensor([0.0, 0.25, 0.75, 1.0]))[:, 0],
                               torch.tensor([0.0, 5.0, 20.0, 30.0]))


def test_factorization_plane_matches_a_hand_computed_small_case():
    torch.manual_seed(0)
    fp = AudioFactorizationPlane(AABB, audio_dim=3, dim=2, base_res=2, scales=(1,))
    x = torch.tensor([[0.0, 0.05, -0.1]])  # normalised (0.5, 0.75, 0)
    a = torch.randn(3)
    f = fp(x, a)
    assert f.shape == (1, fp.out_dim) == (1, 6)
    u = torch.tensor([0.5, 0.75, 0.0])
    P, L, A = fp.space.planes[0], fp.lines.lines[0], fp.prototypes[0]

    def bilinear(p, uu, vv):  # p [D, 2, 2]; uu along columns, vv along rows
        return (p[:, 0, 0] * (1 - uu) * (1 - vv) + p[:, 0, 1] * uu * (1 - vv)
                + p[:, 1, 0] * (1 - uu) * vv + p[:, 1, 1] * uu * vv)

    q = fp.query[0](fp.query_norm(a))
    w = torch.softmax(q @ A.T / math.sqrt(2), dim=0)
    fa = w @ A  # Eq. 4
    expect = []
    for j, (i1, i2, k) in enumerate(((0, 1, 2), (0, 2, 1), (1, 2, 0))):
        fk = L[j, :, 0] * (1 - u[k]) + L[j, :, 1] * u[k]
        expect.append(bilinear(P[j], u[i1], u[i2]) * fk * fa)  # Eq. 5-6
    torch.testing.assert_close(f[0], torch.cat(expect), rtol=1e-5, atol=1e-6)


def test_dense_planes_lines_shapes_and_gradients():
    planes, lines = DensePlanes((4, 8), 3), LineGrids((4, 8), 3)
    u = torch.rand(50, 3)
    outs = planes(u) + lines(u)
    assert [tuple(o.shape) for o in outs] == [(3, 50, 3)] * 4
    sum(o.sum() for o in outs).backward()
    params = list(planes.parameters()) + list(lines.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_bspline_basis_matches_scipy_and_partitions_unity():
    from scipy.interpolate import BSpline

    layer = KANLinear(2, 1, grid_size=5, spline_order=3)
    x = torch.linspace(-0.999, 0.999, 41, dtype=torch.float64)[:, None].expand(-1, 2)
    basis = bspline_basis(x, layer.knots.double(), 3)
    assert basis.shape == (41, 2, 8)
    torch.testing.assert_close(basis.sum(-1), torch.ones(41, 2, dtype=torch.float64))
    # the closed-form cubic used by the layer equals the recursion, also outside the grid
    xs = torch.linspace(-2.0, 2.0, 97, dtype=torch.float64)[:, None].expand(-1, 2)
    torch.testing.assert_close(uniform_cubic_basis(xs, -1.0, 0.4, 8), bspline_basis(xs, layer.knots.double(), 3))
    knots = layer.knots[0].double().numpy()
    for m in range(8):
        ref = BSpline.basis_element(knots[m:m + 5], extrapolate=False)(x[:, 0].numpy())
        np.testing.assert_allclose(basis[:, 0, m].numpy(), np.nan_to_num(ref), atol=1e-12)


def test_kan_gradients_match_finite_differences_and_zero_init():
    torch.manual_seed(0)
    kan = KAN(3, 4, 1, 2, grid_size=4, zero_last=False).double()
    x = (torch.rand(5, 3, dtype=torch.float64) * 1.6 - 0.8).requires_grad_()
    assert torch.autograd.gradcheck(kan, (x,))
    z = KAN(3, 4, 1, 2, zero_last=True)
    assert z(torch.rand(7, 3)).abs().max() == 0


def test_periodic_encoding_and_attention_shapes_and_gradients():
    pe = periodic_encoding(torch.tensor([0.0, 0.5]), 2)
    torch.testing.assert_close(pe, torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, -1.0]]), atol=1e-6, rtol=0)
    att = SpatialAudioAttention(spatial_dim=6, audio_dim=5, window=4, dim=8, pe_levels=3)
    spatial = torch.randn(30, 6, requires_grad=True)
    codes = torch.randn(4, 5, requires_grad=True)
    out = att(spatial, codes, torch.tensor([0.2]))
    assert out.shape == (30, 8)
    out.square().sum().backward()
    assert spatial.grad.abs().sum() > 0 and codes.grad.abs().sum() > 0
    # each output row is a convex combination of the value vectors of the K + 2 tokens
    with torch.no_grad():
        v = att.v(att.tokens(codes, torch.tensor([0.2])))
        lo, hi = v.min(0).values, v.max(0).values
        assert ((out >= lo - 1e-5) & (out <= hi + 1e-5)).all()


def test_mask_margin_loss_and_dilation():
    m = torch.zeros(1, 8, 8, 1)
    m[0, 3:5, 3:5] = 1
    assert mask_margin_loss(m * 0.85, m, 0.2).item() == 0.0  # within the margin
    g = torch.zeros_like(m)
    # |m - g| = 1 on 4 of 64 pixels: (1 - 0.2) * 4 / 64
    assert mask_margin_loss(g, m, 0.2).item() == pytest.approx(0.8 * 4 / 64)
    d = dilate_mask(m, 1)
    assert d.sum() == 16 and d[0, 2:6, 2:6].min() == 1


def _spec(name: str, **cfg):
    c = with_settings(FineConfig(), grid_levels=3, grid_log2_table=8, grid_max_res=32, hidden=16, audio_dim=6,
                      audio_smooth_window=4, plane_smooth_window=4, plane_res=4, plane_dim=4, feature_dim=8,
                      attention_dim=8, attention_window=4, kan_hidden=8, **cfg)
    return model_spec(name, AABB, audio_in_dim=13, window=16, cfg=c)


@pytest.mark.parametrize("name", MODELS)
def test_each_model_starts_at_zero_and_learns_an_audio_dependent_offset(name):
    torch.manual_seed(0)
    m = build_model(_spec(name))
    means = torch.rand(150, 3) * 0.2 - 0.1
    w_a, w_b = torch.randn(1, 4, 16, 13), torch.randn(1, 4, 16, 13)
    d = m(means, w_a, torch.tensor([0.3]))
    assert d.means.shape == (150, 3) and d.means.abs().max() == 0 and d.quats.abs().max() == 0
    params = {"means": means, "quats": torch.randn(150, 4), "scales": torch.randn(150, 3),
              "opacities": torch.randn(150), "sh0": torch.randn(150, 1, 3)}
    for k, v in apply_deltas(params, d).items():
        torch.testing.assert_close(v, params[k])
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        da, db = m(means, w_a, torch.tensor([0.3])), m(means, w_b, torch.tensor([0.3]))
        wa = da.weight[:, None] if da.weight is not None else 1.0
        wb = db.weight[:, None] if db.weight is not None else 1.0
        # audio a moves the points up by 2 mm, audio b down
        loss = (wa * da.means - 0.002).square().mean() + (wb * db.means + 0.002).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_audioplane_dynamism_and_egstalker_ablations_build():
    ap = build_model(_spec("audioplane"))
    d = ap(torch.rand(20, 3) * 0.2 - 0.1, torch.randn(1, 4, 16, 13), torch.tensor([0.0]))
    assert d.weight is not None and torch.allclose(d.weight, torch.full((20,), 0.5))  # d starts at 0.5
    assert build_model(_spec("audioplane", dynamic=False))(torch.rand(5, 3) * 0.1, torch.randn(1, 4, 16, 13),
                                                            torch.tensor([0.0])).weight is None
    for head, fusion in (("mlp", "attention"), ("kan", "concat")):
        m = build_model(_spec("egstalker", head=head, fusion=fusion))
        assert m(torch.rand(5, 3) * 0.1, torch.randn(1, 4, 16, 13), torch.tensor([0.0])).means.shape == (5, 3)
