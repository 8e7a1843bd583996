"""``benchmarks/mouth_view.py``: the lip gap of a fixed mouth code as the viewpoint changes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def _module():  # type: ignore[no-untyped-def]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mouth_view.py"
    spec = importlib.util.spec_from_file_location("mouth_view", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_mouth_view_holds_the_code_and_varies_only_the_camera(trained_ws):
    """A fixed code at one held camera renders the same frame every time: the gap's spread is
    exactly 0 there; over the loop's poses the pitch spread is the loop's own, and the slope
    and correlation are finite."""
    from gstalk.avatar import Avatar
    from gstalk.render.driver import loop_poses
    from gstalk.tracking.pose import view_angles
    from gstalk.workspace import Workspace

    r = _module().lip_gaps(str(trained_ws), frames=24)
    assert r["frames"] == 24 and r["still"]["read"] == 24 and r["loop"]["read"] >= 20
    assert r["still"]["gap_sd_px"] == 0.0 and r["still"]["gap_px"] > 0.0
    avatar = Avatar.from_workspace(Workspace.open(trained_ws))
    pitch = view_angles(avatar.viewmats.numpy().astype(np.float64)[loop_poses(24, avatar.train)])[:, 1]
    assert r["loop"]["pitch_sd_deg"] == pytest.approx(float(pitch.std()))
    assert np.isfinite(r["loop"]["slope_px_per_deg"]) and -1.0 <= r["loop"]["corr_pitch"] <= 1.0


def test_mouth_view_refuses_a_missing_workspace(tmp_path):
    from gstalk.errors import WorkspaceError

    with pytest.raises(WorkspaceError):
        _module().lip_gaps(str(tmp_path / "nothing"), frames=4)
