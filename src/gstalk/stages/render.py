"""Stage 5, ``gstalk render``: speech audio -> lip-synced H.264 video of the trained person.

New audio goes through the same feature extractor as the training audio (normalised with
the training statistics); the video has exactly ``round(duration · fps)`` frames and the
input audio is muxed from t = 0. Head poses walk the training sequence back and forth
(``loop``) or hold the most frontal training pose (``still``; blinks still follow the
training sequence). Without ``--audio`` the test split is re-rendered with its own audio (A/V
offset applied, as in training), which is what ``eval`` compares with the ground truth.

Writes ``ws/renders/NAME.mp4`` (or the ``-o`` path) and records the render in the manifest
under ``renders``. An avatar bundle (``NAME.gstalk``, :mod:`gstalk.bundle`) renders the same
way, read-only: the video goes to ``-o`` (default ``AUDIO_STEM.mp4`` in the current folder).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gstalk.audio import frame_windows
from gstalk.avatar import Avatar, is_bundle_path, load_avatar
from gstalk.config import RenderConfig, check_articulation_gain, with_options
from gstalk.dataset import load_audio, load_audio_features, read_speech, speech_windows
from gstalk.errors import InputError, UsageError
from gstalk.media import VideoWriter, write_wav
from gstalk.progress import SILENT, Reporter
from gstalk.render.backdrop import PngSequenceWriter, parse_backdrop
from gstalk.render.driver import HeadRenderer, auto_blinks, frontal_frame, loop_poses
from gstalk.workspace import RENDERS, Workspace, now_iso

POSE_STRATEGIES = ("loop", "still")
BLINKS = ("video", "auto")


def run_render(workspace: str | Path | Avatar, audio: str | Path | None = None, output: str | Path | None = None,
               cfg: RenderConfig | None = None, *, reporter: Reporter = SILENT, **options: Any) -> dict[str, Any]:
    """Render a video, on ``cfg.device`` (frames come back to the CPU only to be encoded).

    Args:
        workspace: what to render: a workspace whose fine stage is done, an avatar bundle
            (``NAME.gstalk`` or an unpacked bundle folder, :mod:`gstalk.bundle`), or an
            :class:`~gstalk.avatar.Avatar` already in memory (``gstalk batch``). Only a
            workspace is locked while rendering and records the render in its manifest.
        audio: speech file (any format ffmpeg reads), ``"-"`` to read it from standard input,
            or None for the test split (a workspace only: a bundle holds no training audio).
        output: the .mp4 to write; default ``ws/renders/<audio stem or 'test'>.mp4``
            (for a bundle or an Avatar: ``<audio stem>.mp4`` in the current folder). Written
            atomically: a temporary file beside it, renamed when complete.
        cfg: :class:`~gstalk.config.RenderConfig` (default: its defaults); ``options``:
            fields of it to change (``pose="still"``; ``backend`` is ``raster``'s older name).
            Its fields:
        pose: head pose strategy: ``loop``, ``still``, or a pose file / workspace (see
            :func:`gstalk.render.poses.read_pose_file`), played back and forth, with the
            background, torso and blinks of ``still``.
        background: ``plate`` (the video's background plate), a colour or an image (see
            :func:`gstalk.render.backdrop.parse_backdrop`).
        alpha: write RGBA PNG frames (head and torso, transparent elsewhere) and the audio
            into a folder (``output``, default ``ws/renders/<name>_rgba/``) instead of an mp4.
        size: output width/height in pixels (even; default the trained size): the Gaussians are
            re-projected, the background resized (see :class:`HeadRenderer`).
        blink: ``video`` (the eye blinks of the pose frames of the training video) or ``auto``
            (natural blinks generated at random: :func:`gstalk.render.driver.auto_blinks`).
        raster: rasterizer backend; device: ``auto``, ``cpu``, ``cuda[:N]``.
        articulation_gain: scale of the predicted mouth articulation code (None:
            :data:`~gstalk.config.DEFAULT_ARTICULATION_GAIN`); must be in (0, 5].

    Returns:
        Summary: output path, frames, duration_s, fps (rendering speed), realtime_factor,
        peak_rss_mb (this process's peak resident memory so far, MiB; ffmpeg not included).

    Raises:
        WorkspaceError: fine missing or stale. InputError: unreadable or empty audio, or a
        damaged, foreign or newer bundle. UsageError: a pose file that is missing or invalid,
        a bad option, or no audio for a bundle. DependencyError: a device or rasterizer that
        cannot run here.
    """
    from gstalk.device import stage_device

    t0 = time.perf_counter()
    cfg = with_options(RenderConfig, cfg, options, "render")
    pose, background, alpha, size, blink = cfg.pose, cfg.background, cfg.alpha, cfg.size, cfg.blink
    backend, articulation_gain = cfg.raster, cfg.articulation_gain
    device = stage_device(cfg.device, backend)
    ws: Workspace | None = None
    avatar: Avatar | None = workspace if isinstance(workspace, Avatar) else None
    if avatar is None:
        assert not isinstance(workspace, Avatar)
        if is_bundle_path(workspace):
            avatar = load_avatar(workspace)
        else:
            ws = Workspace.open(workspace)
            ws.require("render")
    if ws is None and audio is None:
        raise UsageError("An avatar bundle holds no training audio to re-render the test split with.",
                         hint="give the speech to say: --audio SPEECH.wav")
    pose_track = None
    if pose not in POSE_STRATEGIES:
        from gstalk.render.poses import read_pose_file

        pose_track = read_pose_file(pose)
    if size is not None and (size % 2 or not 32 <= size <= 4096):
        raise UsageError(f"--size {size} must be an even number of pixels between 32 and 4096.",
                         hint="H.264 (yuv420p) needs even sizes, e.g. --size 512")
    if blink not in BLINKS:
        raise UsageError(f"Unknown --blink '{blink}'.", hint="use video or auto")
    if articulation_gain is not None:  # a bad gain is refused before any work; None: the model's default
        check_articulation_gain(articulation_gain)
    if ws is not None:
        ex = ws.stage("extract")
        fps, size0 = float(ex.summary["fps"]), int(ex.summary["size"])  # square frames
    else:
        assert avatar is not None
        fps, size0 = avatar.fps, avatar.size
    backdrop = parse_backdrop(background, size0, size0)  # refuse a bad one before any work
    if alpha and output is not None and str(output) == "-":
        raise UsageError("--alpha writes a folder of PNG frames, not a stream.", hint="give -o FOLDER")
    if ws is not None:
        avatar = Avatar.from_workspace(ws)
    assert avatar is not None
    train, test = avatar.train, avatar.test
    name = "test" if audio is None else "stdin" if str(audio) == "-" else Path(audio).stem
    default_name = f"{name}_rgba" if alpha else f"{name}.mp4"
    if output is not None:
        out_path = Path(output)
    else:
        out_path = ws.path(RENDERS) / default_name if ws is not None else Path(default_name)
    # the scratch folder lies beside the output, so the finished file is renamed into place
    scratch = ws.path(RENDERS) if ws is not None and output is None else \
        out_path.resolve().parent if str(out_path) != "-" else None
    with (ws.lock("render") if ws is not None else contextlib.nullcontext()), _scratch(scratch) as tmp:
        if audio is None:
            assert ws is not None
            af = load_audio_features(ws)
            n_all = int(ex.summary["n_frames"])
            offset = int(avatar.meta.get("av_offset_frames", 0))
            windows = frame_windows(af.steps, n_all, fps, af.steps_per_second, af.window, offset)[list(test)]
            poses = list(test)
            sr = int(ex.summary["audio"]["sample_rate"])
            samples, _ = load_audio(ws)
            seg = samples[int(round(test.start / fps * sr)):int(round(test.stop / fps * sr))]
            mux = Path(tmp) / "audio.wav"
            write_wav(mux, seg, sr)
            duration = len(test) / fps
        else:
            if str(audio) == "-":  # `--audio -`: the audio file arrives on standard input
                import sys

                audio = Path(tmp) / "stdin_audio"
                with open(audio, "wb") as f:
                    shutil.copyfileobj(sys.stdin.buffer, f)
            samples, rate = read_speech(avatar.audio, audio)
            duration = samples.size / rate
            windows = speech_windows(avatar.audio, samples, rate)
            del samples  # 4 bytes a sample (an hour: 230 MB); ffmpeg muxes the audio from the file
            poses = loop_poses(len(windows), train)
            mux = Path(audio)
        if len(poses) == 0:
            raise InputError(f"{audio} is too short for one video frame: {1000 * duration:.0f} ms of audio, and a "
                             f"frame at {fps:g} fps needs at least {500 / fps:.0f} ms.",
                             hint="give a longer speech file", path=audio)
        blinks, viewmats = None, None
        if pose != "loop":  # hold the most frontal training pose; blink as the training sequence does
            blinks = [float(avatar.blink[f]) for f in poses]
            poses = [frontal_frame(avatar.viewmats, train)] * len(poses)
        if blink == "auto":
            blinks = auto_blinks(len(poses), fps, seed=avatar.seed)
        if pose_track is not None:  # the head follows the file's poses, back and forth
            from gstalk.render.poses import ping_pong

            viewmats = pose_track[ping_pong(len(poses), len(pose_track))]
        renderer = HeadRenderer(avatar, backend=backend, backdrop=backdrop, alpha=alpha, size=size,
                                articulation_gain=articulation_gain, device=device)
        t = time.perf_counter()
        tmp_out = (Path(tmp) / ("out" if alpha else "out.mp4")) if str(out_path) != "-" else None
        writer_cm = PngSequenceWriter(tmp_out, audio_path=mux) if alpha and tmp_out is not None else \
            VideoWriter(tmp_out if tmp_out else "-", renderer.width, renderer.height, fps, audio_path=mux)
        with writer_cm as writer, reporter.task("render", len(poses)) as bar:
            for k, frame in enumerate(renderer.frames(windows, poses, blinks, viewmats)):
                writer.write(frame)
                bar.advance()
                if k % 10 == 0:
                    el = time.perf_counter() - t
                    bar.update(info=f"{(k + 1) / max(el, 1e-9):.1f} frames/s")
        render_s = time.perf_counter() - t
        if tmp_out is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            if alpha and out_path.exists():
                shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
            shutil.move(str(tmp_out), str(out_path))  # a rename when on the same filesystem
    total = time.perf_counter() - t0
    import resource

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
    summary = {"output": str(out_path), "frames": len(poses), "duration_s": duration, "peak_rss_mb": peak_rss_mb,
               "fps": len(poses) / max(render_s, 1e-9), "realtime_factor": duration / max(total, 1e-9),
               "seconds": total, "render_seconds": render_s, "audio": str(audio) if audio else "test split",
               "pose": pose if pose_track is None else str(pose), "background": background, "alpha": alpha,
               "size": renderer.width, "blink": blink, "articulation_gain": renderer.articulation_gain,
               "backend": backend, "device": str(device), "finished": now_iso()}
    if ws is not None:
        _record(ws, name, summary)
    else:
        summary["avatar"] = avatar.name
    return summary


@contextlib.contextmanager
def _scratch(folder: Path | None) -> Iterator[Path]:
    """A temporary folder inside ``folder`` (on the output's filesystem, so the finished
    file is renamed into place; None: the system's temporary folder). ``folder`` is created
    when missing and removed again if it is still empty at the end, so a refused render
    leaves the workspace as it was."""
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="gstalk-render-") as tmp:
            yield Path(tmp)
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        # named with the host and pid, so `gstalk batch` can remove what a killed render left
        with tempfile.TemporaryDirectory(dir=folder, prefix=f".tmp-render-{socket.gethostname()}-{os.getpid()}-") \
                as tmp:
            yield Path(tmp)
    finally:
        if made:
            with contextlib.suppress(OSError):  # not empty: it holds the render
                folder.rmdir()


def _record(ws: Workspace, name: str, summary: dict[str, Any]) -> None:
    with ws.lock("render"):
        ws.load()
        ws.manifest.setdefault("renders", {})[name] = summary
        ws.save()
