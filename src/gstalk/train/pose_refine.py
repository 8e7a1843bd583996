"""Per-frame corrections of the tracked head pose, estimated photometrically.

The track stage's head pose comes from landmarks (PnP, then smoothing): on a phone video it
is wrong by about a degree from frame to frame, and every Gaussian trained through a wrong
camera is blurred. Monocular head-avatar methods (NeRFace, INSTA, GaussianAvatars,
FlashAvatar) refine the pose of each frame together with the avatar; gstalk does it in the
coarse stage, alternating with the Gaussians' training: a *registration pass* renders each
frame with its current camera, measures where the frame shows what the render shows (dense
optical flow, DIS: Kroeger et al. 2016, OpenCV, on the head without the mouth), reads it at
the canonical face mesh's points and solves for the 6-DoF correction that moves them there,
with a Gaussian prior that keeps the correction small (:func:`lift`). Gradient descent on the
pose through the rasterizer was tried first (the coarse stage draws each frame about five
times: too few Adam steps for a pose), and an affine image registration (ECC) could not tell
a turn of the head from a shift; those probes' numbers were not kept (docs/methods.md,
"Pose refinement").

A correction δ = (ω, τ) of a frame acts on its world(canonical head)-to-camera matrix
``V = [R | t]`` (OpenCV camera, metres) as

    V' = [exp(ω) R | t + τ],

a rotation by the axis-angle ω (radians, camera axes) about the head's origin, then a
translation τ (metres, camera axes): the head turning about itself and the head moving stay
decoupled. The prior is N(0, diag(σ²)) with σ = (σ_rot x 3, σ_x, σ_y, σ_z)
(:class:`PosePrior`); corrections are solved in prior units δ / σ.

Pure tensors and arrays in, out; the coarse loop (:mod:`gstalk.train.coarse`) schedules the
passes, the coarse stage writes the refined cameras (``coarse/cameras.safetensors``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from gstalk.train.frames import FrameSet


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """Rotation matrices from axis-angle vectors (Rodrigues), differentiable at 0.

    Args:
        omega: [..., 3] float, radians (direction = axis, norm = angle).

    Returns:
        [..., 3, 3] rotation matrices, same dtype and device.
    """
    theta2 = (omega * omega).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    theta = theta2.clamp_min(1e-12).sqrt()
    small = theta2 < 1e-8
    # sin θ / θ and (1 - cos θ) / θ², with their Taylor series near 0
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(1e-12))
    x, y, z = omega.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1),
                     torch.stack([-y, x, zero], -1)], -2)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand(k.shape)
    return eye + a * k + b * (k @ k)


def apply_corrections(viewmats: torch.Tensor, omega: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Corrected cameras ``[exp(ω) R | t + τ]``.

    Args:
        viewmats: [B, 4, 4] float32 world(canonical head)-to-camera, OpenCV, metres.
        omega: [B, 3] radians, camera axes. tau: [B, 3] metres, camera axes.

    Returns:
        [B, 4, 4], differentiable in ``omega`` and ``tau``.
    """
    rot = so3_exp(omega.to(viewmats.dtype)) @ viewmats[:, :3, :3]
    trans = viewmats[:, :3, 3] + tau.to(viewmats.dtype)
    top = torch.cat([rot, trans[..., None]], dim=-1)
    bottom = viewmats[:, 3:4, :]
    return torch.cat([top, bottom], dim=1)


def correction_between(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The correction (ω, τ) that :func:`apply_corrections` needs to turn ``before`` into
    ``after`` (both [B, 4, 4] W2C): ([B, 3] radians, [B, 3] metres)."""
    rel = after[:, :3, :3] @ before[:, :3, :3].transpose(1, 2)
    cos = ((rel.diagonal(dim1=1, dim2=2).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    angle = torch.acos(cos)
    vee = torch.stack([rel[:, 2, 1] - rel[:, 1, 2], rel[:, 0, 2] - rel[:, 2, 0], rel[:, 1, 0] - rel[:, 0, 1]], -1)
    s = torch.sin(angle)
    factor = torch.where(s.abs() < 1e-7, 0.5 + angle ** 2 / 12.0, angle / (2.0 * s.clamp_min(1e-12)))
    return vee * factor[:, None], after[:, :3, 3] - before[:, :3, 3]


def rotation_degrees(omega: torch.Tensor) -> torch.Tensor:
    """Angles of axis-angle vectors [..., 3] in degrees: [...]."""
    return omega.norm(dim=-1) * (180.0 / math.pi)


@dataclass(frozen=True)
class PosePrior:
    """The Gaussian prior on a frame's correction: standard deviations of each rotation
    component (degrees) and of the translation along the camera's x, y, z (millimetres),
    and the registration noise (pixels) that weighs the image evidence against it."""

    sigma_rot_deg: float = 1.0
    sigma_trans_mm: tuple[float, float, float] = (2.0, 2.0, 10.0)
    noise_px: float = 0.05  # expected error of the mean registered point, px at the working size
    huber_px: float = 1.0  # a point's error beyond this (px at the working size) is weighed down (Huber)
    max_sigmas: float = 6.0  # a correction this far out (any component, prior units) is refused

    def sigma(self) -> torch.Tensor:
        """[6] float32: (σ_rot x 3 in radians, σ_x, σ_y, σ_z in metres)."""
        return torch.tensor([math.radians(self.sigma_rot_deg)] * 3 + [s / 1000.0 for s in self.sigma_trans_mm],
                            dtype=torch.float32)


def project_points(points: torch.Tensor, viewmat: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Pixels of canonical points [P, 3] (metres) through W2C ``viewmat`` [4, 4] and K [3, 3]: [P, 2]."""
    pc = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    return pc[:, :2] / pc[:, 2:3] * torch.stack([K[0, 0], K[1, 1]]) + K[:2, 2]


def lift(viewmat: torch.Tensor, K: torch.Tensor, points: torch.Tensor, targets: torch.Tensor,
         prior: PosePrior, start: torch.Tensor | None = None, iterations: int = 4) -> torch.Tensor:
    """The 6-DoF correction that moves the projected canonical ``points`` onto the pixels
    ``targets`` where the frame shows them, regularised by the prior (Gauss-Newton with a
    Huber weight per point, i.e. iteratively reweighted ridge least squares).

    With ``r(δ)`` the points' pixel errors after correcting the camera by δ (prior units),
    it minimises

        Σ_p ρ(|r_p(δ)|) / (P · noise_px²) + |δ|²,

    (ρ: Huber's loss with the prior's threshold ``huber_px``), the negative log posterior up to
    constants when the mean of the P points' errors has std ``noise_px``.

    Args:
        viewmat: [4, 4] float32 the *tracked* W2C camera (OpenCV, metres).
        K: [3, 3] float32 intrinsics, px.
        points: [P, 3] float32 canonical points (metres), e.g. the face mesh.
        targets: [P, 2] float32 where the frame shows them, px.
        prior: :class:`PosePrior` (its ``noise_px`` and ``huber_px`` in pixels of these ``targets``).
        start: [6] the current correction (prior units), the first iterate; default zeros.
        iterations: Gauss-Newton steps.

    Returns:
        [6] float32, the new correction in prior units (ω / σ_rot, τ / σ_trans).
    """
    sig = prior.sigma()
    d = torch.zeros(6) if start is None else start.detach().float().clone()
    if len(points) == 0:
        return d
    w = 1.0 / (len(points) * prior.noise_px ** 2)
    huber_px = prior.huber_px
    fx, fy = K[0, 0], K[1, 1]
    eye = torch.eye(3).expand(len(points), 3, 3)
    for _ in range(iterations):
        v = apply_corrections(viewmat[None], (d[:3] * sig[:3])[None], (d[3:] * sig[3:])[None])[0]
        rx = points @ v[:3, :3].T  # the rotated points, camera axes (the rotation is about the head origin)
        pc = rx + v[:3, 3]
        z = pc[:, 2]
        dpi = torch.zeros(len(points), 2, 3)  # d pixel / d camera point
        dpi[:, 0, 0], dpi[:, 0, 2] = fx / z, -fx * pc[:, 0] / z ** 2
        dpi[:, 1, 1], dpi[:, 1, 2] = fy / z, -fy * pc[:, 1] / z ** 2
        skew = torch.zeros(len(points), 3, 3)  # d (exp(ω) x) / d ω at 0 = -[x]_×
        skew[:, 0, 1], skew[:, 0, 2] = rx[:, 2], -rx[:, 1]
        skew[:, 1, 0], skew[:, 1, 2] = -rx[:, 2], rx[:, 0]
        skew[:, 2, 0], skew[:, 2, 1] = rx[:, 1], -rx[:, 0]
        jac = (dpi @ (torch.cat([skew, eye], dim=2) * sig))  # [P, 2, 6] per prior unit
        r = project_points(points, v, K) - targets  # [P, 2]
        norm = r.norm(dim=1).clamp_min(1e-9)
        hw = torch.where(norm <= huber_px, torch.ones_like(norm), huber_px / norm)[:, None].expand(-1, 2).reshape(-1)
        jac, r = jac.reshape(-1, 6), r.reshape(-1)
        hess = w * (jac * hw[:, None]).T @ jac + torch.eye(6)
        d = d - torch.linalg.solve(hess, w * jac.T @ (hw * r) + d)
    return d


def flow_targets(render: np.ndarray, frame: np.ndarray, mask: np.ndarray, pixels: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Where the frame shows what the render shows at ``pixels``: dense optical flow from the
    render to the frame (DIS, Kroeger et al. 2016, OpenCV), read at each pixel.

    Args:
        render, frame: [H, W, 3] float32 RGB in [0, 1].
        mask: [H, W] bool, the pixels that may be used (the head without the mouth).
        pixels: [P, 2] float pixel positions (x, y) in the render.

    Returns:
        ([P, 2] float32 target pixels, [P] bool: inside the image and the mask).
    """
    import cv2

    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    g0 = np.ascontiguousarray(np.clip(render @ luma * 255.0, 0, 255).astype(np.uint8))
    g1 = np.ascontiguousarray(np.clip(frame @ luma * 255.0, 0, 255).astype(np.uint8))
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    flow = dis.calc(g0, g1, None)
    h, w = mask.shape
    xs, ys = pixels[:, 0].astype(np.float32), pixels[:, 1].astype(np.float32)
    inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
    xi = np.clip(np.round(xs).astype(int), 0, w - 1)
    yi = np.clip(np.round(ys).astype(int), 0, h - 1)
    valid = inside & mask[yi, xi]
    fl = np.stack([cv2.remap(flow[..., k], xs[None], ys[None], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)[0]
                   for k in range(2)], axis=1)
    return (pixels + fl).astype(np.float32), valid


def head_registration_mask(head_mask: torch.Tensor, mouth_mask: torch.Tensor, margin: float = 0.04) -> np.ndarray:
    """Where a registration compares render and frame: the head mask minus the mouth mask
    dilated by ``margin`` x the image side (the mouth moves with speech; the static head
    of the coarse stage cannot follow it, and the pose must not try to).

    Args:
        head_mask, mouth_mask: [H, W] (or [1, H, W, 1]) masks, nonzero = inside.

    Returns:
        [H, W] bool.
    """
    import cv2

    head = head_mask.reshape(head_mask.shape[-3:-1] if head_mask.dim() == 4 else head_mask.shape).cpu().numpy() > 0
    mouth = mouth_mask.reshape(head.shape).cpu().numpy() > 0
    r = max(1, int(round(margin * max(head.shape))))
    mouth = cv2.dilate(mouth.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
    return head & ~mouth


@dataclass
class PassResult:
    """What one registration pass did.

    Attributes:
        corrections: [F, 6] float32 the corrections after the pass, prior units.
        registered: [F] bool, frames whose correction the pass set.
        shift_px: [F] float32 the mean distance (px) the flow moved the face points of each
            registered frame before the correction (NaN otherwise): how far off it was.
        failed: frames with too few usable points; rejected: frames whose correction was
            implausible (beyond ``prior.max_sigmas``) and kept as it was.
    """

    corrections: torch.Tensor
    registered: torch.Tensor
    shift_px: torch.Tensor
    failed: int
    rejected: int


def registration_pass(params: dict[str, torch.Tensor], data: FrameSet, tracked: torch.Tensor,
                      corrections: torch.Tensor, prior: PosePrior, *, backend: str = "auto",
                      sh_degree: int | None = None, points: torch.Tensor | None = None,
                      min_points: int = 50, progress: Callable[[], None] | None = None) -> PassResult:
    """One pass over the frames of ``data``: render each with its corrected camera, find
    where the frame shows the face points the render shows (:func:`flow_targets`, on
    :func:`head_registration_mask`) and solve for the new correction (:func:`lift`). The
    Gaussians do not change.

    Args:
        params: raw canonical Gaussians (on ``data``'s device).
        data: the frames (images, backgrounds, head and mouth masks, K).
        tracked: [F, 4, 4] float32 the frames' tracked W2C cameras.
        corrections: [F, 6] float32 their current corrections (prior units).
        prior: :class:`PosePrior`.
        backend, sh_degree: the rasterizer and SH degree to render with.
        points: [P, 3] canonical points the warp is lifted on (default: MediaPipe's
            canonical face mesh).
        min_points: frames with fewer face points inside the registration mask are skipped.
        progress: called after each frame.

    Returns:
        :class:`PassResult`.
    """
    from gstalk.gaussians.splat import composite, splat

    if points is None:
        from gstalk.tracking.canonical import canonical_face

        points = torch.from_numpy(canonical_face().vertices).float()
    sig = prior.sigma()
    out = corrections.detach().float().cpu().clone()
    tracked = tracked.detach().float().cpu()
    K = data.K.detach().float().cpu()
    registered = torch.zeros(len(data), dtype=torch.bool)
    moved = torch.full((len(data),), float("nan"))
    failed = rejected = 0
    for i in range(len(data)):
        d = out[i]
        vm = apply_corrections(tracked[i:i + 1], (d[:3] * sig[:3])[None], (d[3:] * sig[3:])[None])
        with torch.no_grad():
            colors, alphas, _ = splat(params, vm.to(data.device), data.K, data.width, data.height, backend=backend,
                                      sh_degree=sh_degree)
            render = composite(colors, alphas, data.background(i)).clamp(0, 1)[0].cpu().numpy()
        frame = data.image(i)[0].cpu().numpy()
        px = project_points(points, vm[0], K).numpy()
        targets, valid = flow_targets(render, frame, head_registration_mask(data.head_mask(i), data.mouth_mask(i)),
                                      px)
        if valid.sum() < min_points:
            failed += 1
        else:
            ok = torch.from_numpy(valid)
            new = lift(tracked[i], K, points[ok], torch.from_numpy(targets)[ok], prior, start=d)
            if bool((new.abs() > prior.max_sigmas).any()):
                rejected += 1
            else:
                out[i] = new
                registered[i] = True
                moved[i] = float(np.linalg.norm(targets[valid] - px[valid], axis=1).mean())
        if progress is not None:
            progress()
    return PassResult(out, registered, moved, failed, rejected)


def corrected_viewmats(tracked: torch.Tensor, corrections: torch.Tensor, prior: PosePrior) -> torch.Tensor:
    """Cameras [F, 4, 4] from tracked ones [F, 4, 4] and corrections [F, 6] in prior units."""
    sig = prior.sigma().to(corrections.device)
    d = corrections * sig
    return apply_corrections(tracked, d[:, :3].to(tracked.device), d[:, 3:].to(tracked.device))


def schedule(iterations: int, passes: int, start: float = 0.4) -> list[int]:
    """The coarse steps after which a registration pass runs: ``passes`` of them spread
    evenly from ``start`` x ``iterations`` to the last step (e.g. 2500, 3 -> [1000, 1750,
    2500]); [] for ``passes`` 0."""
    if passes <= 0:
        return []
    if passes == 1:
        return [iterations]
    return sorted({max(1, int(round(iterations * (start + (1.0 - start) * k / (passes - 1))))) for k in range(passes)})


def torso_shifts(torso: torch.nn.Module, data: FrameSet, *, backend: str = "auto", max_px: float | None = None,
                 min_pixels: int = 100, progress: Callable[[], None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each frame's torso lies from the torso field's render of it, as a shift only:
    :func:`torso_warps` without turns. Returns ([F, 2] float32 shift in pixels (x right, y
    down), [F] bool valid)."""
    warps, valid = torso_warps(torso, data, backend=backend, max_px=max_px, min_pixels=min_pixels,
                               turns=False, progress=progress)
    return warps[:, :2].contiguous(), valid


def torso_warps(torso: torch.nn.Module, data: FrameSet, *, backend: str = "auto", max_px: float | None = None,
                max_turn_deg: float = 3.0, max_log_scale: float = 0.03, min_pixels: int = 100, turns: bool = True,
                progress: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """How far each frame's torso lies from the torso field's render of it: the dense optical
    flow (DIS) from the render (over the plate, with the frame's current warp) to the frame's
    torso over the plate, over the textured pixels (the strongest third of the frame's
    gradients) that both call torso, 3 px or more inside its outline; summarised as a shift
    (the median flow) or, with ``turns``, as a similarity about the principal point (a
    rotation, a scale and a shift, fitted to the flow with RANSAC, 1 px inlier threshold:
    ``p' - c = k R(a) (p - c) + s`` for pixel p, principal point c).

    Args:
        torso: a :class:`~gstalk.deform.torso.TorsoField` (with ``offsets``), on ``data``'s device.
        data: the frames (``backgrounds`` = torso over plate, ``torso_masks``, ``plate``,
            ``viewmats``, ``K``, ``frame_ids``).
        max_px: a measured shift is clamped to this length (pixels at the working size);
            None: 8 px at 256 px, scaled with the image (:func:`gstalk.config.pixel_scale`).
        max_turn_deg, max_log_scale: the turn and log scale are clamped to these.
        min_pixels: frames with fewer torso pixels are left out (zeros, not valid).
        turns: fit the rotation and scale too (else they are 0).

    Returns:
        ([F, 4] float32: shift s in pixels (x right, y down), angle a in rad (clockwise in the
        image), log scale log k; [F] bool valid).
    """
    import cv2

    from gstalk.deform.torso import render_torso
    from gstalk.gaussians.splat import composite

    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    warps = torch.zeros(len(data), 4)
    valid = torch.zeros(len(data), dtype=torch.bool)
    plate = data.plate_image()
    cx, cy = float(data.K[0, 2]), float(data.K[1, 2])
    if max_px is None:
        from gstalk.config import pixel_scale

        max_px = 8.0 * pixel_scale(data.width)
    for i in range(len(data)):
        frame = int(data.frame_ids[i])
        with torch.no_grad():
            colors, alphas = render_torso(torso, data.viewmats[i:i + 1], data.K, data.width, data.height,
                                          backend=backend, frame=frame)
            render = composite(colors, alphas, plate).clamp(0, 1)[0].cpu().numpy()
            alpha = alphas[0, ..., 0].cpu().numpy()
        target = data.background(i)[0].cpu().numpy()
        assert data.torso_masks is not None
        # inside both torsos, away from their outlines (where the render's edge is soft)
        inside = (data.torso_masks[i].cpu().numpy() > 127) & (alpha > 0.5)
        mask = cv2.erode(inside.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        if mask.sum() < min_pixels:
            if progress is not None:
                progress()
            continue
        g0 = np.ascontiguousarray(np.clip(render @ luma * 255.0, 0, 255).astype(np.uint8))
        g1 = np.ascontiguousarray(np.clip(target @ luma * 255.0, 0, 255).astype(np.uint8))
        # flow is only measured where the frame has texture (collar, folds, edges): the
        # strongest third of the luma gradients inside the mask
        grad = np.hypot(cv2.Sobel(g1, cv2.CV_32F, 1, 0), cv2.Sobel(g1, cv2.CV_32F, 0, 1))
        mask &= grad >= np.quantile(grad[mask], 2.0 / 3.0)
        mask &= grad > 8.0  # and not in flat regions (noise)
        if mask.sum() < min_pixels // 3:
            if progress is not None:
                progress()
            continue
        flow = dis.calc(g0, g1, None)
        shift = np.median(flow[mask], axis=0).astype(np.float32)
        angle = log_k = 0.0
        if turns:
            ys, xs = np.nonzero(mask)
            src = np.stack([xs - cx, ys - cy], axis=1).astype(np.float32)
            dst = src + flow[ys, xs]
            m, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=1.0,
                                               maxIters=500, refineIters=10)
            if m is not None and np.isfinite(m).all():
                angle = float(np.clip(math.atan2(m[1, 0], m[0, 0]), -math.radians(max_turn_deg),
                                      math.radians(max_turn_deg)))
                log_k = float(np.clip(math.log(max(math.hypot(m[0, 0], m[1, 0]), 1e-6)), -max_log_scale,
                                      max_log_scale))
                # the shift that goes with the clamped turn: the flow's median residual
                k, c, sn = math.exp(log_k), math.cos(angle), math.sin(angle)
                moved = np.stack([k * (c * src[:, 0] - sn * src[:, 1]), k * (sn * src[:, 0] + c * src[:, 1])], 1)
                shift = np.median(dst - moved, axis=0).astype(np.float32)
        s = torch.from_numpy(shift)
        n = float(s.norm())
        warps[i, :2] = s * (max_px / n) if n > max_px else s
        warps[i, 2], warps[i, 3] = angle, log_k
        valid[i] = True
        if progress is not None:
            progress()
    return warps, valid


def shift_torso(torso: torch.nn.Module, frames: torch.Tensor, shifts_px: torch.Tensor, K: torch.Tensor) -> None:
    """Add pixel shifts [F, 2] to the registered offsets of clip frames ``frames`` [F] of a
    :class:`~gstalk.deform.torso.TorsoField`, converted to metres at the torso's median
    depth with the intrinsics K [3, 3] (px)."""
    warp_torso(torso, frames, torch.cat([shifts_px, shifts_px.new_zeros(len(shifts_px), 2)], dim=1), K)


def warp_torso(torso: torch.nn.Module, frames: torch.Tensor, warps: torch.Tensor, K: torch.Tensor) -> None:
    """Compose measured warps [F, 4] (:func:`torso_warps`: shift px, angle rad, log scale)
    onto the registered warps of clip frames ``frames`` [F] of a
    :class:`~gstalk.deform.torso.TorsoField`: the new warp acts after the frame's current one
    (offset ← k R offset + shift, angle and log scale add), shifts converted to metres at
    the torso's median depth with the intrinsics K [3, 3] (px). A field without turns takes
    the shift only."""
    with torch.no_grad():
        z = float(torso.means[:, 2].median())
        f = torch.stack([K[0, 0], K[1, 1]]).to(torso.offsets)
        idx = frames.to(torso.offsets.device)
        w = warps.to(torso.offsets)
        shift = w[:, :2] * z / f
        if getattr(torso, "has_turns", False):
            a, lk = w[:, 2], w[:, 3]
            k, c, s = torch.exp(lk), torch.cos(a), torch.sin(a)
            o = torso.offsets[idx]
            turned = torch.stack([k * (c * o[:, 0] - s * o[:, 1]), k * (s * o[:, 0] + c * o[:, 1])], dim=1)
            torso.offsets[idx] = turned + shift
            torso.turns[idx] += w[:, 2:]
        else:
            torso.offsets[idx] += shift
