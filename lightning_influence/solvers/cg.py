"""Conjugate gradient on the damped Gauss-Newton system, optionally preconditioned.

Index letters: K right-hand sides solved at once, O = d_out, I = d_in (+1 bias), P = sum over
tracked layers of O * I.

Solves ``(G + D) x = v`` for ``v [K, P]`` with the full-data product (one pass over the
training data per iteration, for all K at once); with a preconditioner M (e.g. EK-FAC factors)
each iteration applies ``z = M^-1 r``. Exact at convergence (``||r|| / ||v|| < rtol``); a solve
that stops at ``max_iterations`` short of it is warned about on the console (the first one of a
solver; all are counted in ``unconverged``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_influence.solvers.gauss_newton import (
    CurvatureSolver,
    Vectors,
    _flatten,
    _unflatten,
)
from lightning_influence.task import Task

__all__ = ["ConjugateGradient"]

log = logging.getLogger(__name__)


class ConjugateGradient(CurvatureSolver):
    """Conjugate gradient on ``(G + D) x = v`` with the full-data Gauss-Newton product.

    All K right-hand sides are solved together (one pass over the training data per iteration
    serves all of them). With ``preconditioner`` (e.g. EK-FAC :class:`Factors`), runs
    preconditioned CG: ``M^-1 r = preconditioner.precondition(r)``.

    Args:
        max_iterations: CG iterations at most.
        rtol: stop when every ``||r|| / ||v||`` is below this.
        preconditioner: optional Factors-like object with ``precondition``.

    Attributes:
        iterations: iterations taken by the last solve; ``residuals [K]``: its final relative
            residuals.
        solves, unconverged: how many solves ran, and how many stopped at ``max_iterations``
            with a relative residual above ``rtol`` (the first such is warned about);
            ``worst_residual``: the largest final relative residual of any solve.
    """

    strategy = "cg"

    def __init__(self, model: nn.Module, loader: Any, task: Task | str | None = None, *,
                 max_iterations: int = 200, rtol: float = 1e-6, preconditioner: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(model, loader, task, **kwargs)
        if max_iterations < 1:
            raise ValueError(f"ConjugateGradient: max_iterations must be >= 1, got "
                             f"{max_iterations}.")
        self.max_iterations = max_iterations
        self.rtol = rtol
        self.preconditioner = preconditioner
        self.iterations = 0
        self.residuals: Tensor | None = None
        self.solves = 0
        self.unconverged = 0
        self.worst_residual = 0.0

    def _apply(self, x: Tensor) -> Tensor:
        v = _unflatten(x, self.shapes)
        gv = self.operator.mean_product(self.loader, v, self.block_diagonal)
        dv = self.damp(v)
        return _flatten({n: gv[n] + dv[n] for n in self.names}, self.names)

    def _m_inv(self, r: Tensor) -> Tensor:
        if self.preconditioner is None:
            return r
        z = self.preconditioner.precondition(_unflatten(r, self.shapes))
        return _flatten({n: z[n].to(r.dtype) for n in self.names}, self.names)

    def solve(self, vectors: Vectors) -> Vectors:
        b = _flatten(vectors, self.names)  # [K, P]
        b_norm = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
        x = torch.zeros_like(b)
        r = b.clone()
        z = self._m_inv(r)
        p = z.clone()
        rz = (r * z).sum(1)
        active = r.norm(dim=1) / b_norm > self.rtol
        it = 0
        for it in range(1, self.max_iterations + 1):  # noqa: B007 - kept for the record
            if not active.any():
                it -= 1
                break
            ap = self._apply(p)
            pap = (p * ap).sum(1)
            alpha = torch.where(active & (pap > 0), rz / pap.clamp_min(torch.finfo(b.dtype).tiny),
                                torch.zeros_like(rz))
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            active = active & (r.norm(dim=1) / b_norm > self.rtol)
            z = self._m_inv(r)
            rz_new = (r * z).sum(1)
            beta = torch.where(active, rz_new / rz.clamp_min(torch.finfo(b.dtype).tiny),
                               torch.zeros_like(rz))
            p = z + beta[:, None] * p
            rz = rz_new
            if self.progress and it % 10 == 0:
                log.info("CG iteration %d: max relative residual %.2e", it,
                         float((r.norm(dim=1) / b_norm).max()))
        self.iterations = it
        self.residuals = (r.norm(dim=1) / b_norm).cpu()
        self._record(float(self.residuals.max()) if len(self.residuals) else 0.0)
        return _unflatten(x, self.shapes)

    def _record(self, worst: float) -> None:
        """Count the solve; warn (once per solver, on the console) when it did not converge."""
        self.solves += 1
        self.worst_residual = max(self.worst_residual, worst)
        if worst <= self.rtol:
            return
        self.unconverged += 1
        message = (f"CG did not converge: relative residual {worst:.2g} after "
                   f"{self.iterations} iterations (rtol {self.rtol:g})")
        if self.unconverged == 1:
            rank_zero_warn(f"lightning-influence: {message}; the scores are approximate. Raise "
                           "max_iterations or the damping, or use a fitted strategy (ekfac, "
                           "kfac). Later unconverged solves are counted, not warned about.")
        else:
            log.info(message)

    def convergence_note(self) -> str | None:
        """A one-line summary when some solve did not converge, else None."""
        if not self.unconverged:
            return None
        return (f"{self.unconverged} of {self.solves} CG solves did not converge within "
                f"{self.max_iterations} iterations (worst relative residual "
                f"{self.worst_residual:.2g}, rtol {self.rtol:g})")
