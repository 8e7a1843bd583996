"""The ``gstalk`` command line (typer): one command per stage, plus ``run``.

Results go to stdout (a workspace path, a video path, a metrics table or ``--json``);
progress and messages go to stderr, so commands chain in shell pipelines::

    gstalk extract video.mp4 | xargs gstalk track

Errors print one red line and exit with the code of their class (``gstalk.errors``;
``docs/troubleshooting.md``); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from gstalk import __version__
from gstalk.config import BASIS_ARTICULATION_GAIN, DEFAULT_ARTICULATION_GAIN
from gstalk.errors import EXIT_CODES, GstalkError

app = typer.Typer(
    name="gstalk",
    help="Learn a talking head from one video of a speaker, then render any speech as a lip-synced video "
         "(3D Gaussian Splatting; CPU or GPU).\n\nStages: extract -> track -> coarse -> fine -> render -> eval, "
         "each reading and writing a workspace folder. `gstalk run VIDEO` does them all.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only results and warnings (no progress).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Raster = Annotated[str, typer.Option("--raster", help="Rasterizer backend: auto (the C++ cpu backend on the CPU, "
                                                      "gsplat on CUDA), cpu, torch, gsplat or inria.")]
Device = Annotated[str, typer.Option("--device", help="Where to compute: auto (CUDA when torch sees a GPU and the "
                                                      "rasterizer draws there, else the CPU), cpu, cuda or cuda:N.")]
Preset = Annotated[Optional[str], typer.Option(
    "--preset", help="cpu-quick (256 px, minutes on a CPU), cpu-long (256 px, the papers' fine architecture, "
                     "about an hour per model on a CPU), paper (512 px, the papers' iterations) or test. "
                     "Default: the preset the workspace was extracted with.")]
Detector = Annotated[Optional[str], typer.Option(
    "--detector", help="Landmark detector: mediapipe (478 points + 52 blendshapes, model shipped; the default) or "
                       "fan (face-alignment's 2D-FAN-4: 68 points in MediaPipe's face boxes, no blendshapes; needs "
                       "--fan-weights).", show_default=False)]
Speech = Annotated[Optional[Path], typer.Option(
    "--speech", help="The speaker's voice in a separate file (wav, mp3, flac, or a video with the sound), for a "
                     "training video without it or with another track. It must start with the video's first frame "
                     "and last as long.", show_default=False)]
Plate = Annotated[Optional[str], typer.Option(
    "--plate", help="Background plate, per pixel over the training frames where the person is not: mean (the "
                    "default: least squares, so the best PSNR against new frames; a moving curtain becomes its "
                    "average) or median (one of its states; robust where the person mask misses an arm).",
    show_default=False)]
FanWeights = Annotated[Optional[Path], typer.Option(
    "--fan-weights", help="FAN's weights: face-alignment's TorchScript archive 2DFAN4-cd938726ad.zip, a file you "
                          "download yourself (docs/methods.md; gstalk downloads nothing, never unpickles, and loads "
                          "only a file you name). Default: $GSTALK_FAN_WEIGHTS.", show_default=False)]
ArticulationGain = Annotated[Optional[float], typer.Option(
    "--articulation-gain", help="How much the mouth moves with the speech: the predicted mouth articulation code is "
                                "scaled by this (1 = as calibrated on the training frames; >1 more, <1 less; like "
                                f"GeneFace++'s mouth amplitude). Default, measured (docs/methods.md): "
                                f"{BASIS_ARTICULATION_GAIN:g} for a model that carries the coarse articulation basis "
                                f"(fine models trained with articulation_basis=coarse), "
                                f"{DEFAULT_ARTICULATION_GAIN:g} for others.",
    show_default=False)]
WorkspaceArg = Annotated[Optional[Path], typer.Argument(
    help="Workspace folder (default: the current folder, or the one workspace inside it).", show_default=False)]


def _reporter(quiet: bool):  # type: ignore[no-untyped-def]
    from gstalk.progress import Reporter

    return Reporter(quiet=quiet)


def _fail(exc: BaseException, debug: bool) -> None:
    from rich.console import Console

    err = Console(stderr=True, highlight=False)
    if isinstance(exc, GstalkError):
        if debug:
            err.print_exception()
        from rich.markup import escape

        hint = f" [dim]Fix: {escape(exc.hint)}[/dim]" if exc.hint else ""
        err.print(f"[bold red]error:[/bold red] {escape(exc.message)}{hint}", soft_wrap=True)
        _notes(err, exc)
        raise typer.Exit(exc.exit_code)
    if isinstance(exc, OSError) and not isinstance(exc, GstalkError):
        from gstalk.errors import resource_error

        res = resource_error(exc)  # disk full / not writable, raised outside the workspace's own writes
        if res is not None:
            if debug:
                err.print_exception()
            res.__notes__ = list(getattr(exc, "__notes__", []))
            _fail(res, False)
    if isinstance(exc, KeyboardInterrupt):
        err.print("[yellow]interrupted[/yellow]: the workspace keeps its last complete state; re-run to continue.")
        _notes(err, exc)
        raise typer.Exit(130)
    raise exc


def _notes(err: Any, exc: BaseException) -> None:
    """Print the notes a stage added to an error (e.g. that the earlier run was kept)."""
    from rich.markup import escape

    for note in getattr(exc, "__notes__", []):
        err.print(f"[dim]note:[/dim] {escape(note)}", soft_wrap=True)


@contextlib.contextmanager
def _guard(debug: bool) -> Iterator[None]:
    """Turn a GstalkError (or Ctrl-C) into one red line and its exit code."""
    try:
        yield
    except (typer.Exit, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - re-raised unless it is ours
        _fail(exc, debug)


def _workspace(ws: Path | None) -> Path:
    """The workspace folder: ``ws`` itself, the one workspace inside it, or (None) the
    current folder / the one workspace inside it."""
    from gstalk.workspace import MANIFEST, find_workspace

    if ws is None:
        return find_workspace()
    if ws.is_dir() and not (ws / MANIFEST).exists():
        return find_workspace(ws)
    return ws


def _preset(name: str | None, ws_root: Path | None = None):  # type: ignore[no-untyped-def]
    from gstalk.config import get_preset
    from gstalk.workspace import Workspace

    if name is None and ws_root is not None:
        name = Workspace.open(ws_root).preset
    return get_preset(name or "cpu-quick")


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _version(value: bool) -> None:
    if value:
        print(f"gstalk {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """gstalk: audio-driven talking heads with 3D Gaussian Splatting."""


# ---------------------------------------------------------------------------- extract
@app.command()
def extract(
    video: Annotated[Path, typer.Argument(help="Training video: one speaker facing the camera, with speech, "
                                               "3-5 minutes for a good model (any format ffmpeg reads).")],
    workspace: Annotated[Optional[Path], typer.Option(
        "--workspace", "-w", help="Workspace folder to create (default: VIDEO_STEM_ws).")] = None,
    preset: Preset = None,
    size: Annotated[Optional[int], typer.Option(help="Working resolution in pixels (default from the preset: "
                                                     "256 for cpu-quick, 512 for paper).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed recorded for all later stages.")] = 0,
    speech: Speech = None,
    audio_features: Annotated[Optional[str], typer.Option(
        "--audio-features", help="Audio front end: fbank+phones (default: log mel filter-banks normalised per "
                                 "utterance, and PocketSphinx viseme posteriors), fbank, phones, mfcc (gstalk's "
                                 "earlier default), or parts joined with '+'. Fine, render and eval use the one "
                                 "recorded here.")] = None,
    quiet: Quiet = False, debug: Debug = False, as_json: JsonOut = False,
) -> None:
    """Decode the video at 25 fps, crop a square around head and shoulders, write frames (PNG), 16 kHz audio and audio
    features per frame into WORKSPACE/extract/. Prints the workspace path."""
    with _guard(debug):
        import dataclasses

        from gstalk.audio import get_extractor
        from gstalk.config import override
        from gstalk.stages.extract import run_extract

        p = _preset(preset or "cpu-quick")
        cfg = override(p.extract, size=size)
        if audio_features is not None:
            get_extractor(audio_features, cfg.audio)  # a UsageError naming the known ones, before any work
            cfg = dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, features=audio_features))
        ws = run_extract(video, workspace, cfg, preset=p.name, seed=seed, speech=speech, reporter=_reporter(quiet))
        _result(ws.root, ws.stage("extract").summary, as_json)


def _result(ws_root: Path, summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json({"workspace": str(ws_root), **summary})
    else:
        print(ws_root)


# ---------------------------------------------------------------------------- track
@app.command()
def track(
    workspace: WorkspaceArg = None,
    preset: Preset = None,
    detector: Detector = None,
    fan_weights: FanWeights = None,
    plate: Plate = None,
    quiet: Quiet = False, debug: Debug = False, as_json: JsonOut = False,
) -> None:
    """Track the face in every frame (MediaPipe, model shipped with gstalk): 478 landmarks, blendshapes, head pose, one
    focal length, eye blink, the audio/video offset, masks (head, mouth, torso, person) and a background plate,
    into WORKSPACE/track/. With --detector fan, FAN's 68 landmarks instead (blink from the eyelids, the mouth code
    from the lips' geometry; docs/methods.md). See track/preview.png to check it worked."""
    with _guard(debug):
        from gstalk.config import override
        from gstalk.stages.track import run_track

        root = _workspace(workspace)
        cfg = override(_preset(preset, root).track, detector=detector,
                       fan_weights=str(fan_weights) if fan_weights is not None else None, plate=plate)
        ws = run_track(str(root), cfg, reporter=_reporter(quiet))
        _result(ws.root, ws.stage("track").summary, as_json)


# ---------------------------------------------------------------------------- coarse
@app.command()
def coarse(
    workspace: WorkspaceArg = None,
    preset: Preset = None,
    iterations: Annotated[Optional[int], typer.Option(help="Training iterations (default from the preset).")] = None,
    raster: Raster = "auto",
    device: Device = "auto",
    resume: Annotated[bool, typer.Option(
        help="Continue an interrupted run from coarse/checkpoint.safetensors (also on another device).")] = False,
    settings: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="Change one coarse setting, e.g. --set pose_passes=0 (no pose "
                                           "refinement), --set articulation_basis=none (no mouth-code basis: "
                                           "the static head then fits the average mouth image, whose opening "
                                           "follows the view), --set n_mouth=600 (seed the inside of the mouth) or "
                                           "--set detail_lambda=0 (no detail loss: a softer head, up to 0.3 dB more "
                                           "PSNR; repeatable; the keys are CoarseConfig's fields, "
                                           "docs/methods.md).")] = None,
    quiet: Quiet = False, debug: Debug = False, as_json: JsonOut = False,
) -> None:
    """Fit static 3D Gaussians of the head in canonical space to the training frames (L1 + D-SSIM, adaptive density
    control, and a detail loss that asks for as much fine detail as the frames hold: detail_lambda), refining each
    frame's head pose as they train (pose_passes), with the lower face following each frame's tracked mouth code
    through a linear basis fitted alongside (articulation_basis), so the head written, at the average mouth, does not
    tie the mouth's opening to the view. Writes WORKSPACE/coarse/gaussians.safetensors, point_cloud.ply (3DGS PLY)
    and cameras.safetensors (the refined cameras that fine, render and eval use) and
    articulation_basis.safetensors; a checkpoint every 1000 iterations lets a killed run continue with --resume."""
    with _guard(debug):
        from gstalk.config import override, parse_assignments
        from gstalk.stages.coarse import run_coarse

        root = _workspace(workspace)
        cfg = override(_preset(preset, root).coarse, iterations=iterations, raster=raster, device=device)
        cfg = parse_assignments(cfg, settings)
        ws = run_coarse(str(root), cfg, resume=resume, reporter=_reporter(quiet))
        _result(ws.root, ws.stage("coarse").summary, as_json)


# ---------------------------------------------------------------------------- fine
@app.command()
def fine(
    workspace: WorkspaceArg = None,
    preset: Preset = None,
    model: Annotated[Optional[str], typer.Option(
        help="Deformation model: gstalker (hash tri-plane + MLP; the default), audioplane (audio factorization plane + "
             "dynamic splatting) or egstalker (hash tri-plane + KAN + spatial-audio attention). See docs/methods.md.",
        show_default=False)] = None,
    iterations: Annotated[Optional[int], typer.Option(help="Training iterations (default from the preset).")] = None,
    av_offset: Annotated[Optional[int], typer.Option(
        "--av-offset", help="Audio/video offset in frames (positive: audio late). Default: the track stage's "
                            "estimate.")] = None,
    conditioning: Annotated[Optional[str], typer.Option(
        help="What drives the deformation: articulation (audio -> a 7-number mouth code fitted to the tracked "
             "lips, then the field; default) or audio (the audio features directly, as in the papers).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from fine/checkpoint.safetensors (also on "
                                              "another device).")] = False,
    settings: Annotated[Optional[list[str]], typer.Option(
        "--set", metavar="KEY=VALUE", help="Change one fine setting, e.g. --set deform_reg=0.02 or "
                                           "--set detail_lambda=0 (no detail loss), or one of the model's "
                                           "own: --model audioplane --set mask_lambda=0.2 --set dynamic=false "
                                           "(repeatable; the keys are FineConfig's fields and those of the model's "
                                           "config, docs/methods.md; choices are checked).")] = None,
    raster: Raster = "auto",
    device: Device = "auto",
    quiet: Quiet = False, debug: Debug = False, as_json: JsonOut = False,
) -> None:
    """Train the audio-driven deformation of the canonical Gaussians: GSTalker (hash-grid tri-plane + audio encoder
    with temporal smoothing + MLP, the default), Audio-Plane or EGSTalker (--model). By default the audio first
    predicts a mouth articulation code (a small regressor fitted to the tracked lips in seconds), which then drives
    the field, together with the coarse stage's articulation basis, carried frozen as the mouth's linear term
    (--set articulation_basis=none leaves it out). The torso gets its own pose-conditioned Gaussians (GSTalker's
    torso field; --set torso=false pastes the training frames' torso instead). Optional: --set densify_until=N
    (3DGS densification in this stage), --set lpips_weights=PATH (an LPIPS term, from a local safetensors file).
    Writes WORKSPACE/fine/model.safetensors and point_cloud.ply."""
    with _guard(debug):
        from gstalk.config import FineConfig, override, parse_assignments
        from gstalk.stages.fine import run_fine

        parse_assignments(override(FineConfig(), model=model), settings)  # refuse a bad --set before any work
        root = _workspace(workspace)
        cfg = parse_assignments(override(_preset(preset, root).fine, model=model), settings)
        cfg = override(cfg, iterations=iterations, av_offset=av_offset, conditioning=conditioning, raster=raster,
                       device=device)
        ws = run_fine(str(root), cfg, resume=resume, reporter=_reporter(quiet))
        _result(ws.root, ws.stage("fine").summary, as_json)


# ---------------------------------------------------------------------------- render
AvatarArg = Annotated[Optional[Path], typer.Argument(
    help="Workspace folder, avatar bundle (.gstalk, from `gstalk export`) or unpacked bundle folder (default: the "
         "current folder, or the one workspace inside it).", show_default=False)]


def _avatar_path(path: Path | None) -> Path:
    """An avatar argument: a bundle file or unpacked bundle folder as given, else a workspace
    (:func:`_workspace`)."""
    from gstalk.avatar import is_bundle_path

    if path is not None and is_bundle_path(path):
        return path
    return _workspace(path)


@app.command()
def render(
    workspace: AvatarArg = None,
    audio: Annotated[Optional[Path], typer.Option("--audio", "-a", help="Speech to say (wav/mp3/m4a/flac/... any "
                                                  "rate, mono or stereo; - reads it from standard input). Omitted: "
                                                  "re-render the test split with its own audio.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Video to write (.mp4; - writes a "
                                                   "fragmented MP4 to standard output); default "
                                                   "WORKSPACE/renders/AUDIO_STEM.mp4.")] = None,
    pose: Annotated[str, typer.Option(help="Head poses: loop (the training poses, back and forth), still (the most "
                                           "frontal training pose, held; blinks still follow the training "
                                           "sequence), or FILE: a .npy/.json of 4x4 world-to-camera matrices or "
                                           "another workspace, played back and forth.")] = "loop",
    background: Annotated[str, typer.Option(help="Behind the head and torso: plate (the video's own background), a "
                                                 "colour (black, white, green, blue, grey or #rrggbb) or an image "
                                                 "file.")] = "plate",
    alpha: Annotated[bool, typer.Option("--alpha", help="Write RGBA PNG frames (head and torso on a transparent "
                                                        "background) and the audio into a folder (-o FOLDER) for "
                                                        "video editors, instead of an mp4.")] = False,
    size: Annotated[Optional[int], typer.Option(help="Output width/height in pixels (even; default: the trained "
                                                     "size). The Gaussians are re-projected; detail beyond the "
                                                     "training resolution is not invented.")] = None,
    blink: Annotated[str, typer.Option(help="Eye blinks: video (those of the training frames the pose comes from) or "
                                            "auto (natural blinks every 2-6 s).")] = "video",
    articulation_gain: ArticulationGain = None,
    raster: Raster = "auto",
    device: Device = "auto",
    quiet: Quiet = False, debug: Debug = False, as_json: JsonOut = False,
) -> None:
    """Render a lip-synced H.264 video of the trained person saying AUDIO, muxed with it: exactly round(duration x 25)
    frames. WORKSPACE may also be an avatar bundle (NAME.gstalk); then --audio is needed and the video goes to
    AUDIO_STEM.mp4 in the current folder unless -o says otherwise. Prints the video path (or, with --json, frames,
    duration and speed)."""
    with _guard(debug):
        from gstalk.config import RenderConfig, override
        from gstalk.stages.render import run_render

        cfg = override(RenderConfig(), pose=pose, background=background, alpha=alpha, size=size, blink=blink,
                       articulation_gain=articulation_gain, raster=raster, device=device)
        root = _avatar_path(workspace)
        s = run_render(root, audio, output, cfg, reporter=_reporter(quiet))
        if str(output) == "-":  # stdout carries the video: the summary goes to stderr
            if not quiet:
                _reporter(False).log(json.dumps(s) if as_json else f"{s['frames']} frames, {s['fps']:.1f} frames/s")
            return
        if as_json:
            _print_json(s)
        else:
            if not quiet:
                _reporter(False).log(f"{s['frames']} frames, {s['duration_s']:.2f} s of audio, "
                                     f"{s['fps']:.1f} frames/s, real-time factor {s['realtime_factor']:.2f}")
            print(s["output"])


# ---------------------------------------------------------------------------- serve
@app.command()
def serve(
    avatars: Annotated[list[Path], typer.Argument(
        help="Avatars to serve: workspaces (fine done), bundles (.gstalk) or unpacked bundles; each is loaded once "
             "and kept warm, named after its folder or file.", show_default=False)],
    host: Annotated[str, typer.Option(help="Address to listen on. The default serves this machine only; "
                                           "another address (e.g. 0.0.0.0) should come with --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: a free one, printed).")] = 8000,
    token: Annotated[Optional[str], typer.Option(
        "--token", envvar="GSTALK_SERVE_TOKEN", show_envvar=True,
        help="Require this token on every request (Authorization: Bearer TOKEN or ?token=TOKEN); the printed URL "
             "carries it. Default: no token.", show_default=False)] = None,
    max_upload: Annotated[float, typer.Option("--max-upload", help="Largest audio upload to POST /v1/render, "
                                              "MiB.")] = 50.0,
    max_session: Annotated[float, typer.Option("--max-session", help="Longest live session, seconds; then it is "
                                               "closed with a reason (the client may reconnect).")] = 600.0,
    idle_timeout: Annotated[float, typer.Option("--idle-timeout", help="Close a live session whose client sends "
                                                "nothing (no audio, no ping) for this many seconds (0: never).")]
    = 60.0,
    max_ahead: Annotated[float, typer.Option("--max-ahead", help="Seconds of audio a client may send ahead of real "
                                             "time; a client sending faster is closed with a reason.")] = 3.0,
    sessions: Annotated[Optional[int], typer.Option(
        "--sessions", help="Serve this many live sessions (of any avatar) instead of the number measured at "
                           "start-up; above what the machine can render, streams skip frames.",
        show_default=False)] = None,
    jpeg_quality: Annotated[int, typer.Option("--jpeg-quality", help="JPEG quality of the live frames, "
                                              "1-100.")] = 85,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads each session's (or render's) tensor "
                                         "operations use. Sessions already run side by side, each on its own "
                                         "thread, and a live frame's operations are small: one thread rendered "
                                         "obama's frames faster than two on 2 cores (docs/serve.md).")] = 1,
    raster: Raster = "auto",
    quiet: Quiet = False, debug: Debug = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the start-up summary (URL, avatars, measured speed, "
                                                         "capacity, limits) as one JSON line instead of the URL.")]
    = False,
) -> None:
    """Serve trained avatars live: a web page (upload a file, or speak into the microphone and watch the avatar
    mouth it), `GET /v1/avatars`, `POST /v1/render` (an audio file -> the mp4 `gstalk render` writes) and a
    WebSocket session (`/v1/live`: 16-bit PCM in, timestamped JPEG frames and their audio out at 25 frames/s;
    the avatar idles when no speech arrives). Each avatar is loaded once; its live speed is measured at start-up
    and decides how many sessions fit: one more is refused (HTTP 503 / close 1013, with a retry hint), never
    slowed down. Prints the URL. Ctrl-C or SIGTERM closes every session cleanly; nothing is written into the
    workspaces. Needs `pip install 'gstalk[serve]'`. Protocol and measured latency: docs/serve.md."""
    with _guard(debug):
        from gstalk.errors import UsageError
        from gstalk.serve import require_web
        from gstalk.serve.server import open_socket, prepare, token_from
        from gstalk.serve.server import serve as run_server
        from gstalk.serve.session import Limits

        for name, value in (("--max-upload", max_upload), ("--max-session", max_session),
                            ("--max-ahead", max_ahead)):
            if not value > 0:
                raise UsageError(f"{name} {value:g} must be above 0.")
        if idle_timeout < 0:
            raise UsageError(f"--idle-timeout {idle_timeout:g} must be 0 (never) or more.")
        if not 1 <= jpeg_quality <= 100:
            raise UsageError(f"--jpeg-quality {jpeg_quality} must be between 1 and 100.")
        if not 0 <= port <= 65535:
            raise UsageError(f"--port {port} must be between 0 and 65535.")
        if threads < 1:
            raise UsageError(f"--threads {threads} must be 1 or more.")
        roots = [_avatar_path(p) for p in avatars]
        require_web()
        sock = open_socket(host, port)
        reporter = _reporter(quiet)
        import torch

        torch.set_num_threads(threads)  # before the capacity is measured: it is measured as served
        state = prepare(roots, backend=raster, sessions=sessions, reporter=reporter,
                        limits=Limits(max_session_s=max_session, idle_timeout_s=idle_timeout, max_ahead_s=max_ahead),
                        max_upload_bytes=int(max_upload * 2**20), token=token_from(token),
                        jpeg_quality=jpeg_quality)
        run_server(state, sock, reporter=reporter, as_json=as_json)


# ---------------------------------------------------------------------------- eval
@app.command("eval")
def eval_(
    workspaces: Annotated[Optional[list[Path]], typer.Argument(
        help="Workspace folder (default: the current folder, or the one workspace inside it); several with "
             "--compare.", show_default=False)] = None,
    audio: Annotated[Optional[list[Path]], typer.Option(
        "--audio", "-a", help="Cross-driven: render this speech (another speaker's) and score lip sync with gstalk's "
                              "proxy against mismatched audio and the real video. Repeat it, or give a folder, to "
                              "score several voices in one run with a summary row. Writes "
                              "WORKSPACE/eval/cross_STEM/ per voice (and cross_summary.json/.md for several).")] = None,
    articulation_gain: ArticulationGain = None,
    compare: Annotated[bool, typer.Option("--compare", help="Print one table across the given workspaces (models, "
                                                            "presets, ablations), evaluating those with no "
                                                            "up-to-date eval first.")] = False,
    fail_under: Annotated[Optional[list[str]], typer.Option(
        "--fail-under", help="Quality gate for CI, METRIC=VALUE (e.g. psnr=30 or mouth_psnr=25; repeatable): exit "
                             "with code 10 when the model scores below it. Metrics: the keys of metrics.json.")] = None,
    lpips: Annotated[Optional[Path], typer.Option(
        "--lpips", help="Also compute LPIPS (AlexNet or VGG16) with these weights: a local .safetensors file you "
                        "make from the official LPIPS weights (docs/methods.md shows how; gstalk downloads nothing "
                        "and never unpickles). Self-driven only.", show_default=False)] = None,
    syncnet: Annotated[Optional[Path], typer.Option(
        "--syncnet", help="Also compute LSE-C/LSE-D with these SyncNet weights: a local .safetensors file converted "
                          "from syncnet_python's syncnet_v2.model (docs/methods.md). Self- and cross-driven.",
        show_default=False)] = None,
    lmd_landmarks: Annotated[str, typer.Option(
        "--lmd-landmarks", help="Landmarks for LMD: mediapipe (40 lip points, always measured) or fan (also the "
                                "papers' LMD: FAN's mouth points 48-67 on render and ground truth, as ER-NeRF and "
                                "TalkingGaussian compute it; needs --fan-weights). Self-driven only.")] = "mediapipe",
    fan_weights: FanWeights = None,
    raster: Raster = "auto",
    device: Device = "auto",
    quiet: Quiet = False, debug: Debug = False, as_json: JsonOut = False,
) -> None:
    """Evaluate on the held-out test frames: PSNR/SSIM of the full frame, face box and mouth box, LMD and blendshape
    error, mouth motion and the lip-sync proxy, against the mean-frame and the static coarse baselines; LPIPS and
    LSE-C/LSE-D when you pass weight files (--lpips, --syncnet), else the report says they were skipped. Writes
    WORKSPACE/eval/metrics.json, report.md, samples.png (ground truth | coarse | fine | error), psnr.png (PSNR per
    test frame) and mouth.png (mouth opening of render and ground truth vs the opening the audio predicts). With
    --audio, cross-driven; with --compare, one table across workspaces."""
    with _guard(debug):
        from gstalk.errors import UsageError
        from gstalk.stages.evaluate import check_thresholds, parse_thresholds, run_eval

        gates = parse_thresholds(fail_under or [])
        if compare and (lpips is not None or syncnet is not None):
            raise UsageError("--lpips/--syncnet do not combine with --compare.",
                             hint="evaluate each workspace with `gstalk eval WS --lpips PATH --syncnet PATH` first; "
                                  "--compare then reads their metrics.json")
        if audio and lpips is not None:
            raise UsageError("--lpips needs ground truth, and a cross-driven eval (--audio) has none.",
                             hint="drop --lpips, or run `gstalk eval WS --lpips PATH` without --audio")
        if lmd_landmarks != "mediapipe" and (compare or audio is not None):
            raise UsageError("--lmd-landmarks fan needs one self-driven eval: it does not combine with --compare or "
                             "--audio.", hint="run `gstalk eval WS --lmd-landmarks fan --fan-weights PATH` alone")
        if compare:
            from gstalk.pipeline import evaluate_stale
            from gstalk.progress import print_table
            from gstalk.stages.compare import compare as compare_workspaces
            from gstalk.stages.compare import compare_table

            if not workspaces:
                raise UsageError("--compare needs the workspaces to compare.", hint="gstalk eval --compare ws1/ ws2/")
            roots = [_workspace(w) for w in workspaces]
            evaluate_stale(roots, raster=raster, device=device, reporter=_reporter(quiet))
            result = compare_workspaces(roots)
            if as_json:
                _print_json(result)
            else:
                print_table(compare_table(result))
            return
        if workspaces and len(workspaces) > 1:
            raise UsageError(f"eval takes one workspace, got {len(workspaces)}.",
                             hint="add --compare to compare several")
        root = _workspace(workspaces[0] if workspaces else None)
        if audio:
            from gstalk.progress import print_table
            from gstalk.stages.crosseval import cross_table, expand_audio, run_cross_eval, run_cross_eval_many

            files = expand_audio(audio)
            if len(files) > 1 or audio[0].is_dir():
                summary = run_cross_eval_many(root, files, backend=raster, reporter=_reporter(quiet),
                                              syncnet=syncnet, articulation_gain=articulation_gain, device=device)
                if as_json:
                    _print_json(summary)
                else:
                    print_table(cross_table(summary))
                    print(root / "eval" / "cross_summary.md")
                return
            audio_file = files[0]
            c = run_cross_eval(root, audio_file, backend=raster, reporter=_reporter(quiet), syncnet=syncnet,
                               articulation_gain=articulation_gain, device=device)
            if as_json:
                _print_json(c)
            elif not quiet:
                _reporter(False).log(
                    f"lip sync (proxy, corr at best lag): {c['sync_corr_best']:.2f} at {c['sync_lag']:+d} frames; "
                    f"mismatched audio {c['mismatched']['sync_corr_best']:.2f}; real video "
                    f"{c['real_video']['sync_corr_best']:.2f}; mouth motion {c['mouth_motion']:.2f}"
                    + (f"; LSE-C {c['lse_c']:.2f}, LSE-D {c['lse_d']:.2f} (real video {c['real_video']['lse_c']:.2f}, "
                       f"{c['real_video']['lse_d']:.2f})" if "lse_c" in c and "lse_c" in c["real_video"] else ""))
                print(root / "eval" / f"cross_{audio_file.stem}" / "report.md")
            return
        from gstalk.config import EvalConfig
        from gstalk.progress import print_table
        from gstalk.stages.evaluate import metrics_table

        cfg = EvalConfig(lpips=_str(lpips), syncnet=_str(syncnet), lmd_landmarks=lmd_landmarks,  # type: ignore[arg-type]
                         fan_weights=_str(fan_weights), raster=raster, device=device,
                         articulation_gain=articulation_gain)
        m = run_eval(root, cfg, reporter=_reporter(quiet))
        if as_json:
            _print_json(m)
        else:
            print_table(metrics_table(m))
        check_thresholds(m, gates)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


# ---------------------------------------------------------------------------- run
@app.command()
def run(
    video: Annotated[Path, typer.Argument(help="Training video (one speaker, with speech).")],
    workspace: Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Workspace folder "
                                                      "(default: VIDEO_STEM_ws).")] = None,
    preset: Annotated[str, typer.Option(help="cpu-quick, cpu-long, paper or test.")] = "cpu-quick",
    audio: Annotated[Optional[Path], typer.Option("--audio", "-a", help="Speech to render at the end (default: "
                                                  "the test split with its own audio).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Video to write.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    speech: Speech = None,
    detector: Detector = None,
    fan_weights: FanWeights = None,
    plate: Plate = None,
    raster: Raster = "auto",
    device: Device = "auto",
    size: Annotated[str, typer.Option(
        help="Working size in pixels (an even number from 64 to 2048), or auto: twice the preset's size when the "
             "face crop in the video has that many pixels and the measured cost fits the preset's time budget, else "
             "the preset's size. On 2 CPU cores 512 px measured 2.85x a 256 px run, over cpu-quick's 10 minutes, so "
             "auto keeps 256 there; on a GPU 512 px is not measured yet (give --size 512).")] = "auto",
    quiet: Quiet = False, debug: Debug = False, as_json: JsonOut = False,
) -> None:
    """Run every stage on VIDEO: extract, track, coarse, fine, render and eval, on one device (--device). Prints the
    rendered video's path (with --json: per-stage times, the working size and why, the video and the metrics). With
    --detector fan, track uses FAN and eval adds FAN's LMD."""
    with _guard(debug):
        from gstalk.pipeline import run_all
        from gstalk.progress import print_table
        from gstalk.stages.evaluate import metrics_table

        rep = _reporter(quiet)
        r = run_all(video, workspace, preset=preset, audio=audio, output=output, seed=seed, detector=detector,
                    fan_weights=fan_weights, raster=raster, device=device, size=size, speech=speech, plate=plate,
                    reporter=rep)
        if as_json:
            _print_json(r)
        else:
            if not quiet:
                print_table(metrics_table(r["metrics"]), stderr=True)
                rep.log("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items()))
            print(r["video"])


# ---------------------------------------------------------------------------- bundles
@app.command("export")
def export_(
    workspace: WorkspaceArg = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Bundle to write (default: "
                                                   "WORKSPACE_NAME.gstalk in the current folder).")] = None,
    as_json: JsonOut = False, debug: Debug = False,
) -> None:
    """Pack a trained workspace's avatar into one portable file, NAME.gstalk: the fine model with its canonical and
    torso Gaussians, the poses and blinks for idle motion, the background plate, the audio-feature settings and the
    provenance (source video SHA-256, gstalk version, eval summary), as safetensors and JSON in a plain zip with a
    checksum per member. `gstalk render`, `batch render` and `serve` take it wherever they take a workspace. A
    workspace trained with --set torso=false cannot be exported (its renders paste the training frames' torsos).
    Prints the bundle's path."""
    with _guard(debug):
        from gstalk.bundle import export_bundle

        s = export_bundle(_workspace(workspace), output)
        if as_json:
            _print_json(s)
        else:
            print(s["bundle"])


@app.command("inspect")
def inspect_(
    bundle: Annotated[Path, typer.Argument(help="Avatar bundle (.gstalk) or unpacked bundle folder.")],
    as_json: JsonOut = False, debug: Debug = False,
) -> None:
    """Verify an avatar bundle (every member's SHA-256 checksum, that its tensors decode and its model builds) and
    show what is inside: model, Gaussians, size, fps, frames, audio features, provenance and eval summary. Exit code
    3 with the reason for a damaged, truncated, foreign or newer bundle; nothing in it is ever unpickled."""
    with _guard(debug):
        from gstalk.bundle import inspect_bundle

        s = inspect_bundle(bundle)
        if as_json:
            _print_json(s)
        else:
            from gstalk.bundle import bundle_table
            from gstalk.progress import print_table

            print_table(bundle_table(s))


@app.command("import")
def import_(
    bundle: Annotated[Path, typer.Argument(help="Avatar bundle (.gstalk).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder to unpack into (default: the "
                                                   "bundle's name without .gstalk, in the current folder).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a folder that holds another bundle.")] = False,
    as_json: JsonOut = False, debug: Debug = False,
) -> None:
    """Verify an avatar bundle completely and unpack it into a folder (bundle.json, model.safetensors,
    avatar.safetensors), atomically; render, batch and serve take the folder like the bundle. Shows what is inside
    and prints the folder."""
    with _guard(debug):
        from gstalk.bundle import import_bundle

        s = import_bundle(bundle, output, force=force)
        if as_json:
            _print_json(s)
        else:
            from gstalk.bundle import bundle_table
            from gstalk.progress import print_table

            print_table(bundle_table(s), stderr=True)
            print(s["unpacked_to"])


# ---------------------------------------------------------------------------- batch
batch_app = typer.Typer(help="Many jobs from one jobs file (CSV or JSONL), on this machine or a Ray cluster: "
                             "`batch render` (one row per video to render), `batch train` (one row per training "
                             "video). See docs/batch.md.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")

Engine = Annotated[str, typer.Option("--engine", help="local (worker processes on this machine) or ray (a Ray "
                                                      "cluster: pip install 'gstalk[ray]').")]
Address = Annotated[Optional[str], typer.Option("--address", help="Ray: the cluster to join (e.g. auto, or "
                                                "ray://HEAD:10001); default: start a local one.")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Local: worker processes (default: one per "
                                                "core).", show_default=False)]
Threads = Annotated[Optional[int], typer.Option("--threads", help="Threads per job (local: default cores / "
                                                "workers; ray: the CPUs each task declares, default 1).",
                                                show_default=False)]
Gpus = Annotated[float, typer.Option("--gpus-per-job", help="Ray: GPUs each task declares (fractions share "
                                     "one).")]
Force = Annotated[bool, typer.Option("--force", help="Run every job, also those whose output is complete from an "
                                     "earlier run.")]
ResultsOpt = Annotated[Optional[Path], typer.Option("--results", help="Results file (default: JOBS.results.jsonl "
                                                    "beside the jobs file).", show_default=False)]


def _batch(kind: str, jobs: Path, engine: str, address: str | None, workers: int | None, threads: int | None,
           gpus: float, force: bool, results: Path | None, quiet: bool, as_json: bool) -> None:
    from gstalk.batch.runner import run_batch
    from gstalk.errors import JobsFailedError

    s = run_batch(kind, jobs, engine=engine, workers=workers, threads=threads, address=address, gpus=gpus,
                  force=force, results=results, reporter=_reporter(quiet))
    if as_json:
        _print_json(s)
    else:
        if not quiet:
            rate = f", {s['jobs_per_minute']:.1f} jobs/min" if s["jobs_per_minute"] else ""
            _reporter(False).log(f"{s['jobs']} job(s): {s['ok']} ok, {s['failed']} failed, {s['skipped']} skipped "
                                 f"(already done) in {s['seconds']:.1f} s{rate}")
        print(s["results"])
    if s["failed"]:
        raise JobsFailedError(f"{s['failed']} of {s['jobs']} job(s) failed (rows "
                              f"{', '.join(str(f['row']) for f in s['failures'][:10])}"
                              f"{', ...' if s['failed'] > 10 else ''}); the others finished.",
                              hint=f"see each row's error in {s['results']}, fix those rows and run the same "
                                   "command again: finished jobs are skipped")


@batch_app.command("render")
def batch_render(
    jobs: Annotated[Path, typer.Argument(help="CSV (with a header) or JSONL jobs file; one row per video: avatar "
                                              "(workspace or .gstalk bundle), audio, and optionally output and any "
                                              "render option as a column: pose, background, alpha, size, blink, "
                                              "raster, device, articulation_gain. Relative paths are from the jobs "
                                              "file's folder.")],
    engine: Engine = "local", address: Address = None, workers: Workers = None, threads: Threads = None,
    gpus_per_job: Gpus = 0.0, force: Force = False, results: ResultsOpt = None,
    quiet: Quiet = False, debug: Debug = False, as_json: JsonOut = False,
) -> None:
    """Render every row of JOBS, as `gstalk render AVATAR --audio AUDIO -o OUTPUT [options]` would, on this machine
    (--engine local) or a Ray cluster (--engine ray): each avatar is loaded once per worker (on Ray: put in the
    object store once). Appends one line per job to the results file (JSONL: row, status, output, seconds, error)
    as it ends; a re-run skips jobs whose output is complete and unchanged. A bad row fails alone. Exit code 11
    when any job failed (the others still finish). Prints the results file."""
    with _guard(debug):
        _batch("render", jobs, engine, address, workers, threads, gpus_per_job, force, results, quiet, as_json)


@batch_app.command("train")
def batch_train(
    videos: Annotated[Path, typer.Argument(help="CSV (with a header) or JSONL jobs file; one row per training video: "
                                                "video, and optionally workspace (default VIDEO_STEM_ws), preset "
                                                "(cpu-quick), model (gstalker), seed (0), raster, device, eval (true), "
                                                "bundle (a .gstalk path to export to) and speech (the voice in a "
                                                "separate file, as extract --speech).")],
    engine: Engine = "local", address: Address = None, workers: Workers = None, threads: Threads = None,
    gpus_per_job: Gpus = 0.0, force: Force = False, results: ResultsOpt = None,
    quiet: Quiet = False, debug: Debug = False, as_json: JsonOut = False,
) -> None:
    """Train one avatar per row of VIDEOS (extract, track, coarse, fine, then eval and, with a bundle column, export),
    as `gstalk run` would, on this machine or a Ray cluster. A workspace left half-trained by a killed batch
    continues where it stopped (finished stages kept, checkpoints resumed). Results, skipping and exit codes as
    `batch render`."""
    with _guard(debug):
        _batch("train", videos, engine, address, workers, threads, gpus_per_job, force, results, quiet, as_json)


# ---------------------------------------------------------------------------- check
@app.command()
def check(workspace: WorkspaceArg = None, as_json: JsonOut = False, debug: Debug = False) -> None:
    """Verify a workspace: every stage's status, every recorded output's SHA-256 checksum, and whether a stage is
    stale (an earlier stage was re-run after it). Reads only. Prints what to re-run first; exit code 0 when all
    finished stages are intact, 4 otherwise."""
    with _guard(debug):
        from gstalk.check import check_workspace, first_fix
        from gstalk.workspace import Workspace

        root = _workspace(workspace)
        findings = check_workspace(Workspace.open(root))
        fix = first_fix(findings)
        if as_json:
            _print_json({"workspace": str(root), "ok": fix is None, "rerun": fix,
                         "stages": [f.to_dict() for f in findings]})
        else:
            from rich.console import Console
            from rich.markup import escape

            from gstalk.check import findings_table

            console = Console()
            console.print(findings_table(root, findings))
            if fix:
                console.print(f"re-run first: [bold]{escape(fix)}[/]")
        if fix:
            raise typer.Exit(4)


# ---------------------------------------------------------------------------- doctor
@app.command()
def doctor(as_json: JsonOut = False, debug: Debug = False) -> None:
    """Check this machine: Python, torch, CUDA, ffmpeg, PyAV, MediaPipe and the shipped landmark model, the C++
    compiler and kernels, which rasterizer backends work, and free disk. Prints a table with a fix for each problem.
    Exit code 0 when nothing failed (warnings allowed), 6 otherwise."""
    with _guard(debug):
        from gstalk.doctor import run_checks

        checks = run_checks()
        failed = any(c.status == "fail" for c in checks)
        if as_json:
            _print_json({"ok": not failed, "checks": [c.to_dict() for c in checks]})
        else:
            from rich.console import Console

            from gstalk.doctor import checks_table

            Console(stderr=False).print(checks_table(checks))
        if failed:
            raise typer.Exit(6)


bench_app = typer.Typer(help="Benchmarks (speed on this machine).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("raster", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_raster(ctx: typer.Context) -> None:
    """Time the rasterizer backends (forward, forward+backward, FPS) at 256²/10k, 512²/10k and 512²/50k Gaussians.
    Options: --quick, --json, --sizes WxHxN,..., --backends cpu,torch, --repeats N, --device cpu|cuda|auto (where the
    torch backend runs)."""
    from gstalk.raster.bench import main as bench_main

    raise typer.Exit(bench_main(ctx.args))


@bench_app.command("render")
def bench_render_cmd(
    workspace: WorkspaceArg = None,
    frames: Annotated[int, typer.Option(help="Frames to time (after the warm-up).")] = 100,
    warmup: Annotated[int, typer.Option(help="Frames rendered first and not timed.")] = 10,
    size: Annotated[Optional[int], typer.Option(help="Output width/height in pixels, as render --size (default: "
                                                     "the trained size).", show_default=False)] = None,
    raster: Raster = "auto",
    device: Device = "auto",
    as_json: JsonOut = False, debug: Debug = False,
) -> None:
    """Time a trained workspace's rendering step by step (audio features, articulation, deformation, rasterization,
    compositing, H.264 encoding), driven by its own audio: ms per frame, median and 10th-percentile render FPS,
    end-to-end FPS. Nothing is written to the workspace."""
    with _guard(debug):
        from gstalk.render.bench import bench_render, bench_table

        r = bench_render(_workspace(workspace), frames=frames, warmup=warmup, backend=raster, size=size, device=device)
        if as_json:
            _print_json(r)
            return
        from rich.console import Console

        Console().print(bench_table(r))


def main() -> None:
    """Console entry point."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app()


__all__ = ["EXIT_CODES", "app", "main"]
