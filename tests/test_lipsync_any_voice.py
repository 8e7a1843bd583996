"""Issue 18's parts around the front ends: prior adaptation, fit words, the confident A/V
offset, the articulation gain, eval's oracle/neutral rows and several voices at once, and
fitting a prior with the command line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from gstalk.deform.articulation import ArticulationEnsemble, describe_fit, fit_ensemble


def test_zero_adaptation_steps_keep_the_prior_as_it_is():
    torch.manual_seed(0)
    ens = ArticulationEnsemble(6, 4, 8, 3, 2, members=2)
    before = {k: v.clone() for k, v in ens.state_dict().items() if k != "gain"}
    n = 60
    audio = torch.randn(n, 4, 6)
    targets = torch.randn(n, 2)
    stats = fit_ensemble(ens, audio, targets, torch.arange(n), steps=0)
    for k, v in before.items():
        torch.testing.assert_close(ens.state_dict()[k], v, rtol=0, atol=0)
    assert stats["val_r2"] == pytest.approx(stats["start_val_r2"])
    # nothing fitted: every frame is held out, and the gain and the scores are measured over all of them
    assert stats["val_frames"] == n and stats["gain_frames"] == n
    from gstalk.deform.articulation import r2_score
    from gstalk.deform.audio import neighbour_indices

    with torch.no_grad():
        rows = audio[neighbour_indices(torch.arange(n), ens.smooth, n)]
        pred = ens(rows)
        members = [r2_score(m(rows), targets) for m in ens.members]
    ratio = targets.var(0, unbiased=False).sum() / pred.var(0, unbiased=False).sum()
    assert stats["gain"] == pytest.approx(float(ratio.sqrt().clamp(1.0, 3.0)), rel=1e-5)
    assert stats["val_r2"] == pytest.approx(r2_score(pred, targets), abs=1e-6)
    assert stats["member_val_r2"] == pytest.approx(float(np.mean(members)), abs=1e-6)
    # fitted: the scores and the gain are the last tenth's (6 frames)
    fitted = fit_ensemble(ArticulationEnsemble(6, 4, 8, 3, 2, members=2), audio, targets, torch.arange(n), steps=5)
    assert fitted["val_frames"] == 6 and fitted["gain_frames"] == 6


@pytest.mark.parametrize("r2, seconds, prior, level, helps", [
    (0.55, 18.0, True, "good", []),
    (0.3, 18.0, True, "fair", ["a longer clip (18 s"]),
    (0.1, 90.0, False, "weak", ["the multi-speaker prior"]),
    (0.01, 7.0, False, "none", ["a longer clip (7 s", "the multi-speaker prior"]),
    (0.01, 120.0, True, "none", ["clearer speech"]),
])
def test_fit_quality_in_words(r2, seconds, prior, level, helps):
    got, text = describe_fit(r2, seconds, prior)
    assert got == level and f"R² {r2:.2f} ({level})" in text
    for h in helps:
        assert h in text
    assert ("would help" in text) == bool(helps)


def test_a_clip_the_prior_was_fitted_on_is_named_and_its_score_not_called_held_out():
    """The shipped prior knows its corpus clips by their videos' SHA-256: one of them is found
    (the first its clip list records), an unknown or empty hash is not;
    the fit's sentence for such a clip says the R² is not held out."""
    from gstalk.prior import ArticulationPrior

    prior = ArticulationPrior.load()
    clip = prior.meta["clips"][0]
    assert prior.fitted_on(clip["sha256"]) == clip["name"]
    assert prior.fitted_on("0" * 64) is None and prior.fitted_on("") is None
    level, text = describe_fit(0.59, 7.3, True, "menendez_sadtalker")
    assert level == "good" and "not held out" in text and "menendez_sadtalker" in text and "held-out" not in text
    assert "held-out R² 0.59" in describe_fit(0.59, 7.3, True)[1]


def test_offset_is_applied_only_when_confident():
    from gstalk.tracking.avsync import MIN_CONFIDENT_CORR, offset_from_curve

    sure = offset_from_curve({-1: 0.1, 0: 0.2, 1: 0.45, 2: 0.3}, "prior")
    assert sure.frames == 1 and sure.confident and sure.best_lag == 1 and sure.method == "prior"
    weak = offset_from_curve({-1: 0.1, 0: 0.05, 1: MIN_CONFIDENT_CORR - 0.01}, "energy")
    assert weak.frames == 0 and not weak.confident and weak.best_lag == 1
    assert weak.correlation_at_zero == 0.05


def test_predicted_opening_finds_a_known_lag():
    from gstalk.tracking.avsync import estimate_offset_predicted, mouth_opening

    rng = np.random.default_rng(0)
    n, lag = 300, 3
    opening = np.convolve(rng.normal(size=n + 20), np.ones(4) / 4, "same")[:n]
    lms = np.zeros((n, 478, 3))
    lms[:, 10, 1], lms[:, 152, 1] = 0.0, 100.0  # face height 100 px
    lms[:, 14, 1] = 50.0 + 10.0 * (opening - opening.min())  # lower inner lip moves
    lms[:, 13, 1] = 50.0
    predicted = np.roll(mouth_opening(lms), lag) + 0.01 * rng.normal(size=n)  # the audio is `lag` frames late
    av = estimate_offset_predicted(lms, predicted, max_lag=6)
    assert av.frames == lag and av.confident and av.correlation > 0.9


def _lagged_clips(lags: dict[str, int], n: int = 400, seed: int = 0) -> list:
    """Clips whose 'audio' windows are a lagged, noisy copy of their lip opening: a window of
    frame i holds the opening of frame i - lag (lag > 0: the audio is late by lag frames), so
    a ridge fitted on clips with various lags learns their average timing."""
    from gstalk.prior import PriorClip

    rng = np.random.default_rng(seed)
    out = []
    for name, lag in lags.items():
        opening = np.convolve(rng.normal(size=n + 40), np.ones(3) / 3, "same")[20:20 + n]
        shifted = np.roll(opening, lag)  # audio frame i carries the mouth of frame i - lag
        windows = np.stack([np.roll(shifted, -k) for k in range(-3, 4)], axis=1)[:, :, None]  # [N, 7, 1]
        windows = windows + 0.05 * rng.normal(size=windows.shape)
        targets = np.repeat(((opening - opening.mean()) / opening.std())[:, None], 7, axis=1)
        out.append(PriorClip(name=name, speaker=name, windows=windows.astype(np.float32),
                             targets=targets.astype(np.float32)))
    return out


def test_offsets_are_relative_to_the_corpus_unless_synchronous_clips_anchor_them():
    from gstalk.prior import estimate_offsets

    # a corpus late by one frame on average (web video), with two lab clips in sync
    lags = {"web1": 1, "web2": 1, "web3": 2, "web4": 1, "web5": 0, "lab1": 0, "lab2": 0}
    clips = _lagged_clips(lags)
    free = estimate_offsets(clips, max_lag=4)
    anchored = estimate_offsets(clips, max_lag=4, synchronous=["lab1", "lab2"])
    # unanchored, each clip's offset is against the others' average timing: the lab clips
    # come out one frame early, and every offset one frame short of the truth
    assert free["lab1"]["offset"] == free["lab2"]["offset"] == -1
    assert all(v["anchor"] == 0 for v in free.values())
    # anchored on the lab clips, the offsets are the true lags
    assert {k: v["offset"] for k, v in anchored.items()} == lags
    assert all(v["anchor"] == -1 for v in anchored.values())
    with pytest.raises(ValueError, match="lab3"):
        estimate_offsets(clips, synchronous=["lab3"])


def test_articulation_gain_scales_the_code_and_is_checked():
    from gstalk.config import DEFAULT_ARTICULATION_GAIN, check_articulation_gain
    from gstalk.deform.gstalker import GSTalkerDeformation
    from gstalk.errors import UsageError

    aabb = torch.tensor([[-0.1, -0.1, -0.1], [0.1, 0.1, 0.1]])
    torch.manual_seed(0)
    m = GSTalkerDeformation(aabb, 6, window=4, audio_dim=4, smooth=1, levels=2, max_res=16, log2_table=8,
                            articulation=3, articulation_members=1, articulation_smooth=3, code_encoder="mlp")
    w = torch.randn(10, 4, 6)
    base = m.predict_codes(w)
    torch.testing.assert_close(m.conditions(w, 1.5)[:, 0], 1.5 * base)
    assert check_articulation_gain(None) == DEFAULT_ARTICULATION_GAIN
    assert check_articulation_gain(1.3) == 1.3
    for bad in (0.0, -1.0, 5.5, float("nan")):
        with pytest.raises(UsageError, match="articulation-gain"):
            check_articulation_gain(bad)


@pytest.mark.slow
def test_eval_reports_oracle_and_neutral_codes_and_the_fit(ws_copy):
    from gstalk.stages.evaluate import report_markdown, run_eval

    m = run_eval(str(ws_copy))
    saved = json.loads((ws_copy / "eval" / "metrics.json").read_text())
    assert set(saved["codes"]) == {"oracle", "neutral"}
    for v in saved["codes"].values():
        assert np.isfinite(v["mouth_psnr"]) and "lmd" in v and "mouth_motion" in v
    # teeth and the inner mouth, for every row whose renders MediaPipe read (here the coarse
    # head's at least; the synthetic head shows no teeth, so their ratio is NaN)
    rows = (saved, *saved["codes"].values(), saved["baselines"]["coarse"])
    assert saved["baselines"]["coarse"]["lip_frames"] > 0
    for v in rows:
        assert ("teeth_px" in v) == (v["lip_frames"] > 0)
        if v["lip_frames"] > 0:
            assert v["teeth_px"] >= 0 and v["inner_mouth_px"] >= 0
            assert np.isfinite(v["inner_mouth_psnr"]) == (v["inner_mouth_px"] > 0)
    # each code row's sharpness and PSNR trend, the trend the line through its own per-frame
    # PSNR (written beside the model's), so a drift can be told from a wrong code
    from gstalk.metrics.sharpness import linear_trend

    for k, v in saved["codes"].items():
        series = saved["per_frame"][f"{k}_code_psnr"]  # 6 significant digits
        assert len(series) == saved["n_frames"]
        assert v["psnr_trend_db"] == pytest.approx(linear_trend(np.asarray(series, dtype=float))["trend"], abs=1e-3)
        assert 0.0 < v["sharpness_ratio"] < 2.0
    assert saved["per_frame"]["oracle_code_psnr"] != saved["per_frame"]["neutral_code_psnr"]
    split = saved["error_split"]
    assert split["audio_to_code_db"] == pytest.approx(saved["codes"]["oracle"]["mouth_psnr"] - saved["mouth_psnr"])
    assert split["code_to_pixels_db"] == pytest.approx(saved["codes"]["oracle"]["mouth_psnr"]
                                                       - saved["codes"]["neutral"]["mouth_psnr"])
    fit = saved["articulation_fit"]
    assert fit["quality"] in ("good", "fair", "weak", "none") and "R²" in fit["quality_text"]
    assert "articulation prior" in fit["prior"]
    report = report_markdown(m)
    assert "fine model, tracked code (oracle)" in report and "Where the mouth error is" in report
    from gstalk.stages.evaluate import stability_lines

    assert any(line.startswith("| fine model, tracked code (oracle) |") for line in stability_lines(m))
    from gstalk.stages.evaluate import teeth_lines

    assert "teeth shown (render / ground truth)" in report
    assert any(line.startswith("| baseline: coarse |") for line in teeth_lines(m))
    from gstalk.config import BASIS_ARTICULATION_GAIN, EvalConfig
    from gstalk.errors import UsageError

    # the test frames are rendered as render does: the fixture's model carries the coarse
    # articulation basis, whose default gain is BASIS_ARTICULATION_GAIN
    assert saved["articulation_gain"] == BASIS_ARTICULATION_GAIN and saved["articulation_basis"] is True
    assert "with the coarse articulation basis, articulation gain 0.85" in (ws_copy / "eval" / "report.md").read_text()
    # a gain moves the audio-driven row only; the oracle and neutral rows do not depend on it
    g = run_eval(str(ws_copy), EvalConfig(articulation_gain=2.5))
    assert g["articulation_gain"] == 2.5 and g["mouth_psnr"] != pytest.approx(saved["mouth_psnr"], abs=1e-6)
    for k in ("oracle", "neutral"):
        assert g["codes"][k]["mouth_psnr"] == pytest.approx(saved["codes"][k]["mouth_psnr"], abs=1e-4)
    before = (ws_copy / "eval" / "metrics.json").read_bytes()
    with pytest.raises(UsageError, match="articulation-gain"):
        run_eval(str(ws_copy), EvalConfig(articulation_gain=0.0))
    assert (ws_copy / "eval" / "metrics.json").read_bytes() == before  # refused before anything was written


@pytest.mark.slow
def test_eval_scores_several_voices_with_a_summary(ws_copy, tmp_path):
    import soundfile as sf
    from typer.testing import CliRunner

    from gstalk.cli import app

    sr = 16000
    t = np.arange(int(1.5 * sr)) / sr
    voices = tmp_path / "voices"
    voices.mkdir()
    for k, f0 in enumerate((180.0, 260.0)):
        sf.write(voices / f"v{k}.wav", 0.3 * np.sin(2 * np.pi * f0 * t) * (np.sin(2 * np.pi * 3 * t) > 0), sr)
    (voices / "notes.txt").write_text("not audio")
    r = CliRunner().invoke(app, ["eval", str(ws_copy), "--audio", str(voices), "--articulation-gain", "1.2",
                                 "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert [v["voice"] for v in s["voices"]] == ["v0.wav", "v1.wav"] and s["articulation_gain"] == 1.2
    for v in s["voices"]:
        assert -1 <= v["sync_corr"] <= 1 and abs(v["sync_lag"]) <= 10 and v["mouth_motion"] >= 0
    assert s["summary"]["sync_corr"] == pytest.approx(np.mean([v["sync_corr"] for v in s["voices"]]))
    assert set(s["targets"]["met"]) == {"sync_fraction", "sync_lag", "mouth_motion"}
    d = ws_copy / "eval"
    assert json.loads((d / "cross_summary.json").read_text())["voices"] == s["voices"]
    assert "| v1.wav |" in (d / "cross_summary.md").read_text()
    assert (d / "cross_v0" / "metrics.json").is_file()
    r = CliRunner().invoke(app, ["eval", str(ws_copy), "--audio", str(tmp_path / "nothing.wav")])
    assert r.exit_code == 3 and "does not exist" in r.output


@pytest.mark.slow
def test_prior_fit_command_writes_a_prior_that_loads(trained_ws, tmp_path, capsys):
    from gstalk.prior import ArticulationPrior, main

    out = tmp_path / "prior.safetensors"
    assert main(["fit", str(trained_ws), "--members", "1", "--steps", "20", "-o", str(out),
                 "--synchronous", str(trained_ws)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["clips"] == 1 and printed["frames"] == 68  # the training split only
    prior = ArticulationPrior.load(out)
    assert prior.meta["clips"][0]["frames"] == 68 and len(prior.meta["clips"][0]["sha256"]) == 64
    assert prior.meta["features"] == "fbank+phones" and prior.meta["members"] == 1
    assert prior.meta["offsets"][trained_ws.name]["offset"] == 0  # one clip: no other to estimate it from
    assert prior.meta["synchronous"] == [trained_ws.name]
    assert prior.meta["perturbed_frames"] == 0 and prior.meta["speeds"] == []


@pytest.mark.slow
def test_prior_fit_adds_speed_perturbed_copies_for_training_only(trained_ws, tmp_path, capsys):
    from gstalk.prior import ArticulationPrior, main

    out = tmp_path / "prior.safetensors"
    assert main(["fit", str(trained_ws), "--members", "1", "--steps", "20", "-o", str(out),
                 "--speed", "0.8", "--speed", "1.25"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # 68 training frames; on the copies' clocks floor(67 / 0.8) + 1 and floor(67 / 1.25) + 1
    assert printed["clips"] == 3 and printed["frames"] == 68 and printed["perturbed_frames"] == 84 + 54
    meta = ArticulationPrior.load(out).meta
    assert meta["speeds"] == [0.8, 1.25]
    assert [(c["name"], c.get("speed")) for c in meta["clips"]] == [
        (trained_ws.name, None), (f"{trained_ws.name}@speed0.8", 0.8), (f"{trained_ws.name}@speed1.25", 1.25)]
    assert {c["speaker"] for c in meta["clips"]} == {trained_ws.name}  # held out together with their original


def test_perturbed_copies_are_fitted_on_but_never_validated_on():
    """train_pooled validates (early stopping, gain, val R²) on the originals' last tenth
    only: a copy whose targets are pure noise changes the fit, not how it is scored."""
    from gstalk.deform.articulation import ArticulationEnsemble
    from gstalk.prior import PriorSettings, train_pooled

    clips = _lagged_clips({"a": 0, "b": 0}, n=200)
    settings = PriorSettings(members=1, steps=0)
    torch.manual_seed(0)
    w, c = clips[0].windows.shape[1:]
    ens = ArticulationEnsemble(int(c), int(w), 8, settings.smooth, clips[0].targets.shape[1], 1)
    base = train_pooled(ens, clips, settings)
    rng = np.random.default_rng(1)
    noisy = dataclasses.replace(clips[0], name="a@speed0.9", speed=0.9,
                                targets=rng.normal(size=clips[0].targets.shape).astype(np.float32) * 100)
    torch.manual_seed(0)
    ens2 = ArticulationEnsemble(int(c), int(w), 8, settings.smooth, clips[0].targets.shape[1], 1)
    with_copy = train_pooled(ens2, [*clips, noisy], settings)
    assert with_copy["val_r2"] == pytest.approx(base["val_r2"]) and with_copy["gain"] == pytest.approx(base["gain"])
    assert with_copy["fit_r2"] != pytest.approx(base["fit_r2"])  # the copy's frames are fitted on


@pytest.mark.slow
def test_a_workspace_with_the_old_mfcc_front_end_trains_and_renders_new_speech(mannequin_clip, tmp_path, capsys):
    """Workspaces extracted before the new front ends carry ``mfcc``: fine says why the
    shipped prior does not apply (and the command that makes it apply), and render reads the
    front end from the workspace, so new speech renders with the features it was trained on."""
    import dataclasses

    import soundfile as sf
    from typer.testing import CliRunner

    from gstalk.cli import app
    from gstalk.config import get_preset
    from gstalk.media import probe
    from gstalk.progress import Reporter
    from gstalk.stages.coarse import run_coarse
    from gstalk.stages.extract import run_extract
    from gstalk.stages.fine import run_fine
    from gstalk.stages.track import run_track
    from gstalk.tensorio import load_tensors
    from gstalk.workspace import Workspace

    p = get_preset("test")
    ex = dataclasses.replace(p.extract, audio=dataclasses.replace(p.extract.audio, features="mfcc"))
    root = tmp_path / "old_ws"
    run_extract(mannequin_clip.path, root, ex, preset="test")
    run_track(str(root), p.track)
    run_coarse(str(root), p.coarse)
    capsys.readouterr()
    run_fine(str(root), p.fine, reporter=Reporter())
    err = "".join(capsys.readouterr().err.split())  # a warning, not a log line: the default prior could not apply
    assert "warning:noarticulationprior" in err and "followsotherpeople'sspeechfarlesswell" in err
    _, meta = load_tensors(root / "extract" / "audio_features.safetensors")
    assert meta["extractor"] == "mfcc" and int(meta["dim"]) == 13
    note = Workspace.open(root).stage("fine").summary["articulation_prior"]
    assert note.startswith("no articulation prior") and "--audio-features fbank+phones" in note
    # new speech: 1.5 s of the clip's audio, reversed in time, at another level
    speech, sr = sf.read(root / "extract" / "audio.wav")
    wav = tmp_path / "new.wav"
    sf.write(wav, 0.5 * speech[: int(1.5 * sr)][::-1], sr)
    out = tmp_path / "say.mp4"
    r = CliRunner().invoke(app, ["render", str(root), "--audio", str(wav), "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    info = probe(out)
    assert info.video is not None and info.video.n_frames == round(1.5 * 25)


def test_eval_carries_the_prior_clip_name_from_the_fine_summary():
    """eval's articulation_fit copies the fine summary's prior_fitted_on_clip beside R² and the
    sentence, and leaves it out when fine did not record one."""
    from types import SimpleNamespace

    from gstalk.stages.evaluate import articulation_fit_summary

    def ws(fit):
        summary = {"articulation_fit": fit, "articulation_prior": "articulation prior: the shipped one"}
        return SimpleNamespace(stage=lambda name: SimpleNamespace(summary=summary))

    fit = {"val_r2": 0.59, "quality": "good", "quality_text": "t", "prior_fitted_on_clip": "menendez_sadtalker",
           "members": 5}
    got = articulation_fit_summary(ws(fit))
    assert got["prior_fitted_on_clip"] == "menendez_sadtalker" and got["val_r2"] == 0.59 and "members" not in got
    assert "prior_fitted_on_clip" not in articulation_fit_summary(ws({"val_r2": 0.3}))
