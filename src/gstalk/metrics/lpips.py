"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", Eq. 1) in plain torch, from a weights file the user makes: no torchvision, no download.

    d(x, y) = Σ_l  1/(H_l W_l) Σ_{h,w}  ‖ w_l ⊙ ( ŷ^l_hw(x) − ŷ^l_hw(y) ) ‖²₂

where ŷ^l are the activations of backbone layer l (after its ReLU), normalised to unit
length along the channels, and w_l ≥ 0 the learned per-channel weights (the 1x1 "lin"
convolutions; ``Σ_c w_c (Δ_c)²`` is what the lpips package computes). Inputs are scaled from
[0, 1] to [−1, 1] and then by the package's ``ScalingLayer`` (shift −0.030, −0.088, −0.188;
scale 0.458, 0.448, 0.450), as in version 0.1 of the lpips package.

Backbones (``net``), with the layers tapped:

- ``alex`` (the peers' choice): torchvision's ``alexnet().features``: conv1 11x11 stride 4
  pad 2 (64), maxpool 3/2, conv2 5x5 pad 2 (192), maxpool 3/2, conv3..conv5 3x3 pad 1 (384,
  256, 256); the outputs of the 5 ReLUs. Images need at least 31 px a side.
- ``vgg16``: torchvision's ``vgg16().features`` (13 3x3 convolutions, 4 maxpools 2/2);
  relu1_2, relu2_2, relu3_3, relu4_3, relu5_3. At least 16 px a side.

Weights: one safetensors file with torchvision's key names for the backbone
(``features.N.weight`` [out, in, k, k], ``features.N.bias`` [out]; N = 0, 3, 6, 8, 10 for
alex; 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 for vgg16) and the lpips package's
names for the lin layers (``lin0.model.1.weight`` … ``lin4.model.1.weight``, each [1, C_l, 1,
1]). The names of a ``lpips.LPIPS(net=...).state_dict()`` (``net.sliceS.N.weight``,
``scaling_layer.shift``/``scale``) are accepted too, so the file can be written with
``safetensors.torch.save_file(lpips.LPIPS(net="alex").state_dict(), PATH)`` in the user's
own environment (docs/methods.md). The backbone is ``vgg16`` when ``features.28.weight`` is
present, else ``alex``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gstalk.errors import InputError
from gstalk.metrics.weights import check_shapes, read_safetensors

SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer (v0.1), on inputs in [-1, 1]
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # channel normalisation: f / (‖f‖ + EPS), as the lpips package

# ("conv", torchvision features index, in channels, out channels, kernel, stride, padding),
# ("pool", kernel, stride), ("tap",): a ReLU follows every conv; "tap" records the output
NETS: dict[str, tuple[tuple, ...]] = {
    "alex": (("conv", 0, 3, 64, 11, 4, 2), ("tap",), ("pool", 3, 2), ("conv", 3, 64, 192, 5, 1, 2), ("tap",),
             ("pool", 3, 2), ("conv", 6, 192, 384, 3, 1, 1), ("tap",), ("conv", 8, 384, 256, 3, 1, 1), ("tap",),
             ("conv", 10, 256, 256, 3, 1, 1), ("tap",)),
    "vgg16": (("conv", 0, 3, 64, 3, 1, 1), ("conv", 2, 64, 64, 3, 1, 1), ("tap",), ("pool", 2, 2),
              ("conv", 5, 64, 128, 3, 1, 1), ("conv", 7, 128, 128, 3, 1, 1), ("tap",), ("pool", 2, 2),
              ("conv", 10, 128, 256, 3, 1, 1), ("conv", 12, 256, 256, 3, 1, 1), ("conv", 14, 256, 256, 3, 1, 1),
              ("tap",), ("pool", 2, 2),
              ("conv", 17, 256, 512, 3, 1, 1), ("conv", 19, 512, 512, 3, 1, 1), ("conv", 21, 512, 512, 3, 1, 1),
              ("tap",), ("pool", 2, 2),
              ("conv", 24, 512, 512, 3, 1, 1), ("conv", 26, 512, 512, 3, 1, 1), ("conv", 28, 512, 512, 3, 1, 1),
              ("tap",)),
}
MIN_SIDE = {"alex": 31, "vgg16": 16}
HINT = ("make the file from the official LPIPS weights in your own environment: "
        "safetensors.torch.save_file(lpips.LPIPS(net='alex').state_dict(), 'lpips_alex.safetensors') "
        "(see docs/methods.md, 'LPIPS')")


def expected_shapes(net: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a complete LPIPS weights file for ``net`` ("alex" or "vgg16")."""
    out: dict[str, tuple[int, ...]] = {}
    taps, last = 0, 0
    for op in NETS[net]:
        if op[0] == "conv":
            _, i, cin, cout, k, _, _ = op
            out[f"features.{i}.weight"] = (cout, cin, k, k)
            out[f"features.{i}.bias"] = (cout,)
            last = cout
        elif op[0] == "tap":
            out[f"lin{taps}.model.1.weight"] = (1, last, 1, 1)
            taps += 1
    return out


def canonical_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the names of an ``lpips.LPIPS`` state dict onto the documented ones:
    ``net.sliceS.N.*`` -> ``features.N.*``, ``linL.model.0.weight`` (no dropout) ->
    ``linL.model.1.weight``; other names are kept."""
    out = {}
    for k, v in tensors.items():
        k2 = re.sub(r"^net\.slice\d+\.(\d+)\.", r"features.\1.", k)
        k2 = re.sub(r"^(lin\d+)\.model\.0\.weight$", r"\1.model.1.weight", k2)
        out.setdefault(k2, v)
    return out


@dataclass(frozen=True)
class LPIPS:
    """An LPIPS metric with loaded weights: ``LPIPS.load(path)(pred, target)`` -> [N].

    Attributes:
        net: "alex" or "vgg16"; weights: documented key -> float32 tensor; path: the file.
    """

    net: str
    weights: dict[str, torch.Tensor]
    path: str = ""

    @classmethod
    def load(cls, path: str | Path) -> LPIPS:
        """Read and validate a weights file (see the module docstring for its keys).

        Raises:
            InputError: missing/unreadable file, not safetensors, a missing or mis-shaped key
            (named), negative lin weights, or ScalingLayer constants that differ from v0.1.
        """
        what = "LPIPS weights"
        t = canonical_names(read_safetensors(path, what, HINT))
        net = "vgg16" if "features.28.weight" in t else "alex"
        shapes = expected_shapes(net)
        check_shapes(t, shapes, path, f"{what} ({net})", HINT)
        for name, ref in (("scaling_layer.shift", SHIFT), ("scaling_layer.scale", SCALE)):
            if name in t and not torch.allclose(t[name].flatten().float(), torch.tensor(ref), atol=1e-6):
                raise InputError(f"{what}: {path}: '{name}' is {t[name].flatten().tolist()}, not the LPIPS v0.1 "
                                 f"constants {list(ref)}.", hint=HINT, path=path)
        for k in shapes:
            if k.startswith("lin") and bool((t[k] < 0).any()):
                raise InputError(f"{what}: {path}: '{k}' has negative entries (LPIPS lin weights are >= 0).",
                                 hint=HINT, path=path)
        return cls(net, {k: t[k].float().contiguous() for k in shapes}, str(path))

    def to(self, device: str | torch.device) -> LPIPS:
        """The same metric with its weights on ``device``."""
        return LPIPS(self.net, {k: v.to(device) for k, v in self.weights.items()}, self.path)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone activations of scaled inputs [N, 3, H, W]: one [N, C_l, H_l, W_l] per tap."""
        return backbone(self.net, self.weights, x)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """LPIPS per image pair: [N, 3, H, W] x2 in [0, 1] -> [N] float32 (0 for identical
        images; larger = more different).

        Raises:
            ValueError: shapes differ, not 3 channels, or images smaller than the backbone allows.
        """
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(f"LPIPS expects two [N, 3, H, W] batches of one shape, got {tuple(pred.shape)} "
                             f"and {tuple(target.shape)}")
        if min(pred.shape[2:]) < MIN_SIDE[self.net]:
            raise ValueError(f"LPIPS ({self.net}) needs images of at least {MIN_SIDE[self.net]} px a side, "
                             f"got {pred.shape[3]}x{pred.shape[2]}")
        dev = next(iter(self.weights.values())).device
        out = []
        with torch.no_grad():
            for s in range(0, pred.shape[0], batch):
                x = scale_input(pred[s:s + batch].to(dev, torch.float32))
                y = scale_input(target[s:s + batch].to(dev, torch.float32))
                feats = self.features(torch.cat([x, y]))
                n = x.shape[0]
                lins = [self.weights[f"lin{i}.model.1.weight"] for i in range(len(feats))]
                out.append(distance([f[:n] for f in feats], [f[n:] for f in feats], lins).cpu())
        return torch.cat(out)

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Differentiable mean LPIPS of channels-last images [B, H, W, 3] x2 in [0, 1]: a
        scalar with gradients to ``pred`` (the fine stage's optional perceptual loss; the
        weights stay fixed)."""
        x = scale_input(pred.permute(0, 3, 1, 2))
        y = scale_input(target.permute(0, 3, 1, 2))
        feats = self.features(torch.cat([x, y]))
        n = x.shape[0]
        lins = [self.weights[f"lin{i}.model.1.weight"] for i in range(len(feats))]
        return distance([f[:n] for f in feats], [f[n:] for f in feats], lins).mean()

    def images(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS of channels-last frames: [F, H, W, 3] x2 in [0, 1] -> [F]."""
        return self(pred.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2))


def scale_input(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [−1, 1] -> the ScalingLayer: (x − shift) / scale, per channel."""
    shift = torch.tensor(SHIFT, dtype=x.dtype, device=x.device)[None, :, None, None]
    scale = torch.tensor(SCALE, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (2.0 * x - 1.0 - shift) / scale


def backbone(net: str, weights: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """Run the backbone ``net`` (see :data:`NETS`) on [N, 3, H, W]; returns the tapped ReLU
    outputs, one [N, C_l, H_l, W_l] per layer."""
    taps = []
    for op in NETS[net]:
        if op[0] == "conv":
            _, i, _, _, _, stride, pad = op
            w = weights[f"features.{i}.weight"]
            x = F.relu(F.conv2d(x, w.to(x.dtype), weights[f"features.{i}.bias"].to(x.dtype), stride=stride,
                                padding=pad))
        elif op[0] == "pool":
            x = F.max_pool2d(x, kernel_size=op[1], stride=op[2])
        else:
            taps.append(x)
    return taps


def normalize_channels(f: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Unit length along the channels: [N, C, H, W] / (‖·‖₂ over C + eps)."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


def distance(fx: list[torch.Tensor], fy: list[torch.Tensor], lins: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 1 on backbone features: Σ_l mean_{h,w} Σ_c w_lc (x̂_lchw − ŷ_lchw)² -> [N].

    Args:
        fx, fy: per layer [N, C_l, H_l, W_l]; lins: per layer [1, C_l, 1, 1] (the 1x1 convs).
    """
    total = torch.zeros(fx[0].shape[0], dtype=fx[0].dtype, device=fx[0].device)
    for a, b, w in zip(fx, fy, lins):
        d = (normalize_channels(a) - normalize_channels(b)).pow(2)
        total = total + F.conv2d(d, w.to(d.dtype)).mean(dim=(1, 2, 3))
    return total
