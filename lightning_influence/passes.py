"""Passes over batches: each batch of a loader becomes per-layer rows ``(a, g)`` and losses.

Index letters: N examples, T rows per example, I = d_in (+1 bias), O = d_out, K labels per example
(the exact Fisher).

One forward and one backward per batch, in eval mode, with the tracked layers hooked
(:mod:`lightning_influence.tracking`): the loss whose gradient is taken is the task's sampled
pseudo-loss (the true Fisher), its training loss, its exact-Fisher pseudo-losses or the query
measurement. Loader checks (empty, one-shot, order), device moves and progress bars live here too,
so every pass (fitting, scoring, solvers) walks data the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)
from tqdm.auto import tqdm

from lightning_influence.distributed import (
    is_distributed,
    numbered_batches,
    sampling_generator,
)
from lightning_influence.statistics import (
    check_finite,
    is_finite,
)
from lightning_influence.task import Task, finite_or_raise
from lightning_influence.tracking import Capture, LayerTracker

__all__ = [
    "move_to_device",
    "model_device",
    "evaluation_mode",
    "check_loader",
    "order_problem",
    "ordered_loader",
    "count_examples",
    "progress_bar",
    "FISHER",
    "fisher_mode",
    "row_mode",
    "batch_rows",
    "rows_from_outputs",
    "check_rows",
    "RowPass",
    "iterate_rows",
    "return_freed_memory",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- helpers
def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout, frozen batch-norm statistics), then restore the mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_loader(loader: Any, what: str, ordered: bool = False) -> None:
    """Clear errors for one-shot iterators, empty or (when order matters) shuffled loaders."""
    if iter(loader) is loader:
        raise TypeError(
            f"The {what} data is a one-shot iterator ({type(loader).__name__}): influence "
            "iterates it several times (covariances, eigenvalues, scores). Pass something "
            "re-iterable: a DataLoader, or a list of batches."
        )
    try:
        length = len(loader)
    except TypeError:
        length = None
    if length == 0:
        raise ValueError(
            f"The {what} dataloader is empty (0 batches): influence needs data. Check the dataset "
            "size, the batch size with drop_last=True, and any filtering."
        )
    problem = order_problem(loader) if ordered else None
    if problem is not None:
        raise ValueError(
            f"The {what} dataloader {problem}: result indices are positions in the order it "
            "yields, so they would not name examples of its dataset. Pass a loader with "
            "shuffle=False and no sampler (see lightning_influence.ordered_loader)."
        )


def order_problem(loader: Any, whole_dataset_ok: bool = False) -> str | None:
    """Why a DataLoader does not yield its dataset in the dataset's own order, or None.

    Other iterables (a list of batches) and iterable-style datasets count as ordered: their
    order is the one they yield. With ``whole_dataset_ok``, samplers that visit the whole
    dataset once in another order (``RandomSampler`` without replacement, a shuffling
    ``DistributedSampler``) are accepted: a caller that rebuilds an ordered loader over the
    same dataset (the callbacks) only needs the set of examples to be the dataset's.
    """
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        return f"uses a custom batch_sampler ({type(batch_sampler).__name__})"
    sampler = batch_sampler.sampler if batch_sampler is not None else loader.sampler
    if isinstance(sampler, SequentialSampler):
        return None
    whole = (isinstance(sampler, RandomSampler) and not sampler.replacement
             and sampler.num_samples == len(sampler.data_source)) or (
        isinstance(sampler, DistributedSampler) and not sampler.drop_last)
    if whole_dataset_ok and whole:
        return None
    return (f"draws with a {type(sampler).__name__}" + (" (it shuffles)" if whole else ""))


def ordered_loader(loader: DataLoader, batch_size: int | None = None) -> DataLoader:
    """A non-shuffling copy of ``loader`` over the same dataset (same collate_fn, workers). A
    loader without automatic batching (``batch_size=None``: each item is a batch already)
    stays so, whatever ``batch_size`` says."""
    return DataLoader(
        loader.dataset,
        batch_size=None if loader.batch_size is None else batch_size or loader.batch_size,
        shuffle=False,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def count_examples(loader: Any) -> int:
    """The number of examples behind a loader, or 0 when it cannot be known without a pass (an
    iterable-style dataset, a list of batches)."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return 0


def progress_bar(iterable: Any, desc: str, enabled: bool, total: int | None = None):
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False,
                dynamic_ncols=True)


# ----------------------------------------------------------------------------------- factors
FISHER = ("sampled", "exact", "empirical")


_ROW_MODES = {"sampled": "sampled", "exact": "exact", "empirical": "loss"}


def fisher_mode(fisher: str) -> str:
    """Validate a Fisher choice and return it: ``"sampled"`` (one label sampled from the model
    per example, as the paper and Kronfluence: the true Fisher), ``"exact"`` (every label,
    weighted by its probability: no sampling noise, one backward per class) or
    ``"empirical"`` (the true labels: the empirical Fisher, Kronfluence's
    ``use_empirical_fisher``; cheap and deterministic, but not the Gauss-Newton curvature)."""
    if fisher not in FISHER:
        raise ValueError(f"fisher={fisher!r} is not one of {list(FISHER)}.")
    return fisher


ROW_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def row_dtype_of(name: str | None) -> torch.dtype | None:
    """The dtype the influence products run in, from its name (``row_dtype`` of
    :func:`~lightning_influence.fitting.fit_factors`).

    ``None``/``"float32"``: the rows as the model makes them (float32 for a float32 model; the
    reference). ``"bfloat16"``: activation and output-gradient rows are cast to bfloat16 before
    the covariance products, the eigenbasis rotations and the per-example contractions, which
    then run 3-4x faster where the hardware multiplies bfloat16 natively (CPUs with AVX512-BF16
    or AMX, recent GPUs), at about 0.2% relative error per product (8-bit mantissas, errors
    that average out over rows). Sums, squares, eigendecompositions and the reciprocal of
    Lambda + damping stay in float32/float64; the model itself runs unchanged.
    """
    if name not in (None, *ROW_DTYPES):
        raise ValueError(f"row_dtype={name!r} is not one of {[None, *ROW_DTYPES]}.")
    return ROW_DTYPES.get(name) if name is not None else None


def row_mode(fisher: str) -> str:
    """The loss whose gradients are the rows of a Fisher choice (see :func:`batch_rows`)."""
    return _ROW_MODES[fisher_mode(fisher)]


def batch_rows(model: nn.Module, batch: Any, task: Task, tracker: LayerTracker, mode: str,
               generator: torch.Generator | None = None, batch_index: int | None = None,
               autocast: torch.dtype | None = None,
               ) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """One forward + backward: per-layer rows ``(a, g)`` and the per-example losses ``[N]``.

    ``mode`` chooses the loss whose gradient is taken: ``"sampled"`` (labels sampled from the
    model: the true-Fisher pseudo-gradient), ``"loss"`` (the training loss) or ``"measurement"``
    (the query measurement). With ``autocast`` the forward runs under ``torch.autocast`` and
    both row tensors come back in that dtype.
    """
    device = model_device(model)
    batch = move_to_device(batch, device)
    with tracker.capture() as cap, torch.autocast(device.type, dtype=autocast or torch.bfloat16,
                                                  enabled=autocast is not None):
        cap.batch_index = batch_index
        try:
            outputs = task.forward(model, batch)
        except Exception as err:  # the model's own error, with where it happened
            if hasattr(err, "add_note"):
                where = f"batch {batch_index}" if batch_index is not None else "a batch"
                err.add_note(f"lightning-influence: raised by the model's forward on {where} "
                             f"({type(task).__name__}.forward).")
            raise
        rows, losses = rows_from_outputs(outputs, cap, batch, task, tracker, mode, generator)
    if autocast is not None:
        rows = cast_rows(rows, autocast)
    check_rows(rows, batch_index)
    return rows, losses


def rows_from_outputs(outputs: Tensor, cap: Capture, batch: Any, task: Task,
                      tracker: LayerTracker, mode: str, generator: torch.Generator | None = None,
                      retain_graph: bool = False,
                      ) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """The backward half of :func:`batch_rows`, for a forward whose tracked layers were
    recorded in ``cap`` and whose model outputs are ``outputs``; ``retain_graph`` keeps the
    graph (the forward of a training step, whose own backward follows). The rows are not
    checked for NaN/Inf here (:func:`check_rows`: the caller checks them once, after any
    cast)."""
    batch_index = cap.batch_index
    if mode == "exact":
        return _exact_fisher_rows(outputs, cap, batch, task, tracker, retain_graph)
    if mode == "sampled":
        losses = task.sampled_loss(outputs, batch, generator)
    elif mode == "loss":
        losses = task.loss(outputs, batch)
    elif mode == "measurement":
        losses = task.measurement(outputs, batch)
    else:  # pragma: no cover - internal
        raise ValueError(mode)
    if losses.dim() != 1:
        raise ValueError(
            f"{type(task).__name__} returned losses of shape {tuple(losses.shape)}; a task "
            "must return one summed loss per example, shape [N]."
        )
    if not is_finite(losses.detach()):
        # Name the first tracked layer whose inputs are already non-finite, if any.
        bad = [name for name, acts in cap.activations.items()
               if any(not is_finite(a) for a in acts)]
        detail = f"; the first non-finite activations enter layer {bad[0]!r}" if bad else ""
        where = f"batch {batch_index}" if batch_index is not None else "a batch"
        finite_or_raise(losses.detach(), f"{where} ({mode} loss)", detail)
    rows = tracker.rows(cap, losses, retain_graph=retain_graph)
    return rows, losses.detach()


def _exact_fisher_rows(outputs: Tensor, cap: Capture, batch: Any, task: Task,
                       tracker: LayerTracker, retain_graph: bool,
                       ) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """Rows of the exact Fisher: ``a [N, T, I]`` and the K gradients of the task's
    :meth:`~lightning_influence.task.Task.fisher_losses`, ``g [K*N, T, O]`` (class-major).
    Returns the pseudo-losses summed over K as the losses."""
    pseudo = task.fisher_losses(outputs, batch)
    n = task.logits(outputs).shape[0]
    if pseudo.dim() != 2 or pseudo.shape[1] != n:
        raise ValueError(f"{type(task).__name__}.fisher_losses returned shape "
                         f"{tuple(pseudo.shape)}; it must be [K, N] (N = {n}).")
    where = f"batch {cap.batch_index}" if cap.batch_index is not None else "a batch"
    finite_or_raise(pseudo.detach().sum(0), f"{where} (exact-Fisher pseudo-losses)")
    k = pseudo.shape[0]
    per_k = [tracker.rows(cap, pseudo[j], retain_graph=retain_graph or j < k - 1)
             for j in range(k)]
    rows = {name: (a, torch.cat([p[name][1] for p in per_k]) if k > 1 else g)
            for name, (a, g) in per_k[0].items()}
    return rows, pseudo.detach().sum(0)


def cast_rows(rows: dict[str, tuple[Tensor, Tensor]], dtype: torch.dtype,
              ) -> dict[str, tuple[Tensor, Tensor]]:
    """Every layer's rows ``(a, g)`` in ``dtype`` (autocast's, or ``row_dtype``)."""
    return {name: (a.to(dtype), g.to(dtype)) for name, (a, g) in rows.items()}


def check_rows(rows: dict[str, tuple[Tensor, Tensor]], batch_index: int | None) -> None:
    """A clear error naming the layer (and batch) when activation or gradient rows hold NaN/Inf."""
    for name, (a, g) in rows.items():
        check_finite(a, "activations", name, batch_index)
        check_finite(g, "output gradients", name, batch_index)


@dataclass(frozen=True)
class RowPass:
    """What one pass over a loader computes, and how it runs (see :func:`iterate_rows`).

    Attributes:
        mode: the loss whose gradients are the rows (see :func:`batch_rows`): ``"sampled"``,
            ``"exact"``, ``"loss"`` or ``"measurement"``.
        desc: the progress bar's label (and the pass's name in messages).
        progress: show a progress bar.
        seed: seed of the label sampling; with the batch index and ``stream`` it seeds each
            batch's generator, so the draw does not depend on the sharding.
        stream: which pass of a fit this is (covariances 0, eigenvalues 1): each pass draws its
            own labels.
        max_batches: cap on the batches.
        autocast: run the forward under ``torch.autocast`` with this dtype.
        row_dtype: cast the rows to this dtype (see :func:`row_dtype_of`).
    """

    mode: str
    desc: str
    progress: bool = True
    seed: int = 0
    stream: int = 0
    max_batches: int | None = None
    autocast: torch.dtype | None = None
    row_dtype: torch.dtype | None = None

    @classmethod
    def fitting(cls, options: Any, desc: str, stream: int = 0) -> RowPass:
        """The pass of a fit with :class:`~lightning_influence.options.FitOptions`."""
        return cls(row_mode(options.fisher), desc, options.progress, options.seed, stream,
                   options.max_batches, row_dtype=row_dtype_of(options.row_dtype))


def iterate_rows(model: nn.Module, loader: Any, task: Task, tracker: LayerTracker,
                 spec: RowPass, *, shard: bool = True, skip: set[int] | None = None,
                 ) -> Iterator[tuple[int, int, Any, dict[str, tuple[Tensor, Tensor]], Tensor]]:
    """Yield ``(batch_index, first_example_index, batch, rows, losses)`` of the pass ``spec``,
    with checks and progress.

    Inside a process group (and with ``shard``), each rank gets its round-robin share of the
    batches (see :mod:`lightning_influence.distributed`). Batch indices in ``skip`` (finished
    in an earlier, interrupted run) are left out.
    """
    seen: set[str] = set()
    count = 0
    total, batches = numbered_batches(loader, shard=shard, skip=skip)
    if spec.max_batches is not None:
        total = -1
    with evaluation_mode(model):
        for b, offset, batch in progress_bar(batches, spec.desc, spec.progress,
                                             total if total >= 0 else None):
            if spec.max_batches is not None and b >= spec.max_batches:
                break
            generator = (sampling_generator(spec.seed, b, spec.stream) if spec.mode == "sampled"
                         else None)
            rows, losses = batch_rows(model, batch, task, tracker, spec.mode, generator, b,
                                      spec.autocast)
            if spec.row_dtype is not None:
                rows = cast_rows(rows, spec.row_dtype)
            seen.update(rows)
            count += 1
            yield b, offset, batch, rows, losses
    if count == 0 and not is_distributed() and not skip:
        raise ValueError(f"The dataloader for {spec.desc!r} yielded no batch: influence needs "
                         "data.")
    if count:
        tracker.warn_unused(seen, spec.desc)
    return_freed_memory()


def return_freed_memory() -> None:
    """Hand the memory a pass freed back to the system: glibc keeps freed blocks below its
    (growing) mmap threshold in the process's heap, so a pass's batch tensors would otherwise
    stay resident through the next stage (an eigendecomposition, the next pass) and count
    against it. ``malloc_trim`` where glibc is the allocator; nothing elsewhere."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None
