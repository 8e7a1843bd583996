"""Network weights that the user brings: one safetensors file, read without unpickling.

gstalk never downloads weights and never ``torch.load``\\ s a user's file (a pickle can run
code). Metrics that need a pretrained network (LPIPS, SyncNet) read a safetensors file
whose key names and shapes they document, through :func:`read_safetensors` and
:func:`check_shapes`, which turn every problem into an :class:`~gstalk.errors.InputError`
that names the file and the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gstalk.errors import InputError


def read_safetensors(path: str | Path, what: str, hint: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU, in float32 (floating-point tensors only;
    integer ones, e.g. BatchNorm's ``num_batches_tracked``, are kept as they are).

    Args:
        path: the file; what: what it should hold, for messages ("LPIPS weights");
        hint: how to make the file (printed with every error).

    Raises:
        InputError: the file is missing, is a folder, or is not a safetensors file (a pickled
        ``.pth`` is refused, not opened).
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.exists():
        raise InputError(f"{what}: {p} does not exist.", hint=hint, path=p)
    if not p.is_file():
        raise InputError(f"{what}: {p} is not a file.", hint=hint, path=p)
    try:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(p), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = t.float() if t.is_floating_point() else t
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{what}: {p} is not a safetensors file ({exc}); gstalk does not unpickle .pth/.model "
                         "files.", hint=hint, path=p) from None
    if not out:
        raise InputError(f"{what}: {p} holds no tensors.", hint=hint, path=p)
    return out


def check_shapes(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], path: str | Path,
                 what: str, hint: str) -> None:
    """Check that every expected key is present with its shape (extra keys are allowed).

    Raises:
        InputError: naming the file, the first missing keys (and how many are missing) or the
        first mis-shaped key with both shapes.
    """
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(f"{what}: {path} lacks the key(s) {', '.join(repr(k) for k in missing[:3])}{more}.",
                         hint=hint, path=path)
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise InputError(f"{what}: {path}: key '{k}' has shape {list(tensors[k].shape)}, expected {list(shape)}.",
                             hint=hint, path=path)
    for k in expected:
        if not torch.isfinite(tensors[k]).all():
            raise InputError(f"{what}: {path}: key '{k}' holds NaN or Inf.", hint=hint, path=path)


def load_metric_nets(lpips: str | Path | None, syncnet: str | Path | None,
                     device: torch.device | str = "cpu") -> dict[str, Any]:
    """The user's metric weight files, read and validated, on ``device``: {"lpips": LPIPS,
    "syncnet": SyncNet} (only those given).

    Raises:
        InputError: see :meth:`gstalk.metrics.lpips.LPIPS.load` and
        :meth:`gstalk.metrics.syncnet.SyncNet.load`.
    """
    nets: dict[str, Any] = {}
    if lpips is not None:
        from gstalk.metrics.lpips import LPIPS

        nets["lpips"] = LPIPS.load(lpips).to(device)
    if syncnet is not None:
        from gstalk.metrics.syncnet import SyncNet

        nets["syncnet"] = SyncNet.load(syncnet).to(device)
    return nets
