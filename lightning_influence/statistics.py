"""Covariance and eigenvalue sums, distributed-safe.

Index letters: N examples, T rows per example, I = d_in (+1 bias), O = d_out.

Every statistic is a torchmetrics state reduced with ``sum`` across processes; division by the
row or example count happens only after the sums are reduced, so uneven per-rank counts stay
exact. Sums are kept in ``dtype`` whatever the model's precision: float64 for small layers,
float32 for wide ones (:func:`factor_dtypes`), each large state held once (not twice, as a
torchmetrics default copy would) and freed once consumed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_influence.blocks import add_blocked_outer, blocked_shape
from lightning_influence.distributed import all_reduce_sum_

__all__ = ["CovarianceStatistic", "EigenvalueStatistic", "FACTOR_DTYPES", "factor_dtypes",
           "check_finite", "is_finite"]


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


FACTOR_DTYPES = ("auto", "float64", "float32", "bfloat16")
AUTO_FLOAT64_NUMBERS = 2**22
"""``factor_dtype="auto"`` keeps a layer's factors in float64 while its covariances hold at most
this many numbers (``I^2 + O^2``, e.g. 1448 wide on both sides: 32 MiB in float64) and the
model computes in at most float32; wider layers accumulate and store in float32."""


def factor_dtypes(option: str, d_in: int, d_out: int, rows: torch.dtype = torch.float32,
                  ) -> tuple[torch.dtype, torch.dtype]:
    """``(accumulation dtype, storage dtype)`` of one layer's factors for ``factor_dtype``.

    Sums are accumulated in at least float32; ``"bfloat16"`` stores the eigenbases and
    eigenvalues in bfloat16 (half the memory of the scoring stage) after accumulating in
    float32. ``"auto"``: float64 for small layers or float64 models, float32 otherwise.
    """
    if option not in FACTOR_DTYPES:
        raise ValueError(f"factor_dtype={option!r} is not one of {list(FACTOR_DTYPES)}.")
    if option == "auto":
        small = d_in * d_in + d_out * d_out <= AUTO_FLOAT64_NUMBERS
        option = "float64" if small or rows == torch.float64 else "float32"
    storage = {"float64": torch.float64, "float32": torch.float32,
               "bfloat16": torch.bfloat16}[option]
    return (torch.float64 if storage == torch.float64 else torch.float32), storage


def eigh_dtype_of(option: str, storage: torch.dtype) -> torch.dtype | None:
    """The dtype a layer's covariances are eigendecomposed in for ``eigh_dtype``:
    ``"float64"`` or ``"float32"`` as named; ``"auto"``: float64 for float64 factors, ``None``
    for float32 and bfloat16 ones (decided per side by
    :func:`~lightning_influence.factors.float32_suffices`: float32 for wide sides checked to
    be well conditioned, float64 for the others)."""
    if option == "auto":
        return torch.float64 if storage == torch.float64 else None
    return getattr(torch, option)


class _SumStates(Metric):
    """A torchmetrics ``Metric`` whose large sum states cost their size once.

    ``add_state`` keeps a deep copy of each state's default (for ``reset``), which would double
    the memory of a ``[D, D]`` covariance; here the recorded default is an empty tensor and
    :meth:`reset` zeroes the sums in place instead. :meth:`release` frees them once they are
    consumed (only the counts stay).
    """

    full_state_update = False
    higher_is_better = None

    def _add_sum(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.add_state(name, torch.zeros(0, dtype=dtype), dist_reduce_fx="sum")
        setattr(self, name, torch.zeros(shape, dtype=dtype))
        self.__dict__.setdefault("_sum_shapes", {})[name] = shape

    def reset(self) -> None:
        super().reset()  # counts back to 0, sums to the empty defaults
        for name, shape in self._sum_shapes.items():
            default = self._defaults[name]
            setattr(self, name, torch.zeros(shape, dtype=default.dtype,
                                            device=self.examples.device))
        self.__dict__["released"] = False

    def release(self) -> None:
        """Free the sums (their consumer has taken them); the counts stay."""
        for name in self._sum_shapes:
            setattr(self, name, getattr(self, name).new_zeros(0))
        self.__dict__["released"] = True

    def _check_not_released(self) -> None:
        if self.__dict__.get("released"):
            raise RuntimeError(
                f"This {type(self).__name__}'s sums were consumed (released after the "
                "eigendecomposition); only its counts remain. Accumulate the statistics again.")


class CovarianceStatistic(_SumStates):
    """Sums of ``a a^T`` and ``g g^T`` over activation / pseudo-gradient rows of one layer.

    ``compute()`` returns ``A = sum a a^T / rows`` ``[I, I]`` and ``S = sum g g^T / rows``
    ``[O, O]``; ``rows`` and ``examples`` are also kept so that K-FAC can put its
    eigenvalues on the per-example scale of the EK-FAC correction. With ``block_size``, a side
    wider than it keeps only its diagonal blocks: ``[K, B, B]`` (see
    :mod:`lightning_influence.blocks`).

    Args:
        d_in, d_out: I and O.
        dtype: the sums' dtype (float64, or float32 for wide layers: see :func:`factor_dtypes`).
        fold_every: with float64 sums, rows of another dtype are multiplied in float32 into
            buffers folded into the sums every ``fold_every`` updates.
        block_size: B, or None for whole sides.
    """

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype = torch.float64,
                 fold_every: int = 16, block_size: int | None = None) -> None:
        super().__init__()
        self.block_size = block_size
        self.activation_dim, self.gradient_dim = d_in, d_out
        self.storage_dtype = dtype
        self._add_sum("activation_sum", blocked_shape(d_in, block_size), dtype)
        self._add_sum("gradient_sum", blocked_shape(d_out, block_size), dtype)
        self.add_state("rows", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("examples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        # Rows in another dtype than float64 sums (float32, bf16) are multiplied in float32
        # straight into these buffers (addmm_, no temporaries) and folded into the sums every
        # ``fold_every`` updates: on a 1024-wide layer an update then costs 1.3 ms instead of
        # 3.1 ms (a float32 product, its float64 copy and an add), which is what makes
        # covariance updates during training cheap. Float32 sums need no buffers.
        self.fold_every = fold_every
        self._pending_updates = 0
        buffered = dtype == torch.float64
        self._add_sum("activation_pending",
                      blocked_shape(d_in, block_size) if buffered else (0,), torch.float32)
        self._add_sum("gradient_pending",
                      blocked_shape(d_out, block_size) if buffered else (0,), torch.float32)

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
        self._check_not_released()
        if mask is not None and mask.shape == a.shape[:2]:
            m = mask.to(a.dtype).unsqueeze(-1)
            a = a * m
            g = g * m.repeat(g.shape[0] // a.shape[0], 1, 1).to(g.dtype)
            rows = mask.sum()
        else:
            rows = a.shape[0] * a.shape[1]
        a2 = a.reshape(-1, a.shape[-1])
        g2 = g.reshape(-1, g.shape[-1])
        buffered = self.activation_pending.numel() > 0
        for total, pending, x in ((self.activation_sum, self.activation_pending, a2),
                                  (self.gradient_sum, self.gradient_pending, g2)):
            if x.dtype == total.dtype or not buffered:
                _add_outer(total, x)
            else:
                _add_outer(pending, x)
        if buffered and (a2.dtype != self.activation_sum.dtype
                         or g2.dtype != self.gradient_sum.dtype):
            self._pending_updates += 1
            if self._pending_updates >= self.fold_every:
                self._fold()
        self.rows.add_(rows)  # in place: no Module.__setattr__ on the hot path
        self.examples.add_(a.shape[0])

    def _fold(self) -> None:
        """Move the float32 buffers into the sums."""
        if self.activation_pending.numel():
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
            if key.endswith("_pending") and current.shape != value.shape:
                # saved with float64 sums (buffers) into float32 sums, or the other way round
                if value.numel():
                    getattr(self, key.replace("_pending", "_sum")).add_(value.to(
                        getattr(self, key.replace("_pending", "_sum")).dtype))
                continue
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
        if "A" in out:
            out["A"] = out["A"].reshape(self.activation_sum.shape)
            out["S"] = out["S"].reshape(self.gradient_sum.shape)
        return out

    def compute(self) -> dict[str, Tensor]:
        """``{"A": [I, I], "S": [O, O], "rows": [], "examples": []}`` (summed over processes;
        blocked sides are ``[K, B, B]``). After :meth:`release` only the counts remain."""
        counts = {"rows": self.rows.clone(), "examples": self.examples.clone()}
        if self.__dict__.get("released"):
            return counts
        rows = self.rows.clamp_min(1)
        a_sum, s_sum = self.activation_sum, self.gradient_sum
        if self.activation_pending.numel():
            a_sum, s_sum = a_sum + self.activation_pending, s_sum + self.gradient_pending
        # the lower triangles hold the sums (wide CPU sums are updated there only)
        return {"A": symmetric(a_sum) / rows, "S": symmetric(s_sum) / rows, **counts}

    def take(self, side: str) -> Tensor:
        """One side's mean (``"A"`` or ``"S"``), summed over processes, and that side's sums
        freed: the eigendecomposition's input, one layer and side at a time, without the
        copies of :meth:`compute`. Divides in place; the statistic is spent afterwards. Only
        the lower triangle is meaningful (``torch.linalg.eigh`` reads that one)."""
        self._check_not_released()
        name = "activation_sum" if side == "A" else "gradient_sum"
        total, pending = getattr(self, name), getattr(self, name.replace("_sum", "_pending"))
        if total.numel() == 0:
            raise RuntimeError(f"The {side} side of this covariance was taken already.")
        if pending.numel():
            total += pending
            setattr(self, name.replace("_sum", "_pending"), pending.new_zeros(0))
        if not self.__dict__.get("_counts_reduced"):
            all_reduce_sum_(self.rows)
            all_reduce_sum_(self.examples)
            self.__dict__["_counts_reduced"] = True
        all_reduce_sum_(total)
        total.div_(self.rows.clamp_min(1))
        setattr(self, name, total.new_zeros(0))
        if all(getattr(self, n).numel() == 0 for n in ("activation_sum", "gradient_sum")):
            self.release()
        return total


def _add_outer(total: Tensor, x: Tensor) -> None:
    """``total += x^T x`` for rows ``x [R, D]`` (diagonal blocks only when ``total`` is
    ``[K, B, B]``), without temporaries where the dtypes allow. On the CPU, wide sums are
    updated in their lower triangle only (:func:`_add_lower_outer`, about half the
    multiply-adds): every consumer reads that triangle (:meth:`CovarianceStatistic.compute`
    mirrors it, the eigendecomposition reads it)."""
    if total.dim() == 3:
        add_blocked_outer(total, x if x.dtype in (total.dtype, torch.bfloat16) else
                          x.to(total.dtype))
    elif x.dtype == total.dtype:
        _add_lower_outer(total, x)
    elif x.dtype == torch.bfloat16:
        # bfloat16 rows (row_dtype="bfloat16", bf16 models) are multiplied as they are, 3-4x
        # faster than in float32 where the hardware has bfloat16 products: one rounding of each
        # batch's product, errors that average out over the batches
        total.add_(x.T @ x)
    else:
        _add_lower_outer(total, x.to(total.dtype))


SYRK_MIN_WIDTH = 256
"""On one CPU thread, sides at least this wide go through scipy's BLAS ``syrk`` (measured:
3073 wide, 8192 rows: 0.78 s against 2.1 s for torch's GEMM and 0.91 s in blocks)."""
LOWER_BLOCKS_MIN_WIDTH = 160
"""Otherwise, on the CPU, sides at least this wide are updated block row by block row
(:func:`_add_lower_blocks`); narrower, one GEMM is as fast."""
_BLAS: Any = None


def _add_lower_outer(total: Tensor, x: Tensor) -> None:
    """``tril(total) += tril(x^T x)`` (at least: a GEMM fills the whole matrix) for ``total``
    and ``x`` of one dtype.

    On one CPU thread through scipy's ``syrk``; with more threads, in torch by block rows
    (scipy's OpenBLAS threads beside torch's took two cores for themselves: the character
    transformer's covariance pass ran 2.6x slower on 2 threads, 4.8 s against 1.85 s)."""
    width = total.shape[0]
    if total.device.type == "cpu" and total.is_contiguous():
        if (torch.get_num_threads() == 1 and width >= SYRK_MIN_WIDTH
                and _syrk_lower(total, x)):
            return
        if width >= LOWER_BLOCKS_MIN_WIDTH:
            _add_lower_blocks(total, x)
            return
    total.addmm_(x.T, x)


def _add_lower_blocks(total: Tensor, x: Tensor) -> None:
    """``total += x^T x`` on and below the diagonal blocks of a split of the columns into at
    most 12 blocks (multiples of 16, at least 64 wide): one GEMM per block row, ``(K + 1) / 2K``
    of a whole GEMM's multiply-adds (measured, 2 threads: 3073 wide 1.11 -> 0.50 s, 769 wide
    7.2 -> 4.5 ms, 257 wide 6.2 -> 5.3 ms)."""
    width = total.shape[0]
    blocks = min(12, -(-width // 64))
    step = -(-width // blocks)
    step += -step % 16
    for start in range(0, width, step):
        end = min(start + step, width)
        total[start:end, :end].addmm_(x[:, start:end].T, x[:, :end])


def _syrk_lower(total: Tensor, x: Tensor) -> bool:
    """``tril(total) += tril(x^T x)`` through scipy's BLAS ``?syrk`` on the CPU, in place (the
    C-order lower triangle is the Fortran-order upper one), on one BLAS thread; False where it
    does not apply (another dtype, scipy missing)."""
    global _BLAS
    if total.dtype not in (torch.float32, torch.float64):
        return False
    if _BLAS is None:
        try:
            import threadpoolctl
            from scipy.linalg import blas
            _BLAS = (blas, threadpoolctl.ThreadpoolController())
        except ImportError:  # pragma: no cover - scipy comes with scikit-learn
            _BLAS = False
    if not _BLAS:
        return False
    blas, threads = _BLAS
    syrk = blas.ssyrk if total.dtype == torch.float32 else blas.dsyrk
    c = total.numpy().T  # Fortran view of the same memory
    with threads.limit(limits=1, user_api="blas"):
        syrk(1.0, x.contiguous().numpy().T, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)
    return True


def symmetric(m: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle is ``m``'s (``[..., D, D]``)."""
    lower = torch.tril(m)
    return lower + torch.tril(m, -1).transpose(-1, -2)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that squares and sums of ``dtype`` products are taken in: float32 for 16-bit
    rows (their products are rounded to 8 or 11 bits), the rows' own dtype otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class EigenvalueStatistic(_SumStates):
    """Sum over examples of the squared per-example gradient in a Kronecker eigenbasis.

    For each example, ``G_n = sum_t g_nt a_nt^T`` ``[O, I]``; this sums
    ``(Q_S^T G_n Q_A) ** 2`` and ``compute()`` returns the mean over examples: the EK-FAC
    eigenvalues Lambda ``[O, I]``. With identity bases it is the diagonal Fisher.
    """

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype = torch.float64,
                 chunk_elements: int = 2**22) -> None:
        super().__init__()
        self.chunk_elements = chunk_elements
        self._add_sum("eigenvalue_sum", (d_out, d_in), dtype)
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
        self.eigenvalue_sum.add_(total.to(self.eigenvalue_sum.dtype))
        self.examples.add_(n)

    def result(self) -> dict[str, Tensor]:
        """:meth:`compute` with the ``[O, I]`` shape kept (see CovarianceStatistic.result)."""
        out = dict(self.compute())
        if "eigenvalues" in out:
            out["eigenvalues"] = out["eigenvalues"].reshape(self.eigenvalue_sum.shape)
        return out

    def compute(self) -> dict[str, Tensor]:
        """``{"eigenvalues": [O, I], "examples": []}`` (summed over processes); after
        :meth:`release` only the count."""
        if self.__dict__.get("released"):
            return {"examples": self.examples.clone()}
        return {"eigenvalues": self.eigenvalue_sum / self.examples.clamp_min(1),
                "examples": self.examples.clone()}
