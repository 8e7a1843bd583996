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

import torch

from gstalk.deform.audio import AudioEncoder
from gstalk.deform.base import MLP, DeformationModel, Deltas, SplitInputMLP
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
        self.plane = AudioFactorizationPlane(aabb, audio_dim, plane_dim, plane_res, tuple(range(1, scales + 1)))
        self.head = SplitInputMLP(self.plane.out_dim, 1, hidden, layers, 14 if appearance else 10)  # D1
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
        out = self.head(f, blink.reshape(1).to(f))
        d = Deltas(means=out[:, 0:3] * self.position_scale, quats=out[:, 3:7], scales=out[:, 7:10],
                   rigid_free=self.rigid_free)
        if self.appearance:
            d.opacities, d.colors = out[:, 10], out[:, 11:14]
        if self.dynamic:
            d.weight = torch.sigmoid(self.dynamism(f)[:, 0])
        return d
