"""FAN, the second landmark detector: 68 iBUG points from face-alignment's TorchScript model.

FAN (2D-FAN-4, Bulat and Tzimiropoulos 2017) is the landmark network the papers' LMD uses
(ER-NeRF, TalkingGaussian: face-alignment's ``LandmarksType.TWO_D``). Its weights are not
shipped with gstalk and never downloaded: the user names the file, face-alignment's public
TorchScript archive :data:`PUBLIC_ARCHIVE`, with ``--fan-weights PATH`` or
``$GSTALK_FAN_WEIGHTS``.

Loading rules: the file's format is checked *before* anything is loaded. A TorchScript
archive (a zip holding one folder with ``code/`` and ``data.pkl``) is loaded with
``torch.jit.load``, which rebuilds TorchScript modules only; a pickle (``torch.save``'s
legacy format, face-alignment 1.5's ``.pth.tar``), a ``torch.save`` zip, a safetensors file
or any other zip is refused by name, unopened. A loaded model must map a [1, 3, 256, 256]
crop to 68 heatmaps of 64x64, else it is refused too. face-alignment's face detector (S3FD)
is not used: FAN gets the face boxes MediaPipe finds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gstalk.errors import InputError, UsageError
from gstalk.tracking.detector import FaceDetection, LandmarkDetector, MediaPipeDetector
from gstalk.tracking.heatmaps import CROP_SIZE, HEATMAP_SIZE, box_center_scale, crop_image, heatmaps_to_image

N_POINTS = 68
ENV_VAR = "GSTALK_FAN_WEIGHTS"
PUBLIC_ARCHIVE = "2DFAN4-cd938726ad.zip"
# as pinned by third-party code that fetches it (its first 10 digits are in the file name, the
# torch.hub convention); not verified here: the file cannot be downloaded on gstalk's machines
PUBLIC_SHA256 = "cd938726adb1f15f361263cce2db9cb820c42585fa8796ec72ce19107f369a46"
PUBLIC_URL = "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-cd938726ad.zip"
WHERE = (f"face-alignment's public 2D-FAN-4 TorchScript archive {PUBLIC_ARCHIVE} (SHA-256 {PUBLIC_SHA256[:16]}…; "
         "docs/methods.md says where it comes from)")


def resolve_weights(path: str | Path | None, flag: str = "--fan-weights") -> Path:
    """The FAN weights file the user named: ``path`` if given, else ``$GSTALK_FAN_WEIGHTS``.

    Raises:
        UsageError: neither names a file (one line naming the flag, the variable and the file).
    """
    if path is not None and str(path) != "":
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    raise UsageError(f"The FAN landmark detector needs its weights, and none were given: pass {flag} PATH "
                     f"(or set {ENV_VAR}).", hint=f"the file is {WHERE}; gstalk downloads nothing")


@dataclass(frozen=True)
class WeightsInfo:
    """What :func:`inspect_weights` found: the file, its SHA-256, whether it is the public
    2D-FAN-4 archive, and the TorchScript folder inside it."""

    path: Path
    sha256: str
    public_archive: bool
    folder: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "public_archive": self.public_archive}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inspect_weights(path: str | Path) -> WeightsInfo:
    """Check that ``path`` is a TorchScript archive, without loading it.

    Raises:
        InputError: missing, a folder, a pickle, a safetensors file, a ``torch.save`` zip,
        another zip, or not a zip (each named, with where the right file comes from).
    """
    p = Path(path)
    hint = f"use {WHERE}"
    if not p.exists():
        raise InputError(f"FAN weights: {p} does not exist.", hint=hint, path=p)
    if not p.is_file():
        raise InputError(f"FAN weights: {p} is not a file.", hint=hint, path=p)
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        raise InputError(f"FAN weights: {p} is a pickle (torch.save's legacy format, e.g. face-alignment 1.5's "
                         ".pth.tar); gstalk never unpickles files.", hint=hint, path=p)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30):
        raise InputError(f"FAN weights: {p} is a safetensors file; the FAN detector needs the TorchScript "
                         "archive (the network's code and weights in one zip).", hint=hint, path=p)
    if not zipfile.is_zipfile(p):
        raise InputError(f"FAN weights: {p} is neither a TorchScript archive nor any zip file.", hint=hint, path=p)
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"FAN weights: {p} is a damaged zip file ({exc}).", hint=hint, path=p) from None
    folders = {n.split("/", 1)[0] for n in names if "/" in n}
    folder = next(iter(folders)) if len(folders) == 1 else ""
    has_code = any(n.startswith(f"{folder}/code/") for n in names)
    if folder and not has_code and f"{folder}/data.pkl" in names:
        raise InputError(f"FAN weights: {p} is a torch.save checkpoint (a pickled zip without TorchScript code); "
                         "gstalk never unpickles files.", hint=hint, path=p)
    if not folder or not has_code or not ({f"{folder}/data.pkl", f"{folder}/model.json"} & set(names)):
        shown = ", ".join(names[:3]) + (" …" if len(names) > 3 else "")
        raise InputError(f"FAN weights: {p} is a zip file but not a TorchScript archive (it holds "
                         f"{shown or 'nothing'}).", hint=hint, path=p)
    digest = sha256_of(p)
    return WeightsInfo(p, digest, digest == PUBLIC_SHA256, folder)


class FANModel:
    """A loaded, checked FAN network.

    Args:
        path: the TorchScript archive (checked with :func:`inspect_weights` first).
        device: torch device; default ``cuda`` when available, else ``cpu``.

    Input of :meth:`heatmaps`: [B, 3, 256, 256] float32 RGB in [0, 1]. Output: [B, 68, 64, 64]
    float32 heatmaps (the last stack's, when the network returns one per hourglass).

    Raises:
        InputError: the file is refused by :func:`inspect_weights`, TorchScript cannot load it,
        or the network fails on a crop or returns another shape.
    """

    def __init__(self, path: str | Path, device: str | None = None):
        import torch

        self.info = inspect_weights(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        p = self.info.path
        hint = f"use {WHERE}"
        try:
            with warnings.catch_warnings():  # torch marks TorchScript deprecated; it is the archive's format
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(p), map_location=self.device)  # the user's own file, checked above
        except Exception as exc:  # noqa: BLE001 - any failure of TorchScript's loader is a bad file
            raise InputError(f"FAN weights: TorchScript could not load {p} ({str(exc).splitlines()[0][:200]}).",
                             hint=hint, path=p) from None
        self.net.eval()
        try:
            out = self.heatmaps(torch.zeros(1, 3, CROP_SIZE, CROP_SIZE))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - a network that cannot take a FAN crop is the wrong file
            raise InputError(f"FAN weights: the network in {p} fails on a [1, 3, {CROP_SIZE}, {CROP_SIZE}] crop "
                             f"({str(exc).splitlines()[0][:200]}).", hint=hint, path=p) from None
        del out

    def heatmaps(self, crops: Any) -> Any:
        """[B, 3, 256, 256] float32 in [0, 1] -> [B, 68, 64, 64] float32 (on the CPU)."""
        import torch

        with torch.no_grad():
            out = self.net(crops.to(self.device))
        if isinstance(out, (list, tuple)) and out:
            out = out[-1]
        want = (int(crops.shape[0]), N_POINTS, HEATMAP_SIZE, HEATMAP_SIZE)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"FAN weights: the network in {self.info.path} returns {got} for a "
                             f"[{want[0]}, 3, {CROP_SIZE}, {CROP_SIZE}] crop, not {list(want)} heatmaps: "
                             "not a 2D-FAN model.", hint=f"use {WHERE}", path=self.info.path)
        return out.float().cpu()

    def landmarks(self, image: np.ndarray, box: np.ndarray | tuple[float, float, float, float],
                  truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """68 landmarks of the face in ``box``.

        Args:
            image: [H, W, 3] uint8 RGB.
            box: (x0, y0, x1, y1) face box in pixels (gstalk gives MediaPipe's).
            truncate: integer pixels, as face-alignment returns them (the papers' LMD).

        Returns:
            ([68, 2] float64 pixels in face-alignment's convention, [68] float32 heatmap maxima).
        """
        import torch

        center, scale = box_center_scale(box)
        crop = crop_image(np.ascontiguousarray(image[..., :3]), center, scale, CROP_SIZE)
        x = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1))).float().div_(255.0)[None]
        return heatmaps_to_image(self.heatmaps(x).numpy(), center, scale, truncate=truncate)


class FANDetector:
    """The ``fan`` :class:`~gstalk.tracking.detector.LandmarkDetector`: MediaPipe finds the
    faces (their landmark boxes), FAN places 68 points in each.

    Args:
        weights: the TorchScript archive (see :class:`FANModel`); or ``model``, one already loaded.
        video, num_faces: passed to the MediaPipe box finder.

    Each :class:`~gstalk.tracking.detector.FaceDetection` has ``landmarks`` [68, 3] (x, y px;
    z = 0, FAN-2D has no depth), no blendshapes ([0]), ``box`` = the MediaPipe box FAN
    was given and ``scores`` [68] = FAN's heatmap maxima.
    """

    name = "fan"

    def __init__(self, weights: str | Path | None = None, *, model: FANModel | None = None, video: bool = True,
                 num_faces: int = 2):
        if model is None:
            if weights is None:
                raise ValueError("FANDetector needs weights or a loaded model")
            model = FANModel(weights)
        self.model = model
        self._boxes: LandmarkDetector | None = MediaPipeDetector(video=video, num_faces=num_faces)

    def detect(self, image: np.ndarray, timestamp_ms: int | None = None) -> list[FaceDetection]:
        assert self._boxes is not None, "detector closed"
        out = []
        for face in self._boxes.detect(image, timestamp_ms):
            box = np.array(face.bbox, np.float32)
            pts, scores = self.model.landmarks(image, box)
            lm = np.zeros((N_POINTS, 3), np.float32)
            lm[:, :2] = pts
            out.append(FaceDetection(lm, np.zeros(0, np.float32), np.zeros((4, 4), np.float32), (), box=box,
                                     scores=scores))
        return out

    def close(self) -> None:
        if self._boxes is not None:
            with contextlib.suppress(Exception):
                self._boxes.close()
            self._boxes = None

    def __enter__(self) -> FANDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
