"""Query batching: preconditioned query gradients of many queries held at once, optionally low-rank.

Index letters: Q queries, O = d_out, I = d_in (+1 bias), R the kept rank, N training examples of a
batch, T rows (tokens) per example.

Scoring Q queries against the training data costs one streaming pass when all Q preconditioned
query gradients ``P_q [O, I]`` (per layer) are held in memory at once. For large layers that is
``Q x O x I`` numbers per layer; Grosse et al. (2023) keep instead a rank-R approximation
(truncated SVD) ``P_q ~ L_q R_q`` with ``L_q [O, R]`` and ``R_q [R, I]``: ``R (O + I)`` numbers per
query and layer, and R = 32 keeps the scores' correlation with full rank high.

The contractions of training rows against a low-rank store live beside the dense ones in
:mod:`lightning_influence.scores` (``low_rank_layer_scores``, ``low_rank_token_scores``), and the
store is built by :func:`lightning_influence.scoring.build_query_store`; this module holds the
data: :class:`LowRankGradient`, :func:`truncate` and :class:`QueryStore`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["LowRankGradient", "QueryStore", "truncate"]

log = logging.getLogger(__name__)


@dataclass
class LowRankGradient:
    """``Q`` matrices ``[O, I]`` of one layer, each stored as ``left @ right``.

    Attributes:
        left: ``[Q, O, R]`` left singular vectors scaled by the singular values.
        right: ``[Q, R, I]`` right singular vectors (transposed).
    """

    left: Tensor
    right: Tensor

    def __post_init__(self) -> None:
        if self.left.dim() != 3 or self.right.dim() != 3 or self.left.shape[0] != self.right.shape[0] \
                or self.left.shape[2] != self.right.shape[1]:
            raise ValueError(f"LowRankGradient needs left [Q, O, R] and right [Q, R, I]; got "
                             f"{tuple(self.left.shape)} and {tuple(self.right.shape)}.")

    @property
    def shape(self) -> torch.Size:
        """``(Q, O, I)``: the shape of the dense matrices this stands for."""
        return torch.Size((self.left.shape[0], self.left.shape[1], self.right.shape[2]))

    @property
    def rank(self) -> int:
        return self.left.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype

    def numel(self) -> int:
        """Numbers stored: ``Q R (O + I)``."""
        return self.left.numel() + self.right.numel()

    def to(self, *args: Any, **kwargs: Any) -> LowRankGradient:
        return LowRankGradient(self.left.to(*args, **kwargs), self.right.to(*args, **kwargs))

    def dense(self) -> Tensor:
        """The ``[Q, O, I]`` matrices (for tests and small layers only)."""
        return self.left @ self.right

    def __getitem__(self, index: Any) -> LowRankGradient:
        """Select queries: ``lr[2:5]``, ``lr[tensor_of_indices]``."""
        left, right = self.left[index], self.right[index]
        if left.dim() == 2:
            left, right = left.unsqueeze(0), right.unsqueeze(0)
        return LowRankGradient(left, right)


def truncate(matrices: Tensor, rank: int) -> LowRankGradient:
    """Best rank-``rank`` approximation (Frobenius norm) of each of ``matrices [Q, O, I]``.

    The SVD runs in at least float32; ``rank`` is clipped to ``min(O, I)`` (exact at that rank).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}.")
    m = matrices if matrices.dtype in (torch.float32, torch.float64) else matrices.float()
    r = min(rank, m.shape[-2], m.shape[-1])
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # [Q, O, K], [Q, K], [Q, K, I]
    return LowRankGradient((u[..., :r] * s[..., None, :r]).contiguous(), vh[..., :r, :].contiguous())


class QueryStore(dict):
    """Preconditioned query gradients of every tracked layer: ``{layer: [Q, O, I]}`` or low-rank.

    A plain ``dict`` (so it is the ``query_grads=`` of
    :func:`lightning_influence.compute_pairwise_scores`) with what it costs in memory.

    Attributes:
        rank: the rank kept per layer, or ``None`` for full matrices.
    """

    def __init__(self, layers: Mapping[str, Tensor | LowRankGradient], rank: int | None = None):
        super().__init__(layers)
        self.rank = rank

    @property
    def num_queries(self) -> int:
        return next(iter(self.values())).shape[0]

    def memory_bytes(self) -> int:
        """Bytes held by the stored tensors."""
        total = 0
        for value in self.values():
            parts = (value.left, value.right) if isinstance(value, LowRankGradient) else (value,)
            total += sum(p.numel() * p.element_size() for p in parts)
        return total

    def full_rank_bytes(self) -> int:
        """Bytes the full ``[Q, O, I]`` matrices would take in the same dtype."""
        total = 0
        for value in self.values():
            q, o, i = value.shape
            total += q * o * i * torch.empty((), dtype=value.dtype).element_size()
        return total

    def memory_ratio(self) -> float:
        """``memory_bytes / full_rank_bytes``: ``sum R (O + I) / sum O I`` at rank R."""
        return self.memory_bytes() / max(self.full_rank_bytes(), 1)

    def select(self, queries: Tensor | slice) -> QueryStore:
        """The store of a subset of queries (indices or a slice)."""
        return QueryStore({name: v[queries] for name, v in self.items()}, self.rank)

    @classmethod
    def concatenate(cls, stores: Iterable[QueryStore]) -> QueryStore:
        """Stack stores of the same layers and rank along the query axis."""
        stores = list(stores)
        out = {}
        for name in stores[0]:
            parts = [s[name] for s in stores]
            if isinstance(parts[0], LowRankGradient):
                out[name] = LowRankGradient(torch.cat([p.left for p in parts]),
                                            torch.cat([p.right for p in parts]))
            else:
                out[name] = torch.cat(parts)
        return cls(out, stores[0].rank)


