"""``gstalk run --size auto``: the working size from the face crop, the preset's budget and the device."""

from __future__ import annotations

import pytest

from gstalk.budget import CPU_COST_512, CPU_RUN_S_256, RUN_BUDGET_S, choose_size, estimated_run_s


def test_small_faces_keep_the_preset_size():
    c = choose_size(400.0, 256, "cpu-quick", "cpu")
    assert c.size == 256 and "upscale" in c.reason


def test_two_cpu_cores_stay_at_256_within_the_budget():
    # the measured cost of 512 px on 2 cores exceeds cpu-quick's 10 minutes
    assert estimated_run_s(256, 256) == CPU_RUN_S_256 <= RUN_BUDGET_S["cpu-quick"]
    assert estimated_run_s(512, 256) == pytest.approx(CPU_RUN_S_256 * CPU_COST_512)
    assert estimated_run_s(512, 256) > RUN_BUDGET_S["cpu-quick"]
    c = choose_size(600.0, 256, "cpu-quick", "cpu")
    assert c.size == 256 and "budget" in c.reason and "--size 512" in c.reason


def test_unmeasured_devices_and_presets_without_a_budget_keep_their_size(monkeypatch):
    c = choose_size(600.0, 256, "cpu-quick", "cuda")
    assert c.size == 256 and "not measured" in c.reason
    assert choose_size(2000.0, 512, "paper", "cuda").size == 512
    assert choose_size(600.0, 128, "test", "cpu").size == 128
    # where the measured cost fits the budget, a big enough face goes to twice the size
    import gstalk.budget as budget

    monkeypatch.setitem(budget.RUN_BUDGET_S, "cpu-quick", 3600.0)
    c = choose_size(600.0, 256, "cpu-quick", "cpu")
    assert c.size == 512 and "within" in c.reason
    assert choose_size(500.0, 256, "cpu-quick", "cpu").size == 256  # but not an upscaled one


def test_working_size_checks_explicit_sizes(tmp_path):
    from gstalk.config import ExtractConfig
    from gstalk.errors import UsageError
    from gstalk.pipeline import working_size

    cfg, why = working_size(tmp_path / "none.mp4", ExtractConfig(), "cpu-quick", "cpu", "384")
    assert cfg.size == 384 and "--size" in why
    for bad in ("big", "0", "513", "4096"):
        with pytest.raises(UsageError):
            working_size(tmp_path / "none.mp4", ExtractConfig(), "cpu-quick", "cpu", bad)
    # a file without a video: the preset's size (extract then says what is wrong)
    (tmp_path / "x.mp4").write_bytes(b"not a video")
    cfg, _ = working_size(tmp_path / "x.mp4", ExtractConfig(), "cpu-quick", "cpu", "auto")
    assert cfg.size == 256
    cfg, why = working_size(tmp_path / "x.mp4", ExtractConfig(size=128), "test", "cpu", "auto")
    assert cfg.size == 128 and "own size" in why
