"""The multi-speaker articulation prior: audio → mouth articulation code, fitted on many voices.

A 20-s clip of one speaker cannot teach an audio → mouth regressor what speech does to a mouth:
fitted on the clip alone, its held-out correlation with the tracked lip opening is ~0.35 (and
near 0 on 3-8 s clips), and it follows other voices poorly. The peers avoid this with
DeepSpeech / HuBERT features trained on thousands of hours, whose weights we cannot download.
gstalk ships instead a small audio → articulation regressor fitted on every real clip with
speech we have (~6 minutes, 14+ speakers, English, acted and read speech, studio and phone
footage), on speaker-independent features (per-utterance CMVN filter-banks and PocketSphinx
viseme posteriors, :mod:`gstalk.audio`). The fine stage starts each avatar's regressor from it
and adapts it to the speaker (:func:`gstalk.deform.articulation.fit_ensemble` with early
stopping, which keeps the prior as it is when adapting does not pay on held-out frames).

The prior is an :class:`~gstalk.deform.articulation.ArticulationEnsemble` (AudioNet per frame,
attention over K frames, a linear layer to the 7-D code of
:data:`~gstalk.deform.articulation.ARTICULATION_NAMES`, standardised per clip) stored as
safetensors (``module.*`` tensors) with its provenance in the metadata: the clips and their
sha256, the A/V offset used for each, the audio front end and its settings, the training
settings, and the leave-one-speaker-out scores. Fit it with::

    python benchmarks/prior_corpus.py --data ../shared/data --out corpus_ws   # extract + track
    python -m gstalk.prior fit corpus_ws/* $(cat benchmarks/prior_fit.args) \\
        -o src/gstalk/assets/articulation_prior.safetensors
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gstalk.deform.articulation import ARTICULATION_NAMES, ArticulationEnsemble, r2_score

ASSET = Path(__file__).resolve().parent / "assets" / "articulation_prior.safetensors"
KIND = "gstalk articulation prior"
SCHEMA = 1
HIDDEN = 32  # audio code size inside each regressor (as the per-avatar regressors)


@dataclass
class PriorClip:
    """One clip for fitting: feature windows and the tracked articulation code of its frames.

    Attributes:
        name: clip name; speaker: speaker id (clips of one person share it: leave-one-speaker-out).
        windows: [N, W, C] float32 feature windows per video frame, A/V offset 0.
        targets: [N, D] float32 articulation code, standardised over the clip's frames.
        offset: A/V offset in frames applied when pairing (frame i with the audio of i + offset).
        sha256: of the source video, when known.
        speed: 1, or the speed-perturbed copy of a clip (:mod:`gstalk.audio.perturb`) whose
            audio was put in sync before the perturbation (its ``offset`` stays 0). Copies
            only add training frames: their last tenth, the time of the original's held-out
            frames, is dropped (:func:`train_pooled`).
    """

    name: str
    speaker: str
    windows: np.ndarray
    targets: np.ndarray
    offset: int = 0
    sha256: str = ""
    speed: float = 1.0

    def shifted_windows(self) -> np.ndarray:
        """[N, W, C]: frame i paired with the window of frame i + ``offset`` (clamped at the ends)."""
        n = len(self.windows)
        idx = np.clip(np.arange(n) + self.offset, 0, n - 1)
        return self.windows[idx]


@dataclass
class PriorSettings:
    """How the prior is trained (recorded in its metadata)."""

    members: int = 5  # regressors averaged
    smooth: int = 5  # frames the attention looks at (odd: centred on the frame)
    steps: int = 3000  # Adam steps per member
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.1  # the last tenth of every clip is held out for early stopping
    eval_every: int = 100
    seed: int = 0


@dataclass
class ArticulationPrior:
    """A fitted prior: the ensemble and its metadata.

    Attributes:
        ensemble: the regressor, input [B, K, W, C] float32, output [B, D] (standardised code).
        meta: {"kind", "schema", "features", "audio" (AudioFeatureConfig as a dict), "window",
            "dim", "smooth", "members", "hidden", "names", "clips", "settings", "scores", ...}.
        path: where it was read from (None when fitted in memory).
    """

    ensemble: ArticulationEnsemble
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def features(self) -> str:
        return str(self.meta["features"])

    def compatible(self, features: str, audio: dict[str, Any], window: int, names: Sequence[str]) -> str | None:
        """None when this prior can drive a workspace with these audio settings; otherwise the
        reason (a sentence) it cannot."""
        if features != self.features:
            return f"it was fitted on '{self.features}' audio features, the workspace has '{features}'"
        if window != int(self.meta["window"]):
            return f"it reads windows of {self.meta['window']} steps, the workspace has {window}"
        theirs = self.meta.get("audio", {})
        keys = ("sample_rate", "winlen", "winstep", "nfilt", "nfft", "numcep", "phone_units", "phone_lw", "phone_blur")
        diff = [k for k in keys if k in theirs and k in audio and theirs[k] != audio[k]]
        if diff:
            return f"its audio settings differ ({', '.join(diff)})"
        if tuple(names) != tuple(self.meta.get("names", ARTICULATION_NAMES)):
            return "its articulation code has other dimensions"
        return None

    def fitted_on(self, sha256: str) -> str | None:
        """The name of the clip in this prior's corpus whose video has this SHA-256 (hex), or None
        (no such clip, or no hash given). The prior was fitted on that clip's training split, so
        a score over those frames is not held out."""
        if not sha256:
            return None
        return next((str(c.get("name", "?")) for c in self.meta.get("clips", []) if c.get("sha256") == sha256), None)

    def save(self, path: str | Path) -> None:
        from gstalk.tensorio import save_tensors

        save_tensors(path, {f"module.{k}": v for k, v in self.ensemble.state_dict().items()}, self.meta)

    @classmethod
    def load(cls, path: str | Path | None = None) -> ArticulationPrior:
        """The shipped prior (or the one in ``path``, a file written by :meth:`save`).

        Raises:
            InputError: the file is missing, not safetensors, not a gstalk prior, of a newer
                schema, or its tensors do not have the shapes its metadata describes (named).
        """
        from gstalk.errors import InputError, WorkspaceError
        from gstalk.tensorio import load_tensors

        p = Path(path) if path is not None else ASSET
        try:
            tensors, meta = load_tensors(p)
        except WorkspaceError as exc:
            raise InputError(f"The articulation prior {p} cannot be read: {exc.message}",
                             hint="give a file written by `python -m gstalk.prior fit`", path=p) from None
        if meta.get("kind") != KIND:
            raise InputError(f"{p} is not a gstalk articulation prior (its metadata has no kind '{KIND}').",
                             hint="give a file written by `python -m gstalk.prior fit`", path=p)
        if int(meta.get("schema", 0)) > SCHEMA:
            raise InputError(f"{p} is a prior of schema {meta.get('schema')}; this gstalk reads up to {SCHEMA}.",
                             hint="upgrade gstalk, or re-fit the prior with this version", path=p)
        try:
            ens = ArticulationEnsemble(int(meta["dim"]), int(meta["window"]), int(meta["hidden"]),
                                       int(meta["smooth"]), len(meta["names"]), int(meta["members"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{p}: the prior's metadata lacks or mis-states {exc}.",
                             hint="re-fit it with `python -m gstalk.prior fit`", path=p) from None
        expected = ens.state_dict()
        state = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("module.")}
        missing = sorted(set(expected) - set(state))
        if missing:
            raise InputError(f"{p}: the prior lacks the tensor 'module.{missing[0]}' ({len(missing)} missing).",
                             hint="re-fit it with `python -m gstalk.prior fit`", path=p)
        for k, v in expected.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise InputError(f"{p}: the prior's tensor 'module.{k}' has shape {list(state[k].shape)}, expected "
                                 f"{list(v.shape)} for {meta['dim']} features x {meta['window']} steps.",
                                 hint="re-fit it with `python -m gstalk.prior fit`", path=p)
        ens.load_state_dict({k: state[k].float() for k in expected})
        ens.eval().requires_grad_(False)
        return cls(ens, meta, p)


def resolve_prior(setting: str, features: str, audio: dict[str, Any], window: int,
                  names: Sequence[str] = ARTICULATION_NAMES) -> tuple[ArticulationPrior | None, str]:
    """The prior a fine run starts from, and a sentence saying which and why.

    Args:
        setting: ``auto`` (the shipped prior, when it matches the workspace's audio features),
            ``none``, or the path of a prior file.
        features, audio, window: the workspace's front end name, its AudioFeatureConfig as a
            dict, and the steps per window.

    Returns:
        (the prior or None, a sentence for the log and the summary).

    Raises:
        UsageError: a prior file named by the user does not match the workspace.
        InputError: it cannot be read (see :meth:`ArticulationPrior.load`).
    """
    from gstalk.errors import UsageError

    if setting in ("none", "", None):
        return None, "no articulation prior (articulation_prior=none): the regressor learns from this clip alone"
    if setting == "auto":
        if not ASSET.is_file():
            return None, "no articulation prior: the shipped one is missing from this install"
        prior = ArticulationPrior.load()
        why = prior.compatible(features, audio, window, names)
        if why is not None:
            return None, (f"no articulation prior: the shipped one does not fit this workspace ({why}); re-extract "
                          f"with `--audio-features {prior.features}` to use it")
        return prior, (f"articulation prior: the shipped one ({prior.meta.get('speakers', '?')} speakers, "
                       f"{prior.meta.get('frames', '?')} frames)")
    prior = ArticulationPrior.load(setting)
    why = prior.compatible(features, audio, window, names)
    if why is not None:
        raise UsageError(f"The articulation prior {setting} does not fit this workspace: {why}.",
                         hint="fit one on the same audio features (`python -m gstalk.prior fit --features ...`), "
                              "or use --set articulation_prior=auto")
    return prior, f"articulation prior: {setting} ({prior.meta.get('speakers', '?')} speakers)"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gather(windows: np.ndarray | torch.Tensor, smooth: int) -> torch.Tensor:
    """Windows of the K = ``smooth`` frames around every frame of one clip, clamped at its
    ends: [N, W, C] -> [N, K, W, C] float32."""
    from gstalk.deform.audio import neighbour_indices

    w = torch.as_tensor(np.asarray(windows, np.float32))
    return w[neighbour_indices(torch.arange(len(w)), smooth, len(w))]


def train_pooled(ensemble: ArticulationEnsemble, clips: Sequence[PriorClip], settings: PriorSettings,
                 progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Fit every member of ``ensemble`` on the pooled frames of ``clips`` (each frame with its
    own clip's neighbours and A/V offset), with early stopping on the last ``val_fraction`` of
    every clip; sets ``ensemble.gain`` as :func:`~gstalk.deform.articulation.fit_ensemble`
    does. Speed-perturbed copies (``speed`` ≠ 1) are fitted on but never validated on, and
    their last ``val_fraction`` (the same stretch of speech as their original's held-out
    frames) is left out altogether. Returns {"val_r2", "member_val_r2", "fit_r2", "gain"}."""
    xs, ys, val, orig = [], [], [], []
    for c in clips:
        x = gather(c.shifted_windows(), settings.smooth)
        n = len(x)
        n_val = max(1, int(round(n * settings.val_fraction)))
        recorded = c.speed == 1.0
        keep = n if recorded else n - n_val  # a copy's last tenth is its original's held-out speech
        xs.append(x[:keep])
        ys.append(torch.from_numpy(np.asarray(c.targets[:keep], np.float32)))
        mask = torch.zeros(keep, dtype=torch.bool)
        mask[n - n_val:] = recorded  # an empty slice for a copy
        val.append(mask)
        orig.append(torch.full((keep,), recorded))
    x, y, is_val, is_orig = torch.cat(xs), torch.cat(ys), torch.cat(val), torch.cat(orig)
    fit_ids, val_ids = torch.nonzero(~is_val)[:, 0], torch.nonzero(is_val)[:, 0]
    ref = y[~is_val & is_orig].mean(0)  # R²'s baseline: the recorded clips' mean code
    member_scores = []
    for k, member in enumerate(ensemble.members):
        rng = np.random.default_rng(settings.seed + k)
        params = list(member.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
        with torch.no_grad():
            best = (r2_score(member(x[val_ids]), y[val_ids], ref), [p.detach().clone() for p in params])
        for step in range(1, settings.steps + 1):
            pick = fit_ids[torch.from_numpy(rng.integers(len(fit_ids), size=settings.batch))]
            loss = (member(x[pick]) - y[pick]).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % settings.eval_every == 0 or step == settings.steps:
                with torch.no_grad():
                    score = r2_score(member(x[val_ids]), y[val_ids], ref)
                if score > best[0]:
                    best = (score, [p.detach().clone() for p in params])
        with torch.no_grad():
            for p, b in zip(params, best[1]):
                p.copy_(b)
        member.requires_grad_(False)
        member_scores.append(best[0])
        if progress is not None:
            progress(k)
    with torch.no_grad():
        pred_val = ensemble(x[val_ids])
        ratio = y[val_ids].var(0, unbiased=False).sum() / pred_val.var(0, unbiased=False).sum().clamp_min(1e-12)
        ensemble.gain.fill_(float(ratio.sqrt().clamp(1.0, 3.0)))
        return {"val_r2": r2_score(pred_val, y[val_ids], ref), "member_val_r2": float(np.mean(member_scores)),
                "fit_r2": r2_score(ensemble(x[fit_ids]), y[fit_ids], ref), "gain": float(ensemble.gain)}


def predict_clip(ensemble: ArticulationEnsemble, windows: np.ndarray) -> np.ndarray:
    """The ensemble's code for every frame of one clip: windows [N, W, C] -> [N, D] float64."""
    with torch.no_grad():
        return ensemble.predict_sequence(torch.as_tensor(np.asarray(windows, np.float32))).double().numpy()


def _flat(windows: np.ndarray) -> np.ndarray:
    return np.asarray(windows, np.float64).reshape(len(windows), -1)


def estimate_offsets(clips: Sequence[PriorClip], *, max_lag: int = 5, min_corr: float = 0.3,
                     alpha: float = 1000.0, synchronous: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Each clip's A/V offset, from a ridge regression (flattened windows -> lip opening)
    fitted on the *other speakers'* clips: the lag in [-max_lag, max_lag] at which its
    prediction correlates best with the clip's tracked opening (> 0: the audio is late).

    A lag is kept only when that correlation is at least ``min_corr`` (mismatched audio and
    video score ~0.07 on average, 95 % below 0.24); otherwise the offset is 0.

    Such a lag is relative: it says how a clip's audio lies against the *other clips'* average
    timing, and a corpus of web videos is late on average (encoders and uploads delay the
    audio). ``synchronous`` names clips known to be recorded in sync (GRID's lab recordings,
    whose word alignments index the video frames directly): the median of their kept lags is
    taken as zero, i.e. subtracted from every kept lag. Without it a prior learns the corpus's
    average delay, and its mouths lead new speech by that much (docs/methods.md, "Timing").

    Returns:
        {clip name: {"offset": int, "corr": correlation at the offset, "corr_at_zero",
        "best_lag", "corr_at_best", "anchor": the frames subtracted (0 without synchronous
        clips)}}; correlations None and offset 0 when there is no other clip.

    Raises:
        ValueError: a name in ``synchronous`` that is not a clip's.
    """
    unknown = sorted(set(synchronous) - {c.name for c in clips})
    if unknown:
        raise ValueError(f"synchronous clips not among the clips: {', '.join(unknown)}")
    from gstalk.metrics.lipsync import ridge, zscore
    from gstalk.tracking.avsync import correlate_lags

    out: dict[str, dict[str, Any]] = {}
    kept: set[str] = set()  # clips whose lag was confident enough to be used
    for c in clips:
        rest = [o for o in clips if o.speaker != c.speaker] or [o for o in clips if o is not c]
        if not rest:  # a single clip: nothing to estimate its offset from
            out[c.name] = {"offset": 0, "corr": None, "corr_at_zero": None, "best_lag": 0, "corr_at_best": None}
            continue
        w, b = ridge(np.concatenate([_flat(o.windows) for o in rest]),
                     np.concatenate([np.asarray(o.targets, np.float64)[:, 0] for o in rest]), alpha)
        curve = correlate_lags(zscore(np.asarray(c.targets, np.float64)[:, 0]), _flat(c.windows) @ w + b, max_lag)
        best = max(curve, key=lambda k: curve[k])
        keep = curve[best] >= min_corr
        out[c.name] = {"offset": int(best) if keep else 0, "corr": float(curve[best] if keep else curve[0]),
                       "corr_at_zero": float(curve[0]), "best_lag": int(best), "corr_at_best": float(curve[best])}
        if keep:
            kept.add(c.name)
    lags = [out[n]["offset"] for n in synchronous if n in kept]
    anchor = int(np.round(np.median(lags))) if lags else 0
    for name, v in out.items():
        v["offset"] -= anchor if name in kept else 0
        v["anchor"] = anchor
    return out


def fit_prior(clips: Sequence[PriorClip], settings: PriorSettings, features: str, audio: dict[str, Any],
              progress: Callable[[int], None] | None = None) -> ArticulationPrior:
    """Fit an :class:`ArticulationPrior` on ``clips`` (their ``offset`` already set).

    Args:
        features: the audio front end's name; audio: its AudioFeatureConfig as a dict.

    Returns:
        The prior, its metadata filled in (clips, settings, fit statistics).
    """
    if not clips:
        raise ValueError("fitting a prior needs at least one clip")
    w, c = clips[0].windows.shape[1:]
    torch.manual_seed(settings.seed)
    ens = ArticulationEnsemble(int(c), int(w), HIDDEN, settings.smooth, len(ARTICULATION_NAMES), settings.members)
    t0 = time.perf_counter()
    stats = train_pooled(ens, clips, settings, progress)
    ens.eval()
    meta = {"kind": KIND, "schema": SCHEMA, "features": features, "audio": audio, "window": int(w), "dim": int(c),
            "smooth": settings.smooth, "members": settings.members, "hidden": HIDDEN,
            "names": list(ARTICULATION_NAMES), "settings": dataclasses.asdict(settings),
            "fit": {**stats, "seconds": time.perf_counter() - t0},
            "clips": [{"name": k.name, "speaker": k.speaker, "frames": int(len(k.windows)), "offset": int(k.offset),
                       "sha256": k.sha256, **({"speed": k.speed} if k.speed != 1.0 else {})} for k in clips],
            "frames": int(sum(len(k.windows) for k in clips if k.speed == 1.0)),
            "perturbed_frames": int(sum(len(k.windows) for k in clips if k.speed != 1.0)),
            "speeds": sorted({k.speed for k in clips} - {1.0}),
            "speakers": len({k.speaker for k in clips})}
    from gstalk import __version__

    meta["gstalk_version"] = __version__
    return ArticulationPrior(ens, meta)


def clip_from_workspace(path: str | Path, features: str, *, speaker: str | None = None,
                        train_only: bool = True, speed: float = 1.0, offset: int = 0) -> PriorClip:
    """A fitting clip from a workspace whose track stage is done: the front end ``features``
    computed on its extracted audio (with the extract stage's audio settings), windowed per
    frame, and its tracked articulation code standardised over the frames kept.

    Args:
        train_only: keep only the workspace's training split (its test frames stay unseen, so
            eval numbers on it remain held-out).
        speed: ≠ 1 makes the speed-perturbed copy (:mod:`gstalk.audio.perturb`): the audio,
            first advanced by ``offset`` frames (put in sync), played ``speed`` times faster,
            and the tracked code resampled on the same clock; named ``NAME@speedS``, offset 0.
        offset: the clip's A/V offset in frames (> 0: the audio is late); used with ``speed``.

    Raises:
        WorkspaceError: the workspace has no finished track stage or no blendshape names.
    """
    from gstalk.audio import frame_windows
    from gstalk.audio.features import get_extractor, normalise, training_statistics
    from gstalk.config import AudioFeatureConfig, from_dict
    from gstalk.dataset import load_audio, load_tracks, split_indices
    from gstalk.errors import WorkspaceError
    from gstalk.workspace import Workspace

    ws = Workspace.open(path)
    if ws.stage("track").status != "done":
        raise WorkspaceError(f"Stage 'track' is not done in {ws.root}; the prior needs its mouth landmarks.",
                             hint=f"run `gstalk track {ws.root}` first")
    tracks = load_tracks(ws)
    if not tracks.has_articulation:
        raise WorkspaceError(f"{ws.root}: the tracks have no blendshape names.",
                             hint=f"re-run `gstalk track {ws.root}`")
    ex = ws.stage("extract")
    cfg = dataclasses.replace(from_dict(AudioFeatureConfig, ex.config.get("audio", {})), features=features)
    samples, sr = load_audio(ws)
    fps = float(ex.summary["fps"])
    art = tracks.articulation().double().numpy()
    keep = split_indices(ws)[0] if train_only else range(len(art))
    name = ws.root.name
    if speed != 1.0:
        from gstalk.audio.perturb import resample_frames, shift_audio, speed_perturb

        samples = speed_perturb(shift_audio(samples, sr, offset / fps), speed)
        art = resample_frames(art, speed)
        # the kept frames on the perturbed clock: those showing the kept span's time
        keep = range(int(np.ceil(keep.start / speed - 1e-9)), min(int(np.floor((keep.stop - 1) / speed + 1e-9)) + 1,
                                                                   len(art)))
        name = f"{name}@speed{speed:g}"
    extractor = get_extractor(features, cfg)
    steps = extractor(samples, sr)
    steps = normalise(steps, *training_statistics(extractor, steps))
    windows = frame_windows(steps, len(art), fps, extractor.steps_per_second, cfg.window, 0)
    art, windows = art[keep.start:keep.stop], windows[keep.start:keep.stop]
    targets = (art - art.mean(0)) / np.maximum(art.std(0), 1e-3)
    return PriorClip(name=name, speaker=speaker or ws.root.name, windows=windows.astype(np.float32),
                     targets=targets.astype(np.float32), sha256=str(ws.manifest.get("source", {}).get("sha256", "")),
                     speed=float(speed))


def workspace_audio_config(path: str | Path, features: str) -> dict[str, Any]:
    """The extract stage's audio settings of a workspace, with the front end ``features``:
    the settings a prior fitted on it expects (:meth:`ArticulationPrior.compatible`)."""
    from gstalk.config import AudioFeatureConfig, from_dict
    from gstalk.workspace import Workspace

    cfg = from_dict(AudioFeatureConfig, Workspace.open(path).stage("extract").config.get("audio", {}))
    return dataclasses.asdict(dataclasses.replace(cfg, features=features))


def _speed_arg(text: str) -> float:
    """``--speed S``: a float that :func:`gstalk.audio.perturb.speed_ratio` accepts, else
    argparse's usage error (exit code 2) naming the value."""
    import argparse

    from gstalk.audio.perturb import speed_ratio

    try:
        speed = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        speed_ratio(speed)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return speed


def main(argv: list[str] | None = None) -> int:
    """``python -m gstalk.prior fit WS [WS ...] -o FILE`` and ``python -m gstalk.prior info [FILE]``."""
    import argparse
    import json

    from gstalk.config import AudioFeatureConfig

    ap = argparse.ArgumentParser(prog="python -m gstalk.prior",
                                 description="Fit or inspect the multi-speaker audio -> articulation prior.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit on workspaces whose track stage is done")
    f.add_argument("workspaces", nargs="+", type=Path)
    f.add_argument("-o", "--output", default=str(ASSET))
    f.add_argument("--features", default=AudioFeatureConfig().features,
                   help="audio front end (default: gstalk's default front end)")
    f.add_argument("--speaker", action="append", default=[], metavar="WS=NAME",
                   help="speaker of a workspace (clips of one person share a name); default: its folder name")
    f.add_argument("--synchronous", action="append", default=[], metavar="WS",
                   help="a workspace whose clip is known to be in sync (e.g. GRID's): the offsets are "
                        "measured against these (repeat it); default: against the corpus's average")
    f.add_argument("--all-frames", action="store_true", help="also fit on each workspace's test split")
    f.add_argument("--speed", action="append", type=_speed_arg, default=[], metavar="S",
                   help="also fit on every clip played S times faster (speed perturbation, e.g. "
                        "--speed 0.9 --speed 1.1; repeat it); default: none")
    f.add_argument("--members", type=int, default=PriorSettings.members)
    f.add_argument("--steps", type=int, default=PriorSettings.steps)
    f.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("info", help="print a prior's metadata")
    i.add_argument("file", nargs="?", default=str(ASSET))
    args = ap.parse_args(argv)
    if args.cmd == "info":
        print(json.dumps(ArticulationPrior.load(args.file).meta, indent=2))
        return 0
    speakers = dict(s.split("=", 1) for s in args.speaker)
    clips = [clip_from_workspace(p, args.features, speaker=speakers.get(p.name) or speakers.get(str(p)),
                                 train_only=not args.all_frames) for p in args.workspaces]
    synchronous = sorted(Path(p).name for p in args.synchronous)
    offsets = estimate_offsets(clips, synchronous=synchronous)
    for c in clips:
        c.offset = int(offsets[c.name]["offset"])
    clips += [clip_from_workspace(p, args.features, speaker=c.speaker, train_only=not args.all_frames, speed=s,
                                  offset=c.offset)
              for s in args.speed if s != 1.0 for p, c in zip(args.workspaces, list(clips))]
    settings = PriorSettings(members=args.members, steps=args.steps, seed=args.seed)
    prior = fit_prior(clips, settings, args.features, workspace_audio_config(args.workspaces[0], args.features))
    prior.meta["offsets"] = offsets
    prior.meta["synchronous"] = synchronous
    prior.save(args.output)
    print(json.dumps({"output": args.output, "clips": len(clips), "frames": prior.meta["frames"],
                      "perturbed_frames": prior.meta["perturbed_frames"],
                      "speakers": prior.meta["speakers"], "fit": prior.meta["fit"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
