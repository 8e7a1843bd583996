"""LSE-C / LSE-D: SyncNet (Chung & Zisserman 2016, "Out of time: automated lip sync in the
wild") with weights the user brings, computed as the peers' evaluation does (Wav2Lip's
``calculate_scores_real_videos``, on joonson/syncnet_python's ``SyncNetInstance``).

The network (syncnet_python's ``SyncNetModel.S``, 1024-d embeddings):

- audio: MFCC [1, 13, 20] (0.2 s) -> Conv2d 3x3 (64) BN ReLU, Conv2d 3x3 (192) BN ReLU,
  MaxPool (3x3, stride 1x2), Conv2d 3x3 (384, 256, 256) each BN ReLU, MaxPool (3x3, 2x2),
  Conv2d 5x4 (512) BN ReLU -> Linear 512 BN1d ReLU Linear 1024;
- video: 5 consecutive 224x224 face crops, BGR in 0..255, as [3, 5, 224, 224] -> Conv3d
  5x7x7 stride 1x2x2 (96) BN ReLU, MaxPool 1x3x3/1x2x2, Conv3d 1x5x5 stride 1x2x2 pad 0x1x1
  (256) BN ReLU, MaxPool 1x3x3/1x2x2 pad 0x1x1, Conv3d 1x3x3 pad 0x1x1 (256, 256, 256) each
  BN ReLU, MaxPool 1x3x3/1x2x2, Conv3d 1x6x6 (512) BN ReLU -> Linear 512 BN1d ReLU Linear 1024.

Scores (25 frames/s video, 16 kHz audio, 100 MFCC vectors/s): window v pairs frames
v..v+4 with MFCC columns 4v..4v+19, for v < min(frames, samples // 640) − 5. For each
offset k in −vshift..vshift (vshift = 15) the audio embeddings are shifted by k (zeros
beyond the ends, as the reference pads) and d_k = the mean over windows of the L2 distance
(``torch.nn.functional.pairwise_distance``, eps 1e-6). **LSE-D** = min_k d_k (lower is better),
**LSE-C** = median_k d_k − min_k d_k (the reference's confidence; higher is better), and the
offset is vshift − argmin_k (the reference's sign: −k when video frame i matches audio
window i + k, i.e. −(gstalk's lag)).

Face crops follow syncnet_python's ``run_pipeline.crop_video`` with ``crop_scale`` 0.4: box
half-size s = max(w, h) / 2 and centre, each median-filtered over 13 frames; the crop spans
[cy − s, cy + 1.8 s] x [cx − 1.4 s, cx + 1.4 s] (grey 110 beyond the image), resized to
224x224. gstalk's boxes come from MediaPipe landmarks (the reference uses S3FD detections,
a slightly larger box) and its crops are not re-encoded as XVID, so numbers compare with the
papers' in scale, not to the decimal.

Weights: one safetensors file with the keys of syncnet_python's ``S().state_dict()``:
``netcnnaud.{0,4,8,11,14,18}.{weight,bias}``, ``netcnnaud.{1,5,9,12,15,19}.{weight,bias,
running_mean,running_var}``, the same indices under ``netcnnlip``, and ``netfcaud.0``/
``netfclip.0`` (Linear), ``.1`` (BatchNorm1d), ``.3`` (Linear) (``num_batches_tracked`` is
ignored). :func:`expected_shapes` lists every key with its shape; docs/methods.md shows how
to convert ``syncnet_v2.model`` in one's own environment.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gstalk.metrics.weights import check_shapes, read_safetensors

FPS = 25.0  # SyncNet's video rate
SAMPLE_RATE = 16000  # and audio rate
MFCC_PER_FRAME = 4  # 100 MFCC vectors/s at 25 frames/s
WINDOW = 5  # frames per video window (20 MFCC vectors)
VSHIFT = 15
CROP_SCALE = 0.4
CROP_SIZE = 224
PAD_VALUE = 110
BN_EPS = 1e-5
HINT = ("convert syncnet_python's syncnet_v2.model in your own environment: "
        "safetensors.torch.save_file(torch.load('syncnet_v2.model', map_location='cpu', weights_only=True), "
        "'syncnet_v2.safetensors') "
        "(see docs/methods.md, 'LSE-C / LSE-D')")

# (kind, Sequential index, in, out, kernel, stride, padding); "bn" has (kind, index, channels);
# "pool" (kind, kernel, stride, padding); a ReLU follows every BatchNorm
AUDIO_NET: tuple[tuple, ...] = (
    ("conv", 0, 1, 64, (3, 3), (1, 1), (1, 1)), ("bn", 1, 64), ("pool", (1, 1), (1, 1), (0, 0)),
    ("conv", 4, 64, 192, (3, 3), (1, 1), (1, 1)), ("bn", 5, 192), ("pool", (3, 3), (1, 2), (0, 0)),
    ("conv", 8, 192, 384, (3, 3), (1, 1), (1, 1)), ("bn", 9, 384),
    ("conv", 11, 384, 256, (3, 3), (1, 1), (1, 1)), ("bn", 12, 256),
    ("conv", 14, 256, 256, (3, 3), (1, 1), (1, 1)), ("bn", 15, 256), ("pool", (3, 3), (2, 2), (0, 0)),
    ("conv", 18, 256, 512, (5, 4), (1, 1), (0, 0)), ("bn", 19, 512),
)
VIDEO_NET: tuple[tuple, ...] = (
    ("conv", 0, 3, 96, (5, 7, 7), (1, 2, 2), (0, 0, 0)), ("bn", 1, 96), ("pool", (1, 3, 3), (1, 2, 2), (0, 0, 0)),
    ("conv", 4, 96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), ("bn", 5, 256),
    ("pool", (1, 3, 3), (1, 2, 2), (0, 1, 1)),
    ("conv", 8, 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("bn", 9, 256),
    ("conv", 11, 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("bn", 12, 256),
    ("conv", 14, 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("bn", 15, 256),
    ("pool", (1, 3, 3), (1, 2, 2), (0, 0, 0)),
    ("conv", 18, 256, 512, (1, 6, 6), (1, 1, 1), (0, 0, 0)), ("bn", 19, 512),
)
EMBED = 1024


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a complete SyncNet weights file (syncnet_python's state-dict names)."""
    out: dict[str, tuple[int, ...]] = {}
    for prefix, spec in (("netcnnaud", AUDIO_NET), ("netcnnlip", VIDEO_NET)):
        for op in spec:
            if op[0] == "conv":
                _, i, cin, cout, k, _, _ = op
                out[f"{prefix}.{i}.weight"] = (cout, cin, *k)
                out[f"{prefix}.{i}.bias"] = (cout,)
            elif op[0] == "bn":
                for p in ("weight", "bias", "running_mean", "running_var"):
                    out[f"{prefix}.{op[1]}.{p}"] = (op[2],)
    for prefix in ("netfcaud", "netfclip"):
        out[f"{prefix}.0.weight"], out[f"{prefix}.0.bias"] = (512, 512), (512,)
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.1.{p}"] = (512,)
        out[f"{prefix}.3.weight"], out[f"{prefix}.3.bias"] = (EMBED, 512), (EMBED,)
    return out


def _bn(x: torch.Tensor, w: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """Inference BatchNorm over dim 1: (x − running_mean) / sqrt(running_var + 1e-5) · γ + β."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    scale = w[f"{key}.weight"] / torch.sqrt(w[f"{key}.running_var"] + BN_EPS)
    shift = w[f"{key}.bias"] - w[f"{key}.running_mean"] * scale
    return x * scale.view(shape) + shift.view(shape)


def run_cnn(spec: tuple[tuple, ...], prefix: str, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The convolutional trunk ``prefix`` ("netcnnaud": x [N, 1, 13, 20] -> [N, 512, 1, 1];
    "netcnnlip": x [N, 3, T, 224, 224] -> [N, 512, T − 4, 1, 1])."""
    conv, pool = (F.conv2d, F.max_pool2d) if x.ndim == 4 else (F.conv3d, F.max_pool3d)
    for op in spec:
        if op[0] == "conv":
            x = conv(x, w[f"{prefix}.{op[1]}.weight"], w[f"{prefix}.{op[1]}.bias"], stride=op[5], padding=op[6])
        elif op[0] == "bn":
            x = F.relu(_bn(x, w, f"{prefix}.{op[1]}"))
        else:
            x = pool(x, kernel_size=op[1], stride=op[2], padding=op[3])
    return x


def run_fc(prefix: str, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The embedding head ``prefix`` ("netfcaud"/"netfclip"): [N, 512] -> [N, 1024]."""
    x = F.relu(_bn(F.linear(x, w[f"{prefix}.0.weight"], w[f"{prefix}.0.bias"]), w, f"{prefix}.1"))
    return F.linear(x, w[f"{prefix}.3.weight"], w[f"{prefix}.3.bias"])


@dataclass(frozen=True)
class SyncNet:
    """SyncNet with loaded weights. ``weights``: documented key -> float32 tensor."""

    weights: dict[str, torch.Tensor]
    path: str = ""

    @classmethod
    def load(cls, path: str | Path) -> SyncNet:
        """Read and validate a weights file (keys and shapes: :func:`expected_shapes`).

        Raises:
            InputError: missing/unreadable file, not safetensors, a missing or mis-shaped key.
        """
        t = read_safetensors(path, "SyncNet weights", HINT)
        shapes = expected_shapes()
        check_shapes(t, shapes, path, "SyncNet weights", HINT)
        return cls({k: t[k].float().contiguous() for k in shapes}, str(path))

    def to(self, device: str | torch.device) -> SyncNet:
        """The same network with its weights on ``device``."""
        return SyncNet({k: v.to(device) for k, v in self.weights.items()}, self.path)

    @property
    def device(self) -> torch.device:
        return self.weights["netfcaud.0.weight"].device

    def embed_video(self, crops: np.ndarray, batch: int = 16) -> torch.Tensor:
        """Video embeddings of every 5-frame window: crops [F, 224, 224, 3] uint8 RGB (see
        :func:`crop_face`) -> [F − 4, 1024] float32 on the CPU.

        Consecutive windows share frames, so the trunk runs on chunks of ``batch`` + 4
        frames at once (its temporal kernel is 5 in the first layer and 1 after), which
        equals running each [3, 5, 224, 224] window on its own.
        """
        n = len(crops) - (WINDOW - 1)
        out = []
        with torch.no_grad():
            for s in range(0, max(n, 0), batch):
                seq = torch.from_numpy(np.ascontiguousarray(crops[s:s + batch + WINDOW - 1, :, :, ::-1]))  # BGR
                x = seq.to(self.device, torch.float32).permute(3, 0, 1, 2)[None]  # [1, 3, T, 224, 224]
                feat = run_cnn(VIDEO_NET, "netcnnlip", self.weights, x)  # [1, 512, T - 4, 1, 1]
                out.append(run_fc("netfclip", self.weights, feat[0, :, :, 0, 0].T).cpu())
        return torch.cat(out) if out else torch.zeros(0, EMBED)

    def embed_audio(self, mfcc: np.ndarray, n: int, batch: int = 64) -> torch.Tensor:
        """Audio embeddings of windows 0..n−1: MFCC [13, T] (:func:`mfcc_features`) ->
        [n, 1024] float32 on the CPU; window v is columns 4v..4v+19.

        Raises:
            ValueError: ``mfcc`` is too short for n windows.
        """
        need = MFCC_PER_FRAME * (n - 1) + MFCC_PER_FRAME * WINDOW
        if n > 0 and mfcc.shape[1] < need:
            raise ValueError(f"{n} SyncNet windows need {need} MFCC vectors, got {mfcc.shape[1]}")
        m = torch.from_numpy(np.ascontiguousarray(mfcc, dtype=np.float32)).to(self.device)
        out = []
        with torch.no_grad():
            for s in range(0, n, batch):
                x = torch.stack([m[:, MFCC_PER_FRAME * v:MFCC_PER_FRAME * (v + WINDOW)]
                                 for v in range(s, min(n, s + batch))])[:, None]  # [B, 1, 13, 20]
                feat = run_cnn(AUDIO_NET, "netcnnaud", self.weights, x)
                out.append(run_fc("netfcaud", self.weights, feat.flatten(1)).cpu())
        return torch.cat(out) if out else torch.zeros(0, EMBED)

    def score(self, crops: np.ndarray, samples: np.ndarray, sample_rate: int, vshift: int = VSHIFT,
              video_embeddings: torch.Tensor | None = None) -> dict[str, float]:
        """LSE-C / LSE-D of face crops [F, 224, 224, 3] uint8 RGB at 25 frames/s against
        audio [S] float in [−1, 1] starting at the first crop (resampled to 16 kHz).

        ``video_embeddings`` (from :meth:`embed_video` of the same crops) skips the video net,
        e.g. to score the same frames against other audio.

        Returns:
            {"lse_c", "lse_d", "syncnet_offset" (frames, the reference's sign), "syncnet_windows"};
            NaNs and 0 windows when there are fewer than 6 frames.
        """
        samples = resample(samples, sample_rate, SAMPLE_RATE)
        n = n_windows(len(crops), len(samples))
        if n < 1:
            return {"lse_c": float("nan"), "lse_d": float("nan"), "syncnet_offset": 0, "syncnet_windows": 0}
        v = self.embed_video(crops[:n + WINDOW - 1]) if video_embeddings is None else video_embeddings[:n]
        a = self.embed_audio(mfcc_features(samples, SAMPLE_RATE), n)
        return {**lse_scores(distance_matrix(v, a, vshift)), "syncnet_windows": n}


def n_windows(n_frames: int, n_samples: int) -> int:
    """SyncNet windows in a clip, as the reference counts them: min(frames, samples // 640) − 5
    (it stops one window short of the last full one); may be ≤ 0."""
    return min(n_frames, n_samples // int(SAMPLE_RATE / FPS)) - WINDOW


def resample(samples: np.ndarray, rate: int, to: int) -> np.ndarray:
    """[S] audio at ``rate`` Hz -> at ``to`` Hz (polyphase; unchanged when the rates match)."""
    if rate == to:
        return np.asarray(samples, dtype=np.float64)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(int(rate), int(to))
    return resample_poly(np.asarray(samples, dtype=np.float64), to // g, rate // g)


def mfcc_features(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """MFCCs as syncnet_python computes them: python_speech_features' ``mfcc`` with its
    defaults (13 coefficients, 25 ms windows every 10 ms, 26 filters, c0 = log frame energy)
    on 16-bit-scaled samples (the reference reads int16 WAV); [S] float in [−1, 1] -> [13, T]."""
    from python_speech_features import mfcc

    return mfcc(np.asarray(samples, dtype=np.float64) * 32768.0, sample_rate).T.astype(np.float32)


def smooth_boxes(face_boxes: np.ndarray) -> np.ndarray:
    """Crop centres and half-sizes from face boxes [F, 4] (x0, y0, x1, y1) px: [F, 3] (cx, cy, s),
    each median-filtered over 13 frames (scipy's ``medfilt``, zero-padded at the ends, as the
    reference)."""
    import warnings

    from scipy.signal import medfilt

    b = np.asarray(face_boxes, dtype=np.float64)
    s = np.maximum(b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]) / 2
    cols = [(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, s]
    with warnings.catch_warnings():  # "kernel_size exceeds volume extent" for clips under 13 frames
        warnings.simplefilter("ignore", UserWarning)
        return np.stack([medfilt(c, kernel_size=13) for c in cols], axis=1)


def crop_face(frame: np.ndarray, cx: float, cy: float, s: float, crop_scale: float = CROP_SCALE,
              size: int = CROP_SIZE) -> np.ndarray:
    """SyncNet's face crop of one frame [H, W, 3] uint8: rows cy − s .. cy + s(1 + 2·crop_scale),
    columns cx ∓ s(1 + crop_scale), grey (110) outside the frame, resized (bilinear) to
    [size, size, 3] uint8."""
    import cv2

    pad = int(s * (1 + 2 * crop_scale))
    img = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="constant", constant_values=PAD_VALUE)
    my, mx = cy + pad, cx + pad
    half_w = s * (1 + crop_scale)
    face = img[int(my - s):int(my + s * (1 + 2 * crop_scale)), int(mx - half_w):int(mx + half_w)]
    if face.size == 0:
        return np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    return cv2.resize(np.ascontiguousarray(face), (size, size))


def face_crops(frames: Iterable[np.ndarray], face_boxes: np.ndarray) -> np.ndarray:
    """Crops of a sequence: frames [H, W, 3] uint8 (any iterable, e.g. a renderer), face
    boxes [F, 4] px -> [F, 224, 224, 3] uint8 (boxes smoothed by :func:`smooth_boxes`)."""
    sm = smooth_boxes(face_boxes)
    out = np.empty((len(sm), CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    count = 0
    for k, frame in enumerate(frames):
        if k >= len(sm):
            raise ValueError(f"more frames than the {len(sm)} face boxes")
        out[k] = crop_face(frame, *sm[k])
        count = k + 1
    if count != len(sm):
        raise ValueError(f"{count} frames for {len(sm)} face boxes")
    return out


def distance_matrix(video: torch.Tensor, audio: torch.Tensor, vshift: int = VSHIFT) -> torch.Tensor:
    """L2 distances of each video embedding to the audio embeddings around it, as the
    reference's ``calc_pdist``: video [N, D], audio [N, D] -> [N, 2·vshift + 1], entry (i, j)
    = ‖video_i − audio_{i+j−vshift} + 1e-6‖₂ with audio = 0 outside 0..N−1."""
    n = video.shape[0]
    padded = F.pad(audio.float(), (0, 0, vshift, vshift))
    idx = torch.arange(n)[:, None] + torch.arange(2 * vshift + 1)[None]
    return F.pairwise_distance(video.float()[:, None, :].expand(-1, 2 * vshift + 1, -1), padded[idx])


def lse_scores(dists: torch.Tensor) -> dict[str, float]:
    """LSE-D and LSE-C from a distance matrix [N, K] (K = 2·vshift + 1 offsets, odd).

    Returns:
        {"lse_d": min over offsets of the mean distance over windows, "lse_c": the median
        over offsets of that mean minus its min, "syncnet_offset": vshift − argmin (frames)}.
    """
    mean = dists.mean(0).double()
    lo, arg = torch.min(mean, 0)
    return {"lse_d": float(lo), "lse_c": float(torch.median(mean) - lo),
            "syncnet_offset": int((dists.shape[1] - 1) // 2 - int(arg))}
