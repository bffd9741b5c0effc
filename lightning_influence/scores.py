"""Score contractions between preconditioned query gradients and training examples.

Index letters: Q queries, N training examples of a batch, T rows per example, O = d_out,
I = d_in (+1 bias), L tracked layers.

The score of a training example n on a query q is the sum over layers of

    <P_q, G_n> = sum_t g_nt^T P_q a_nt,

with ``P_q [O, I]`` the query's preconditioned gradient and ``G_n = sum_t g_nt a_nt^T``. It is
contracted directly from ``(g, P, a)``: for single-row layers no per-example gradient is built
unless many queries make one GEMM against the batch's ``G_n`` the faster route (bounded by
``GEMM_MAX_ELEMENTS``), and for sequence layers ``torch.einsum`` (with opt_einsum's path search)
picks the cheaper order.

Sign: positive = proponent (helpful): up-weighting the training example lowers the query loss.
Scale: removing the example from a mean-loss objective over N examples changes the query loss by
about ``+score / N`` (pass ``normalize=True`` to the score functions to get that unit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_influence.factors import LayerFactors
from lightning_influence.lowrank import LowRankGradient
from lightning_influence.statistics import accumulation_dtype

__all__ = ["per_example_gradients", "pairwise_layer_scores", "token_layer_scores",
           "self_layer_scores", "rotate_rows", "pairwise_and_self_rotated",
           "low_rank_layer_scores", "low_rank_token_scores"]

# Pairwise scores of single-row layers go through one GEMM against per-example gradients when
# there are at least this many queries and the batch's gradients hold at most this many numbers.
GEMM_MIN_QUERIES = 16
GEMM_MAX_ELEMENTS = 2**24


def per_example_gradients(a: Tensor, g: Tensor) -> Tensor:
    """``G_n = sum_t g_nt a_nt^T``: ``a [N, T, I]``, ``g [N, T, O]`` -> ``[N, O, I]``."""
    return torch.einsum("nto,nti->noi", g, a)


def pairwise_layer_scores(preconditioned: Tensor | LowRankGradient, a: Tensor, g: Tensor) -> Tensor:
    """One layer's scores ``[Q, N]`` from ``P [Q, O, I]``, ``a [N, T, I]`` and ``g [N, T, O]``.

    ``P`` may be a :class:`~lightning_influence.lowrank.LowRankGradient` (``L [Q, O, R]``,
    ``R [Q, R, I]``): the score is then ``sum_t (g_nt^T L)(R a_nt)``, P is never rebuilt.
    """
    if isinstance(preconditioned, LowRankGradient):
        return low_rank_layer_scores(preconditioned, a, g)
    p = preconditioned.to(a.dtype)
    if a.shape[1] == 1:
        a1, g1 = a[:, 0], g[:, 0]
        q, o, i = p.shape
        if q >= GEMM_MIN_QUERIES and a1.shape[0] * o * i <= GEMM_MAX_ELEMENTS:
            # Many queries: one GEMM [Q, O*I] x [O*I, N] against the batch's per-example
            # gradients g_n a_n^T (N*O*I extra numbers) runs about twice as fast on CPU as the
            # two-step contraction below (digits MLP, Q = 100: 4.0 -> 2.2 ms per layer and batch).
            grads = (g1.unsqueeze(2) * a1.unsqueeze(1)).reshape(-1, o * i)  # [N, O*I]
            return p.reshape(q, o * i) @ grads.T
        # contract the larger of O and I first so the intermediate is [Q, N, min(O, I)].
        if p.shape[1] >= p.shape[2]:
            return torch.einsum("qni,ni->qn", torch.einsum("qoi,no->qni", p, g1), a1)
        return torch.einsum("qno,no->qn", torch.einsum("qoi,ni->qno", p, a1), g1)
    return _contract_per_example(p, a, g)


def _contract_per_example(p: Tensor, a: Tensor, g: Tensor,
                          chunk_elements: int = 2**24) -> Tensor:
    """``<P_q, G_n>`` ``[Q, N]`` for sequence rows: each example's gradient ``G_n [O, I]`` (one
    batched product, ``T O I`` multiply-adds: the cheapest order while Q > 1 or T > min(O, I)),
    then one GEMM against every query, a chunk of examples at a time (at most
    ``chunk_elements`` numbers of ``G``)."""
    q, o, i = p.shape
    n = a.shape[0]
    flat = p.reshape(q, o * i)
    step = max(1, chunk_elements // (o * i))
    return torch.cat([flat @ per_example_gradients(a[s:s + step], g[s:s + step]).reshape(
        -1, o * i).T for s in range(0, n, step)], dim=1)


def pairwise_and_self_rotated(factors: LayerFactors, rotated: Tensor, a_rot: Tensor,
                              g_rot: Tensor, chunk_elements: int = 2**22,
                              ) -> tuple[Tensor, Tensor]:
    """One layer's pairwise scores ``[Q, N]`` and self-influence ``[N]`` in the Kronecker
    eigenbasis, from rows rotated once (:func:`rotate_rows`), as self-influence needs them.

    With ``G'_n = Q_S^T G_n Q_A`` and the queries' preconditioned gradients in the same basis,
    ``R_q = (Q_S^T G_q Q_A) / (Lambda + damping)`` (``rotated [Q, O, I]``, what
    preconditioning computes before it rotates back), the rotations being orthogonal:

        <P_q, G_n> = <R_q, G'_n>,      self_n = sum G'_n^2 / (Lambda + damping),

    so for sequence layers each example's ``G'_n`` is formed once for both, where separate
    contractions would form ``G_n`` and ``G'_n``.
    """
    if a_rot.shape[1] == 1:
        return (pairwise_layer_scores(rotated, a_rot, g_rot),
                _self_from_rotated(factors, a_rot, g_rot, chunk_elements))
    q, o, i = rotated.shape
    n = a_rot.shape[0]
    dtype = accumulation_dtype(a_rot.dtype)  # 16-bit rows: squares and sums in float32
    flat = rotated.to(a_rot.dtype).reshape(q, o * i)
    weights = None if factors.eigenvalues is None else factors.inverse_eigenvalues(
        a_rot.new_empty(0, dtype=dtype)).flatten()
    pairwise = a_rot.new_empty(q, n)
    selfs = a_rot.new_empty(n, dtype=dtype)
    step = max(1, chunk_elements // (o * i))
    for s in range(0, n, step):
        grads = per_example_gradients(a_rot[s:s + step], g_rot[s:s + step]).reshape(-1, o * i)
        pairwise[:, s:s + step] = flat @ grads.T
        sq = grads.to(dtype).square_()
        selfs[s:s + step] = sq.sum(-1) if weights is None else sq @ weights
    return pairwise, selfs


def token_layer_scores(preconditioned: Tensor | LowRankGradient, a: Tensor, g: Tensor,
                       max_elements: int = 2**24) -> Tensor:
    """One layer's per-token scores ``[Q, N, T]``: ``g_nt^T P_q a_nt``; summing T gives
    :func:`pairwise_layer_scores`.

    Token t's term is the part of the example's gradient ``G_n = sum_t g_nt a_nt^T`` carried by
    its row (token-wise influence). Rows with ``g = 0`` (padding, positions whose loss is masked
    and that no later loss depends on) contribute exactly nothing.

    Args:
        preconditioned: ``P [Q, O, I]`` or a low-rank ``L [Q, O, R]``, ``R [Q, R, I]``.
        a: activation rows ``[N, T, I]``.
        g: output-gradient rows ``[N, T, O]``.
        max_elements: cap on the ``[q, N, T, I]`` intermediate (queries are chunked).
    """
    if isinstance(preconditioned, LowRankGradient):
        return low_rank_token_scores(preconditioned, a, g, max_elements)
    p = preconditioned.to(a.dtype)
    n, t, i = a.shape
    step = max(1, max_elements // max(n * t * i, 1))
    return torch.cat([torch.einsum("nti,qnti->qnt", a, torch.einsum("nto,qoi->qnti", g, p[s:s + step]))
                      for s in range(0, p.shape[0], step)])


def rotate_rows(factors: LayerFactors, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Rows into the Kronecker eigenbasis: ``(a Q_A, g Q_S)`` (as they are without bases)."""
    return factors.rotate_rows(a, g)


def self_layer_scores(factors: LayerFactors, a: Tensor, g: Tensor,
                      chunk_elements: int = 2**22) -> Tensor:
    """One layer's self-influence ``<P(G_n), G_n>`` ``[N]`` from rows ``a``, ``g``.

    In the eigenbasis, ``<P(G), G> = sum (Q_S^T G Q_A)^2 / (Lambda + damping)``; for single-row
    layers ``(Q_S^T G_n Q_A)^2 = (g'_n)^2 (a'_n^2)^T``, so no per-example matrix is built.
    """
    return _self_from_rotated(factors, *rotate_rows(factors, a, g), chunk_elements)


def _self_from_rotated(factors: LayerFactors, a_rot: Tensor, g_rot: Tensor,
                       chunk_elements: int) -> Tensor:
    n, t, i = a_rot.shape
    o = g_rot.shape[-1]
    dtype = accumulation_dtype(a_rot.dtype)  # 16-bit rows: squares and sums in float32
    if t == 1:
        sq_a, sq_g = a_rot[:, 0].to(dtype).square(), g_rot[:, 0].to(dtype).square()
        inv = factors.inverse_eigenvalues(sq_a)
        if inv is None:
            return sq_g.sum(-1) * sq_a.sum(-1)
        return torch.einsum("no,oi,ni->n", sq_g, inv, sq_a)
    out = a_rot.new_empty(n, dtype=dtype)
    weights = None if factors.eigenvalues is None else factors.inverse_eigenvalues(out).flatten()
    step = max(1, chunk_elements // (o * i))
    for s in range(0, n, step):
        # squared in place, then one matrix-vector product with 1 / (Lambda + damping): the
        # [n, O, I] chunk is read once more and no second buffer is written
        sq = per_example_gradients(a_rot[s:s + step], g_rot[s:s + step]).to(dtype).square_()
        out[s:s + step] = sq.flatten(1).sum(-1) if weights is None else sq.flatten(1) @ weights
    return out


# ------------------------------------------------------------------ low-rank queries
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
        step = _query_steps(p, max_elements)
        return torch.cat([token_layer_scores(p[s:s + step].dense().to(a.dtype), a, g, max_elements)
                          for s in range(0, p.shape[0], step)])
    step = _row_steps(p, a, max_elements)
    out = []
    for s in range(0, a.shape[0], step):
        u, v = _row_factors(p, a[s:s + step], g[s:s + step])
        out.append(torch.einsum("ntqr,ntqr->qnt", u, v))
    return torch.cat(out, dim=1)

