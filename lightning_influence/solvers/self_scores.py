"""Self-influence through any preconditioner: ``score(z_n, z_n) = grad L_n^T P(grad L_n)``.

Index letters: M chosen training examples, L tracked layers.

:func:`self_influence` builds per-example gradients of chosen examples and preconditions them a
batch at a time (``[M]``); :func:`solver_self_scores` runs ``compute_self_scores`` over a whole
loader in fixed batches (one solve with K right-hand sides per batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_influence.passes import RowPass, iterate_rows, ordered_loader
from lightning_influence.scoring import SelfResult, compute_self_scores, self_terms
from lightning_influence.solvers.gauss_newton import CurvatureSolver
from lightning_influence.task import Task, resolve_task
from lightning_influence.tracking import LayerTracker

__all__ = ["self_influence", "solver_self_scores"]


def self_influence(model: nn.Module, preconditioner: Any, loader: Any,
                   task: Task | str | None = None, *, indices: Sequence[int] | Tensor | None = None,
                   batch_size: int = 64, tracker: LayerTracker | None = None) -> Tensor:
    """``score(z_n, z_n) = grad L_n^T P(grad L_n)`` ``[M]`` for examples ``indices`` of a loader.

    Works with any Factors-like ``preconditioner`` (a solver, or EK-FAC :class:`Factors`):
    per-example gradients are built for the chosen examples (all when ``indices`` is None) and
    preconditioned ``batch_size`` at a time.
    """
    layer_terms, _ = _self_terms(model, preconditioner, loader, task, indices=indices,
                                 batch_size=batch_size, tracker=tracker)
    return layer_terms.sum(0)


def solver_self_scores(model: nn.Module, solver: CurvatureSolver, loader: Any,
                       task: Task | str | None = None, *, normalize: bool = False,
                       batch_size: int = 64, tracker: LayerTracker | None = None,
                       progress: bool = True) -> SelfResult:
    """Self-influence of every training example through a solver: :func:`compute_self_scores`
    over ``loader``'s dataset in batches of ``batch_size`` (one solve with K right-hand sides
    per batch: cheap for :class:`ExplicitGGN`, a full iterative solve for
    :class:`ConjugateGradient` and :class:`LiSSA`)."""
    return compute_self_scores(model, solver, ordered_loader(loader, batch_size), task,
                               normalize=normalize, tracker=tracker, progress=progress)


def _self_terms(model: nn.Module, preconditioner: Any, loader: Any, task: Task | str | None,
                *, indices: Sequence[int] | Tensor | None = None, batch_size: int = 64,
                tracker: LayerTracker | None = None, progress: bool = False,
                ) -> tuple[Tensor, Tensor]:
    """Per-layer self-influence terms ``[L, M]`` (float64) and the training losses ``[M]``."""
    task = resolve_task(task, model)
    tracker = tracker or preconditioner.tracker(model)
    preconditioner.check_fits(tracker)
    dataset = loader.dataset
    chosen = range(len(dataset)) if indices is None else [int(i) for i in indices]
    outside = [i for i in chosen if not 0 <= i < len(dataset)]
    if outside:
        raise IndexError(f"Examples {outside[:5]} are outside the training set of "
                         f"{len(dataset)} examples; pass indices in range({len(dataset)}).")
    sub = DataLoader(Subset(dataset, list(chosen)), batch_size=batch_size, shuffle=False,
                     collate_fn=loader.collate_fn)
    terms, losses = [], []
    spec = RowPass("loss", f"influence: self-influence ({preconditioner.strategy}, per example)",
                   progress)
    for _, _, _, rows, batch_losses in iterate_rows(model, sub, task, tracker, spec, shard=False):
        terms.append(self_terms(preconditioner, rows, batch_losses.shape[0]).cpu())
        losses.append(batch_losses.double().cpu())
    return torch.cat(terms, dim=1), torch.cat(losses)
