"""The per-Gaussian linear articulation basis: a mouth code moves the Gaussians linearly.

The coarse stage fits it beside the static head (``coarse/articulation_basis.safetensors``,
:class:`gstalk.train.coarse.CoarseTrainer`); with ``FineConfig.articulation_basis = "coarse"``
(the default) the fine stage carries it, frozen, as the linear term of the mouth's motion,
and the deformation field learns what is left. It then travels with the canonical Gaussians
as two more per-Gaussian tensors, :data:`BASIS_KEYS` of ``params`` (``fine/model.safetensors``
``params.basis_means`` / ``params.basis_sh0``), so densification, bundles and every renderer
carry it with them. gstalk's addition to the papers (docs/methods.md, "The articulation
basis in the fine model").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# the basis's tensors among the canonical Gaussians' (``params``), [G, D, 3] float32 each:
# metres, and SH DC colour, per standard deviation of each code dimension
BASIS_KEYS = ("basis_means", "basis_sh0")


def articulated(params: Mapping[str, torch.Tensor], basis: Mapping[str, torch.Tensor],
                code: torch.Tensor, region: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The Gaussians with a mouth code applied through a linear basis:
    ``means + Σ_d code_d · basis.means[:, d]`` and ``sh0[:, 0] + Σ_d code_d · basis.sh0[:, d]``
    for the Gaussians in ``region`` ([N] bool; None: all), the other tensors unchanged
    (differentiable in ``params``, ``basis`` and ``code``). A linear blendshape model of the
    mouth, as a 3DMM's expression basis, learnt per Gaussian: gstalk's addition to the
    papers' static initialisation (GSTalker Sec. 3.3), docs/methods.md.

    Args:
        params: raw Gaussian parameters (means [N, 3] metres in canonical space, sh0 [N, 1, 3]).
        basis: ``means`` and ``sh0``, [N, D, 3] float32 each (metres / SH DC per standard
            deviation of each code dimension).
        code: [D] float32 standardised mouth articulation code
            (:func:`~gstalk.deform.articulation.articulation_features`, z-scored over the
            training frames); 0 = the clip's average mouth, where the result equals ``params``.
        region: [N] bool, the Gaussians the basis may move, or None (all).

    Returns:
        A new dict: ``params``' tensors with ``means`` and ``sh0`` replaced.
    """
    # [D] @ [N, D, 3] -> [N, 3]: a batched vector-matrix product, 3x faster than the einsum
    d_means = torch.matmul(code, basis["means"])
    d_sh0 = torch.matmul(code, basis["sh0"])
    if region is not None:
        w = region.to(d_means.dtype)[:, None]
        d_means, d_sh0 = w * d_means, w * d_sh0
    out = dict(params.items())
    out["means"] = params["means"] + d_means
    out["sh0"] = params["sh0"] + d_sh0[:, None]
    return out


def stored_basis(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The basis carried among ``params`` (:data:`BASIS_KEYS`) as ``{"means", "sh0"}`` [G, D, 3],
    or None when the Gaussians carry none (a model trained without it, or before it existed)."""
    if BASIS_KEYS[0] not in params:
        return None
    return {"means": params["basis_means"], "sh0": params["basis_sh0"]}


def frame_code(windows: torch.Tensor) -> torch.Tensor:
    """The articulation code of the frame a set of condition windows belongs to: windows
    [1, K, W, D] of articulation codes (each code repeated over the W steps,
    :meth:`~gstalk.deform.base.DeformationModel.code_windows`; the frame is the middle one,
    K // 2, :func:`~gstalk.deform.audio.neighbour_indices`) -> [D]."""
    return windows[0, windows.shape[1] // 2, 0]


def check_basis(basis: Mapping[str, torch.Tensor], n_gaussians: int, code_dim: int) -> str | None:
    """Why a coarse basis cannot drive these Gaussians, or None when it can: both tensors
    present, [n_gaussians, code_dim, 3] and finite."""
    for k in ("means", "sh0"):
        t = basis.get(k)
        if t is None:
            return f"it has no '{k}' tensor"
        if tuple(t.shape) != (n_gaussians, code_dim, 3):
            return f"its '{k}' is {list(t.shape)}, not [{n_gaussians}, {code_dim}, 3]"
        if not bool(torch.isfinite(t).all()):
            return f"its '{k}' holds NaN or Inf"
    return None
