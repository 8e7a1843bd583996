"""Training checkpoints in safetensors (parameters, Adam moments, densification state, RNG).

Keys: ``params.<name>`` (Gaussian parameters), ``module.<name>`` (a deformation model's
state dict), ``optim.<opt>.<index>.<exp_avg|exp_avg_sq|step>`` (Adam state of the
``index``-th parameter of optimizer ``opt``), ``densify.<key>``, ``extra.<name>`` (other
state of the run, e.g. pose corrections), ``rng.torch``; the
metadata holds the step, the numpy generator state and free-form info. Loading never
executes code (no pickle).

Tensors are written from whatever device they are on (moved to the CPU) and read onto the
device the loading run uses (:func:`restore_training` puts Adam's moments beside their
parameters, the caller moves ``params`` and ``module``): a checkpoint made on CUDA resumes on
the CPU and vice versa. Every random number is drawn from torch's CPU generator
(:func:`gstalk.device.randn`), so its one saved state resumes a CUDA run exactly too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gstalk.errors import WorkspaceError
from gstalk.tensorio import load_tensors, read_metadata, save_tensors

if TYPE_CHECKING:
    from gstalk.progress import Reporter


def _opt_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def save_checkpoint(path: str | Path, *, step: int, params: torch.nn.ParameterDict | None = None,
                    module: torch.nn.Module | None = None, optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    densify: dict[str, torch.Tensor] | None = None, rng: np.random.Generator | None = None,
                    info: dict[str, Any] | None = None, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write a checkpoint atomically (see the module docstring for the layout); ``extra``:
    other tensors of the run (``extra.<name>``, e.g. the coarse stage's pose corrections)."""
    t: dict[str, torch.Tensor] = {}
    for k, v in (params or {}).items():
        t[f"params.{k}"] = v.detach()
    if module is not None:
        for k, v in module.state_dict().items():
            t[f"module.{k}"] = v.detach()
    for name, opt in (optimizers or {}).items():
        for i, p in enumerate(_opt_params(opt)):
            for key, val in opt.state.get(p, {}).items():
                if isinstance(val, torch.Tensor):
                    t[f"optim.{name}.{i}.{key}"] = val.detach().reshape(val.shape)
    for k, v in (densify or {}).items():
        t[f"densify.{k}"] = v
    for k, v in (extra or {}).items():
        t[f"extra.{k}"] = v.detach()
    t["rng.torch"] = torch.get_rng_state()
    meta = {"step": step, "info": info or {}}
    if rng is not None:
        meta["numpy_rng"] = rng.bit_generator.state
    save_tensors(path, t, meta)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu"
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint: ({"params": …, "module": …, "optim": …, "densify": …, "rng": …}, metadata),
    its parameters, module state and densification statistics on ``device`` (Adam's moments
    and the RNG state stay on the CPU until :func:`restore_training` places them)."""
    t, meta = load_tensors(path)
    groups: dict[str, dict[str, torch.Tensor]] = {"params": {}, "module": {}, "optim": {}, "densify": {}, "rng": {}}
    for k, v in t.items():
        head, _, rest = k.partition(".")
        groups.setdefault(head, {})[rest] = v.to(device) if head in ("params", "module", "densify") else v
    return groups, meta


def restore_optimizers(optimizers: dict[str, torch.optim.Optimizer], optim: dict[str, torch.Tensor]) -> None:
    """Put saved Adam moments back into freshly built optimizers (same parameter order), on
    each parameter's device (Adam's ``step`` count stays a CPU float, as Adam keeps it)."""
    for name, opt in optimizers.items():
        for i, p in enumerate(_opt_params(opt)):
            st = {key.split(".")[-1]: v for key, v in optim.items() if key.startswith(f"{name}.{i}.")}
            if st:
                opt.state[p] = {k: (v.to(p.device, copy=True) if k != "step" else v.clone().float().cpu())
                                for k, v in st.items()}


def restore_rng(groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> np.random.Generator:
    """Restore torch's RNG and return the numpy generator saved in the checkpoint."""
    if "torch" in groups.get("rng", {}):
        torch.set_rng_state(groups["rng"]["torch"])
    rng = np.random.default_rng()
    if "numpy_rng" in meta:
        rng.bit_generator.state = meta["numpy_rng"]
    return rng


def warn_if_replacing(path: Path, reporter: Reporter) -> None:
    """Warn on ``reporter`` that a fresh run will replace the stopped run's checkpoint at
    ``path`` (naming its iteration and --resume); nothing when there is none."""
    if path.exists():
        step = (read_metadata(path) or {}).get("step", "?")
        reporter.warn(f"{path} holds a stopped run at iteration {step}; this run starts over "
                      f"and replaces it (pass --resume to continue it instead)")


def load_resumable(path: Path, stage: str, workspace: Path, key: str, expected: Any,
                   device: torch.device | str = "cpu") -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """:func:`load_checkpoint` (onto ``device``) for ``gstalk STAGE --resume``: the checkpoint
    must exist and its ``info[key]`` (the settings it was made with) must equal ``expected``.

    Raises:
        WorkspaceError: no checkpoint at ``path`` (the hint gives the command without
            --resume), or one made with other settings.
    """
    if not path.exists():
        raise WorkspaceError(f"No checkpoint to resume from in {path.parent}.",
                             hint=f"run `gstalk {stage} {workspace}` without --resume")
    groups, meta = load_checkpoint(path, device)
    if meta["info"].get(key) != expected:
        raise WorkspaceError(f"The {stage} checkpoint was made with other settings than this run's.",
                             hint="resume with the same preset and flags, or run without --resume", path=path)
    return groups, meta


def restore_training(trainer: Any, groups: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
    """Put a checkpoint's Adam moments, densification statistics, RNG states and step into
    a freshly built trainer (:class:`~gstalk.train.coarse.CoarseTrainer` or
    :class:`~gstalk.train.fine.FineTrainer`: attributes ``optimizers``, ``densify_state``,
    ``rng``, ``step``). Call it after building the trainer, which seeds the RNGs."""
    restore_optimizers(trainer.optimizers, groups["optim"])
    if groups.get("densify"):
        device = getattr(trainer, "device", "cpu")
        trainer.densify_state = {k: v.to(device, copy=True) for k, v in groups["densify"].items()}
    trainer.rng = restore_rng(groups, meta)
    trainer.step = int(meta["step"])
