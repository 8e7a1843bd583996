"""GSTalker's audio-driven Gaussian deformation field (Chen et al. 2024, Sec. 3.2-3.3).

ΔG = F(E_tri(μ), A(a_{t-K/2..t+K/2}), e_t): a multi-resolution hash-grid tri-plane E_tri
encodes each canonical position μ; the audio encoder A (AudioNet per frame + the temporal
smoothing attention over K neighbouring frames) gives the frame's audio code (by default
from the mouth articulation code an audio regressor predicts, see
:mod:`gstalk.deform.articulation`); the eye
blink e_t conditions the eyes; an MLP F fuses them by concatenation and predicts offsets of
position (3), rotation (4) and log-scale (3), and optionally opacity (1) and colour (3).
"""

from __future__ import annotations

import torch

from gstalk.deform.audio import AudioEncoder
from gstalk.deform.base import DeformationModel, Deltas, SplitInputMLP, head_outputs
from gstalk.deform.encoders import TriPlaneHash


class GSTalkerDeformation(DeformationModel):
    """GSTalker deformation field.

    Args:
        aabb: [2, 3] canonical box (metres) the tri-plane covers.
        audio_in_dim: C, audio features per step; window: W steps per frame.
        audio_dim: audio code size; smooth: K frames of temporal smoothing (1 = off).
        levels, features, log2_table, base_res, max_res: tri-plane hash grids.
        hidden, layers: the fusion MLP.
        position_scale: metres per unit of the position output.
        grid_init: the hash tables start uniform in ±grid_init.
        articulation: D > 0 conditions the field on a D-dimensional mouth articulation code
            predicted from the audio by a frozen
            :class:`~gstalk.deform.articulation.ArticulationEnsemble` of
            ``articulation_members`` regressors (``articulator``) whose attention spans
            ``articulation_smooth`` frames,
            instead of on the audio directly (see :mod:`gstalk.deform.articulation`).
        appearance: also predict offsets of opacity (logit) and colour (SH DC), which the
            method digest allows ("and optionally opacity/colour"): the inside of the mouth
            and the teeth appear and disappear as the lips move.
        rigid_free: remove the rigid part of the position offsets (the tracked camera moves
            the head; see :func:`~gstalk.deform.base.remove_rigid`).
    """

    def __init__(self, aabb: torch.Tensor, audio_in_dim: int, window: int = 16, audio_dim: int = 32,
                 smooth: int = 8, levels: int = 12, features: int = 2, log2_table: int = 14, base_res: int = 16,
                 max_res: int = 512, hidden: int = 64, layers: int = 2, position_scale: float = 0.01,
                 grid_init: float = 1e-4, articulation: int = 0, articulation_members: int = 5,
                 articulation_smooth: int = 4, appearance: bool = True, rigid_free: bool = False,
                 code_encoder: str = "audionet"):
        super().__init__()
        cond_dim = self.setup_conditioning(audio_in_dim, window, articulation, articulation_members,
                                           articulation_smooth, code_encoder)  # first, as in every model
        self.triplane = TriPlaneHash(aabb, levels, features, log2_table, base_res, max_res, grid_init)
        self.audio = AudioEncoder(cond_dim, window, audio_dim, smooth, self.frame_net)
        self.appearance = appearance
        self.rigid_free = rigid_free
        self.head = SplitInputMLP(self.triplane.out_dim, audio_dim + 1, hidden, layers, head_outputs(appearance))
        self.position_scale = position_scale
        self.smooth = self.audio.smooth
        self.code_shape = (audio_dim,)

    def spatial(self, means: torch.Tensor) -> torch.Tensor:
        # the tri-plane features through the fusion MLP's first (per-Gaussian) layer: what
        # does not depend on the audio, so a renderer computes it once
        return self.head.first_per(self.triplane(means))

    def encode_audio(self, windows: torch.Tensor) -> torch.Tensor:
        return self.audio(windows)

    def deform(self, spatial: torch.Tensor, audio_code: torch.Tensor, blink: torch.Tensor) -> Deltas:
        cond = torch.cat([audio_code.reshape(-1), blink.reshape(1).to(audio_code)])
        return self.deltas_from_head(self.head.forward_hidden(spatial, cond))

    def grid_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.triplane.parameters())
