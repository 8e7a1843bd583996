"""GSTalker's pose-conditioned torso field (gstalk.deform.torso)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gstalk.deform.torso import TorsoField, init_torso, pixel_encoding, pose_code, render_torso, torso_seed_pixels
from gstalk.gaussians.model import sh0_to_rgb
from gstalk.train.losses import photometric_loss

K = torch.tensor([[80.0, 0.0, 32.0], [0.0, 80.0, 32.0], [0.0, 0.0, 1.0]])
H = W = 64


def _poses(n: int, shift: float = 0.0) -> torch.Tensor:
    vm = torch.eye(4).repeat(n, 1, 1)
    vm[:, 2, 3] = 0.5
    vm[:, 0, 3] = torch.linspace(-shift, shift, n)
    return vm


def _scene(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    imgs = torch.zeros(n, H, W, 3, dtype=torch.uint8)
    imgs[..., 40:, 12:52, :] = torch.tensor([200, 100, 50], dtype=torch.uint8)
    masks = torch.zeros(n, H, W, dtype=torch.uint8)
    masks[:, 40:, 12:52] = 255
    return imgs, masks


def test_encodings_have_their_documented_shapes():
    vm = _poses(3, 0.01)
    pc = pose_code(vm)
    assert pc.shape == (3, 9)
    torch.testing.assert_close(pc[:, :6], torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]).expand(3, 6))  # columns 0, 1
    torch.testing.assert_close(pc[:, 6:], vm[:, :3, 3])
    uv = torch.tensor([[0.5, -0.25]])
    enc = pixel_encoding(uv, 2)
    assert enc.shape == (1, 2 + 4 * 2)
    torch.testing.assert_close(enc[0, 2], torch.tensor(math.sin(math.pi * 0.5)))  # sin(2^0 π u)
    torch.testing.assert_close(enc[0, 3], torch.tensor(math.sin(2 * math.pi * 0.5)))  # sin(2^1 π u)


def test_seeds_are_on_the_mask_grid_and_back_project_onto_their_pixels():
    imgs, masks = _scene()
    masks[0, :, :] = 0  # one frame without torso: 5/6 of the frames still have it
    px = torso_seed_pixels(masks.numpy(), stride=4)
    assert len(px) == (24 // 4) * (40 // 4)
    assert (masks[1, px[:, 1], px[:, 0]] == 255).all()
    t = init_torso(imgs, masks, _poses(6), K, 0.1, stride=4)
    assert t.n == len(px)
    # the seeds lie one head radius behind the head centre, on the rays through their pixels
    torch.testing.assert_close(t.means[:, 2], torch.full((t.n,), 0.6))
    proj = (t.means @ K.T)[:, :2] / t.means[:, 2:3]
    torch.testing.assert_close(proj, torch.from_numpy(px).float() + 0.5)
    # colour = the mean colour where the mask is set
    torch.testing.assert_close(sh0_to_rgb(t.sh0[:, 0]), torch.tensor([200, 100, 50]).float().expand(t.n, 3) / 255.0)
    # the untrained field is the identity
    out = t(_poses(1, 0.0))
    torch.testing.assert_close(out["means"], t.means.detach())
    torch.testing.assert_close(out["opacities"], t.opacities.detach())
    assert out["shN"].shape == (t.n, 0, 3)


def test_no_torso_gives_an_empty_field():
    imgs, masks = _scene()
    t = init_torso(imgs, torch.zeros_like(masks), _poses(6), K, 0.1)
    assert t.n == 0


def test_rendered_torso_covers_its_mask_and_nothing_else():
    imgs, masks = _scene()
    t = init_torso(imgs, masks, _poses(6), K, 0.1, stride=2)
    colors, alphas = render_torso(t, _poses(1), K, W, H, backend="torch")
    a = alphas[0, ..., 0]
    assert a[44:60, 16:48].min() > 0.95  # inside, away from the edge: opaque
    assert a[:30].max() < 0.01 and a[:, :6].max() < 0.01  # far outside: transparent
    rgb = colors[0, 50, 30] / a[50, 30]
    torch.testing.assert_close(rgb, torch.tensor([200, 100, 50]).float() / 255.0, atol=0.02, rtol=0)


def test_the_field_learns_a_pose_dependent_torso():
    """A torso that slides sideways with the head: a static torso cannot fit both poses,
    the pose-conditioned field can (loss falls well below the static optimum's)."""
    torch.manual_seed(0)
    n = 2
    vm = _poses(n, 0.02)  # head 2 cm left, then 2 cm right
    imgs = torch.zeros(n, H, W, 3, dtype=torch.uint8)
    masks = torch.zeros(n, H, W, dtype=torch.uint8)
    for i, x0 in enumerate((10, 18)):  # the torso 8 px apart in the two frames
        imgs[i, 40:, x0:x0 + 36] = 200
        masks[i, 40:, x0:x0 + 36] = 255
    t = init_torso(imgs, masks, vm, K, 0.1, stride=2, hidden=32)
    plate = torch.zeros(1, H, W, 3)
    opt = torch.optim.Adam([{"params": t.field_parameters(), "lr": 3e-3},
                            {"params": [t.opacities, t.sh0], "lr": 2e-2}])

    def losses() -> list[torch.Tensor]:
        out = []
        for i in range(n):
            c, a = render_torso(t, vm[i:i + 1], K, W, H, backend="auto")
            out.append(photometric_loss(c + (1 - a) * plate, imgs[i:i + 1].float() / 255.0, 0.0))
        return out

    with torch.no_grad():
        before = sum(float(x) for x in losses())
    for _ in range(80):
        opt.zero_grad()
        loss = sum(losses())
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = sum(float(x) for x in losses())
    assert after < 0.5 * before, (before, after)
    # it is the pose that does it: the two frames' torsos now differ where only one has it
    with torch.no_grad():
        a0 = render_torso(t, vm[:1], K, W, H, backend="auto")[1][0, 50, 12, 0]
        a1 = render_torso(t, vm[1:], K, W, H, backend="auto")[1][0, 50, 12, 0]
    assert a0 - a1 > 0.3, (float(a0), float(a1))


def test_field_state_round_trips_through_its_spec():
    imgs, masks = _scene()
    t = init_torso(imgs, masks, _poses(6, 0.01), K, 0.1, stride=4, hidden=16)
    u = TorsoField(**t.spec())
    u.load_state_dict(t.state_dict())
    vm = _poses(1, 0.005)
    for k, v in t(vm).items():
        torch.testing.assert_close(u(vm)[k], v)
    assert np.isfinite(u.pose_std.numpy()).all() and (u.pose_std > 0).all()


def _textured_frames(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A torso with a texture (stripes and a collar-like V) on a black plate, at 96 px."""
    import cv2

    size = 96
    imgs = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    rng = np.random.default_rng(0)
    tex = cv2.GaussianBlur((rng.random((size, size)) * 255).astype(np.uint8), (0, 0), 1.2)
    for i in range(n):
        imgs[i, 50:, 16:80] = tex[50:, 16:80, None] // 2 + np.array([90, 60, 40], np.uint8)
        cv2.line(imgs[i], (30, 50), (48, 80), (240, 240, 240), 3)
        cv2.line(imgs[i], (66, 50), (48, 80), (240, 240, 240), 3)
        masks[i, 50:, 16:80] = 255
    return torch.from_numpy(imgs), torch.from_numpy(masks)

def _torso_frames(imgs: torch.Tensor, masks: torch.Tensor, vm: torch.Tensor, K: torch.Tensor):  # type: ignore[no-untyped-def]
    """A FrameSet of the textured frames [F, H, W, 3] whose torso masks are ``masks`` (no head,
    no mouth, no audio), for the torso registration tests."""
    from gstalk.train.frames import FrameSet

    n, size = imgs.shape[0], imgs.shape[1]
    return FrameSet(images=imgs, backgrounds=imgs, viewmats=vm, K=K, head_masks=torch.zeros_like(masks),
                    mouth_masks=torch.zeros_like(masks), mouth_boxes=torch.zeros(n, 4), blink=torch.zeros(n),
                    audio=None, frame_ids=torch.arange(n), torso_masks=masks,
                    plate=torch.zeros(size, size, 3, dtype=torch.uint8))



def test_registered_offsets_shift_the_torso_and_registration_finds_a_known_shift():
    from gstalk.train.pose_refine import shift_torso, torso_shifts

    size = 96
    k96 = torch.tensor([[120.0, 0.0, 48.0], [0.0, 120.0, 48.0], [0.0, 0.0, 1.0]])
    imgs, masks = _textured_frames()
    vm = _poses(3)
    t = init_torso(imgs, masks, vm, k96, 0.1, stride=1, n_frames=3)
    assert t.spec()["n_frames"] == 3 and t.offsets.shape == (3, 2)
    # a field trained before registration (no n_frames) has no offsets and renders as before
    assert "n_frames" not in init_torso(imgs, masks, vm, k96, 0.1, stride=4).spec()
    depth = float(t.means[:, 2].detach().median())
    with torch.no_grad():
        t.offsets[1] = torch.tensor([3.0, -2.0]) * depth / 120.0  # frame 1's torso 3 px right, 2 px up
        c0, a0 = render_torso(t, vm[:1], k96, size, size, frame=0)
        c1, a1 = render_torso(t, vm[:1], k96, size, size, frame=1)
        cn, an = render_torso(t, vm[:1], k96, size, size)  # no frame: no offset
    torch.testing.assert_close(cn, c0)
    # frame 1's render is frame 0's moved by (3, -2) px, away from the borders
    torch.testing.assert_close(c1[0, 60:88, 25:70], c0[0, 62:90, 22:67], atol=0.02, rtol=0)
    # the frames all show the same torso: registration measures frame 1 off by about (-3, +2)
    # px more than the others (DIS flow on a 96 px frame underestimates the vertical part by
    # up to a third; the seeded field itself is off the frames by under a pixel)
    data = _torso_frames(imgs, masks, vm, k96)
    shifts, valid = torso_shifts(t, data, backend="torch")
    assert valid.all()
    torch.testing.assert_close(shifts[1] - shifts[0], torch.tensor([-3.0, 2.0]), atol=0.8, rtol=0)
    torch.testing.assert_close(shifts[2], shifts[0], atol=0.05, rtol=0)
    # three passes (the fine stage runs two) bring every frame's torso onto the frame: frame
    # 1's offset equals the others' again, within 0.3 px, and nothing is left to correct
    for _ in range(3):
        shift_torso(t, data.frame_ids[valid], shifts[valid], k96)
        shifts, valid = torso_shifts(t, data, backend="torch")
    px = t.offsets * 120.0 / depth
    assert (px[1] - px[0]).abs().max() < 0.3 and shifts.abs().max() < 0.15, (px, shifts)


def _quat_matrix(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(-1, 3, 3)


def test_a_turn_about_the_optical_axis_rotates_means_and_orientations():
    from gstalk.deform.torso import turn_about_axis

    g = torch.Generator().manual_seed(0)
    means, scales = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    quats = torch.randn(5, 4, generator=g)
    a, lk = torch.tensor(0.3), torch.tensor(0.05)
    m, s, q = turn_about_axis(means, scales, quats, a, lk)
    rz = torch.tensor([[math.cos(0.3), -math.sin(0.3), 0.0], [math.sin(0.3), math.cos(0.3), 0.0], [0.0, 0.0, 1.0]])
    # x, y turn by 0.3 rad (x towards y) and grow by e^0.05; depth stays
    torch.testing.assert_close(m[:, :2], math.exp(0.05) * (means @ rz.T)[:, :2])
    torch.testing.assert_close(m[:, 2], means[:, 2])
    torch.testing.assert_close(s, scales + 0.05)
    # each Gaussian's orientation is turned with it: R(q') = R_z R(q)
    torch.testing.assert_close(_quat_matrix(q), rz @ _quat_matrix(quats), atol=1e-5, rtol=0)


def test_registration_finds_a_known_turn_and_undoes_it():
    from gstalk.train.pose_refine import torso_warps, warp_torso

    k96 = torch.tensor([[120.0, 0.0, 48.0], [0.0, 120.0, 48.0], [0.0, 0.0, 1.0]])
    imgs, masks = _textured_frames()
    vm = _poses(3)
    t = init_torso(imgs, masks, vm, k96, 0.1, stride=1, n_frames=3, turns=True)
    assert t.spec()["turns"] and t.turns.shape == (3, 2)
    u = TorsoField(**t.spec())  # the turns travel with the state
    u.load_state_dict(t.state_dict())
    with torch.no_grad():
        t.turns[1, 0] = math.radians(2.0)  # frame 1's torso turned 2° clockwise about the principal point
    data = _torso_frames(imgs, masks, vm, k96)
    warps, valid = torso_warps(t, data, backend="torch")
    assert valid.all()
    # the frames all show the unturned torso: frame 1 is measured about -2° off, the others ~0
    assert abs(math.degrees(float(warps[1, 2] - warps[0, 2])) + 2.0) < 0.6, warps
    assert abs(math.degrees(float(warps[2, 2] - warps[0, 2]))) < 0.2, warps
    for _ in range(3):
        warp_torso(t, data.frame_ids[valid], warps[valid], k96)
        warps, valid = torso_warps(t, data, backend="torch")
    # registered: frame 1's turn is back to the others' within 0.3°
    assert abs(math.degrees(float(t.turns[1, 0] - t.turns[0, 0]))) < 0.3, t.turns
    # without turns the shift-only registration is what it was
    t2 = init_torso(imgs, masks, vm, k96, 0.1, stride=1, n_frames=3)
    assert "turns" not in t2.spec() and not hasattr(t2, "turns")


def test_the_registration_clamp_scales_with_the_image():
    """A torso 6 px off on a 96 px frame: a wide clamp measures about 6 px; the default clamp,
    8 px at 256 px scaled to the frame (3 px at 96), cuts it there; a clamp given is kept."""
    from gstalk.config import pixel_scale
    from gstalk.train.pose_refine import torso_shifts

    k96 = torch.tensor([[120.0, 0.0, 48.0], [0.0, 120.0, 48.0], [0.0, 0.0, 1.0]])
    imgs, masks = _textured_frames()
    vm = _poses(3)
    t = init_torso(imgs, masks, vm, k96, 0.1, stride=1, n_frames=3)
    depth = float(t.means[:, 2].detach().median())
    with torch.no_grad():
        t.offsets[1] = torch.tensor([6.0, 0.0]) * depth / 120.0
    data = _torso_frames(imgs, masks, vm, k96)
    wide, _ = torso_shifts(t, data, backend="torch", max_px=20.0)
    assert 4.5 < float(wide[1].norm()) < 7.0, wide
    default, _ = torso_shifts(t, data, backend="torch")
    assert float(default[1].norm()) == pytest.approx(8.0 * pixel_scale(96), abs=1e-4)
    narrow, _ = torso_shifts(t, data, backend="torch", max_px=4.0)
    assert float(narrow[1].norm()) == pytest.approx(4.0, abs=1e-4)
