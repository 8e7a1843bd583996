"""Mouth articulation: a small code of how the mouth is shaped, and its regression from audio.

Why: a deformation field driven by raw audio codes, trained on a 3-5 minute clip, learns
whatever in the audio correlates with the pixels of the training frames, including
tracking residuals and the 52 blendshapes' noise, and mispredicts the mouth on new speech
(on obama.mp4, cpu-quick: a fine model driven by raw audio was *worse* than the static coarse
model inside the mouth box of the test frames). gstalk therefore splits the audio-to-motion
map in two, as "audio → expression → deformation" systems do:

1. :func:`articulation_features`: per tracked frame, D = 7 numbers that speech explains
   (lip opening inside and outside, mouth width, and the jawOpen, mouthFunnel, mouthPucker,
   mouthClose blendshapes), standardised over the training frames. Held-out R² of an audio
   regressor is ~0.67 for these, ~0 for the full set of 27 mouth/jaw blendshapes.
2. :class:`ArticulationEnsemble`: audio windows of K neighbouring frames → the code, the
   mean of M :class:`ArticulationRegressor` s, each fitted first, alone, with early stopping
   on the last tenth of the training frames (:func:`fit_ensemble`), then frozen. One
   regressor's held-out R² swings with its seed (0.32-0.68 over 5 seeds on obama.mp4); the
   mean of 5 gives 0.64.
3. The deformation field is conditioned on the code. It trains on the *tracked* code plus
   Gaussian noise of about the regressor's held-out error (so it learns a smooth map that
   tolerates the regressor's mistakes) and renders from the *predicted* code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from gstalk.deform.audio import AudioEncoder, neighbour_indices

ARTICULATION_NAMES = ("inner_opening", "outer_opening", "mouth_width",
                      "jawOpen", "mouthFunnel", "mouthPucker", "mouthClose")
# MediaPipe face-mesh landmark indices
_UPPER_INNER, _LOWER_INNER, _UPPER_OUTER, _LOWER_OUTER = 13, 14, 0, 17
_LEFT_CORNER, _RIGHT_CORNER = 61, 291
_FOREHEAD, _CHIN, _LEFT_CHEEK, _RIGHT_CHEEK = 10, 152, 234, 454


def articulation_features(landmarks: torch.Tensor, blendshapes: torch.Tensor,
                          blendshape_names: tuple[str, ...]) -> torch.Tensor:
    """Raw (unstandardised) articulation features of each frame.

    Args:
        landmarks: [N, 478, 3] float32 MediaPipe face-mesh landmarks in pixels (x right, y down).
        blendshapes: [N, 52] float32 MediaPipe blendshape scores in [0, 1].
        blendshape_names: the 52 names, in column order.

    Returns:
        [N, 7] float32 in :data:`ARTICULATION_NAMES` order: inner and outer lip opening as a
        fraction of the face height (landmarks 10-152), mouth width as a fraction of the face
        width (234-454), then four blendshape scores.

    Raises:
        ValueError: a needed blendshape is missing from ``blendshape_names``.
    """
    lm = landmarks[..., :2].float()
    face_h = (lm[:, _FOREHEAD] - lm[:, _CHIN]).norm(dim=-1).clamp_min(1e-6)
    face_w = (lm[:, _LEFT_CHEEK] - lm[:, _RIGHT_CHEEK]).norm(dim=-1).clamp_min(1e-6)
    cols = [(lm[:, _LOWER_INNER, 1] - lm[:, _UPPER_INNER, 1]) / face_h,
            (lm[:, _LOWER_OUTER, 1] - lm[:, _UPPER_OUTER, 1]) / face_h,
            (lm[:, _RIGHT_CORNER] - lm[:, _LEFT_CORNER]).norm(dim=-1) / face_w]
    for name in ARTICULATION_NAMES[3:]:
        if name not in blendshape_names:
            raise ValueError(f"blendshape '{name}' missing from the tracks (have {len(blendshape_names)} names)")
        cols.append(blendshapes[:, blendshape_names.index(name)].float())
    return torch.stack(cols, dim=1)


def standardise(features: torch.Tensor, indices: torch.Tensor | list[int]) -> torch.Tensor:
    """``features`` [N, D] minus the mean, over the std (clamped at 1e-3) of rows ``indices``."""
    sel = features[torch.as_tensor(list(indices), dtype=torch.long)]
    return (features - sel.mean(0)) / sel.std(0).clamp_min(1e-3)


def code_range(codes: torch.Tensor) -> dict[str, list[float]]:
    """The per-dimension range of articulation codes [N, D] (N >= 1): {"min": [D], "max": [D]}
    as plain floats, for a model spec (:meth:`~gstalk.deform.base.DeformationModel.set_code_range`).

    Raises:
        ValueError: no codes, or a code that is not finite.
    """
    if codes.dim() != 2 or codes.shape[0] == 0:
        raise ValueError(f"code_range needs codes [N >= 1, D], got {list(codes.shape)}")
    if not bool(torch.isfinite(codes).all()):
        raise ValueError("code_range: the codes are not all finite")
    c = codes.detach().float().cpu()
    return {"min": c.min(0).values.tolist(), "max": c.max(0).values.tolist()}


def r2_score(pred: torch.Tensor, target: torch.Tensor, reference_mean: torch.Tensor | None = None) -> float:
    """Coefficient of determination 1 - SSE/SST over all entries of [B, D] tensors; SST is
    taken about ``reference_mean`` [D] (default: the targets' own mean)."""
    pred, target = pred.detach(), target.detach()
    mu = target.mean(0) if reference_mean is None else reference_mean.detach()
    sst = (target - mu).square().sum().clamp_min(1e-12)
    return float(1.0 - (pred - target).square().sum() / sst)


class ArticulationRegressor(nn.Module):
    """Audio → articulation code: :class:`~gstalk.deform.audio.AudioEncoder` (AudioNet per
    frame + attention over K neighbours) then a linear layer.

    Args:
        audio_in_dim: C, audio features per step; window: W steps per frame.
        hidden: audio code size; smooth: K frames; out_dim: D.

    Input: [B, K, W, C] float32. Output: [B, D] float32 (standardised units).
    """

    def __init__(self, audio_in_dim: int, window: int = 16, hidden: int = 32, smooth: int = 8, out_dim: int = 7):
        super().__init__()
        self.encoder = AudioEncoder(audio_in_dim, window, hidden, smooth)
        self.out = nn.Linear(hidden, out_dim)
        self.smooth = self.encoder.smooth

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(windows))

    def predict_sequence(self, windows: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Codes of a whole sequence: windows [N, W, C] (one per frame, in order) → [N, D];
        neighbours past either end are clamped to the first/last frame."""
        return _predict_sequence(self, windows, self.smooth, self.out.out_features, batch)


class ArticulationEnsemble(nn.Module):
    """The mean of ``members`` independently initialised :class:`ArticulationRegressor` s.

    Input: [B, K, W, C] float32. Output: [B, D] float32 (standardised units).
    """

    def __init__(self, audio_in_dim: int, window: int = 16, hidden: int = 32, smooth: int = 8, out_dim: int = 7,
                 members: int = 5):
        super().__init__()
        if members < 1:
            raise ValueError(f"an ensemble needs at least one member, got {members}")
        self.members = nn.ModuleList(ArticulationRegressor(audio_in_dim, window, hidden, smooth, out_dim)
                                     for _ in range(members))
        self.smooth = self.members[0].smooth
        self.out_dim = out_dim
        # std of the tracked code over std of the prediction on held-out frames (set by fit_ensemble)
        self.register_buffer("gain", torch.ones(()))
        # load_state_dict(assign=True) puts new Parameter objects in: infer's list is stale
        self.register_load_state_dict_post_hook(_drop_fused)  # a module function: the module pickles

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(windows) for m in self.members]).mean(0)

    def infer(self, windows: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without gradients, the members run as one network
        (:class:`~gstalk.deform.fused.FusedEnsemble`: equal up to float rounding, about 5×
        fewer tensor operations). The stacked weights are kept and rebuilt when a parameter
        has changed (in-place updates bump a tensor's version; ``load_state_dict`` copies in
        place). The parameters are listed once: walking the modules for them each call cost
        130 µs of a 1.1 ms call; ``load_state_dict(assign=True)``, which puts new parameter
        objects in, makes it list them again. Replacing a parameter by hand is not seen."""
        from gstalk.deform.fused import FusedEnsemble

        params = self.__dict__.get("_fused_params")
        if params is None:
            params = self.__dict__["_fused_params"] = list(self.parameters())
        key = tuple((p.data_ptr(), p._version) for p in params)
        cached = self.__dict__.get("_fused")
        if cached is None or cached[0] != key:
            cached = (key, FusedEnsemble(self))
            self.__dict__["_fused"] = cached
        return cached[1](windows)

    def predict_sequence(self, windows: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """As :meth:`ArticulationRegressor.predict_sequence`, averaged over the members
        (:meth:`infer` when gradients are off)."""
        fn = self if torch.is_grad_enabled() else self.infer
        return _predict_sequence(fn, windows, self.smooth, self.out_dim, batch)


def _drop_fused(module: ArticulationEnsemble, _keys: object) -> None:
    """Forget :meth:`ArticulationEnsemble.infer`'s parameter list and stacked weights (a
    load_state_dict post-hook; they are rebuilt on the next call)."""
    module.__dict__.pop("_fused_params", None)
    module.__dict__.pop("_fused", None)


def _predict_sequence(module: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, smooth: int,
                      out_dim: int, batch: int) -> torch.Tensor:
    n = windows.shape[0]
    out = []
    for s in range(0, n, batch):
        ids = neighbour_indices(torch.arange(s, min(s + batch, n)), smooth, n)
        out.append(module(windows[ids]))
    return torch.cat(out) if out else windows.new_zeros(0, out_dim)


def _split(frame_ids: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) frames: the held-out ones are the last ``val_fraction`` of the clip's
    training frames, a contiguous stretch (so not neighbours of the fitted frames)."""
    ids = torch.as_tensor(frame_ids, dtype=torch.long)
    n_val = max(1, int(round(len(ids) * val_fraction))) if len(ids) > 1 else 0
    return (ids[:-n_val], ids[-n_val:]) if n_val else (ids, ids)


def fit_articulation(regressor: ArticulationRegressor, audio: torch.Tensor, targets: torch.Tensor,
                     frame_ids: torch.Tensor, *, steps: int = 1000, batch: int = 32, lr: float = 1e-3,
                     eval_every: int = 25, val_fraction: float = 0.1, seed: int = 0) -> dict[str, float]:
    """Fit ``regressor`` in place (Adam, weight decay 1e-4) and keep its best weights.

    The last ``val_fraction`` of ``frame_ids`` (a contiguous stretch of the clip) is held
    out; every ``eval_every`` steps the held-out R² is measured, and the best weights are
    restored at the end (early stopping).

    Args:
        audio: [N_all, W, C] float32 feature windows of every frame (A/V offset applied).
        targets: [N_all, D] float32 standardised articulation of every frame.
        frame_ids: [F] int64 training frames (F >= 2), in clip order.

    Returns:
        {"best_step", "val_r2", "fit_r2"}.
    """
    ids = torch.as_tensor(frame_ids, dtype=torch.long)
    fit, val = _split(ids, val_fraction)
    n = audio.shape[0]
    rng = np.random.default_rng(seed)
    params = list(regressor.parameters())
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-4)
    ref = targets[ids].mean(0)

    def predict(sel: torch.Tensor) -> torch.Tensor:
        return regressor(audio[neighbour_indices(sel, regressor.smooth, n)])

    with torch.no_grad():
        best = (r2_score(predict(val), targets[val], ref), [p.detach().clone() for p in params], 0)
    for step in range(1, steps + 1):
        pick = fit[torch.from_numpy(rng.integers(len(fit), size=batch))]
        loss = (predict(pick) - targets[pick]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                score = r2_score(predict(val), targets[val], ref)
            if score > best[0]:
                best = (score, [p.detach().clone() for p in params], step)
    with torch.no_grad():
        for p, b in zip(params, best[1]):
            p.copy_(b)
        fit_r2 = r2_score(predict(fit), targets[fit], ref)
    return {"best_step": float(best[2]), "val_r2": float(best[0]), "fit_r2": fit_r2}


def fit_ensemble(ensemble: ArticulationEnsemble, audio: torch.Tensor, targets: torch.Tensor,
                 frame_ids: torch.Tensor, *, steps: int = 1000, val_fraction: float = 0.1, seed: int = 0,
                 lr: float = 1e-3, progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Fit each member with :func:`fit_articulation` (member k samples with seed ``seed + k``).

    Args: as :func:`fit_articulation`; ``progress(k)`` is called after member k.

    Also sets ``ensemble.gain``: sqrt(Σ_d Var(target_d) / Σ_d Var(prediction_d)) over the
    held-out frames, clamped to [1, 3]. A least-squares regressor shrinks towards the mean
    (for an unbiased one Var(prediction) ≈ R² · Var(target)), so its raw output
    under-drives the mouth; the gain undoes the shrinkage when the code drives the field.
    With ``steps`` = 0 nothing is fitted to the clip, so every one of its frames is held out
    from the regressor (a prior fitted on other clips), and the gain and the held-out scores
    are measured over all of them: a 7-s clip's last tenth is 18 frames, and on aoc_hdtf the
    gain measured there swung 2.20 → 1.49 between two priors whose own gains (over their
    corpus) were 1.87 and 1.74; on menendez_sadtalker the R² there read −0.68 and over its
    182 frames 0.59.

    Returns:
        {"members", "val_r2" (the ensemble's held-out R²: on the last ``val_fraction`` of the
        frames, or on every frame with ``steps`` = 0), "start_val_r2" (the same before
        fitting), "member_val_r2" (the members' mean), "fit_r2" (the ensemble's on the fitted
        frames), "gain", "val_frames", "gain_frames" (how many frames each was measured on)}.
    """
    ids = torch.as_tensor(frame_ids, dtype=torch.long)
    fit, val = _split(ids, val_fraction)
    # the frames the scores and the gain are measured on: the held-out tenth, or every frame
    # when nothing is fitted (a prior used as it is: none of the clip's frames was fitted to)
    held = val if steps > 0 else ids
    ref = targets[ids].mean(0)
    n = audio.shape[0]
    held_windows = audio[neighbour_indices(held, ensemble.smooth, n)]  # gathered once: [H, K, W, C]
    with torch.no_grad():  # before fitting: a prior's score, or an untrained net's
        start_pred = ensemble(held_windows)
        start_r2 = r2_score(start_pred, targets[held], ref)
    member_val = []
    for k, member in enumerate(ensemble.members):
        if steps > 0:
            member_val.append(fit_articulation(member, audio, targets, frame_ids, steps=steps, lr=lr,
                                               val_fraction=val_fraction, seed=seed + k)["val_r2"])
        else:
            with torch.no_grad():
                member_val.append(r2_score(member(held_windows), targets[held], ref))
        if progress is not None:
            progress(k)
    with torch.no_grad():  # one pass over every frame: _split keeps ids' order, fit first
        # nothing fitted: the start prediction is this one (held is ids, in that order)
        pred = start_pred if steps == 0 else ensemble(audio[neighbour_indices(ids, ensemble.smooth, n)])
        pred_fit, pred_held = pred[:len(fit)], (pred[len(pred) - len(val):] if steps > 0 else pred)
        val_r2 = r2_score(pred_held, targets[held], ref)
        fit_r2 = r2_score(pred_fit, targets[fit], ref)
        ratio = targets[held].var(0, unbiased=False).sum() / pred_held.var(0, unbiased=False).sum().clamp_min(1e-12)
        ensemble.gain.fill_(float(ratio.sqrt().clamp(1.0, 3.0)) if len(held) > 1 else 1.0)
    return {"members": float(len(ensemble.members)), "val_r2": val_r2, "start_val_r2": start_r2,
            "member_val_r2": float(np.mean(member_val)), "fit_r2": fit_r2, "gain": float(ensemble.gain),
            "val_frames": float(len(held)), "gain_frames": float(len(held))}


def describe_fit(val_r2: float, seconds: float, prior: bool, seen_by_prior: str | None = None) -> tuple[str, str]:
    """What an audio → articulation fit learnt, in words: (level, sentence).

    Args:
        val_r2: held-out R² of the fit (the last tenth of the training frames; all of them for a
            prior used as it is, which was fitted to none).
        seconds: length of the training clip's training split.
        prior: whether the regressor started from the multi-speaker prior.
        seen_by_prior: the name of the prior's corpus clip this video is
            (:meth:`gstalk.prior.ArticulationPrior.fitted_on`), or None. When given, the prior
            was fitted on these training frames, so ``val_r2`` is not held out, the sentence says
            so and suggests nothing.

    Returns:
        level in ``good`` (R² ≥ 0.4), ``fair`` (≥ 0.2), ``weak`` (≥ 0.05), ``none``; and a
        sentence with what would help.
    """
    level = "good" if val_r2 >= 0.4 else "fair" if val_r2 >= 0.2 else "weak" if val_r2 >= 0.05 else "none"
    what = {"good": "the mouth should follow new speech well",
            "fair": "the mouth follows new speech, with some misses",
            "weak": "the mouth follows new speech only loosely",
            "none": "it learnt almost nothing about how this speaker's mouth follows speech"}[level]
    helps = []
    if level != "good":
        if seconds < 60:
            helps.append(f"a longer clip ({seconds:.0f} s of training speech now; a minute or more helps most)")
        if not prior:
            helps.append("the multi-speaker prior (extract with the default --audio-features and "
                         "--set articulation_prior=auto)")
        if not helps:
            helps.append("a clip with clearer speech and a steadier, frontal face")
    if seen_by_prior:
        text = (f"audio -> mouth fit: R² {val_r2:.2f} ({level}), not held out: the articulation prior was fitted on "
                f"these training frames (this video is its corpus clip {seen_by_prior}), so a new speaker scores less")
        return level, text
    text = f"audio -> mouth fit: held-out R² {val_r2:.2f} ({level}): {what}"
    return level, text + (f"; would help: {' and '.join(helps)}" if helps else "")
