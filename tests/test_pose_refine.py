"""Per-frame pose refinement (gstalk.train.pose_refine): the rotation maths, the least-squares
lift, and a registration pass that recovers a known perturbation of the cameras on the
synthetic head and leaves correct cameras alone; the coarse stage's cameras file and its use
by the later stages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gstalk.train.pose_refine import (
    PosePrior,
    apply_corrections,
    corrected_viewmats,
    correction_between,
    lift,
    project_points,
    registration_pass,
    schedule,
    so3_exp,
)


def test_so3_exp_matches_scipy_and_is_smooth_at_zero():
    from scipy.spatial.transform import Rotation

    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 3, generator=g, dtype=torch.float64) * 0.7
    want = Rotation.from_rotvec(w.numpy()).as_matrix()
    assert np.allclose(so3_exp(w).numpy(), want, atol=1e-12)
    tiny = torch.tensor([[1e-7, -2e-7, 3e-8]], dtype=torch.float64, requires_grad=True)
    r = so3_exp(tiny)
    assert torch.allclose(r, torch.eye(3, dtype=torch.float64)[None], atol=1e-6)
    r.sum().backward()  # finite gradient through the Taylor branch
    assert torch.isfinite(tiny.grad).all()


def test_apply_and_recover_a_correction():
    from gstalk.testing.mannequin import head_pose

    vm = torch.from_numpy(np.stack([head_pose(0.1, -0.05, 0.02), head_pose(-0.2, 0.1, 0.0)])).float()
    omega = torch.tensor([[0.01, -0.02, 0.005], [0.0, 0.03, 0.0]])
    tau = torch.tensor([[0.002, -0.001, 0.004], [0.0, 0.0, -0.01]])
    out = apply_corrections(vm, omega, tau)
    # still a rigid transform, the bottom row kept
    rot = out[:, :3, :3]
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-5)
    assert torch.equal(out[:, 3], vm[:, 3])
    w2, t2 = correction_between(vm, out)
    assert torch.allclose(w2, omega, atol=1e-5) and torch.allclose(t2, tau, atol=1e-6)
    # the rotation turns the head about its own origin: the origin only moves by tau
    assert torch.allclose(out[:, :3, 3], vm[:, :3, 3] + tau)


def test_lift_recovers_a_rigid_motion_of_the_face_points_and_the_prior_shrinks_it():
    from gstalk.testing.mannequin import head_pose
    from gstalk.tracking.canonical import canonical_face

    pts = torch.from_numpy(canonical_face().vertices).float()
    K = torch.tensor([[500.0, 0, 128], [0, 500.0, 128], [0, 0, 1]])
    vm = torch.from_numpy(head_pose(0.05, 0.02, 0.0, t=(0.0, 0.01, 0.45))).float()
    prior = PosePrior(noise_px=0.001)  # the image all but certain
    true = torch.tensor([0.6, -0.9, 0.3, 0.5, -0.7, 0.2])  # prior units: about a degree, a millimetre
    moved = corrected_viewmats(vm[None], true[None], prior)[0]
    got = lift(vm, K, pts, project_points(pts, moved, K), prior)
    assert torch.allclose(got, true, atol=0.02)
    # the correct camera is left alone
    assert got.new_zeros(6).allclose(lift(vm, K, pts, project_points(pts, vm, K), prior), atol=1e-5)
    # a weak image (noise as large as the motion) gives a correction pulled towards the prior's mean
    weak = lift(vm, K, pts, project_points(pts, moved, K), PosePrior(noise_px=2.0))
    assert weak.norm() < 0.8 * true.norm()


def test_pose_prior_scales_its_pixels_with_the_image():
    """At twice the working size (focal and principal point doubled, every target twice as
    far in pixels, a few points off by a constant outlier) the scaled prior lifts the same
    correction as the unscaled one at the reference size; left unscaled, the doubled pixel
    errors would weigh four times as much against the prior and move it."""
    from gstalk.config import CoarseConfig
    from gstalk.testing.mannequin import head_pose
    from gstalk.tracking.canonical import canonical_face
    from gstalk.train.coarse import pose_prior

    cfg = CoarseConfig(pose_noise_px=0.5)  # a weak image, so the prior's pull shows
    p1, p2 = pose_prior(cfg), pose_prior(cfg, 2.0)
    assert (p2.noise_px, p2.huber_px) == (2 * p1.noise_px, 2 * p1.huber_px) and p2.sigma().equal(p1.sigma())
    pts = torch.from_numpy(canonical_face().vertices).float()
    K1 = torch.tensor([[500.0, 0, 128], [0, 500.0, 128], [0, 0, 1]])
    K2 = K1 * torch.tensor([[2.0], [2.0], [1.0]])
    vm = torch.from_numpy(head_pose(0.05, 0.02, 0.0, t=(0.0, 0.01, 0.45))).float()
    moved = corrected_viewmats(vm[None], torch.tensor([[0.6, -0.9, 0.3, 0.5, -0.7, 0.2]]), p1)[0]
    t1 = project_points(pts, moved, K1)
    t1[::40] += 3.0  # outliers beyond the Huber threshold
    t2 = (t1 - K1[:2, 2]) * 2 + K2[:2, 2]
    got1 = lift(vm, K1, pts, t1, p1)
    assert torch.allclose(lift(vm, K2, pts, t2, p2), got1, atol=1e-4)
    assert not torch.allclose(lift(vm, K2, pts, t2, p1), got1, atol=1e-2)
    with pytest.raises(ValueError, match="positive"):
        pose_prior(cfg, 0.0)


def test_schedule():
    assert schedule(2500, 3) == [1000, 1750, 2500]
    assert schedule(2500, 1) == [2500]
    assert schedule(2500, 0) == []
    assert schedule(60, 3) == [24, 42, 60]


@pytest.fixture
def exact_frames(trained_ws):
    """Training frames of the tiny trained workspace whose images are its coarse Gaussians'
    own renders through the frames' cameras: the model is exact, the true cameras known."""
    from gstalk.dataset import build_frameset, split_indices
    from gstalk.gaussians.splat import composite, splat
    from gstalk.tensorio import load_tensors
    from gstalk.workspace import Workspace

    ws = Workspace.open(trained_ws)
    train, _ = split_indices(ws)
    params, _ = load_tensors(ws.path("coarse/gaussians.safetensors"))
    d = build_frameset(ws, list(train)[::10][:8])
    with torch.no_grad():
        imgs = []
        for i in range(len(d)):
            c, a, _ = splat(params, d.viewmats[i:i + 1], d.K, d.width, d.height)
            imgs.append((composite(c, a, d.background(i)).clamp(0, 1)[0] * 255).round().to(torch.uint8))
    d.images = torch.stack(imgs)
    return params, d


def test_registration_recovers_a_known_perturbation_and_leaves_correct_cameras_alone(exact_frames):
    params, d = exact_frames
    true = d.viewmats.clone()
    n = len(d)
    perturbed = torch.arange(n) % 2 == 0
    omega = torch.zeros(n, 3)
    tau = torch.zeros(n, 3)
    omega[perturbed] = torch.tensor([0.0, math.radians(1.5), math.radians(-0.8)])  # 1.7 degrees
    tau[perturbed] = torch.tensor([0.002, -0.0015, 0.0])  # 2.5 mm
    tracked = apply_corrections(true, omega, tau)
    prior = PosePrior()
    corrections = torch.zeros(n, 6)
    for _ in range(3):
        res = registration_pass(params, d, tracked, corrections, prior)
        corrections = res.corrections
    assert res.failed == 0 and res.rejected == 0
    refined = corrected_viewmats(tracked, corrections, prior)
    err_w, err_t = correction_between(true, refined)
    err_deg = err_w.norm(dim=1) * 180 / math.pi
    err_mm = err_t.norm(dim=1) * 1000
    # how far the face mesh's points land from where the true camera puts them, px
    from gstalk.tracking.canonical import canonical_face

    pts = torch.from_numpy(canonical_face().vertices).float()
    err_px = torch.stack([(project_points(pts, refined[i], d.K) - project_points(pts, true[i], d.K)).norm(dim=1).mean()
                          for i in range(n)])
    # stated tolerance: within 0.4 degree and 0.5 mm of the true camera (from 1.7 degrees and
    # 2.5 mm off) on the 128 px test frames; a correct camera moves by less than 0.1 degree and
    # its face by less than 0.05 px on average (0.003-0.010 px measured). The camera is 0.86 m
    # away with a 512 px focal length, 1.7 mm a pixel across: a bound of 0.1 mm, as this test
    # had, sat below what the frames can show and flipped with the float rounding of the
    # trained workspace (0.054 mm, then 0.103 mm, for a face moved by 0.010 px)
    assert (err_deg[perturbed] < 0.4).all() and (err_mm[perturbed] < 0.5).all(), (err_deg, err_mm)
    assert (err_deg[~perturbed] < 0.1).all() and (err_px[~perturbed] < 0.05).all(), (err_deg, err_px)


def test_coarse_writes_cameras_that_fine_render_and_eval_use(ws_copy):
    """The trained workspace's coarse stage refined its cameras: the file holds every frame,
    the tracked ones it started from, and the stages after coarse read the refined ones."""
    from gstalk.avatar import Avatar
    from gstalk.dataset import build_frameset, load_cameras, load_tracks, split_indices
    from gstalk.tensorio import load_tensors
    from gstalk.workspace import COARSE_CAMERAS, Workspace

    ws = Workspace.open(ws_copy)
    t, meta = load_tensors(ws.path(COARSE_CAMERAS))
    tracks = load_tracks(ws)
    n = tracks.viewmats.shape[0]
    assert t["viewmats"].shape == (n, 4, 4) and t["corrections"].shape == (n, 6)
    assert torch.equal(t["tracked"], tracks.viewmats)
    assert meta["method"] == "registration" and meta["passes"] == 3
    # the stored corrections turn the tracked cameras into the refined ones
    w, tau = t["corrections"][:, :3], t["corrections"][:, 3:]
    assert torch.allclose(apply_corrections(t["tracked"], w, tau), t["viewmats"], atol=1e-6)
    assert t["registered"].bool().any()
    _, test = split_indices(ws)
    assert t["registered"][test.start:].bool().all()  # the test frames were registered too
    cams = load_cameras(ws)
    assert cams.refined and torch.equal(cams.viewmats, t["viewmats"])
    assert not load_cameras(ws, "tracked").refined
    assert torch.equal(build_frameset(ws, [0, 5]).viewmats, t["viewmats"][[0, 5]])
    assert torch.equal(Avatar.from_workspace(ws).viewmats, t["viewmats"])
    # a workspace made before pose refinement (no cameras file) keeps its tracked cameras
    ws.path(COARSE_CAMERAS).unlink()
    assert not load_cameras(ws).refined
    assert torch.equal(Avatar.from_workspace(ws).viewmats, tracks.viewmats)
