"""Lightning-free entry points, gathered in one place (the public names also live on the package).

    factors = fit_factors(model, train_loader, "classification", strategy="ekfac")
    result = compute_pairwise_scores(model, factors, query_loader, train_loader,
                                     "classification", top_k=10)
    self_scores = compute_self_scores(model, factors, train_loader, "classification").scores

Training loaders must iterate in a fixed order (no shuffling): result indices are positions in
that order. Every pass runs the model in eval mode and restores its mode afterwards.

The code lives by stage: :mod:`~lightning_influence.passes` (batches -> rows),
:mod:`~lightning_influence.fitting` (curvature) and :mod:`~lightning_influence.scoring` (scores).
"""

from __future__ import annotations

from lightning_influence.fitting import (
    factors_from_statistics,
    fit_covariances,
    fit_factors,
    update_covariances,
)
from lightning_influence.passes import ordered_loader
from lightning_influence.scoring import (
    PairwiseResult,
    SelfResult,
    compute_pairwise_scores,
    compute_self_scores,
    query_gradients,
)

__all__ = [
    "fit_covariances",
    "update_covariances",
    "fit_factors",
    "factors_from_statistics",
    "query_gradients",
    "compute_pairwise_scores",
    "compute_self_scores",
    "ordered_loader",
    "PairwiseResult",
    "SelfResult",
]
