"""Reference solvers for the damped Gauss-Newton system: explicit inverse, CG, LiSSA and Arnoldi.

Index letters: K vectors solved at once (queries, or examples), N training examples of a batch,
C model outputs per example, O = d_out, I = d_in (+1 bias), P = sum over tracked layers of O * I.

Each solver applies ``(G + D)^-1`` to gradient-shaped vectors, where

    G = (1/N) sum_n J_n^T H_n J_n,   J_n = d f(x_n) / d theta  [C, P],   H_n = d^2 L_n / d f^2  [C, C]

is the Gauss-Newton matrix of the MEAN training loss over the parameters of the tracked layers
(cross-layer blocks included, unlike EK-FAC's block-diagonal approximation), with ``L_n`` the
task's per-example loss summed over tokens (cross-entropy: ``H_n = diag(p_n) - p_n p_n^T``;
squared error: the identity), and ``D`` the damping, one value per layer.

The product ``G v`` is never formed from G: ``J v`` comes from forward mode (``torch.func.jvp``),
``H (J v)`` from forward-over-reverse on the task's loss, ``J^T u`` from reverse mode
(``torch.func.vjp``); K vectors go through at once under ``torch.func.vmap``.

- :class:`ExplicitGGN` builds G densely (P columns of products) and factorises ``G + D``: exact,
  for models with a few thousand parameters.
- :class:`ConjugateGradient` runs (optionally EK-FAC-preconditioned) CG on ``G + D`` with the
  full-data product: exact at convergence, one pass over the training data per iteration.
- :class:`LiSSA` (Agarwal et al. 2017) runs the stochastic Neumann series
  ``h_j = v + (I - (G_j + D) / scale) h_{j-1}``, ``(G + D)^-1 v ~ h_J / scale``, with ``G_j`` the
  product on the j-th random mini-batch.
- :class:`Arnoldi` (Schioppa et al. 2022) keeps the top eigenpairs of G from a Krylov subspace
  and inverts the damped low-rank approximation exactly (Woodbury).

Each is a :class:`~lightning_influence.factors.Preconditioner`, like the fitted factors, so
every scoring function takes one where it takes EK-FAC factors. A solver couples the layers
(``layerwise = False``): ``compute_self_scores`` then preconditions each batch's per-example
gradients of all layers at once instead of contracting layer by layer.

One idea per module:

================= ================================================================
module            what it holds
================= ================================================================
``gauss_newton``  ``GaussNewtonOperator`` (G v), ``CurvatureSolver`` (the base),
                  ``layer_damping``, the ``{layer: [K, O, I]}`` <-> ``[K, P]`` helpers
``explicit``      ``ExplicitGGN``
``cg``            ``ConjugateGradient``
``lissa``         ``LiSSA``
``arnoldi``       ``Arnoldi``
``self_scores``   ``self_influence``, ``solver_self_scores``
================= ================================================================

This module names the solver strategies of the strategy table (:data:`SOLVERS`) and builds one
by name (:func:`make_solver`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_influence.solvers.arnoldi import Arnoldi
from lightning_influence.solvers.cg import ConjugateGradient
from lightning_influence.solvers.explicit import ExplicitGGN
from lightning_influence.solvers.gauss_newton import (
    CurvatureSolver,
    GaussNewtonOperator,
    SolverOptions,
    layer_damping,
)
from lightning_influence.solvers.gauss_newton import Vectors as Vectors
from lightning_influence.solvers.gauss_newton import _flatten as _flatten
from lightning_influence.solvers.gauss_newton import _math_attention as _math_attention
from lightning_influence.solvers.gauss_newton import _unflatten as _unflatten
from lightning_influence.solvers.lissa import LiSSA, LiSSAOptions
from lightning_influence.solvers.self_scores import _self_terms as _self_terms
from lightning_influence.solvers.self_scores import self_influence, solver_self_scores
from lightning_influence.strategies import SOLVER_STRATEGIES, STRATEGY_TABLE
from lightning_influence.task import Task

__all__ = [
    "SOLVERS",
    "GaussNewtonOperator",
    "Arnoldi",
    "CurvatureSolver",
    "ExplicitGGN",
    "ConjugateGradient",
    "LiSSA",
    "LiSSAOptions",
    "SolverOptions",
    "layer_damping",
    "make_solver",
    "self_influence",
    "solver_self_scores",
]

# Vectors, _flatten, _unflatten, _math_attention and _self_terms are re-exported ("as" imports)
# so that imports written before the split into modules keep working.

# the solver strategies of the strategy table, by name
SOLVERS: dict[str, type[CurvatureSolver]] = {
    name: globals()[STRATEGY_TABLE[name].solver] for name in SOLVER_STRATEGIES}


def make_solver(strategy: str, model: nn.Module, loader: Any, task: Task | str | None = None,
                **kwargs: Any) -> CurvatureSolver:
    """Build a solver by name: one of :data:`SOLVERS` (``"explicit"``, ``"cg"``, ``"lissa"``,
    ``"arnoldi"``; kwargs go to its class)."""
    if strategy not in SOLVERS:
        raise ValueError(f"Unknown solver {strategy!r}; choose one of {list(SOLVERS)}.")
    return SOLVERS[strategy](model, loader, task, **kwargs)
