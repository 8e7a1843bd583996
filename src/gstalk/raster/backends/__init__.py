"""Backend registry: name → object implementing :class:`Backend`.

Backends are registered as ``"module:attribute"`` strings and imported on first use, so
``import gstalk.raster`` imports no backend library (gsplat, diff_gaussian_rasterization)
and compiles nothing. Add a backend with :func:`register_backend`.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from gstalk.errors import UsageError
from gstalk.raster.validation import RasterInputs


@runtime_checkable
class Backend(Protocol):
    """What a rasterizer backend provides.

    ``rasterize`` receives validated inputs (:class:`RasterInputs`) and returns
    ``(render_colors [B,H,W,C], render_alphas [B,H,W,1], meta)`` with the meta keys
    documented in :func:`gstalk.raster.rasterize` (``means2d``, ``radii``, ``depths``,
    ``conics``, ``tiles_touched``, ``n_intersections``, ``backend``).
    """

    name: str

    def unavailable_reason(self, device: torch.device | None = None) -> str | None:
        """None when usable (for tensors on ``device``), else a one-line reason. Never raises."""
        ...

    def rasterize(self, inp: RasterInputs) -> tuple[Tensor, Tensor, dict]:
        """Render; raises DependencyError/UsageError on unsupported inputs."""
        ...


_REGISTRY: dict[str, str | Backend] = {
    "torch": "gstalk.raster.backends.torch_backend:TorchBackend",
    "cpu": "gstalk.raster.backends.cpu_backend:CpuBackend",
    "gsplat": "gstalk.raster.backends.gsplat_backend:GsplatBackend",
    "inria": "gstalk.raster.backends.inria_backend:InriaBackend",
}
_INSTANCES: dict[str, Backend] = {}


def register_backend(name: str, backend: Backend | str) -> None:
    """Register (or replace) a backend under ``name``.

    Args:
        name: the string users pass as ``backend=``; ``"auto"`` is reserved.
        backend: an object with ``name``, ``unavailable_reason`` and ``rasterize``, or a
            ``"package.module:Class"`` path instantiated lazily on first use.
    """
    if name == "auto":
        raise UsageError("'auto' is reserved and cannot be registered as a backend name.")
    _REGISTRY[name] = backend
    _INSTANCES.pop(name, None)


def backend_names() -> list[str]:
    """Registered backend names, in registration order."""
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend registered under ``name`` (instantiating it on first use).

    Raises:
        UsageError: unknown name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise UsageError(f"unknown rasterizer backend {name!r}; choose one of: auto, {', '.join(_REGISTRY)}.")
    if name not in _INSTANCES:
        entry = _REGISTRY[name]
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module), attr)()
        _INSTANCES[name] = entry  # type: ignore[assignment]
    return _INSTANCES[name]


def available_backends(device: torch.device | str | None = None) -> dict[str, str]:
    """Map every registered backend name to ``"ok"`` or the reason it cannot run.

    Never raises. Checking ``cpu`` may compile the C++ library (once, a few seconds).

    Args:
        device: when given, also require that the backend accepts tensors on it.
    """
    dev = torch.device(device) if device is not None else None
    out: dict[str, str] = {}
    for name in _REGISTRY:
        try:
            reason = get_backend(name).unavailable_reason(dev)
        except Exception as exc:  # noqa: BLE001 - report, never raise
            reason = f"{type(exc).__name__}: {exc}"
        out[name] = "ok" if reason is None else reason
    return out


def working_backends_text(device: torch.device | None = None) -> str:
    """``"torch, cpu"``-style list of the backends that work (for error hints)."""
    ok = [k for k, v in available_backends(device).items() if v == "ok"]
    return ", ".join(ok) if ok else "none"
