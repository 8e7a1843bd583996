"""Adaptive density control: clone, split and prune Gaussians during training.

Implements 3DGS's strategy (Kerbl et al. 2023, Sec. 5.2): Gaussians whose mean view-space
positional gradient exceeds a threshold are cloned (if small) or split in two smaller ones
sampled from the Gaussian (if large); Gaussians with low opacity or an excessive size are
pruned; opacities are periodically reset. GSTalker uses it to gather Gaussians where the
face moves (eyes, mouth), in the coarse and in the fine stage.

The strategy is a dataclass of hyper-parameters; its state is a plain dict made by
:meth:`Densifier.initialize_state`, and the training loop calls
:meth:`Densifier.step_pre_backward` / :meth:`Densifier.step_post_backward` around
``loss.backward()``. Parameters and their Adam moments are edited together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gstalk.config import DensifyConfig
from gstalk.device import randn


def _edit(params: torch.nn.ParameterDict, optimizers: dict[str, torch.optim.Optimizer],
          param_fn: Callable[[str, torch.Tensor], torch.Tensor],
          state_fn: Callable[[str, torch.Tensor], torch.Tensor], names: tuple[str, ...] | None = None) -> None:
    """Replace each parameter ``p`` by ``param_fn(name, p)`` and each of its optimizer state
    tensors ``v`` (Adam moments) by ``state_fn(key, v)``, keeping the optimizer consistent."""
    for name in names or tuple(params.keys()):
        old = params[name]
        new = torch.nn.Parameter(param_fn(name, old.data), requires_grad=old.requires_grad)
        opt = optimizers.get(name)
        if opt is not None:
            for group in opt.param_groups:
                for i, p in enumerate(group["params"]):
                    if p is old:
                        st = opt.state.pop(p, {})
                        for k, v in list(st.items()):
                            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == old.shape[0]:
                                st[k] = state_fn(k, v)
                        group["params"][i] = new
                        opt.state[new] = st
        params[name] = new


def _quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    q = torch.nn.functional.normalize(q, dim=-1)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(q.shape[:-1] + (3, 3))


@dataclass
class Densifier:
    """3DGS adaptive density control.

    Args:
        cfg: thresholds and schedule (:class:`~gstalk.config.DensifyConfig`).
        scene_scale: extent of the scene in metres (the head's radius); ``percent_dense``
            and the size limits are relative to it.
    """

    cfg: DensifyConfig
    scene_scale: float

    def initialize_state(self, n: int, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Plain-dict state on ``device`` (the Gaussians'): accumulated gradient norms [n],
        visibility counts [n], max 2D radii [n] (fraction of the image), float32."""
        return {"grad2d": torch.zeros(n, device=device), "count": torch.zeros(n, device=device),
                "radii": torch.zeros(n, device=device)}

    def step_pre_backward(self, meta: dict[str, Any]) -> None:
        """Keep the gradient of ``meta['means2d']`` (called before ``loss.backward()``)."""
        m2d = meta["means2d"]
        if m2d.requires_grad:
            m2d.retain_grad()

    def step_post_backward(self, params: torch.nn.ParameterDict, optimizers: dict[str, torch.optim.Optimizer],
                           state: dict[str, Any], step: int, meta: dict[str, Any], width: int, height: int,
                           extra_params: tuple[tuple[torch.nn.ParameterDict, dict[str, torch.optim.Optimizer]],
                                               ...] = ()
                           ) -> dict[str, int]:
        """Accumulate statistics and, on refine steps, clone/split/prune/reset.

        Args:
            meta: the rasterizer's meta of this step (``means2d`` with its gradient, ``radii``).
            width, height: image size in pixels (gradients are measured in NDC units, x W/2, H/2).
            extra_params: other per-Gaussian parameter dicts (with optimizers) that must be
                edited in step (e.g. per-Gaussian features of a deformation model).

        Returns:
            Counts of what changed this step (cloned, split, pruned), empty when nothing ran.
        """
        c = self.cfg
        if step >= c.stop:
            return {}
        m2d = meta["means2d"]
        if m2d.grad is None:
            return {}
        grads = m2d.grad.detach().clone()  # [B, N, 2]
        grads[..., 0] *= width / 2.0
        grads[..., 1] *= height / 2.0
        radii = meta["radii"]  # [B, N]
        for b in range(grads.shape[0]):
            sel = radii[b] > 0
            state["grad2d"][sel] += grads[b][sel].norm(dim=-1)
            state["count"][sel] += 1
            state["radii"][sel] = torch.maximum(state["radii"][sel], radii[b][sel].float() / max(width, height))
        out: dict[str, int] = {}
        if step > c.start and step % c.every == 0:
            out.update(self._grow(params, optimizers, state, extra_params))
            out.update(self._prune(params, optimizers, state, step, extra_params))
            n = params["means"].shape[0]
            state.update(self.initialize_state(n, params["means"].device))
        if c.reset_opacity_every > 0 and step > 0 and step % c.reset_opacity_every == 0:
            self._reset_opacity(params, optimizers)
            out["reset"] = 1
        return out

    # ------------------------------------------------------------------ operations
    def _all(self, params, optimizers, extra_params):  # type: ignore[no-untyped-def]
        return ((params, optimizers),) + tuple(extra_params)

    def _grow(self, params, optimizers, state, extra_params):  # type: ignore[no-untyped-def]
        c = self.cfg
        n = params["means"].shape[0]
        avg = state["grad2d"] / state["count"].clamp_min(1)
        high = avg > c.grad_threshold
        big = torch.exp(params["scales"].detach()).max(dim=-1).values > c.percent_dense * self.scene_scale
        room = max(0, c.max_gaussians - n)
        clone = high & ~big
        split = high & big
        # keep within the budget: the highest gradients first
        n_new = int(clone.sum() + split.sum())
        if n_new > room:
            score = torch.where(high, avg, torch.zeros_like(avg))
            keep = torch.zeros_like(high)
            if room > 0:
                keep[score.topk(room).indices] = True
            clone &= keep
            split &= keep
        n_clone, n_split = int(clone.sum()), int(split.sum())
        if n_clone:
            idx = clone.nonzero().squeeze(1)
            for p, o in self._all(params, optimizers, extra_params):
                _edit(p, o, lambda k, t: torch.cat([t, t[idx]]), lambda k, v: torch.cat([v, torch.zeros_like(v[idx])]))
            for k in ("grad2d", "count", "radii"):
                state[k] = torch.cat([state[k], state[k][idx]])
        if n_split:
            split_full = torch.cat([split, torch.zeros(params["means"].shape[0] - n, dtype=torch.bool,
                                                       device=split.device)])
            idx = split_full.nonzero().squeeze(1)
            scales = torch.exp(params["scales"].detach()[idx])
            rot = _quat_to_rotmat(params["quats"].detach()[idx])
            # drawn from the CPU generator on every device (gstalk.device.randn)
            samples = torch.einsum("nij,bnj->bni", rot, randn(2, len(idx), 3, device=scales.device) * scales)
            new_means = (params["means"].detach()[idx][None] + samples).reshape(-1, 3)
            new_scales = torch.log(scales / 1.6).repeat(2, 1)

            def repeat2(t: torch.Tensor) -> torch.Tensor:
                return t[idx].repeat((2,) + (1,) * (t.dim() - 1))

            def pfn_main(k: str, t: torch.Tensor) -> torch.Tensor:
                add = {"means": new_means, "scales": new_scales}.get(k)
                return torch.cat([t[~split_full], repeat2(t) if add is None else add])

            def pfn_extra(k: str, t: torch.Tensor) -> torch.Tensor:
                return torch.cat([t[~split_full], repeat2(t)])

            def sfn(k: str, v: torch.Tensor) -> torch.Tensor:
                return torch.cat([v[~split_full], torch.zeros((2 * len(idx),) + v.shape[1:], dtype=v.dtype,
                                                              device=v.device)])

            _edit(params, optimizers, pfn_main, sfn)
            for p, o in extra_params:
                _edit(p, o, pfn_extra, sfn)
            for k in ("grad2d", "count", "radii"):
                state[k] = torch.cat([state[k][~split_full], state[k][idx].repeat(2)])
        return {"cloned": n_clone, "split": n_split}

    def _prune(self, params, optimizers, state, step, extra_params):  # type: ignore[no-untyped-def]
        c = self.cfg
        opac = torch.sigmoid(params["opacities"].detach())
        prune = opac < c.prune_opacity
        if c.reset_opacity_every > 0 and step > c.reset_opacity_every:
            too_big = torch.exp(params["scales"].detach()).max(dim=-1).values > 0.5 * self.scene_scale
            prune |= too_big | (state["radii"] > c.max_screen_fraction)
        if params["means"].shape[0] - int(prune.sum()) < 1:
            return {"pruned": 0}
        n_prune = int(prune.sum())
        if n_prune:
            keep = ~prune
            for p, o in self._all(params, optimizers, extra_params):
                _edit(p, o, lambda k, t: t[keep], lambda k, v: v[keep])
            for k in ("grad2d", "count", "radii"):
                state[k] = state[k][keep]
        return {"pruned": n_prune}

    def _reset_opacity(self, params, optimizers):  # type: ignore[no-untyped-def]
        cap = 2.0 * self.cfg.prune_opacity
        logit_cap = math.log(cap / (1 - cap))

        def pfn(k: str, t: torch.Tensor) -> torch.Tensor:
            return torch.clamp_max(t, logit_cap)

        _edit(params, optimizers, pfn, lambda k, v: torch.zeros_like(v), names=("opacities",))
