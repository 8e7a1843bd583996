"""An ensemble of articulation regressors run as one network, for inference.

:class:`~gstalk.deform.articulation.ArticulationEnsemble` averages ``M`` independently
trained :class:`~gstalk.deform.articulation.ArticulationRegressor` s. Run member by member, a
live frame costs ``M`` × ~25 small tensor operations (AudioNet's four convolutions and head,
AudioAttNet's four convolutions and attention, the output layer), and at these sizes each
operation's fixed cost dominates. :class:`FusedEnsemble` stacks the members' weights so
that each layer runs once for all members: the first convolution (shared input) with ``M ×``
the output channels, the others as grouped convolutions (``groups=M``), the linear layers as
batched matrix products. The result equals the members' mean up to float rounding (a
different summation order). A live frame of the ``test`` preset's avatar (the shipped
5-member prior) took 19.4 ms member by member and 12.7 ms fused on 2 threads; obama's 30.5
and 24.3 ms (docs/serve.md).

It is a snapshot of the weights taken when it is built: :meth:`ArticulationEnsemble.infer`
rebuilds it whenever a parameter has changed since (an optimiser step, ``load_state_dict``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from gstalk.deform.articulation import ArticulationEnsemble

def _convs(seq: nn.Sequential) -> list[nn.Conv1d]:
    return [m for m in seq if isinstance(m, nn.Conv1d)]


def _slope(seq: nn.Sequential) -> float:
    """The negative slope of the LeakyReLU layers in ``seq`` (one value for all of them).

    Raises:
        ValueError: ``seq`` has no LeakyReLU, or several slopes."""
    slopes = {float(m.negative_slope) for m in seq if isinstance(m, nn.LeakyReLU)}
    if len(slopes) != 1:
        raise ValueError(f"expected one LeakyReLU slope, found {sorted(slopes)}")
    return slopes.pop()


def _stack_convs(layers: list[list[nn.Conv1d]]) -> list[tuple[torch.Tensor, torch.Tensor, int, int]]:
    """Per layer: (weight [M·out, in, k], bias [M·out], stride, padding), members concatenated
    along the output channels."""
    out = []
    for convs in zip(*layers):
        c0 = convs[0]
        w = torch.cat([c.weight.detach() for c in convs])
        b = torch.cat([c.bias.detach() for c in convs])
        out.append((w, b, int(c0.stride[0]), int(c0.padding[0])))
    return out


def _stack_linear(layers: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """Members' linear layers -> (weight [M, out, in], bias [M, 1, out])."""
    return (torch.stack([lin.weight.detach() for lin in layers]),
            torch.stack([lin.bias.detach() for lin in layers])[:, None])


class FusedEnsemble:
    """The members of an :class:`~gstalk.deform.articulation.ArticulationEnsemble` stacked
    into one network (inference only, no gradients).

    Args:
        ensemble: the ensemble; its members must share one architecture (they do: one
            constructor builds them all).

    Call with windows [B, K, W, C] float32 (K = the ensemble's ``smooth``, W its window, C
    its audio features per step) -> [B, D] float32, the mean of the members' outputs
    (standardised articulation units, as :meth:`ArticulationEnsemble.forward`).

    Raises:
        ValueError: windows of another shape (when called).
    """

    def __init__(self, ensemble: ArticulationEnsemble):
        members = list(ensemble.members)
        self.m = len(members)
        enc = [r.encoder for r in members]
        self.window, self.in_dim = enc[0].net.window, enc[0].net.in_dim
        self.conv = _stack_convs([_convs(e.net.conv) for e in enc])
        self.slope, self.head_slope = _slope(enc[0].net.conv), _slope(enc[0].net.head)  # members share them
        heads = [[lin for lin in e.net.head if isinstance(lin, nn.Linear)] for e in enc]
        self.head = [_stack_linear([h[j] for h in heads]) for j in range(len(heads[0]))]
        self.att = None
        if enc[0].att is not None:
            self.att = (_stack_convs([_convs(e.att.conv) for e in enc]), _stack_linear([e.att.att for e in enc]),
                        _slope(enc[0].att.conv))
        self.out = _stack_linear([r.out for r in members])

    @staticmethod
    def _linear(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [M, N, in] -> [M, N, out], each member its own layer."""
        w, b = wb
        return torch.baddbmm(b, x, w.transpose(1, 2))

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        if windows.dim() != 4 or windows.shape[2:] != (self.window, self.in_dim):
            raise ValueError(f"the articulation ensemble expects [B, K, {self.window}, {self.in_dim}] windows, "
                             f"got {list(windows.shape)}")
        b, k, w, c = windows.shape
        m = self.m
        with torch.no_grad():
            # AudioNet per window: the first convolution reads the shared input, the rest are grouped
            h = windows.reshape(b * k, w, c).transpose(1, 2)
            for j, (wt, bias, stride, pad) in enumerate(self.conv):
                h = F.leaky_relu(F.conv1d(h, wt, bias, stride, pad, groups=1 if j == 0 else m), self.slope)
            h = h.reshape(b * k, m, -1).transpose(0, 1)  # [M, B·K, out·L]: each member's flatten(1)
            h = F.leaky_relu(self._linear(h, self.head[0]), self.head_slope)
            codes = self._linear(h, self.head[1])  # [M, B·K, dim]
            dim = codes.shape[-1]
            codes = codes.reshape(m, b, k, dim)
            if self.att is None:
                z = codes[:, :, k // 2]  # [M, B, dim]
            else:
                convs, att, slope = self.att
                a = codes.permute(1, 0, 3, 2).reshape(b, m * dim, k)  # [B, M·dim, K], member-major
                for wt, bias, stride, pad in convs:
                    a = F.leaky_relu(F.conv1d(a, wt, bias, stride, pad, groups=m), slope)
                a = self._linear(a.transpose(0, 1), att)  # [M, B, K]
                a = torch.softmax(a, dim=-1)
                z = (a[..., None] * codes).sum(2)  # [M, B, dim]
            return self._linear(z, self.out).mean(0)
