"""Head pose and focal length from 2D landmarks and the canonical face model.

Each frame's head pose is the rigid transform ``[R | t]`` that maps canonical head space
(metres, see :mod:`gstalk.tracking.canonical`) into the OpenCV camera (x right, y down,
z forward), found with ``cv2.solvePnP`` on the stable landmarks (MediaPipe's Procrustes
basis; for FAN's 68 points, nose, eye corners and brow ends on the canonical mesh vertices
of :data:`~gstalk.tracking.schemes.IBUG68_MESH_IDS`). One focal
length for the whole video is chosen by a search that minimises the mean reprojection
error. Camera per frame = inverse head pose in canonical space, i.e. the world-to-camera
``viewmat`` *is* the head pose (the head is fixed, the camera moves), as the peers do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gstalk.tracking.canonical import canonical_face
from gstalk.tracking.schemes import MEDIAPIPE, scheme_of


def intrinsics(focal_px: float, width: int, height: int) -> np.ndarray:
    """[3, 3] float64 pinhole K with square pixels and the principal point at the image centre."""
    return np.array([[focal_px, 0.0, width / 2.0], [0.0, focal_px, height / 2.0], [0.0, 0.0, 1.0]])


def stable_ids(landmarks: np.ndarray) -> np.ndarray:
    """[K] int64 ids of the stable landmarks of [..., L, >=2] landmarks (478/468: MediaPipe's
    Procrustes basis; 68: :attr:`~gstalk.tracking.schemes.LandmarkScheme.pose_ids`)."""
    s = scheme_of(landmarks)
    return canonical_face().basis_ids if s is MEDIAPIPE else np.asarray(s.pose_ids, np.int64)


def _object_points(landmarks: np.ndarray, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    s = scheme_of(landmarks)
    ids = stable_ids(landmarks) if ids is None else np.asarray(ids)
    mesh = ids if s is MEDIAPIPE else np.asarray(s.mesh_ids)[ids]
    return canonical_face().vertices[mesh].astype(np.float64), ids


def solve_pose(landmarks_px: np.ndarray, K: np.ndarray, init: np.ndarray | None = None,
               ids: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Fit the head pose of one frame.

    Args:
        landmarks_px: [478, 468 or 68, >=2] landmark pixel coordinates (x right, y down).
        K: [3, 3] intrinsics in pixels.
        init: [4, 4] head-to-camera pose to start from (e.g. the previous frame), or None.
        ids: landmark ids to fit (default: :func:`stable_ids`).

    Returns:
        ([4, 4] float64 head-to-camera transform (metres), RMS reprojection error in px).
    """
    import cv2

    obj, ids = _object_points(landmarks_px, ids)
    img = landmarks_px[ids, :2].astype(np.float64)
    if init is not None:
        rvec0, _ = cv2.Rodrigues(init[:3, :3])
        ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, rvec=rvec0.copy(), tvec=init[:3, 3:4].copy(),
                                      useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    else:
        ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_SQPNP)
        if ok:
            ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, rvec=rvec, tvec=tvec, useExtrinsicGuess=True,
                                          flags=cv2.SOLVEPNP_ITERATIVE)
    pose = np.eye(4)
    pose[:3, :3] = cv2.Rodrigues(rvec)[0]
    pose[:3, 3] = tvec.ravel()
    proj = project(obj, pose, K)
    err = float(np.sqrt(((proj - img) ** 2).sum(1).mean()))
    return pose, err


def project(points: np.ndarray, pose: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Project [P, 3] canonical points with a [4, 4] head-to-camera pose and K -> [P, 2] pixels."""
    pc = points @ pose[:3, :3].T + pose[:3, 3]
    uv = pc[:, :2] / pc[:, 2:3]
    return uv * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])


def solve_poses(landmarks_px: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit every frame, each starting from the previous one: ([N, 4, 4], [N] RMS px)."""
    poses = np.zeros((len(landmarks_px), 4, 4))
    errs = np.zeros(len(landmarks_px))
    prev = None
    for i, lm in enumerate(landmarks_px):
        poses[i], errs[i] = solve_pose(lm, K, prev)
        prev = poses[i]
    return poses, errs


@dataclass(frozen=True)
class FocalSearch:
    """Result of :func:`search_focal`: the chosen focal (px), its error (px) and the curve."""

    focal_px: float
    error_px: float
    candidates: list[float]
    errors: list[float]


def search_focal(landmarks_px: np.ndarray, width: int, height: int, lo: float, hi: float,
                 n_frames: int = 40, steps: int = 13) -> FocalSearch:
    """Choose one focal length for the video by minimising the mean reprojection error.

    A coarse geometric grid over [lo, hi] x max(width, height) px, then a finer grid around
    the best value; each candidate fits the poses of ``n_frames`` evenly spaced frames.

    Args:
        landmarks_px: [N, L, >=2] landmarks in pixels (478 or 68 points).
        width, height: image size in pixels.
        lo, hi: search range as multiples of the image size (peers: 600-1400 px at 512 px,
            i.e. about 1.2-2.7).

    Returns:
        :class:`FocalSearch`.
    """
    size = max(width, height)
    idx = np.linspace(0, len(landmarks_px) - 1, min(n_frames, len(landmarks_px))).round().astype(int)
    sub = landmarks_px[idx]

    def cost(f: float) -> float:
        _, errs = solve_poses(sub, intrinsics(f, width, height))
        return float(errs.mean())

    cands = list(np.geomspace(lo * size, hi * size, steps))
    errs = [cost(f) for f in cands]
    best = int(np.argmin(errs))
    a, b = cands[max(best - 1, 0)], cands[min(best + 1, len(cands) - 1)]
    fine = list(np.geomspace(a, b, 7))
    fine_errs = [cost(f) for f in fine]
    allc, alle = cands + fine, errs + fine_errs
    k = int(np.argmin(alle))
    order = np.argsort(allc)
    return FocalSearch(float(allc[k]), float(alle[k]), [float(allc[i]) for i in order], [float(alle[i]) for i in order])


def smooth_poses(poses: np.ndarray, sigma: float) -> np.ndarray:
    """Zero-phase (no lag) Gaussian smoothing of a pose track.

    Rotations are smoothed as rotation vectors relative to the track's mean rotation (small
    angles for a talking head, so this is close to geodesic smoothing); translations
    directly. ``sigma`` is in frames; 0 returns a copy.

    Args:
        poses: [N, 4, 4] head-to-camera transforms.

    Returns:
        [N, 4, 4] smoothed transforms.
    """
    from scipy.ndimage import gaussian_filter1d
    from scipy.spatial.transform import Rotation

    if sigma <= 0 or len(poses) < 3:
        return poses.copy()
    rots = Rotation.from_matrix(poses[:, :3, :3])
    mean = rots.mean()
    rel = (mean.inv() * rots).as_rotvec()
    rel_s = gaussian_filter1d(rel, sigma, axis=0, mode="nearest")
    t_s = gaussian_filter1d(poses[:, :3, 3], sigma, axis=0, mode="nearest")
    out = np.tile(np.eye(4), (len(poses), 1, 1))
    out[:, :3, :3] = (mean * Rotation.from_rotvec(rel_s)).as_matrix()
    out[:, :3, 3] = t_s
    return out


def jitter(poses: np.ndarray) -> tuple[float, float]:
    """Mean frame-to-frame change of a pose track: (rotation in degrees, translation in mm)."""
    from scipy.spatial.transform import Rotation

    if len(poses) < 2:
        return 0.0, 0.0
    r = Rotation.from_matrix(poses[:, :3, :3])
    dr = (r[:-1].inv() * r[1:]).magnitude()
    dt = np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1)
    return float(np.degrees(dr).mean()), float(dt.mean() * 1000.0)


def view_angles(poses: np.ndarray) -> np.ndarray:
    """How far each head is turned from the camera: the direction from the head to the
    camera, in canonical head space (x to the subject's left, y up, z out of the face), as
    two angles in degrees.

    Args:
        poses: [N, 4, 4] head-to-camera transforms (OpenCV camera, metres).

    Returns:
        [N, 2] float64 (yaw, pitch): yaw = atan2(x, z), positive when the camera lies
        towards the subject's left; pitch = atan2(y, z), positive when the camera lies above
        the face. (0, 0) is a face looking straight into the lens; MediaPipe's landmarks
        degrade beyond about 45-60 degrees.
    """
    R, t = poses[:, :3, :3], poses[:, :3, 3]
    to_cam = -np.einsum("nji,nj->ni", R, t)  # R^T (0 - t): the camera centre in head space
    to_cam /= np.linalg.norm(to_cam, axis=1, keepdims=True).clip(1e-12)
    yaw = np.degrees(np.arctan2(to_cam[:, 0], to_cam[:, 2]))
    pitch = np.degrees(np.arctan2(to_cam[:, 1], to_cam[:, 2]))
    return np.stack([yaw, pitch], 1)


def frame_ranges(mask: np.ndarray) -> list[list[int]]:
    """Runs of True in a [N] bool array as inclusive [first, last] frame pairs."""
    out: list[list[int]] = []
    idx = np.flatnonzero(np.asarray(mask, bool))
    for i in idx:
        if out and out[-1][1] == i - 1:
            out[-1][1] = int(i)
        else:
            out.append([int(i), int(i)])
    return out


def smooth_landmarks(landmarks: np.ndarray, sigma: float) -> np.ndarray:
    """Zero-phase (no lag) Gaussian smoothing of landmark tracks along time.

    Args:
        landmarks: [N, L, D] float pixels.
        sigma: frames; 0 returns a copy.

    Returns:
        [N, L, D] float32, edges padded with the nearest frame.
    """
    from scipy.ndimage import gaussian_filter1d

    if sigma <= 0 or len(landmarks) < 3:
        return landmarks.astype(np.float32, copy=True)
    return gaussian_filter1d(landmarks.astype(np.float64), sigma, axis=0, mode="nearest").astype(np.float32)


def landmark_jitter(landmarks: np.ndarray, ids: np.ndarray | list[int] | None = None) -> float:
    """Mean frame-to-frame displacement of landmarks ``ids`` (default all), in pixels (x, y)."""
    lm = landmarks[:, :, :2] if ids is None else landmarks[:, np.asarray(ids), :2]
    if len(lm) < 2:
        return 0.0
    return float(np.linalg.norm(np.diff(lm, axis=0), axis=-1).mean())
