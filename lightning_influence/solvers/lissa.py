"""LiSSA: the stochastic Neumann series for the damped Gauss-Newton inverse (Agarwal et al. 2017).

Index letters: K vectors solved at once, O = d_out, I = d_in (+1 bias).

    h_0 = v,   h_j = v + (I - (G_j + D) / scale) h_{j-1},   (G + D)^-1 v ~ h_J / scale

with ``G_j`` the Gauss-Newton product on the j-th random mini-batch and ``v {layer: [K, O, I]}``.
It converges when ``scale`` exceeds the largest eigenvalue of every ``G_j + D``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from itertools import cycle
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from lightning_influence.options import resolve_options
from lightning_influence.solvers.gauss_newton import CurvatureSolver, Vectors
from lightning_influence.task import Task

__all__ = ["LiSSA", "LiSSAOptions"]

log = logging.getLogger(__name__)


@dataclass
class LiSSAOptions:
    """The series LiSSA runs.

    Attributes:
        iterations: J, the depth of the series.
        scale: the scale; ``None`` estimates ``scale_safety`` x the largest eigenvalue of the
            mini-batch products by power iteration (``power_iterations`` steps) on
            ``scale_batches`` mini-batches.
        repeats: independent runs averaged.
        batch_size: mini-batch size (default: the loader's).
        seed: seed of the mini-batch draw (each solve restarts it: deterministic).
    """

    iterations: int = 1000
    scale: float | None = None
    repeats: int = 1
    batch_size: int | None = None
    seed: int = 0
    scale_safety: float = 1.2
    scale_batches: int = 4
    power_iterations: int = 30

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.repeats < 1:
            raise ValueError(f"LiSSA: iterations and repeats must be >= 1, got "
                             f"{self.iterations}, {self.repeats}.")
        if self.scale is not None and self.scale <= 0:
            raise ValueError(f"LiSSA: scale must be > 0, got {self.scale}.")


class LiSSA(CurvatureSolver):
    """LiSSA: the stochastic Neumann series for ``(G + D)^-1 v`` (Agarwal et al. 2017).

    ``h_0 = v``, ``h_j = v + h_{j-1} - (G_j h_{j-1} + D h_{j-1}) / scale``, result
    ``h_J / scale``, averaged over ``repeats`` independent runs. ``G_j`` is the product on the
    j-th random mini-batch. The series converges when ``scale`` exceeds the largest eigenvalue
    of every ``G_j + D``; the error of a direction of eigenvalue ``l`` shrinks by
    ``1 - (l + damping) / scale`` per iteration, so about ``scale / damping`` iterations are
    needed.

    Args:
        model, loader, task: as for every :class:`CurvatureSolver`.
        lissa: :class:`LiSSAOptions` (``iterations``, ``scale``, ``repeats``, ``batch_size``,
            ``seed``, ...); its fields may also be keywords, beside the solver's own
            (``damping``, ``tracker``, and :class:`SolverOptions`' fields).
    """

    strategy = "lissa"

    def __init__(self, model: nn.Module, loader: Any, task: Task | str | None = None,
                 lissa: LiSSAOptions | None = None, **kwargs: Any) -> None:
        names = {f.name for f in fields(LiSSAOptions)}
        lissa = resolve_options(LiSSAOptions, lissa,
                                {k: v for k, v in kwargs.items() if k in names}, "LiSSA()")
        super().__init__(model, loader, task, **{k: v for k, v in kwargs.items()
                                                 if k not in names})
        iterations, scale, repeats = lissa.iterations, lissa.scale, lissa.repeats
        batch_size, seed = lissa.batch_size, lissa.seed
        self.iterations = iterations
        self.repeats = repeats
        self.batch_size = batch_size or getattr(loader, "batch_size", None) or 32
        self.seed = seed
        self.scale = scale if scale is not None else lissa.scale_safety * self.estimate_scale(
            lissa.scale_batches, lissa.power_iterations)
        self.extra = {"scale": self.scale, "iterations": iterations, "repeats": repeats,
                      "batch_size": self.batch_size}

    def _batches(self, seed: int) -> Iterator[Any]:
        """An endless stream of random mini-batches (reshuffled every epoch, seeded)."""
        dataset = getattr(self.loader, "dataset", None)
        if dataset is None:  # an iterable loader: cycle it as it comes
            yield from cycle(self.loader)
            return
        gen = torch.Generator().manual_seed(seed)
        drop_last = len(dataset) >= self.batch_size
        loader = DataLoader(dataset, batch_size=self.batch_size,
                            sampler=RandomSampler(dataset, generator=gen),
                            collate_fn=getattr(self.loader, "collate_fn", None),
                            drop_last=drop_last)
        while True:
            yield from loader

    def estimate_scale(self, batches: int = 4, iterations: int = 30) -> float:
        """The largest eigenvalue of ``G_j + D`` over a few mini-batches (power iteration)."""
        stream = self._batches(self.seed + 7919)
        gen = torch.Generator().manual_seed(self.seed)
        dtype = self.operator.dtype
        top = 0.0
        for _ in range(batches):
            batch = next(stream)
            v = {n: torch.randn(1, *s, generator=gen, dtype=dtype) for n, s in self.shapes.items()}
            value = 0.0
            for _ in range(iterations):
                norm = math.sqrt(sum(float(x.square().sum()) for x in v.values()))
                v = {n: x / norm for n, x in v.items()}
                prod, count = self._product(batch, v)
                dv = self.damp(v)
                gv = {n: prod[n] / count + dv[n] for n in self.names}
                value = sum(float((gv[n] * v[n]).sum()) for n in self.names)
                v = gv
            top = max(top, value)
        return top

    def solve(self, vectors: Vectors) -> Vectors:
        total = {n: torch.zeros_like(v) for n, v in vectors.items()}
        for r in range(self.repeats):
            for _, estimate in self.series(vectors, [self.iterations], repeat=r):
                for n in self.names:
                    total[n] += estimate[n]
        return {n: v / self.repeats for n, v in total.items()}

    def series(self, vectors: Vectors, steps: Sequence[int], repeat: int = 0,
               ) -> Iterator[tuple[int, Vectors]]:
        """Yield ``(j, h_j / scale)`` at each depth ``j`` in ``steps`` of one run of the series.

        The estimate at depth j is exactly what a solver with ``iterations=j`` (and the same
        seed) returns with one repeat: a single run gives the whole accuracy-versus-depth path.
        """
        wanted = sorted({int(j) for j in steps})
        if not wanted or wanted[0] < 1:
            raise ValueError(f"LiSSA.series: steps must be >= 1, got {list(steps)}.")
        stream = self._batches(self.seed + repeat)
        h = {n: v.clone() for n, v in vectors.items()}
        for j in range(1, wanted[-1] + 1):
            prod, count = self._product(next(stream), h)
            h = {n: vectors[n] + h[n] - (prod[n] / count + self._damping[n] * h[n]) / self.scale
                 for n in self.names}
            if self.progress and j % 100 == 0:
                log.info("LiSSA repeat %d, iteration %d", repeat, j)
            if j in wanted:
                yield j, {n: v / self.scale for n, v in h.items()}
