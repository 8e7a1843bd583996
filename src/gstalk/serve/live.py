"""The live path: streamed speech -> frames of a trained avatar, one frame as soon as its audio allows.

This module knows nothing of the web (:mod:`gstalk.serve.session` drives it from a WebSocket).
:class:`LiveStream` takes mono float32 samples at the avatar's audio rate in chunks of any
size, runs them through the avatar's own audio front end live
(:class:`gstalk.audio.stream.FeatureStream`), cuts the per-frame windows exactly as
:func:`gstalk.audio.frame_windows` does, turns them into the model's condition one frame at a
time (:meth:`gstalk.deform.base.DeformationModel.frame_conditions`) and renders each frame with
the avatar's :class:`~gstalk.render.driver.HeadRenderer` (its public ``load_background`` and
``render``), over the idle head motion of the training poses played back and forth
(:func:`loop_pose`, the poses ``gstalk render --pose loop`` uses) with their own eye blinks.

Given the same feature steps, the frames equal ``gstalk render``'s (``tests/test_serve_live.py``).

**Look-ahead.** Frame ``i`` shows time ``i / fps``. It can be rendered once enough audio after
that time has arrived (:func:`lookahead`):

- the feature window: steps ``c - W//2 .. c + W - W//2 - 1`` around the frame's step ``c``
  (W = 16 steps of 20 ms: 7 steps after the centre);
- the front end's own latency (:attr:`FeatureStream.latency_s`: one analysis window for MFCC
  and fbank; the phone decoder's latency and blur for ``phones``);
- the articulation regressor's attention over ``K`` neighbouring frames (``K - K//2 - 1``
  frames after the frame);
- the model's own temporal smoothing over its ``smooth`` frames (likewise).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gstalk.avatar import Avatar
from gstalk.deform.audio import neighbour_indices
from gstalk.render.driver import loop_pose

BACKGROUND_BUDGET_MB = 256.0  # kept backgrounds per avatar (256 px: 455 training poses take 85 MiB)


def _ahead(k: int) -> int:
    """Frames after the centre that a K-frame neighbourhood reads (``neighbour_indices``)."""
    return k - k // 2 - 1


@dataclass(frozen=True)
class Lookahead:
    """The audio after a frame's time that it needs before it can be rendered.

    Attributes:
        window_s: the feature window's steps after the frame's centre step, in seconds.
        features_s: the front end's latency (:attr:`FeatureStream.latency_s`).
        articulation_frames: frames after the frame that the articulation regressor reads.
        smoothing_frames: frames after the frame that the model's temporal smoothing reads.
        fps: video frames per second.
    """

    window_s: float
    features_s: float
    articulation_frames: int
    smoothing_frames: int
    fps: float

    @property
    def total_s(self) -> float:
        """Seconds of audio after a frame's time needed to render it."""
        return self.window_s + self.features_s + (self.articulation_frames + self.smoothing_frames) / self.fps

    def as_dict(self) -> dict[str, float]:
        return {"total_s": round(self.total_s, 4), "window_s": round(self.window_s, 4),
                "features_s": round(self.features_s, 4),
                "articulation_s": round(self.articulation_frames / self.fps, 4),
                "smoothing_s": round(self.smoothing_frames / self.fps, 4)}


def lookahead(avatar: Avatar, features_latency_s: float) -> Lookahead:
    """The look-ahead of ``avatar``'s live path (see the module docstring).

    Args:
        avatar: the trained avatar (its audio settings and deformation model).
        features_latency_s: the front end's :attr:`FeatureStream.latency_s`.
    """
    from gstalk.config import AudioFeatureConfig, from_dict

    cfg = from_dict(AudioFeatureConfig, avatar.audio.config)
    w = avatar.audio.window
    return Lookahead(window_s=_ahead(w) * cfg.winstep, features_s=float(features_latency_s),
                     articulation_frames=_ahead(avatar.model.condition_context),
                     smoothing_frames=_ahead(int(avatar.model.smooth)), fps=float(avatar.fps))


def cmvn_prior_from_audio(avatar: Avatar, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The raw statistics that start the live running CMVN of a ``fbank`` front end
    (:class:`FeatureStream`'s ``cmvn_prior``), from the training clip's audio ``samples``
    [S] float32 at the avatar's rate: (mean [C], std [C]) over all the avatar's feature columns
    (zeros / ones outside the fbank part), or None when the front end has no fbank part."""
    from gstalk.audio import get_extractor
    from gstalk.audio.features import CombinedExtractor
    from gstalk.config import AudioFeatureConfig, from_dict

    ex = get_extractor(avatar.audio.extractor, from_dict(AudioFeatureConfig, avatar.audio.config))
    parts = ex.parts if isinstance(ex, CombinedExtractor) else (ex,)
    mean, std = np.zeros(ex.dim, np.float64), np.ones(ex.dim, np.float64)
    c, found = 0, False
    for p in parts:
        if p.name == "fbank" and samples.size:
            raw = p.raw(samples, avatar.audio.sample_rate)
            mean[c:c + p.dim], std[c:c + p.dim] = raw.mean(0), raw.std(0)
            found = True
        c += p.dim
    return (mean, std) if found else None


class LiveAvatar:
    """An avatar kept warm for live streams: its renderer (the canonical Gaussians' spatial
    encoding computed once), front end and look-ahead. One per avatar, shared read-only by
    every :class:`LiveStream` of it (each stream has its own feature state).

    Args:
        avatar: the trained avatar.
        backend: rasterizer backend.
        articulation_gain: as ``render --articulation-gain`` (None: the default).
        cmvn_prior: raw fbank statistics that start the running CMVN
            (:func:`cmvn_prior_from_audio`), or None.
        phone_latency_s: the live phone decoder's latency (``phones`` front ends).
        size: output width/height in pixels (None: the trained size).
    """

    def __init__(self, avatar: Avatar, *, backend: str = "auto", articulation_gain: float | None = None,
                 cmvn_prior: tuple[np.ndarray, np.ndarray] | None = None, phone_latency_s: float = 0.3,
                 size: int | None = None):
        from gstalk.audio import get_extractor
        from gstalk.config import AudioFeatureConfig, from_dict
        from gstalk.render.driver import HeadRenderer

        self.avatar = avatar
        self.name = avatar.name
        self.renderer = HeadRenderer(avatar, backend=backend, size=size, cache=0, articulation_gain=articulation_gain)
        self.gain = self.renderer.articulation_gain  # checked, defaulted: what live frames and whole files use
        self.cfg = from_dict(AudioFeatureConfig, avatar.audio.config)
        self.extractor = get_extractor(avatar.audio.extractor, self.cfg)
        self.cmvn_prior = cmvn_prior
        self.phone_latency_s = phone_latency_s
        self.sample_rate = avatar.audio.sample_rate
        self.fps = float(avatar.fps)
        self.width, self.height = self.renderer.width, self.renderer.height
        self.lookahead = lookahead(avatar, self.feature_stream().latency_s)
        self._backgrounds: dict[int, torch.Tensor] = {}

    def warm_backgrounds(self, budget_mb: float = BACKGROUND_BUDGET_MB) -> int:
        """Make the background (torso over the plate) of every training pose once and keep it,
        when they fit in ``budget_mb`` MiB (uint8): sessions then never render the torso, and
        memory does not grow while they run. Returns how many were made (0: over budget,
        sessions make them as they go)."""
        frames = list(self.avatar.train)
        if len(frames) * self.width * self.height * 3 > budget_mb * 2**20:
            return 0
        for f in frames:
            if f not in self._backgrounds:
                self._backgrounds[f] = self.renderer.load_background(f)
        return len(frames)

    def background(self, i: int) -> torch.Tensor:
        """[1, H, W, 3] uint8: the background of stream frame ``i`` (kept, or made now)."""
        pose = self.pose(i)
        bg = self._backgrounds.get(pose)
        return bg if bg is not None else self.renderer.load_background(pose)

    @property
    def backgrounds_kept(self) -> bool:
        return len(self._backgrounds) >= len(self.avatar.train)

    def feature_stream(self) -> Any:
        """A new :class:`~gstalk.audio.stream.FeatureStream` with the avatar's front end and statistics."""
        from gstalk.audio.stream import FeatureStream

        t = self.avatar.audio.tensors
        return FeatureStream(self.extractor, self.sample_rate, t["mean"], t["std"], cmvn_prior=self.cmvn_prior,
                             phone_latency_s=self.phone_latency_s)

    def pose(self, i: int) -> int:
        """Training frame of stream frame ``i`` (:func:`loop_pose` over the training frames)."""
        return loop_pose(i, self.avatar.train)

    def summary(self) -> dict[str, Any]:
        """JSON-able: name, model, size, fps, audio features, look-ahead."""
        s = self.avatar.summary()
        return {"name": self.name, "model": s["model"], "size": self.width, "width": self.width,
                "height": self.height, "fps": self.fps, "n_gaussians": s["n_gaussians"],
                "audio_features": s["audio_features"], "sample_rate": self.sample_rate,
                "lookahead_s": round(self.lookahead.total_s, 4), "lookahead": self.lookahead.as_dict()}


@dataclass
class LiveFrame:
    """One frame of a live stream.

    Attributes:
        index: frame number in the stream (0, 1, ...).
        pts: its time in the stream's timeline, s (``index / fps``).
        image: [H, W, 3] uint8 RGB, or None for a frame skipped to keep real time.
        audio: [n] float32, the timeline's audio from ``pts`` to the next frame's (the samples
            the client plays with this frame; inserted silence included).
        input_s: the position in the client's own audio (s, at the avatar's rate) that the
            frame shows, or None when it shows inserted silence.
        pose_frame: the training frame whose head pose, background and blink it uses.
    """

    index: int
    pts: float
    image: np.ndarray | None
    audio: np.ndarray
    input_s: float | None
    pose_frame: int


class LiveStream:
    """Streamed speech -> frames (see the module docstring). Not thread-safe: one thread feeds
    and renders it.

    Use :meth:`push` (client audio, with its position in the client's stream) or
    :meth:`push_silence`; :meth:`ready` says how many frames can be rendered now;
    :meth:`render_next` / :meth:`skip_next` take the next one; :meth:`end` finishes the
    stream (the last frames then clamp their neighbours as a whole clip does); :meth:`close`
    stops the background worker.

    Args:
        live: the warm avatar.
        prefetch_depth: backgrounds (torso over plate for the pose) made ahead on a worker thread.
    """

    def __init__(self, live: LiveAvatar, prefetch_depth: int = 4):
        from gstalk.render.driver import prefetch

        self.live = live
        self.model = live.avatar.model
        self.sr, self.fps = live.sample_rate, live.fps
        self.features = live.feature_stream()
        self.sps = float(self.features.steps_per_second)
        self.window = live.avatar.audio.window
        self.k1 = self.model.condition_context
        self.k2 = int(self.model.smooth)
        dim = int(live.extractor.dim)
        self._steps = np.zeros((0, dim), np.float32)  # normalised steps from absolute step _steps_start
        self._steps_start = 0
        self._windows: list[np.ndarray] = []  # frame windows [W, C] from frame _windows_start
        self._windows_start = 0
        self.n_windows = 0
        self._conds: list[torch.Tensor] = []  # conditions [W, C'] from frame _conds_start
        self._conds_start = 0
        self.n_conditions = 0
        self.next_index = 0
        self.n_samples = 0  # timeline samples pushed
        self.n_frames: int | None = None  # known once the stream has ended
        self._n_steps_final: int | None = None
        self._audio = np.zeros(0, np.float32)  # timeline samples from _audio_start
        self._audio_start = 0
        self._segments: list[list[float]] = []  # [timeline start, timeline end, client s at start] of client audio
        # backgrounds: kept by the avatar (warm_backgrounds), else made ahead on a worker thread
        self._bgs: Iterator[torch.Tensor] | None = None if live.backgrounds_kept else \
            prefetch(live.background, itertools.count(), depth=prefetch_depth)

    # ------------------------------------------------------------------ input
    @property
    def written_s(self) -> float:
        """Seconds of timeline audio pushed so far."""
        return self.n_samples / self.sr

    def push(self, samples: np.ndarray, client_s: float | None = None) -> None:
        """Append [S] float32 mono samples at the avatar's rate to the timeline; ``client_s``:
        the position (s) of ``samples[0]`` in the client's own audio (None: inserted silence)."""
        if self.n_frames is not None:
            raise RuntimeError("the stream has ended")
        x = np.asarray(samples, np.float32).reshape(-1)
        if x.size == 0:
            return
        if client_s is not None:
            seg = self._segments[-1] if self._segments else None
            follows = seg is not None and seg[1] == self.n_samples and \
                abs(seg[2] + (seg[1] - seg[0]) / self.sr - client_s) < 1e-6
            if follows:
                assert seg is not None
                seg[1] += x.size
            else:
                self._segments.append([self.n_samples, self.n_samples + x.size, float(client_s)])
        self._audio = np.concatenate([self._audio, x])
        self.n_samples += x.size
        self.push_steps(self.features.push(x))

    def push_silence(self, seconds: float) -> None:
        """Append ``seconds`` of silence (zeros) to the timeline (the avatar idles)."""
        n = int(round(seconds * self.sr))
        if n > 0:
            self.push(np.zeros(n, np.float32), None)

    def push_steps(self, steps: np.ndarray) -> None:
        """Append normalised feature steps [t, C] (what :meth:`push` does with the front end's
        output; public so a test can drive the stream with whole-file steps)."""
        if len(steps):
            self._steps = np.concatenate([self._steps, np.asarray(steps, np.float32)])
        self._advance()

    def end(self, n_samples: int | None = None) -> None:
        """No more audio: the front end's last steps are flushed and the stream has
        ``round(duration · fps)`` frames, the last ones clamping their neighbours to the last
        frame as a whole clip does. ``n_samples``: the timeline's length when the audio came
        through :meth:`push_steps` only (tests)."""
        if self.n_frames is not None:
            return
        if n_samples is None:
            tail = self.features.flush()
            if len(tail):
                self._steps = np.concatenate([self._steps, tail])
            n_samples = self.n_samples
        from gstalk.audio import n_video_frames

        self._n_steps_final = self._steps_start + len(self._steps)
        self.n_frames = n_video_frames(int(n_samples), self.sr, self.fps)
        self._advance()

    # ------------------------------------------------------------------ windows -> conditions
    def _centre(self, i: int) -> int:
        return int(np.round(i * self.sps / self.fps))

    def _advance(self) -> None:
        w = self.window
        have = self._steps_start + len(self._steps)
        ended = self.n_frames is not None
        new_windows = False
        while True:  # feature windows, as frame_windows cuts them
            i = self.n_windows
            if ended:
                assert self.n_frames is not None
                if i >= self.n_frames:
                    break
            elif self._centre(i) + w - w // 2 - 1 >= have:
                break
            idx = self._centre(i) + np.arange(-(w // 2), w - w // 2)
            valid = (idx >= 0) & (idx < have)
            win = np.zeros((w, self._steps.shape[1]), np.float32)
            if valid.any():
                win[valid] = self._steps[idx[valid] - self._steps_start]
            self._windows.append(win)
            self.n_windows += 1
            new_windows = True
        if new_windows:  # keep the steps the next windows need
            drop = self._centre(self.n_windows) - w // 2 - self._steps_start
            if drop > 0:
                self._steps = self._steps[drop:]
                self._steps_start += drop
        # conditions: frame j reads the windows of j - K1//2 .. j + ahead (clamped)
        a1 = _ahead(self.k1)
        batch: list[int] = []
        j = self.n_conditions
        while (ended and j < self.n_windows) or (not ended and j + a1 < self.n_windows):
            batch.append(j)
            j += 1
        if batch:
            last = self.n_windows - 1 if ended else None
            ids = [self._neighbours(b, self.k1, last) for b in batch]
            stack = torch.from_numpy(np.stack([np.stack([self._windows[k - self._windows_start] for k in row])
                                               for row in ids]))
            conds = self.model.frame_conditions(stack, self.live.gain)
            self._conds.extend(conds.unbind(0))
            self.n_conditions += len(batch)
            drop = self.n_conditions - self.k1 // 2 - self._windows_start
            if drop > 0:
                del self._windows[:drop]
                self._windows_start += drop

    @staticmethod
    def _neighbours(i: int, k: int, last: int | None) -> list[int]:
        ids = neighbour_indices(i, k, (last + 1) if last is not None else 1 << 62)[0]
        return [int(x) for x in ids]

    # ------------------------------------------------------------------ frames
    def ready(self) -> int:
        """How many frames can be rendered now (their audio, look-ahead included, has arrived)."""
        if self.n_frames is not None:
            return max(0, min(self.n_conditions, self.n_frames) - self.next_index)
        return max(0, self.n_conditions - _ahead(self.k2) - self.next_index)

    def _frame_audio(self, i: int) -> tuple[np.ndarray, float | None]:
        a = int(round(i * self.sr / self.fps))
        b = int(round((i + 1) * self.sr / self.fps))
        seg = self._audio[max(0, a - self._audio_start):max(0, b - self._audio_start)]
        if len(seg) < b - a:  # the stream's last frame: pad to a whole frame
            seg = np.concatenate([seg, np.zeros(b - a - len(seg), np.float32)])
        client = None
        for s0, s1, c0 in self._segments:
            if s0 <= a < s1:
                client = c0 + (a - s0) / self.sr
                break
        return seg, client

    def _take(self, render: bool) -> LiveFrame:
        if self.ready() <= 0:
            raise RuntimeError("no frame is ready")
        i = self.next_index
        bg = next(self._bgs) if self._bgs is not None else (self.live.background(i) if render else None)
        pose = self.live.pose(i)
        image = None
        if render:
            last = (self.n_frames - 1) if self.n_frames is not None else None
            ids = self._neighbours(i, self.k2, last)
            win = torch.stack([self._conds[k - self._conds_start] for k in ids])[None]
            img = self.live.renderer.render(win, pose, None, bg=bg)
            image = (img.numpy() * 255.0).round().astype(np.uint8)
        audio, client = self._frame_audio(i)
        self.next_index += 1
        drop = self.next_index - self.k2 // 2 - self._conds_start  # keep the conditions the next frames need
        if drop > 0:
            del self._conds[:drop]
            self._conds_start += drop
        keep = int(round(self.next_index * self.sr / self.fps)) - self._audio_start
        if keep > 0:
            self._audio = self._audio[keep:]
            self._audio_start += keep
        self._segments = [s for s in self._segments if s[1] > self._audio_start]
        return LiveFrame(index=i, pts=i / self.fps, image=image, audio=audio, input_s=client, pose_frame=pose)

    def render_next(self) -> LiveFrame:
        """Render the next ready frame."""
        return self._take(True)

    def skip_next(self) -> LiveFrame:
        """Skip the next ready frame (no image; its audio still comes back): a stream that fell
        behind real time catches up this way instead of slowing down."""
        return self._take(False)

    def close(self) -> None:
        """Stop the background worker."""
        close = getattr(self._bgs, "close", None) if self._bgs is not None else None
        if close is not None:
            close()


def _synthetic_speech(seconds: float, sr: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    return (0.1 * np.sin(2 * np.pi * 180.0 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t))
            + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def measure_speed(live: LiveAvatar, frames: int = 30, warmup: int = 5, streams: int = 1) -> dict[str, float]:
    """Time the live path of ``live`` on this machine: ``streams`` streams at once (threads, as
    sessions run), each pushing audio, rendering ``frames`` frames (after ``warmup``) and
    encoding each as a JPEG, as fast as it can.

    Returns:
        ``{"streams", "fps": the slowest stream's frames per second, "total_fps": all streams
        together, "ms_per_frame": the median ms of a frame}``.
    """
    import threading
    import time

    import cv2

    n = frames + warmup
    audio = _synthetic_speech(n / live.fps + live.lookahead.total_s + 0.3, live.sample_rate)
    chunk = int(live.sample_rate / live.fps)
    barrier = threading.Barrier(streams)
    spans: list[tuple[float, float]] = []
    times: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        stream = LiveStream(live, prefetch_depth=1)
        mine: list[float] = []
        try:
            pos = done = 0
            start = None
            while done < n and pos < audio.size:
                t0 = time.perf_counter()
                stream.push(audio[pos:pos + chunk], pos / live.sample_rate)
                pos += chunk
                while stream.ready() and done < n:
                    f = stream.render_next()
                    assert f.image is not None
                    cv2.imencode(".jpg", f.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
                    done += 1
                    if done == warmup:
                        barrier.wait(60)
                        start = time.perf_counter()
                    elif done > warmup:
                        mine.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
            with lock:
                spans.append((start or time.perf_counter(), time.perf_counter()))
                times.extend(mine)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            with lock:
                errors.append(exc)
            barrier.abort()
        finally:
            stream.close()

    threads = [threading.Thread(target=one, name=f"gstalk-measure-{k}") for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    per = [frames / max(b - a, 1e-9) for a, b in spans]
    wall = max(b for _, b in spans) - min(a for a, _ in spans)
    return {"streams": streams, "fps": min(per) if per else 0.0, "total_fps": streams * frames / max(wall, 1e-9),
            "ms_per_frame": 1000.0 * float(np.median(times)) if times else math.inf}


def measure_capacity(live: LiveAvatar, frames: int = 30, utilisation: float = 0.9,
                     max_sessions: int = 16) -> dict[str, Any]:
    """How many live sessions of ``live`` this machine sustains, measured: 1, 2, ... streams
    run at once (:func:`measure_speed`) until the slowest one falls below ``fps / utilisation``
    frames per second; the last count that kept up is the capacity (0 when even one stream
    cannot).

    Returns:
        ``{"sessions", "fps" (one stream alone), "ms_per_frame" (alone), "runs": [each
        measurement]}``.
    """
    need = live.fps / utilisation
    runs = []
    sessions = 0
    for k in range(1, max_sessions + 1):
        m = measure_speed(live, frames=frames, streams=k)
        runs.append({key: round(v, 2) for key, v in m.items()})
        if m["fps"] < need:
            break
        sessions = k
    return {"sessions": sessions, "fps": runs[0]["fps"], "ms_per_frame": runs[0]["ms_per_frame"], "runs": runs}


def load_live_avatar(path: str | Path, **kwargs: Any) -> LiveAvatar:
    """:func:`gstalk.avatar.load_avatar` then :class:`LiveAvatar`; for a workspace, the running
    CMVN of a ``fbank`` front end starts from the training clip's own statistics
    (``extract/audio.wav``, read only)."""
    from gstalk.avatar import is_bundle_path, load_avatar

    avatar = load_avatar(path)
    prior = None
    wav = Path(path) / "extract" / "audio.wav"
    if "fbank" in avatar.audio.extractor.split("+") and not is_bundle_path(path) and wav.is_file():
        from gstalk.media import read_audio

        prior = cmvn_prior_from_audio(avatar, read_audio(wav, avatar.audio.sample_rate))
    return LiveAvatar(avatar, cmvn_prior=prior, **kwargs)
