"""Tensors at rest: safetensors files with a small JSON metadata header, written atomically.

Nothing in gstalk unpickles: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gstalk.errors import WorkspaceError
from gstalk.workspace import atomic_write


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor | np.ndarray],
                 metadata: dict[str, Any] | None = None) -> None:
    """Write named tensors to ``path`` (safetensors), atomically.

    Args:
        tensors: name -> tensor/array (made contiguous, moved to CPU).
        metadata: JSON-able dict stored under the ``gstalk`` key of the header.
    """
    from safetensors.torch import save

    t = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu().contiguous())
         for k, v in tensors.items()}
    meta = {"gstalk": json.dumps(metadata or {})}
    data = save(t, metadata=meta)
    with atomic_write(path) as f:
        f.write(data)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`: (name -> CPU tensor, metadata dict).

    Raises:
        WorkspaceError: the file is missing or not a valid safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WorkspaceError(f"{path} is missing.", hint="re-run the stage that writes it", path=path)
    try:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out, json.loads(meta.get("gstalk", "{}"))
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError, SafetensorError) as exc:
        raise WorkspaceError(f"{path} is not a valid safetensors file ({exc}).",
                             hint="delete it and re-run the stage that writes it", path=path) from None


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The metadata dict of a file written by :func:`save_tensors`, without reading its
    tensors; None when the file is missing or unreadable (callers only report it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("gstalk", "{}"))
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError):
        return None
