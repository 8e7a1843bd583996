"""Audio encoders: per-frame feature windows -> a smoothed audio code per video frame.

``AudioNet`` (AD-NeRF, Guo et al. 2021) compresses one frame's window of feature steps
[W, C] with strided 1-D convolutions into a code of ``dim`` numbers. ``AudioAttNet`` (the
"temporal smoothing module" of GSTalker, after AD-NeRF's audio attention) takes the codes of
``K`` neighbouring frames and returns their attention-weighted sum, so the mouth moves
smoothly between frames.
"""

from __future__ import annotations

import torch
from torch import nn


class AudioNet(nn.Module):
    """One frame's feature window -> audio code.

    Args:
        in_dim: C, features per step.
        window: W, steps per window (16).
        dim: output code size.

    Input: [B, W, C] float32. Output: [B, dim].
    """

    def __init__(self, in_dim: int, window: int = 16, dim: int = 32):
        super().__init__()
        chans = [in_dim, 32, 32, 64, 64]
        layers: list[nn.Module] = []
        length = window
        for a, b in zip(chans[:-1], chans[1:]):
            stride = 2 if length > 1 else 1
            layers += [nn.Conv1d(a, b, kernel_size=3, stride=stride, padding=1), nn.LeakyReLU(0.02)]
            length = (length + 2 - 3) // stride + 1
        self.conv = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(chans[-1] * length, 64), nn.LeakyReLU(0.02), nn.Linear(64, dim))
        self.window, self.in_dim, self.dim = window, in_dim, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.window, self.in_dim):
            raise ValueError(f"AudioNet expects [B, {self.window}, {self.in_dim}], got {list(x.shape)}")
        h = self.conv(x.transpose(1, 2))
        return self.head(h.flatten(1))


class CodeNet(nn.Module):
    """One frame's articulation code -> condition code: a small MLP on the code itself.

    Articulation-conditioned models receive "windows" whose W steps all repeat the frame's
    code (:meth:`~gstalk.deform.base.DeformationModel.code_windows`); running AudioNet's four
    strided convolutions over W identical rows is a deep, poorly conditioned path to a
    7-number input. CodeNet reads the middle step and maps it with two linear layers.

    Args:
        in_dim: D, the code size; window: W (checked, as AudioNet does); dim: output size.

    Input: [B, W, D] float32. Output: [B, dim].
    """

    def __init__(self, in_dim: int, window: int = 16, dim: int = 32, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.LeakyReLU(0.02), nn.Linear(hidden, dim))
        self.window, self.in_dim, self.dim = window, in_dim, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.window, self.in_dim):
            raise ValueError(f"CodeNet expects [B, {self.window}, {self.in_dim}], got {list(x.shape)}")
        return self.net(x[:, self.window // 2])


def frame_net(kind: str, in_dim: int, window: int, dim: int) -> nn.Module:
    """The per-frame condition encoder called ``kind``: ``audionet`` (:class:`AudioNet`, for
    audio windows, and articulation codes in models trained before gstalk had CodeNet) or
    ``code`` (:class:`CodeNet`, articulation codes).

    Raises:
        ValueError: an unknown kind."""
    if kind == "audionet":
        return AudioNet(in_dim, window, dim)
    if kind == "code":
        return CodeNet(in_dim, window, dim)
    raise ValueError(f"unknown frame encoder '{kind}' (use audionet or code)")


class AudioAttNet(nn.Module):
    """Temporal smoothing: attention over the codes of ``seq_len`` neighbouring frames.

    Input: [B, K, dim] codes (the centre frame in the middle). Output: [B, dim].
    """

    def __init__(self, dim: int = 32, seq_len: int = 8):
        super().__init__()
        self.seq_len = seq_len
        self.conv = nn.Sequential(
            nn.Conv1d(dim, 16, 3, padding=1), nn.LeakyReLU(0.02),
            nn.Conv1d(16, 8, 3, padding=1), nn.LeakyReLU(0.02),
            nn.Conv1d(8, 4, 3, padding=1), nn.LeakyReLU(0.02),
            nn.Conv1d(4, 1, 3, padding=1), nn.LeakyReLU(0.02),
        )
        self.att = nn.Linear(seq_len, seq_len)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        weights = self.conv(codes.transpose(1, 2))[:, 0]  # [B, K]
        weights = torch.softmax(self.att(weights), dim=-1)
        return (weights[..., None] * codes).sum(1)


class AudioEncoder(nn.Module):
    """AudioNet (or CodeNet, ``net="code"``) per frame + optional AudioAttNet smoothing over
    neighbouring frames.

    Args:
        in_dim: C; window: W steps; dim: code size; smooth: K frames (0 or 1 = off);
        net: the per-frame encoder (:func:`frame_net`).

    Input: [B, K, W, C] windows of K frames centred on each target frame (K = 1 when
    smoothing is off). Output: [B, dim].
    """

    def __init__(self, in_dim: int, window: int = 16, dim: int = 32, smooth: int = 8, net: str = "audionet"):
        super().__init__()
        self.net = frame_net(net, in_dim, window, dim)
        self.smooth = smooth if smooth > 1 else 1
        self.att = AudioAttNet(dim, self.smooth) if self.smooth > 1 else None
        self.dim = dim

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        b, k, w, c = windows.shape
        codes = self.net(windows.reshape(b * k, w, c)).reshape(b, k, -1)
        if self.att is None:
            return codes[:, k // 2]
        return self.att(codes)


def neighbour_indices(centre: torch.Tensor | int, k: int, n: int) -> torch.Tensor:
    """Frame indices ``centre - k//2 .. centre + k - k//2 - 1`` clamped to [0, n): [B, K] int64."""
    c = torch.as_tensor(centre).reshape(-1, 1)
    return (c + torch.arange(-(k // 2), k - k // 2)[None]).clamp(0, max(n - 1, 0))
