"""Multi-resolution hash-grid encoding: a readable PyTorch reference and a C++ CPU kernel.

Instant-NGP (Müller et al. 2022, Sec. 3): level ``l`` has resolution
``N_l = floor(N_min · b^l)``, ``b = exp((ln N_max - ln N_min) / (L - 1))``; a level whose
``(N_l + 1)^d`` vertices fit in the table (``T`` rows) is indexed densely, otherwise vertex
``v`` goes to row ``(⊕_k v_k π_k) mod T`` with ``π = (1, 2654435761, 805459861)`` (uint32
arithmetic, ``T`` a power of two); corner features are interpolated (bi/tri-linearly) and
the levels concatenated. Tables start uniform in ±1e-4, as in tiny-cuda-nn.

On CPU the lookup runs in ``csrc/hashgrid_cpu.cpp`` (OpenMP, deterministic backward; about
20x faster than the vectorised torch version, whose integer index arithmetic dominates);
on CUDA, or when no compiler is available, the torch path runs. Gradients flow to the
tables only: the input coordinates are treated as constants (the canonical positions of
the Gaussians receive their gradients through the deformed means instead).
"""

from __future__ import annotations

import ctypes
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from gstalk.errors import DependencyError
from gstalk.native import NativeLibrary

_PRIMES = (1, 2654435761, 805459861)


def _declare(lib: ctypes.CDLL) -> None:
    i, i64, p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    args = [p, i64, i, i, i, p, p, p, i64, p, p, i]
    lib.gstalk_hashgrid_forward.argtypes = args
    lib.gstalk_hashgrid_forward.restype = i
    lib.gstalk_hashgrid_backward.argtypes = args
    lib.gstalk_hashgrid_backward.restype = i


NATIVE = NativeLibrary(name="gstalk_hashgrid_cpu", source=Path(__file__).parent / "csrc" / "hashgrid_cpu.cpp",
                       declare=_declare, description="CPU hash-grid kernel",
                       fallback_hint="gstalk falls back to the (slower) torch implementation")


class _HashGridCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, grid):  # type: ignore[no-untyped-def]
        lib = NATIVE.load()
        x = x.detach().contiguous().float()
        out = torch.empty(x.shape[0], grid.levels * grid.features, dtype=torch.float32)
        rc = lib.gstalk_hashgrid_forward(x.data_ptr(), x.shape[0], grid.dim, grid.levels, grid.features,
                                         grid._res_i32.data_ptr(), grid._offsets_i64.data_ptr(),
                                         grid._dense_u8.data_ptr(), grid.table_size,
                                         table.detach().contiguous().data_ptr(),
                                         out.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"hash-grid kernel failed ({rc})")
        ctx.save_for_backward(x)
        ctx.grid = grid
        ctx.table_shape = table.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        grid = ctx.grid
        grad_table = torch.zeros(ctx.table_shape, dtype=torch.float32)
        g = grad_out.contiguous().float()
        NATIVE.load().gstalk_hashgrid_backward(x.data_ptr(), x.shape[0], grid.dim, grid.levels, grid.features,
                                               grid._res_i32.data_ptr(), grid._offsets_i64.data_ptr(),
                                               grid._dense_u8.data_ptr(), grid.table_size, g.data_ptr(),
                                               grad_table.data_ptr(), torch.get_num_threads())
        return None, grad_table, None


class HashGrid(nn.Module):
    """A ``dim``-D multi-resolution hash encoding.

    Args:
        dim: input dimensions (2 for a plane, 3 for a volume).
        levels: L, number of resolutions.
        features: F, features per level.
        log2_table: log2 of the table size T per level.
        base_res: N_min, coarsest resolution.
        max_res: N_max, finest resolution.
        implementation: ``"auto"`` (C++ on CPU when it builds, else torch), ``"cpu"`` or ``"torch"``.
        init_scale: tables start uniform in ±init_scale (tiny-cuda-nn: 1e-4).

    Input: [P, dim] float32 coordinates in [0, 1] (clamped). Output: [P, L·F] float32.
    """

    def __init__(self, dim: int = 2, levels: int = 12, features: int = 2, log2_table: int = 14,
                 base_res: int = 16, max_res: int = 512, implementation: str = "auto", init_scale: float = 1e-4):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if implementation not in ("auto", "cpu", "torch"):
            raise ValueError(f"implementation must be auto, cpu or torch, got {implementation!r}")
        self.dim, self.levels, self.features = dim, levels, features
        self.implementation = implementation
        self.table_size = 2 ** log2_table
        growth = math.exp((math.log(max_res) - math.log(base_res)) / max(levels - 1, 1))
        self.resolutions = [int(math.floor(base_res * growth ** lvl)) for lvl in range(levels)]
        self.dense = [(r + 1) ** dim <= self.table_size for r in self.resolutions]
        sizes = [(r + 1) ** dim if d else self.table_size for r, d in zip(self.resolutions, self.dense)]
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.table = nn.Parameter(torch.empty(self.offsets[-1], features).uniform_(-init_scale, init_scale))
        self._res_i32 = torch.tensor(self.resolutions, dtype=torch.int32)
        self._offsets_i64 = torch.tensor(self.offsets[:-1], dtype=torch.int64)
        self._dense_u8 = torch.tensor(self.dense, dtype=torch.uint8)
        corners = torch.tensor([[(c >> k) & 1 for k in range(dim)] for c in range(2 ** dim)], dtype=torch.long)
        self.register_buffer("corners", corners, persistent=False)  # [2^d, d]

    @property
    def out_dim(self) -> int:
        return self.levels * self.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.implementation != "torch":
            try:
                NATIVE.load()
                return _HashGridCPU.apply(x, self.table, self)
            except DependencyError as exc:
                if self.implementation == "cpu":
                    raise
                warnings.warn(f"{exc} Using the torch hash grid.", stacklevel=2)
                self.implementation = "torch"
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The readable reference: gather the corners of every level and interpolate."""
        x = x.detach().clamp(0.0, 1.0)
        outs = []
        for lvl, res in enumerate(self.resolutions):
            pos = x * res
            base = pos.floor().clamp(max=res - 1)
            frac = pos - base
            verts = base.long()[:, None, :] + self.corners[None]  # [P, 2^d, d]
            w = torch.where(self.corners[None].bool(), frac[:, None, :], 1.0 - frac[:, None, :]).prod(-1)
            if self.dense[lvl]:
                idx = verts[..., 0]
                stride = res + 1
                for k in range(1, self.dim):
                    idx = idx + verts[..., k] * stride
                    stride *= res + 1
            else:
                idx = verts[..., 0] * _PRIMES[0]
                for k in range(1, self.dim):
                    idx = torch.bitwise_xor(idx, verts[..., k] * _PRIMES[k])
                idx = idx % self.table_size
            feats = self.table[idx + self.offsets[lvl]]  # [P, 2^d, F]
            outs.append((feats * w[..., None]).sum(1))
        return torch.cat(outs, dim=-1)
