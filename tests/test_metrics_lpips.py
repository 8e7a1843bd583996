"""LPIPS from a user's safetensors file: identity, symmetry, monotonic in noise, equal to an
independent float64 per-image computation with torch.nn layers, and clear errors for bad files."""

from __future__ import annotations

import pathlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from gstalk.errors import InputError
from gstalk.metrics.lpips import LPIPS, SCALE, SHIFT, expected_shapes


def random_weights(net: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """He-initialised backbone, non-negative lin weights (as trained LPIPS has)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in expected_shapes(net).items():
        if k.startswith("lin"):
            out[k] = torch.rand(shape, generator=g) * 0.1
        elif k.endswith("bias"):
            out[k] = 0.01 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            out[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return out


@pytest.fixture(scope="module")
def alex_file(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    p = tmp_path_factory.mktemp("lpips") / "alex.safetensors"
    save_file(random_weights("alex"), str(p))
    return p


def images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images: random low-resolution colours upsampled, plus a little texture
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.05 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def reference_alex(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """LPIPS of one image pair [3, H, W] in float64 with torch.nn layers laid out as
    torchvision's alexnet.features, taps after each ReLU, written out step by step."""
    layers = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 11, 4, 2), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2),
        torch.nn.Conv2d(64, 192, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2),
        torch.nn.Conv2d(192, 384, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(384, 256, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(256, 256, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2)).double()
    layers.load_state_dict({k.removeprefix("features."): v.double() for k, v in w.items() if k.startswith("features")})
    taps = (1, 4, 7, 9, 11)
    # the lpips package's ScalingLayer constants, written out (not imported) so a typo shows
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(3, 1, 1)

    def feats(img: torch.Tensor) -> list[torch.Tensor]:
        h = ((img.double() * 2 - 1 - shift) / scale)[None]
        out = []
        for i, layer in enumerate(layers[:12]):  # the last maxpool is not used
            h = layer(h)
            if i in taps:
                out.append(h[0])
        return out

    total = 0.0
    with torch.no_grad():
        fx, fy = feats(x), feats(y)
    for level, (a, b) in enumerate(zip(fx, fy)):
        na = a / (a.pow(2).sum(0).sqrt() + 1e-10)
        nb = b / (b.pow(2).sum(0).sqrt() + 1e-10)
        lin = w[f"lin{level}.model.1.weight"].double().view(-1)
        per_pixel = ((na - nb) ** 2 * lin.view(-1, 1, 1)).sum(0)
        total += float(per_pixel.mean())
    return total


def test_identity_symmetry_and_noise_monotonic(alex_file):
    m = LPIPS.load(alex_file)
    assert m.net == "alex"
    x = images(2, 64, 0)
    assert torch.equal(m(x, x), torch.zeros(2))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    d = [m(x, (x + s * noise).clamp(0, 1)) for s in (0.01, 0.05, 0.2)]
    assert all((d[i] > 0).all() for i in range(3))
    assert all((d[i] < d[i + 1]).all() for i in range(2)), d
    y = images(2, 64, 2)
    torch.testing.assert_close(m(x, y), m(y, x))
    # channels-last helper and batching give the same numbers
    torch.testing.assert_close(m.images(x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1)), m(x, y))
    torch.testing.assert_close(m(x, y, batch=1), m(x, y))


def test_matches_an_independent_float64_computation(alex_file):
    from safetensors.torch import load_file

    w = load_file(str(alex_file))
    m = LPIPS.load(alex_file)
    x, y = images(2, 48, 3), images(2, 48, 4)
    got = m(x, y)
    want = torch.tensor([reference_alex(w, x[i], y[i]) for i in range(2)], dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_lpips_package_state_dict_names_are_accepted(alex_file, tmp_path):
    """``lpips.LPIPS(net='alex').state_dict()`` names (net.sliceS.N.*, scaling_layer.*)."""
    from safetensors.torch import load_file

    w = load_file(str(alex_file))
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    renamed = {}
    for k, v in w.items():
        if k.startswith("features."):
            i = int(k.split(".")[1])
            renamed[f"net.slice{slices[i]}.{i}.{k.split('.')[2]}"] = v
        else:
            renamed[k] = v
    renamed["scaling_layer.shift"] = torch.tensor(SHIFT)[None, :, None, None]
    renamed["scaling_layer.scale"] = torch.tensor(SCALE)[None, :, None, None]
    p = tmp_path / "lpips_state_dict.safetensors"
    save_file(renamed, str(p))
    x, y = images(1, 40, 5), images(1, 40, 6)
    torch.testing.assert_close(LPIPS.load(p)(x, y), LPIPS.load(alex_file)(x, y))
    renamed["scaling_layer.scale"] = torch.ones(1, 3, 1, 1)
    save_file(renamed, str(p))
    with pytest.raises(InputError, match="scaling_layer.scale"):
        LPIPS.load(p)


def test_vgg16_backbone(tmp_path):
    p = tmp_path / "vgg.safetensors"
    save_file(random_weights("vgg16", 7), str(p))
    m = LPIPS.load(p)
    assert m.net == "vgg16"
    x, y = images(1, 32, 8), images(1, 32, 9)
    assert m(x, x).item() == 0.0 and m(x, y).item() > 0
    with pytest.raises(ValueError, match="at least 16 px"):
        m(x[:, :, :8, :8], y[:, :, :8, :8])


def test_bad_files_raise_input_errors_naming_file_and_key(alex_file, tmp_path):
    with pytest.raises(InputError, match="does not exist") as e:
        LPIPS.load(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(e.value) and "docs/methods.md" in str(e.value)

    # a pickle is refused without being unpickled: loading this one would create `marker`
    marker = tmp_path / "unpickled"
    evil = tmp_path / "alex.pth"

    class Payload:
        def __reduce__(self):  # noqa: D105
            return (pathlib.Path.touch, (marker,))

    evil.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(InputError, match="not a safetensors file") as e:
        LPIPS.load(evil)
    assert "alex.pth" in str(e.value) and not marker.exists()

    from safetensors.torch import load_file

    w = load_file(str(alex_file))
    bad = dict(w)
    del bad["lin3.model.1.weight"]
    p = tmp_path / "missing.safetensors"
    save_file(bad, str(p))
    with pytest.raises(InputError, match=r"missing\.safetensors lacks the key\(s\) 'lin3\.model\.1\.weight'"):
        LPIPS.load(p)

    bad = dict(w)
    bad["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    save_file(bad, str(p))
    with pytest.raises(InputError, match=r"'features\.3\.weight' has shape \[192, 64, 3, 3\], expected "
                                         r"\[192, 64, 5, 5\]"):
        LPIPS.load(p)

    bad = dict(w)
    bad["lin0.model.1.weight"] = -bad["lin0.model.1.weight"]
    save_file(bad, str(p))
    with pytest.raises(InputError, match="negative"):
        LPIPS.load(p)

    m = LPIPS.load(alex_file)
    with pytest.raises(ValueError, match="at least 31 px"):
        m(torch.zeros(1, 3, 20, 20), torch.zeros(1, 3, 20, 20))


def test_loss_is_differentiable_and_equals_the_metric(alex_file):
    m = LPIPS.load(alex_file)
    x, y = images(2, 40, 3), images(2, 40, 4)
    pred = x.permute(0, 2, 3, 1).clone().requires_grad_(True)
    loss = m.loss(pred, y.permute(0, 2, 3, 1))
    torch.testing.assert_close(loss.detach(), m(x, y).mean(), rtol=1e-5, atol=1e-7)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # a step against the gradient lowers it
    with torch.no_grad():
        lower = m.loss(pred - 0.05 * pred.grad / pred.grad.abs().max(), y.permute(0, 2, 3, 1))
    assert lower < loss


def test_fine_stage_trains_with_an_lpips_term_and_refuses_a_bad_file(trained_ws, tmp_path, alex_file):
    import dataclasses
    import json
    import shutil

    from gstalk.config import get_preset
    from gstalk.stages.fine import run_fine

    ws = tmp_path / "ws"
    shutil.copytree(trained_ws, ws)
    cfg = dataclasses.replace(get_preset("test").fine, iterations=3, log_every=1, torso=False, densify_until=0,
                              articulation_steps=10, lpips_weights=str(alex_file))
    run_fine(str(ws), cfg)
    hist = json.loads((ws / "fine" / "summary.json").read_text())["history"]
    assert len(hist) == 3 and all(h["lpips"] > 0 for h in hist)
    bad = dataclasses.replace(cfg, lpips_weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(InputError, match="nope.safetensors"):
        run_fine(str(ws), bad)
