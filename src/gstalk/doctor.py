"""``gstalk doctor``: is this machine ready to run gstalk, and what to do if not.

Each check returns a :class:`Check` (name, status ``ok``/``warn``/``fail``, what was found,
and the fix). Checks never raise: an unexpected exception becomes a ``fail`` with its
message. Checking the CPU backends may compile the C++ kernels once (seconds; cached).
"""

from __future__ import annotations

import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MIN_FREE_GB = 2.0


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 11)
    return Check("python", "ok" if ok else "fail", f"{platform.python_implementation()} {platform.python_version()}",
                 "" if ok else "install Python 3.11 or newer")


def check_torch() -> Check:
    import torch

    cuda = torch.version.cuda
    build = f"CUDA {cuda}" if cuda else "CPU build"
    return Check("torch", "ok", f"{torch.__version__} ({build}), {torch.get_num_threads()} threads")


def check_cuda() -> Check:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return Check("cuda", "ok", f"{torch.cuda.device_count()} GPU(s): {name}")
    return Check("cuda", "warn", "no CUDA GPU: training runs on the CPU backend (slower)",
                 "on an NVIDIA machine: pip install -e '.[cuda]' with a CUDA build of torch")


def check_ffmpeg() -> Check:
    import imageio_ffmpeg

    exe = imageio_ffmpeg.get_ffmpeg_exe()
    return Check("ffmpeg", "ok", f"{exe} ({imageio_ffmpeg.get_ffmpeg_version()})")


def check_pyav() -> Check:
    import av

    return Check("pyav", "ok", f"av {av.__version__} (probing and decoding)")


def check_compiler() -> Check:
    from torch.utils.cpp_extension import get_cxx_compiler

    cxx = get_cxx_compiler()
    path = shutil.which(cxx)
    if path is None:
        return Check("c++ compiler", "fail", f"'{cxx}' not found on PATH: the cpu backend falls back to torch (~60x "
                     "slower)", "install g++ (Debian: apt-get install g++), or set CXX")
    return Check("c++ compiler", "ok", path)


def check_native() -> Check:
    from gstalk.deform.hashgrid import NATIVE

    reason = NATIVE.unavailable_reason()
    if reason:
        return Check("hash-grid kernel", "warn", f"C++ hash grid unavailable ({reason}); using torch",
                     "install g++ and ninja, then run gstalk doctor again")
    return Check("hash-grid kernel", "ok", "C++ kernel built and loaded")


def check_backends() -> Check:
    from gstalk.raster import available_backends

    status = available_backends()
    ok = [k for k, v in status.items() if v == "ok"]
    missing = {k: v for k, v in status.items() if v != "ok"}
    detail = "working: " + (", ".join(ok) or "none")
    if missing:
        detail += "; " + "; ".join(f"{k}: {v}" for k, v in missing.items())
    if "cpu" not in ok and not any(k in ok for k in ("gsplat", "inria")):
        return Check("rasterizer", "warn" if "torch" in ok else "fail", detail,
                     "install g++ for the fast cpu backend (or gstalk[cuda] on a GPU machine)")
    return Check("rasterizer", "ok", detail)


def check_landmark_model() -> Check:
    from gstalk.tracking.canonical import canonical_face, model_path

    path = model_path()
    face = canonical_face()
    return Check("landmark model", "ok", f"{path.name} ({path.stat().st_size / 2**20:.1f} MiB), "
                 f"canonical mesh {len(face.vertices)} vertices")


def check_mediapipe() -> Check:
    import mediapipe

    return Check("mediapipe", "ok", f"mediapipe {mediapipe.__version__}")


def check_fan_weights() -> Check:
    """FAN's weights, when ``$GSTALK_FAN_WEIGHTS`` names them: the file's format and checksum
    (never loaded here). Optional: only ``--detector fan`` and ``--lmd-landmarks fan`` need it."""
    import os

    from gstalk.errors import InputError
    from gstalk.tracking.fan import ENV_VAR, PUBLIC_ARCHIVE, inspect_weights

    path = os.environ.get(ENV_VAR, "")
    if not path:
        return Check("fan weights", "ok", f"${ENV_VAR} not set (optional: FAN is used only with --detector fan or "
                                          "--lmd-landmarks fan, and --fan-weights PATH)")
    try:
        info = inspect_weights(path)
    except InputError as exc:
        return Check("fan weights", "warn", f"${ENV_VAR}: {exc.message}", exc.hint or "")
    if not info.public_archive:
        return Check("fan weights", "warn", f"{path}: a TorchScript archive, SHA-256 {info.sha256[:16]}…, not the "
                     f"public {PUBLIC_ARCHIVE}", f"use {PUBLIC_ARCHIVE} to compare with the papers' numbers "
                                                "(docs/methods.md)")
    return Check("fan weights", "ok", f"{path}: the public {PUBLIC_ARCHIVE} (SHA-256 matches)")


def check_disk(path: str | Path = ".") -> Check:
    from gstalk.native import cache_dir

    free = shutil.disk_usage(Path(path).resolve()).free / 2**30
    cache = cache_dir()
    detail = f"{free:.1f} GiB free in {Path(path).resolve()}; C++ build cache {cache}"
    if free < MIN_FREE_GB:
        return Check("disk", "warn", detail, f"free at least {MIN_FREE_GB:.0f} GiB: a 5 min clip's workspace takes "
                     "about 1 GiB")
    return Check("disk", "ok", detail)


CHECKS: tuple[Callable[[], Check], ...] = (check_python, check_torch, check_cuda, check_ffmpeg, check_pyav,
                                           check_mediapipe, check_landmark_model, check_fan_weights, check_compiler,
                                           check_native, check_backends, check_disk)


def run_checks(checks: tuple[Callable[[], Check], ...] = CHECKS) -> list[Check]:
    """Run ``checks`` in order; an exception in one becomes a ``fail`` line naming it."""
    out = []
    for fn in checks:
        name = fn.__name__.removeprefix("check_").replace("_", " ")
        try:
            out.append(fn())
        except Exception as exc:  # noqa: BLE001 - the doctor reports, never crashes
            out.append(Check(name, "fail", f"{type(exc).__name__}: {exc}",
                             "reinstall gstalk: pip install -e '.[dev]' (see README.md)"))
    return out


def checks_table(checks: list[Check]) -> Any:
    """The checks as a rich Table with a fix per problem (what ``gstalk doctor`` prints)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="gstalk doctor", show_lines=False)
    for col in ("check", "status", "found", "fix"):
        table.add_column(col, overflow="fold")
    style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    for c in checks:
        table.add_row(c.name, f"[{style[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix))
    return table
