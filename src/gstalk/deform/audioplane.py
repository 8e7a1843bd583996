"""Audio-Plane's deformation (Audio-Plane, 2025, Sec. 3.2-3.5).

ΔG = D1(f), d = D2(f), G' = G + d · ΔG (Eq. 7), where f is the audio factorization plane's
feature of each canonical Gaussian for the frame's audio code (Eq. 4-6,
:class:`~gstalk.deform.planes.AudioFactorizationPlane`). The dynamism weight d is splatted
to a grey map g (Eq. 8) that the fine loop holds to the dilated mouth mask m with
L_mask = mean max(0, |m − g| − margin) (Eq. 9, see :func:`~gstalk.train.losses.mask_margin_loss`).

The audio code comes from the same encoder as GSTalker's (AudioNet + temporal smoothing; the
paper takes ER-NeRF's audio features and is silent on smoothing) and, by default, from the
mouth articulation code (:mod:`gstalk.deform.articulation`). The eye blink enters D1 by
concatenation (ER-NeRF/TalkingGaussian practice; the paper does not mention the eyes).
"""

from __future__ import annotations

from typing import Any

import torch

from gstalk.deform.audio import AudioEncoder
from gstalk.deform.base import MLP, DeformationModel, Deltas, SplitInputMLP, head_outputs
from gstalk.deform.planes import AudioFactorizationPlane


class AudioPlaneDeformation(DeformationModel):
    """Audio-Plane deformation field with dynamic splatting.

    Args:
        aabb: [2, 3] canonical box (metres).
        audio_in_dim, window: C features per step, W steps per frame window.
        audio_dim: audio code size (the query of Eq. 4); smooth: K frames of temporal smoothing.
        plane_dim: D (paper 16); plane_res: H (paper 64); scales: number of scales, s = 1..scales
            (paper 4).
        hidden, layers: D1, the deformation MLP.
        position_scale: metres per unit of the position output.
        articulation, articulation_members, articulation_smooth: as
            :class:`~gstalk.deform.gstalker.GSTalkerDeformation`.
        appearance: also predict opacity and colour offsets.
        rigid_free: remove the rigid part of the position offsets.
        dynamic: the dynamism weight d (dynamic splatting); off = d ≡ 1 (the "w/o D" ablation).
    """

    def __init__(self, aabb: torch.Tensor, audio_in_dim: int, window: int = 16, audio_dim: int = 32,
                 smooth: int = 8, plane_dim: int = 16, plane_res: int = 64, scales: int = 4, hidden: int = 64,
                 layers: int = 2, position_scale: float = 0.01, articulation: int = 0, articulation_members: int = 5,
                 articulation_smooth: int = 4, appearance: bool = True, rigid_free: bool = False,
                 dynamic: bool = True, code_encoder: str = "audionet"):
        super().__init__()
        cond_dim = self.setup_conditioning(audio_in_dim, window, articulation, articulation_members,
                                           articulation_smooth, code_encoder)
        self.audio = AudioEncoder(cond_dim, window, audio_dim, smooth, self.frame_net)
        self.smooth = self.audio.smooth
        self.code_shape = (audio_dim,)
        self.plane = AudioFactorizationPlane(aabb, audio_dim, plane_dim, plane_res, tuple(range(1, scales + 1)))
        self.head = SplitInputMLP(self.plane.out_dim, 1, hidden, layers, head_outputs(appearance))  # D1
        self.dynamic = dynamic
        if dynamic:  # D2, "a tiny MLP"; starts at d = 0.5 everywhere
            self.dynamism = MLP(self.plane.out_dim, 16, 1, 1)
        self.appearance, self.rigid_free, self.position_scale = appearance, rigid_free, position_scale

    def spatial(self, means: torch.Tensor) -> torch.Tensor:
        return self.plane.spatial(means)

    def encode_audio(self, windows: torch.Tensor) -> torch.Tensor:
        return self.audio(windows)

    def deform(self, spatial: torch.Tensor, audio_code: torch.Tensor, blink: torch.Tensor) -> Deltas:
        f = self.plane.modulate(spatial, self.plane.attend(audio_code))
        d = self.deltas_from_head(self.head(f, blink.reshape(1).to(f)))
        if self.dynamic:
            d.weight = torch.sigmoid(self.dynamism(f)[:, 0])
        return d

    def grid_parameters(self) -> list[torch.nn.Parameter]:
        p = self.plane
        return [*p.space.parameters(), *p.lines.parameters(), *p.prototypes.parameters()]

    def splat_channels(self, deltas: Deltas, settings: Any) -> torch.Tensor | None:
        """The dynamism weight d [N, 1] (Eq. 8: splatted to the grey map g), when the mask
        loss is on (``settings.mask_lambda`` > 0, :class:`~gstalk.config.AudioPlaneConfig`)."""
        if deltas.weight is None or settings.mask_lambda <= 0:
            return None
        return deltas.weight[:, None]

    def losses(self, out: Any, mouth_mask: torch.Tensor, settings: Any) -> dict[str, torch.Tensor]:
        """``mask``: λ_mask · L_mask (Eq. 9) of the splatted dynamism map against the mouth
        mask dilated by ``mask_dilate`` x the image height (:func:`~gstalk.train.losses.mask_margin_loss`)."""
        if out.channels is None:
            return {}
        from gstalk.train.losses import dilate_mask, mask_margin_loss

        ref = dilate_mask(mouth_mask, int(round(settings.mask_dilate * mouth_mask.shape[1])))
        return {"mask": settings.mask_lambda * mask_margin_loss(out.channels[..., 0:1], ref, settings.mask_margin)}
