"""EGSTalker's efficient Gaussian deformation (Zhu et al. 2025).

Spatial structure encoder: the multi-resolution hash tri-plane followed by a KAN layer,
giving each canonical Gaussian a feature h = KAN(E_tri(μ)). Efficient Gaussian deformation
decoder: the efficient spatial-audio attention (ESAA,
:class:`~gstalk.deform.attention.SpatialAudioAttention`) lets each Gaussian attend to the
audio codes of the K frames around the current one (tagged with the periodic positional
encoding of their time offset), the eye blink and a null token; a KAN head maps
LayerNorm([h; ESAA(h, a, e)]) to the offsets ΔG.

The paper's text available to us is an extended abstract: where it is silent (token set,
what the periodic encoding encodes, layer sizes) we follow GaussianTalker's spatial-audio
attention; ``docs/methods.md`` lists the choices.
"""

from __future__ import annotations

import torch
from torch import nn

from gstalk.deform.attention import SpatialAudioAttention
from gstalk.deform.audio import AudioEncoder, frame_net
from gstalk.deform.base import MLP, DeformationModel, Deltas, head_outputs
from gstalk.deform.encoders import TriPlaneHash
from gstalk.deform.kan import KAN, KANLinear


class EGSTalkerDeformation(DeformationModel):
    """EGSTalker deformation field.

    Args:
        aabb: [2, 3] canonical box (metres).
        audio_in_dim, window: C features per step, W steps per frame window.
        audio_dim: per-frame audio code size; smooth: K frames the attention sees.
        levels, features, log2_table, base_res, max_res, grid_init: the hash tri-plane.
        feature_dim: size of h (the spatial KAN's output).
        attention_dim: ESAA width; pe_levels: periodic encoding levels (0 = off).
        hidden, layers: the head; kan_grid: B-spline intervals of the KAN layers.
        head: "kan" (the paper) or "mlp" (the "w/o KAN" ablation).
        fusion: "attention" (ESAA, the paper) or "concat" (the "w/o ESAA" ablation: the
            temporally smoothed audio code and the blink concatenated to h).
        position_scale, articulation*, appearance, rigid_free: as
            :class:`~gstalk.deform.gstalker.GSTalkerDeformation`.
    """

    def __init__(self, aabb: torch.Tensor, audio_in_dim: int, window: int = 16, audio_dim: int = 32,
                 smooth: int = 8, levels: int = 12, features: int = 2, log2_table: int = 14, base_res: int = 16,
                 max_res: int = 512, grid_init: float = 1e-4, feature_dim: int = 32, attention_dim: int = 32,
                 pe_levels: int = 4, hidden: int = 32, layers: int = 1, kan_grid: int = 5, head: str = "kan",
                 fusion: str = "attention", position_scale: float = 0.01, articulation: int = 0,
                 articulation_members: int = 5, articulation_smooth: int = 4, appearance: bool = True,
                 rigid_free: bool = False, code_encoder: str = "audionet"):
        super().__init__()
        if head not in ("kan", "mlp") or fusion not in ("attention", "concat"):
            raise ValueError(f"head must be kan|mlp and fusion attention|concat, got {head!r}, {fusion!r}")
        cond_dim = self.setup_conditioning(audio_in_dim, window, articulation, articulation_members,
                                           articulation_smooth, code_encoder)
        self.triplane = TriPlaneHash(aabb, levels, features, log2_table, base_res, max_res, grid_init)
        self.encoder = KANLinear(self.triplane.out_dim, feature_dim, kan_grid) if head == "kan" else \
            nn.Sequential(nn.Linear(self.triplane.out_dim, feature_dim), nn.ReLU())
        self.fusion = fusion
        if fusion == "attention":
            self.audio = frame_net(self.frame_net, cond_dim, window, audio_dim)
            self.smooth = max(smooth, 1)
            self.esaa = SpatialAudioAttention(feature_dim, audio_dim, self.smooth, attention_dim, pe_levels)
            fused = feature_dim + attention_dim
            self.code_shape = (self.smooth, audio_dim)
        else:
            self.audio_encoder = AudioEncoder(cond_dim, window, audio_dim, smooth, self.frame_net)
            self.smooth = self.audio_encoder.smooth
            fused = feature_dim + audio_dim + 1
            self.code_shape = (audio_dim,)
        self.norm = nn.LayerNorm(fused)
        out = head_outputs(appearance)
        self.head = KAN(fused, hidden, layers, out, kan_grid) if head == "kan" else MLP(fused, hidden, layers, out)
        self.appearance, self.rigid_free, self.position_scale = appearance, rigid_free, position_scale

    def spatial(self, means: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.triplane(means))

    def encode_audio(self, windows: torch.Tensor) -> torch.Tensor:
        """[B, K, W, C] -> per-frame codes [B, K, A] (attention) or the smoothed code [B, A]."""
        if self.fusion == "concat":
            return self.audio_encoder(windows)
        b, k, w, c = windows.shape
        return self.audio(windows.reshape(b * k, w, c)).reshape(b, k, -1)

    def deform(self, spatial: torch.Tensor, audio_code: torch.Tensor, blink: torch.Tensor) -> Deltas:
        n = spatial.shape[0]
        if self.fusion == "attention":
            cond = self.esaa(spatial, audio_code, blink)
        else:
            c = torch.cat([audio_code.reshape(-1), blink.reshape(1).to(audio_code)])
            cond = c[None].expand(n, -1)
        return self.deltas_from_head(self.head(self.norm(torch.cat([spatial, cond], dim=1))))

    def grid_parameters(self) -> list[nn.Parameter]:
        return list(self.triplane.parameters())
