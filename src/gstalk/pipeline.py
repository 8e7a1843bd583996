"""The stage sequence, in one place: what ``gstalk run`` does, and the evals ``eval --compare``
needs first.

Stages never import each other; this module is the one that knows their order
(extract → track → coarse → fine → render → eval, :data:`SEQUENCE`), so the CLI calls it
instead of chaining the stages itself::

    gstalk run VIDEO ──► run_all ──► run_extract, run_track, run_coarse, run_fine, run_render, run_eval
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from gstalk.progress import SILENT, Reporter

SEQUENCE = ("extract", "track", "coarse", "fine", "render", "eval")


def run_all(video: str | Path, workspace: str | Path | None = None, *, preset: str = "cpu-quick",
            audio: str | Path | None = None, output: str | Path | None = None, seed: int = 0,
            detector: str | None = None, fan_weights: str | Path | None = None, raster: str = "auto",
            device: str = "auto", size: int | str = "auto", speech: str | Path | None = None,
            plate: str | None = None, reporter: Reporter = SILENT) -> dict[str, Any]:
    """Run every stage of :data:`SEQUENCE` on ``video`` with the preset ``preset``.

    Args:
        workspace: the workspace folder (default ``VIDEO_STEM_ws``).
        audio, output: what render says at the end and where it writes it (default: the
            test split with its own audio, ``ws/renders/test.mp4``).
        detector, fan_weights: the track stage's landmark detector (``fan`` also makes eval
            measure FAN's LMD).
        raster, device: the rasterizer backend and device of coarse, fine, render and eval
            (``auto``: CUDA with gsplat when there is a GPU, else the C++ CPU backend).
        size: the working size in pixels, or ``auto``: twice the preset's when the face in the
            video is large enough and the measured cost fits the preset's time budget on this
            device (:func:`gstalk.budget.choose_size`), else the preset's.
        speech: the speaker's voice in a separate file, for a video without it
            (:func:`~gstalk.stages.extract.run_extract`).
        plate: the track stage's background plate statistic (``mean`` or ``median``;
            default the preset's).

    Returns:
        {"workspace", "video" (the render), "seconds" (per stage), "metrics" (eval's), "device", "preset",
        "size", "size_reason"}.

    Raises:
        Whatever the stages raise; a bad device, rasterizer, plate statistic or FAN weights
        file before anything is extracted.
    """
    from gstalk.config import EvalConfig, RenderConfig, get_preset, override
    from gstalk.device import stage_device
    from gstalk.stages.coarse import run_coarse
    from gstalk.stages.evaluate import run_eval
    from gstalk.stages.extract import run_extract
    from gstalk.stages.fine import run_fine
    from gstalk.stages.render import run_render
    from gstalk.stages.track import load_detector_model, run_track

    p = get_preset(preset)
    track_cfg = override(p.track, detector=detector, fan_weights=str(fan_weights) if fan_weights else None,
                         plate=plate)  # a --plate that is not one of its choices: UsageError
    load_detector_model(track_cfg)  # refuse missing or bad FAN weights before extracting anything
    dev = str(stage_device(device, raster))  # and a device or rasterizer that cannot run here
    times: dict[str, float] = {}
    t = time.perf_counter()
    extract_cfg, reason = working_size(video, p.extract, p.name, dev, size)
    if extract_cfg.size != p.extract.size:  # the track stage's smallest face scales with the frames
        track_cfg = dataclasses.replace(track_cfg,
                                        min_face_px=track_cfg.min_face_px * extract_cfg.size / p.extract.size)
    reporter.log(f"[bold]run[/bold] {extract_cfg.size} px: {reason}")
    ws = run_extract(video, workspace, extract_cfg, preset=p.name, seed=seed, speech=speech, reporter=reporter)
    times["extract"] = time.perf_counter() - t
    root = str(ws.root)
    for name, fn in (("track", lambda: run_track(root, track_cfg, reporter=reporter)),
                     ("coarse", lambda: run_coarse(root, override(p.coarse, raster=raster, device=dev),
                                                   reporter=reporter)),
                     ("fine", lambda: run_fine(root, override(p.fine, raster=raster, device=dev), reporter=reporter))):
        t = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t
    t = time.perf_counter()
    r = run_render(root, audio, output, RenderConfig(raster=raster, device=dev), reporter=reporter)
    times["render"] = time.perf_counter() - t
    t = time.perf_counter()
    m = run_eval(root, EvalConfig(raster=raster, device=dev, lmd_landmarks=track_cfg.detector,  # type: ignore[arg-type]
                                  fan_weights=track_cfg.fan_weights), reporter=reporter)
    times["eval"] = time.perf_counter() - t
    return {"workspace": root, "video": r["output"], "seconds": times, "metrics": m, "device": dev, "preset": p.name,
            "size": extract_cfg.size, "size_reason": reason}


def working_size(video: str | Path, cfg: Any, preset: str, device: str, size: int | str) -> tuple[Any, str]:
    """The extract config ``run`` uses: ``cfg`` (an :class:`~gstalk.config.ExtractConfig`)
    at ``size`` px, or with ``size="auto"`` at the size :func:`gstalk.budget.choose_size`
    picks from the video's face crop, the preset's budget and ``device``; and why (a sentence).

    Raises:
        UsageError: a size that is not ``auto`` or an even number of pixels from 64 to 2048.
    """
    import torch

    from gstalk.budget import RUN_BUDGET_S, choose_size
    from gstalk.errors import UsageError
    from gstalk.stages.extract import source_crop_side

    if size != "auto":
        try:
            px = int(size)
        except (TypeError, ValueError):
            px = -1
        if px < 64 or px > 2048 or px % 2:
            raise UsageError(f"--size {size} is not a working size.", hint="give auto, or an even number of pixels "
                                                                        "from 64 to 2048 (e.g. 256 or 512)")
        return dataclasses.replace(cfg, size=px), "set with --size"
    if RUN_BUDGET_S.get(preset) is None:  # no budget: no need to look at the face
        return cfg, f"the {preset} preset's own size"
    side = source_crop_side(video, cfg)
    if side is None:  # no face: extract says why
        return cfg, "the preset's size"
    choice = choose_size(side, cfg.size, preset, torch.device(device).type)
    return dataclasses.replace(cfg, size=choice.size), choice.reason


def evaluate_stale(paths: list[Path], *, raster: str = "auto", device: str = "auto",
                   reporter: Reporter = SILENT) -> list[Path]:
    """Evaluate each workspace of ``paths`` that has no current eval
    (:func:`gstalk.stages.compare.needs_eval`): what ``eval --compare`` does before its table.

    Returns:
        The workspaces that were evaluated.
    """
    from gstalk.config import EvalConfig
    from gstalk.stages.compare import needs_eval
    from gstalk.stages.evaluate import run_eval

    done = []
    for p in paths:
        if needs_eval(p):
            reporter.log(f"evaluating {p} (no eval of its current model)")
            run_eval(p, EvalConfig(raster=raster, device=device), reporter=reporter)
            done.append(p)
    return done
