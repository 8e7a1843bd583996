"""FAN, the second landmark detector (issue 22): heatmap decoding and crop geometry against
hand computations, the weights file refused by name before anything loads, the 68-point
landmark scheme, the mouth code from 68 points, and FAN's LMD the papers' way.

No FAN weights exist here: the tests script small TorchScript modules shaped like FAN."""

from __future__ import annotations

import json
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gstalk.errors import InputError, UsageError
from gstalk.tracking import fan as fanmod
from gstalk.tracking.heatmaps import (
    box_center_scale,
    crop_image,
    decode_heatmaps,
    from_crop,
    heatmaps_to_image,
    to_crop,
)


def _save_script(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


class _Blobs(torch.nn.Module):
    """FAN-shaped: [B, 3, 256, 256] -> [B, C, S, S], one peak per map at a fixed cell."""

    def __init__(self, channels: int = 68, side: int = 64, as_list: bool = False):
        super().__init__()
        self.channels, self.side, self.as_list = channels, side, as_list

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = torch.zeros(x.shape[0], self.channels, self.side, self.side)
        out[:, :, 10, 20] = 1.0
        return [out * 0.5, out] if self.as_list else [out]


class _Plain(torch.nn.Module):
    def __init__(self, channels: int = 68, side: int = 64):
        super().__init__()
        self.channels, self.side = channels, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.channels, self.side, self.side)
        out[:, :, 10, 20] = x.mean()
        return out


class _OneChannel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 68, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


# ---------------------------------------------------------------- heatmaps: hand computations
def test_decode_heatmaps_quarter_pixel_refinement_by_hand():
    hm = np.zeros((1, 3, 64, 64), np.float32)
    # map 0: peak at row 20, col 30; right neighbour higher than left, upper higher than lower
    hm[0, 0, 20, 30], hm[0, 0, 20, 31], hm[0, 0, 20, 29], hm[0, 0, 19, 30], hm[0, 0, 21, 30] = 1.0, 0.6, 0.2, 0.5, 0.1
    # map 1: peak on the border (col 0): no refinement
    hm[0, 1, 5, 0], hm[0, 1, 5, 1] = 0.9, 0.8
    # map 2: equal neighbours: sign(0) = 0, no move
    hm[0, 2, 40, 12], hm[0, 2, 40, 11], hm[0, 2, 40, 13] = 0.7, 0.3, 0.3
    pts, scores = decode_heatmaps(hm)
    # face-alignment: (col + 1, row + 1) +- 0.25, then - 0.5
    np.testing.assert_allclose(pts[0, 0], [30 + 1 + 0.25 - 0.5, 20 + 1 - 0.25 - 0.5])
    np.testing.assert_allclose(pts[0, 1], [0 + 1 - 0.5, 5 + 1 - 0.5])
    np.testing.assert_allclose(pts[0, 2], [12 + 1 - 0.5, 40 + 1 - 0.5])
    np.testing.assert_allclose(scores[0], [1.0, 0.9, 0.7])


def test_heatmap_points_to_image_pixels_by_hand():
    hm = np.zeros((1, 1, 64, 64), np.float32)
    hm[0, 0, 20, 30], hm[0, 0, 20, 31], hm[0, 0, 19, 30] = 1.0, 0.5, 0.5  # -> (30.75, 20.25)
    center, scale = np.array([100.0, 120.0]), 1.0  # crop side 200 px
    pts, _ = heatmaps_to_image(hm, center, scale)
    # x = (30.75 / 64 - 0.5) * 200 + 100, y = (20.25 / 64 - 0.5) * 200 + 120
    np.testing.assert_allclose(pts[0], [96.09375, 83.28125])
    trunc, _ = heatmaps_to_image(hm, center, scale, truncate=True)
    np.testing.assert_array_equal(trunc[0], [96.0, 83.0])
    # face-alignment's int() truncates towards zero, also left of the image
    neg, _ = heatmaps_to_image(hm, np.array([2.0, 0.0]), scale, truncate=True)
    assert neg[0, 0] == -1.0  # (30.75/64 - 0.5) * 200 + 2 = -1.906 -> -1


def test_box_center_scale_by_hand():
    center, scale = box_center_scale((10, 20, 110, 140))
    np.testing.assert_allclose(center, [60.0, 80.0 - 0.12 * 120])
    assert scale == pytest.approx(220 / 195)
    with pytest.raises(ValueError):
        box_center_scale((10, 20, 10, 40))


def test_crop_round_trip_and_crop_shows_the_image_where_to_crop_says():
    rng = np.random.default_rng(0)
    center, scale = np.array([130.0, 110.0]), 0.7  # 140 px crop side
    pts = rng.uniform(40, 220, size=(50, 2))
    for res in (256, 64):
        np.testing.assert_allclose(from_crop(to_crop(pts, center, scale, res), center, scale, res), pts, atol=1e-9)
    # the crop of a checker of bright dots: each dot appears where to_crop puts it
    img = np.zeros((240, 260, 3), np.uint8)
    dots = np.array([[100, 80], [160, 140], [130, 110], [75, 60]])
    for x, y in dots:
        img[y - 1:y + 2, x - 1:x + 2] = 255
    crop = crop_image(img, center, scale, 256).astype(np.float64)[..., 0]
    for x, y in dots:
        cx, cy = to_crop(np.array([x, y], float), center, scale, 256)
        win = crop[int(cy) - 8:int(cy) + 9, int(cx) - 8:int(cx) + 9]
        yy, xx = np.mgrid[int(cy) - 8:int(cy) + 9, int(cx) - 8:int(cx) + 9]
        mx, my = (xx * win).sum() / win.sum(), (yy * win).sum() / win.sum()
        assert abs(mx - cx) < 2.0 and abs(my - cy) < 2.0, (x, y, mx, my, cx, cy)
    # a box by the image edge: the part outside the image is black
    edge = crop_image(np.full((100, 100, 3), 200, np.uint8), np.array([10.0, 50.0]), 0.5, 256)
    assert edge.shape == (256, 256, 3) and edge[:, :60].max() == 0 and edge[:, 200:].min() == 200


# ---------------------------------------------------------------- the weights file
@pytest.fixture
def no_jit_load(monkeypatch):
    """Fail the test if anything reaches torch.jit.load."""
    def boom(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("torch.jit.load was called on a file that should have been refused unopened")
    monkeypatch.setattr(torch.jit, "load", boom)


def test_pickle_and_non_torchscript_files_are_refused_by_name_unopened(tmp_path, no_jit_load):
    legacy = tmp_path / "2DFAN4.pth.tar"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    plain_pickle = tmp_path / "weights.pkl"
    plain_pickle.write_bytes(pickle.dumps({"w": [1, 2, 3]}, protocol=4))
    ckpt = tmp_path / "state_dict.pt"
    torch.save({"w": torch.zeros(2)}, ckpt)  # a zip, but pickled data without TorchScript code
    other_zip = tmp_path / "face_landmarker.zip"
    with zipfile.ZipFile(other_zip, "w") as z:
        z.writestr("face_detector.tflite", b"\0" * 16)
        z.writestr("README.txt", "not a network")
    from safetensors.torch import save_file

    st = tmp_path / "fan.safetensors"
    save_file({"w": torch.zeros(2)}, str(st))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    cases = {legacy: "pickle", plain_pickle: "pickle", ckpt: "torch.save checkpoint", other_zip: "not a TorchScript",
             st: "safetensors", text: "neither", tmp_path / "missing.zip": "does not exist", tmp_path: "not a file"}
    for path, words in cases.items():
        with pytest.raises(InputError) as e:
            fanmod.FANModel(path)
        assert str(path) in e.value.message and words in e.value.message, e.value.message
        assert "2DFAN4-cd938726ad.zip" in (e.value.hint or "") and e.value.exit_code == 3


def test_wrong_shape_and_broken_networks_are_refused(tmp_path):
    for module, words in ((_Plain(68, 32), "[1, 68, 32, 32]"), (_Plain(5, 64), "[1, 5, 64, 64]"),
                          (_OneChannel(), "fails on a [1, 3, 256, 256] crop")):
        path = _save_script(module, tmp_path / f"{type(module).__name__}{getattr(module, 'side', '')}.pt")
        with pytest.raises(InputError) as e:
            fanmod.FANModel(path)
        assert str(path) in e.value.message and words in e.value.message, e.value.message


def test_a_fan_shaped_torchscript_archive_loads_and_reads_a_face_box(tmp_path):
    path = _save_script(_Blobs(as_list=True), tmp_path / "fanlike.zip")
    info = fanmod.inspect_weights(path)
    assert not info.public_archive and len(info.sha256) == 64
    model = fanmod.FANModel(path, device="cpu")
    img = np.zeros((300, 300, 3), np.uint8)
    box = (50.0, 60.0, 250.0, 280.0)
    pts, scores = model.landmarks(img, box)
    center, scale = box_center_scale(box)
    # every map peaks at cell (row 10, col 20), border-free, flat neighbours: (20.5, 10.5) in the heatmap
    np.testing.assert_allclose(pts, np.tile(from_crop(np.array([20.5, 10.5]), center, scale, 64), (68, 1)))
    np.testing.assert_allclose(scores, 1.0)  # the last of the returned stacks


def test_missing_weights_is_one_usage_error_naming_the_flag_and_the_file(monkeypatch, tmp_path):
    monkeypatch.delenv(fanmod.ENV_VAR, raising=False)
    with pytest.raises(UsageError) as e:
        fanmod.resolve_weights(None)
    text = str(e.value)
    assert "--fan-weights" in text and fanmod.ENV_VAR in text and "2DFAN4-cd938726ad.zip" in text
    assert "\n" not in text
    monkeypatch.setenv(fanmod.ENV_VAR, str(tmp_path / "x.zip"))
    assert fanmod.resolve_weights(None) == tmp_path / "x.zip"
    assert fanmod.resolve_weights(tmp_path / "y.zip") == tmp_path / "y.zip"  # the flag wins


def test_public_archive_name_carries_its_checksum_prefix():
    # torch.hub's convention: NAME-<first hex digits of the SHA-256>.EXT
    assert fanmod.PUBLIC_ARCHIVE == "2DFAN4-cd938726ad.zip" and fanmod.PUBLIC_SHA256.startswith("cd938726ad")
    assert len(fanmod.PUBLIC_SHA256) == 64 and fanmod.PUBLIC_URL.endswith(fanmod.PUBLIC_ARCHIVE)


# ---------------------------------------------------------------- the 68-point scheme
def test_ibug68_mesh_ids_are_mirror_symmetric_on_the_canonical_face():
    from gstalk.tracking.canonical import canonical_face
    from gstalk.tracking.schemes import IBUG68_MESH_IDS, IBUG68_MIRROR

    v = canonical_face().vertices[list(IBUG68_MESH_IDS)]
    m = list(IBUG68_MIRROR)
    assert len(set(IBUG68_MESH_IDS)) == 68 and sorted(m) == list(range(68))
    np.testing.assert_allclose(v[:, 0], -v[m, 0], atol=1e-6)
    np.testing.assert_allclose(v[:, 1:], v[m, 1:], atol=1e-6)
    # iBUG order: the subject's right (x < 0 in canonical space) first; chin lowest; nose tip in front
    assert v[0, 0] < 0 and v[16, 0] > 0 and v[36, 0] < v[39, 0] < 0 and v[48, 0] < 0 < v[54, 0]
    assert v[8, 1] == v[:, 1].min() and v[30, 2] > v[27, 2]


def test_both_layouts_measure_the_same_face_alike():
    from gstalk.testing.mannequin import head_pose, render
    from gstalk.tracking.avsync import mouth_opening
    from gstalk.tracking.schemes import eye_aspect_ratio, face_height, face_outline, scheme_of, to_ibug68

    def mesh(op: float, yaw: float) -> np.ndarray:
        _, uv = render(op, head_pose(yaw=yaw, t=(0, 0.01, 0.45)), 600.0, 512)
        lm = np.zeros((478, 3))
        lm[:468, :2] = uv
        return lm

    turned = np.stack([mesh(0.0, yaw) for yaw in (0.0, 0.15, -0.25)])
    opened = np.stack([mesh(op, 0.0) for op in np.linspace(0, 1, 6)])
    assert scheme_of(turned).name == "mediapipe" and scheme_of(to_ibug68(turned)).name == "ibug68"
    h_mp, h_ib = face_height(turned), face_height(to_ibug68(turned))
    assert h_ib[0] == pytest.approx(h_mp[0], rel=0.01)  # frontal: equal by construction
    assert np.all(np.abs(h_ib / h_mp - 1) < 0.05)  # turned up to 14 degrees: still close
    # the iBUG height is rigid (eyes and nose), MediaPipe's forehead-chin grows as the jaw drops
    h_open = face_height(to_ibug68(opened))
    assert np.ptp(h_open) / h_open.mean() < 1e-6 and face_height(opened)[-1] > 1.05 * face_height(opened)[0]
    # so the mouth opening (62-66 are MediaPipe's 13-14) agrees up to that growth
    o_mp, o_ib = mouth_opening(opened), mouth_opening(to_ibug68(opened))
    assert np.corrcoef(o_mp, o_ib)[0, 1] > 0.999 and np.all(o_ib >= o_mp) and np.all(o_ib < 1.12 * o_mp)
    np.testing.assert_allclose(eye_aspect_ratio(to_ibug68(turned)), eye_aspect_ratio(turned))  # same six points
    ib = to_ibug68(turned[0])
    outline = face_outline(ib)
    assert outline.shape == (27, 2) and outline[:, 1].min() < ib[17:27, 1].min() - 0.15 * h_ib[0]  # the forehead
    with pytest.raises(ValueError):
        scheme_of(np.zeros((5, 2)))


def test_eye_aspect_ratio_by_hand():
    from gstalk.tracking.schemes import eye_aspect_ratio

    lm = np.zeros((1, 68, 2))
    # right eye 36-41: corners 4 px apart, lids 1 and 2 px apart -> (1 + 2) / (2 * 4)
    lm[0, 36:42] = [[0, 0], [1, -0.5], [3, -1], [4, 0], [3, 1], [1, 0.5]]
    # left eye 42-47 (inner corner first): corners 5 px apart, lids 1 px -> 2 / 10
    lm[0, 42:48] = [[10, 0], [11, -0.5], [14, -0.5], [15, 0], [14, 0.5], [11, 0.5]]
    assert eye_aspect_ratio(lm)[0] == pytest.approx(0.5 * (3 / 8 + 2 / 10))


def test_mouth_code_from_68_points():
    from gstalk.deform.articulation import ARTICULATION_NAMES
    from gstalk.deform.articulation68 import DROPPED, articulation_features_68
    from gstalk.testing.mannequin import head_pose, render
    from gstalk.tracking.schemes import face_height, to_ibug68

    openings = np.linspace(0, 1, 9)
    lms = []
    for op in openings:
        _, uv = render(float(op), head_pose(t=(0, 0.01, 0.45)), 600.0, 512)
        lm = np.zeros((478, 2))
        lm[:468] = uv
        lms.append(to_ibug68(lm))
    lm68 = np.stack(lms)
    f = articulation_features_68(torch.from_numpy(lm68)).numpy()
    assert f.shape == (9, len(ARTICULATION_NAMES)) and f.dtype == np.float32
    col = {k: f[:, i] for i, k in enumerate(ARTICULATION_NAMES)}
    # by hand: the inner gap 62-66 over the face height; the jaw: nose base 33 to lower lip 57
    h = face_height(lm68)
    np.testing.assert_allclose(col["inner_opening"], np.linalg.norm(lm68[:, 62] - lm68[:, 66], axis=1) / h, rtol=1e-5)
    np.testing.assert_allclose(col["jawOpen"], np.linalg.norm(lm68[:, 33] - lm68[:, 57], axis=1) / h, rtol=1e-5)
    for k in ("inner_opening", "outer_opening", "jawOpen", "mouthFunnel"):
        assert np.corrcoef(col[k], openings)[0, 1] > 0.95, k  # they grow as the jaw drops
    for k in DROPPED:
        assert (col[k] == 0).all()
    with pytest.raises(ValueError):
        articulation_features_68(np.zeros((3, 478, 2)))


def test_tracks_articulation_dispatches_on_the_layout():
    from gstalk.dataset import Tracks

    n = 4
    lm68 = torch.rand(n, 68, 3) * 100
    t = Tracks(viewmats=torch.eye(4).expand(n, 4, 4), K=torch.eye(3), landmarks=lm68, blendshapes=torch.zeros(n, 0),
               blink=torch.zeros(n), valid=torch.ones(n, dtype=torch.bool), mouth_box=torch.zeros(n, 4),
               face_box=torch.zeros(n, 4), detector="fan")
    assert t.has_articulation and t.articulation().shape == (n, 7)
    t478 = Tracks(viewmats=t.viewmats, K=t.K, landmarks=torch.rand(n, 478, 3), blendshapes=torch.zeros(n, 52),
                  blink=t.blink, valid=t.valid, mouth_box=t.mouth_box, face_box=t.face_box)
    assert not t478.has_articulation  # MediaPipe tracks without blendshape names (an old workspace)


# ---------------------------------------------------------------- LMD the papers' way
def test_fan_mouth_lmd_takes_points_48_to_67_mean_centred():
    from gstalk.metrics.landmarks import FAN_MOUTH_IDS, mouth_lmd

    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 100, size=(3, 68, 2))
    pred = truth + np.array([5.0, -3.0])  # a shifted head: no mouth error after centring
    pred[:, :48] += rng.normal(0, 10, size=(3, 48, 2))  # nothing outside the mouth counts
    np.testing.assert_allclose(mouth_lmd(pred, truth), 0.0, atol=1e-9)
    pred[1, 66] += [0.0, 4.0]  # one lower-lip point 4 px down
    # centring moves all 20 points by 4/20 px: |(0, 4 - 0.2)| once, |(0, -0.2)| 19 times, over 20
    assert mouth_lmd(pred, truth)[1] == pytest.approx((3.8 + 19 * 0.2) / 20)
    assert FAN_MOUTH_IDS == tuple(range(48, 68))
    with pytest.raises(ValueError):
        mouth_lmd(pred, truth[:, :60])


def test_report_names_the_detector_of_each_lmd_row():
    from gstalk.stages.evaluate import lmd_lines

    row = {"lmd": 1.0, "lmd_512": 2.0, "aue": 0.1, "lip_frames": 7}
    m = {**row, "lmd_fan": 1.5, "lmd_fan_512": 3.0, "lmd_fan_frames": 7, "lmd_fan_box_fallbacks": 1,
         "baselines": {"coarse": {**row, "lmd_fan": 2.5, "lmd_fan_512": 5.0, "lmd_fan_frames": 7}},
         "weights": {"fan": {"path": "/w/2DFAN4-cd938726ad.zip", "public_archive": True}}}
    text = "\n".join(lmd_lines(m))
    assert text.count("| MediaPipe, 40 lip points |") == 2 and text.count("| FAN 2D-FAN-4, points 48-67 |") == 2
    assert "| fine model | FAN 2D-FAN-4, points 48-67 | 1.50 | 3.00 |" in text
    assert "the public 2D-FAN-4 archive" in text and "ER-NeRF" in text
    assert "FAN" not in "\n".join(lmd_lines({**row, "baselines": {}}))
    json.dumps(m)  # the metrics stay JSON


def test_doctor_checks_the_fan_weights_named_in_the_environment(monkeypatch, tmp_path):
    from gstalk.doctor import check_fan_weights

    monkeypatch.delenv(fanmod.ENV_VAR, raising=False)
    assert check_fan_weights().status == "ok"  # optional: nothing to check
    bad = tmp_path / "2DFAN4.pth.tar"
    bad.write_bytes(pickle.dumps({"w": 1}, protocol=2))
    monkeypatch.setenv(fanmod.ENV_VAR, str(bad))
    c = check_fan_weights()
    assert c.status == "warn" and "pickle" in c.detail and "2DFAN4-cd938726ad.zip" in c.fix
    monkeypatch.setenv(fanmod.ENV_VAR, str(_save_script(_Plain(), tmp_path / "other.zip")))
    c = check_fan_weights()
    assert c.status == "warn" and "not the public" in c.detail


def test_same_numbers_as_face_alignment_itself():
    """Parity with face-alignment's own ``get_preds_fromhm`` and ``crop`` (not installed by
    gstalk, see the module docstring of gstalk.tracking.heatmaps; to run this check:
    ``pip install --no-deps face-alignment==1.4.1 numba scikit-image tqdm lazy-loader``)."""
    try:
        from face_alignment import utils as fa
    except ImportError:
        pytest.skip("face-alignment is not installed (optional parity check; see this test's docstring)")
    rng = np.random.default_rng(0)
    for _ in range(20):
        hm = rng.random((1, 68, 64, 64)).astype(np.float32) ** 8
        hm[0, :3, 0, 7] = 2.0  # maxima on the border too
        center, scale = rng.uniform(50, 400, 2), float(rng.uniform(0.4, 3.0))
        ref_hm, ref_img, ref_scores = fa.get_preds_fromhm(hm.copy(), center.copy(), scale)
        pts, scores = decode_heatmaps(hm)
        img, _ = heatmaps_to_image(hm, center, scale, truncate=True)
        np.testing.assert_array_equal(pts, ref_hm)
        np.testing.assert_array_equal(img, ref_img[0])
        np.testing.assert_allclose(scores, ref_scores)
        image = rng.integers(0, 256, (300, 340, 3), dtype=np.uint8)
        x0, y0, side = rng.uniform(-40, 200), rng.uniform(-40, 150), rng.uniform(40, 250)
        c, s = box_center_scale((x0, y0, x0 + side, y0 + 1.1 * side))
        np.testing.assert_array_equal(crop_image(image, c, s), fa.crop(image, torch.tensor(c), s))
