"""The pose-file reader of ``render --pose FILE``: formats, each refusal, and a property
test: any JSON document either parses into valid poses or raises the documented error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gstalk.errors import UsageError
from gstalk.render.poses import ping_pong, read_pose_file, validate_poses


def _pose(angle=0.1, tz=0.5):
    c, s = np.cos(angle), np.sin(angle)
    m = np.eye(4)
    m[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    m[:3, 3] = [0.01, -0.02, tz]
    return m


def test_npy_json_and_single_matrix(tmp_path):
    poses = np.stack([_pose(a) for a in (0.0, 0.1, 0.2)])
    np.save(tmp_path / "p.npy", poses)
    np.testing.assert_allclose(read_pose_file(tmp_path / "p.npy"), poses, atol=1e-6)
    (tmp_path / "p.json").write_text(json.dumps({"viewmats": poses.tolist()}))
    np.testing.assert_allclose(read_pose_file(tmp_path / "p.json"), poses, atol=1e-6)
    (tmp_path / "one.json").write_text(json.dumps(_pose().tolist()))
    assert read_pose_file(tmp_path / "one.json").shape == (1, 4, 4)


def test_workspace_tracks_are_read(trained_ws):
    from gstalk.dataset import load_tracks
    from gstalk.workspace import Workspace

    got = read_pose_file(trained_ws)
    np.testing.assert_array_equal(got, load_tracks(Workspace.open(trained_ws)).viewmats.numpy())


@pytest.mark.parametrize("data, message", [
    (np.zeros((2, 3, 4)), "expected an array of 4x4"),
    (np.stack([_pose(), np.full((4, 4), np.nan)]), "pose 1 contains NaN"),
    (np.stack([_pose(), _pose() + np.eye(4) * 0.5]), "pose 1 does not end with the row"),
    (np.stack([_pose() * np.array([[2.0], [2.0], [2.0], [1.0]])]), "pose 0 has no valid rotation"),
    (np.stack([np.diag([1.0, 1.0, -1.0, 1.0]) @ _pose()]), "pose 0 has no valid rotation"),
    (np.stack([_pose(tz=-0.5)]), "pose 0 puts the head behind the camera"),
])
def test_invalid_poses_are_refused_with_the_reason(tmp_path, data, message):
    np.save(tmp_path / "bad.npy", data)
    with pytest.raises(UsageError, match=message) as e:
        read_pose_file(tmp_path / "bad.npy")
    assert "bad.npy" in str(e.value)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_pose_file(tmp_path / "missing.npy")
    (tmp_path / "p.txt").write_text("1 2 3")
    with pytest.raises(UsageError, match="unknown type"):
        read_pose_file(tmp_path / "p.txt")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="could not be read"):  # never unpickled
        read_pose_file(tmp_path / "obj.npy")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UsageError, match="could not be read"):
        read_pose_file(tmp_path / "broken.json")
    (tmp_path / "x.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(UsageError):
        read_pose_file(tmp_path / "x.safetensors")


def test_ping_pong_walks_back_and_forth():
    assert ping_pong(9, 4) == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert ping_pong(3, 1) == [0, 0, 0]


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=40)


@settings(max_examples=200, deadline=None)
@given(doc=json_values | st.lists(st.lists(st.lists(st.floats(-2, 2), min_size=4, max_size=4),
                                           min_size=4, max_size=4), min_size=1, max_size=3))
def test_any_json_parses_to_valid_poses_or_raises_usage_error(tmp_path_factory, doc):
    p = tmp_path_factory.mktemp("h") / "poses.json"
    p.write_text(json.dumps(doc))
    try:
        out = read_pose_file(p)
    except UsageError:
        return
    assert out.dtype == np.float32 and out.ndim == 3 and out.shape[1:] == (4, 4)
    validate_poses(out)  # what it returns passes its own checks
