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
    data = tensors_to_bytes(tensors, metadata)
    with atomic_write(path) as f:
        f.write(data)


def tensors_to_bytes(tensors: dict[str, torch.Tensor | np.ndarray], metadata: dict[str, Any] | None = None) -> bytes:
    """The bytes of the safetensors file :func:`save_tensors` writes (same arguments)."""
    from safetensors.torch import save

    t = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.detach().cpu().contiguous())
         for k, v in tensors.items()}
    return save(t, metadata={"gstalk": json.dumps(metadata or {})})


def tensors_from_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Decode the bytes of a safetensors file written by :func:`save_tensors` (e.g. a member
    of an avatar bundle): (name -> CPU tensor, metadata dict). Nothing is unpickled: the
    header is JSON, the tensors raw little-endian arrays.

    Raises:
        ValueError: not a valid safetensors buffer (a bad header, offsets beyond the data,
            metadata that is not JSON).
    """
    import struct

    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes: shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100_000_000:
        raise ValueError(f"header of {n} bytes in a buffer of {len(data)}")
    try:
        header = json.loads(data[8:8 + n])
        tensors = load(data)
        meta = json.loads((header.get("__metadata__") or {}).get("gstalk", "{}"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"unreadable header ({exc})") from None
    except Exception as exc:  # safetensors raises its own SafetensorError for bad buffers
        raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return tensors, meta


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
