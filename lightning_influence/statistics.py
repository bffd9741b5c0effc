"""Covariance and eigenvalue sums, distributed-safe.

Index letters: N examples, T rows per example, I = d_in (+1 bias), O = d_out.

Every statistic is a torchmetrics state reduced with ``sum`` across processes; division by the
row or example count happens only in :meth:`compute`, so uneven per-rank counts stay exact.
Sums are kept in ``dtype`` (float64 by default) whatever the model's precision.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["CovarianceStatistic", "EigenvalueStatistic", "check_finite", "is_finite"]


def check_finite(tensor: Tensor, what: str, layer: str, batch_index: int | None = None) -> None:
    """Raise a ``FloatingPointError`` naming the layer (and batch) when ``tensor`` has NaN/Inf."""
    if not is_finite(tensor):
        where = f" in batch {batch_index}" if batch_index is not None else ""
        raise FloatingPointError(
            f"Non-finite {what} for layer {layer!r}{where}. Influence cannot be computed from NaN "
            "or Inf values: check the data and the model (a diverged training run, a bad input)."
        )


def is_finite(tensor: Tensor) -> bool:
    """Whether every element is finite, from one float32/64 sum (a NaN or Inf anywhere makes the
    sum NaN or Inf): cheaper than ``isfinite(tensor).all()``, which builds a full boolean tensor
    and is the largest cost of a small covariance update. A sum that overflows although every
    element is finite (magnitudes near 1e38) also counts as non-finite: such rows would overflow
    the covariances anyway."""
    if tensor.numel() == 0:
        return True
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(tensor.sum(dtype=dtype)))


class CovarianceStatistic(Metric):
    """Sums of ``a a^T`` and ``g g^T`` over activation / pseudo-gradient rows of one layer.

    ``compute()`` returns ``A = sum a a^T / rows`` ``[I, I]`` and ``S = sum g g^T / rows``
    ``[O, O]``; ``rows`` and ``examples`` are also kept so that K-FAC can put its
    eigenvalues on the per-example scale of the EK-FAC correction.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype = torch.float64,
                 fold_every: int = 16) -> None:
        super().__init__()
        self.add_state("activation_sum", torch.zeros(d_in, d_in, dtype=dtype),
                       dist_reduce_fx="sum")
        self.add_state("gradient_sum", torch.zeros(d_out, d_out, dtype=dtype),
                       dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("examples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        # Rows in another dtype than the sums (float32, bf16) are multiplied in float32 straight
        # into these buffers (addmm_, no temporaries) and folded into the sums every
        # ``fold_every`` updates: on a 1024-wide layer an update then costs 1.3 ms instead of
        # 3.1 ms (a float32 product, its float64 copy and an add), which is what makes
        # covariance updates during training cheap.
        self.fold_every = fold_every
        self._pending_updates = 0
        self.add_state("activation_pending", torch.zeros(d_in, d_in, dtype=torch.float32),
                       dist_reduce_fx="sum")
        self.add_state("gradient_pending", torch.zeros(d_out, d_out, dtype=torch.float32),
                       dist_reduce_fx="sum")

    def update(self, a: Tensor, g: Tensor, mask: Tensor | None = None) -> None:  # type: ignore[override]
        """Add a batch: ``a [N, T, I]``, ``g [N, T, O]`` or ``[K*N, T, O]`` (the K gradient rows
        per example of the exact Fisher, class-major: their outer products add up), optional
        row mask ``[N, T]``."""
        self._add(a, g, mask)

    def accumulate(self, a: Tensor, g: Tensor, mask: Tensor | None = None) -> None:
        """:meth:`update` without torchmetrics' per-call wrapper: the same sums, the cached
        ``compute()`` result dropped and the update counted, about 40 us less per call (a third
        of a small layer's update; the covariance updates during training take this path)."""
        state = self.__dict__  # plain attributes: no nn.Module.__setattr__ on the hot path
        state["_computed"] = None
        state["_update_count"] = state.get("_update_count", 0) + 1
        self._add(a, g, mask)

    def _add(self, a: Tensor, g: Tensor, mask: Tensor | None) -> None:
        if mask is not None and mask.shape == a.shape[:2]:
            m = mask.to(a.dtype).unsqueeze(-1)
            a = a * m
            g = g * m.repeat(g.shape[0] // a.shape[0], 1, 1).to(g.dtype)
            rows = mask.sum()
        else:
            rows = a.shape[0] * a.shape[1]
        a2 = a.reshape(-1, a.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        if a2.dtype == self.activation_sum.dtype and g2.dtype == self.gradient_sum.dtype:
            self.activation_sum.addmm_(a2.T, a2)
            self.gradient_sum.addmm_(g2.T, g2)
        else:
            if a2.dtype == torch.bfloat16 and g2.dtype == torch.bfloat16:
                # bfloat16 rows (row_dtype="bfloat16", bf16 models) are multiplied as they are,
                # 3-4x faster than in float32 where the hardware has bfloat16 products: one
                # rounding of each batch's product, errors that average out over the batches
                self.activation_pending.add_(a2.T @ a2)
                self.gradient_pending.add_(g2.T @ g2)
            else:
                a2, g2 = a2.float(), g2.float()
                self.activation_pending.addmm_(a2.T, a2)
                self.gradient_pending.addmm_(g2.T, g2)
            self._pending_updates += 1
            if self._pending_updates >= self.fold_every:
                self._fold()
        self.rows.add_(rows)  # in place: no Module.__setattr__ on the hot path
        self.examples.add_(a.shape[0])

    def _fold(self) -> None:
        """Move the float32 buffers into the sums."""
        self.activation_sum += self.activation_pending
        self.gradient_sum += self.gradient_pending
        self.activation_pending.zero_()
        self.gradient_pending.zero_()
        self._pending_updates = 0

    def sums(self) -> dict[str, Tensor]:
        """The local (unsynced) sums, for checkpoints."""
        return {k: v.detach().cpu().clone() for k, v in self.metric_state.items()}

    def load_sums(self, sums: dict[str, Tensor]) -> None:
        """Restore sums saved by :meth:`sums` (counts as one update)."""
        for key, value in sums.items():
            current = getattr(self, key)
            if current.shape != value.shape:
                raise ValueError(f"Saved covariance state {key!r} has shape {tuple(value.shape)}, "
                                 f"this layer needs {tuple(current.shape)}.")
            setattr(self, key, value.to(current.device, current.dtype))
        self._update_count += 1

    def result(self) -> dict[str, Tensor]:
        """:meth:`compute` with the matrices' shapes kept: torchmetrics squeezes a one-element
        result to 0-d, which would turn the ``[1, 1]`` covariance of a layer with one output
        (a regression head) or one input into a scalar."""
        out = dict(self.compute())
        out["A"] = out["A"].reshape(self.activation_sum.shape)
        out["S"] = out["S"].reshape(self.gradient_sum.shape)
        return out

    def compute(self) -> dict[str, Tensor]:
        """``{"A": [I, I], "S": [O, O], "rows": [], "examples": []}`` (summed over processes)."""
        rows = self.rows.clamp_min(1)
        a_sum = self.activation_sum + self.activation_pending
        s_sum = self.gradient_sum + self.gradient_pending
        return {"A": a_sum / rows, "S": s_sum / rows,
                "rows": self.rows.clone(), "examples": self.examples.clone()}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that squares and sums of ``dtype`` products are taken in: float32 for 16-bit
    rows (their products are rounded to 8 or 11 bits), the rows' own dtype otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class EigenvalueStatistic(Metric):
    """Sum over examples of the squared per-example gradient in a Kronecker eigenbasis.

    For each example, ``G_n = sum_t g_nt a_nt^T`` ``[O, I]``; this sums
    ``(Q_S^T G_n Q_A) ** 2`` and ``compute()`` returns the mean over examples: the EK-FAC
    eigenvalues Lambda ``[O, I]``. With identity bases it is the diagonal Fisher.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype = torch.float64,
                 chunk_elements: int = 2**22) -> None:
        super().__init__()
        self.chunk_elements = chunk_elements
        self.add_state("eigenvalue_sum", torch.zeros(d_out, d_in, dtype=dtype),
                       dist_reduce_fx="sum")
        self.add_state("examples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, a_rot: Tensor, g_rot: Tensor) -> None:  # type: ignore[override]
        """Add rotated rows ``a_rot = a Q_A [N, T, I]`` and ``g_rot = g Q_S [N, T, O]`` (or
        ``[K*N, T, O]``: K gradients per example, class-major, whose squares add up)."""
        n, t, i = a_rot.shape
        o = g_rot.shape[-1]
        k = g_rot.shape[0] // n
        if t == 1:
            # (g'_n a'_n^T)^2 = g'^2_n (a'^2_n)^T: no per-example matrix needed.
            g_sq = g_rot[:, 0].square().reshape(k, n, o).sum(dim=0)
            total = g_sq.T @ a_rot[:, 0].square()
        else:
            step = max(1, self.chunk_elements // (o * i))
            total = a_rot.new_zeros(o, i, dtype=accumulation_dtype(a_rot.dtype))
            for j in range(k):
                g_j = g_rot[j * n:(j + 1) * n]
                for s in range(0, n, step):
                    per_example = torch.einsum("nto,nti->noi", g_j[s:s + step], a_rot[s:s + step])
                    # squared in place (at least float32), then summed: no second buffer
                    total += per_example.to(total.dtype).square_().sum(dim=0)
        self.eigenvalue_sum.add_(total)
        self.examples.add_(n)

    def result(self) -> dict[str, Tensor]:
        """:meth:`compute` with the ``[O, I]`` shape kept (see CovarianceStatistic.result)."""
        out = dict(self.compute())
        out["eigenvalues"] = out["eigenvalues"].reshape(self.eigenvalue_sum.shape)
        return out

    def compute(self) -> dict[str, Tensor]:
        """``{"eigenvalues": [O, I], "examples": []}`` (summed over processes)."""
        return {"eigenvalues": self.eigenvalue_sum / self.examples.clamp_min(1),
                "examples": self.examples.clone()}
