"""The audio -> articulation -> deformation split (gstalk.deform.articulation, FineTrainer)."""

from __future__ import annotations

import pytest
import torch

from gstalk.config import FineConfig
from gstalk.deform.articulation import (
    ARTICULATION_NAMES,
    ArticulationEnsemble,
    ArticulationRegressor,
    articulation_features,
    fit_articulation,
    fit_ensemble,
    r2_score,
    standardise,
)
from gstalk.deform.audio import neighbour_indices
from gstalk.deform.gstalker import GSTalkerDeformation
from gstalk.train.fine import FineTrainer, model_optimizer
from gstalk.train.frames import FrameSet

NAMES = tuple(f"bs{i}" for i in range(48)) + ("jawOpen", "mouthFunnel", "mouthPucker", "mouthClose")
AABB = torch.tensor([[-0.1, -0.1, -0.1], [0.1, 0.1, 0.1]])


def _face(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Landmarks with a 200 px tall, 100 px wide face and a mouth opened 10/20 px, 40 px wide."""
    lm = torch.zeros(n, 478, 3)
    lm[:, 10, :2] = torch.tensor([50.0, 0.0])
    lm[:, 152, :2] = torch.tensor([50.0, 200.0])
    lm[:, 234, :2] = torch.tensor([0.0, 100.0])
    lm[:, 454, :2] = torch.tensor([100.0, 100.0])
    lm[:, 13, 1], lm[:, 14, 1] = 150.0, 160.0
    lm[:, 0, 1], lm[:, 17, 1] = 140.0, 160.0
    lm[:, 61, :2], lm[:, 291, :2] = torch.tensor([30.0, 150.0]), torch.tensor([70.0, 150.0])
    bs = torch.zeros(n, 52)
    bs[:, 48:] = torch.tensor([0.5, 0.1, 0.2, 0.3])
    return lm, bs


def test_articulation_features_are_normalised_distances_and_blendshapes():
    lm, bs = _face()
    f = articulation_features(lm, bs, NAMES)
    assert f.shape == (3, len(ARTICULATION_NAMES))
    torch.testing.assert_close(f[0], torch.tensor([0.05, 0.10, 0.40, 0.5, 0.1, 0.2, 0.3]))
    # scale invariant: the same face twice as large in the image
    torch.testing.assert_close(articulation_features(lm * 2, bs, NAMES), f)


def test_articulation_features_name_a_missing_blendshape():
    lm, bs = _face()
    with pytest.raises(ValueError, match="mouthPucker"):
        articulation_features(lm, bs, tuple(n if n != "mouthPucker" else "x" for n in NAMES))


def test_standardise_uses_only_the_given_rows():
    x = torch.tensor([[0.0], [2.0], [100.0]])
    z = standardise(x, [0, 1])
    sd = 2 ** 0.5  # unbiased std of [0, 2]
    torch.testing.assert_close(z[:, 0], torch.tensor([-1.0 / sd, 1.0 / sd, 99.0 / sd]))


def test_r2_score_reference_values():
    t = torch.randn(50, 3, generator=torch.Generator().manual_seed(3))
    assert r2_score(t, t) == pytest.approx(1.0)
    assert r2_score(t.mean(0).expand_as(t), t) == pytest.approx(0.0, abs=1e-5)
    sst = float((t - t.mean(0)).square().sum())
    assert r2_score(t + 2.0, t, reference_mean=t.mean(0)) == pytest.approx(1 - 4 * t.numel() / sst, rel=1e-5)


def _toy_audio(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio windows whose centre step linearly determines a 2-d target (plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(n, 4, generator=g)
    audio = steps[:, None, :].expand(n, 16, 4).contiguous()
    w = torch.tensor([[1.0, -0.5], [0.3, 0.8], [0.0, 0.0], [-0.7, 0.2]])
    target = steps @ w + 0.05 * torch.randn(n, 2, generator=g)
    return audio, standardise(target, range(n))


def test_fit_articulation_learns_a_predictable_target_and_keeps_the_best_weights():
    torch.manual_seed(0)
    audio, target = _toy_audio()
    reg = ArticulationRegressor(4, 16, 16, 1, 2)
    ids = torch.arange(360)
    before = r2_score(reg(audio[ids[-36:]][:, None]), target[ids[-36:]], target[ids].mean(0))
    stats = fit_articulation(reg, audio, target, ids, steps=300, eval_every=25)
    assert stats["val_r2"] > 0.8 > before
    # the returned held-out score is the one of the weights the regressor now holds
    with torch.no_grad():
        val = ids[-36:]
        now = r2_score(reg(audio[neighbour_indices(val, reg.smooth, len(audio))]), target[val], target[ids].mean(0))
    assert now == pytest.approx(stats["val_r2"], abs=1e-5)
    # and it generalises to frames it never saw
    with torch.no_grad():
        assert r2_score(reg.predict_sequence(audio)[360:], target[360:]) > 0.7


def test_predict_sequence_matches_per_frame_neighbour_windows():
    torch.manual_seed(0)
    reg = ArticulationRegressor(4, 16, 8, 4, 3)
    audio = torch.randn(10, 16, 4)
    with torch.no_grad():
        seq = reg.predict_sequence(audio, batch=3)
        one = torch.cat([reg(audio[neighbour_indices(i, 4, 10)]) for i in range(10)])
    torch.testing.assert_close(seq, one)


def test_model_conditions_articulator_vs_audio():
    torch.manual_seed(0)
    audio = torch.randn(12, 16, 13)
    plain = GSTalkerDeformation(AABB, 13, levels=2, max_res=32, hidden=16)
    assert plain.articulator is None and plain.conditions(audio) is audio
    art = GSTalkerDeformation(AABB, 13, levels=2, max_res=32, hidden=16, articulation=7)
    cond = art.conditions(audio)
    assert cond.shape == (12, 16, 7)
    with torch.no_grad():
        torch.testing.assert_close(cond[:, 5], art.articulator.predict_sequence(audio))
    names = {id(p) for g in model_optimizer(art, 1e-3, 1e-2).param_groups for p in g["params"]}
    assert not any(id(p) in names for p in art.articulator.parameters())
    assert any(id(p) in names for p in art.audio.parameters())


def _frameset(n_all: int = 30, n: int = 6) -> FrameSet:
    g = torch.Generator().manual_seed(1)
    return FrameSet(
        images=torch.zeros(n, 8, 8, 3, dtype=torch.uint8), backgrounds=torch.zeros(n, 8, 8, 3, dtype=torch.uint8),
        viewmats=torch.eye(4).expand(n, 4, 4).clone(), K=torch.tensor([[8.0, 0, 4], [0, 8.0, 4], [0, 0, 1]]),
        head_masks=torch.zeros(n, 8, 8, dtype=torch.uint8), mouth_masks=torch.zeros(n, 8, 8, dtype=torch.uint8),
        mouth_boxes=torch.zeros(n, 4), blink=torch.zeros(n), audio=torch.randn(n_all, 16, 13, generator=g),
        frame_ids=torch.arange(10, 10 + n), articulation=torch.randn(n_all, 7, generator=g))


def _trainer(noise: float, data: FrameSet) -> FineTrainer:
    torch.manual_seed(0)
    model = GSTalkerDeformation(AABB, 13, levels=2, max_res=32, hidden=16, smooth=4, articulation=7)
    params = torch.nn.ParameterDict({
        "means": torch.nn.Parameter(torch.zeros(4, 3)), "scales": torch.nn.Parameter(torch.zeros(4, 3)),
        "quats": torch.nn.Parameter(torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1)),
        "opacities": torch.nn.Parameter(torch.zeros(4)), "sh0": torch.nn.Parameter(torch.zeros(4, 1, 3)),
        "shN": torch.nn.Parameter(torch.zeros(4, 3, 3))})
    cfg = FineConfig(articulation_noise=noise, articulation_steps=100)
    return FineTrainer(params, model, data, cfg, 0.1)


def test_training_conditions_are_tracked_codes_on_train_frames_and_predictions_elsewhere():
    data = _frameset()
    t = _trainer(0.0, data)
    base = t.base_codes()
    with torch.no_grad():
        pred = t.model.articulator.predict_sequence(data.audio)
    torch.testing.assert_close(base[10:16], data.articulation[10:16])
    torch.testing.assert_close(base[:10], pred[:10])
    torch.testing.assert_close(base[16:], pred[16:])
    # frame 10 (position 0) with K = 4: neighbours 8, 9, 10, 11, each code repeated over W
    w = t.condition_windows(0)
    assert w.shape == (1, 4, 16, 7)
    torch.testing.assert_close(w[0, :, 3], base[8:12])


def test_training_noise_has_the_configured_std():
    data = _frameset()
    t = _trainer(0.6, data)
    base = t.base_codes()
    diffs = torch.cat([(t.condition_windows(2)[0, :, 0] - base[10:14]) for _ in range(400)])
    assert diffs.std().item() == pytest.approx(0.6, rel=0.08)
    assert diffs.mean().abs().item() < 0.05


def test_fit_articulator_freezes_the_regressor():
    data = _frameset()
    data.articulation = data.audio[:, 8, :7] * 2.0  # a target the audio explains
    t = _trainer(0.6, data)
    before = [p.clone() for p in t.model.articulator.parameters()]
    stats = t.fit_articulator()
    assert set(stats) == {"members", "val_r2", "start_val_r2", "member_val_r2", "fit_r2", "gain", "code_scale",
                          "val_frames", "gain_frames", "from_prior"}
    assert stats["members"] == 5
    # the predicted codes get the spread of the noisy training codes: gain * sqrt(1 + 0.6²)
    assert stats["code_scale"] == pytest.approx(stats["gain"] * (1 + 0.36) ** 0.5)
    assert float(t.model.code_scale) == pytest.approx(stats["code_scale"])
    with torch.no_grad():
        torch.testing.assert_close(t.model.predict_codes(data.audio),
                                   t.model.articulator.predict_sequence(data.audio) * stats["code_scale"])
    assert all(not p.requires_grad for p in t.model.articulator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.articulator.parameters()))


def test_ensemble_is_the_mean_of_its_members_and_fits_better_than_chance():
    torch.manual_seed(0)
    audio, target = _toy_audio()
    ens = ArticulationEnsemble(4, 16, 16, 1, 2, members=3)
    x = audio[:5, None]
    with torch.no_grad():
        torch.testing.assert_close(ens(x), sum(m(x) for m in ens.members) / 3)
    calls = []
    stats = fit_ensemble(ens, audio, target, torch.arange(360), steps=200, progress=calls.append)
    assert calls == [0, 1, 2]
    assert stats["val_r2"] > 0.7
    # gain: std of the targets over std of the predictions on the held-out frames
    val = torch.arange(360)[-36:]
    with torch.no_grad():
        pred = ens(audio[val][:, None])
    ratio = target[val].var(0, unbiased=False).sum() / pred.var(0, unbiased=False).sum()
    assert stats["gain"] == pytest.approx(float(ratio.sqrt().clamp(1.0, 3.0)), rel=1e-5)
    assert float(ens.gain) == pytest.approx(stats["gain"])
    with pytest.raises(ValueError):
        ArticulationEnsemble(4, members=0)


@pytest.mark.parametrize("smooth", [1, 8])
def test_fused_ensemble_equals_the_members_mean_and_follows_weight_changes(smooth):
    """FusedEnsemble (ArticulationEnsemble.infer): each layer once for all members, equal to
    the members' mean; the stacked weights are rebuilt after an in-place update or a load."""
    torch.manual_seed(0)
    ens = ArticulationEnsemble(6, 16, 32, smooth, 7, members=5)
    x = torch.randn(4, smooth, 16, 6)
    with torch.no_grad():
        ref = torch.stack([m(x) for m in ens.members]).mean(0)
    out = ens.infer(x)
    assert out.shape == (4, 7) and not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert (out - ens.infer(x)).abs().max() == 0  # the cached stack gives the same numbers
    with torch.no_grad():
        ens.members[3].encoder.net.conv[2].weight.mul_(-2.0)  # an optimiser step's in-place update
    with torch.no_grad():
        changed = torch.stack([m(x) for m in ens.members]).mean(0)
    assert (changed - ref).abs().max() > 1e-3
    torch.testing.assert_close(ens.infer(x), changed, rtol=1e-5, atol=1e-6)
    other = ArticulationEnsemble(6, 16, 32, smooth, 7, members=5)
    ens.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ens.infer(x), other(x), rtol=1e-5, atol=1e-6)
    # new parameter objects (assign=True): infer lists them again instead of reading the old ones
    third = ArticulationEnsemble(6, 16, 32, smooth, 7, members=5)
    ens.load_state_dict({k: v.clone() for k, v in third.state_dict().items()}, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(ens.infer(x), third(x), rtol=1e-5, atol=1e-6)
    # predict_sequence: the members' path with gradients on, the fused one with them off
    seq = torch.randn(9, 16, 6)
    members = ens.predict_sequence(seq)
    assert members.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(ens.predict_sequence(seq), members.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, K, 16, 6\]"):
        ens.infer(torch.randn(2, smooth, 8, 6))


def test_audio_conditioning_uses_the_audio_windows():
    data = _frameset()
    torch.manual_seed(0)
    model = GSTalkerDeformation(AABB, 13, levels=2, max_res=32, hidden=16, smooth=4)
    t = _trainer(0.6, data)
    t.model = model
    torch.testing.assert_close(t.condition_windows(1), data.audio[neighbour_indices(11, 4, 30)])
