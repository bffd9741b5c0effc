"""Arnoldi influence (Schioppa et al. 2022): a low-rank Gauss-Newton matrix from a Krylov subspace.

Index letters: K vectors solved at once, m Krylov steps, r eigenpairs kept, P = sum over tracked
layers of O * I.

    G ~ U diag(theta) U^T,   U [P, r] Ritz vectors,
    (U diag(theta) U^T + D)^-1 v = D^-1 v - W C (I + U^T W C)^-1 W^T v,   W = D^-1 U, C = diag(theta)

``m`` full-data products build the basis once; every solve of ``v [K, P]`` is then two small
products.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.solvers.gauss_newton import (
    CurvatureSolver,
    Vectors,
    _flatten,
    _unflatten,
)
from lightning_influence.task import Task

__all__ = ["Arnoldi"]

log = logging.getLogger(__name__)


class Arnoldi(CurvatureSolver):
    """Arnoldi influence (Schioppa et al. 2022): the top eigenpairs of G from a Krylov
    subspace, then the inverse of the damped low-rank approximation.

    ``iterations`` Arnoldi steps from a random start (one full-data product ``G v`` each, with
    full re-orthogonalisation; G is symmetric, so this is Lanczos done carefully) give an
    orthonormal basis ``V [P, m]`` and ``H = V^T G V``; the ``rank`` largest eigenpairs
    ``(theta, s)`` of H give Ritz vectors ``U = V s [P, r]`` and ``G ~ U diag(theta) U^T``. Then,
    by the Woodbury identity with the (diagonal, per-layer) damping D,

        (U diag(theta) U^T + D)^-1 v = D^-1 v - W C (I + U^T W C)^-1 W^T v,
        W = D^-1 U,  C = diag(theta),

    exact for that approximation: directions outside span U keep only the damping (Schioppa et
    al. drop them; with damping they are the damping's). Fitting costs ``iterations`` passes
    over the training data and ``8 m P`` bytes; every later solve is two small products.

    Args:
        iterations: Krylov steps m (full-data products).
        rank: eigenpairs kept (at most ``iterations``; default all of them).
        seed: seed of the random start.

    Attributes:
        eigenvalues: ``[r]`` the kept Ritz values, largest first.
    """

    strategy = "arnoldi"

    def __init__(self, model: nn.Module, loader: Any, task: Task | str | None = None, *,
                 iterations: int = 50, rank: int | None = None, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(model, loader, task, **kwargs)
        if iterations < 1:
            raise ValueError(f"Arnoldi: iterations must be >= 1, got {iterations}.")
        if rank is not None and not 1 <= rank <= iterations:
            raise ValueError(f"Arnoldi: rank must be in 1..iterations ({iterations}), got {rank}.")
        d = torch.cat([torch.full((o * i,), self._damping[n], dtype=self.operator.dtype)
                       for n, (o, i) in self.shapes.items()])
        if not bool((d > 0).all()):
            raise ValueError("Arnoldi: the damping must be > 0 on every layer (directions "
                             "outside the Krylov subspace keep only the damping).")
        self.extra.update(iterations=iterations, rank=rank, seed=seed)
        basis, h = self._krylov(iterations, seed)
        theta, s = torch.linalg.eigh(0.5 * (h + h.T))
        keep = theta.argsort(descending=True)[: rank or len(theta)]
        self.eigenvalues = theta[keep]
        u = basis.T @ s[:, keep]  # [P, r] Ritz vectors
        self._d = d
        self._w = u / d[:, None]  # D^-1 U
        c = torch.diag(self.eigenvalues)
        inner = torch.eye(len(keep), dtype=d.dtype) + (u.T @ self._w) @ c
        self._k = c @ torch.linalg.inv(inner)  # C (I + U^T D^-1 U C)^-1

    def _krylov(self, m: int, seed: int) -> tuple[Tensor, Tensor]:
        """``(V [m', P], H [m', m'])``: the orthonormal Krylov basis and ``V G V^T``."""
        gen = torch.Generator().manual_seed(seed)
        size = sum(o * i for o, i in self.shapes.values())
        v = torch.randn(1, size, generator=gen, dtype=self.operator.dtype)
        rows = [v / v.norm()]
        h = torch.zeros(m + 1, m, dtype=self.operator.dtype)
        for j in range(m):
            gv = self.operator.mean_product(self.loader, _unflatten(rows[j], self.shapes),
                                            self.block_diagonal)
            w = _flatten(gv, self.names)
            for _ in range(2):  # Gram-Schmidt twice: orthogonal to working precision
                coeff = torch.cat(rows) @ w[0]
                h[: j + 1, j] += coeff
                w = w - coeff @ torch.cat(rows)
            h[j + 1, j] = w.norm()
            if self.progress and (j + 1) % 10 == 0:
                log.info("Arnoldi step %d of %d", j + 1, m)
            if j + 1 == m or float(h[j + 1, j]) <= 1e-12 * float(h[: j + 1, : j + 1].abs().max()):
                m = j + 1  # the subspace is exhausted (or complete)
                break
            rows.append(w / h[j + 1, j])
        return torch.cat(rows[:m]), h[:m, :m]

    def solve(self, vectors: Vectors) -> Vectors:
        b = _flatten(vectors, self.names).to(self._d.dtype)  # [K, P]
        x = b / self._d - (b @ self._w) @ self._k.T @ self._w.T
        return _unflatten(x, self.shapes)
