"""Stage 6, ``gstalk eval``: self-driven quality on the held-out test frames.

Renders the test split (the last 1/11 of the frames, never trained on) with its own audio
and poses, and compares it with the ground truth: PSNR and SSIM of the full frame, the face
box and the mouth box, next to two baselines computed the same way: the mean training
frame, and the coarse (static, audio-free) Gaussians composited like the model.

With the user's weight files it adds LPIPS (``lpips=PATH``, :mod:`gstalk.metrics.lpips`)
and SyncNet's LSE-C / LSE-D (``syncnet=PATH``, :mod:`gstalk.metrics.syncnet`); without them
the report says they were skipped. With ``lmd_landmarks="fan"`` and FAN's weights it adds the
papers' LMD (FAN's mouth points 48-67 on render and ground truth, :func:`fan_lip_metrics`)
beside MediaPipe's.

Writes ``ws/eval/metrics.json`` (versioned), ``ws/eval/report.md``, ``ws/eval/samples.png``
(ground truth | coarse | fine | error of a few test frames), ``ws/eval/psnr.png`` (PSNR per
test frame) and ``ws/eval/mouth.png`` (mouth opening per frame: render, ground truth and the
opening the audio predicts).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gstalk import __version__
from gstalk.audio import frame_windows
from gstalk.avatar import Avatar
from gstalk.config import EvalConfig, check_articulation_gain
from gstalk.dataset import (
    build_frameset,
    load_audio,
    load_audio_features,
    load_frame,
    load_tracks,
    split_indices,
)
from gstalk.gaussians.splat import composite, splat
from gstalk.images import to_uint8, write_png
from gstalk.metrics.image import crop, image_metrics, psnr
from gstalk.metrics.report import SKIPPED, json_floats, lse_lines, markdown_table, skipped_lines, sync_lines
from gstalk.progress import SILENT, Reporter
from gstalk.render.driver import HeadRenderer
from gstalk.tensorio import load_tensors
from gstalk.workspace import (
    COARSE_GAUSSIANS,
    EVAL_METRICS,
    EVAL_REPORT,
    EVAL_SAMPLES,
    Workspace,
    atomic_write,
    now_iso,
    write_json,
)

METRICS_SCHEMA = 1
MIN_SYNC_FRAMES = 100  # shorter series give spurious lip-sync correlations (a static model scored 0.7 on 45)
KEYS = ("psnr", "ssim", "face_psnr", "face_ssim", "mouth_psnr", "mouth_ssim")
PLOTS = {"psnr": "psnr.png", "mouth": "mouth.png"}


def mean_frame(ws: Workspace, frames: range) -> torch.Tensor:
    """Mean of the given frames: [H, W, 3] float32 in [0, 1]."""
    acc = None
    for i in frames:
        f = load_frame(ws, i).astype(np.float64)
        acc = f if acc is None else acc + f
    assert acc is not None
    return torch.from_numpy((acc / len(frames) / 255.0).astype(np.float32))


LMD_LANDMARKS = ("mediapipe", "fan")


def run_eval(workspace: str | Path, cfg: EvalConfig | None = None, *, reporter: Reporter = SILENT,
             **options: Any) -> dict[str, Any]:
    """Evaluate a workspace whose fine stage is done, on ``cfg.device``; returns the metrics
    dict. The run is recorded in the manifest (stage ``eval``, with the runs it read), so
    ``eval --compare`` knows whether ``eval/metrics.json`` still describes the current model
    (:meth:`~gstalk.workspace.Workspace.is_current`).

    Args:
        cfg: :class:`~gstalk.config.EvalConfig`; ``options``: fields of it to change
            (``lpips=PATH``; ``backend`` is ``raster``'s older name). Its fields:
        lpips: a safetensors file of LPIPS weights (adds ``lpips``/``face_lpips``).
        syncnet: a safetensors file of SyncNet weights (adds ``lse_c``/``lse_d``).
        lmd_landmarks: ``mediapipe`` (MediaPipe's LMD only) or ``fan`` (also FAN's, the
            papers' way: ``lmd_fan``/``lmd_fan_512``), with ``fan_weights`` (a TorchScript
            archive; default ``$GSTALK_FAN_WEIGHTS``).
        raster, device: rasterizer backend and device (``auto``, ``cpu``, ``cuda[:N]``).
        articulation_gain: scale of the predicted mouth code on the test frames, as
            ``render --articulation-gain`` (None: the default), recorded as ``articulation_gain``;
            the oracle and neutral rows are not scaled.

    Raises:
        WorkspaceError: a stage is missing or stale. InputError: a weights file is missing,
        not safetensors (LPIPS, SyncNet) or not TorchScript (FAN), or lacks/mis-shapes a key
        (checked before anything is rendered). UsageError: unknown ``lmd_landmarks``,
        ``fan`` without weights, or an articulation gain out of (0, 5]. DependencyError: a
        device or rasterizer that cannot run here.
        LockError: another process uses the workspace.
    """
    from gstalk.avatar import eval_summary
    from gstalk.config import to_dict, with_options
    from gstalk.device import stage_device
    from gstalk.metrics.weights import load_metric_nets
    from gstalk.workspace import run_stage

    t0 = time.perf_counter()
    cfg = with_options(EvalConfig, cfg, options, "eval")
    check_articulation_gain(cfg.articulation_gain)  # a bad gain is refused before anything runs
    ws = Workspace.open(workspace)
    ws.require("eval")
    device = stage_device(cfg.device, cfg.raster)
    nets = load_metric_nets(cfg.lpips, cfg.syncnet, device)
    if cfg.lmd_landmarks == "fan":
        from gstalk.tracking.fan import FANModel, resolve_weights

        nets["fan"] = FANModel(resolve_weights(cfg.fan_weights))
    result: dict[str, Any] = {}

    def work() -> dict[str, Any]:
        result["metrics"] = _eval(ws, cfg, nets, device, reporter, t0)
        return eval_summary(result["metrics"])

    run_stage(ws, "eval", to_dict(cfg), work, started=t0)
    return result["metrics"]


def _eval(ws: Workspace, cfg: EvalConfig, nets: dict[str, Any], device: torch.device, reporter: Reporter,
          t0: float) -> dict[str, Any]:
    backend = cfg.raster
    train, test = split_indices(ws)
    reporter.log(f"[bold]eval[/bold] {len(test)} test frames (frames {test.start}-{test.stop - 1})")
    data = build_frameset(ws, test)
    gt = data.images.float() / 255.0
    on_device = data.to(device)
    tracks = load_tracks(ws)
    sel = torch.tensor(list(test))
    mouth_boxes, face_boxes = tracks.mouth_box[sel], tracks.face_box[sel]

    # the model, driven by the test audio (with the training A/V offset)
    avatar = Avatar.from_workspace(ws)
    model, meta = avatar.model, avatar.meta
    af = load_audio_features(ws)
    ex = ws.stage("extract").summary
    windows = frame_windows(af.steps, int(ex["n_frames"]), float(ex["fps"]), af.steps_per_second, af.window,
                            int(meta.get("av_offset_frames", 0)))
    renderer = HeadRenderer(avatar, backend=backend, articulation_gain=cfg.articulation_gain, device=device)
    t = time.perf_counter()
    fine_t = render_split(renderer, renderer.conditions(windows), test, reporter, "rendering test frames")
    render_fps = len(test) / max(time.perf_counter() - t, 1e-9)
    # where the error is: the same field driven by the *tracked* code (an upper bound: a perfect
    # audio -> code map) and by the neutral (all-zero, i.e. mean) code (what the field gives
    # without any speech)
    code_rows: dict[str, torch.Tensor] = {}
    if model.articulator is not None and tracks.has_articulation:
        from gstalk.deform.articulation import standardise

        tracked = standardise(tracks.articulation(), list(train))  # the units the field trained on
        for name, codes in (("oracle", tracked), ("neutral", torch.zeros_like(tracked))):
            code_rows[name] = render_split(renderer, model.code_conditions(codes.to(device)), test, reporter,
                                           f"rendering test frames ({name} code)")

    # baselines; the coarse head over the same background as the model's (its torso field's
    # render when it has one, else the frame's own torso), so the two differ by the head only
    coarse_params, _ = load_tensors(ws.path(COARSE_GAUSSIANS))
    coarse_params = {k: v.to(device) for k, v in coarse_params.items()}
    coarse = []
    with torch.no_grad():
        for i in range(len(data)):
            c, a, _ = splat(coarse_params, on_device.viewmats[i:i + 1], on_device.K, data.width, data.height,
                            backend=backend)
            coarse.append(composite(c, a, renderer.background(int(data.frame_ids[i]))).clamp(0, 1)[0].cpu())
    coarse_t = torch.stack(coarse)
    mean_t = mean_frame(ws, train)[None].expand_as(gt)

    results = {
        "model": image_metrics(fine_t, gt, mouth_boxes, face_boxes),
        "baselines": {
            "mean_frame": image_metrics(mean_t, gt, mouth_boxes, face_boxes),
            "coarse": image_metrics(coarse_t, gt, mouth_boxes, face_boxes),
        },
        "codes": {name: image_metrics(r, gt, mouth_boxes, face_boxes) for name, r in code_rows.items()},
    }
    fps = float(ex["fps"])
    per_frame_psnr = {"model": psnr(fine_t, gt), "coarse": psnr(coarse_t, gt), "mean_frame": psnr(mean_t, gt)}
    per_frame_psnr.update({name: psnr(r, gt) for name, r in code_rows.items()})
    for name, v, pred in (("model", results["model"], fine_t), ("coarse", results["baselines"]["coarse"], coarse_t),
                          ("mean_frame", results["baselines"]["mean_frame"], mean_t),
                          *((name, results["codes"][name], r) for name, r in code_rows.items())):
        v.update(stability_metrics(pred, gt, face_boxes, per_frame_psnr[name], fps))
    if "lpips" in nets:
        with reporter.task("LPIPS", 3) as bar:
            for v, pred in ((results["model"], fine_t), (results["baselines"]["mean_frame"], mean_t),
                            (results["baselines"]["coarse"], coarse_t)):
                v.update(lpips_metrics(nets["lpips"], pred, gt, face_boxes))
                bar.advance()
    samples, rate = load_audio(ws)
    real_lse: dict[str, Any] = {}
    if "syncnet" in nets:
        segment = samples[int(round(test.start / fps * rate)):int(round(test.stop / fps * rate))]
        with reporter.task("SyncNet (LSE-C/LSE-D)", 3) as bar:
            for v, frames in ((results["model"], fine_t), (results["baselines"]["coarse"], coarse_t),
                              (real_lse, gt)):
                v.update(lse_metrics(nets["syncnet"], frames, face_boxes, segment, rate, fps))
                bar.advance()
    with reporter.task("landmarks of the renders", (2 + len(code_rows)) * len(test)) as bar:
        results["model"].update(lip_metrics(fine_t, tracks, list(test), bar.advance, truth=gt))
        results["baselines"]["coarse"].update(lip_metrics(coarse_t, tracks, list(test), bar.advance, truth=gt))
        for name, r in code_rows.items():
            results["codes"][name].update(lip_metrics(r, tracks, list(test), bar.advance, truth=gt))
    if "fan" in nets:
        with reporter.task("FAN landmarks (LMD the papers' way)", 3 * len(test)) as bar:
            truth_pts, truth_fallback = fan_points(nets["fan"], gt, face_boxes, bar.advance)
            for v, pred in ((results["model"], fine_t), (results["baselines"]["coarse"], coarse_t)):
                v.update(fan_lip_metrics(nets["fan"], pred, truth_pts, face_boxes, bar.advance))
                v["lmd_fan_box_fallbacks"] += truth_fallback
    # mouth motion and the lip-sync proxy: the renders' mouth opening against the real video's
    # and against the opening the audio predicts
    from gstalk.metrics.lipsync import LipSyncProxy, fill_nan, sync_scores
    from gstalk.tracking.avsync import mouth_opening

    real_open = mouth_opening(tracks.landmarks[sel].numpy())
    if "_truth_opening" in results["model"]:  # FAN tracks: MediaPipe's reading of the real frames, as of the renders
        real_open = fill_nan(results["model"]["_truth_opening"])
    for v in (results["model"], results["baselines"]["coarse"], *results["codes"].values()):
        o = fill_nan(v["_opening"])
        v["mouth_motion"] = float(o.std() / max(real_open.std(), 1e-9))
    predicted = LipSyncProxy.load().predict(samples, rate, int(ex["n_frames"]), fps)[list(test)]
    per_frame = {
        "frame": list(test), "psnr": per_frame_psnr["model"].tolist(),
        "coarse_psnr": per_frame_psnr["coarse"].tolist(), "mean_frame_psnr": per_frame_psnr["mean_frame"].tolist(),
        **{f"{name}_code_psnr": per_frame_psnr[name].tolist() for name in code_rows},
        "mouth_opening": results["model"]["_opening"].tolist(),
        "real_mouth_opening": real_open.tolist(), "predicted_opening": predicted.tolist(),
    }
    if len(test) >= MIN_SYNC_FRAMES:
        for v in (results["model"], results["baselines"]["coarse"]):
            v.update(sync_scores(v["_opening"], predicted))
        real = sync_scores(real_open, predicted)
        results["model"]["real_video"] = real
        results["model"]["sync_fraction"] = results["model"]["sync_corr"] / real["sync_corr_best"] \
            if real["sync_corr_best"] > 0.05 else float("nan")
    else:
        results["model"]["sync_note"] = (f"the test split ({len(test)} frames) is shorter than {MIN_SYNC_FRAMES} "
                                         "frames: too short for a correlation; see `gstalk eval --audio`")
    if "syncnet" in nets:
        results["model"].setdefault("real_video", {}).update(real_lse)
    results["model"].update(blink_metrics(results["model"]["_eye_blink"], tracks, list(test)))
    for v in (results["model"], results["baselines"]["coarse"], *results["codes"].values()):
        v.pop("_opening")
        v.pop("_truth_opening", None)
        v.pop("_eye_blink", None)
    out = {
        "schema_version": METRICS_SCHEMA, "gstalk_version": __version__, "created": now_iso(),
        "workspace": str(ws.root), "split": {"test": [test.start, test.stop]}, "n_frames": len(test),
        **results["model"], "baselines": results["baselines"], "codes": results["codes"],
        "error_split": error_split(results["model"], results["codes"]),
        "articulation_fit": articulation_fit_summary(ws),
        "model_name": meta["spec"]["name"], "render_fps": render_fps, "torso": torso_provenance(model.torso),
        "articulation_gain": renderer.articulation_gain, "articulation_basis": avatar.has_articulation_basis,
        "training_seconds": {s: ws.stage(s).data.get("seconds") for s in ("extract", "track", "coarse", "fine")},
        "weights": {k: ({"path": str(Path(n.path).resolve()), **({"net": n.net} if k == "lpips" else {})}
                        if k != "fan" else n.info.to_dict()) for k, n in nets.items()},
        "lmd_landmarks": {k: LMD_READINGS[k] for k in ("lmd", "lmd_fan") if k in results["model"]},
        "skipped": [k for k in SKIPPED if k not in nets],
        "plots": dict(PLOTS), "per_frame": {k: json_floats(v) for k, v in per_frame.items()},
        "seconds": time.perf_counter() - t0,
    }
    out["device"] = str(device)
    d = ws.path("eval")
    d.mkdir(parents=True, exist_ok=True)
    write_plots(d, per_frame)
    _samples(ws.path(EVAL_SAMPLES), gt, coarse_t, fine_t)
    out["seconds"] = time.perf_counter() - t0
    write_json(ws.path(EVAL_METRICS), out)
    with atomic_write(ws.path(EVAL_REPORT), "w") as f:
        f.write(report_markdown(out))
    return out


def stability_metrics(pred: torch.Tensor, gt: torch.Tensor, face_boxes: torch.Tensor, frame_psnr: torch.Tensor,
                      fps: float) -> dict[str, float]:
    """Sharpness and drift of renders [F, H, W, 3] against the ground truth [F, H, W, 3]
    (both in [0, 1]) over consecutive test frames:
    :func:`~gstalk.metrics.sharpness.sharpness_ratio` in the face boxes [F, 4] px
    (``face_sharpness``, ``face_sharpness_truth``, ``sharpness_ratio``) and the linear trend
    of the per-frame PSNR ``frame_psnr`` [F] dB: ``psnr_trend_db`` (the fitted line's change
    from the first to the last test frame; negative = getting worse) and
    ``psnr_slope_db_per_s``."""
    from gstalk.metrics.sharpness import linear_trend, sharpness_ratio

    out = sharpness_ratio(pred, gt, face_boxes)
    trend = linear_trend(frame_psnr.numpy(), fps)
    out["psnr_trend_db"], out["psnr_slope_db_per_s"] = trend["trend"], trend["slope_per_s"]
    return out


def blink_metrics(render_blink: np.ndarray, tracks: Any, frames: list[int], closed: float = 0.5) -> dict[str, Any]:
    """Do the renders close their eyes when the footage does? MediaPipe's eye blink (mean of
    eyeBlinkLeft/Right) read on the renders against the one it read on the ground-truth
    frames (the track stage's), over the test frames.

    Args:
        render_blink: [F] the renders' eye blink (NaN where no face was read).
        tracks: the workspace's :class:`~gstalk.dataset.Tracks` (MediaPipe blendshapes; FAN
            tracks have none and give {}).
        frames: [F] the test frames' workspace numbers.
        closed: a frame counts as closed-eyed when its normalised blink (``tracks.blink``,
            the model's input) is at least this.

    Returns:
        {"blink_closed_frames": count, "eye_blink_closed", "eye_blink_closed_truth": mean
        eye blink of the renders / ground truth on those frames (NaN without any),
        "eye_blink_open", "eye_blink_open_truth": on the others, "blink_corr": Pearson
        correlation of the two series (NaN when either is constant)}; {} without blendshapes.
    """
    names = list(tracks.blendshape_names)
    cols = [names.index(k) for k in ("eyeBlinkLeft", "eyeBlinkRight") if k in names]
    if not cols:
        return {}
    truth = tracks.blendshapes[frames][:, cols].mean(1).double().numpy()
    shut = tracks.blink[frames].numpy() >= closed
    ok = np.isfinite(render_blink)

    def mean(x: np.ndarray, m: np.ndarray) -> float:
        return float(x[m].mean()) if m.any() else float("nan")

    r, t = render_blink[ok], truth[ok]
    corr = float(np.corrcoef(r, t)[0, 1]) if ok.sum() > 2 and r.std() > 1e-9 and t.std() > 1e-9 else float("nan")
    return {"blink_closed_frames": int(shut.sum()), "eye_blink_closed": mean(render_blink, shut & ok),
            "eye_blink_closed_truth": mean(truth, shut & ok), "eye_blink_open": mean(render_blink, ~shut & ok),
            "eye_blink_open_truth": mean(truth, ~shut & ok), "blink_corr": corr}


def torso_provenance(torso: Any) -> dict[str, Any]:
    """What the held-out frames' torso is made of (eval's ``torso`` key): ``source`` (``field``:
    the torso field, or ``pasted``: each frame's own torso from the footage, a model trained with
    ``--set torso=false``), ``fitted_to_test_frames`` (which of the field's per-frame placements
    were fitted to the test frames themselves after training: ``shift``, ``turn``, ``residual
    flow``) and a one-line ``note`` for the report."""
    if torso is None:
        return {"source": "pasted", "fitted_to_test_frames": [],
                "note": "each test frame's own torso is pasted from the footage (trained with --set torso=false), so "
                        "the full-frame scores include ground truth; the face and mouth boxes do not"}
    fitted = [name for name, on in (("shift", getattr(torso, "n_frames", 0) > 0),
                                    ("turn", getattr(torso, "has_turns", False)),
                                    ("residual flow", getattr(torso, "flow_grid", 0) > 0)) if on]
    note = "the torso field"
    if fitted:
        note += (", placed on each test frame with the " + ", ".join(fitted) + " fitted to that frame after training "
                 "(the body's motion is not predicted from the audio): the full-frame scores say how well it "
                 "reproduces a torso, and the face and mouth boxes do not depend on it")
    return {"source": "field", "fitted_to_test_frames": fitted, "note": note}


def render_split(renderer: HeadRenderer, cond: torch.Tensor, frames: range, reporter: Reporter,
                 what: str) -> torch.Tensor:
    """Render workspace ``frames`` with their own poses, blinks and backgrounds from the
    condition sequence ``cond`` [N_all, W, C'] of the whole clip (on the renderer's device):
    [F, H, W, 3] float32 in [0, 1], on the CPU."""
    out = []
    with reporter.task(what, len(frames)) as bar:
        for frame in frames:
            out.append(renderer.render(renderer.head.windows(cond, frame), frame))
            bar.advance()
    return torch.stack(out)


def error_split(model: dict[str, Any], codes: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Where the mouth's error is, in mouth-box dB: ``audio_to_code`` (what a perfect audio →
    code map would gain: oracle − predicted), ``code_to_pixels`` (what the field gains over a
    neutral mouth when the code is perfect: oracle − neutral), and ``predicted_vs_neutral``
    ({} for a model without an articulation code)."""
    if "oracle" not in codes or "neutral" not in codes:
        return {}
    o, n = codes["oracle"]["mouth_psnr"], codes["neutral"]["mouth_psnr"]
    return {"audio_to_code_db": o - model["mouth_psnr"], "code_to_pixels_db": o - n,
            "predicted_vs_neutral_db": model["mouth_psnr"] - n}


def articulation_fit_summary(ws: Workspace) -> dict[str, Any]:
    """The fine stage's audio → articulation fit as the report states it: held-out R², level,
    the sentence, the prior used, and the prior's corpus clip this video is, when it is one
    (``prior_fitted_on_clip``: that R² is not held out) ({} for a model without one)."""
    s = ws.stage("fine").summary or {}
    fit = s.get("articulation_fit") or {}
    if not fit:
        return {}
    return {k: fit[k] for k in ("val_r2", "start_val_r2", "quality", "quality_text", "gain", "code_scale",
                                "prior_fitted_on_clip") if k in fit} | {"prior": s.get("articulation_prior", "")}


def lpips_metrics(metric: Any, pred: torch.Tensor, gt: torch.Tensor, face_boxes: torch.Tensor) -> dict[str, float]:
    """Mean LPIPS of frames [F, H, W, 3] in [0, 1] against the ground truth: {"lpips": full
    frame, "face_lpips": the face boxes [F, 4] px, resampled to a common side of at least 64 px}."""
    side = max(64, int(round(float((face_boxes[:, 2] - face_boxes[:, 0]).clamp_min(1).mean()))))
    return {"lpips": float(metric.images(pred, gt).mean()),
            "face_lpips": float(metric.images(crop(pred, face_boxes, side), crop(gt, face_boxes, side)).mean())}


def lse_metrics(net: Any, frames: torch.Tensor, face_boxes: torch.Tensor, samples: np.ndarray, rate: int,
                fps: float) -> dict[str, Any]:
    """SyncNet's LSE-C / LSE-D of frames [F, H, W, 3] in [0, 1] (face boxes [F, 4] px) against
    the audio [S] that starts with the first frame; a ``syncnet_note`` instead of numbers when
    the video is not at SyncNet's 25 frames/s or shorter than 6 frames."""
    from gstalk.metrics.syncnet import FPS, face_crops

    if abs(fps - FPS) > 0.01:
        return {"syncnet_note": f"SyncNet expects {FPS:g} frames/s; this video has {fps:g}"}
    crops = face_crops((to_uint8(f) for f in frames), face_boxes.numpy())
    s = net.score(crops, samples, rate)
    if s["syncnet_windows"] < 1:
        return {"syncnet_note": f"{len(frames)} frames are too few for SyncNet (it needs at least 6)"}
    return s


def write_plots(d: Path, per_frame: dict[str, Any]) -> None:
    """``psnr.png`` (PSNR per test frame: fine model, the same field driven by the tracked code
    when eval rendered it, coarse and mean-frame baselines) and
    ``mouth.png`` (mouth opening read on the renders and on the ground truth, and the opening
    the lip-sync proxy predicts from the audio, each z-scored) in the folder ``d``."""
    from gstalk.metrics.plots import mouth_plot, psnr_plot
    from gstalk.metrics.sharpness import linear_trend

    frames = per_frame["frame"]
    fine = np.asarray(per_frame["psnr"], dtype=np.float64)
    trend = linear_trend(fine)
    ok = np.isfinite(fine)
    centre = float(fine[ok].mean() - trend["slope_per_frame"] * np.arange(len(fine))[ok].mean()) if ok.any() else 0.0
    trend_label = f"fine model: linear trend ({trend['trend']:+.2f} dB over the split)"
    series = {"fine model": per_frame["psnr"]}
    if "oracle_code_psnr" in per_frame:
        series["fine model, tracked code"] = per_frame["oracle_code_psnr"]
    series.update({"baseline: coarse": per_frame["coarse_psnr"], "baseline: mean frame": per_frame["mean_frame_psnr"],
                   trend_label: centre + trend["slope_per_frame"] * np.arange(len(fine))})
    psnr_plot(d / PLOTS["psnr"], frames, series, styles={trend_label: "k:"})
    mouth_plot(d / PLOTS["mouth"], frames,
               {"render (MediaPipe)": per_frame["mouth_opening"],
                "ground truth (tracked)": per_frame["real_mouth_opening"],
                "predicted from the audio (lip-sync proxy)": per_frame["predicted_opening"]},
               title="Mouth opening on the test split")


def lip_metrics(renders: torch.Tensor, tracks: Any, frames: list[int],
                progress: Any = None, truth: torch.Tensor | None = None) -> dict[str, Any]:
    """LMD and blendshape error of rendered frames against the tracked ground truth.

    MediaPipe (image mode) reads the renders [F, H, W, 3] float in [0, 1]; ``frames`` [F] are
    their workspace frame numbers. The reference is the track stage's MediaPipe landmarks and
    blendshapes; when the workspace was tracked with FAN (68 points, no blendshapes),
    MediaPipe reads the ground-truth frames ``truth`` [F, H, W, 3] instead. Frames where it
    finds no face (in the render or that reference) are left out and counted.

    Returns:
        {"lmd": mouth LMD in px at the working size, "lmd_512": the same scaled to 512 px
        (the papers' resolution), "aue": mean blendshape MAE, "aue_parts": per blendshape,
        "lip_frames": frames measured, with ``truth`` the teeth and inner-mouth keys of
        :func:`~gstalk.metrics.teeth.teeth_scores` over those frames, "_opening": [F] mouth opening of each render (NaN
        where no face was found), "_eye_blink": [F] MediaPipe's eye blink (mean of
        eyeBlinkLeft/Right) on each render (NaN where none), and, only when MediaPipe read
        the ground truth (FAN tracks),
        "_truth_opening": [F] its mouth opening there (both not JSON, popped by the caller)}.
    """
    from gstalk.metrics.landmarks import MOUTH_IDS, blendshape_error, lmd
    from gstalk.tracking.avsync import mouth_opening
    from gstalk.tracking.detector import MediaPipeDetector

    lms, bss, keep = [], [], []
    ref_lms, ref_bss, names = tracks.landmarks.numpy(), tracks.blendshapes.numpy(), tracks.blendshape_names
    tracked_by_mediapipe = ref_lms.shape[1] in (478, 468)
    if not tracked_by_mediapipe:
        ref_lms, ref_bss, names = None, None, ()
    with MediaPipeDetector(video=False, num_faces=1) as det:
        if ref_lms is None and truth is not None:  # FAN tracks: MediaPipe's reading of the real frames
            read = [det.detect(np.ascontiguousarray(to_uint8(img))) for img in truth]
            found = [k for k, f in enumerate(read) if f]
            ref_lms = np.zeros((max(frames) + 1, 478, 3), np.float32)
            ref_bss = np.zeros((max(frames) + 1, len(read[found[0]][0].blendshapes) if found else 0), np.float32)
            names = read[found[0]][0].names if found else ()
            for k in found:
                ref_lms[frames[k]], ref_bss[frames[k]] = read[k][0].landmarks, read[k][0].blendshapes
            seen = {frames[k] for k in found}
            truth_opening = np.full(len(frames), np.nan)
            if found:
                truth_opening[found] = mouth_opening(np.stack([read[k][0].landmarks for k in found]))
            extra = {"_truth_opening": truth_opening}
        else:
            seen, extra = set(frames), {}
        for k, img in enumerate(renders):
            faces = det.detect(np.ascontiguousarray(to_uint8(img)))
            if faces and ref_lms is not None and frames[k] in seen:
                lms.append(faces[0].landmarks)
                bss.append(faces[0].blendshapes)
                keep.append(k)
            if progress is not None:
                progress()
    opening = np.full(len(renders), np.nan)
    eye_blink = np.full(len(renders), np.nan)
    extra["_eye_blink"] = eye_blink
    if not keep or ref_lms is None or ref_bss is None:
        nan = float("nan")
        return {"lmd": nan, "lmd_512": nan, "aue": nan, "aue_parts": {}, "lip_frames": 0, "_opening": opening, **extra}
    opening[keep] = mouth_opening(np.stack(lms))
    blink_cols = [list(names).index(k) for k in ("eyeBlinkLeft", "eyeBlinkRight") if k in names]
    if blink_cols:
        eye_blink[keep] = np.stack(bss)[:, blink_cols].mean(1)
    sel = [frames[k] for k in keep]
    ids = list(MOUTH_IDS)
    d = lmd(np.stack(lms)[:, ids], ref_lms[sel][:, ids])
    size = renders.shape[2]
    aue = blendshape_error(np.stack(bss), ref_bss[sel], names)
    if truth is not None:  # teeth and the inner mouth, in the frames whose landmarks were read
        from gstalk.metrics.teeth import teeth_scores

        extra.update(teeth_scores([to_uint8(renders[k]) for k in keep], lms,
                                  [to_uint8(truth[k]) for k in keep], list(ref_lms[sel])))
    return {"lmd": float(d.mean()), "lmd_512": float(d.mean() * 512.0 / size), "aue": aue.pop("mean"),
            "aue_parts": aue, "lip_frames": len(keep), "_opening": opening, **extra}


LMD_READINGS = {
    "lmd": "MediaPipe (shipped model, image mode), 40 lip points, render vs the tracked landmarks (vs MediaPipe's "
           "reading of the ground-truth frame when the workspace was tracked with FAN)",
    "lmd_fan": "FAN 2D-FAN-4 (--fan-weights), points 48-67, render vs ground-truth frame (ER-NeRF / "
               "TalkingGaussian)",
}


def fan_points(fan: Any, images: torch.Tensor, fallback_boxes: torch.Tensor,
               progress: Any = None) -> tuple[np.ndarray, int]:
    """FAN's 68 landmarks of each image, as face-alignment returns them (integer pixels).

    Each image's face box is the one MediaPipe (image mode) finds in it, as the papers give
    FAN their face detector's box; where MediaPipe finds none, ``fallback_boxes`` [F, 4] px
    (the ground truth's tracked box) is used and counted.

    Args:
        fan: a :class:`~gstalk.tracking.fan.FANModel`; images: [F, H, W, 3] float in [0, 1].

    Returns:
        ([F, 68, 2] float64 pixels, number of fallback boxes).
    """
    from gstalk.tracking.detector import MediaPipeDetector

    out, fallback = [], 0
    with MediaPipeDetector(video=False, num_faces=1) as det:
        for k, img in enumerate(images):
            rgb = np.ascontiguousarray(to_uint8(img))
            faces = det.detect(rgb)
            if faces:
                box = np.array(faces[0].bbox)
            else:
                box, fallback = fallback_boxes[k].numpy().astype(np.float64), fallback + 1
            out.append(fan.landmarks(rgb, box, truncate=True)[0])
            if progress is not None:
                progress()
    return np.stack(out), fallback


def fan_lip_metrics(fan: Any, renders: torch.Tensor, truth_points: np.ndarray, fallback_boxes: torch.Tensor,
                    progress: Any = None) -> dict[str, Any]:
    """The papers' LMD: FAN's mouth (points 48-67) on each render against FAN's on its
    ground-truth frame (``truth_points`` [F, 68, 2] from :func:`fan_points`), each mean-centred,
    the mean point distance averaged over the frames.

    Returns:
        {"lmd_fan": px at the working size, "lmd_fan_512": scaled to 512 px,
        "lmd_fan_frames": F, "lmd_fan_box_fallbacks": renders whose box was not found}.
    """
    from gstalk.metrics.landmarks import mouth_lmd

    pts, fallback = fan_points(fan, renders, fallback_boxes, progress)
    d = mouth_lmd(pts, truth_points)
    size = renders.shape[2]
    return {"lmd_fan": float(d.mean()), "lmd_fan_512": float(d.mean() * 512.0 / size), "lmd_fan_frames": len(d),
            "lmd_fan_box_fallbacks": fallback}


def _samples(path: Any, gt: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor, count: int = 4) -> None:
    idx = np.linspace(0, len(gt) - 1, min(count, len(gt))).round().astype(int)
    rows = []
    for i in idx:
        err = (fine[i] - gt[i]).abs().mean(-1, keepdim=True).mul(4).clamp(0, 1).expand(-1, -1, 3)
        rows.append(torch.cat([gt[i], coarse[i], fine[i], err], dim=1))
    write_png(path, to_uint8(torch.cat(rows, dim=0)))


def basis_note(m: dict[str, Any]) -> str:
    """The report's words on how the mouth is driven: whether the model carries the coarse
    articulation basis (the ``articulation_basis`` key; absent in older metrics) and the gain."""
    if "articulation_gain" not in m:
        return ""
    basis = {True: "with the coarse articulation basis", False: "without the articulation basis"}.get(
        m.get("articulation_basis"), "")
    return f" ({basis + ', ' if basis else ''}articulation gain {m['articulation_gain']:g})"


def report_markdown(m: dict[str, Any]) -> str:
    """The eval report as Markdown (metrics table against the baselines)."""
    lines = [f"# gstalk eval: {m['workspace']}", "",
             f"Self-driven, {m['n_frames']} held-out test frames {m['split']['test'][0]}-{m['split']['test'][1] - 1}; "
             f"model `{m['model_name']}`{basis_note(m)}; gstalk {m['gstalk_version']}, {m['created']}.", ""]
    rows = report_rows(m)
    lines += markdown_table(["", *KEYS], [[name, *(f"{v[k]:.4f}" if "ssim" in k else f"{v[k]:.2f}" for k in KEYS)]
                                          for name, v in rows])
    lines += stability_lines(m)
    if m.get("blink_closed_frames") is not None:
        lines += ["", f"Eyes: {m['blink_closed_frames']} test frame(s) with closed eyes (tracked blink ≥ 0.5); "
                  f"MediaPipe's eye blink there: render {m['eye_blink_closed']:.2f}, ground truth "
                  f"{m['eye_blink_closed_truth']:.2f}; elsewhere render {m['eye_blink_open']:.2f}, ground truth "
                  f"{m['eye_blink_open_truth']:.2f}; correlation over the split {m['blink_corr']:.2f}."]
    split = m.get("error_split") or {}
    if split:
        lines += ["", f"Where the mouth error is: a perfect audio → code map would gain "
                  f"{split['audio_to_code_db']:+.2f} dB on the mouth box (oracle − predicted); with it, the field "
                  f"gains {split['code_to_pixels_db']:+.2f} dB over a neutral mouth (oracle − neutral); the "
                  f"predicted code gains {split['predicted_vs_neutral_db']:+.2f} dB over the neutral one."]
    fit = m.get("articulation_fit") or {}
    if fit.get("quality_text"):
        lines += ["", f"{fit['quality_text'][0].upper()}{fit['quality_text'][1:]}. {fit.get('prior', '')}."]
    if "lpips" in m:
        net = m.get("weights", {}).get("lpips", {}).get("net", "alex")
        lines += ["", *markdown_table([f"LPIPS ({net}; lower is better)", "full frame", "face box"],
                                      [[name, f"{v['lpips']:.4f}", f"{v['face_lpips']:.4f}"]
                                       for name, v in rows if "lpips" in v])]
    lines += lse_lines([("fine model", m)] + [(f"baseline: {k}", v) for k, v in m["baselines"].items()]
                       + [("real video (ground truth)", m.get("real_video", {}))])
    lines += skipped_lines(m)
    lines += lmd_lines(m)
    lines += teeth_lines(m)
    motion = [(n, v["mouth_motion"]) for n, v in [("fine model", m), ("coarse", m["baselines"].get("coarse", {})),
                                                   *[(f"{k} code", v) for k, v in m.get("codes", {}).items()]]
              if "mouth_motion" in v]
    if motion:
        lines += ["", "Mouth motion (std of the mouth opening read on the renders / on the real frames): "
                  + ", ".join(f"{n} {x:.2f}" for n, x in motion) + "."]
    if "torso" in m:
        lines += ["", f"Torso: {m['torso']['note']}."]
    if "sync_note" in m:
        lines += ["", f"Lip-sync proxy: {m['sync_note']}."]
    if "sync_corr" in m:
        real = m.get("real_video", {})
        lines += ["", *sync_lines([("fine model", m), ("baseline: coarse", m["baselines"].get("coarse", {})),
                                   ("real video (tracked)", real)])]
        lines += ["", f"Lip-sync as a fraction of the real video's (best-lag correlations): "
                  f"{m.get('sync_fraction', float('nan')):.2f}. The proxy correlates the mouth opening read on the "
                  "frames with the opening a ridge regression predicts from the audio (gstalk.metrics.lipsync); "
                  "the best lag of the real video is its A/V offset."]
    lines += ["", "PSNR in dB; boxes from the ground truth's landmarks (mouth: 1.6 x mouth width; face: landmark box).",
              "LMD: mean distance of the 40 lip landmarks (mean-centred per frame) that MediaPipe reads on the render "
              "vs on the ground truth; blendshape MAE over jawOpen, mouthClose, mouthFunnel, mouthPucker, "
              "mouthLowerDown/UpperUp L/R.",
              f"Render speed during eval: {m['render_fps']:.1f} frames/s.", "",
              "![ground truth | coarse | fine | error x4](samples.png)", ""]
    plots = m.get("plots", {})
    if "psnr" in plots:
        lines += [f"![PSNR per test frame: fine model and baselines]({plots['psnr']})", ""]
    if "mouth" in plots:
        lines += [f"![mouth opening per frame: render, ground truth, predicted from the audio]({plots['mouth']})",
                  "", "Mouth opening: MediaPipe's inner-lip gap / face height on the renders and on the ground "
                  "truth, and the opening the lip-sync proxy predicts from the audio, each z-scored over the "
                  "split (frames where MediaPipe found no face are gaps).", ""]
    return "\n".join(lines)


CODE_ROW_NAMES = {"oracle": "fine model, tracked code (oracle)", "neutral": "fine model, neutral code"}


def report_rows(m: dict[str, Any], key: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The rows of the report's tables, named: the fine model (``m`` itself), its code rows
    (``m["codes"]``: tracked and neutral code) and the baselines (``m["baselines"]``), in that
    order; with ``key``, only the rows that hold it (metrics a row was not measured for, or
    metrics written before a key existed, leave the row out)."""
    rows = [("fine model", m)] + [(CODE_ROW_NAMES.get(k, f"fine model, {k} code"), v)
                                  for k, v in m.get("codes", {}).items()] \
        + [(f"baseline: {k}", v) for k, v in m["baselines"].items()]
    return rows if key is None else [(n, v) for n, v in rows if key in v]


def stability_lines(m: dict[str, Any]) -> list[str]:
    """Markdown lines of the sharpness and drift table (fine model, code rows, baselines), or
    none for metrics written before they were measured."""
    rows = report_rows(m, "sharpness_ratio")
    if not rows:
        return []
    lines = [""] + markdown_table(
        ["", "face sharpness (render / ground truth)", "PSNR trend along the split (dB)", "dB per second"],
        ([n, f"{v['sharpness_ratio']:.2f}", f"{v['psnr_trend_db']:+.2f}", f"{v['psnr_slope_db_per_s']:+.2f}"]
         for n, v in rows))
    lines += ["", "Sharpness: the variance of the Laplacian of the luma in the face box (no resampling), the "
              "renders' mean over the ground truth's (1 = as much fine detail as the footage). PSNR trend: the "
              "least-squares line through the per-frame PSNR, its change from the first to the last test frame "
              "(negative: the render drifts away from the ground truth along the split; psnr.png)."]
    return lines


def teeth_lines(m: dict[str, Any]) -> list[str]:
    """Markdown lines of the teeth and inner-mouth table (fine model, code rows, coarse
    baseline), or none for metrics written before they were measured."""
    rows = report_rows(m, "teeth_ratio")
    if not rows:
        return []
    lines = [""] + markdown_table(
        ["", "teeth shown (render / ground truth)", "teeth px per frame", "inner-mouth PSNR (dB)"],
        ([n, f"{v['teeth_ratio']:.2f}", f"{v['teeth_px']:.1f}", f"{v['inner_mouth_psnr']:.2f}"] for n, v in rows))
    truth = rows[0][1]  # the first row measured (its frames read): the ground truth's side
    lines += ["", f"Teeth: bright, unsaturated pixels inside the inner-lip landmarks (gstalk.metrics.teeth), "
              f"each frame's own; the ground truth shows {truth['teeth_px_truth']:.1f} per frame, in "
              f"{truth['teeth_frames_truth']:.0f} of the frames read. Inner-mouth PSNR: inside the ground "
              f"truth's inner lips ({truth['inner_mouth_px']:.0f} px per frame)."]
    return lines


def lmd_lines(m: dict[str, Any]) -> list[str]:
    """Markdown lines of the LMD table: one row per model and landmark detector, naming the
    detector (MediaPipe always; FAN when ``lmd_fan`` was measured)."""
    cells = []
    for name, v in report_rows(m, "lmd"):
        cells.append([name, "MediaPipe, 40 lip points", f"{v['lmd']:.2f}", f"{v['lmd_512']:.2f}", f"{v['aue']:.4f}",
                      f"{v['lip_frames']}"])
        if "lmd_fan" in v:
            cells.append([name, "FAN 2D-FAN-4, points 48-67", f"{v['lmd_fan']:.2f}", f"{v['lmd_fan_512']:.2f}", "–",
                          f"{v['lmd_fan_frames']}"])
    lines = [""] + markdown_table(["", "landmarks", "LMD (px)", "LMD at 512 px", "blendshape MAE (AUE analogue)",
                                   "frames read"], cells)
    if "lmd_fan" in m:
        fan = m.get("weights", {}).get("fan", {})
        lines += ["", "FAN rows: LMD the way ER-NeRF and TalkingGaussian compute it: FAN reads the render and the "
                  "ground-truth frame (boxes from MediaPipe; integer landmarks as face-alignment returns them), "
                  "each mouth (points 48-67) is mean-centred, the mean point distance is averaged over the frames. "
                  f"Weights: {fan.get('path', '?')} ("
                  + ("the public 2D-FAN-4 archive" if fan.get("public_archive") else
                     "not the public 2D-FAN-4 archive: numbers may differ from the papers' detector")
                  + f"); boxes MediaPipe missed (ground-truth box used): {m.get('lmd_fan_box_fallbacks', 0)}."]
    return lines


def metrics_table(m: dict[str, Any]) -> Any:
    """The eval metrics as a rich Table: the fine model and the baselines (what ``gstalk eval``
    and ``gstalk run`` print)."""
    from rich.table import Table

    t = Table(title=f"gstalk eval: {m['n_frames']} test frames")
    t.add_column("")
    cols = (*KEYS, "lmd", *[k for k in ("lmd_fan",) if k in m], "aue",
            *[k for k in ("lpips", "lse_c", "lse_d") if k in m])
    for k in cols:
        t.add_column(k, justify="right")

    def cell(v: dict[str, Any], k: str) -> str:
        if k not in v:
            return "–"
        return f"{v[k]:.4f}" if "ssim" in k or k in ("aue", "lpips") else f"{v[k]:.2f}"

    for name, v in [("fine model", m)] + [(f"baseline: {k}", b) for k, b in m["baselines"].items()]:
        t.add_row(name, *[cell(v, k) for k in cols])
    return t


GATE_KEYS = (*KEYS, "render_fps", "sharpness_ratio", "psnr_trend_db")


def parse_thresholds(items: list[str]) -> dict[str, float]:
    """``["psnr=30", "mouth_psnr=25"]`` -> {"psnr": 30.0, "mouth_psnr": 25.0}.

    Raises:
        UsageError: not METRIC=NUMBER, or an unknown metric (the message lists the known ones).
    """
    from gstalk.errors import UsageError

    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or number is None:
            raise UsageError(f"--fail-under expects METRIC=VALUE, got '{item}'.", hint="e.g. --fail-under psnr=30")
        if key not in GATE_KEYS:
            raise UsageError(f"Unknown metric '{key}' in --fail-under.", hint=f"use one of: {', '.join(GATE_KEYS)}")
        out[key] = number
    return out


def check_thresholds(metrics: dict[str, Any], gates: dict[str, float]) -> None:
    """Raise :class:`~gstalk.errors.QualityError` (exit 10) naming every metric of the fine
    model below its threshold in ``gates``."""
    from gstalk.errors import QualityError

    low = [f"{k} {float(metrics[k]):.3f} < {v:g}" for k, v in gates.items() if float(metrics[k]) < v]
    if low:
        raise QualityError(f"Quality gate failed for {metrics.get('workspace', 'the workspace')}: {'; '.join(low)}.",
                           hint="see eval/samples.png and eval/report.md")
