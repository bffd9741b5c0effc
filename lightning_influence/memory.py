"""What each stage keeps in memory, estimated before a long run.

Index letters: O = d_out, I = d_in (+1 bias) per layer, Q queries, r query rank, N training
examples, B batch size, T rows per example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_influence.options import resolve_options
from lightning_influence.strategies import strategy as strategy_row

__all__ = ["Workload", "estimate_bytes", "format_estimate"]


@dataclass
class Workload:
    """What a stage processes at once.

    Attributes:
        num_queries: Q, the queries whose gradients are held.
        query_rank: r, their rank per layer (None: full).
        batch_size: B, examples per batch.
        rows_per_example: T, rows (tokens, positions) per example.
        num_train: N, training examples (for a kept score matrix).
        keep_scores: the whole ``[Q, N]`` matrix is kept.
        dtype_bytes: bytes per number of the rows and query gradients.
    """

    num_queries: int = 0
    query_rank: int | None = None
    batch_size: int = 0
    rows_per_example: int = 1
    num_train: int = 0
    keep_scores: bool = False
    dtype_bytes: int = 4


def estimate_bytes(shapes: dict[str, list[int]], strategy: str = "ekfac",
                   workload: Workload | None = None, **fields: Any) -> dict[str, int]:
    """Bytes each stage holds at once, summed over the tracked layers, for a
    :class:`Workload` (its fields may also be keywords).

    - ``covariances``: the float64 sums of A ``[I, I]`` and S ``[O, O]`` (kfac, ekfac), and
      the float32 buffers that batches are multiplied into before they are added to them;
    - ``eigenbases``: Q_A and Q_S in float64 (kfac, ekfac);
    - ``eigenvalues``: Lambda ``[O, I]`` in float64 (diagonal, kfac, ekfac);
    - ``query_gradients``: ``Q x O x I`` (or ``Q x r x (O + I)`` at rank r) in the model dtype;
    - ``batch_rows``: one batch's activations and output gradients ``B x T x (I + O)``, plus
      its per-example gradients ``B x O x I`` for sequence layers;
    - ``forward_graph``: what autograd holds for the same batch while it runs, the tracked
      layers' saved inputs and their output gradients, ``B x T x (I + O)`` again (the rest of
      the model's activations are not counted);
    - ``model_outputs``: the widest tracked layer's outputs ``B x T x O`` (a language model's
      head: the logits) four times over, for the logits, the probabilities the labels are
      drawn from, their cumulative sums and the loss's gradient;
    - ``score_matrix``: ``Q x N`` float64, only when the full matrix is kept in memory.
    """
    w = resolve_options(Workload, workload, fields, "estimate_bytes()")
    num_queries, query_rank, batch_size = w.num_queries, w.query_rank, w.batch_size
    rows_per_example, num_train, keep_scores = w.rows_per_example, w.num_train, w.keep_scores
    dtype_bytes = w.dtype_bytes
    row = strategy_row(strategy)
    kronecker = row.needs_covariances
    sq = sum(o * o + i * i for o, i in shapes.values())
    oi = sum(o * i for o, i in shapes.values())
    oplusi = sum(o + i for o, i in shapes.values())
    out = {
        "covariances": (8 + 4) * sq if kronecker else 0,
        "eigenbases": 8 * sq if kronecker else 0,
        "eigenvalues": 8 * oi if "eigenvalues" in row.stored else 0,
        "query_gradients": dtype_bytes * num_queries * (
            query_rank * oplusi if query_rank else oi),
        "batch_rows": dtype_bytes * batch_size * (
            rows_per_example * oplusi + (oi if rows_per_example > 1 else 0)),
        "forward_graph": dtype_bytes * batch_size * rows_per_example * oplusi,
        "model_outputs": 4 * dtype_bytes * batch_size * rows_per_example * max(
            (o for o, _ in shapes.values()), default=0),
        "score_matrix": 8 * num_queries * num_train if keep_scores else 0,
    }
    return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_estimate(estimate: dict[str, int]) -> str:
    """One line: each non-zero stage and the total."""
    parts = [f"{k.replace('_', ' ')} {_human(v)}" for k, v in estimate.items() if v]
    return f"memory estimate: {', '.join(parts)}; total {_human(sum(estimate.values()))}"
