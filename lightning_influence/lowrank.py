"""Query batching: preconditioned query gradients of many queries held at once, optionally low-rank.

Index letters: Q queries, O = d_out, I = d_in (+1 bias), R the kept rank, N training examples of a
batch, T rows (tokens) per example.

Scoring Q queries against the training data costs one streaming pass when all Q preconditioned
query gradients ``P_q [O, I]`` (per layer) are held in memory at once. For large layers that is
``Q x O x I`` numbers per layer; Grosse et al. (2023) keep instead a rank-R approximation
(truncated SVD) ``P_q ~ L_q R_q`` with ``L_q [O, R]`` and ``R_q [R, I]``: ``R (O + I)`` numbers per
query and layer, and R = 32 keeps the scores' correlation with full rank high.

The score of a training example against a low-rank query is contracted from the example's
activation rows ``a [N, T, I]`` and output-gradient rows ``g [N, T, O]``::

    <L R, G_n> = sum_t (g_nt^T L)(R a_nt),

which costs ``N T Q R (O + I)`` multiply-adds. With long sequences and many queries it is cheaper
to form ``P = L R`` for a bounded chunk of queries of one layer at a time and contract densely
(``Q R O I + N T O I + N Q O I``); :func:`low_rank_layer_scores` picks the cheaper, both exact. The
store never holds more than its ``Q R (O + I)`` numbers per layer plus that one bounded chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LowRankGradient",
    "QueryStore",
    "truncate",
    "build_query_store",
    "low_rank_layer_scores",
    "low_rank_token_scores",
]

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


def build_query_store(model: nn.Module, query_loader: Any, task: Any, factors: Any, *,
                      rank: int | None = 32, tracker: Any = None,
                      progress: bool = False) -> QueryStore:
    """Preconditioned query gradients of every query, truncated to ``rank`` per layer.

    Query batches are preconditioned and truncated one at a time, so no more than one batch of
    full ``[B, O, I]`` matrices is ever held. ``rank=None`` keeps the full matrices.

    Args:
        model: the trained model.
        query_loader: batches of queries (their measurement's gradient is taken).
        task: a :class:`~lightning_influence.Task` or built-in name.
        factors: the fitted :class:`~lightning_influence.Factors`.
        rank: the rank R kept per layer (clipped to ``min(O, I)``), or ``None``.
        tracker: a tracker over the factors' layers (built when ``None``).
        progress: show progress bars.
    """
    from lightning_influence.api import factor_tracker, query_gradients

    tracker = factor_tracker(model, factors, tracker)
    parts = []
    for batch in query_loader:
        grads = query_gradients(model, [batch], task, factors, tracker=tracker, progress=progress)
        if rank is not None:
            grads = {name: truncate(g, rank) for name, g in grads.items()}
        parts.append(QueryStore(grads, rank))
    if not parts:
        raise ValueError("The query dataloader yielded no batch: influence needs queries.")
    store = QueryStore.concatenate(parts)
    log.info("query store: %d queries, rank %s, %.1f MiB (%.3f of full rank)", store.num_queries,
             rank, store.memory_bytes() / 2**20, store.memory_ratio())
    return store


def _row_factors(p: LowRankGradient, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``u = g L [N, T, Q, R]`` and ``v = R a [N, T, Q, R]`` for every query at once."""
    q, o, r = p.left.shape
    i = p.right.shape[2]
    left = p.left.to(g.dtype).permute(1, 0, 2).reshape(o, q * r)  # [O, Q*R]
    right = p.right.to(a.dtype).permute(2, 0, 1).reshape(i, q * r)  # [I, Q*R]
    n, t = a.shape[:2]
    u = (g.reshape(n * t, o) @ left).reshape(n, t, q, r)
    v = (a.reshape(n * t, i) @ right).reshape(n, t, q, r)
    return u, v


def _row_steps(p: LowRankGradient, a: Tensor, max_elements: int) -> int:
    """Examples per step so that one ``[n, T, Q, R]`` intermediate stays under max_elements."""
    per_example = a.shape[1] * p.left.shape[0] * p.rank
    return max(1, max_elements // max(per_example, 1))


def _rebuild_is_cheaper(p: LowRankGradient, a: Tensor, token_wise: bool) -> bool:
    """Multiply-adds of the row contraction against rebuilding ``P`` chunk by chunk.

    Rows: ``N T Q R (O + I)``. Rebuild: ``Q R O I`` to form P, then the dense contraction,
    ``N T O I + N Q O I`` for sequence scores (via the per-example gradient) or ``N T Q O I``
    token by token. Short sequences and narrow layers favour rows, long sequences and many
    queries favour rebuilding.
    """
    q, o, r = p.left.shape
    i = p.right.shape[2]
    n, t = a.shape[:2]
    rows = n * t * q * r * (o + i)
    dense = n * t * q * o * i if token_wise else (n * t * o * i + n * q * o * i)
    return q * r * o * i + dense < rows


def _query_steps(p: LowRankGradient, max_elements: int) -> int:
    """Queries per rebuilt chunk so that ``[q, O, I]`` stays under max_elements."""
    return max(1, max_elements // max(p.shape[1] * p.shape[2], 1))


def low_rank_layer_scores(p: LowRankGradient, a: Tensor, g: Tensor,
                          max_elements: int = 2**24, path: str = "auto") -> Tensor:
    """One layer's scores ``[Q, N]`` of low-rank queries: ``sum_t (g_nt^T L_q)(R_q a_nt)``.

    Two exact ways to contract, chosen by their multiply-add counts (``path="auto"``):
    ``"rows"`` forms ``g L`` and ``R a`` for every row and query; ``"rebuild"`` forms
    ``P_q = L_q R_q`` for a chunk of queries at a time (at most ``max_elements`` numbers, one layer
    at a time, freed after the batch) and contracts it densely. The store itself stays low-rank
    either way, so query memory is ``Q R (O + I)`` plus one bounded chunk.

    Args:
        p: the queries' low-rank preconditioned gradients (``left [Q, O, R]``, ``right [Q, R, I]``).
        a: activation rows ``[N, T, I]``.
        g: output-gradient rows ``[N, T, O]``.
        max_elements: cap on any intermediate (examples or queries are chunked to fit).
        path: ``"auto"``, ``"rows"`` or ``"rebuild"``.
    """
    if path == "rebuild" or (path == "auto" and _rebuild_is_cheaper(p, a, token_wise=False)):
        from lightning_influence.scores import pairwise_layer_scores

        step = _query_steps(p, max_elements)
        return torch.cat([pairwise_layer_scores(p[s:s + step].dense().to(a.dtype), a, g)
                          for s in range(0, p.shape[0], step)])
    step = _row_steps(p, a, max_elements)
    out = []
    for s in range(0, a.shape[0], step):
        u, v = _row_factors(p, a[s:s + step], g[s:s + step])
        out.append(torch.einsum("ntqr,ntqr->qn", u, v))
    return torch.cat(out, dim=1)


def low_rank_token_scores(p: LowRankGradient, a: Tensor, g: Tensor,
                          max_elements: int = 2**24, path: str = "auto") -> Tensor:
    """One layer's per-token scores ``[Q, N, T]``: ``(g_nt^T L_q)(R_q a_nt)``; summing T gives
    :func:`low_rank_layer_scores`. ``max_elements`` and ``path`` as there."""
    if path == "rebuild" or (path == "auto" and _rebuild_is_cheaper(p, a, token_wise=True)):
        from lightning_influence.scores import token_layer_scores

        step = _query_steps(p, max_elements)
        return torch.cat([token_layer_scores(p[s:s + step].dense().to(a.dtype), a, g, max_elements)
                          for s in range(0, p.shape[0], step)])
    step = _row_steps(p, a, max_elements)
    out = []
    for s in range(0, a.shape[0], step):
        u, v = _row_factors(p, a[s:s + step], g[s:s + step])
        out.append(torch.einsum("ntqr,ntqr->qnt", u, v))
    return torch.cat(out, dim=1)
