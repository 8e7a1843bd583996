"""Build a fine-stage deformation model by name from a :class:`~gstalk.config.FineConfig`.

The returned ``spec`` (name + keyword arguments) is stored with the weights, so render and
eval rebuild exactly the trained model from the workspace alone.
"""

from __future__ import annotations

from typing import Any

import torch

from gstalk.config import FineConfig
from gstalk.deform.base import DeformationModel
from gstalk.errors import UsageError

MODELS = ("gstalker", "audioplane", "egstalker")


def model_spec(name: str, aabb: torch.Tensor, audio_in_dim: int, window: int, cfg: FineConfig,
               articulation: int = 0, prior: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON-able description of a model: {"name": …, "kwargs": {…}}; ``articulation``: size
    of the articulation code (used when ``cfg.conditioning == "articulation"``); ``prior``: the
    metadata of the articulation prior the regressor starts from (its ``members`` and
    ``smooth`` then size the regressor).

    Raises:
        UsageError: unknown model name.
    """
    art = articulation if cfg.conditioning == "articulation" else 0
    members = int(prior["members"]) if prior else cfg.articulation_members
    art_smooth = int(prior["smooth"]) if prior else cfg.articulation_smooth
    common = {"aabb": aabb.tolist(), "audio_in_dim": audio_in_dim, "window": window, "audio_dim": cfg.audio_dim,
              "smooth": cfg.audio_smooth_window, "position_scale": cfg.position_scale, "articulation": art,
              "articulation_members": members, "articulation_smooth": art_smooth,
              "appearance": cfg.appearance, "rigid_free": cfg.rigid_free, "code_encoder": cfg.code_encoder}
    grid = {"levels": cfg.grid_levels, "features": cfg.grid_features, "log2_table": cfg.grid_log2_table,
            "base_res": cfg.grid_base_res, "max_res": cfg.grid_max_res, "grid_init": cfg.grid_init}
    if name == "gstalker":
        return {"name": name, "kwargs": {**common, **grid, "hidden": cfg.hidden, "layers": cfg.layers}}
    if name == "audioplane":
        return {"name": name, "kwargs": {**common, "smooth": cfg.plane_smooth_window,
                                         "plane_dim": cfg.plane_dim, "plane_res": cfg.plane_res,
                                         "scales": cfg.plane_scales, "hidden": cfg.hidden, "layers": cfg.layers,
                                         "dynamic": cfg.dynamic}}
    if name == "egstalker":
        smooth = cfg.attention_window if cfg.fusion == "attention" else cfg.audio_smooth_window
        return {"name": name, "kwargs": {**common, **grid, "smooth": smooth, "feature_dim": cfg.feature_dim,
                                         "attention_dim": cfg.attention_dim, "pe_levels": cfg.pe_levels,
                                         "hidden": cfg.kan_hidden, "layers": 1, "kan_grid": cfg.kan_grid,
                                         "head": cfg.head, "fusion": cfg.fusion}}
    raise UsageError(f"Unknown fine model '{name}'.", hint=f"use one of: {', '.join(MODELS)}")


def build_model(spec: dict[str, Any]) -> DeformationModel:
    """Instantiate the model described by :func:`model_spec` (with its
    :class:`~gstalk.deform.torso.TorsoField` when ``spec["torso"]`` is set: zeros until
    its state is loaded or :func:`~gstalk.deform.torso.init_torso` fills it)."""
    model = _build(spec)
    if spec.get("torso"):
        from gstalk.deform.torso import TorsoField

        model.torso = TorsoField(**spec["torso"])
    return model


def _build(spec: dict[str, Any]) -> DeformationModel:
    kw = dict(spec["kwargs"])
    kw["aabb"] = torch.tensor(kw["aabb"], dtype=torch.float32)
    if spec["name"] == "gstalker":
        from gstalk.deform.gstalker import GSTalkerDeformation

        return GSTalkerDeformation(**kw)
    if spec["name"] == "audioplane":
        from gstalk.deform.audioplane import AudioPlaneDeformation

        return AudioPlaneDeformation(**kw)
    if spec["name"] == "egstalker":
        from gstalk.deform.egstalker import EGSTalkerDeformation

        return EGSTalkerDeformation(**kw)
    raise UsageError(f"Unknown fine model '{spec['name']}'.", hint=f"use one of: {', '.join(MODELS)}")
