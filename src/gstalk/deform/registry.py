"""The fine-stage models by name: a table like the rasterizer's backends.

Each entry names the model's class (imported on first use), its settings dataclass
(:class:`~gstalk.config.GSTalkerConfig`, ...) and how its constructor arguments follow from
a :class:`~gstalk.config.FineConfig`. The ``spec`` :func:`model_spec` returns (name +
keyword arguments) is stored with the weights, so render and eval rebuild exactly the
trained model from the workspace alone. Add a model with one row in :data:`REGISTRY`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gstalk.config import AudioPlaneConfig, EGSTalkerConfig, FineConfig, GSTalkerConfig
from gstalk.deform.base import DeformationModel
from gstalk.errors import UsageError


def _grid(cfg: FineConfig) -> dict[str, Any]:
    return {"levels": cfg.grid_levels, "features": cfg.grid_features, "log2_table": cfg.grid_log2_table,
            "base_res": cfg.grid_base_res, "max_res": cfg.grid_max_res, "grid_init": cfg.grid_init}


def _gstalker(cfg: FineConfig) -> dict[str, Any]:
    return {**_grid(cfg), "hidden": cfg.hidden, "layers": cfg.layers}


def _audioplane(cfg: FineConfig) -> dict[str, Any]:
    a = cfg.audioplane
    return {"smooth": a.plane_smooth_window, "plane_dim": a.plane_dim, "plane_res": a.plane_res,
            "scales": a.plane_scales, "hidden": cfg.hidden, "layers": cfg.layers, "dynamic": a.dynamic}


def _egstalker(cfg: FineConfig) -> dict[str, Any]:
    e = cfg.egstalker
    smooth = e.attention_window if e.fusion == "attention" else cfg.audio_smooth_window
    return {**_grid(cfg), "smooth": smooth, "feature_dim": e.feature_dim, "attention_dim": e.attention_dim,
            "pe_levels": e.pe_levels, "hidden": e.kan_hidden, "layers": 1, "kan_grid": e.kan_grid,
            "head": e.head, "fusion": e.fusion}


@dataclass(frozen=True)
class ModelEntry:
    """One row of :data:`REGISTRY`.

    Attributes:
        cls: ``"package.module:Class"`` of the :class:`~gstalk.deform.base.DeformationModel`.
        config: the model's settings dataclass (a field of :class:`~gstalk.config.FineConfig`).
        kwargs: the model's own constructor arguments from a fine config (the shared ones,
            audio and articulation sizes, are added by :func:`model_spec`).
    """

    cls: str
    config: type
    kwargs: Callable[[FineConfig], dict[str, Any]]

    def load_class(self) -> type[DeformationModel]:
        module, _, attr = self.cls.partition(":")
        return getattr(importlib.import_module(module), attr)


REGISTRY: dict[str, ModelEntry] = {
    "gstalker": ModelEntry("gstalk.deform.gstalker:GSTalkerDeformation", GSTalkerConfig, _gstalker),
    "audioplane": ModelEntry("gstalk.deform.audioplane:AudioPlaneDeformation", AudioPlaneConfig, _audioplane),
    "egstalker": ModelEntry("gstalk.deform.egstalker:EGSTalkerDeformation", EGSTalkerConfig, _egstalker),
}
MODELS = tuple(REGISTRY)


def get_model(name: str) -> ModelEntry:
    """The registry row of model ``name``.

    Raises:
        UsageError: unknown model name (the message lists the known ones).
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise UsageError(f"Unknown fine model '{name}'.", hint=f"use one of: {', '.join(MODELS)}") from None


def model_spec(name: str, aabb: torch.Tensor, audio_in_dim: int, window: int, cfg: FineConfig,
               articulation: int = 0, prior: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON-able description of a model: {"name": …, "kwargs": {…}}; ``articulation``: size
    of the articulation code (used when ``cfg.conditioning == "articulation"``); ``prior``: the
    metadata of the articulation prior the regressor starts from (its ``members`` and
    ``smooth`` then size the regressor).

    Raises:
        UsageError: unknown model name.
    """
    entry = get_model(name)
    art = articulation if cfg.conditioning == "articulation" else 0
    members = int(prior["members"]) if prior else cfg.articulation_members
    art_smooth = int(prior["smooth"]) if prior else cfg.articulation_smooth
    common = {"aabb": aabb.tolist(), "audio_in_dim": audio_in_dim, "window": window, "audio_dim": cfg.audio_dim,
              "smooth": cfg.audio_smooth_window, "position_scale": cfg.position_scale, "articulation": art,
              "articulation_members": members, "articulation_smooth": art_smooth,
              "appearance": cfg.appearance, "rigid_free": cfg.rigid_free, "code_encoder": cfg.code_encoder}
    return {"name": name, "kwargs": {**common, **entry.kwargs(cfg)}}


def build_model(spec: dict[str, Any]) -> DeformationModel:
    """Instantiate the model described by :func:`model_spec` (on the CPU, in training mode;
    with its :class:`~gstalk.deform.torso.TorsoField` when ``spec["torso"]`` is set: zeros
    until its state is loaded or :func:`~gstalk.deform.torso.init_torso` fills it; with its
    training code range when ``spec["code_range"]`` = {"min": [D], "max": [D]} is set:
    :meth:`~gstalk.deform.base.DeformationModel.set_code_range`).

    Raises:
        UsageError: unknown model name.
    """
    kw = dict(spec["kwargs"])
    kw["aabb"] = torch.tensor(kw["aabb"], dtype=torch.float32)
    model = get_model(spec["name"]).load_class()(**kw)
    if spec.get("torso"):
        from gstalk.deform.torso import TorsoField

        model.torso = TorsoField(**spec["torso"])
    if spec.get("code_range"):
        model.set_code_range(spec["code_range"]["min"], spec["code_range"]["max"])
    return model
