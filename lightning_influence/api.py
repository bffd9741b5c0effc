"""Lightning-free entry points: fit curvature factors, then score queries against training data.

Index letters: Q queries, N training examples, L tracked layers, O = d_out, I = d_in (+1 bias).

Typical use::

    factors = fit_factors(model, train_loader, "classification", strategy="ekfac")
    result = compute_pairwise_scores(model, factors, query_loader, train_loader,
                                     "classification", top_k=10)
    self_scores = compute_self_scores(model, factors, train_loader, "classification").scores

Training loaders must iterate in a fixed order (no shuffling): result indices are positions in
that order. Every pass runs the model in eval mode and restores its mode afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
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

from lightning_influence.chunks import ChunkStore, data_fingerprint
from lightning_influence.distributed import (
    all_gather_objects,
    barrier,
    broadcast_object,
    is_distributed,
    numbered_batches,
    rank,
    sampling_generator,
    world_size,
)
from lightning_influence.factors import (
    FactorMismatchError,
    Factors,
    LayerFactors,
    check_strategy,
    eigendecompose,
    model_fingerprint,
    resolve_damping,
)
from lightning_influence.ranking import StreamingTopK, TopKResult
from lightning_influence.scores import (
    pairwise_layer_scores,
    per_example_gradients,
    self_layer_scores,
)
from lightning_influence.statistics import (
    CovarianceStatistic,
    EigenvalueStatistic,
    check_finite,
    is_finite,
)
from lightning_influence.task import Task, finite_or_raise, resolve_task
from lightning_influence.tracking import Capture, LayerTracker

__all__ = [
    "fit_covariances",
    "update_covariances",
    "fit_factors",
    "factors_from_statistics",
    "query_gradients",
    "compute_pairwise_scores",
    "compute_self_scores",
    "PairwiseResult",
    "SelfResult",
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


def _progress(iterable: Any, desc: str, enabled: bool, total: int | None = None):
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False,
                dynamic_ncols=True)


def _tracker(model: nn.Module, tracker: LayerTracker | None, layers, exclude) -> LayerTracker:
    if tracker is not None:
        return tracker
    return LayerTracker(model, layers=layers, exclude=exclude)


def factor_tracker(model: nn.Module, factors: Factors,
                   tracker: LayerTracker | None = None) -> LayerTracker:
    """A tracker over the layers the factors were fitted for; a mismatch is a clear error."""
    if tracker is None:
        try:
            tracker = LayerTracker(model, layers=list(factors.shapes),
                                   batch_layout=getattr(factors, "extra", {}).get("batch_layout", "auto"))
        except ValueError as err:
            raise FactorMismatchError(
                f"These factors were fitted for another model or layer set: {err} Fit factors "
                "for this model (delete the files or pass overwrite=True)."
            ) from err
    return tracker


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
        try:
            outputs = task.forward(model, batch)
        except Exception as err:  # the model's own error, with where it happened
            if hasattr(err, "add_note"):
                where = f"batch {batch_index}" if batch_index is not None else "a batch"
                err.add_note(f"lightning-influence: raised by the model's forward on {where} "
                             f"({type(task).__name__}.forward).")
            raise
        rows, losses = rows_from_outputs(outputs, cap, batch, task, tracker, mode, generator,
                                         batch_index, check=autocast is None)
    if autocast is not None:
        rows = {name: (a.to(autocast), g.to(autocast)) for name, (a, g) in rows.items()}
        check_rows(rows, batch_index)
    return rows, losses


def rows_from_outputs(outputs: Tensor, cap: Capture, batch: Any, task: Task,
                      tracker: LayerTracker, mode: str, generator: torch.Generator | None = None,
                      batch_index: int | None = None, retain_graph: bool = False,
                      check: bool = True,
                      ) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """The backward half of :func:`batch_rows`, for a forward whose tracked layers were
    recorded in ``cap`` and whose model outputs are ``outputs``; ``retain_graph`` keeps the
    graph (the forward of a training step, whose own backward follows)."""
    if mode == "exact":
        return _exact_fisher_rows(outputs, cap, batch, task, tracker, batch_index, retain_graph,
                                  check)
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
    if check:
        check_rows(rows, batch_index)
    return rows, losses.detach()


def _exact_fisher_rows(outputs: Tensor, cap: Capture, batch: Any, task: Task,
                       tracker: LayerTracker, batch_index: int | None, retain_graph: bool,
                       check: bool) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """Rows of the exact Fisher: ``a [N, T, I]`` and the K gradients of the task's
    :meth:`~lightning_influence.task.Task.fisher_losses`, ``g [K*N, T, O]`` (class-major).
    Returns the pseudo-losses summed over K as the losses."""
    pseudo = task.fisher_losses(outputs, batch)
    n = task.logits(outputs).shape[0]
    if pseudo.dim() != 2 or pseudo.shape[1] != n:
        raise ValueError(f"{type(task).__name__}.fisher_losses returned shape "
                         f"{tuple(pseudo.shape)}; it must be [K, N] (N = {n}).")
    where = f"batch {batch_index}" if batch_index is not None else "a batch"
    finite_or_raise(pseudo.detach().sum(0), f"{where} (exact-Fisher pseudo-losses)")
    k = pseudo.shape[0]
    per_k = [tracker.rows(cap, pseudo[j], retain_graph=retain_graph or j < k - 1)
             for j in range(k)]
    rows = {name: (a, torch.cat([p[name][1] for p in per_k]) if k > 1 else g)
            for name, (a, g) in per_k[0].items()}
    if check:
        check_rows(rows, batch_index)
    return rows, pseudo.detach().sum(0)


def check_rows(rows: dict[str, tuple[Tensor, Tensor]], batch_index: int | None) -> None:
    """A clear error naming the layer (and batch) when activation or gradient rows hold NaN/Inf."""
    for name, (a, g) in rows.items():
        check_finite(a, "activations", name, batch_index)
        check_finite(g, "output gradients", name, batch_index)


def iterate_rows(model: nn.Module, loader: Any, task: Task, tracker: LayerTracker, mode: str, *,
                 desc: str, progress: bool = True, seed: int = 0, max_batches: int | None = None,
                 shard: bool = True, skip: set[int] | None = None,
                 autocast: torch.dtype | None = None,
                 ) -> Iterator[tuple[int, int, Any, dict[str, tuple[Tensor, Tensor]], Tensor]]:
    """Yield ``(batch_index, first_example_index, batch, rows, losses)`` with checks and progress.

    Inside a process group (and with ``shard``), each rank gets its round-robin share of the
    batches (see :mod:`lightning_influence.distributed`). Labels are sampled with a generator
    seeded by ``seed`` and the batch index, so the draw does not depend on the sharding.
    Batch indices in ``skip`` (finished in an earlier, interrupted run) are left out.
    """
    seen: set[str] = set()
    count = 0
    total, batches = numbered_batches(loader, shard=shard, skip=skip)
    if max_batches is not None:
        total = -1
    with evaluation_mode(model):
        for b, offset, batch in _progress(batches, desc, progress, total if total >= 0 else None):
            if max_batches is not None and b >= max_batches:
                break
            generator = sampling_generator(seed, b) if mode == "sampled" else None
            rows, losses = batch_rows(model, batch, task, tracker, mode, generator, b, autocast)
            seen.update(rows)
            count += 1
            yield b, offset, batch, rows, losses
    if count == 0 and not is_distributed() and not skip:
        raise ValueError(f"The dataloader for {desc!r} yielded no batch: influence needs data.")
    if count:
        tracker.warn_unused(seen, desc)


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


def row_mode(fisher: str) -> str:
    """The loss whose gradients are the rows of a Fisher choice (see :func:`batch_rows`)."""
    return _ROW_MODES[fisher_mode(fisher)]


def new_covariances(tracker: LayerTracker, device: torch.device | None = None,
                    ) -> dict[str, CovarianceStatistic]:
    """Fresh, empty covariance statistics for every tracked layer."""
    return {layer.name: CovarianceStatistic(layer.d_in, layer.d_out).to(device or "cpu")
            for layer in tracker}


def update_covariances(model: nn.Module, batch: Any, task: Task, tracker: LayerTracker,
                       covariances: dict[str, CovarianceStatistic],
                       generator: torch.Generator | None = None,
                       batch_index: int | None = None, fisher: str = "sampled") -> None:
    """Add one batch to the covariances (one forward and one backward with sampled labels, or
    one backward per class with ``fisher="exact"``)."""
    with evaluation_mode(model):
        rows, _ = batch_rows(model, batch, task, tracker, row_mode(fisher), generator,
                             batch_index)
    add_rows(covariances, rows, task.row_mask(move_to_device(batch, model_device(model))))


def add_rows(covariances: dict[str, CovarianceStatistic], rows: dict[str, tuple[Tensor, Tensor]],
             mask: Tensor | None) -> None:
    """Add every layer's rows ``(a, g)`` (with the task's row mask) to its covariances. A
    tracked layer that did not run on this batch still counts its examples: its curvature is
    a mean over every training example, and those contribute zero."""
    for name, (a, g) in rows.items():
        covariances[name].accumulate(a, g, mask)
    n = next(iter(rows.values()))[0].shape[0] if rows else 0
    for name in covariances.keys() - rows.keys():
        covariances[name].examples.add_(n)


def fit_covariances(model: nn.Module, loader: Any, task: Task | str | None = None, *,
                    tracker: LayerTracker | None = None, layers: Sequence[str] | None = None,
                    exclude: Sequence[str] | None = None, seed: int = 0,
                    max_batches: int | None = None, progress: bool = True,
                    covariances: dict[str, CovarianceStatistic] | None = None,
                    fisher: str = "sampled",
                    ) -> dict[str, CovarianceStatistic]:
    """Accumulate the K-FAC covariances ``A`` and ``S`` over a dataloader (``fisher``: see
    :func:`fisher_mode`).

    Returns per layer a :class:`CovarianceStatistic` (sums; ``compute()`` divides and, under
    ``torch.distributed``, sums across processes first).
    """
    task = resolve_task(task, model)
    tracker = _tracker(model, tracker, layers, exclude)
    check_loader(loader, "covariance")
    covs = covariances if covariances is not None else new_covariances(tracker)
    for _, _, batch, rows, _ in iterate_rows(model, loader, task, tracker, row_mode(fisher),
                                          desc="influence: covariances", progress=progress,
                                          seed=seed, max_batches=max_batches):
        add_rows(covs, rows, task.row_mask(move_to_device(batch, model_device(model))))
    return covs


def eigenbases(covariances: dict[str, CovarianceStatistic]) -> dict[str, dict[str, Tensor]]:
    """Eigendecompose every layer's ``A`` and ``S`` (float64) -> eigenvalues and eigenvectors.

    Inside a process group, covariances are summed across ranks, layer ``i`` is decomposed on
    rank ``i % W`` only, and the results are shared with every rank.
    """
    out = {}
    computed = {name: stat.result() for name, stat in covariances.items()}  # collective
    me, world = rank(), world_size()
    for i, (name, cov) in enumerate(computed.items()):
        if float(cov["rows"]) == 0:
            raise ValueError(f"Layer {name!r} has no covariance rows: the statistics pass never "
                             "ran it. Exclude it or check the data.")
        if i % world != me:
            continue
        l_a, q_a = eigendecompose(cov["A"], "activation", name)
        l_s, q_s = eigendecompose(cov["S"], "pseudo-gradient", name)
        out[name] = {"l_a": l_a.cpu(), "q_a": q_a.cpu(), "l_s": l_s.cpu(), "q_s": q_s.cpu(),
                     "rows_per_example": float(cov["rows"] / cov["examples"].clamp_min(1)),
                     "examples": float(cov["examples"])}
    if world > 1:
        for i, name in enumerate(computed):
            out[name] = broadcast_object(out.get(name), src=i % world)
    device = next(iter(computed.values()))["A"].device
    return {name: {k: v.to(device) if isinstance(v, Tensor) else v for k, v in b.items()}
            for name, b in out.items()}


def fit_eigenvalues(model: nn.Module, loader: Any, task: Task, tracker: LayerTracker,
                    bases: dict[str, dict[str, Tensor]] | None, *, seed: int = 0,
                    max_batches: int | None = None, progress: bool = True,
                    fisher: str = "sampled") -> dict[str, EigenvalueStatistic]:
    """The eigenvalue-correction pass: Lambda = mean over examples of (Q_S^T G_n Q_A)^2.

    With ``bases=None`` the bases are the identity: the result is the diagonal Fisher.
    """
    stats = {layer.name: EigenvalueStatistic(layer.d_in, layer.d_out) for layer in tracker}
    for _, _, _, rows, _ in iterate_rows(model, loader, task, tracker, row_mode(fisher),
                                         desc="influence: eigenvalue correction", progress=progress,
                                      seed=seed + 1, max_batches=max_batches):
        for name, (a, g) in rows.items():
            if bases is not None:
                a = a @ bases[name]["q_a"].to(a.dtype)
                g = g @ bases[name]["q_s"].to(g.dtype)
            stats[name].update(a, g)
        n = next(iter(rows.values()))[0].shape[0]
        for name in stats.keys() - rows.keys():  # did not run: zero gradient, still examples
            stats[name].examples.add_(n)
    return stats


def factors_from_statistics(tracker: LayerTracker, strategy: str,
                            bases: dict[str, dict[str, Tensor]] | None,
                            eigenvalues: dict[str, EigenvalueStatistic] | None, *,
                            damping: float | str | None = None, damping_factor: float = 0.1,
                            weight_decay: float | None = None) -> Factors:
    """Assemble :class:`Factors` from eigenbases and (corrected) eigenvalues."""
    check_strategy(strategy)
    layers: dict[str, LayerFactors] = {}
    num_examples = 0
    for layer in tracker:
        name = layer.name
        lam = q_a = q_s = None
        if strategy in ("kfac", "ekfac"):
            assert bases is not None
            q_a, q_s = bases[name]["q_a"], bases[name]["q_s"]
            num_examples = int(bases[name]["examples"])
        if strategy == "kfac":
            b = bases[name]
            lam = torch.outer(b["l_s"], b["l_a"]) * b["rows_per_example"]
        elif strategy in ("ekfac", "diagonal"):
            assert eigenvalues is not None
            computed = eigenvalues[name].result()
            lam = computed["eigenvalues"].double()
            num_examples = int(computed["examples"])
            if not torch.isfinite(lam).all():
                raise FloatingPointError(f"Non-finite eigenvalues for layer {name!r}.")
        layer_damping = resolve_damping(damping, lam, damping_factor, weight_decay)
        if lam is not None and not layer_damping > 0 and not bool((lam > 0).all()):
            raise FloatingPointError(
                f"Layer {name!r} has " + ("no curvature at all (every eigenvalue is 0: it never ran "
                "in the pass, or its output does not affect the loss, e.g. a head the loss "
                "ignores or a language model whose labels are all ignored)" if not bool((lam > 0).any()) else
                "zero eigenvalues (e.g. dead units)") + f" and damping {layer_damping}: every "
                "score would be NaN or infinite. Exclude the layer (exclude=[...]) or pass a "
                "positive damping (a number, or 'weight_decay')."
            )
        layers[name] = LayerFactors(lam, q_a, q_s, layer_damping)
    return Factors(strategy, layers, tracker.describe(), model_fingerprint(tracker), num_examples,
                   {"damping_rule": damping if damping is not None else "heuristic",
                    "damping_factor": damping_factor})


def fit_factors(model: nn.Module, loader: Any, task: Task | str | None = None, *,
                strategy: str = "ekfac", layers: Sequence[str] | None = None,
                exclude: Sequence[str] | None = None, tracker: LayerTracker | None = None,
                damping: float | str | None = None, damping_factor: float = 0.1,
                weight_decay: float | None = None,
                covariances: dict[str, CovarianceStatistic] | None = None,
                output_dir: str | Path | None = None, overwrite: bool = False, seed: int = 0,
                max_batches: int | None = None, progress: bool = True,
                write: bool = True, fisher: str = "sampled") -> Factors:
    """Fit the curvature factors of a model on a dataloader.

    Args:
        model: the trained model (any ``nn.Module``; a LightningModule works).
        loader: training data, batches as the task expects them.
        task: a :class:`~lightning_influence.task.Task` or a built-in name.
        strategy: ``"identity"``, ``"diagonal"``, ``"kfac"`` or ``"ekfac"``.
        layers, exclude: name patterns of the layers to track (default: every trainable
            Linear, Conv1d, Conv2d and transformers Conv1D; pass ``tracker=LayerTracker(model,
            include_frozen=True)`` to track frozen layers too, or to declare a
            ``batch_layout``).
        damping: a number, ``None``/``"heuristic"`` (``damping_factor`` x mean eigenvalue per
            layer) or ``"weight_decay"`` (with ``weight_decay``).
        covariances: covariance statistics accumulated already (e.g. during training); the
            covariance pass is then skipped.
        output_dir: when given, factors are saved there (atomically) and reused on a rerun if
            they match the model, its layers and the strategy.
        overwrite: refit even when matching factors exist.
        write: write fitted factors to ``output_dir`` (False on non-zero ranks: they only read).
        seed: seed of the label sampling.
        max_batches: cap on the batches of each pass.
        progress: show progress bars.
        fisher: ``"sampled"`` (default: one label per example sampled from the model, as in
            the paper and Kronfluence), ``"exact"`` (every label weighted by its probability:
            the same curvature without sampling noise, one backward per class; classification
            and regression) or ``"empirical"`` (the true labels, as Kronfluence's
            ``use_empirical_fisher``: deterministic, for agreement checks).

    Raises:
        FactorMismatchError: stored factors belong to another model, layer set or strategy.
        ValueError: empty dataloader, unsupported layers, bad arguments.
        FloatingPointError: NaN/Inf in losses, activations, gradients or covariances.
    """
    check_strategy(strategy)
    fisher_mode(fisher)
    task = resolve_task(task, model)
    tracker = _tracker(model, tracker, layers, exclude)
    if output_dir is not None and not overwrite and Factors.exists(output_dir):
        stored = Factors.load(output_dir)
        stored.check_matches(tracker, strategy, source=f"The factors in {output_dir}")
        stored_fisher = stored.extra.get("fisher", "sampled")
        if strategy != "identity" and stored_fisher != fisher:
            raise FactorMismatchError(
                f"The factors in {output_dir} were fitted with fisher={stored_fisher!r}, not "
                f"{fisher!r}. Refit (overwrite=True) or use another output directory."
            )
        log.info("Reusing the factors in %s", output_dir)
        # the curvature is reused; the damping is always the one asked for now
        return stored.with_damping(damping, damping_factor, weight_decay)
    check_loader(loader, "training")
    bases = None
    if strategy in ("kfac", "ekfac"):
        covs = covariances
        if covs is None:
            covs = fit_covariances(model, loader, task, tracker=tracker, seed=seed,
                                   max_batches=max_batches, progress=progress, fisher=fisher)
        bases = eigenbases(covs)
    eigenvalues = None
    if strategy in ("ekfac", "diagonal"):
        eigenvalues = fit_eigenvalues(model, loader, task, tracker, bases, seed=seed,
                                      max_batches=max_batches, progress=progress, fisher=fisher)
    factors = factors_from_statistics(tracker, strategy, bases, eigenvalues, damping=damping,
                                      damping_factor=damping_factor, weight_decay=weight_decay)
    factors.extra["fisher"] = fisher
    factors.extra["batch_layout"] = tracker.batch_layout
    if strategy == "identity":
        factors.num_examples = count_examples(loader)
    if output_dir is not None and write:
        try:
            factors.save(output_dir)
        except OSError as err:  # the fit is not thrown away because its file could not be written
            warnings.warn(
                f"Could not save the fitted factors to {output_dir} ({err}). They are kept in "
                "memory for this run; save them once the folder is fixed with "
                "factors.save(folder), or they are fitted again next time.",
                stacklevel=2,
            )
    return factors


def count_examples(loader: Any) -> int:
    """The number of examples behind a loader, or 0 when it cannot be known without a pass (an
    iterable-style dataset, a list of batches)."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return 0


# ----------------------------------------------------------------------------------- scores
def query_gradients(model: nn.Module, loader: Any, task: Task | str | None, factors: Factors, *,
                    tracker: LayerTracker | None = None, precondition: bool = True,
                    progress: bool = True) -> dict[str, Tensor]:
    """Per-query gradients of the measurement, ``{layer: [Q, O, I]}``, preconditioned by default.

    Preconditioning runs in at least float32 (float64 when the model is float64).
    """
    task = resolve_task(task, model)
    tracker = factor_tracker(model, factors, tracker)
    factors.check_matches(tracker, check_weights=False)
    check_loader(loader, "query")
    chunks: dict[str, list[Tensor]] = {name: [] for name in factors.shapes}
    for _, offset, _, rows, _ in iterate_rows(model, loader, task, tracker, "measurement",
                                              shard=False, desc="influence: query gradients",
                                              progress=progress):
        grads = {}
        n = next(iter(rows.values()))[0].shape[0]
        for name, shape in factors.shapes.items():
            if name not in rows:  # the layer did not run for these queries: zero gradient
                dtype = next(iter(rows.values()))[0].dtype
                grads[name] = torch.zeros(n, *shape, dtype=torch.promote_types(
                    dtype, torch.float32), device=next(iter(rows.values()))[0].device)
                continue
            grad = per_example_gradients(*rows[name])
            grads[name] = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
        _warn_zero_queries(grads, offset)
        if precondition:  # all layers at once: a preconditioner may couple them
            grads = factors.precondition(grads)
        for name, grad in grads.items():
            chunks[name].append(grad)
    return {name: torch.cat(parts) for name, parts in chunks.items() if parts}


def _normalization(factors: Any, normalize: bool) -> float:
    """``1 / N`` with ``normalize`` (N: the training examples the factors were fitted on)."""
    if not normalize:
        return 1.0
    if not factors.num_examples:
        raise ValueError(
            "normalize=True divides by the number of training examples, which these factors do "
            "not know (fitted from data without a length, e.g. an iterable dataset, with "
            "strategy='identity'). Pass normalize=False and divide by N yourself, or set "
            "factors.num_examples = N."
        )
    return 1.0 / factors.num_examples


def _warn_zero_queries(grads: dict[str, Tensor], offset: int) -> None:
    """Warn about queries whose measurement has a zero gradient in every tracked layer (e.g.
    every label ignored): their scores are all 0 and their top-k lists arbitrary."""
    norms = sum(g.reshape(g.shape[0], -1).abs().sum(dim=1) for g in grads.values())
    zero = (norms == 0).nonzero().flatten()
    if len(zero):
        warnings.warn(
            f"Queries {(zero + offset).tolist()[:10]} have a zero gradient in every tracked "
            "layer (a measurement that does not depend on the weights, e.g. every label -100): "
            "their scores are all 0 and their top-k lists carry no information.",
            stacklevel=3,
        )


@dataclass
class PairwiseResult:
    """Pairwise influence of training examples on queries.

    Attributes:
        top: top-k proponents (largest scores) and opponents (smallest) per query.
        scores: the full ``[Q, N]`` matrix, when asked for (``keep_scores=True``).
        layer_scores: ``[L, Q, N]`` per-layer scores when asked for (sums to ``scores``).
        layer_names: the order of the L axis.
        query_losses: ``[Q]`` the measurement of each query.
        num_train: N.
        normalized: True when scores were divided by the number of training examples.
    """

    top: TopKResult
    layer_names: list[str]
    query_losses: Tensor
    num_train: int
    scores: Tensor | None = None
    layer_scores: Tensor | None = None
    normalized: bool = False
    train_losses: Tensor | None = field(default=None, repr=False)


def compute_pairwise_scores(model: nn.Module, factors: Factors, query_loader: Any,
                            train_loader: Any, task: Task | str | None = None, *,
                            top_k: int = 10, keep_scores: bool = True, per_layer: bool = False,
                            normalize: bool = False, tracker: LayerTracker | None = None,
                            query_grads: dict[str, Tensor] | None = None,
                            scores_dir: str | Path | None = None, chunk_batches: int = 16,
                            autocast: torch.dtype | None = None,
                            progress: bool = True) -> PairwiseResult:
    """Score every query against every training example in one streaming pass.

    ``score[q, n] = sum_layers <P(grad L(z_q)), grad L(z_n)>``; positive = proponent (helpful).
    Top-k lists are kept while streaming, so memory does not grow with the training set unless
    ``keep_scores=True`` (the whole ``[Q, N]`` matrix, in memory) is asked for.

    Args:
        top_k: proponents and opponents kept per query.
        keep_scores: return the full ``[Q, N]`` matrix.
        per_layer: keep the per-layer breakdown (``[L, Q, N]`` with ``keep_scores``, and per
            top-k entry).
        normalize: divide scores by the number of training examples (the factors'), giving the
            first-order change of the query loss when the example is removed.
        query_grads: preconditioned query gradients computed already (``query_gradients``).
        scores_dir: write the scores in chunk files there (atomically); a rerun of the same pass
            skips the finished chunks and reads them back (resume after a crash).
        chunk_batches: batches per chunk file.
        autocast: run the model's forward/backward under ``torch.autocast`` with this dtype
            (``torch.bfloat16``/``torch.float16``) and contract in it; preconditioned query
            gradients, Lambda's reciprocal and the score sums stay in float32/float64.

    Inside a process group the training batches are shared out among the ranks; every rank
    returns the same merged result.
    """
    task = resolve_task(task, model)
    tracker = factor_tracker(model, factors, tracker)
    factors.check_matches(tracker)
    check_loader(train_loader, "training", ordered=True)
    with evaluation_mode(model):
        query_losses = _measurements(model, query_loader, task)
    if query_grads is None:
        query_grads = query_gradients(model, query_loader, task, factors, tracker=tracker,
                                      progress=progress)
    names = list(query_grads)
    num_queries = next(iter(query_grads.values())).shape[0]
    scale = _normalization(factors, normalize)
    topk = StreamingTopK(num_queries, top_k, len(names) if per_layer else 0)
    kept: list[dict[str, Tensor]] = []

    def fold(chunk: dict[str, Tensor]) -> None:
        topk.update(chunk["scores"], chunk["indices"], chunk.get("layer_scores"))
        kept.append({k: v for k, v in chunk.items() if keep_scores or k in ("indices", "losses")})

    store = None
    if scores_dir is not None:
        store = ChunkStore(scores_dir, "pairwise", _signature(
            factors, query_losses, top_k=top_k, per_layer=per_layer, scale=scale,
            autocast=str(autocast), train=data_fingerprint(train_loader)), chunk_batches)
    skip = _resume(store, fold)
    for b, offset, _, rows, losses in iterate_rows(
            model, train_loader, task, tracker, "loss", desc="influence: pairwise scores",
            progress=progress, skip=skip, autocast=autocast):
        n = losses.shape[0]
        per = torch.stack([pairwise_layer_scores(query_grads[name], *rows[name])
                           if name in rows else losses.new_zeros(num_queries, n)
                           for name in names]).double().cpu() * scale  # [L, Q, N]
        chunk = {"indices": torch.arange(offset, offset + n), "scores": per.sum(0),
                 "losses": losses.double().cpu()}
        if per_layer:
            chunk["layer_scores"] = per
        fold(chunk)
        if store is not None:
            store.add(b, **chunk)
    if store is not None:
        store.flush()
    topk, kept = _gather(topk, kept)
    merged = _assemble(kept)
    return PairwiseResult(
        top=topk.result(), layer_names=names, query_losses=query_losses,
        num_train=merged["indices"].numel(), scores=merged.get("scores") if keep_scores else None,
        layer_scores=merged.get("layer_scores") if keep_scores else None,
        normalized=scale != 1.0, train_losses=merged["losses"],
    )


def _signature(factors: Factors, query_losses: Tensor | None, **options: Any) -> dict[str, str]:
    """What identifies a scoring pass: the factors, the queries, the options."""
    sig = {"strategy": factors.strategy, "weights": factors.fingerprint.get("weights", ""),
           "damping": json.dumps(factors.damping, sort_keys=True)}
    if not isinstance(factors, Factors):  # a solver: its settings (iterations, scale) count too
        sig["solver"] = json.dumps(getattr(factors, "extra", {}), sort_keys=True, default=str)
    if query_losses is not None:
        sig["queries"] = hashlib.sha256(query_losses.double().numpy().tobytes()).hexdigest()[:16]
    sig.update({k: str(v) for k, v in options.items()})
    return sig


def _resume(store: ChunkStore | None, fold: Callable[[dict[str, Tensor]], None]) -> set[int]:
    """Fold finished chunks in (on rank zero only: merging adds the other ranks' results)."""
    if store is None:
        return set()
    done = store.done_batches()
    barrier()  # every rank reads the finished chunks before any rank writes new ones
    if done and rank() == 0:
        log.info("Resuming: %d finished batches read from %s", len(done), store.folder)
        for chunk in store.load():
            fold({k: v for k, v in chunk.items() if k != "batches"})
    return done


def _gather(topk: StreamingTopK | None, kept: list[dict[str, Tensor]],
            ) -> tuple[StreamingTopK | None, list[dict[str, Tensor]]]:
    """Merge every rank's top-k and kept chunks (identity without a process group)."""
    if not is_distributed():
        return topk, kept
    merged_topk, merged = None, []
    for their_topk, their_kept in all_gather_objects((topk, kept)):
        if their_topk is not None:
            if merged_topk is None:
                merged_topk = their_topk
            else:
                merged_topk.merge(their_topk)
        merged.extend(their_kept)
    return merged_topk, merged


def _assemble(kept: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate chunks along the example axis, ordered by training index."""
    out = {key: torch.cat([c[key] for c in kept], dim=-1) for key in kept[0]}
    order = out["indices"].argsort()
    if not torch.equal(out["indices"][order], torch.arange(order.numel())):
        raise RuntimeError("Scoring chunks do not cover the training set exactly once; delete the "
                           "chunk files and score again.")
    return {key: value[..., order] for key, value in out.items()}


def _measurements(model: nn.Module, loader: Any, task: Task) -> Tensor:
    out = []
    with torch.no_grad():
        for batch in loader:
            batch = move_to_device(batch, model_device(model))
            out.append(task.measurement(task.forward(model, batch), batch).double().cpu())
    if not out:
        raise ValueError("The query dataloader yielded no batch: influence needs queries.")
    return torch.cat(out)


@dataclass
class SelfResult:
    """Self-influence ``score(z_n, z_n)`` of every training example.

    Attributes:
        scores: ``[N]``; large values flag surprising, hard-to-fit examples (mislabeled,
            conflicting duplicates, out-of-distribution).
        layer_scores: ``[L, N]`` per-layer terms (sum to ``scores``).
        losses: ``[N]`` the training loss of each example (the plain baseline ranking).
    """

    scores: Tensor
    layer_scores: Tensor
    layer_names: list[str]
    losses: Tensor
    normalized: bool = False


def compute_self_scores(model: nn.Module, factors: Factors, train_loader: Any,
                        task: Task | str | None = None, *, normalize: bool = False,
                        tracker: LayerTracker | None = None,
                        scores_dir: str | Path | None = None, chunk_batches: int = 16,
                        autocast: torch.dtype | None = None,
                        progress: bool = True) -> SelfResult:
    """Self-influence of every training example, in one pass over the training data.

    ``scores_dir``, ``chunk_batches`` and ``autocast`` work as in
    :func:`compute_pairwise_scores`; inside a process group the batches are shared out.
    """
    task = resolve_task(task, model)
    tracker = factor_tracker(model, factors, tracker)
    factors.check_matches(tracker)
    check_loader(train_loader, "training", ordered=True)
    names = list(factors.shapes)
    scale = _normalization(factors, normalize)
    kept: list[dict[str, Tensor]] = []
    store = None
    if scores_dir is not None:
        store = ChunkStore(scores_dir, "self", _signature(
            factors, None, scale=scale, autocast=str(autocast),
            train=data_fingerprint(train_loader)), chunk_batches)
    skip = _resume(store, kept.append)
    for b, offset, _, rows, losses in iterate_rows(
            model, train_loader, task, tracker, "loss", desc="influence: self-influence",
            progress=progress, skip=skip, autocast=autocast):
        n = losses.shape[0]
        per = torch.stack([
            self_layer_scores(factors.layers[name], *rows[name]).double()
            if name in rows else losses.new_zeros(n, dtype=torch.float64) for name in names
        ]).cpu() * scale  # [L, N]
        chunk = {"indices": torch.arange(offset, offset + n), "scores": per.sum(0),
                 "layer_scores": per, "losses": losses.double().cpu()}
        kept.append(chunk)
        if store is not None:
            store.add(b, **chunk)
    if store is not None:
        store.flush()
    _, kept = _gather(None, kept)
    merged = _assemble(kept)
    return SelfResult(merged["scores"], merged["layer_scores"], names, merged["losses"],
                      normalized=scale != 1.0)
