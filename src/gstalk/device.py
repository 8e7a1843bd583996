"""Where the tensors live: ``--device auto|cpu|cuda[:N]``, chosen once per stage.

A stage resolves its device once (:func:`resolve_device`), checks that the rasterizer it
was given can draw there (:func:`check_raster`, before anything is written), moves the
Gaussians, the deformation model, its optimizers' state, the frame batches, the
backgrounds and the audio condition there, and brings images back to the CPU only to encode
or write them. Random numbers are drawn from torch's CPU generator and moved
(:func:`randn`), so a run draws the same numbers on every device and a checkpoint's one RNG
state resumes it exactly.

``auto`` is CUDA when torch sees a GPU and the chosen rasterizer runs there (``auto``,
``torch``, ``gsplat``, ``inria``; the C++ ``cpu`` backend does not), else the CPU. On CUDA
the ``auto`` rasterizer is gsplat when it is installed (:func:`gstalk.raster.rasterize`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from gstalk.errors import DependencyError, UsageError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
# rasterizer backends that only draw CPU tensors, and those that only draw CUDA tensors
CPU_ONLY_RASTERS = ("cpu",)
CUDA_ONLY_RASTERS = ("gsplat", "inria")
_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str | torch.device | None = "auto", raster: str = "auto") -> torch.device:
    """The device a stage runs on.

    Args:
        spec: ``auto`` (None), ``cpu``, ``cuda`` or ``cuda:N``, or a ``torch.device``.
        raster: the rasterizer backend the stage will use (``auto`` picks CUDA only when the
            backend can draw there: not for ``cpu``).

    Returns:
        ``torch.device("cpu")`` or ``torch.device("cuda", N)`` (``cuda`` means ``cuda:0``).

    Raises:
        UsageError: a spec that is none of the above.
        DependencyError: ``cuda[:N]`` asked for on a machine where torch sees no such GPU
            (the message says why: a CPU build of torch, or fewer GPUs).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if not _SPEC.match(spec):
        raise UsageError(f"Unknown --device '{spec}'.", hint=f"use one of: {DEVICE_CHOICES}")
    if spec == "auto":
        if raster not in CPU_ONLY_RASTERS and cuda_available():
            return torch.device("cuda", 0)
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if not cuda_available():
        build = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise DependencyError(f"--device {spec}: {build}.",
                              hint="run on the CPU (--device cpu, or auto), or install a CUDA build of torch "
                                   "on an NVIDIA machine (docs/gpu.md)")
    if index >= torch.cuda.device_count():
        raise DependencyError(f"--device {spec}: torch sees {torch.cuda.device_count()} GPU(s) (cuda:0.."
                              f"cuda:{torch.cuda.device_count() - 1}).", hint="pick one of those")
    return torch.device("cuda", index)


def cuda_available() -> bool:
    """Whether torch can use a CUDA GPU (False on a CPU build; never raises)."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver reads as no GPU
        return False


def check_raster(raster: str, device: torch.device) -> None:
    """Refuse a rasterizer that cannot draw on ``device``, before any work.

    Raises:
        UsageError: ``cpu`` on a GPU, or ``gsplat``/``inria`` on the CPU (the hint names
            what works).
        DependencyError: ``gsplat``/``inria`` on CUDA without the library (the hint names
            the extra to install).
    """
    if raster in CPU_ONLY_RASTERS and device.type != "cpu":
        raise UsageError(f"--raster {raster} draws on the CPU only, and this run is on {device}.",
                         hint="use --raster auto (gsplat on CUDA) or torch, or --device cpu")
    if raster in CUDA_ONLY_RASTERS:
        if device.type != "cuda":
            raise UsageError(f"--raster {raster} draws on CUDA only, and this run is on {device}.",
                             hint="use --raster auto (the C++ cpu backend on the CPU), or --device cuda on an "
                                  "NVIDIA machine")
        from gstalk.raster.backends import get_backend

        reason = get_backend(raster).unavailable_reason(device)
        if reason is not None:
            raise DependencyError(f"rasterizer backend '{raster}' is unavailable: {reason}.",
                                  hint="pip install -e '.[cuda]' (gsplat), or use --raster torch")


def stage_device(spec: str | None, raster: str) -> torch.device:
    """:func:`resolve_device` then :func:`check_raster`: what a stage calls first."""
    device = resolve_device(spec, raster)
    check_raster(raster, device)
    return device


def randn(*shape: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 numbers drawn from torch's CPU generator, then moved to
    ``device``: the same numbers on every device (see the module docstring)."""
    return torch.randn(*shape).to(device)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the GPU's queued work (a no-op on the CPU): call before reading a clock."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``, for logs and summaries."""
    if device.type == "cuda":
        try:
            return f"{device} ({torch.cuda.get_device_name(device)})"
        except Exception:  # noqa: BLE001 - the name is decoration
            return str(device)
    return str(device)


def to_device(tree: Any, device: torch.device | str, *, non_blocking: bool = False) -> Any:
    """``tree`` (a tensor, or dicts / lists / tuples of them) with every tensor moved to
    ``device`` (``map_location`` for checkpoints and model files); other leaves unchanged."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device, non_blocking=non_blocking)
    if isinstance(tree, dict):
        return {k: to_device(v, device, non_blocking=non_blocking) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(v, device, non_blocking=non_blocking) for v in tree)
    return tree
