"""The Avatar seam and avatar bundles: the renderer reads the same data as before, a bundle
renders exactly what its workspace renders, and a damaged, truncated, foreign or newer bundle
is refused by name with its reason."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gstalk.errors import InputError, WorkspaceError


def _decoded(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _tone(path: Path, seconds: float = 0.6, hz: float = 180.0) -> Path:
    import soundfile as sf

    sr = 16000
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * hz * t) * (np.sin(2 * np.pi * 3 * t) > 0), sr)
    return path


@pytest.fixture(scope="module")
def bundle_file(trained_ws: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gstalk.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "mannequin.gstalk"
    export_bundle(trained_ws, out)
    return out


def test_head_renderer_renders_what_the_workspace_files_hold(trained_ws):
    """The renderer takes an Avatar now; its frame equals the chain spelled out over the
    workspace's own files (fine model, the coarse stage's refined cameras, tracks, plate), bit
    for bit; the torso with the frame's registered warp."""
    from gstalk.avatar import Avatar
    from gstalk.config import BASIS_ARTICULATION_GAIN
    from gstalk.dataset import load_background, load_cameras, load_fine_model, load_tracks
    from gstalk.deform.audio import neighbour_indices
    from gstalk.deform.base import apply_deltas
    from gstalk.deform.basis import articulated
    from gstalk.deform.torso import render_torso
    from gstalk.gaussians.splat import composite, splat
    from gstalk.render.driver import HeadRenderer
    from gstalk.workspace import Workspace

    ws = Workspace.open(trained_ws)
    avatar = Avatar.from_workspace(ws)
    r = HeadRenderer(avatar)
    windows = np.random.default_rng(0).standard_normal((5, avatar.audio.window, avatar.audio.dim)).astype(np.float32)
    cond = r.conditions(windows)
    ids = neighbour_indices(2, avatar.model.smooth, 5)
    got = r.render(cond[ids], 4)

    params, model, _ = load_fine_model(ws)
    tracks = load_tracks(ws)
    plate = torch.from_numpy(load_background(ws))[None].float() / 255.0
    with torch.no_grad():
        c = model.conditions(torch.from_numpy(windows), r.articulation_gain)[ids]  # render's default gain
        code = model.encode_audio(c)[0]
        deformed = apply_deltas(params, model.deform(model.spatial(params["means"]), code, tracks.blink[4:5]))
        # the coarse articulation basis the model carries, at the frame's code (the middle window)
        assert "basis_means" in params and r.articulation_gain == BASIS_ARTICULATION_GAIN
        deformed = articulated(deformed, {"means": params["basis_means"], "sh0": params["basis_sh0"]},
                               c[0, c.shape[1] // 2, 0])
        cams = load_cameras(ws)
        assert cams.refined  # the trained workspace's coarse stage refined its poses
        vm = cams.viewmats[4:5]
        tc, ta = render_torso(model.torso, vm, tracks.K, 128, 128, frame=4)
        bg = (composite(tc, ta, plate).clamp(0, 1) * 255.0).round().to(torch.uint8).float() / 255.0
        colors, alphas, _ = splat(deformed, vm, tracks.K, 128, 128)
        want = composite(colors, alphas, bg).clamp(0, 1)[0]
    assert torch.equal(got, want)
    assert avatar.torso_frames is None and avatar.has_torso_field
    assert avatar.provenance["source_sha256"] == ws.manifest["source"]["sha256"]
    assert "speech_sha256" not in avatar.provenance  # the fixture's voice is the video's own
    # a workspace whose voice came from a separate file names it in the provenance
    from gstalk.avatar import workspace_provenance

    ws.manifest["source"]["speech"] = {"path": "/x/voice.wav", "sha256": "ab" * 32}
    prov = workspace_provenance(ws, {})
    assert (prov["speech_name"], prov["speech_sha256"]) == ("voice.wav", "ab" * 32)


def test_bundle_round_trip_renders_the_same_frames(trained_ws, bundle_file, tmp_path):
    """export -> render from the bundle (and from its unpacked folder) equals render from
    the workspace, decoded frame by frame; inspect and import say what is inside."""
    from typer.testing import CliRunner

    from gstalk.cli import app
    from gstalk.stages.render import run_render

    wav = _tone(tmp_path / "speech.wav")
    run_render(trained_ws, wav, tmp_path / "ws.mp4", pose="still", blink="auto")
    r = CliRunner().invoke(app, ["render", str(bundle_file), "--audio", str(wav), "-o", str(tmp_path / "b.mp4"),
                                 "--pose", "still", "--blink", "auto", "--quiet"])
    assert r.exit_code == 0, r.output
    ref = _decoded(tmp_path / "ws.mp4")
    assert ref.shape == (15, 128, 128, 3)
    np.testing.assert_array_equal(_decoded(tmp_path / "b.mp4"), ref)

    r = CliRunner().invoke(app, ["inspect", str(bundle_file), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    manifest = json.loads((trained_ws / "manifest.json").read_text())
    assert info["verified"] and info["format"] == "gstalk-avatar" and info["bundle_version"] == 1
    assert info["provenance"]["source_sha256"] == manifest["source"]["sha256"]
    assert info["avatar"]["model"] == "gstalker" and info["avatar"]["size"] == 128
    assert info["avatar"]["n_torso_gaussians"] > 0
    assert set(info["files"]) == {"model.safetensors", "avatar.safetensors"}
    with zipfile.ZipFile(bundle_file) as z:  # a plain zip of JSON and safetensors, stored
        assert sorted(z.namelist()) == ["avatar.safetensors", "bundle.json", "model.safetensors"]
        assert z.read("model.safetensors") == (trained_ws / "fine" / "model.safetensors").read_bytes()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())

    dest = tmp_path / "unpacked"
    r = CliRunner().invoke(app, ["import", str(bundle_file), "-o", str(dest), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["unchanged"] is False and (dest / "bundle.json").is_file()
    again = CliRunner().invoke(app, ["import", str(bundle_file), "-o", str(dest), "--json"])
    assert json.loads(again.stdout)["unchanged"] is True
    run_render(dest, wav, tmp_path / "u.mp4", pose="still", blink="auto")
    np.testing.assert_array_equal(_decoded(tmp_path / "u.mp4"), ref)
    # a bundle has no training audio to re-render the test split with
    r = CliRunner().invoke(app, ["render", str(bundle_file), "-o", str(tmp_path / "t.mp4")])
    assert r.exit_code == 2 and "--audio" in r.output


def _rezip(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """Copy a bundle, passing each member's (name, bytes) through ``edit`` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            out = edit(name, zin.read(name))
            if out is not None:
                zout.writestr(name, out)
    return dst


def test_damaged_truncated_foreign_and_newer_bundles_are_refused(bundle_file, tmp_path, monkeypatch):
    from gstalk.bundle import read_bundle
    from gstalk.stages.render import run_render

    data = bundle_file.read_bytes()
    cases: dict[str, tuple[Path, str]] = {}
    flipped = bytearray(data)  # one bit in the middle of model.safetensors (zip CRC or checksum catches it)
    flipped[len(data) // 2] ^= 0x01
    (tmp_path / "flipped.gstalk").write_bytes(bytes(flipped))
    cases["flipped"] = (tmp_path / "flipped.gstalk", "damaged")
    (tmp_path / "cut.gstalk").write_bytes(data[: len(data) * 2 // 3])
    cases["truncated"] = (tmp_path / "cut.gstalk", "damaged or truncated")

    def swap_weights(name: str, b: bytes) -> bytes:  # a consistent zip whose member is not what bundle.json lists
        return b[:-4] + b"\0\0\0\0" if name == "model.safetensors" else b

    cases["checksum"] = (_rezip(bundle_file, tmp_path / "swapped.gstalk", swap_weights), "SHA-256")

    def newer(name: str, b: bytes) -> bytes:
        if name != "bundle.json":
            return b
        info = json.loads(b)
        info["bundle_version"] = 99
        return json.dumps(info).encode()

    cases["newer"] = (_rezip(bundle_file, tmp_path / "newer.gstalk", newer), "newer than this gstalk")
    cases["no bundle.json"] = (_rezip(bundle_file, tmp_path / "foreign.gstalk",
                                      lambda n, b: None if n == "bundle.json" else b), "not a gstalk avatar bundle")

    def other_format(name: str, b: bytes) -> bytes:
        return json.dumps({"format": "something-else"}).encode() if name == "bundle.json" else b

    cases["other format"] = (_rezip(bundle_file, tmp_path / "other.gstalk", other_format), "not a gstalk avatar")
    cases["missing member"] = (_rezip(bundle_file, tmp_path / "partial.gstalk",
                                      lambda n, b: None if n == "avatar.safetensors" else b), "missing")
    (tmp_path / "text.gstalk").write_text("hello, not an archive")
    cases["not a zip"] = (tmp_path / "text.gstalk", "not a zip archive")

    import pickle  # noqa: F401 - only to prove that reading never calls it

    def no_unpickling(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("a bundle reader unpickled")

    monkeypatch.setattr("pickle.loads", no_unpickling)
    monkeypatch.setattr("pickle.load", no_unpickling)
    monkeypatch.setattr("torch.load", no_unpickling)
    wav = _tone(tmp_path / "s.wav", 0.2)
    for what, (path, reason) in cases.items():
        with pytest.raises(InputError) as e:
            read_bundle(path).avatar()
        assert reason in e.value.message and str(path) in e.value.message, (what, e.value.message)
        assert e.value.exit_code == 3
        with pytest.raises(InputError):
            run_render(path, wav, tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()
    read_bundle(bundle_file).avatar()  # the original still reads with the guards on


def test_a_workspace_without_the_torso_field_is_refused_at_export_and_still_renders(ws_copy, tmp_path):
    """--set torso=false pastes each pose frame's torso from the workspace: the avatar reads
    it through the dataset's background source, and export says what to do instead."""
    from gstalk.avatar import Avatar
    from gstalk.bundle import export_bundle
    from gstalk.config import get_preset, override
    from gstalk.dataset import composite_background, load_background, load_frame, load_masks
    from gstalk.render.driver import HeadRenderer
    from gstalk.stages.fine import run_fine
    from gstalk.stages.render import run_render
    from gstalk.workspace import Workspace

    run_fine(str(ws_copy), override(get_preset("test").fine, torso=False, iterations=10))
    ws = Workspace.open(ws_copy)
    with pytest.raises(WorkspaceError, match="torso") as e:
        export_bundle(ws_copy, tmp_path / "x.gstalk")
    assert "gstalk fine" in (e.value.hint or "") and not (tmp_path / "x.gstalk").exists()
    avatar = Avatar.from_workspace(ws)
    assert avatar.torso_frames is not None and not avatar.has_torso_field
    bg = HeadRenderer(avatar).load_background(6)[0].numpy()
    want = composite_background(load_frame(ws, 6), load_masks(ws, [6])[0], load_background(ws))
    np.testing.assert_array_equal(bg, want)
    s = run_render(ws_copy, _tone(tmp_path / "s.wav", 0.4), tmp_path / "nt.mp4")
    assert s["frames"] == 10 and _decoded(tmp_path / "nt.mp4").shape == (10, 128, 128, 3)
