"""Streaming top-k proponents/opponents and data-debugging flags.

Index letters: Q queries, N training examples seen in one update, K kept per query, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

__all__ = ["StreamingTopK", "TopKResult", "flag_top_fraction", "detection_report"]


@dataclass
class TopKResult:
    """The top-k proponents and opponents of each query (``PairwiseResult.top``).

    Row ``q`` belongs to query ``q`` (query loader order); K is ``top_k``, or the number of
    training examples when there are fewer.

    Attributes:
        proponent_indices: ``[Q, K]`` int64 positions in the training loader's order of the
            examples with the largest scores (most helpful first).
        proponent_scores: ``[Q, K]`` float64 their scores, descending (positive = proponent:
            up-weighting the example lowers the query's loss).
        opponent_indices: ``[Q, K]`` positions of the examples with the smallest scores (most
            harmful first).
        opponent_scores: ``[Q, K]`` their scores, ascending (most negative first).
        proponent_layers, opponent_layers: ``[Q, K, L]`` each entry's score split over the
            tracked layers (summing to the score; layers in ``PairwiseResult.layer_names``
            order), with ``per_layer=True``; else None.
    """

    proponent_indices: Tensor  # [Q, K] largest scores, descending
    proponent_scores: Tensor  # [Q, K]
    opponent_indices: Tensor  # [Q, K] smallest (most negative) scores, ascending
    opponent_scores: Tensor  # [Q, K]
    proponent_layers: Tensor | None = None  # [Q, K, L] per-layer breakdown
    opponent_layers: Tensor | None = None


class StreamingTopK:
    """Keeps the K largest and K smallest scores per query over a stream of score chunks.

    Memory is ``O(Q * K * (L + 2))`` whatever the number of training examples.
    """

    def __init__(self, num_queries: int, k: int, num_layers: int = 0) -> None:
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {k}.")
        self.k = k
        self.num_layers = num_layers
        self._hi = self._empty(num_queries)
        self._lo = self._empty(num_queries)

    def _empty(self, q: int) -> tuple[Tensor, Tensor, Tensor]:
        return (torch.empty(q, 0, dtype=torch.float64), torch.empty(q, 0, dtype=torch.long),
                torch.empty(q, 0, self.num_layers, dtype=torch.float64))

    @staticmethod
    def _merge(state, scores, idx, layers, k, largest):
        values = torch.cat([state[0], scores], dim=1)
        indices = torch.cat([state[1], idx], dim=1)
        per_layer = torch.cat([state[2], layers], dim=1)
        keep = min(k, values.shape[1])
        top, pos = values.topk(keep, dim=1, largest=largest, sorted=True)
        return (top, indices.gather(1, pos),
                per_layer.gather(1, pos.unsqueeze(-1).expand(-1, -1, per_layer.shape[-1])))

    def update(self, scores: Tensor, indices: Tensor, layer_scores: Tensor | None = None) -> None:
        """Add ``scores [Q, N]`` of training examples ``indices [N]`` (optional ``[L, Q, N]``)."""
        scores = scores.detach().to("cpu", torch.float64)
        idx = indices.to("cpu", torch.long).unsqueeze(0).expand_as(scores)
        if layer_scores is None:
            layers = scores.new_zeros(scores.shape + (self.num_layers,))
        else:
            layers = layer_scores.detach().to("cpu", torch.float64).permute(1, 2, 0)
        self._hi = self._merge(self._hi, scores, idx, layers, self.k, True)
        self._lo = self._merge(self._lo, scores, idx, layers, self.k, False)

    def merge(self, other: StreamingTopK) -> None:
        """Fold in another stream's top-k (e.g. from another process)."""
        for attr, largest in (("_hi", True), ("_lo", False)):
            theirs = getattr(other, attr)
            setattr(self, attr, self._merge(getattr(self, attr), theirs[0], theirs[1], theirs[2],
                                            self.k, largest))

    def result(self) -> TopKResult:
        has_layers = self.num_layers > 0
        return TopKResult(self._hi[1], self._hi[0], self._lo[1], self._lo[0],
                          self._hi[2] if has_layers else None,
                          self._lo[2] if has_layers else None)


def flag_top_fraction(self_scores: Tensor, fraction: float) -> Tensor:
    """Indices of the ``fraction`` of examples with the largest self-influence, largest first."""
    if not 0 < fraction <= 1:
        raise ValueError(f"flag fraction must be in (0, 1], got {fraction}.")
    k = max(1, int(round(fraction * self_scores.numel())))
    return self_scores.topk(k).indices


def detection_report(ranking_scores: Tensor, is_bad: Tensor,
                     fractions: tuple[float, ...] = (0.1, 0.2)) -> dict[str, float]:
    """How well a ranking (largest first) finds known-bad examples.

    Returns the fraction of bad examples found within the top ``f`` of the ranking for each
    ``f`` in ``fractions`` (keys ``found_top_10pct`` ...) and the AUROC.
    """
    is_bad = is_bad.bool().cpu()
    scores = ranking_scores.double().cpu()
    total = int(is_bad.sum())
    report: dict[str, float] = {}
    order = scores.argsort(descending=True)
    for f in fractions:
        k = int(round(f * scores.numel()))
        found = int(is_bad[order[:k]].sum())
        report[f"found_top_{round(f * 100)}pct"] = found / max(total, 1)
    # AUROC depends on the order only: pass ranks in [0, 1] so torchmetrics' sigmoid on
    # out-of-range scores cannot saturate large self-influence values into ties.
    ranks = scores.argsort().argsort().double() / max(scores.numel() - 1, 1)
    report["auroc"] = float(binary_auroc(ranks, is_bad.long()))
    return report
