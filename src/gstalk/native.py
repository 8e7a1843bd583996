"""Just-in-time build, cache and ctypes loading of gstalk's C++ kernels.

Each kernel is one plain C++17 + OpenMP source with ``extern "C"`` entry points (no torch
headers, so it compiles in seconds). On first use it is compiled with
:func:`torch.utils.cpp_extension.load` (ninja) into ``$GSTALK_CACHE_DIR/<name>-<key>/``
(default ``~/.cache/gstalk``), where ``<key>`` hashes the source, the flags, the torch
version and the CPU model (the code is built with ``-march=native``). The build runs in a
private temporary folder under an exclusive file lock and is renamed into place, so
concurrent processes never see a half-written library. Nothing here runs at import time.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gstalk.errors import DependencyError

# -ffp-contract=off: a backward pass can recompute the forward's values bit for bit (kernels
# write their fused multiply-adds explicitly); -fno-trapping-math lets GCC turn the selects
# of hot loops into blends.
EXTRA_CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno",
                "-fopenmp", "-Wall", "-Wno-psabi")
EXTRA_LDFLAGS = ("-fopenmp",)


def cache_dir() -> Path:
    """Root of gstalk's caches: ``$GSTALK_CACHE_DIR`` or ``~/.cache/gstalk``."""
    env = os.environ.get("GSTALK_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gstalk"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _first_error_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and ln != lines[0]:
            return ln[:300]
    return lines[0][:300] if lines else type(exc).__name__


@dataclass
class NativeLibrary:
    """A C++ kernel library built on first use.

    Args:
        name: library name (``lib<name>.so`` is cached under ``<name>-<key>/``).
        source: the ``.cpp`` file.
        declare: sets ``argtypes``/``restype`` of the loaded ``ctypes.CDLL``.
        description: words for the one progress line printed while compiling.
        fallback_hint: how to do without it (named in the DependencyError).
    """

    name: str
    source: Path
    declare: Callable[[ctypes.CDLL], None]
    description: str
    fallback_hint: str
    expected_seconds: int = 5
    _lib: ctypes.CDLL | None = field(default=None, init=False, repr=False)
    _error: str | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def build_key(self) -> str:
        """Hash of everything that changes the binary (source, flags, torch, CPU)."""
        import torch

        h = hashlib.sha256()
        h.update(self.source.read_bytes())
        for part in (EXTRA_CFLAGS, EXTRA_LDFLAGS, (torch.__version__, platform.machine(), _cpu_model())):
            h.update(repr(part).encode())
        return h.hexdigest()[:16]

    def library_dir(self) -> Path:
        return cache_dir() / f"{self.name}-{self.build_key()}"

    def compile(self, build_directory: Path) -> Path:
        """Compile into ``build_directory``; return the shared library path (tests monkeypatch it)."""
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            raise RuntimeError(f"no C++ compiler found ({cxx!r} is not on PATH)")
        from torch.utils.cpp_extension import load

        path = load(name=self.name, sources=[str(self.source)], extra_cflags=list(EXTRA_CFLAGS),
                    extra_ldflags=list(EXTRA_LDFLAGS), build_directory=str(build_directory),
                    is_python_module=False, verbose=False)
        return Path(path) if path else build_directory / f"{self.name}.so"

    def _build_into(self, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        lib = final / f"{self.name}.so"
        with open(final.parent / f"{final.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if lib.exists():  # another process finished while we waited
                return lib
            print(f"gstalk: compiling the {self.description} (once, ~{self.expected_seconds}s)…",
                  file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
            try:
                built = self.compile(tmp)
                if built.name != lib.name:
                    built.rename(tmp / lib.name)
                if final.exists():  # leftover of an interrupted build
                    shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            print(f"gstalk: {self.description} built in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
            return lib

    def load(self) -> ctypes.CDLL:
        """The compiled library, building it on first use (cached per process).

        Raises:
            DependencyError: it cannot be built or loaded (first compiler error line + fix).
                The failure is remembered so later calls fail fast (see :meth:`reset`).
        """
        if self._lib is not None:
            return self._lib
        with self._lock:  # one build/load per process even with several Python threads
            if self._lib is not None:
                return self._lib
            if self._error is None:
                try:
                    final = self.library_dir()
                    path = final / f"{self.name}.so"
                    if not path.exists():
                        path = self._build_into(final)
                    lib = ctypes.CDLL(str(path))
                    self.declare(lib)
                    self._lib = lib
                    return lib
                except Exception as exc:  # noqa: BLE001 - any toolchain failure becomes one line
                    self._error = _first_error_line(exc)
        raise DependencyError(f"The {self.description} could not be built: {self._error}.",
                              hint=f"install a C++ compiler with OpenMP (apt-get install g++) and ninja "
                                   f"(pip install ninja), or {self.fallback_hint}")

    def unavailable_reason(self) -> str | None:
        """None when the library loads (building it if needed), else the reason."""
        try:
            self.load()
        except DependencyError as exc:
            return str(exc)
        return None

    @property
    def loaded(self) -> bool:
        return self._lib is not None

    def reset(self) -> None:
        """Forget the cached library/failure (for tests)."""
        self._lib = None
        self._error = None
