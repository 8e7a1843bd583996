"""Stage 6, ``gstalk eval``: self-driven quality on the held-out test frames.

Renders the test split (the last 1/11 of the frames, never trained on) with its own audio
and poses, and compares it with the ground truth: PSNR and SSIM of the full frame, the face
box and the mouth box, next to two baselines computed the same way: the mean training
frame, and the coarse (static, audio-free) Gaussians composited like the model.

Writes ``ws/eval/metrics.json`` (versioned), ``ws/eval/report.md`` and
``ws/eval/samples.png`` (ground truth | coarse | fine | error of a few test frames).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from gstalk import __version__
from gstalk.audio import frame_windows
from gstalk.dataset import (
    build_frameset,
    load_audio,
    load_audio_features,
    load_fine_model,
    load_frame,
    load_tracks,
    split_indices,
)
from gstalk.deform.audio import neighbour_indices
from gstalk.gaussians.splat import composite, splat
from gstalk.images import to_uint8, write_png
from gstalk.metrics.image import image_metrics
from gstalk.progress import SILENT, Reporter
from gstalk.render.driver import HeadRenderer
from gstalk.tensorio import load_tensors
from gstalk.workspace import Workspace, atomic_write, now_iso, write_json

METRICS_SCHEMA = 1
MIN_SYNC_FRAMES = 100  # shorter series give spurious lip-sync correlations (a static model scored 0.7 on 45)
KEYS = ("psnr", "ssim", "face_psnr", "face_ssim", "mouth_psnr", "mouth_ssim")


def mean_frame(ws: Workspace, frames: range) -> torch.Tensor:
    """Mean of the given frames: [H, W, 3] float32 in [0, 1]."""
    acc = None
    for i in frames:
        f = load_frame(ws, i).astype(np.float64)
        acc = f if acc is None else acc + f
    assert acc is not None
    return torch.from_numpy((acc / len(frames) / 255.0).astype(np.float32))


def run_eval(workspace: str, *, backend: str = "auto", reporter: Reporter = SILENT) -> dict[str, Any]:
    """Evaluate a workspace whose fine stage is done; returns the metrics dict.

    Raises:
        WorkspaceError: a stage is missing or stale.
    """
    t0 = time.perf_counter()
    ws = Workspace.open(workspace)
    ws.require("eval")
    train, test = split_indices(ws)
    reporter.log(f"[bold]eval[/bold] {len(test)} test frames (frames {test.start}-{test.stop - 1})")
    data = build_frameset(ws, test)
    gt = data.images.float() / 255.0
    tracks = load_tracks(ws)
    sel = torch.tensor(list(test))
    mouth_boxes, face_boxes = tracks.mouth_box[sel], tracks.face_box[sel]

    # the model, driven by the test audio (with the training A/V offset)
    params, model, meta = load_fine_model(ws)
    af = load_audio_features(ws)
    ex = ws.stage("extract").summary
    windows = frame_windows(af.steps, int(ex["n_frames"]), float(ex["fps"]), af.steps_per_second, af.window,
                            int(meta.get("av_offset_frames", 0)))
    renderer = HeadRenderer(ws, params, model, tracks, backend=backend)
    cond = renderer.conditions(windows)
    t = time.perf_counter()
    fine = []
    with reporter.task("rendering test frames", len(test)) as bar:
        for frame in test:
            ids = neighbour_indices(frame, model.smooth, cond.shape[0])
            fine.append(renderer.render(cond[ids], frame))
            bar.advance()
    fine_t = torch.stack(fine)
    render_fps = len(test) / max(time.perf_counter() - t, 1e-9)

    # baselines
    coarse_params, _ = load_tensors(ws.path("coarse", "gaussians.safetensors"))
    coarse = []
    with torch.no_grad():
        for i in range(len(data)):
            c, a, _ = splat(coarse_params, data.viewmats[i:i + 1], data.K, data.width, data.height, backend=backend)
            coarse.append(composite(c, a, data.background(i)).clamp(0, 1)[0])
    coarse_t = torch.stack(coarse)
    mean_t = mean_frame(ws, train)[None].expand_as(gt)

    results = {
        "model": image_metrics(fine_t, gt, mouth_boxes, face_boxes),
        "baselines": {
            "mean_frame": image_metrics(mean_t, gt, mouth_boxes, face_boxes),
            "coarse": image_metrics(coarse_t, gt, mouth_boxes, face_boxes),
        },
    }
    with reporter.task("landmarks of the renders", 2 * len(test)) as bar:
        results["model"].update(lip_metrics(fine_t, tracks, list(test), bar.advance))
        results["baselines"]["coarse"].update(lip_metrics(coarse_t, tracks, list(test), bar.advance))
    # mouth motion and the lip-sync proxy: the renders' mouth opening against the real video's
    # and against the opening the audio predicts
    from gstalk.metrics.lipsync import fill_nan
    from gstalk.tracking.avsync import mouth_opening

    real_open = mouth_opening(tracks.landmarks[sel].numpy())
    for v in (results["model"], results["baselines"]["coarse"]):
        o = fill_nan(v["_opening"])
        v["mouth_motion"] = float(o.std() / max(real_open.std(), 1e-9))
    if len(test) >= MIN_SYNC_FRAMES:
        from gstalk.metrics.lipsync import LipSyncProxy, sync_scores

        samples, rate = load_audio(ws)
        predicted = LipSyncProxy.load().predict(samples, rate, int(ex["n_frames"]), float(ex["fps"]))[list(test)]
        for v in (results["model"], results["baselines"]["coarse"]):
            v.update(sync_scores(v["_opening"], predicted))
        real = sync_scores(real_open, predicted)
        results["model"]["real_video"] = real
        results["model"]["sync_fraction"] = results["model"]["sync_corr"] / real["sync_corr_best"] \
            if real["sync_corr_best"] > 0.05 else float("nan")
    else:
        results["model"]["sync_note"] = (f"the test split ({len(test)} frames) is shorter than {MIN_SYNC_FRAMES} "
                                         "frames: too short for a correlation; see `gstalk eval --audio`")
    for v in (results["model"], results["baselines"]["coarse"]):
        v.pop("_opening")
    out = {
        "schema_version": METRICS_SCHEMA, "gstalk_version": __version__, "created": now_iso(),
        "workspace": str(ws.root), "split": {"test": [test.start, test.stop]}, "n_frames": len(test),
        **results["model"], "baselines": results["baselines"],
        "model_name": meta["spec"]["name"], "render_fps": render_fps,
        "training_seconds": {s: ws.stage(s).data.get("seconds") for s in ("extract", "track", "coarse", "fine")},
        "seconds": time.perf_counter() - t0,
    }
    d = ws.path("eval")
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "metrics.json", out)
    _samples(d / "samples.png", gt, coarse_t, fine_t)
    with atomic_write(d / "report.md", "w") as f:
        f.write(report_markdown(out))
    return out


def lip_metrics(renders: torch.Tensor, tracks: Any, frames: list[int],
                progress: Any = None) -> dict[str, Any]:
    """LMD and blendshape error of rendered frames against the tracked ground truth.

    MediaPipe (the track stage's detector, image mode) reads the renders [F, H, W, 3] float
    in [0, 1]; ``frames`` [F] are their workspace frame numbers. Frames where it finds no
    face are left out and counted.

    Returns:
        {"lmd": mouth LMD in px at the working size, "lmd_512": the same scaled to 512 px
        (the papers' resolution), "aue": mean blendshape MAE, "aue_parts": per blendshape,
        "lip_frames": frames measured, "_opening": [F] mouth opening of each render (NaN
        where no face was found; not JSON, popped by the caller)}.
    """
    from gstalk.metrics.landmarks import MOUTH_IDS, blendshape_error, lmd
    from gstalk.tracking.avsync import mouth_opening
    from gstalk.tracking.detector import MediaPipeDetector

    lms, bss, keep = [], [], []
    with MediaPipeDetector(video=False, num_faces=1) as det:
        for k, img in enumerate(renders):
            faces = det.detect(np.ascontiguousarray(to_uint8(img)))
            if faces:
                lms.append(faces[0].landmarks)
                bss.append(faces[0].blendshapes)
                keep.append(k)
            if progress is not None:
                progress()
    opening = np.full(len(renders), np.nan)
    if not keep:
        nan = float("nan")
        return {"lmd": nan, "lmd_512": nan, "aue": nan, "aue_parts": {}, "lip_frames": 0, "_opening": opening}
    opening[keep] = mouth_opening(np.stack(lms))
    sel = [frames[k] for k in keep]
    ids = list(MOUTH_IDS)
    d = lmd(np.stack(lms)[:, ids], tracks.landmarks[sel][:, ids].numpy())
    size = renders.shape[2]
    aue = blendshape_error(np.stack(bss), tracks.blendshapes[sel].numpy(), tracks.blendshape_names)
    return {"lmd": float(d.mean()), "lmd_512": float(d.mean() * 512.0 / size), "aue": aue.pop("mean"),
            "aue_parts": aue, "lip_frames": len(keep), "_opening": opening}


def _samples(path: Any, gt: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor, count: int = 4) -> None:
    idx = np.linspace(0, len(gt) - 1, min(count, len(gt))).round().astype(int)
    rows = []
    for i in idx:
        err = (fine[i] - gt[i]).abs().mean(-1, keepdim=True).mul(4).clamp(0, 1).expand(-1, -1, 3)
        rows.append(torch.cat([gt[i], coarse[i], fine[i], err], dim=1))
    write_png(path, to_uint8(torch.cat(rows, dim=0)))


def report_markdown(m: dict[str, Any]) -> str:
    """The eval report as Markdown (metrics table against the baselines)."""
    lines = [f"# gstalk eval: {m['workspace']}", "",
             f"Self-driven, {m['n_frames']} held-out test frames {m['split']['test'][0]}-{m['split']['test'][1] - 1}; "
             f"model `{m['model_name']}`; gstalk {m['gstalk_version']}, {m['created']}.", "",
             "| | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
    rows = [("fine model", m)] + [(f"baseline: {k}", v) for k, v in m["baselines"].items()]
    for name, v in rows:
        lines.append(f"| {name} | " + " | ".join(f"{v[k]:.4f}" if "ssim" in k else f"{v[k]:.2f}" for k in KEYS) + " |")
    lip = [("fine model", m)] + [(f"baseline: {k}", v) for k, v in m["baselines"].items() if "lmd" in v]
    lines += ["", "| | LMD (px) | LMD at 512 px | blendshape MAE (AUE analogue) | frames read |",
              "|---|---|---|---|---|"]
    lines += [f"| {name} | {v['lmd']:.2f} | {v['lmd_512']:.2f} | {v['aue']:.4f} | {v['lip_frames']} |"
              for name, v in lip]
    motion = [(n, v["mouth_motion"]) for n, v in [("fine model", m), ("coarse", m["baselines"].get("coarse", {}))]
              if "mouth_motion" in v]
    if motion:
        lines += ["", "Mouth motion (std of the mouth opening read on the renders / on the real frames): "
                  + ", ".join(f"{n} {x:.2f}" for n, x in motion) + "."]
    if "sync_note" in m:
        lines += ["", f"Lip-sync proxy: {m['sync_note']}."]
    if "sync_corr" in m:
        real = m.get("real_video", {})
        lines += ["", "| lip-sync proxy | corr at lag 0 | best lag (frames) | corr at best lag |", "|---|---|---|---|"]
        for name, v in [("fine model", m), ("baseline: coarse", m["baselines"].get("coarse", {})),
                        ("real video (tracked)", real)]:
            if "sync_corr" in v:
                lines.append(f"| {name} | {v['sync_corr']:.2f} | {v['sync_lag']:+d} | {v['sync_corr_best']:.2f} |")
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
    return "\n".join(lines)


GATE_KEYS = (*KEYS, "render_fps")


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
