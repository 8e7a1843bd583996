"""The training range of the articulation code (DeformationModel.set_code_range / clamp_codes):
every render's code is clamped to the range the model was trained on, per dimension."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gstalk.deform.articulation import code_range


def _model(articulation: int = 3):  # type: ignore[no-untyped-def]
    from gstalk.deform.gstalker import GSTalkerDeformation

    torch.manual_seed(0)
    aabb = torch.tensor([[-0.1, -0.1, -0.1], [0.1, 0.1, 0.1]])
    return GSTalkerDeformation(aabb, 6, window=4, audio_dim=4, smooth=3, levels=2, max_res=16, log2_table=8,
                               articulation=articulation, articulation_members=1, articulation_smooth=3,
                               code_encoder="mlp").eval()


def test_code_range_is_each_dimensions_min_and_max():
    g = np.random.default_rng(0)
    codes = (g.normal(size=(50, 4)) * [1, 2, 3, 0.5]).astype(np.float32)
    r = code_range(torch.from_numpy(codes))
    np.testing.assert_array_equal(np.float32(r["min"]), codes.min(0))
    np.testing.assert_array_equal(np.float32(r["max"]), codes.max(0))
    assert all(type(v) is float for v in r["min"] + r["max"])  # plain floats: the spec is JSON
    with pytest.raises(ValueError, match="N >= 1"):
        code_range(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="finite"):
        code_range(torch.tensor([[0.0, float("nan")]]))


def test_a_model_with_a_range_clamps_every_code_it_renders_and_one_without_none():
    """conditions() and frame_conditions() clamp the predicted code times the gain to the
    recorded range, per dimension (against np.clip); a model without a range renders its codes
    unchanged; the range rides in the spec, not in the weights, so old files still load."""
    from gstalk.deform.audio import neighbour_indices
    from gstalk.deform.registry import build_model

    model = _model()
    n, w = 11, 4
    torch.manual_seed(1)
    windows = torch.randn(n, w, 6)
    raw = model.predict_codes(windows) * 2.0  # gain 2: codes well past a narrow range
    assert not model.has_code_range
    torch.testing.assert_close(model.conditions(windows, 2.0), model.code_windows(raw), rtol=0, atol=0)
    state = dict(model.state_dict())

    lo = raw.quantile(0.25, dim=0)
    hi = raw.quantile(0.75, dim=0)
    model.set_code_range(lo.tolist(), hi.tolist())
    assert model.has_code_range and "code_min" not in model.state_dict()
    want = np.clip(raw.numpy(), lo.numpy(), hi.numpy())
    assert (want != raw.numpy()).mean() > 0.3  # the test clamps something
    got = model.conditions(windows, 2.0)
    np.testing.assert_allclose(got[:, 0].numpy(), want, rtol=0, atol=1e-7)
    assert torch.equal(got, got[:, :1].expand_as(got))  # one code per frame, repeated over the window
    rows = torch.stack([windows[neighbour_indices(i, model.condition_context, n)[0]] for i in range(n)])
    torch.testing.assert_close(model.frame_conditions(rows, 2.0), got, rtol=1e-5, atol=1e-6)
    # the oracle path: tracked codes go through the same clamp
    big = torch.full((2, 3), 100.0)
    torch.testing.assert_close(model.clamp_codes(big), hi.expand(2, 3))
    torch.testing.assert_close(model.clamp_codes(-big), lo.expand(2, 3))
    torch.testing.assert_close(model.code_conditions(big), hi.expand(2, 3)[:, None].expand(2, w, 3))

    # built from a spec with the range: the same clamp, and the same weights load (old files too)
    spec = {"name": "gstalker", "kwargs": {"aabb": [[-0.1, -0.1, -0.1], [0.1, 0.1, 0.1]], "audio_in_dim": 6,
                                           "window": 4, "audio_dim": 4, "smooth": 3, "levels": 2, "max_res": 16,
                                           "log2_table": 8, "articulation": 3, "articulation_members": 1,
                                           "articulation_smooth": 3, "code_encoder": "mlp"}}
    old = build_model(spec)
    old.load_state_dict(state)
    assert not old.has_code_range
    new = build_model({**spec, "code_range": {"min": lo.tolist(), "max": hi.tolist()}})
    new.load_state_dict(state)
    new.eval()
    torch.testing.assert_close(new.conditions(windows, 2.0), got, rtol=0, atol=0)
    with pytest.raises(ValueError, match="min <= max"):
        model.set_code_range([1.0, 0.0, 0.0], [0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="min <= max"):
        model.set_code_range([0.0, 0.0], [1.0, 1.0, 1.0])


def test_the_fine_stage_records_the_tracked_codes_range_and_the_avatar_clamps_to_it(trained_ws, tmp_path):
    """The fixture's fine model carries, in its spec, the range of the standardised tracked code
    over its training frames (what the field trained on); the loaded avatar, and a bundle of it,
    clamp to it."""
    from gstalk.avatar import load_avatar
    from gstalk.bundle import export_bundle
    from gstalk.dataset import load_tracks, split_indices
    from gstalk.deform.articulation import standardise
    from gstalk.tensorio import load_tensors
    from gstalk.workspace import Workspace

    _, meta = load_tensors(trained_ws / "fine" / "model.safetensors")
    train, _ = split_indices(Workspace.open(trained_ws))
    codes = standardise(load_tracks(Workspace.open(trained_ws)).articulation(), list(train))[list(train)]
    assert meta["spec"]["code_range"] == code_range(codes)
    import json

    summary = json.loads((trained_ws / "fine" / "summary.json").read_text())
    assert summary["code_range"] == meta["spec"]["code_range"]
    model = load_avatar(trained_ws).model
    assert model.has_code_range
    torch.testing.assert_close(model.code_max, codes.max(0).values)
    lo, hi = codes.min(0).values, codes.max(0).values
    torch.testing.assert_close(model.clamp_codes(codes * 3), (codes * 3).clamp(lo, hi), rtol=0, atol=0)
    export_bundle(trained_ws, tmp_path / "a.gstalk")
    bundled = load_avatar(tmp_path / "a.gstalk").model
    torch.testing.assert_close(bundled.code_min, lo, rtol=0, atol=0)
    torch.testing.assert_close(bundled.code_max, hi, rtol=0, atol=0)
