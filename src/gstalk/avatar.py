"""A trained avatar in memory: exactly what rendering new speech needs, from a workspace or a bundle.

An :class:`Avatar` is the seam between where a trained person lives (a workspace folder, an
avatar bundle ``NAME.gstalk`` or an unpacked bundle folder, see :mod:`gstalk.bundle`) and
what renders it (:class:`gstalk.render.driver.HeadRenderer`, ``gstalk render``, ``gstalk
batch``, ``gstalk serve``). :func:`load_avatar` is the one loader for all three.

It holds tensors and arrays only, plus, for a workspace trained without the torso field
(``--set torso=false``), a *background source*: a callable that reads a pose frame's own
torso from the workspace (:class:`gstalk.dataset.PoseFrameTorso`). Such an avatar cannot be
bundled (:func:`gstalk.bundle.export_bundle` refuses it and names the fix), because its
renders paste the torso of every training frame from disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from gstalk.deform.base import DeformationModel
    from gstalk.workspace import Workspace

# tensors of extract/audio_features.safetensors that hold the training clip's own audio, step
# by step or frame by frame: not needed to render new speech, so not part of an avatar
PER_FRAME_AUDIO_TENSORS = ("steps", "windows")


@dataclass
class AudioSettings:
    """How new speech becomes the model's per-frame feature windows
    (:func:`gstalk.dataset.speech_windows`), kept generic so any extractor fits.

    Attributes:
        config: the extract stage's audio config (``AudioFeatureConfig`` fields: sample rate,
            window and hop in seconds, ...), as recorded in the manifest.
        metadata: the metadata of ``extract/audio_features.safetensors`` (``extractor``,
            ``dim``, ``steps_per_second``, ``window``, ...), whatever the extractor wrote.
        tensors: its small tensors (everything but the training clip's per-step ``steps``
            and per-frame ``windows``), e.g. ``mean``/``std`` [C] float32, the training
            audio's statistics that new speech is normalised with.
        fps: video frames per second (one feature window per frame).
    """

    config: dict[str, Any]
    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray]
    fps: float

    @property
    def extractor(self) -> str:
        """The feature extractor's registry name (:func:`gstalk.audio.get_extractor`)."""
        return str(self.metadata["extractor"])

    @property
    def window(self) -> int:
        """Feature steps per video frame's window."""
        return int(self.metadata["window"])

    @property
    def dim(self) -> int:
        """Features per step (C)."""
        return int(self.metadata["dim"])

    @property
    def sample_rate(self) -> int:
        """Hz the speech is resampled to before feature extraction."""
        from gstalk.config import AudioFeatureConfig, from_dict

        return int(from_dict(AudioFeatureConfig, self.config).sample_rate)


@dataclass
class Avatar:
    """A trained person, ready to render (see the module docstring).

    Attributes:
        name: a label (the workspace folder's or the bundle's name).
        params: the canonical Gaussians after fine training, raw: ``means`` [G, 3] float32
            metres (canonical head space), ``scales`` [G, 3] log metres, ``quats`` [G, 4]
            wxyz unnormalised, ``opacities`` [G] logits, ``sh0`` [G, 1, 3], ``shN`` [G, K-1, 3];
            with the coarse articulation basis carried (:mod:`gstalk.deform.basis`), also
            ``basis_means`` / ``basis_sh0`` [G, D, 3] (metres / SH DC per standard deviation of
            each mouth-code dimension).
        model: the deformation model in eval mode (audio → articulation regressor and, when
            trained with one, the torso field as ``model.torso``).
        meta: the metadata of ``fine/model.safetensors`` (``spec``, ``av_offset_frames``, ...).
        viewmats: [N, 4, 4] float32 world(canonical head)-to-camera of every training-clip
            frame (OpenCV, metres; the coarse stage's refined head pose, or the smoothed
            tracked one in a workspace made before pose refinement): the idle head motion.
        K: [3, 3] float32 intrinsics in pixels at ``size``.
        blink: [N] float32 eye blink in [0, 1] of every frame.
        train, test: the frame ranges of the train/test split.
        fps: video frames per second.
        size: side of the square frames in pixels.
        plate: [size, size, 3] uint8 RGB background plate.
        audio: the audio-feature settings (:class:`AudioSettings`).
        provenance: where it comes from: ``source_sha256`` (the training video), ``trained_with``
            (gstalk version of the fine run), ``model``, ``preset``, ``seed``, ``eval`` (the
            eval summary when there was one), ... (JSON-able).
        seed: the workspace's seed (``render --blink auto`` draws from it).
        torso_frames: None when the model has a torso field; else the background source
            ``frame -> (rgb [H, W, 3] uint8, torso mask [H, W] uint8 {0..255})`` of the pose
            frames.
    """

    name: str
    params: dict[str, torch.Tensor]
    model: DeformationModel
    meta: dict[str, Any]
    viewmats: torch.Tensor
    K: torch.Tensor
    blink: torch.Tensor
    train: range
    test: range
    fps: float
    size: int
    plate: np.ndarray
    audio: AudioSettings
    provenance: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    torso_frames: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None
    _on_devices: dict[str, Avatar] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        """Where the Gaussians and the model are (the CPU when loaded)."""
        return self.params["means"].device

    def on(self, device: torch.device | str) -> Avatar:
        """This avatar with its Gaussians and deformation model on ``device``: itself when
        they are there already, else a copy, made once per device and kept (the avatar a
        batch worker shares between jobs is never moved under them). Poses, blinks, K and the
        plate stay on the CPU; the renderer moves what it draws with."""
        device = torch.device(device)
        if self.device == device:
            return self
        key = str(device)
        if key not in self._on_devices:
            import copy
            import dataclasses

            self._on_devices[key] = dataclasses.replace(
                self, params={k: v.to(device) for k, v in self.params.items()},
                model=copy.deepcopy(self.model).to(device))
        return self._on_devices[key]

    @property
    def n_frames(self) -> int:
        return int(self.viewmats.shape[0])

    @property
    def has_torso_field(self) -> bool:
        return getattr(self.model, "torso", None) is not None

    @property
    def has_articulation_basis(self) -> bool:
        """The Gaussians carry the coarse articulation basis (:func:`gstalk.deform.basis.stored_basis`)."""
        from gstalk.deform.basis import stored_basis

        return stored_basis(self.params) is not None

    @classmethod
    def from_workspace(cls, ws: Workspace) -> Avatar:
        """Load a workspace whose fine stage is done (the caller checks that with
        ``ws.require``).

        Raises:
            WorkspaceError: a file is missing or unreadable.
        """
        from gstalk.dataset import (
            PoseFrameTorso,
            load_audio_settings,
            load_background,
            load_cameras,
            load_fine_model,
            load_tracks,
            split_indices,
        )

        params, model, meta = load_fine_model(ws)
        tracks = load_tracks(ws)
        cams = load_cameras(ws)  # the coarse stage's refined poses when it made them
        train, test = split_indices(ws)
        ex = ws.stage("extract").summary
        return cls(name=ws.root.resolve().name, params=params, model=model, meta=meta, viewmats=cams.viewmats,
                   K=cams.K, blink=tracks.blink, train=train, test=test, fps=float(ex["fps"]),
                   size=int(ex["size"]), plate=load_background(ws), audio=load_audio_settings(ws),
                   provenance=workspace_provenance(ws, meta), seed=ws.seed,
                   torso_frames=None if getattr(model, "torso", None) is not None else PoseFrameTorso(ws.root))

    def summary(self) -> dict[str, Any]:
        """A JSON-able description: name, model, Gaussians, size, fps, frames, audio features."""
        torso = getattr(self.model, "torso", None)
        return {"name": self.name, "model": self.meta.get("spec", {}).get("name"),
                "n_gaussians": int(self.params["means"].shape[0]),
                "n_torso_gaussians": int(torso.means.shape[0]) if torso is not None else 0,
                "torso": "field" if torso is not None else "pasted from the pose frames",
                "size": self.size, "fps": self.fps, "n_frames": self.n_frames,
                "split": {"train": [self.train.start, self.train.stop], "test": [self.test.start, self.test.stop]},
                "audio_features": {"extractor": self.audio.extractor, "window": self.audio.window,
                                   "sample_rate": self.audio.sample_rate}}


def workspace_provenance(ws: Workspace, meta: dict[str, Any]) -> dict[str, Any]:
    """Where a workspace's model comes from: the training video's name and SHA-256 (and the
    separate speech file's, ``speech_name`` / ``speech_sha256``, when extract took one), the gstalk
    version that trained it (and created the workspace), preset, seed, model, the fine run's id
    and time, and the eval summary when ``eval/metrics.json`` exists (scalar metrics only)."""
    from gstalk.workspace import EVAL_METRICS, read_json

    src = ws.manifest.get("source", {})
    fine = ws.stage("fine")
    prov: dict[str, Any] = {
        "source_name": Path(str(src.get("path", ""))).name, "source_sha256": src.get("sha256"),
        "trained_with": fine.data.get("versions", {}).get("gstalk"),
        "workspace_created_with": ws.manifest.get("gstalk_version"), "preset": ws.preset, "seed": ws.seed,
        "model": meta.get("spec", {}).get("name"), "fine_run_id": fine.run_id, "trained": fine.data.get("finished"),
    }
    if src.get("speech"):  # the voice came from a separate file (extract --speech)
        prov["speech_name"] = Path(str(src["speech"].get("path", ""))).name
        prov["speech_sha256"] = src["speech"].get("sha256")
    metrics = ws.path(EVAL_METRICS)
    if metrics.is_file():
        try:
            m = read_json(metrics)
        except Exception:  # noqa: BLE001 - a damaged eval is left out of the provenance, not fatal
            m = None
        if isinstance(m, dict):
            prov["eval"] = eval_summary(m)
    return prov


def eval_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics of an eval ``metrics.json`` (and of its baselines), without the
    per-frame series."""

    def scalars(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if isinstance(v, int | float | str) and not isinstance(v, bool)
                and k not in ("workspace",)}

    out = scalars(metrics)
    out["baselines"] = {k: scalars(v) for k, v in metrics.get("baselines", {}).items() if isinstance(v, dict)}
    return out


def is_bundle_path(path: str | Path) -> bool:
    """True when ``path`` is an avatar bundle file (any file, or a missing ``*.gstalk``, so
    that its error names a bundle) or an unpacked bundle folder (it holds ``bundle.json``),
    False for anything else (e.g. a workspace)."""
    from gstalk.bundle import BUNDLE_JSON, SUFFIX

    p = Path(path)
    if p.suffix == SUFFIX and not p.is_dir():
        return True
    return p.is_file() or (p.is_dir() and (p / BUNDLE_JSON).is_file() and not (p / "manifest.json").exists())


def load_avatar(path: str | Path) -> Avatar:
    """The one avatar loader: a workspace folder (its fine stage done), a bundle file
    ``NAME.gstalk`` or an unpacked bundle folder (``gstalk import``).

    Raises:
        WorkspaceError: a workspace that is missing, not finished or stale.
        InputError: a bundle that is damaged, truncated, foreign or from a newer gstalk
            (the message names the file and the reason).
    """
    p = Path(path)
    if is_bundle_path(p):
        from gstalk.bundle import read_bundle

        return read_bundle(p).avatar()
    from gstalk.workspace import Workspace

    ws = Workspace.open(p)
    ws.require("render")
    return Avatar.from_workspace(ws)
