"""``gstalk bench render``: how fast a trained workspace renders, step by step.

Steps, each timed separately on the same frames after a warm-up:

- ``features``: MFCC of the audio and the per-frame windows (once for the clip, per frame);
- ``conditions``: the audio -> articulation regressor over the clip (once, per frame);
- ``background``: the torso over the background plate: the torso field splatted for the
  pose (or, without one, the pose frame's torso read from disk), timed in line here;
  ``gstalk render`` makes it on a worker thread a few frames ahead, overlapping the rest;
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

from gstalk.avatar import Avatar
from gstalk.dataset import load_audio, speech_windows
from gstalk.media import VideoWriter
from gstalk.render.driver import HeadRenderer, loop_poses
from gstalk.workspace import Workspace


def bench_render(workspace: str | Path, *, frames: int = 100, warmup: int = 10, backend: str = "auto",
                 size: int | None = None, device: str = "auto") -> dict[str, Any]:
    """Time ``frames`` frames of a trained workspace driven by its own audio (``size``: output
    pixels when not the trained size, as ``render --size``: the Gaussians re-projected), on
    ``device`` (``auto``, ``cpu``, ``cuda[:N]``; on CUDA each step is timed after the GPU's
    queued work, and the frame's copy to the CPU counts in ``composite``).

    Returns:
        {"frames", "size", "backend", "ms_per_frame": {step: ms}, "render_fps_median",
        "render_fps_p10", "end_to_end_fps", "n_gaussians"}.

    Raises:
        WorkspaceError: the fine stage is missing or stale. UsageError / DependencyError: a
        device or rasterizer that cannot run here.
    """
    from gstalk.device import describe, stage_device

    ws = Workspace.open(workspace)
    ws.require("render")
    dev = stage_device(device, backend)
    ex = ws.stage("extract")
    fps = float(ex.summary["fps"])
    avatar = Avatar.from_workspace(ws)
    params, train = avatar.params, avatar.train
    samples, sr = load_audio(ws)
    n = min(frames + warmup, int(ex.summary["n_frames"]))
    samples = samples[: int(round(n / fps * sr))]

    ms: dict[str, float] = {}
    t = time.perf_counter()
    windows = speech_windows(avatar.audio, samples, sr)
    ms["features"] = (time.perf_counter() - t) * 1000 / n
    renderer = HeadRenderer(avatar, backend=backend, size=size, device=dev)
    t = time.perf_counter()
    cond = renderer.conditions(windows)
    ms["conditions"] = (time.perf_counter() - t) * 1000 / n
    poses = loop_poses(n, train)

    per: dict[str, list[float]] = {}
    out = []
    for i in range(n):
        img = renderer.render_on_device(renderer.head.windows(cond, i), poses[i], timings=per if i >= warmup else None)
        if i >= warmup:  # the conversion to uint8 (and the copy to the CPU) belongs to the composite step
            t = time.perf_counter()
            out.append((img * 255.0).round().to(torch.uint8).cpu().numpy())
            per["composite"][-1] += time.perf_counter() - t
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
        "threads": torch.get_num_threads(), "device": describe(dev),
    }


def bench_table(r: dict[str, Any]) -> Any:
    """:func:`bench_render`'s result as a rich Table (what ``gstalk bench render`` prints)."""
    from rich.table import Table

    t = Table(title=f"gstalk bench render: {r['frames']} frames at {r['size'][0]}x{r['size'][1]}, "
                    f"{r['n_gaussians']} Gaussians, {r['device']}, {r['threads']} threads")
    t.add_column("step")
    t.add_column("ms / frame", justify="right")
    for k, v in r["ms_per_frame"].items():
        t.add_row(k, f"{v:.2f}")
    t.add_row("render FPS (median / p10)", f"{r['render_fps_median']:.1f} / {r['render_fps_p10']:.1f}")
    t.add_row("end-to-end FPS", f"{r['end_to_end_fps']:.1f}")
    return t
