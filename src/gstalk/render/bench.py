"""``gstalk bench render``: how fast a trained workspace renders, step by step.

Steps, each timed separately on the same frames after a warm-up:

- ``features``: MFCC of the audio and the per-frame windows (once for the clip, per frame);
- ``conditions``: the audio -> articulation regressor over the clip (once, per frame);
- ``background``: the pose frame's torso over the background plate (a disk read the first
  time a pose frame is used, then cached);
- ``deform``: audio code + deformation MLP + applying the offsets (per frame);
- ``raster``: projection, sorting and alpha compositing of the Gaussians (per frame);
- ``composite``: the head over its background, to uint8 (per frame);
- ``encode``: H.264 encoding of the frames (ffmpeg through a pipe, per frame).

Render-only FPS (background + deform + raster + composite) is reported as the median and the 10th
percentile over frames; end-to-end FPS adds features, conditions and encoding.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gstalk.audio import frame_windows, get_extractor, normalise
from gstalk.config import AudioFeatureConfig, from_dict
from gstalk.dataset import load_audio_features, load_fine_model, load_tracks, split_indices
from gstalk.deform.audio import neighbour_indices
from gstalk.deform.base import apply_deltas
from gstalk.gaussians.splat import composite, splat
from gstalk.media import VideoWriter
from gstalk.render.driver import HeadRenderer, loop_poses
from gstalk.workspace import Workspace


def bench_render(workspace: str | Path, *, frames: int = 100, warmup: int = 10, backend: str = "auto"
                 ) -> dict[str, Any]:
    """Time ``frames`` frames of a trained workspace driven by its own audio.

    Returns:
        {"frames", "size", "backend", "ms_per_frame": {step: ms}, "render_fps_median",
        "render_fps_p10", "end_to_end_fps", "n_gaussians"}.

    Raises:
        WorkspaceError: the fine stage is missing or stale.
    """
    import soundfile as sf

    ws = Workspace.open(workspace)
    ws.require("render")
    ex = ws.stage("extract")
    fps = float(ex.summary["fps"])
    params, model, _ = load_fine_model(ws)
    tracks = load_tracks(ws)
    af = load_audio_features(ws)
    train, _ = split_indices(ws)
    acfg = from_dict(AudioFeatureConfig, ex.config.get("audio", {}))
    samples, sr = sf.read(str(ws.path("extract", "audio.wav")), dtype="float32")
    n = min(frames + warmup, int(ex.summary["n_frames"]))
    samples = samples[: int(round(n / fps * sr))]

    ms: dict[str, float] = {}
    t = time.perf_counter()
    extractor = get_extractor(af.extractor, acfg)
    steps = normalise(extractor(samples, sr), af.mean, af.std)
    windows = frame_windows(steps, n, fps, extractor.steps_per_second, af.window, 0)
    ms["features"] = (time.perf_counter() - t) * 1000 / n
    renderer = HeadRenderer(ws, params, model, tracks, backend=backend)
    t = time.perf_counter()
    cond = renderer.conditions(windows)
    ms["conditions"] = (time.perf_counter() - t) * 1000 / n
    poses = loop_poses(n, train)

    per: dict[str, list[float]] = {"background": [], "deform": [], "raster": [], "composite": []}
    out = []
    with torch.no_grad():
        for i in range(n):
            ids = neighbour_indices(i, model.smooth, n)
            tb = time.perf_counter()
            bg = renderer.background(poses[i])  # the pose frame's torso over the plate (read once, then cached)
            t0 = time.perf_counter()
            code = model.encode_audio(cond[ids])[0]
            blink = torch.tensor([float(tracks.blink[poses[i]])])
            deformed = apply_deltas(params, model.deform(renderer.spatial, code, blink))
            t1 = time.perf_counter()
            colors, alphas, _ = splat(deformed, tracks.viewmats[poses[i]:poses[i] + 1], tracks.K, renderer.width,
                                      renderer.height, backend=backend)
            t2 = time.perf_counter()
            img = (composite(colors, alphas, bg).clamp(0, 1)[0].numpy() * 255.0).round().astype(np.uint8)
            t3 = time.perf_counter()
            if i >= warmup:
                per["background"].append(t0 - tb)
                per["deform"].append(t1 - t0)
                per["raster"].append(t2 - t1)
                per["composite"].append(t3 - t2)
                out.append(img)
    for k, v in per.items():
        ms[k] = float(np.mean(v) * 1000)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with VideoWriter(Path(tmp) / "bench.mp4", renderer.width, renderer.height, fps) as w:
            for img in out:
                w.write(img)
        ms["encode"] = (time.perf_counter() - t) * 1000 / max(len(out), 1)
    frame_s = sum(np.array(v) for v in per.values())
    fps_each = 1.0 / frame_s
    return {
        "workspace": str(ws.root), "frames": len(out), "size": [renderer.width, renderer.height],
        "backend": backend, "n_gaussians": int(params["means"].shape[0]),
        "ms_per_frame": {k: round(v, 3) for k, v in ms.items()},
        "render_fps_median": float(np.median(fps_each)), "render_fps_p10": float(np.percentile(fps_each, 10)),
        "end_to_end_fps": 1000.0 / sum(ms.values()),
        "threads": torch.get_num_threads(),
    }
