"""Shared fixtures: the real data folder (skipped when absent), a synthetic talking clip, and
one tiny trained workspace reused by the render/eval/CLI tests."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# fixtures that train a model, run the real pipeline or read the real clips: a test that uses
# one is training-heavy and gets the `slow` marker (`python -m pytest -q` runs it;
# `-m "not slow"` is the quick loop)
HEAVY_FIXTURES = {"trained_ws", "ws_copy", "fan_ws", "mannequin_clip", "shared_data"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests that use a :data:`HEAVY_FIXTURES` fixture ``slow``; skip the ``cuda``
    tests, with the reason, where torch sees no GPU (they run on a GPU machine, first thing
    in ``benchmarks/gpu_check.sh``)."""
    import torch

    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no CUDA GPU"
    skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU ({why}); benchmarks/gpu_check.sh runs it on one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
SHARED_DATA = Path(os.environ.get("GSTALK_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def benchmark_script():  # type: ignore[no-untyped-def]
    """A loader of the scripts in ``benchmarks/`` (not a package) as modules:
    ``benchmark_script("mouth_view")`` imports ``benchmarks/mouth_view.py``."""
    import importlib.util

    def load(name: str):  # type: ignore[no-untyped-def]
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$GSTALK_SHARED_DATA``); tests using it skip when it is absent."""
    if not (SHARED_DATA / "video" / "obama.mp4").is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set GSTALK_SHARED_DATA or check out ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def cache_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep compiled kernels in the user's cache unless the environment says otherwise."""
    os.environ.setdefault("GSTALK_CACHE_DIR", str(Path.home() / ".cache" / "gstalk"))


@pytest.fixture(scope="session")
def mannequin_clip(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A 3 s synthetic talking-mannequin clip (256 px, beeping tone, audio 2 frames late)."""
    from gstalk.testing.mannequin import make_clip

    d = tmp_path_factory.mktemp("clip")
    return make_clip(d / "mannequin talk.mp4", duration_s=3.0, size=256, offset_frames=2)


@pytest.fixture(scope="session")
def trained_ws(tmp_path_factory: pytest.TempPathFactory, mannequin_clip) -> Path:  # type: ignore[no-untyped-def]
    """A workspace taken through extract, track, coarse and fine with the ``test`` preset."""
    from gstalk.config import get_preset
    from gstalk.stages.coarse import run_coarse
    from gstalk.stages.extract import run_extract
    from gstalk.stages.fine import run_fine
    from gstalk.stages.track import run_track

    p = get_preset("test")
    root = tmp_path_factory.mktemp("ws") / "ws"
    run_extract(mannequin_clip.path, root, p.extract, preset="test")
    run_track(str(root), p.track)
    run_coarse(str(root), p.coarse)
    run_fine(str(root), p.fine)
    return root


@pytest.fixture
def ws_copy(trained_ws: Path, tmp_path: Path) -> Path:
    """A private copy of the trained workspace (for tests that modify it)."""
    dst = tmp_path / "ws"
    shutil.copytree(trained_ws, dst)
    return dst


@contextlib.contextmanager
def serve_threads(n: int = 1) -> Iterator[None]:
    """Torch's CPU threads as ``gstalk serve --threads`` sets them (default 1), for a server run
    inside the test process; the test process's own setting comes back afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
