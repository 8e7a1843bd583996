"""The deformation interface shared by the fine-stage models.

A model maps each canonical Gaussian (its position) and a per-frame condition (the audio
code, the eye blink) to offsets of its attributes: G' = G + ΔG (GSTalker Sec. 3.2,
Audio-Plane Eq. 7). Models only run the forward pass; training lives in ``gstalk.train``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Deltas:
    """Per-Gaussian offsets, all float32.

    Attributes:
        means: [N, 3] metres, added to the canonical means.
        quats: [N, 4] added to the raw (unnormalised) quaternions.
        scales: [N, 3] added to the log-scales.
        opacities: [N] added to the opacity logits, or None.
        colors: [N, 3] added to the degree-0 SH coefficients (RGB), or None.
        weight: [N] dynamism weight d in [0, 1] multiplying the offsets (Audio-Plane's
            dynamic splatting), or None (= 1).
        rigid_free: remove the rigid part of ``means`` when applied (see :func:`apply_deltas`).
    """

    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor | None = None
    colors: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    rigid_free: bool = False


class MLP(nn.Module):
    """Plain MLP with ReLU; the last layer starts at zero so training starts from the
    canonical (coarse) Gaussians.

    Input [..., in_dim] -> [..., out_dim].
    """

    def __init__(self, in_dim: int, hidden: int, layers: int, out_dim: int, zero_last: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        last = nn.Linear(dims[-1], out_dim)
        if zero_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        mods.append(last)
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SplitInputMLP(nn.Module):
    """An MLP over ``concat(per_gaussian [N, S], shared [D])`` that applies the first layer's
    shared part once: ``W [s; c] = W_s s + W_c c``, identical to concatenation fusion but
    N times cheaper for the condition.

    Input: per_gaussian [N, S], shared [D]. Output: [N, out_dim].
    """

    def __init__(self, per_dim: int, shared_dim: int, hidden: int, layers: int, out_dim: int):
        super().__init__()
        self.first_per = nn.Linear(per_dim, hidden)
        self.first_shared = nn.Linear(shared_dim, hidden, bias=False)
        self.rest = MLP(hidden, hidden, max(layers - 1, 0), out_dim)

    def forward(self, per_gaussian: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        return self.forward_hidden(self.first_per(per_gaussian), shared)

    def forward_hidden(self, hidden_per: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """The same from ``first_per(per_gaussian)`` [N, hidden], which a renderer can
        compute once for all frames (it does not depend on the condition)."""
        return self.rest(torch.relu_(hidden_per + self.first_shared(shared)[None]))


class DeformationModel(nn.Module):
    """Base class: ``spatial(means)`` then ``deform(spatial, code, blink)``.

    Subclasses implement :meth:`spatial` ([N, 3] -> [N, S] features, independent of the
    audio, so render can cache them), :meth:`encode_audio` ([B, K, W, C'] condition windows
    -> [B, A] codes) and :meth:`deform`. The condition windows are the audio feature windows
    themselves, or, for a model with an ``articulator``
    (:class:`~gstalk.deform.articulation.ArticulationEnsemble`; such a model also registers
    the scalar buffer ``code_scale``), windows of the mouth articulation code that
    :meth:`conditions` predicts from the audio.
    """

    def __init__(self) -> None:
        super().__init__()
        self.articulator: nn.Module | None = None
        self.torso: nn.Module | None = None  # a TorsoField (gstalk.deform.torso) when trained with one
        self.window = 16

    def setup_conditioning(self, audio_in_dim: int, window: int, articulation: int, members: int,
                           smooth: int) -> int:
        """Create the frozen audio -> articulation regressor when ``articulation`` > 0 (and
        the ``code_scale`` buffer); returns the feature size of the condition windows the
        model's own audio encoder reads (``articulation`` or ``audio_in_dim``).

        Every model calls it first in its constructor, before drawing any weights of its
        own, so that under one seed all models get the same regressor (its held-out R² varies
        with the initial weights: 0.47-0.54 on ``obama.mp4``) and their scores compare.
        ``tests/test_fine_models.py`` checks it."""
        from gstalk.deform.articulation import ArticulationEnsemble

        self.window = window
        if articulation > 0:
            self.register_buffer("code_scale", torch.ones(()))
            self.articulator = ArticulationEnsemble(audio_in_dim, window, 32, smooth, articulation, members)
            return articulation
        return audio_in_dim

    def spatial(self, means: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_audio(self, windows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def deform(self, spatial: torch.Tensor, audio_code: torch.Tensor, blink: torch.Tensor) -> Deltas:
        raise NotImplementedError

    def code_windows(self, codes: torch.Tensor) -> torch.Tensor:
        """Articulation codes [N, D] as condition windows [N, W, D] (each code repeated over
        the W steps the audio encoder expects)."""
        return codes[:, None, :].expand(-1, self.window, -1).contiguous()

    def predict_codes(self, audio_windows: torch.Tensor) -> torch.Tensor:
        """Articulation codes that drive the field, from audio windows [N, W, C] of a whole
        clip in frame order: the articulator's prediction times ``code_scale`` -> [N, D].

        ``code_scale`` (a buffer, set when the articulator is fitted) matches the spread of
        the predicted code to that of the codes the field was trained on: the regressor's
        shrinkage undone (its ``gain``) times sqrt(1 + σ²) for the training noise σ."""
        assert self.articulator is not None
        with torch.no_grad():
            return self.articulator.predict_sequence(audio_windows) * self.code_scale

    def conditions(self, audio_windows: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """The per-frame condition sequence from the audio: windows [N, W, C] of a whole clip,
        in frame order -> [N, W, C'] (the audio itself, or :meth:`predict_codes` times ``gain``
        as windows: ``gain`` > 1 moves the mouth more, < 1 less, as GeneFace++'s mouth
        amplitude; the codes are standardised, so 0 is the speaker's average mouth)."""
        if self.articulator is None:
            return audio_windows
        return self.code_windows(self.predict_codes(audio_windows) * gain)

    @property
    def condition_context(self) -> int:
        """K: how many neighbouring frames' audio windows one frame's condition reads (the
        articulator's smoothing frames, ``K//2`` before and ``K - K//2 - 1`` after the frame;
        1 without an articulator). See :meth:`frame_conditions`."""
        return int(self.articulator.smooth) if self.articulator is not None else 1

    def frame_conditions(self, neighbour_windows: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """The conditions of single frames, for live streams: each frame from the audio windows
        of its :attr:`condition_context` neighbours [B, K, W, C] (frame ``i``'s are frames
        ``i - K//2 .. i + K - K//2 - 1``, clamped to the stream as :meth:`conditions` clamps
        them to the clip) -> [B, W, C']. Equal to the matching rows of :meth:`conditions` on
        the whole sequence (up to float rounding of a different batch)."""
        k = self.condition_context
        if neighbour_windows.dim() != 4 or neighbour_windows.shape[1] != k:
            raise ValueError(f"frame_conditions expects [B, {k}, W, C] neighbour windows, "
                             f"got {list(neighbour_windows.shape)}")
        if self.articulator is None:
            return neighbour_windows[:, k // 2]
        with torch.no_grad():
            codes = self.articulator(neighbour_windows) * self.code_scale
        return self.code_windows(codes * gain)

    def forward(self, means: torch.Tensor, windows: torch.Tensor, blink: torch.Tensor) -> Deltas:
        """Offsets for one frame: means [N, 3], condition windows [1, K, W, C'], blink [1]."""
        return self.deform(self.spatial(means), self.encode_audio(windows)[0], blink)


def remove_rigid(means: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Remove the best-fitting small rigid motion from per-point offsets.

    Least squares over all points for ``offsets_i ≈ ω × (μ_i − c) + τ`` (a linearised
    rotation ω about the centroid c and a translation τ), then subtract it: what remains is
    the non-rigid part. Linear in ``offsets``, so gradients flow through.

    Args:
        means: [N, 3] canonical positions (metres).
        offsets: [N, 3] position offsets (metres).

    Returns:
        [N, 3] offsets without their rigid component.
    """
    if means.shape[0] < 3:
        return offsets - offsets.mean(0, keepdim=True)
    a, proj = _rigid_basis(means.detach())
    return offsets - (a @ (proj @ offsets.reshape(-1))).reshape(-1, 3)


_RIGID_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _rigid_basis(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [3N, 6], (AᵀA)⁻¹Aᵀ [6, 3N]) of :func:`remove_rigid` for these means; the last one
    is cached (a renderer deforms the same canonical means every frame), keyed on the
    tensor's storage, version, shape and values' sum."""
    key = (means.data_ptr(), means._version, tuple(means.shape), means.dtype, float(means.sum()))
    hit = _RIGID_CACHE.get(key)
    if hit is not None:
        return hit
    p = means - means.mean(0, keepdim=True)
    zero = torch.zeros_like(p[:, 0])
    # ω × p = -[p]_x ω, rows of -[p]_x per point: [N, 3, 3]
    skew = torch.stack([torch.stack([zero, p[:, 2], -p[:, 1]], -1),
                        torch.stack([-p[:, 2], zero, p[:, 0]], -1),
                        torch.stack([p[:, 1], -p[:, 0], zero], -1)], 1)
    eye = torch.eye(3, dtype=p.dtype).expand(p.shape[0], 3, 3)
    a = torch.cat([skew, eye], dim=2).reshape(-1, 6)  # [3N, 6]
    ata = a.T @ a + 1e-9 * torch.eye(6, dtype=p.dtype)
    proj = torch.linalg.solve(ata, a.T)  # [6, 3N]
    _RIGID_CACHE.clear()
    _RIGID_CACHE[key] = (a, proj)
    return a, proj


def apply_deltas(params: dict[str, torch.Tensor], d: Deltas) -> dict[str, torch.Tensor]:
    """Deformed raw parameters: means + w·Δμ, quats + w·Δq, log-scales + w·Δs, and when
    present opacity logits + w·Δo and SH DC + w·Δc (w = 1 or the dynamism weight d).

    ``d.rigid_free`` removes the rigid part of Δμ first (:func:`remove_rigid`): the head's
    rigid motion is the tracked camera's job, and an audio-driven field that moves the whole
    head learns speech-correlated tracking residuals that do not transfer to new audio."""
    w = d.weight[:, None] if d.weight is not None else 1.0
    out = dict(params)
    dmeans = remove_rigid(params["means"], d.means) if d.rigid_free else d.means
    out["means"] = params["means"] + w * dmeans
    out["quats"] = params["quats"] + w * d.quats
    out["scales"] = params["scales"] + w * d.scales
    if d.opacities is not None:
        out["opacities"] = params["opacities"] + (w[:, 0] if d.weight is not None else 1.0) * d.opacities
    if d.colors is not None:
        out["sh0"] = params["sh0"] + (w * d.colors)[:, None, :]
    return out
