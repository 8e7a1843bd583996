"""The coarse stage's checkpoint: a run killed after a checkpoint and resumed ends with
exactly the parameters of an uninterrupted run (densification included), and the
checkpoint's guards (settings, missing file, fresh run over a stopped one)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from trainer_kill import interrupt_at

from gstalk.config import get_preset
from gstalk.errors import WorkspaceError
from gstalk.stages.coarse import run_coarse
from gstalk.tensorio import load_tensors
from gstalk.train import coarse as coarse_loop


def _copy(trained_ws, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(trained_ws, dst)
    shutil.rmtree(dst / "coarse")
    return dst


def test_coarse_resumes_to_the_uninterrupted_parameters(trained_ws, tmp_path, monkeypatch, capsys):
    cfg = get_preset("test").coarse  # 60 iterations, densify 20..50 every 10, checkpoint every 20
    assert cfg.checkpoint_every == 20 and cfg.densify.start < 40 < 45 < cfg.densify.stop
    a, b = _copy(trained_ws, tmp_path, "a"), _copy(trained_ws, tmp_path, "b")
    run_coarse(str(a), cfg)

    # killed after the checkpoints at 20 and 40, with densify steps on both sides
    interrupt_at(monkeypatch, coarse_loop.CoarseTrainer, 45, lambda: run_coarse(str(b), cfg))
    ckpt = b / "coarse" / "checkpoint.safetensors"
    _, meta = load_tensors(ckpt)
    assert meta["step"] == 40
    with pytest.raises(WorkspaceError, match="other settings"):
        run_coarse(str(b), dataclasses.replace(cfg, n_random=cfg.n_random + 1), resume=True)
    run_coarse(str(b), cfg, resume=True)
    assert not ckpt.exists()
    ta, _ = load_tensors(a / "coarse" / "gaussians.safetensors")
    tb, _ = load_tensors(b / "coarse" / "gaussians.safetensors")
    assert ta.keys() == tb.keys()
    hist = {int(h["step"]): int(h["n"]) for h in json.loads((b / "coarse" / "summary.json").read_text())["history"]}
    assert hist[50] != hist[40]  # the resumed run densified (the state came back), and kept its history
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=0, msg=k)
    # the articulation basis (on by default) and its Adam moments came back too
    assert cfg.articulation_basis == "lower_face"
    ba, _ = load_tensors(a / "coarse" / "articulation_basis.safetensors")
    bb, _ = load_tensors(b / "coarse" / "articulation_basis.safetensors")
    assert ba["means"].shape == (ta["means"].shape[0], 7, 3) and ba["means"].abs().max() > 0
    for k in ba:
        torch.testing.assert_close(bb[k], ba[k], rtol=0, atol=0, msg=f"basis {k}")


def test_coarse_resume_without_a_checkpoint_and_a_fresh_run_over_one(trained_ws, tmp_path, monkeypatch, capsys):
    cfg = get_preset("test").coarse
    w = _copy(trained_ws, tmp_path, "w")
    with pytest.raises(WorkspaceError, match="No checkpoint to resume from"):
        run_coarse(str(w), cfg, resume=True)
    interrupt_at(monkeypatch, coarse_loop.CoarseTrainer, 25, lambda: run_coarse(str(w), cfg))
    capsys.readouterr()
    run_coarse(str(w), cfg)
    err = " ".join(capsys.readouterr().err.split())
    assert "checkpoint.safetensors holds a stopped run at iteration 20" in err and "--resume" in err
