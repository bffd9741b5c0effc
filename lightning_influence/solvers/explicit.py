"""The exact solver: the dense damped Gauss-Newton matrix, factorised once.

Index letters: K vectors solved at once, O = d_out, I = d_in (+1 bias), P = sum over tracked
layers of O * I.

``G [P, P]`` is built column by column from full-data products ``G e_p``; then
``x = (G + D)^-1 v`` by Cholesky (a pseudo-inverse when ``G + D`` is singular). Exact, and
``8 P^2`` bytes: for models with a few thousand tracked parameters.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from lightning_influence.solvers.gauss_newton import (
    CurvatureSolver,
    Vectors,
    _flatten,
    _unflatten,
)
from lightning_influence.task import Task

__all__ = ["ExplicitGGN"]

log = logging.getLogger(__name__)


class ExplicitGGN(CurvatureSolver):
    """The dense damped Gauss-Newton matrix ``[P, P]``, factorised once (Cholesky, float64).

    G is built from P columns ``G e_p``, ``chunk`` at a time, with one pass over the training
    data per chunk; memory ``8 P^2`` bytes. For small models only.

    Args:
        max_parameters: refuse models with more tracked parameters than this.
        chunk: columns per pass.
    """

    strategy = "explicit"

    def __init__(self, model: nn.Module, loader: Any, task: Task | str | None = None, *,
                 max_parameters: int = 20_000, chunk: int = 512, **kwargs: Any) -> None:
        super().__init__(model, loader, task, **kwargs)
        p = sum(o * i for o, i in self.shapes.values())
        if p > max_parameters:
            raise ValueError(
                f"ExplicitGGN: the tracked layers have {p} parameters; the dense matrix would "
                f"take {8 * p * p / 2**30:.1f} GiB (max_parameters={max_parameters}). Use "
                "ConjugateGradient or LiSSA, or track fewer layers."
            )
        dtype = self.operator.dtype
        columns = []
        eye = torch.eye(p, dtype=dtype, device=self.operator.device)
        for start in range(0, p, chunk):
            block = _unflatten(eye[start:start + chunk], self.shapes)
            columns.append(_flatten(self.operator.mean_product(loader, block,
                                                               self.block_diagonal), self.names))
        g = torch.cat(columns).T  # [P, P]
        self.matrix = 0.5 * (g + g.T)
        self._diag = torch.cat([torch.full((o * i,), self._damping[n], dtype=dtype)
                                for n, (o, i) in self.shapes.items()]).to(g.device)
        damped = self.matrix + torch.diag(self._diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        self._chol = chol if int(info) == 0 else None
        if self._chol is None:
            log.warning("ExplicitGGN: G + damping is not positive definite (singular without "
                        "damping); using the pseudo-inverse.")
            self._pinv = torch.linalg.pinv(damped, hermitian=True)

    def solve(self, vectors: Vectors) -> Vectors:
        v = _flatten(vectors, self.names)  # [K, P]
        if self._chol is not None:
            x = torch.cholesky_solve(v.T, self._chol).T
        else:
            x = v @ self._pinv
        return _unflatten(x, self.shapes)
