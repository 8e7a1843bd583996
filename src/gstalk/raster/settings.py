"""Rasterizer tunables shared by every backend (:class:`RasterSettings`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gstalk.errors import UsageError

RadiusMode = Literal["3sigma", "opacity"]


@dataclass(frozen=True)
class RasterSettings:
    """Constants of the 3DGS rasterizer (Kerbl et al. 2023) that backends must honour.

    All lengths are in pixels, all areas in pixels².

    Attributes:
        eps2d: low-pass dilation added to the projected 2D covariance, ``Σ' + eps2d·I``
            (px²). 0.3 is the 3DGS value (a Gaussian covers at least ~1 px).
        antialiased: Mip-Splatting opacity compensation: the opacity is multiplied by
            ``sqrt(det Σ' / det(Σ' + eps2d·I))`` so the dilation does not add energy.
        radius_mode: ``"3sigma"``: radius = ``ceil(3·sqrt(λ_max))`` (3DGS);
            ``"opacity"``: radius = ``ceil(sqrt(2·λ_max·ln(o/alpha_min)))``, the distance at
            which ``o·exp(-½ r²/λ_max)`` falls to ``alpha_min`` (uses the compensated
            opacity when ``antialiased``); Gaussians with ``o < alpha_min`` are culled.
        tile_size: side of the square screen tiles (px) used for binning and compositing.
        alpha_min: a Gaussian whose alpha at a pixel is below this is skipped there (1/255).
        alpha_max: alpha is clamped to this value (0.99, as the Inria kernel); no gradient
            flows through a clamped alpha.
        transmittance_min: front-to-back compositing of a pixel stops before the Gaussian
            that would bring the transmittance below this value (1e-4); that Gaussian is
            not composited.
        radius_clip: Gaussians whose radius is ``<= radius_clip`` px are culled (0 = off).

    Raises:
        UsageError: when a value is out of range (checked in ``__post_init__``).
    """

    eps2d: float = 0.3
    antialiased: bool = False
    radius_mode: RadiusMode = "3sigma"
    tile_size: int = 16
    alpha_min: float = 1.0 / 255.0
    alpha_max: float = 0.99
    transmittance_min: float = 1e-4
    radius_clip: float = 0.0

    def __post_init__(self) -> None:
        if not (self.eps2d >= 0.0):
            raise UsageError(f"RasterSettings.eps2d must be >= 0 px², got {self.eps2d!r}.")
        if self.radius_mode not in ("3sigma", "opacity"):
            raise UsageError(
                f"RasterSettings.radius_mode must be '3sigma' or 'opacity', got {self.radius_mode!r}."
            )
        if not isinstance(self.tile_size, int) or isinstance(self.tile_size, bool) or not (
            1 <= self.tile_size <= 64
        ):
            raise UsageError(f"RasterSettings.tile_size must be an int in [1, 64], got {self.tile_size!r}.")
        if not (0.0 <= self.alpha_min < self.alpha_max <= 1.0):
            raise UsageError(
                "RasterSettings needs 0 <= alpha_min < alpha_max <= 1, got "
                f"alpha_min={self.alpha_min!r}, alpha_max={self.alpha_max!r}."
            )
        if self.radius_mode == "opacity" and self.alpha_min <= 0.0:
            raise UsageError("RasterSettings.radius_mode='opacity' needs alpha_min > 0.")
        if not (0.0 <= self.transmittance_min < 1.0):
            raise UsageError(
                f"RasterSettings.transmittance_min must be in [0, 1), got {self.transmittance_min!r}."
            )
        if not (self.radius_clip >= 0.0):
            raise UsageError(f"RasterSettings.radius_clip must be >= 0 px, got {self.radius_clip!r}.")
