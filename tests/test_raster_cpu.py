"""The C++ `cpu` backend: determinism, finite differences, native binning/projection,
build fallback, lazy imports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest_raster import (  # torch_one_thread: autouse fixture
    random_scene,
    render_with_grads,
    require_backend,
    torch_one_thread,  # noqa: F401
)

from gstalk.errors import DependencyError
from gstalk.raster import RasterSettings, available_backends, build, get_backend, rasterize
from gstalk.raster.binning import bin_gaussians
from gstalk.raster.projection import project_gaussians
from gstalk.raster.scenes import head_blob


@pytest.fixture
def cpu_backend():
    require_backend("cpu", "cpu")
    return "cpu"


def _blob(n=3000, w=96, h=80, **kw):
    s = head_blob(n, w, h, seed=4, **kw)
    s["backgrounds"] = torch.tensor([[0.2, 0.5, 0.7]])
    return s


def test_bit_identical_runs_and_thread_counts(cpu_backend, monkeypatch):
    from gstalk.raster import composite_cpu

    monkeypatch.setattr(composite_cpu, "WORK_PER_THREAD", 1)  # use every thread even for small scenes
    scene = _blob()
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (threads, threads, 1, 2, 3, 4):
            torch.set_num_threads(n)
            runs.append(render_with_grads(rasterize, scene, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    first = runs[0]
    for other in runs[1:]:
        for k, v in first.items():
            if k != "meta":
                assert torch.equal(v, other[k]), f"{k} differs between runs"


def test_finite_differences(cpu_backend):
    """Directional derivatives of the C++ backward vs central differences (float32)."""
    s = RasterSettings(alpha_min=0.0, transmittance_min=0.0)
    scene = random_scene(25, seed=41)
    scene["opacities"] = scene["opacities"].clamp(max=0.9)
    g = torch.Generator().manual_seed(7)
    weights = torch.rand(1, 32, 40, 3, generator=g, dtype=torch.float64)
    aw = torch.rand(1, 32, 40, 1, generator=g, dtype=torch.float64)

    def loss(**over):
        c, a, _ = rasterize(**dict(scene, **over), settings=s, backend="cpu")
        return (c.double() * weights).sum() + (a.double() * aw).sum()  # float64 sum: less FD noise

    for name, h in (("means", 1e-3), ("scales", 5e-4), ("quats", 2e-3), ("opacities", 2e-3), ("colors", 1e-2)):
        x = scene[name].clone().requires_grad_(True)
        loss(**{name: x}).backward()
        d = torch.randn(x.shape, generator=g)
        analytic = (x.grad * d).sum().item()
        with torch.no_grad():
            numeric = (loss(**{name: x + h * d}) - loss(**{name: x - h * d})).item() / (2 * h)
        assert abs(analytic - numeric) <= 2e-3 * abs(numeric) + 1e-3, (name, analytic, numeric)


@pytest.mark.parametrize("cameras", [1, 2])
def test_native_binning_matches_torch(cpu_backend, cameras):
    from gstalk.raster.binning_cpu import bin_gaussians_cpu

    scene = random_scene(300, width=70, height=50, cameras=cameras, seed=42)
    p = project_gaussians(scene["means"], scene["quats"], scene["scales"] * 4, scene["opacities"], scene["viewmats"],
                          scene["Ks"], 70, 50, 0.01, 1e10, RasterSettings())  # fmt: skip
    for ts in (16, 12):
        a = bin_gaussians(p.means2d, p.radii, p.depths, 70, 50, ts)
        b = bin_gaussians_cpu(p.means2d, p.radii, p.depths, 70, 50, ts)
        assert a.n_intersections == b.n_intersections > 0
        assert torch.equal(a.tile_offsets, b.tile_offsets)
        assert torch.equal(a.flatten_ids, b.flatten_ids)
        assert torch.equal(a.tiles_touched, b.tiles_touched)


@pytest.mark.parametrize("settings", [RasterSettings(), RasterSettings(antialiased=True, radius_mode="opacity")])
def test_native_projection_matches_torch(cpu_backend, settings):
    from gstalk.raster.projection_cpu import project_gaussians_cpu

    scene = random_scene(500, cameras=2, seed=43)
    args = (scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["viewmats"], scene["Ks"],
            40, 32, 0.01, 1e10, settings)  # fmt: skip
    a, b = project_gaussians(*args), project_gaussians_cpu(*args)
    assert torch.equal(a.radii, b.radii)
    v = a.radii > 0
    for k in ("means2d", "depths", "conics", "opacities"):
        x, y = getattr(a, k)[v], getattr(b, k)[v]
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-5 * y.abs().max().item()), k


def test_no_grad_path_matches_grad_path(cpu_backend):
    scene = _blob()
    c1, a1, _ = rasterize(**scene, backend="cpu")  # inputs need no grad -> fused C++ projection
    means = scene["means"].clone().requires_grad_(True)
    c2, a2, _ = rasterize(**dict(scene, means=means), backend="cpu")  # torch autograd projection
    assert (c1 - c2.detach()).abs().max() < 1e-5 and (a1 - a2.detach()).abs().max() < 1e-5


def test_compiler_failure_fallback(monkeypatch, tmp_path):
    def broken(build_directory):
        raise RuntimeError("Error building extension 'gstalk_raster_cpu'\nc++: error: simulated compiler failure")

    monkeypatch.setenv("GSTALK_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build.RASTER, "compile", broken)
    build.reset()
    try:
        scene = random_scene(10, seed=44)
        with pytest.warns(RuntimeWarning, match="falling back to the slow 'torch' backend.*simulated compiler failure"):
            _, _, meta = rasterize(**scene)
        assert meta["backend"] == "torch"
        with pytest.raises(DependencyError, match="simulated compiler failure") as exc:
            rasterize(**scene, backend="cpu")
        assert "backend='torch'" in str(exc.value)
        status = available_backends()
        assert status["torch"] == "ok" and "simulated" in status["cpu"]
    finally:
        monkeypatch.undo()
        build.reset()


@pytest.mark.slow
def test_concurrent_first_builds_share_one_library(cpu_backend, tmp_path):
    """Two processes building into an empty cache: one compiles, the other waits for it."""
    code = textwrap.dedent(
        """
        import torch
        from gstalk.raster import rasterize
        from gstalk.raster.scenes import head_blob
        c, a, m = rasterize(**head_blob(200, 32, 32), backend="cpu")
        assert m["backend"] == "cpu" and float(a.max()) > 0
        """
    )
    env = dict(os.environ, GSTALK_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum(e.count("compiling the CPU rasterizer") for e in errs) == 1, errs
    dirs = sorted(d.name for d in tmp_path.iterdir() if d.is_dir())
    assert len(dirs) == 1 and dirs[0].startswith("gstalk_raster_cpu-"), dirs  # no leftover temporary folders
    assert (tmp_path / dirs[0] / "gstalk_raster_cpu.so").exists()


def test_auto_uses_cpu_when_built(cpu_backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, meta = rasterize(**random_scene(10, seed=45))
    assert meta["backend"] == "cpu"
    scene64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in random_scene(10).items()}
    assert rasterize(**scene64)[2]["backend"] == "torch"


def test_import_is_lazy():
    code = textwrap.dedent(
        """
        import os, sys
        import gstalk, gstalk.raster
        from gstalk.raster import build
        bad = [m for m in sys.modules if m.startswith(("gsplat", "diff_gaussian_rasterization"))]
        maps = open(f"/proc/{os.getpid()}/maps").read() if os.path.exists("/proc") else ""
        assert not bad, bad
        assert not build.is_loaded()
        assert "gstalk_raster_cpu" not in maps
        assert "torch.utils.cpp_extension" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_available_backends_never_raises():
    status = available_backends()
    assert set(status) >= {"torch", "cpu", "gsplat", "inria"}
    assert status["torch"] == "ok"
    assert all(isinstance(v, str) and v for v in status.values())
    assert get_backend("torch").name == "torch"
    if not torch.cuda.is_available():
        assert status["gsplat"] != "ok" and status["inria"] != "ok"
