"""``benchmarks/mouth_view.py``: the lip gap of a fixed mouth code as the viewpoint changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.slow
def test_mouth_view_holds_the_code_and_varies_only_the_camera(trained_ws, benchmark_script):
    """A fixed code at one held camera (a training pose MediaPipe reads on this crude head)
    renders the same frame every time: the gap's spread is
    exactly 0 there; over the loop's poses the pitch spread is the loop's own, and the slope
    and correlation are finite."""
    from gstalk.avatar import Avatar
    from gstalk.render.driver import HeadRenderer, loop_poses
    from gstalk.tracking.detector import MediaPipeDetector
    from gstalk.tracking.pose import view_angles
    from gstalk.workspace import Workspace

    avatar = Avatar.from_workspace(Workspace.open(trained_ws))
    # the held camera: a training pose whose render MediaPipe reads (the mannequin's 60-iteration
    # head is crude, and which poses it reads is not this test's business)
    renderer, model = HeadRenderer(avatar), avatar.model
    fixed = model.code_windows(torch.zeros(1, model.articulator.out_dim))
    with MediaPipeDetector(video=False, num_faces=1) as det:
        held = next(f for f in list(avatar.train)[::5]
                    if det.detect(np.ascontiguousarray(
                        (renderer.render(renderer.head.windows(fixed, 0), f) * 255).round().to(torch.uint8).numpy())))
    r = benchmark_script("mouth_view").lip_gaps(str(trained_ws), frames=24, still_frame=held)
    assert r["frames"] == 24 and r["still"]["read"] == 24 and r["loop"]["read"] >= 18
    assert r["still"]["gap_sd_px"] == 0.0 and r["still"]["gap_px"] > 0.0
    pitch = view_angles(avatar.viewmats.numpy().astype(np.float64)[loop_poses(24, avatar.train)])[:, 1]
    assert r["loop"]["pitch_sd_deg"] == pytest.approx(float(pitch.std()))
    assert np.isfinite(r["loop"]["slope_px_per_deg"]) and -1.0 <= r["loop"]["corr_pitch"] <= 1.0


def test_mouth_view_refuses_a_missing_workspace(tmp_path, benchmark_script):
    from gstalk.errors import WorkspaceError

    with pytest.raises(WorkspaceError):
        benchmark_script("mouth_view").lip_gaps(str(tmp_path / "nothing"), frames=4)
