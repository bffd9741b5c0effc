"""Block-diagonal Kronecker factors, for layers too wide for full ones (Grosse et al. 2023).

Index letters: D the width of one side of a layer (I = d_in + 1 or O = d_out), B the block size,
K = ceil(D / B) blocks, R rows (tokens of a batch).

A covariance side ``A = sum_r x_r x_r^T / rows`` of width D costs D^2 numbers; a 50257-wide
language-model head's output side alone is 2.5e9 numbers (10 GB in float32). Approximated by
its K diagonal blocks of width B (the cross-block terms left out) it costs K B^2 = D B numbers,
and its eigenbasis is block-diagonal too: ``Q = diag(Q_1, ..., Q_K)``. The last block may be
narrower than B (``D = (K - 1) B + r``); it is stored padded to B with the identity on the
padding, so that padded coordinates never mix with real ones.

Everything here works on "rows" ``x [..., D]``: ``x Q`` (into the eigenbasis) and ``x Q^T``
(back). A basis is a dense ``Tensor [D, D]`` or a :class:`BlockDiagonal`; :func:`rows_times`
and :func:`rows_times_t` take either.

On the CPU, a dense basis whose width D is not a multiple of :data:`ROW_ALIGNMENT` (the bias
column makes it odd: ``d_in + 1`` = 257, 769, 3073) multiplies many rows as a zero-padded copy
``Q [D, D + p]``: BLAS runs ``x [R, D] Q_padded`` up to 1.25x faster than ``x Q``, and
:func:`rows_times` returns the first D columns, a view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BlockDiagonal", "block_count", "blocked_shape", "add_blocked_outer", "rows_times",
           "rows_times_t", "basis_numel", "padded_width", "ROW_ALIGNMENT"]

ROW_ALIGNMENT = 16
"""On the CPU, dense bases are padded to a multiple of this many columns for :func:`rows_times`
(measured, ``x [1024, 3073] @ Q`` on 1 / 2 CPU threads: 266 -> 215 ms / 136 -> 112 ms with the
copy; ``x [4096, 257]`` on 1 thread: 10.6 -> 8.9 ms; 16 floats are one 64-byte cache line)."""
PAD_MIN_ROWS = 512
"""Rows below which :func:`rows_times` does not pad (the copy would cost what it saves)."""


def block_count(dim: int, block_size: int | None) -> int:
    """K, the blocks of a side of width ``dim`` (1 when it is kept whole)."""
    if block_size is None or dim <= block_size:
        return 1
    return math.ceil(dim / block_size)


def blocked_shape(dim: int, block_size: int | None) -> tuple[int, ...]:
    """The shape of a side's covariance sum: ``[D, D]`` whole, ``[K, B, B]`` in blocks."""
    k = block_count(dim, block_size)
    return (dim, dim) if k == 1 else (k, block_size, block_size)


def _blocked_rows(x: Tensor, k: int, b: int) -> Tensor:
    """``x [..., D]`` zero-padded to ``K B`` and split: ``[..., K, B]``."""
    pad = k * b - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], k, b)


def add_blocked_outer(total: Tensor, x: Tensor) -> None:
    """``total [K, B, B] += `` the diagonal blocks of ``x^T x`` for rows ``x [R, D]``: one
    batched product, ``R D B`` multiply-adds instead of ``R D^2``."""
    k, b = total.shape[0], total.shape[1]
    blocks = _blocked_rows(x, k, b).transpose(0, 1)  # [K, R, B]
    if blocks.dtype == total.dtype:
        total.baddbmm_(blocks.transpose(1, 2), blocks)
    else:
        total.add_(torch.bmm(blocks.transpose(1, 2), blocks))


@dataclass
class BlockDiagonal:
    """An orthogonal block-diagonal basis ``diag(Q_1, ..., Q_K)`` of a side of width ``dim``.

    Attributes:
        blocks: ``[K, B, B]``, each block orthogonal (the last padded with the identity).
        dim: D, the side's width (``(K - 1) B < D <= K B``).
    """

    blocks: Tensor
    dim: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def numel(self) -> int:
        return self.blocks.numel()

    def to(self, *args, **kwargs) -> BlockDiagonal:
        moved = self.blocks.to(*args, **kwargs)
        return self if moved is self.blocks else BlockDiagonal(moved, self.dim)

    def dense(self) -> Tensor:
        """The full ``[D, D]`` matrix (for checks on small sizes)."""
        return torch.block_diag(*self.blocks)[: self.dim, : self.dim]

    def right(self, x: Tensor) -> Tensor:
        """``x Q`` for ``x [..., D]``."""
        k, b = self.blocks.shape[0], self.blocks.shape[1]
        out = torch.einsum("...kb,kbc->...kc", _blocked_rows(x, k, b), self.blocks.to(x.dtype))
        return out.reshape(*x.shape[:-1], k * b)[..., : self.dim]

    def right_t(self, x: Tensor) -> Tensor:
        """``x Q^T`` for ``x [..., D]``."""
        k, b = self.blocks.shape[0], self.blocks.shape[1]
        out = torch.einsum("...kc,kbc->...kb", _blocked_rows(x, k, b), self.blocks.to(x.dtype))
        return out.reshape(*x.shape[:-1], k * b)[..., : self.dim]


def padded_width(dim: int) -> int:
    """The width of the buffer whose first ``dim`` columns :func:`rows_times` returns (when
    it pads)."""
    return dim + (-dim % ROW_ALIGNMENT)


def rows_times(basis: Tensor | BlockDiagonal, x: Tensor) -> Tensor:
    """``x Q`` for rows ``x [..., D]`` and a dense or block-diagonal basis ``Q``, in ``x``'s
    dtype. On the CPU, with many rows and a width D that is not a multiple of 16, a view of
    the first D columns of ``x Q_padded`` (see :data:`ROW_ALIGNMENT`)."""
    if isinstance(basis, BlockDiagonal):
        return basis.right(x)
    dim = basis.shape[0]
    width = padded_width(dim)
    if width == dim or x.device.type != "cpu" or x.numel() < PAD_MIN_ROWS * dim:
        return x @ basis.to(x.dtype)
    padded = x.new_zeros(dim, width)
    padded[:, :dim] = basis  # converted in the copy
    return (x @ padded)[..., :dim]


def rows_times_t(basis: Tensor | BlockDiagonal, x: Tensor) -> Tensor:
    """``x Q^T`` for rows ``x [..., D]`` and a dense or block-diagonal basis ``Q``."""
    if isinstance(basis, BlockDiagonal):
        return basis.right_t(x)
    return x @ basis.to(x.dtype).T


def basis_numel(dim: int, block_size: int | None) -> int:
    """Numbers a side's covariance (or eigenbasis) holds: ``D^2`` whole, ``K B^2`` in blocks."""
    return math.prod(blocked_shape(dim, block_size))
