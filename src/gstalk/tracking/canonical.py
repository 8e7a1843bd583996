"""MediaPipe's canonical face model and the landmark index groups gstalk uses.

The canonical mesh (468 vertices, 898 triangles) and the Procrustes landmark basis (the
stable, non-deforming landmarks with weights) are read from the
``geometry_pipeline_metadata_landmarks.binarypb`` inside the shipped
``face_landmarker.task`` bundle (Apache-2.0), with a minimal protobuf wire-format reader so
that no protobuf dependency is needed.

Canonical head space (the "world" of the Gaussians): the canonical face model converted
from centimetres to **metres**; x to the subject's left as seen by the camera (image right
for a frontal face), y up, z out of the face towards the viewer; origin near the centre of
the head, behind the nose.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from gstalk.errors import DependencyError

MODEL_FILE = "face_landmarker.task"
_METADATA = "geometry_pipeline_metadata_landmarks.binarypb"

# Landmark index groups of the 478-point MediaPipe face mesh (468 mesh + 10 iris points).
LIPS_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
LIPS_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
EYE_RIGHT = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
EYE_LEFT = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
BROW_RIGHT = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46)
BROW_LEFT = (300, 293, 334, 296, 336, 285, 295, 282, 283, 276)
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
             152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
UPPER_LIP_INNER = 13  # mid-point of the upper inner lip
LOWER_LIP_INNER = 14  # mid-point of the lower inner lip
MOUTH_LEFT, MOUTH_RIGHT = 291, 61  # mouth corners
CHIN = 152
FOREHEAD = 10
NOSE_TIP = 1


def model_path() -> Path:
    """Path of the face landmarker bundle shipped inside the package.

    Raises:
        DependencyError: the file is missing from the installation.
    """
    p = Path(str(resources.files("gstalk") / "assets" / MODEL_FILE))
    if not p.is_file():
        raise DependencyError(f"The face landmark model {p} is missing from the gstalk installation.",
                              hint="reinstall gstalk (pip install --force-reinstall gstalk)")
    return p


def _varint(b: bytes, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return r, i


def _fields(b: bytes) -> list[tuple[int, int, int | bytes]]:
    """Decode one protobuf message into (field number, wire type, value) triples."""
    out: list[tuple[int, int, int | bytes]] = []
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        num, wire = key >> 3, key & 7
        v: int | bytes
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((num, wire, v))
    return out


@dataclass(frozen=True)
class CanonicalFace:
    """The canonical face model.

    Attributes:
        vertices: [468, 3] float64, metres, canonical head space (y up, z towards viewer).
        uv: [468, 2] float64 texture coordinates in [0, 1].
        triangles: [898, 3] int64 vertex indices (counter-clockwise seen from the front).
        basis_ids: [K] int64 landmark ids of the Procrustes basis (stable points).
        basis_weights: [K] float64 their weights.
    """

    vertices: np.ndarray
    uv: np.ndarray
    triangles: np.ndarray
    basis_ids: np.ndarray
    basis_weights: np.ndarray


@lru_cache(maxsize=1)
def canonical_face() -> CanonicalFace:
    """Load the canonical face model from the shipped bundle (cached)."""
    with zipfile.ZipFile(model_path()) as z:
        raw = z.read(_METADATA)
    top = _fields(raw)
    mesh = _fields(next(v for n, w, v in top if n == 1))  # type: ignore[arg-type]
    vb = np.array([struct.unpack("<f", v)[0] for n, w, v in mesh if n == 3], np.float64)
    ib: list[int] = []
    for n, w, v in mesh:
        if n != 4:
            continue
        if w == 0:
            ib.append(int(v))  # type: ignore[arg-type]
        else:  # packed
            j = 0
            while j < len(v):  # type: ignore[arg-type]
                x, j = _varint(v, j)  # type: ignore[arg-type]
                ib.append(x)
    vert = vb.reshape(-1, 5)
    ids, weights = [], []
    for n, _, v in top:
        if n != 2:
            continue
        f = {fn: fv for fn, fw, fv in _fields(v)}  # type: ignore[arg-type]
        ids.append(int(f.get(1, 0)))
        weights.append(struct.unpack("<f", f[2])[0] if 2 in f else 1.0)
    return CanonicalFace(
        vertices=vert[:, :3] / 100.0,
        uv=vert[:, 3:5].copy(),
        triangles=np.asarray(ib, np.int64).reshape(-1, 3),
        basis_ids=np.asarray(ids, np.int64),
        basis_weights=np.asarray(weights, np.float64),
    )
