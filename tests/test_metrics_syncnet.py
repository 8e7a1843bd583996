"""SyncNet LSE-C / LSE-D: the score arithmetic on hand-made distances, the offset search on
embeddings with a known shift, the networks against torch.nn modules laid out as
syncnet_python's ``S``, the face crop, and clear errors for bad weight files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gstalk.errors import InputError
from gstalk.metrics.syncnet import (
    PAD_VALUE,
    SyncNet,
    crop_face,
    distance_matrix,
    expected_shapes,
    face_crops,
    lse_scores,
    mfcc_features,
    n_windows,
)


def random_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in expected_shapes().items():
        if k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith("running_mean") or k.endswith("bias"):
            out[k] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # BatchNorm gamma
            out[k] = 0.5 + torch.rand(shape, generator=g)
        else:
            out[k] = torch.randn(shape, generator=g) * (2.0 / int(np.prod(shape[1:]))) ** 0.5
    return out


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory):
    p = tmp_path_factory.mktemp("syncnet") / "syncnet.safetensors"
    w = random_weights()
    save_file(w, str(p))
    return p, w


def reference_model(w: dict[str, torch.Tensor]) -> torch.nn.Module:
    """syncnet_python's ``S`` laid out with torch.nn (Sequential indices give the key names)."""
    nn = torch.nn

    def bnr2(c):
        return [nn.BatchNorm2d(c), nn.ReLU()]

    def bnr3(c):
        return [nn.BatchNorm3d(c), nn.ReLU()]

    m = nn.Module()
    m.netcnnaud = nn.Sequential(
        nn.Conv2d(1, 64, 3, 1, 1), *bnr2(64), nn.MaxPool2d(1, 1),
        nn.Conv2d(64, 192, 3, 1, 1), *bnr2(192), nn.MaxPool2d(3, (1, 2)),
        nn.Conv2d(192, 384, 3, padding=1), *bnr2(384),
        nn.Conv2d(384, 256, 3, padding=1), *bnr2(256),
        nn.Conv2d(256, 256, 3, padding=1), *bnr2(256), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 512, (5, 4)), *bnr2(512))
    m.netcnnlip = nn.Sequential(
        nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2)), *bnr3(96), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
        nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), *bnr3(256), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), *bnr3(256),
        nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), *bnr3(256),
        nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), *bnr3(256), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
        nn.Conv3d(256, 512, (1, 6, 6)), *bnr3(512))
    for name in ("netfcaud", "netfclip"):
        setattr(m, name, nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 1024)))
    missing, unexpected = m.load_state_dict(w, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    return m.eval()


def test_lse_from_a_hand_computed_distance_matrix():
    # 3 windows x 5 offsets (vshift 2); column means 4, 2, 4/3, 2.5, 9 -> LSE-D = 4/3 at index 2
    # (not the mean of each window's own minimum, 2/3), LSE-C = median 2.5 − 4/3 (not the mean, 3.77)
    d = torch.tensor([[4.0, 2.0, 1.0, 3.0, 9.0],
                      [3.0, 1.0, 0.5, 4.0, 10.0],
                      [5.0, 3.0, 2.5, 0.5, 8.0]])
    s = lse_scores(d)
    assert s["lse_d"] == pytest.approx(4 / 3) and s["lse_c"] == pytest.approx(2.5 - 4 / 3)
    assert s["syncnet_offset"] == 0
    s = lse_scores(d[:, [1, 0, 3, 4, 2]])  # the minimum moves to index 4 -> offset 2 − 4 = −2
    assert s["lse_d"] == pytest.approx(4 / 3) and s["lse_c"] == pytest.approx(2.5 - 4 / 3)
    assert s["syncnet_offset"] == -2


def test_distance_matrix_pads_with_zeros_like_the_reference():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    d = distance_matrix(v, a, vshift=1)
    # entry (i, j) = |v_i − a_{i+j−1}| with a = 0 outside; pairwise_distance adds 1e-6 to the difference
    want = torch.tensor([[1.0, 1.0, (4 + 16) ** 0.5],
                         [1.0, (9 + 9) ** 0.5, 1.0],
                         [(4 + 9) ** 0.5, 0.0, 2 ** 0.5]])
    torch.testing.assert_close(d, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [-4, 0, 3])
def test_offset_search_finds_a_known_shift(k):
    """Video window i matches audio window i + k: the minimum is at offset k, reported as −k
    (the reference's sign), with a clear confidence; unrelated embeddings give little."""
    g = torch.Generator().manual_seed(5)
    n = 60
    audio = torch.randn(n + 20, 64, generator=g)
    video = audio[10 + k:10 + k + n] + 0.1 * torch.randn(n, 64, generator=g)
    s = lse_scores(distance_matrix(video, audio[10:10 + n], vshift=15))
    assert s["syncnet_offset"] == -k
    assert s["lse_d"] < 2.0 and s["lse_c"] > 5.0
    other = lse_scores(distance_matrix(torch.randn(n, 64, generator=g), audio[10:10 + n], vshift=15))
    assert other["lse_c"] < 0.3 * s["lse_c"]


def test_networks_match_torch_nn_modules_and_window_batching(weights_file):
    path, w = weights_file
    net = SyncNet.load(path)
    ref = reference_model(w)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)
    emb = net.embed_video(crops, batch=1)  # 2 windows, one chunk each
    assert emb.shape == (2, 1024)
    tol = 1e-4 * float(emb.abs().max())  # float32 sums of ~10^5 terms of inputs in 0..255
    torch.testing.assert_close(net.embed_video(crops, batch=16), emb, rtol=1e-4, atol=tol)
    with torch.no_grad():
        bgr = torch.from_numpy(crops[:, :, :, ::-1].copy()).float().permute(3, 0, 1, 2)  # [3, F, H, W]
        windows = torch.stack([bgr[:, i:i + 5] for i in range(2)])  # [2, 3, 5, 224, 224], as the reference
        want = ref.netfclip(ref.netcnnlip(windows).flatten(1))
    torch.testing.assert_close(emb, want, rtol=1e-4, atol=tol)

    samples = 0.1 * rng.standard_normal(16000 * 1)
    mfcc = mfcc_features(samples)
    assert mfcc.shape[0] == 13 and abs(mfcc.shape[1] - 99) <= 1  # 100 vectors/s
    a = net.embed_audio(mfcc, 6)
    with torch.no_grad():
        m = torch.from_numpy(mfcc).float()
        x = torch.stack([m[:, 4 * v:4 * v + 20] for v in range(6)])[:, None]
        want = ref.netfcaud(ref.netcnnaud(x).flatten(1))
    torch.testing.assert_close(a, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    with pytest.raises(ValueError, match="MFCC vectors"):
        net.embed_audio(mfcc, 40)

    s = net.score(crops, samples.astype(np.float32), 16000)
    assert s["syncnet_windows"] == n_windows(6, 16000) == 1
    assert np.isfinite(s["lse_c"]) and np.isfinite(s["lse_d"]) and -15 <= s["syncnet_offset"] <= 15
    assert net.score(crops, samples, 16000, video_embeddings=emb) == pytest.approx(s, rel=1e-4)
    # the audio is resampled to 16 kHz (here from 8 kHz)
    assert net.score(crops, samples[::2], 8000, video_embeddings=emb)["syncnet_windows"] == 1
    assert net.score(crops[:5], samples, 16000)["syncnet_windows"] == 0


def test_face_crop_geometry():
    frame = np.zeros((100, 120, 3), dtype=np.uint8)
    frame[40:60, 50:70] = 255  # a 20 px "face" centred at (60, 50)
    c = crop_face(frame, cx=60.0, cy=50.0, s=10.0)  # rows 40..68, cols 46..74: face in the top part
    assert c.shape == (224, 224, 3) and c.dtype == np.uint8
    assert c[:100, 60:160].mean() > 250  # face fills the upper middle
    assert c[200:, :].max() < 10  # below the face box: black frame, inside the image
    edge = crop_face(frame, cx=2.0, cy=2.0, s=10.0)  # mostly outside: grey padding
    assert (edge[:60, :60] == PAD_VALUE).all()
    boxes = np.array([[50, 40, 70, 60]] * 4, dtype=np.float32)
    crops = face_crops([frame] * 4, boxes)
    assert crops.shape == (4, 224, 224, 3)
    with pytest.raises(ValueError, match="3 frames for 4 face boxes"):
        face_crops([frame] * 3, boxes)


def test_bad_weight_files(weights_file, tmp_path):
    path, w = weights_file
    with pytest.raises(InputError, match="does not exist") as e:
        SyncNet.load(tmp_path / "syncnet_v2.model")
    assert "syncnet_v2.model" in str(e.value) and "docs/methods.md" in str(e.value)
    torch_pickle = tmp_path / "syncnet_v2.model"
    torch.save({"netcnnaud.0.weight": torch.zeros(1)}, torch_pickle)
    with pytest.raises(InputError, match="not a safetensors file"):
        SyncNet.load(torch_pickle)
    p = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in w.items() if not k.startswith("netfclip")}, str(p))
    with pytest.raises(InputError, match=r"partial\.safetensors lacks the key\(s\) 'netfclip\.0\.weight'.* and 5 more"):
        SyncNet.load(p)
    bad = dict(w)
    bad["netcnnlip.0.weight"] = torch.zeros(96, 1, 5, 7, 7)  # grayscale input: not the reference's
    save_file(bad, str(p))
    with pytest.raises(InputError, match=r"'netcnnlip\.0\.weight' has shape \[96, 1, 5, 7, 7\], expected "
                                         r"\[96, 3, 5, 7, 7\]"):
        SyncNet.load(p)
