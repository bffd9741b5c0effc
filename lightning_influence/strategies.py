"""The strategy table: every way to approximate ``(G + damping)^-1``, in one place.

Index letters: O = d_out, I = d_in (+1 bias) per layer.

A fitted strategy says which passes it needs and how its per-layer eigenvalues ``Lambda [O, I]``
are formed; a solver strategy names the class in :mod:`lightning_influence.solvers` that solves
the damped Gauss-Newton system instead (nothing is fitted or stored). Adding a strategy is one
row here.

========== ============ ============= ===================================================
strategy   covariances  eigenvalue    Lambda [O, I]
           (A, S, eigh) pass
========== ============ ============= ===================================================
identity   no           no            none: P(V) = V
diagonal   no           yes           mean over examples of G_n ** 2
kfac       yes          no            outer(l_S, l_A) * rows per example
ekfac      yes          yes           mean over examples of (Q_S^T G_n Q_A) ** 2
========== ============ ============= ===================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Strategy", "STRATEGY_TABLE", "STRATEGIES", "SOLVER_STRATEGIES", "ALL_STRATEGIES",
           "strategy"]


def _no_eigenvalues(basis: dict[str, Any] | None, computed: dict[str, Tensor] | None) -> None:
    return None


def _kronecker_eigenvalues(basis: dict[str, Any] | None,
                           computed: dict[str, Tensor] | None) -> Tensor:
    """K-FAC: ``outer(l_S, l_A)`` on the per-example scale (times the mean rows per example)."""
    assert basis is not None
    return torch.outer(basis["l_s"], basis["l_a"]) * basis["rows_per_example"]


def _corrected_eigenvalues(basis: dict[str, Any] | None,
                           computed: dict[str, Tensor] | None) -> Tensor:
    """EK-FAC and diagonal: the eigenvalue pass's mean of squared rotated gradients."""
    assert computed is not None
    return computed["eigenvalues"].double()


@dataclass(frozen=True)
class Strategy:
    """One row of the table.

    Attributes:
        name: the name users pass (``strategy=...``).
        needs_covariances: the covariance pass and the eigendecompositions of A and S.
        needs_eigenvalue_pass: the pass that averages squared per-example gradients (in the
            Kronecker eigenbasis when there is one).
        eigenvalues: ``(basis, eigenvalue statistics) -> Lambda [O, I]`` (or None).
        solver: for a solver strategy, the class name in :mod:`lightning_influence.solvers`.
    """

    name: str
    needs_covariances: bool = False
    needs_eigenvalue_pass: bool = False
    eigenvalues: Callable[[dict[str, Any] | None, dict[str, Tensor] | None], Tensor | None] = \
        _no_eigenvalues
    solver: str | None = None

    @property
    def stored(self) -> tuple[str, ...]:
        """The tensors a factor file holds per layer."""
        if self.solver is not None or self.eigenvalues is _no_eigenvalues:
            return ()
        return ("eigenvalues", "basis_in", "basis_out") if self.needs_covariances else (
            "eigenvalues",)


STRATEGY_TABLE: dict[str, Strategy] = {s.name: s for s in (
    Strategy("identity"),
    Strategy("diagonal", needs_eigenvalue_pass=True, eigenvalues=_corrected_eigenvalues),
    Strategy("kfac", needs_covariances=True, eigenvalues=_kronecker_eigenvalues),
    Strategy("ekfac", needs_covariances=True, needs_eigenvalue_pass=True,
             eigenvalues=_corrected_eigenvalues),
    Strategy("explicit", solver="ExplicitGGN"),
    Strategy("cg", solver="ConjugateGradient"),
    Strategy("lissa", solver="LiSSA"),
    Strategy("arnoldi", solver="Arnoldi"),
)}

STRATEGIES = tuple(n for n, s in STRATEGY_TABLE.items() if s.solver is None)
SOLVER_STRATEGIES = tuple(n for n, s in STRATEGY_TABLE.items() if s.solver is not None)
ALL_STRATEGIES = STRATEGIES + SOLVER_STRATEGIES


def strategy(name: str, fitted_only: bool = False) -> Strategy:
    """The table row of ``name``; a clear error naming the choices otherwise."""
    row = STRATEGY_TABLE.get(name)
    if row is None or (fitted_only and row.solver is not None):
        choices = STRATEGIES if fitted_only else ALL_STRATEGIES
        raise ValueError(f"Unknown strategy {name!r}; choose one of {list(choices)}.")
    return row
