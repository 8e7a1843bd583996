"""Attention fusion of per-Gaussian spatial features with the audio, and periodic encoding.

- :func:`periodic_encoding`: γ(t) = [sin(2^l π t), cos(2^l π t)]_{l < L} (NeRF's positional
  encoding; EGSTalker's "periodic positional encoding" of time).
- :class:`SpatialAudioAttention`: EGSTalker's efficient spatial-audio attention (ESAA). Each
  Gaussian's spatial feature is the query; the keys and values are a handful of condition
  tokens: the audio codes of the K frames around the current one (each tagged with the
  periodic encoding of its offset in frames, so the attention knows which is which), the
  eye blink and a learned null token (GaussianTalker's spatial-audio attention uses the
  same kinds of tokens). One head, one layer: O(N·T·D) for T ≈ K + 2 tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def periodic_encoding(t: torch.Tensor, levels: int) -> torch.Tensor:
    """[..., ] (any units; the period of level l is 2 / 2^l) -> [..., 2·levels]:
    sin(2^l π t), cos(2^l π t) for l = 0..levels-1."""
    freqs = (2.0 ** torch.arange(levels, dtype=t.dtype, device=t.device)) * math.pi
    x = t[..., None] * freqs
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


class SpatialAudioAttention(nn.Module):
    """Efficient spatial-audio attention (EGSTalker, ESAA).

    Args:
        spatial_dim: S, per-Gaussian feature size (the query).
        audio_dim: A, per-frame audio code size.
        window: K, audio frames per query (offsets -K//2 .. K - K//2 - 1 frames).
        dim: D, attention width.
        pe_levels: L of the periodic encoding of each audio token's offset, in units of K/2
            frames (so the encoding of the window is one period of the lowest level).

    Input: spatial [N, S], audio codes [K, A], blink [1]. Output: [N, D], the attended
    condition per Gaussian (to be fused with the spatial feature by the caller).
    """

    def __init__(self, spatial_dim: int, audio_dim: int, window: int, dim: int = 32, pe_levels: int = 4):
        super().__init__()
        self.dim, self.window, self.pe_levels = dim, window, pe_levels
        self.q = nn.Linear(spatial_dim, dim, bias=False)
        self.audio_token = nn.Linear(audio_dim + 2 * pe_levels, dim)
        self.blink_token = nn.Linear(1, dim)
        self.null_token = nn.Parameter(torch.zeros(1, dim))
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        offsets = torch.arange(-(window // 2), window - window // 2, dtype=torch.float32)
        self.register_buffer("pe", periodic_encoding(offsets / max(window / 2, 1.0), pe_levels))

    def tokens(self, audio_codes: torch.Tensor, blink: torch.Tensor) -> torch.Tensor:
        """The condition tokens of one frame: [K + 2, D]."""
        a = self.audio_token(torch.cat([audio_codes, self.pe[: audio_codes.shape[0]]], dim=-1))
        e = self.blink_token(blink.reshape(1, 1).to(a))
        return torch.cat([a, e, self.null_token], dim=0)

    def forward(self, spatial: torch.Tensor, audio_codes: torch.Tensor, blink: torch.Tensor) -> torch.Tensor:
        tok = self.tokens(audio_codes, blink)
        scores = self.q(spatial) @ self.k(tok).T / math.sqrt(self.dim)  # [N, T]
        return torch.softmax(scores, dim=-1) @ self.v(tok)
