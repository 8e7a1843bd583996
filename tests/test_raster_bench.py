"""The benchmark entry points run and report rows in the documented format."""

from __future__ import annotations

import json

from conftest_raster import (  # torch_one_thread: autouse fixture
    require_backend,
    torch_one_thread,  # noqa: F401
)

from gstalk.raster import bench


def test_bench_run_and_json(capsys):
    require_backend("cpu", "cpu")
    rows = bench.run([(48, 40, 300)], ["torch", "cpu"], repeats=1, warmup=0)
    assert [r["backend"] for r in rows] == ["torch", "cpu"]
    for r in rows:
        assert set(r) >= {"width", "height", "n", "backend", "fwd_ms", "fwd_bwd_ms", "fps"}
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fps"] > 0
    assert (48, 40, 300) in bench.speedups(rows)
    assert "speed-up cpu vs torch" in bench.format_table(rows)
    assert bench.main(["--sizes", "32x32x100", "--backends", "cpu", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["backend"] == "cpu" and out[0]["width"] == 32
