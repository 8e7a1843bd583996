"""Image metrics against known values and a library's result."""

from __future__ import annotations

import math

import pytest
import torch

from gstalk.metrics.image import crop, image_metrics, psnr, ssim


def test_psnr_known_values():
    a = torch.full((1, 16, 16, 3), 0.5)
    assert psnr(a, a).item() == math.inf or psnr(a, a).item() > 100
    b = a + 0.1  # MSE 0.01 -> 20 dB
    assert psnr(b, a).item() == pytest.approx(20.0, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    noisy = (a + 0.05 * torch.randn(a.shape, generator=g))
    mse = ((noisy - a) ** 2).mean()
    assert psnr(noisy, a).item() == pytest.approx(float(-10 * torch.log10(mse)), rel=1e-5)


def test_ssim_matches_pytorch_msssim_and_identity():
    from pytorch_msssim import ssim as ref

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 32, 40, 3, generator=g), torch.rand(2, 32, 40, 3, generator=g)
    expect = ref(x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2), data_range=1.0, size_average=False)
    torch.testing.assert_close(ssim(x, y), expect)
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[:, :8, :8], y[:, :8, :8])


def test_crop_cuts_and_resamples_boxes():
    img = torch.zeros(2, 50, 60, 1)
    img[0, 10:20, 30:40] = 1.0
    img[1, 5:25, 0:20] = 1.0
    boxes = torch.tensor([[30, 10, 40, 20], [0, 5, 20, 25]], dtype=torch.float32)
    out = crop(img, boxes, size=12)
    assert out.shape == (2, 12, 12, 1)
    torch.testing.assert_close(out, torch.ones_like(out))


def test_image_metrics_keys_and_box_sensitivity():
    g = torch.Generator().manual_seed(2)
    gt = torch.rand(3, 64, 64, 3, generator=g)
    pred = gt.clone()
    pred[:, 40:60, 20:40] = 0.0  # damage only the "mouth"
    mouth = torch.tensor([[20, 40, 40, 60]] * 3, dtype=torch.float32)
    face = torch.tensor([[0, 0, 64, 64]] * 3, dtype=torch.float32)
    m = image_metrics(pred, gt, mouth, face)
    assert set(m) == {"psnr", "ssim", "mouth_psnr", "mouth_ssim", "face_psnr", "face_ssim"}
    assert m["mouth_psnr"] < m["psnr"]
    assert m["face_psnr"] == pytest.approx(m["psnr"], abs=1e-3)
