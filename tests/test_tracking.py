"""Tracking: canonical model, pose and focal recovery, smoothing, A/V offset, masks, gaps."""

from __future__ import annotations

import numpy as np
import pytest

from gstalk.errors import TrackingError
from gstalk.stages.track import fill_gaps, mouth_boxes, normalise_blink
from gstalk.testing.mannequin import head_pose
from gstalk.tracking.avsync import correlate_lags, estimate_offset, mouth_opening
from gstalk.tracking.canonical import FACE_OVAL, LIPS_OUTER, canonical_face
from gstalk.tracking.masks import MaskWriter, background_plate, frame_masks, mouth_mask
from gstalk.tracking.pose import intrinsics, jitter, project, search_focal, smooth_poses, solve_pose


def test_canonical_face_model():
    f = canonical_face()
    assert f.vertices.shape == (468, 3) and f.triangles.shape == (898, 3)
    assert f.triangles.max() == 467 and f.triangles.min() == 0
    width = np.ptp(f.vertices[:, 0])
    assert 0.12 < width < 0.20  # metres: a human face
    assert f.vertices[1, 2] > f.vertices[234, 2]  # nose tip in front of the cheek edge (z towards viewer)
    assert len(f.basis_ids) >= 20 and (f.basis_weights > 0).all()


def _landmarks(pose, K, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    uv = project(canonical_face().vertices, pose, K)
    lm = np.zeros((478, 3))
    lm[:468, :2] = uv + rng.normal(0, noise, uv.shape)
    return lm


def test_pose_recovered_from_projected_mesh():
    K = intrinsics(900.0, 512, 512)
    truth = head_pose(yaw=0.2, pitch=-0.1, roll=0.05, t=(0.01, -0.02, 0.6))
    pose, err = solve_pose(_landmarks(truth, K), K)
    assert err < 1e-3
    np.testing.assert_allclose(pose, truth, atol=1e-5)
    pose_n, err_n = solve_pose(_landmarks(truth, K, noise=1.0), K)
    assert 1.0 < err_n < 1.8  # RMS of 2-D noise with sigma 1 px per axis is about sqrt(2)
    cos = (np.trace(pose_n[:3, :3].T @ truth[:3, :3]) - 1) / 2
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))) < 2.0
    assert np.linalg.norm(pose_n[:3, 3] - truth[:3, 3]) < 0.02  # 2 cm at 60 cm


def test_focal_search_finds_the_true_focal_with_head_motion():
    size, f_true = 512, 700.0
    K = intrinsics(f_true, size, size)
    lms = np.stack([_landmarks(head_pose(yaw=0.4 * np.sin(i / 5), pitch=0.2 * np.cos(i / 7), t=(0.0, 0.0, 0.45)), K,
                               noise=0.3, seed=i) for i in range(30)])
    res = search_focal(lms, size, size, 0.8, 4.0, n_frames=30)
    assert abs(res.focal_px - f_true) / f_true < 0.15
    assert res.error_px < 0.6


def test_smoothing_reduces_jitter_without_lag():
    rng = np.random.default_rng(0)
    n = 120
    truth = np.stack([head_pose(yaw=0.3 * np.sin(i / 15), t=(0.0, 0.0, 0.5)) for i in range(n)])
    noisy = truth.copy()
    for p in noisy:
        wobble = head_pose(yaw=rng.normal(0, 0.01), pitch=rng.normal(0, 0.01))[:3, :3] @ np.diag([1, -1, -1])
        p[:3, :3] = p[:3, :3] @ wobble
        p[:3, 3] += rng.normal(0, 0.002, 3)
    smooth = smooth_poses(noisy, 2.0)
    assert jitter(smooth)[0] < jitter(noisy)[0] and jitter(smooth)[1] < 0.5 * jitter(noisy)[1]

    def rot_err(ps):  # mean angle to the truth, degrees
        cos = (np.einsum("nij,nij->n", ps[:, :3, :3], truth[:, :3, :3]) - 1) / 2
        return np.degrees(np.arccos(np.clip(cos, -1, 1))).mean()

    assert rot_err(smooth) < 0.6 * rot_err(noisy)
    # zero phase: the smoothed yaw peaks where the true yaw does
    yaw = lambda ps: np.arctan2(ps[:, 0, 2], ps[:, 0, 0])  # noqa: E731
    assert abs(int(np.argmax(yaw(smooth)[:60])) - int(np.argmax(yaw(truth)[:60]))) <= 1


def test_av_offset_found_on_synthetic_signals():
    rng = np.random.default_rng(1)
    n, k = 300, 4
    env = np.convolve(rng.random(n + 20) > 0.7, np.ones(4) / 4, "same")[:n + k]
    mouth = env[:n] + rng.normal(0, 0.05, n)
    audio = env[k:n + k] * 0 + np.roll(env[:n], k)  # audio late by k frames
    curve = correlate_lags(mouth, audio, 8)
    assert max(curve, key=curve.get) == k


def test_estimate_offset_on_mannequin_clip(mannequin_clip):
    """The mannequin's audio is 2 frames late; landmarks from the known projection."""
    c = mannequin_clip
    from gstalk.testing.mannequin import deformed_vertices

    K = intrinsics(c.focal, c.size, c.size)
    lms = []
    for pose, o in zip(c.poses, c.opening):
        v = deformed_vertices(float(o))
        lm = np.zeros((478, 3))
        lm[:468, :2] = project(v, pose, K)
        lms.append(lm)
    res = estimate_offset(np.stack(lms), c.audio, c.sample_rate, 25.0, max_lag=6)
    assert res.frames == c.offset_frames and res.correlation > 0.5


def test_fill_gaps_interpolates_short_and_rejects_long():
    v = np.arange(10, dtype=float)[:, None]
    valid = np.ones(10, bool)
    valid[[3, 4]] = False
    out, gaps = fill_gaps(v * 0 + np.where(valid[:, None], v, -99), valid, max_gap=5)
    np.testing.assert_allclose(out[:, 0], np.arange(10))
    assert gaps == [[3, 4]]
    valid[1:8] = False
    with pytest.raises(TrackingError, match="lost for more than 5 frames at frames 1-7"):
        fill_gaps(v, valid, 5)
    with pytest.raises(TrackingError, match="No face"):
        fill_gaps(v, np.zeros(10, bool), 5)


def test_masks_cover_landmark_hulls(mannequin_clip):
    import cv2

    from gstalk.testing.mannequin import render

    pose = mannequin_clip.poses[10]
    img, uv = render(0.7, pose, mannequin_clip.focal, mannequin_clip.size)
    lm = np.zeros((478, 3))
    lm[:468, :2] = uv
    m, model = frame_masks(img, lm, work_size=128)
    m2, _ = frame_masks(img, lm, work_size=128, model=model)  # fixed colour models: same split here
    assert (m2 == m).mean() > 0.99
    assert m.shape == (256, 256, 4) and set(np.unique(m)) <= {0, 255}
    hull = np.zeros((256, 256), np.uint8)
    cv2.fillConvexPoly(hull, cv2.convexHull(np.round(uv[list(FACE_OVAL)]).astype(np.int32)), 255)
    inner = cv2.erode(hull, np.ones((5, 5), np.uint8)) > 0
    assert (m[..., 0][inner] > 0).mean() > 0.99  # head covers the face
    lips = np.zeros_like(hull)
    cv2.fillPoly(lips, [np.round(uv[list(LIPS_OUTER)]).astype(np.int32)], 255)
    assert (m[..., 1][lips > 0] > 0).mean() > 0.99  # mouth covers the lips
    assert not (m[..., 2] & m[..., 0]).any()  # torso and head are disjoint
    assert m[..., 3][:8, :8].max() == 0  # a corner is background
    assert mouth_mask(lm, (256, 256)).sum() > lips.sum()


def test_head_polygon_reaches_the_hair_on_top():
    """The head polygon is the face oval widened 1.18x about its centre and raised by up to 0.8
    face heights above it (checked against the oval's own extent); nothing under the centre
    moves up, so the neck and collar beside the jaw stay out."""
    from gstalk.tracking.canonical import canonical_face
    from gstalk.tracking.masks import face_geometry, head_polygon
    from gstalk.tracking.schemes import face_outline

    v = canonical_face().vertices
    lm = np.zeros((478, 3))
    lm[:468, :2] = np.stack([128 + 900 * v[:, 0], 128 - 900 * v[:, 1]], 1)  # image y down
    oval = face_outline(lm)
    c, width, h = face_geometry(lm)
    poly = head_polygon(lm)
    assert np.ptp(poly[:, 0]) == pytest.approx(1.18 * width, rel=1e-6)
    top = oval[:, 1].argmin()  # the forehead's top point, more than half a face height above the centre
    assert c[1] - oval[top, 1] >= 0.5 * h
    assert poly[top, 1] == pytest.approx(oval[top, 1] - 0.8 * h, abs=1e-6)
    below = oval[:, 1] > c[1]
    assert below.sum() > 5 and np.allclose(poly[below, 1], oval[below, 1])
    assert np.allclose(head_polygon(lm, 1.0, 0.3)[top], [oval[top, 0], oval[top, 1] - 0.3 * h])


def test_background_plate_median_and_inpaint():
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    frames, person = [], []
    for i in range(9):
        f = bg.copy()
        m = np.zeros((32, 32), np.uint8)
        m[8:24, 4 + i:14 + i] = 255
        f[m > 0] = 0
        frames.append(f)
        person.append(m)
    plate, unseen = background_plate(np.stack(frames), np.stack(person), margin=1)
    assert 0 < unseen < 0.2
    assert np.abs(plate.astype(int) - bg.astype(int))[:6].max() == 0  # rows never covered


def test_background_plate_equals_nanmedian():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (7, 12, 10, 3), dtype=np.uint8)
    person = np.where(rng.random((7, 12, 10)) < 0.5, 255, 0).astype(np.uint8)
    plate, unseen = background_plate(frames, person, margin=0, statistic="median")
    data = frames.astype(np.float64)
    data[person > 0] = np.nan
    seen = ~(person > 0).all(0)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = np.nanmedian(data, axis=0)
    assert unseen == pytest.approx(1 - seen.mean())
    # numpy rounds half to even like the plate does
    assert np.array_equal(plate[seen], np.round(ref[seen]).astype(np.uint8))


def test_background_plate_equals_nanmean_by_default():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (9, 12, 10, 3), dtype=np.uint8)
    person = np.where(rng.random((9, 12, 10)) < 0.5, 255, 0).astype(np.uint8)
    plate, unseen = background_plate(frames, person, margin=0)
    data = frames.astype(np.float64)
    data[person > 0] = np.nan
    seen = ~(person > 0).all(0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanmean(data, axis=0)
    assert unseen == pytest.approx(1 - seen.mean())
    assert np.array_equal(plate[seen], np.round(ref[seen]).astype(np.uint8))
    with pytest.raises(ValueError, match="plate statistic 'mode'"):
        background_plate(frames, person, statistic="mode")


def test_mean_plate_of_a_moving_curtain_has_the_least_squared_error_on_new_frames():
    """A background region that is dark in 3 of 5 frames and light in 2 (a curtain that
    moves): the median plate shows it dark, the mean plate its average, 110, which scores
    better on frames drawn the same way (what held-out PSNR measures)."""
    frames = np.full((5, 8, 8, 3), 90, np.uint8)
    frames[:3, :4] = 50
    frames[3:, :4] = 200
    person = np.zeros((5, 8, 8), np.uint8)
    mean, _ = background_plate(frames, person, margin=0)
    median, _ = background_plate(frames, person, margin=0, statistic="median")
    assert (mean[:4] == 110).all() and (median[:4] == 50).all()
    assert (mean[4:] == 90).all() and (median[4:] == 90).all()
    held_out = np.concatenate([frames, frames]).astype(float)  # the same mix of states
    mse = {k: float(((held_out - v.astype(float)) ** 2).mean()) for k, v in (("mean", mean), ("median", median))}
    assert mse["mean"] < mse["median"]


def test_mouth_mask_roi_equals_full_frame_dilation():
    import cv2

    from gstalk.tracking.canonical import LIPS_INNER
    from gstalk.tracking.masks import _poly, face_geometry

    rng = np.random.default_rng(2)
    lm = np.zeros((478, 3))
    lm[:, :2] = rng.uniform(60, 200, (478, 2))
    lm[list(LIPS_OUTER), :2] = rng.uniform(4, 60, (len(LIPS_OUTER), 2))  # near the border: clipped ROI
    shape = (256, 240)
    r = max(1, int(round(0.06 * face_geometry(lm)[2])))
    full = _poly(shape, lm[list(LIPS_OUTER), :2]) | _poly(shape, lm[list(LIPS_INNER), :2])
    full = cv2.dilate(full, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    assert np.array_equal(mouth_mask(lm, shape), full)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_mask_writer_writes_every_frame_and_reports_errors(mannequin_clip, tmp_path):
    from gstalk.testing.mannequin import render

    lm = np.zeros((478, 3))
    with MaskWriter(tmp_path, 64, 1, plate_ids=range(0, 5, 2), max_pending=2, refit_every=2) as w:
        for i in range(5):
            img, uv = render(0.3 * i, mannequin_clip.poses[i], mannequin_clip.focal, mannequin_clip.size)
            lm[:468, :2] = uv
            w.submit(i, img, lm)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:06d}.png" for i in range(5)]
    frames, person = w.plate_inputs()
    assert frames.shape == (3, 256, 256, 3) and person.shape == (3, 256, 256)
    # only the frames named for the plate are kept (track: plate_frame_ids of the training split)
    with MaskWriter(tmp_path, 64, 1, plate_ids=[1, 2]) as w:
        for i in range(4):
            img, uv = render(0.3 * i, mannequin_clip.poses[i], mannequin_clip.focal, mannequin_clip.size)
            lm[:468, :2] = uv
            w.submit(i, img, lm)
    assert sorted(w.plate) == [1, 2]
    with pytest.raises(ValueError):
        with MaskWriter(tmp_path, 64, 1, plate_ids=[0]) as w:
            w.submit(0, np.zeros((8, 8, 3), np.uint8), np.full((478, 3), np.nan))


def test_blink_and_mouth_box_helpers():
    names = ("eyeBlinkLeft", "eyeBlinkRight", "jawOpen")
    bs = np.zeros((100, 3), np.float32)
    bs[:, 0] = bs[:, 1] = np.linspace(0.05, 0.6, 100)
    b = normalise_blink(bs, names)
    assert b.min() == 0.0 and b.max() == 1.0 and np.all(np.diff(b) >= 0)
    lm = np.zeros((1, 478, 3), np.float32)
    lm[0, list(LIPS_OUTER), 0] = np.linspace(100, 140, len(LIPS_OUTER))
    lm[0, list(LIPS_OUTER), 1] = 200
    box = mouth_boxes(lm, 256)[0]
    assert box[2] - box[0] == pytest.approx(64.0) and box[3] - box[1] == pytest.approx(64.0)
    assert mouth_opening(lm).shape == (1,)


def test_view_angles_of_known_head_turns():
    from gstalk.tracking.pose import view_angles

    poses = np.stack([head_pose(0.0, 0.0, 0.0), head_pose(np.radians(30), 0.0, 0.0),
                      head_pose(0.0, np.radians(-20), 0.0), head_pose(0.0, 0.0, np.radians(40))])
    a = view_angles(poses)
    np.testing.assert_allclose(np.abs(a), [[0, 0], [30, 0], [0, 20], [0, 0]], atol=1e-6)
    # a head to the side of the optical axis, facing straight ahead, sees the camera obliquely
    side = view_angles(head_pose(0.0, 0.0, 0.0, t=(0.5, 0.0, 0.5))[None])[0]
    assert abs(side[0]) == pytest.approx(45.0)


def test_frame_ranges():
    from gstalk.tracking.pose import frame_ranges

    assert frame_ranges(np.array([0, 1, 1, 0, 1, 0, 0, 1, 1], bool)) == [[1, 2], [4, 4], [7, 8]]
    assert frame_ranges(np.zeros(4, bool)) == []


def _face_at(cx: float, size: float):
    from gstalk.tracking.detector import FaceDetection

    lm = np.zeros((478, 3), np.float32)
    lm[:, 0] = cx + np.linspace(-size / 2, size / 2, 478)
    lm[:, 1] = np.linspace(-size / 2, size / 2, 478) + 100
    return FaceDetection(lm, np.zeros(52, np.float32), np.zeros((4, 4), np.float32), ())


def test_pick_face_prefers_largest_but_keeps_a_consistent_track():
    from gstalk.stages.track import pick_face

    big, small, tiny = _face_at(300, 120), _face_at(100, 100), _face_at(100, 40)
    assert pick_face([small, big], None) is big
    # the tracked face (near x=100) stays chosen while it is at least 0.7x the largest
    assert pick_face([big, small], np.array([100.0, 100.0])) is small
    # but not when it is much smaller
    assert pick_face([big, tiny], np.array([100.0, 100.0])) is big


def test_mediapipe_finds_both_faces_in_a_two_face_frame():
    from gstalk.testing.mannequin import render
    from gstalk.tracking.detector import MediaPipeDetector

    left, _ = render(0.2, head_pose(t=(0, 0, 0.45)), 512.0, 256)
    right, _ = render(0.2, head_pose(t=(0, 0, 0.7)), 512.0, 256)
    frame = np.ascontiguousarray(np.concatenate([left, right], axis=1))
    with MediaPipeDetector(video=False, num_faces=2) as det:
        faces = det.detect(frame)
    assert len(faces) == 2
    sizes = sorted(f.size for f in faces)
    assert sizes[1] > 1.3 * sizes[0]  # the nearer head is larger


def test_landmark_smoothing_reduces_jitter_without_lag():
    from gstalk.tracking.pose import landmark_jitter, smooth_landmarks

    rng = np.random.default_rng(0)
    n = 200
    t = np.arange(n, dtype=np.float64)
    clean = np.zeros((n, 5, 3))
    clean[:, :, 0] = (100 + 20 * np.sin(2 * np.pi * t / 50))[:, None]  # slow motion, 2 s period
    noisy = clean + rng.normal(0, 0.5, clean.shape)
    smooth = smooth_landmarks(noisy, 1.0)
    assert smooth.dtype == np.float32 and smooth.shape == noisy.shape
    assert landmark_jitter(smooth - clean) < 0.6 * landmark_jitter(noisy - clean)  # the noise part
    # zero phase: the smoothed track is closer to the clean one, with no shift in time
    err = np.abs(smooth[10:-10, :, 0] - clean[10:-10, :, 0]).mean()
    assert err < np.abs(noisy[10:-10, :, 0] - clean[10:-10, :, 0]).mean()
    lag = np.argmax(np.correlate(smooth[:, 0, 0] - 100, clean[:, 0, 0] - 100, "full")) - (n - 1)
    assert lag == 0
    assert landmark_jitter(clean[:1]) == 0.0



def test_track_plate_is_the_mean_of_the_training_frames_only(trained_ws, benchmark_script):
    """The workspace's plate is remade, pixel for pixel, from the training frames and their
    person masks (every max(1, n_train // 100)-th): the held-out frames, which eval scores
    renders against, are not averaged into it. benchmarks/plate_error.py scores the same
    remade plates against those frames by hand."""
    import cv2

    from gstalk.dataset import load_background, load_frames, load_masks, split_indices
    from gstalk.workspace import Workspace

    ws = Workspace.open(trained_ws)
    train, test = split_indices(ws)
    assert len(test) > 0
    picked = list(train)[:: max(1, len(train) // 100)]  # by hand: plate_frame_ids(train)
    plate, _ = background_plate(load_frames(ws, picked), load_masks(ws, picked)[..., 3])
    assert np.array_equal(load_background(ws), plate)
    everything = list(range(test.stop))[:: max(1, test.stop // 100)]  # what track took before
    with_test, _ = background_plate(load_frames(ws, everything), load_masks(ws, everything)[..., 3])
    assert not np.array_equal(with_test, plate)  # the check above can tell the two apart

    r = benchmark_script("plate_error").plate_error(str(trained_ws))
    assert r["workspace"] == r["mean_training"]
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    behind = np.stack([cv2.dilate(m, k) == 0 for m in load_masks(ws, list(test))[..., 3]])
    err = ((load_frames(ws, list(test)).astype(float) - plate.astype(float)) ** 2).mean(-1)
    assert r["background_area"] == pytest.approx(behind.mean())
    assert r["mean_training"]["mse_share_of_frame"] == pytest.approx(err[behind].sum() / behind.size)
    assert r["mean_training"]["psnr_background"] == pytest.approx(10 * np.log10(255**2 / err[behind].mean()))
