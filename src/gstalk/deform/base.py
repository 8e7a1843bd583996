"""The deformation interface shared by the fine-stage models.

A model maps each canonical Gaussian (its position) and a per-frame condition (the audio
code, the eye blink) to offsets of its attributes: G' = G + ΔG (GSTalker Sec. 3.2,
Audio-Plane Eq. 7). Models only run the forward pass; training lives in ``gstalk.train``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from gstalk.deform.articulation import ArticulationEnsemble


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


def head_outputs(appearance: bool) -> int:
    """Numbers a deformation head predicts per Gaussian: Δμ (3), Δq (4), Δs (3), and with
    ``appearance`` Δ opacity (1) and Δ colour (3)."""
    return 14 if appearance else 10


class DeformationModel(nn.Module):
    """Base class of the fine-stage models: ``spatial(means)`` then ``deform(spatial, code, blink)``.

    What callers (the trainer, :class:`~gstalk.render.head.TalkingHead`, the renderer) use,
    and every model declares:

    Attributes:
        smooth: K, the frames of condition windows per output frame: a frame's windows are
            those of the K frames around it (:func:`~gstalk.deform.audio.neighbour_indices`).
        window: W, feature steps per condition window.
        code_shape: the shape of one frame's audio code, :meth:`encode_audio`'s output
            without the batch: ``(A,)``, or ``(K, A)`` for a model that attends over the K
            frames' codes itself (EGSTalker's ESAA).
        position_scale: metres per unit of the head's position output.
        appearance: the head also predicts opacity and colour offsets.
        rigid_free: remove the rigid part of the position offsets (:func:`remove_rigid`).
        articulator: the frozen audio -> articulation regressor
            (:class:`~gstalk.deform.articulation.ArticulationEnsemble`; such a model also
            registers the scalar buffer ``code_scale``), or None (driven by the audio itself).
        code_min, code_max: [D] float32 buffers, the range of the tracked articulation code
            over the training frames (standardised units), when :meth:`set_code_range` was
            called (models trained before it have none): :meth:`clamp_codes` keeps the
            codes that drive a render inside it.
        torso: GSTalker's pose-conditioned torso field (:class:`~gstalk.deform.torso.TorsoField`)
            or None.

    Subclasses implement :meth:`spatial` ([N, 3] -> [N, S] features, independent of the
    audio, so render can cache them), :meth:`encode_audio` ([B, K, W, C'] condition windows
    -> [B, *code_shape]), :meth:`deform` and :meth:`grid_parameters`, and may add
    :meth:`splat_channels` / :meth:`losses` (Audio-Plane's dynamism map). The condition
    windows are the audio feature windows themselves or, with an ``articulator``, windows of
    the mouth articulation code that :meth:`conditions` predicts from the audio. Models only
    run the forward pass and never pick a device: the caller moves them (``.to(device)``).
    """

    smooth: int
    window: int
    code_shape: tuple[int, ...]
    position_scale: float
    appearance: bool
    rigid_free: bool

    def __init__(self) -> None:
        super().__init__()
        self.articulator: ArticulationEnsemble | None = None
        self.torso: nn.Module | None = None  # a TorsoField (gstalk.deform.torso) when trained with one
        self.window = 16
        self.smooth = 1
        self.code_shape = ()
        self.position_scale, self.appearance, self.rigid_free = 0.01, True, False

    def setup_conditioning(self, audio_in_dim: int, window: int, articulation: int, members: int,
                           smooth: int, code_encoder: str = "audionet") -> int:
        """Create the frozen audio -> articulation regressor when ``articulation`` > 0 (and
        the ``code_scale`` buffer); returns the feature size of the condition windows the
        model's own audio encoder reads (``articulation`` or ``audio_in_dim``).

        Every model calls it first in its constructor, before drawing any weights of its
        own, so that under one seed all models get the same regressor (its held-out R² varies
        with the initial weights: 0.47-0.54 on ``obama.mp4``) and their scores compare.
        ``tests/test_fine_models.py`` checks it. ``code_encoder``: ``mlp`` reads articulation
        codes with :class:`~gstalk.deform.audio.CodeNet`, ``audionet`` with AudioNet (the
        models trained before CodeNet). The regressor draws its weights from a fork
        of the random generator, so the field's own weights do not depend on the regressor's
        size (the audio front end, the prior): under one seed a model's field starts the
        same whatever the audio features."""
        from gstalk.deform.articulation import ArticulationEnsemble

        self.window = window
        # the per-frame encoder of the condition windows (gstalk.deform.audio.frame_net):
        # CodeNet for articulation codes (``code_encoder="mlp"``), AudioNet for audio and for
        # the codes of models trained before CodeNet (their specs lack the key)
        self.frame_net = "code" if articulation > 0 and code_encoder == "mlp" else "audionet"
        if articulation > 0:
            self.register_buffer("code_scale", torch.ones(()))
            with torch.random.fork_rng(devices=[]):
                self.articulator = ArticulationEnsemble(audio_in_dim, window, 32, smooth, articulation, members)
            return articulation
        return audio_in_dim

    def spatial(self, means: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_audio(self, windows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def deform(self, spatial: torch.Tensor, audio_code: torch.Tensor, blink: torch.Tensor) -> Deltas:
        raise NotImplementedError

    def grid_parameters(self) -> list[nn.Parameter]:
        """The feature grids (hash tables, dense planes and lines, audio prototypes): trained
        at the grid learning rate (:meth:`param_groups`)."""
        raise NotImplementedError

    def deltas_from_head(self, out: torch.Tensor) -> Deltas:
        """A deformation head's output [N, :func:`head_outputs`] as :class:`Deltas`: position
        (times ``position_scale``, metres), rotation, log-scale and, with ``appearance``,
        opacity logit and colour."""
        d = Deltas(means=out[:, 0:3] * self.position_scale, quats=out[:, 3:7], scales=out[:, 7:10],
                   rigid_free=self.rigid_free)
        if self.appearance:
            d.opacities, d.colors = out[:, 10], out[:, 11:14]
        return d

    def param_groups(self, lr_net: float, lr_grid: float) -> list[dict[str, Any]]:
        """Adam parameter groups of what the fine loop trains: ``grid`` (:meth:`grid_parameters`,
        ``lr_grid``, eps 1e-15) and ``net`` (everything else, ``lr_net``), each in
        ``named_parameters`` order; the articulator (fitted on its own, then frozen) and the
        torso (its own optimizer) are left out."""
        skip = {id(p) for m in (self.articulator, self.torso) if m is not None for p in m.parameters()}
        grid_ids = {id(p) for p in self.grid_parameters()}
        grid, net = [], []
        for _, p in self.named_parameters():
            if id(p) not in skip:
                (grid if id(p) in grid_ids else net).append(p)
        groups: list[dict[str, Any]] = [{"params": net, "lr": lr_net, "name": "net"}]
        if grid:
            groups.append({"params": grid, "lr": lr_grid, "name": "grid", "eps": 1e-15})
        return groups

    def splat_channels(self, deltas: Deltas, settings: Any) -> torch.Tensor | None:
        """[N, E] per-Gaussian channels to rasterize beside the colour for :meth:`losses`
        (Audio-Plane: its dynamism weight), or None. ``settings``: the model's own config
        (:meth:`gstalk.config.FineConfig.model_config`)."""
        return None

    def losses(self, out: Any, mouth_mask: torch.Tensor, settings: Any) -> dict[str, torch.Tensor]:
        """This model's own loss terms, weighted, for one rendered frame (the trainer adds
        them to the photometric loss).

        Args:
            out: the frame's :class:`~gstalk.render.head.HeadRender` (``channels`` holds what
                :meth:`splat_channels` asked for, [1, H, W, E]).
            mouth_mask: [1, H, W, 1] float32 in {0, 1}, the frame's tracked mouth.
            settings: the model's own config.
        """
        return {}

    def code_windows(self, codes: torch.Tensor) -> torch.Tensor:
        """Articulation codes [N, D] as condition windows [N, W, D] (each code repeated over
        the W steps the audio encoder expects)."""
        return codes[:, None, :].expand(-1, self.window, -1).contiguous()

    def set_code_range(self, code_min: torch.Tensor | list[float], code_max: torch.Tensor | list[float]) -> None:
        """Record the range of the articulation code the model was trained on: ``code_min``,
        ``code_max`` [D] (standardised units, the tracked code over the training frames) as
        the non-persistent buffers ``code_min`` / ``code_max`` (the spec carries them:
        :func:`~gstalk.deform.registry.build_model` calls this).

        Raises:
            ValueError: the two do not have one entry per code dimension, or min > max.
        """
        lo = torch.as_tensor(code_min, dtype=torch.float32).reshape(-1)
        hi = torch.as_tensor(code_max, dtype=torch.float32).reshape(-1)
        if lo.shape != hi.shape or bool((lo > hi).any()):
            raise ValueError(f"a code range needs min <= max per dimension, got {lo.tolist()} and {hi.tolist()}")
        self.register_buffer("code_min", lo, persistent=False)
        self.register_buffer("code_max", hi, persistent=False)

    @property
    def has_code_range(self) -> bool:
        """Whether :meth:`clamp_codes` clamps (the model records its training code range)."""
        return getattr(self, "code_min", None) is not None

    def clamp_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [..., D] clamped, per dimension, to the range the model was trained on
        (:meth:`set_code_range`; unchanged for a model without one).

        Why: the field and the coarse articulation basis are fitted on the training frames'
        codes only, and the basis is linear, so a code past that range is extrapolated: the
        predicted code fell outside it on 20-87 % of frames (mostly below the most closed
        mouth of the training frames), and a tracked code 1.5x past the widest training mouth
        tore the chin apart in colour. A clamped code renders the nearest mouth the model
        has seen (docs/methods.md, "The code's range")."""
        if not self.has_code_range:
            return codes
        return codes.clamp(self.code_min, self.code_max)

    def code_conditions(self, codes: torch.Tensor) -> torch.Tensor:
        """The condition windows a render reads for articulation codes [N, D] (standardised
        units, any gain already applied): clamped to the training range (:meth:`clamp_codes`),
        then repeated over the window (:meth:`code_windows`) -> [N, W, D]. Every render path
        takes this one (:meth:`conditions`, :meth:`frame_conditions`, eval's tracked- and
        neutral-code rows); training reads :meth:`code_windows` of its noisy tracked codes."""
        return self.code_windows(self.clamp_codes(codes))

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
        amplitude; the codes are standardised, so 0 is the speaker's average mouth), clamped
        to the training range (:meth:`clamp_codes`) after the gain."""
        if self.articulator is None:
            return audio_windows
        return self.code_conditions(self.predict_codes(audio_windows) * gain)

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
        codes = self.articulator.infer(neighbour_windows) * self.code_scale
        return self.code_conditions(codes * gain)

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
    key = (means.data_ptr(), means._version, tuple(means.shape), means.dtype, means.device, float(means.sum()))
    hit = _RIGID_CACHE.get(key)
    if hit is not None:
        return hit
    p = means - means.mean(0, keepdim=True)
    zero = torch.zeros_like(p[:, 0])
    # ω × p = -[p]_x ω, rows of -[p]_x per point: [N, 3, 3]
    skew = torch.stack([torch.stack([zero, p[:, 2], -p[:, 1]], -1),
                        torch.stack([-p[:, 2], zero, p[:, 0]], -1),
                        torch.stack([p[:, 1], -p[:, 0], zero], -1)], 1)
    eye = torch.eye(3, dtype=p.dtype, device=p.device).expand(p.shape[0], 3, 3)
    a = torch.cat([skew, eye], dim=2).reshape(-1, 6)  # [3N, 6]
    ata = a.T @ a + 1e-9 * torch.eye(6, dtype=p.dtype, device=p.device)
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
