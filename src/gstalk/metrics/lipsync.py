"""A lip-sync score without SyncNet: mouth opening against the opening the audio predicts.

SyncNet (LSE-C/LSE-D) needs weights we cannot download. gstalk's proxy is a ridge
regression from a ±240 ms window of log mel filter-bank features (python_speech_features'
``logfbank``, 26 bands, mean/variance-normalised per clip, averaged per 40 ms video frame,
13 frames) to the per-frame mouth opening (inner-lip gap / face height, z-scored per clip),
fitted on real footage of several speakers. A clip's score is the Pearson correlation of
its measured opening with the predicted one, at lag 0 and at the best lag within ±10
frames (that lag is the clip's A/V offset: > 0 = the audio is late). A plain energy
envelope scores real and mismatched audio alike; the regression separates them.

The coefficients ship with gstalk (``gstalk/assets/lipsync_ridge.json``) and are re-fitted
with ``python -m gstalk.metrics.lipsync fit WS [WS ...] -o FILE`` from workspaces whose
track stage is done (see :func:`fit_proxy`). The shipped ones are fitted on the six GRID
sentences alone (recorded in sync; ``info["clips"]``): a clip in the fit is read in sample,
its own A/V delay learnt into the weights, so no clip gstalk is evaluated on belongs there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gstalk.tracking.avsync import correlate_lags

ASSET = Path(__file__).resolve().parent.parent / "assets" / "lipsync_ridge.json"
N_BANDS = 26
CONTEXT = 6  # video frames each side: ±240 ms at 25 fps


def audio_context_features(samples: np.ndarray, sample_rate: int, n_frames: int, fps: float,
                           context: int = CONTEXT) -> np.ndarray:
    """Per-video-frame audio features: [N, (2·context + 1)·26] float64.

    Log mel filter-bank energies (25 ms windows every 10 ms) are normalised to zero mean and
    unit variance over the clip, averaged over each video frame's interval, and stacked over
    frames i − context .. i + context (clamped at the ends).

    Args:
        samples: [S] mono audio; sample_rate: Hz; n_frames: N video frames; fps: frames/s.
    """
    from python_speech_features import logfbank

    if samples.size == 0 or n_frames == 0:
        return np.zeros((n_frames, (2 * context + 1) * N_BANDS))
    fb = logfbank(samples.astype(np.float64), sample_rate, winlen=0.025, winstep=0.01, nfilt=N_BANDS,
                  nfft=int(2 ** np.ceil(np.log2(0.025 * sample_rate))))
    fb = (fb - fb.mean(0)) / (fb.std(0) + 1e-6)
    steps_per_frame = 100.0 / fps
    per = np.zeros((n_frames, N_BANDS))
    for i in range(n_frames):
        a = int(round(i * steps_per_frame))
        b = max(a + 1, int(round((i + 1) * steps_per_frame)))
        seg = fb[min(a, len(fb) - 1):min(b, len(fb))]
        per[i] = seg.mean(0) if len(seg) else fb[-1]
    idx = np.clip(np.arange(n_frames)[:, None] + np.arange(-context, context + 1)[None], 0, n_frames - 1)
    return per[idx].reshape(n_frames, -1)


def zscore(x: np.ndarray) -> np.ndarray:
    """(x − mean) / std over the clip ([N] -> [N]); zeros when x is constant."""
    s = x.std()
    return (x - x.mean()) / s if s > 1e-12 else np.zeros_like(x, dtype=np.float64)


def fill_nan(x: np.ndarray) -> np.ndarray:
    """Linear interpolation over the NaN entries of a [N] series (all NaN -> zeros)."""
    x = np.asarray(x, np.float64).copy()
    ok = np.isfinite(x)
    if not ok.any():
        return np.zeros_like(x)
    x[~ok] = np.interp(np.flatnonzero(~ok), np.flatnonzero(ok), x[ok])
    return x


def sync_scores(opening: np.ndarray, predicted: np.ndarray, max_lag: int = 10) -> dict[str, float]:
    """Lip-sync score of a mouth-opening series [N] (any units; NaN = not measured, filled
    linearly) against the opening the audio predicts [N]: {"sync_corr": Pearson correlation
    at lag 0, "sync_lag": the best lag in frames (> 0: the audio is late; searched within
    ±min(max_lag, N // 4)), "sync_corr_best": the correlation there}."""
    curve = correlate_lags(zscore(fill_nan(opening)), predicted, min(max_lag, max(len(opening) // 4, 0)))
    best = max(curve, key=lambda k: curve[k])
    return {"sync_corr": curve[0], "sync_lag": int(best), "sync_corr_best": curve[best]}


@dataclass
class LipSyncProxy:
    """Ridge coefficients: predicted z-scored opening = features · ``weights`` + ``bias``.

    Attributes:
        weights: [(2·context + 1)·26]; bias: scalar; context: frames each side.
        alpha: the ridge penalty used; info: how it was fitted (clips, lags, scores).
    """

    weights: np.ndarray
    bias: float
    context: int = CONTEXT
    alpha: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path | None = None) -> LipSyncProxy:
        """The shipped coefficients (or those in ``path``, a JSON written by :meth:`save`)."""
        d = json.loads(Path(path or ASSET).read_text(encoding="utf-8"))
        return cls(np.asarray(d["weights"], dtype=np.float64), float(d["bias"]), int(d["context"]),
                   float(d.get("alpha", 0.0)), d.get("info", {}))

    def save(self, path: str | Path) -> None:
        from gstalk.workspace import write_json

        write_json(path, {"kind": "gstalk lip-sync ridge proxy", "version": 1, "context": self.context,
                          "bands": N_BANDS, "alpha": self.alpha, "bias": self.bias,
                          "weights": [float(w) for w in self.weights], "info": self.info})

    def predict(self, samples: np.ndarray, sample_rate: int, n_frames: int, fps: float) -> np.ndarray:
        """Predicted (z-scored) mouth opening per video frame: [N]."""
        return audio_context_features(samples, sample_rate, n_frames, fps, self.context) @ self.weights + self.bias

    def score(self, opening: np.ndarray, samples: np.ndarray, sample_rate: int, fps: float,
              max_lag: int = 10) -> dict[str, float]:
        """Lip-sync score of a clip: its per-frame mouth opening [N] against the audio.

        Returns:
            :func:`sync_scores` of ``opening`` against :meth:`predict`.
        """
        return sync_scores(opening, self.predict(samples, sample_rate, len(opening), fps), max_lag)


def ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge regression with an unpenalised intercept: (weights [F], bias)."""
    xm, ym = x.mean(0), y.mean()
    xc = x - xm
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w, float(ym - xm @ w)


@dataclass
class Clip:
    """One clip for fitting: ``features`` [N, F], ``opening`` [N] z-scored, ``name``."""

    name: str
    features: np.ndarray
    opening: np.ndarray


def fit_proxy(clips: list[Clip], alphas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0),
              max_lag: int = 10) -> LipSyncProxy:
    """Fit the ridge proxy on several clips, pairing frame i with the audio around frame i.

    The penalty is chosen by leave-one-clip-out correlation, which is also reported per clip
    (``info["clips"][name]["held_out_corr"]``: how the proxy does on a clip it did not see),
    with the lag at which the held-out prediction correlates best (``best_lag``). Clips
    are not re-aligned: the ±6-frame context absorbs a small offset, and re-aligning each
    clip to the model that is being fitted drifts (tried: GRID clips moved to −7 frames).
    """
    scores: dict[float, list[tuple[float, int]]] = {}
    for a in alphas:
        held = []
        for k, c in enumerate(clips):
            rest = [o for j, o in enumerate(clips) if j != k]
            w, b = ridge(np.concatenate([r.features for r in rest]), np.concatenate([r.opening for r in rest]), a)
            curve = correlate_lags(c.opening, c.features @ w + b, max_lag)
            held.append((curve[0], max(curve, key=lambda lag: curve[lag])))
        scores[a] = held
    best_alpha = max(scores, key=lambda a: float(np.mean([h[0] for h in scores[a]])))
    w, b = ridge(np.concatenate([c.features for c in clips]), np.concatenate([c.opening for c in clips]), best_alpha)
    held = scores[best_alpha]
    info = {"clips": {c.name: {"frames": int(len(c.opening)), "held_out_corr": h[0], "best_lag": int(h[1])}
                      for c, h in zip(clips, held)},
            "held_out_mean_corr": float(np.mean([h[0] for h in held])),
            "alphas": {str(a): float(np.mean([h[0] for h in v])) for a, v in scores.items()}}
    return LipSyncProxy(w, b, clips[0].features.shape[1] // N_BANDS // 2, best_alpha, info)


def clip_from_workspace(ws_path: str | Path, frames: range | None = None) -> Clip:
    """A fitting clip from a workspace whose track stage is done: the extracted audio and the
    tracked mouth opening (``frames``: a sub-range, e.g. the training split)."""
    from gstalk.dataset import load_audio, load_tracks
    from gstalk.errors import WorkspaceError
    from gstalk.tracking.avsync import mouth_opening
    from gstalk.workspace import Workspace

    ws = Workspace.open(ws_path)
    if ws.stage("track").status != "done":
        raise WorkspaceError(f"Stage 'track' is not done in {ws.root}; fitting needs its mouth landmarks.",
                             hint=f"run `gstalk track {ws.root}` first")
    fps = float(ws.stage("extract").summary["fps"])
    samples, sr = load_audio(ws)
    lms = load_tracks(ws).landmarks.numpy()
    feats = audio_context_features(samples, sr, len(lms), fps)
    opening = mouth_opening(lms)
    if frames is not None:
        feats, opening = feats[frames.start:frames.stop], opening[frames.start:frames.stop]
    return Clip(Path(ws_path).name, feats, zscore(opening))


def main(argv: list[str] | None = None) -> int:
    """``python -m gstalk.metrics.lipsync fit WS [WS ...] -o FILE [--train-only]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m gstalk.metrics.lipsync",
                                 description="Fit the lip-sync proxy's ridge coefficients on tracked workspaces.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit on workspaces whose track stage is done")
    f.add_argument("workspaces", nargs="+")
    f.add_argument("-o", "--output", default=str(ASSET))
    f.add_argument("--train-only", action="store_true",
                   help="use only each workspace's training split (keeps its test frames unseen)")
    args = ap.parse_args(argv)
    from gstalk.dataset import split_indices
    from gstalk.workspace import Workspace

    clips = []
    for p in args.workspaces:
        frames = split_indices(Workspace.open(p))[0] if args.train_only else None
        clips.append(clip_from_workspace(p, frames))
    proxy = fit_proxy(clips)
    proxy.save(args.output)
    print(json.dumps({"output": args.output, "alpha": proxy.alpha, **proxy.info}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
