"""Stage 2, ``gstalk track``: landmarks, head pose, camera, blink, masks, background plate.

The landmark detector is chosen by name (``TrackConfig.detector``): ``mediapipe`` (478
points and 52 blendshapes) or ``fan`` (68 iBUG points from FAN in MediaPipe's face boxes,
no blendshapes; blink from the eye aspect ratio). Everything after the landmarks works on
either layout (:mod:`gstalk.tracking.schemes`).

Writes ``ws/track/``:

- ``tracks.safetensors``: ``landmarks`` [N, L, 3] px (L = 478, or 68 for FAN with z = 0),
  ``blendshapes`` [N, 52] ([N, 0] for FAN), ``landmark_scores`` [N, 68] (FAN only),
  ``pose_raw`` / ``viewmats`` [N, 4, 4] (head-to-camera before / after smoothing; the
  smoothed one is the world-to-camera matrix of canonical head space), ``K`` [3, 3] px,
  ``blink`` [N] in [0, 1], ``valid`` [N] (0 = interpolated), ``mouth_box`` / ``face_box``
  [N, 4] px (FAN: ``face_box`` is the MediaPipe box FAN was given), ``mouth_open`` [N];
  metadata ``detector`` and ``landmark_scheme``;
- ``masks/NNNNNN.png``: 4-channel PNG per frame, channels head, mouth, torso, person;
- ``background.png``: the background plate;
- ``preview.png``: landmarks, pose axes and masks over a few frames;
- ``summary.json``: detector, landmark_scheme, fps, focal_px, reprojection_error_px, jitter
  before/after smoothing, interpolated_frames, av_offset_frames, blendshape names; for FAN
  the weights file (path, SHA-256, whether it is the public archive) and the mean heatmap
  score.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from gstalk.config import TrackConfig, check_choices, to_dict
from gstalk.dataset import load_audio, load_frame, split_indices
from gstalk.errors import TrackingError, UsageError
from gstalk.progress import SILENT, Reporter
from gstalk.tensorio import save_tensors
from gstalk.tracking.avsync import AVOffset, estimate_offset, estimate_offset_predicted, mouth_opening
from gstalk.tracking.detector import DETECTORS, N_BLENDSHAPES, FaceDetection, get_detector
from gstalk.tracking.masks import MaskWriter, background_plate, face_geometry, plate_frame_ids
from gstalk.tracking.pose import (
    frame_ranges,
    intrinsics,
    jitter,
    landmark_jitter,
    search_focal,
    smooth_landmarks,
    smooth_poses,
    solve_poses,
    stable_ids,
    view_angles,
)
from gstalk.tracking.schemes import IBUG68, MEDIAPIPE, eye_aspect_ratio, scheme_of
from gstalk.workspace import (
    EXTRACT_FRAMES,
    PLATE,
    TRACK_MASKS,
    TRACK_PREVIEW,
    TRACK_SUMMARY,
    TRACKS,
    Workspace,
    atomic_dir,
    atomic_write,
    run_stage,
    write_json,
)


def fill_gaps(values: np.ndarray, valid: np.ndarray, max_gap: int) -> tuple[np.ndarray, list[list[int]]]:
    """Linearly interpolate frames where ``valid`` is False.

    Args:
        values: [N, ...] per-frame arrays (rows of invalid frames are ignored).
        valid: [N] bool.
        max_gap: longest run of invalid frames that may be filled.

    Returns:
        (filled [N, ...], list of [first, last] frame ranges that were filled).

    Raises:
        TrackingError: no valid frame, or a gap longer than ``max_gap`` (ranges named).
    """
    n = len(valid)
    if not valid.any():
        raise TrackingError("No face was found in any frame.",
                            hint="use a video with one face looking at the camera")
    gaps, i = [], 0
    while i < n:
        if not valid[i]:
            j = i
            while j + 1 < n and not valid[j + 1]:
                j += 1
            gaps.append([i, j])
            i = j + 1
        else:
            i += 1
    long = [g for g in gaps if g[1] - g[0] + 1 > max_gap]
    if long:
        ranges = ", ".join(f"{a}-{b}" for a, b in long[:5])
        raise TrackingError(f"The face is lost for more than {max_gap} frames at frames {ranges} "
                            f"({len(long)} gap(s)).", hint="trim those parts from the video and re-run extract")
    out = values.copy()
    idx = np.flatnonzero(valid)
    flat = out.reshape(n, -1)
    for a, b in gaps:
        for k in range(a, b + 1):
            lo = idx[idx < k]
            hi = idx[idx > k]
            if len(lo) and len(hi):
                w = (k - lo[-1]) / (hi[0] - lo[-1])
                flat[k] = (1 - w) * flat[lo[-1]] + w * flat[hi[0]]
            else:
                flat[k] = flat[lo[-1]] if len(lo) else flat[hi[0]]
    return out, gaps


def _rescale_percentiles(b: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """``b`` [N] rescaled so its 2nd percentile is 0 and its 98th is 1, clipped to [0, 1]."""
    lo, hi = np.percentile(b, 2), np.percentile(b, 98)
    return np.clip((b - lo) / max(hi - lo, floor), 0.0, 1.0).astype(np.float32)


def normalise_blink(blendshapes: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Eye blink per frame in [0, 1]: mean of eyeBlinkLeft/Right rescaled between their
    2nd and 98th percentiles over the video (the AU45 analogue)."""
    cols = [names.index(k) for k in ("eyeBlinkLeft", "eyeBlinkRight") if k in names]
    if not cols:
        return np.zeros(len(blendshapes), np.float32)
    return _rescale_percentiles(blendshapes[:, cols].mean(1))


def blink_from_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Eye blink per frame in [0, 1] without blendshapes: the eye aspect ratio
    (:func:`~gstalk.tracking.schemes.eye_aspect_ratio`, mean of both eyes) of [N, L, >=2]
    landmarks, negated and rescaled between its 2nd and 98th percentiles over the video, so
    1 = the most closed, 0 = open (as :func:`normalise_blink`)."""
    return _rescale_percentiles(-eye_aspect_ratio(landmarks), floor=1e-4)


def mouth_boxes(landmarks: np.ndarray, size: int, scale: float = 1.6) -> np.ndarray:
    """A square box per frame around the outer lips, ``scale`` x the mouth width, clamped to
    the image: [N, 4] float32 (x0, y0, x1, y1) px; landmarks [N, L, >=2] (478 or 68)."""
    lips = landmarks[:, list(scheme_of(landmarks).lips_outer), :2]
    c = (lips.min(1) + lips.max(1)) / 2
    side = scale * np.ptp(lips[:, :, 0], axis=1)
    side = np.maximum(side, 8.0)
    x0 = np.clip(c[:, 0] - side / 2, 0, size - side)
    y0 = np.clip(c[:, 1] - side / 2, 0, size - side)
    return np.stack([x0, y0, x0 + side, y0 + side], 1).astype(np.float32)


def pick_face(faces: list[FaceDetection], prev_centre: np.ndarray | None) -> FaceDetection:
    """The face to track among several in one frame: the largest, unless another one at
    least 0.7x its size lies nearer the previous frame's face centre ``prev_centre`` [2] px
    (so the track does not jump to a passer-by who is momentarily larger)."""
    face = max(faces, key=lambda f: f.size)
    if prev_centre is not None and len(faces) > 1:
        d = [np.linalg.norm(f.landmarks[:, :2].mean(0) - prev_centre) for f in faces]
        near = faces[int(np.argmin(d))]
        if near.size > 0.7 * face.size:
            face = near
    return face


def load_detector_model(cfg: TrackConfig) -> Any:
    """What ``cfg.detector`` needs loaded before the stage starts: for ``fan``, the checked
    :class:`~gstalk.tracking.fan.FANModel` of ``cfg.fan_weights`` (or ``$GSTALK_FAN_WEIGHTS``);
    None for ``mediapipe`` (its model ships with gstalk).

    Raises:
        UsageError: unknown detector, or FAN without a weights file. InputError: the file is
        refused (see :func:`gstalk.tracking.fan.inspect_weights`).
    """
    if cfg.detector not in DETECTORS:
        raise UsageError(f"Unknown landmark detector '{cfg.detector}'.", hint=f"use one of: {', '.join(DETECTORS)}")
    if cfg.detector != "fan":
        return None
    from gstalk.tracking.fan import FANModel, resolve_weights

    return FANModel(resolve_weights(cfg.fan_weights))


def run_track(workspace: str, cfg: TrackConfig, *, reporter: Reporter = SILENT) -> Workspace:
    """Run the track stage on a workspace whose extract stage is done.

    Raises:
        WorkspaceError: extract missing.
        UsageError / InputError: ``--detector fan`` without usable weights, or a setting that
        is not one of its choices (``--plate``) (checked before anything is written).
        TrackingError: no face, face too small, face lost for too long.
    """
    import dataclasses

    t0 = time.perf_counter()
    ws = Workspace.open(workspace)
    ws.require("track")
    check_choices(cfg, "flag")
    fan = load_detector_model(cfg)
    if fan is not None:  # record the file actually used (it may come from the environment)
        cfg = dataclasses.replace(cfg, fan_weights=str(fan.info.path.resolve()))
    run_stage(ws, "track", to_dict(cfg), lambda: _track(ws, cfg, reporter, fan), started=t0)
    return ws


def _track(ws: Workspace, cfg: TrackConfig, reporter: Reporter,
           fan: Any = None) -> tuple[dict[str, Any], dict[str, float]]:
    import cv2

    ex = ws.stage("extract").summary
    n, size, fps = int(ex["n_frames"]), int(ex["size"]), float(ex["fps"])
    timings: dict[str, float] = {}
    scheme = IBUG68 if fan is not None else MEDIAPIPE
    n_lm, n_bs = scheme.n_points, (N_BLENDSHAPES if fan is None else 0)
    n_sc = n_lm if fan is not None else 0
    reporter.log(f"[bold]track[/bold] {n} frames at {size} px, detector {cfg.detector}")

    # 1. landmarks, and the masks of each frame on a worker thread -----------------------
    # (GrabCut needs only the frame and its landmarks; frames with no face get their masks
    # after gap filling, below)
    t = time.perf_counter()
    lms = np.zeros((n, n_lm, 3), np.float32)
    bss = np.zeros((n, n_bs), np.float32)
    boxes = np.zeros((n, 4), np.float32)  # the box each face was found in
    scores = np.zeros((n, n_sc), np.float32)
    valid = np.zeros(n, bool)
    multi: list[int] = []
    names: tuple[str, ...] = ()
    prev_centre: np.ndarray | None = None
    out_dir = ws.path("track")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_dir(ws.path(TRACK_MASKS)) as mask_dir:
        # the plate sees the training frames only: held-out frames are scored against it
        plate_ids = plate_frame_ids(split_indices(ws)[0])
        with MaskWriter(mask_dir, cfg.grabcut_size, cfg.grabcut_iterations, plate_ids) as masks:
            kw: dict[str, Any] = {"model": fan} if fan is not None else {}
            with get_detector(cfg.detector, video=True, num_faces=2, **kw) as det, \
                    reporter.task(f"landmarks ({cfg.detector}) + masks", n) as bar:
                for i in range(n):
                    frame = load_frame(ws, i)
                    faces = det.detect(frame, timestamp_ms=int(round(i * 1000 / fps)))
                    if len(faces) > 1:
                        multi.append(i)
                    if faces:
                        face = pick_face(faces, prev_centre)
                        lms[i], bss[i], valid[i] = face.landmarks, face.blendshapes, True
                        boxes[i] = face.box if face.box is not None else face.bbox
                        if face.scores is not None:
                            scores[i] = face.scores
                        prev_centre = face.landmarks[:, :2].mean(0)
                        names = names or face.names
                        masks.submit(i, frame, lms[i])
                    bar.advance()
                timings["landmarks_s"] = time.perf_counter() - t
                frames_dir = ws.path(EXTRACT_FRAMES)
                if not valid.any():
                    raise TrackingError(f"No face was found in any of the {n} frames in {frames_dir}.",
                                        hint="look at the frames; re-run extract on a video with one face "
                                             "looking at the camera", path=frames_dir)
                sizes = np.array([face_geometry(lm)[2] for lm in lms[valid]])
                med = float(np.median(sizes))
                if med < cfg.min_face_px:
                    k = int(np.flatnonzero(valid)[int(np.argsort(sizes)[len(sizes) // 2])])
                    raise TrackingError(
                        f"The face is only {med:.0f} px tall in the {size} px frames of {frames_dir} (median; e.g. "
                        f"frame {k:06d}.png), the minimum is {cfg.min_face_px:.0f} px.",
                        hint="re-run extract at a larger --size, or film closer to the face", path=frames_dir)
                try:
                    filled, gaps = fill_gaps(np.concatenate([lms.reshape(n, -1), bss, boxes, scores], 1), valid,
                                             cfg.max_gap)
                except TrackingError as exc:  # name the folder the frame numbers refer to
                    raise TrackingError(f"{exc.message[:-1]} in {frames_dir}.", hint=exc.hint,
                                        path=frames_dir) from None
                cut = np.cumsum([n_lm * 3, n_bs, 4])
                lms = filled[:, :cut[0]].reshape(n, n_lm, 3).astype(np.float32)
                bss = filled[:, cut[0]:cut[1]].astype(np.float32)
                boxes = filled[:, cut[1]:cut[2]].astype(np.float32)
                scores = filled[:, cut[2]:].astype(np.float32)
                for i in np.flatnonzero(~valid):
                    masks.submit(int(i), load_frame(ws, int(i)), lms[i])
        plate_frames, plate_person = masks.plate_inputs()
    timings["landmarks_masks_s"] = time.perf_counter() - t
    n_interp = int((~valid).sum())
    if gaps:
        reporter.warn(f"face not found in {n_interp} frame(s) ({', '.join(f'{a}-{b}' for a, b in gaps[:5])}); "
                      "interpolated")
    if multi:
        ranges = frame_ranges(np.isin(np.arange(n), multi))
        where = ", ".join(f"{a}-{b}" for a, b in ranges[:5]) + (" …" if len(ranges) > 5 else "")
        reporter.warn(f"{len(multi)} frame(s) of {ws.path(EXTRACT_FRAMES)} show more than one face (frames "
                      f"{where}); tracking the largest, the one nearest the previous frame's face. If the wrong "
                      "person is tracked (see track/preview.png), crop the video to the speaker and re-run extract")

    # 2. focal length and head pose ------------------------------------------------------
    t = time.perf_counter()
    fs = search_focal(lms, size, size, cfg.focal_min, cfg.focal_max)
    K = intrinsics(fs.focal_px, size, size)
    poses_raw, errs = solve_poses(lms, K)
    poses = smooth_poses(poses_raw, cfg.smooth_sigma)
    jr, jt = jitter(poses_raw)
    js, jts = jitter(poses)
    timings["pose_s"] = time.perf_counter() - t
    reporter.log(f"  focal {fs.focal_px:.0f} px, reprojection error {errs.mean():.2f} px, "
                 f"jitter {jr:.2f}->{js:.2f} deg, {jt:.1f}->{jts:.1f} mm per frame")
    lms_smooth = smooth_landmarks(lms, cfg.landmark_sigma)
    stable = stable_ids(lms)
    lj, ljs = landmark_jitter(lms, stable), landmark_jitter(lms_smooth, stable)
    angles = view_angles(poses_raw)
    turned = frame_ranges(np.abs(angles).max(1) > cfg.max_view_angle)
    if turned:
        reporter.warn(f"the head is turned more than {cfg.max_view_angle:.0f}° from the camera in frames "
                      f"{', '.join(f'{a}-{b}' for a, b in turned[:5])}{' …' if len(turned) > 5 else ''}: "
                      "landmarks are unreliable there; trim those frames for a better model")

    # 3. A/V offset ----------------------------------------------------------------------
    samples, sr = load_audio(ws)
    av_energy = estimate_offset(lms, samples, sr, fps, cfg.av_max_lag)
    av = prior_offset(ws, lms, cfg.av_max_lag) or av_energy
    if av.confident:
        reporter.log(f"  audio/video offset {av.frames:+d} frames (correlation {av.correlation:.2f}, "
                     f"{av.correlation_at_zero:.2f} at 0; {av.method}; the loudness alone gave "
                     f"{av_energy.best_lag:+d} at {av_energy.correlation:.2f})")
    else:
        reporter.warn(f"audio/video offset not confident: the best lag, {av.best_lag:+d} frames, correlates only "
                      f"{av.correlation:.2f} ({av.method}); the audio is left unshifted. If lips and voice look "
                      "out of step, set it: `gstalk fine WS --av-offset N`")

    # 4. background plate ------------------------------------------------------------
    t = time.perf_counter()
    plate, unseen = background_plate(plate_frames, plate_person, statistic=cfg.plate)
    ok, buf = cv2.imencode(".png", plate[:, :, ::-1])
    with atomic_write(ws.path(PLATE)) as f:
        f.write(buf.tobytes())
    timings["plate_s"] = time.perf_counter() - t

    # 5. save -------------------------------------------------------------------------
    if fan is None:
        blink = normalise_blink(bss, names)
        face_box = np.concatenate([lms[:, :, :2].min(1), lms[:, :, :2].max(1)], 1).astype(np.float32)
    else:  # no blendshapes: blink from the eyelids; the face box is MediaPipe's (comparable face metrics)
        blink = blink_from_landmarks(lms)
        face_box = boxes
    tensors = {
        "landmarks": lms, "landmarks_smooth": lms_smooth, "blendshapes": bss, "pose_raw": poses_raw.astype(np.float32),
        "viewmats": poses.astype(np.float32), "K": K.astype(np.float32), "blink": blink,
        "valid": valid.astype(np.uint8), "mouth_box": mouth_boxes(lms, size), "face_box": face_box,
        "mouth_open": mouth_opening(lms).astype(np.float32), "reprojection_error": errs.astype(np.float32),
    }
    if fan is not None:
        tensors["landmark_scores"] = scores
    save_tensors(ws.path(TRACKS), tensors,
                 {"blendshape_names": list(names), "detector": cfg.detector, "landmark_scheme": scheme.name,
                  "units": {"landmarks": "px", "viewmats": "m", "K": "px"}})
    write_preview(ws, lms, poses, K, ws.path(TRACK_PREVIEW))
    summary = {
        "fps": fps, "n_frames": n, "size": size, "detector": cfg.detector, "landmark_scheme": scheme.name,
        "focal_px": fs.focal_px, "focal_search": {"candidates": fs.candidates, "errors": fs.errors},
        "reprojection_error_px": float(errs.mean()),
        "jitter_rot_deg_raw": jr, "jitter_trans_mm_raw": jt, "jitter_rot_deg": js, "jitter_trans_mm": jts,
        "landmark_jitter_px_raw": lj, "landmark_jitter_px": ljs,
        "smooth_sigma_frames": cfg.smooth_sigma,
        "interpolated_frames": n_interp, "gaps": gaps, "multi_face_frames": len(multi),
        "multi_face_ranges": frame_ranges(np.isin(np.arange(n), multi)),
        "view_angle_deg_max": [float(np.abs(angles[:, 0]).max()), float(np.abs(angles[:, 1]).max())],
        "turned_away_frames": turned,
        "av_offset_frames": av.frames, "av_correlation": av.correlation,
        "av_correlation_at_zero": av.correlation_at_zero, "av_best_lag": av.best_lag,
        "av_confident": av.confident, "av_method": av.method,
        "av_curve": {str(k): v for k, v in av.curve.items()},
        "av_energy": {"best_lag": av_energy.best_lag, "correlation": av_energy.correlation,
                      "correlation_at_zero": av_energy.correlation_at_zero},
        "background_inpainted_fraction": unseen,
        "blendshape_names": list(names),
    }
    if fan is not None:
        summary["fan"] = {**fan.info.to_dict(), "mean_score": float(scores[valid].mean()) if valid.any() else 0.0}
        if not fan.info.public_archive:
            reporter.warn(f"the FAN weights {fan.info.path} are not the public 2D-FAN-4 archive (their SHA-256 "
                          "differs): landmarks may differ from the papers' detector")
    write_json(ws.path(TRACK_SUMMARY), summary)
    return summary, timings


def prior_offset(ws: Workspace, lms: np.ndarray, max_lag: int) -> AVOffset | None:
    """The A/V offset from the opening the shipped articulation prior predicts from the
    workspace's audio features (:func:`~gstalk.tracking.avsync.estimate_offset_predicted`);
    None when the workspace's front end is not the prior's (e.g. ``mfcc``)."""
    import torch

    from gstalk.audio import frame_windows
    from gstalk.dataset import load_audio_features
    from gstalk.prior import resolve_prior

    af = load_audio_features(ws)
    ex = ws.stage("extract")
    prior, _ = resolve_prior("auto", af.extractor, ex.config.get("audio", {}), af.window)
    if prior is None:
        return None
    windows = frame_windows(af.steps, len(lms), float(ex.summary["fps"]), af.steps_per_second, af.window, 0)
    predicted = prior.ensemble.predict_sequence(torch.from_numpy(windows))[:, 0].numpy()
    return estimate_offset_predicted(lms, predicted, max_lag)


def write_preview(ws: Workspace, lms: np.ndarray, poses: np.ndarray, K: np.ndarray, path: Any,
                  count: int = 6) -> None:
    """A PNG grid of ``count`` frames with landmarks, the head's axes and the mask outlines."""
    import cv2

    from gstalk.dataset import load_masks

    n = len(lms)
    idx = np.linspace(0, n - 1, min(count, n)).round().astype(int)
    tiles = []
    masks = load_masks(ws, list(idx)) if ws.path(TRACK_MASKS).exists() else None
    for j, i in enumerate(idx):
        img = load_frame(ws, int(i))[:, :, ::-1].copy()
        if masks is not None:
            for ch, col in ((0, (0, 0, 255)), (1, (255, 0, 255)), (2, (0, 255, 0))):
                cs, _ = cv2.findContours(masks[j][..., ch], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                cv2.drawContours(img, cs, -1, col, 1)
        for x, y, _ in lms[i]:
            cv2.circle(img, (int(x), int(y)), 1, (255, 255, 0), -1)
        axes = np.array([[0, 0, 0], [0.05, 0, 0], [0, 0.05, 0], [0, 0, 0.05]])
        pc = axes @ poses[i][:3, :3].T + poses[i][:3, 3]
        uv = pc[:, :2] / pc[:, 2:3] * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]
        for k, col in ((1, (0, 0, 255)), (2, (0, 255, 0)), (3, (255, 0, 0))):
            cv2.line(img, tuple(np.round(uv[0]).astype(int)), tuple(np.round(uv[k]).astype(int)), col, 2)
        cv2.putText(img, str(int(i)), (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
        tiles.append(img)
    cols = 3
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    grid = np.concatenate([np.concatenate(tiles[r:r + cols], 1) for r in range(0, len(tiles), cols)], 0)
    ok, buf = cv2.imencode(".png", grid)
    with atomic_write(path) as f:
        f.write(buf.tobytes())
