"""Fitting the curvature: the covariance pass, eigendecompositions, the eigenvalue pass.

Index letters: N examples, T rows per example, I = d_in (+1 bias), O = d_out.

    A = mean over rows of a a^T,  S = mean over rows of g g^T          (covariance pass)
    A = Q_A diag(l_A) Q_A^T,  S = Q_S diag(l_S) Q_S^T                  (float64 eigh)
    Lambda = mean over examples of (Q_S^T G_n Q_A)^2                    (eigenvalue pass)

:func:`fit_factors` runs what a strategy needs and returns :class:`~lightning_influence.Factors`;
with ``output_dir`` it reuses matching factors from disk instead of fitting.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.distributed import (
    EIGENVALUE_STREAM,
    broadcast_object,
    rank,
    world_size,
)
from lightning_influence.factors import (
    Damping,
    FactorMismatchError,
    Factors,
    LayerFactors,
    eigendecompose,
    model_fingerprint,
)
from lightning_influence.passes import (
    batch_rows,
    check_loader,
    count_examples,
    evaluation_mode,
    fisher_mode,
    iterate_rows,
    model_device,
    move_to_device,
    row_dtype_of,
    row_mode,
)
from lightning_influence.statistics import (
    CovarianceStatistic,
    EigenvalueStatistic,
)
from lightning_influence.strategies import strategy as strategy_row
from lightning_influence.task import Task, resolve_task
from lightning_influence.tracking import LayerTracker

__all__ = [
    "fit_covariances",
    "update_covariances",
    "new_covariances",
    "add_rows",
    "eigenbases",
    "fit_eigenvalues",
    "factors_from_statistics",
    "fit_factors",
    "load_or_fit_factors",
]

log = logging.getLogger(__name__)


def _tracker(model: nn.Module, tracker: LayerTracker | None, layers, exclude) -> LayerTracker:
    if tracker is not None:
        return tracker
    return LayerTracker(model, layers=layers, exclude=exclude)


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
                    fisher: str = "sampled", row_dtype: str | None = None,
                    ) -> dict[str, CovarianceStatistic]:
    """Accumulate the K-FAC covariances ``A`` and ``S`` over a dataloader (``fisher``: see
    :func:`fisher_mode`; ``row_dtype``: see :func:`~lightning_influence.passes.row_dtype_of`).

    Returns per layer a :class:`CovarianceStatistic` (sums; ``compute()`` divides and, under
    ``torch.distributed``, sums across processes first).
    """
    task = resolve_task(task, model)
    tracker = _tracker(model, tracker, layers, exclude)
    check_loader(loader, "covariance")
    covs = covariances if covariances is not None else new_covariances(tracker)
    for _, _, batch, rows, _ in iterate_rows(model, loader, task, tracker, row_mode(fisher),
                                          desc="influence: covariances", progress=progress,
                                          seed=seed, max_batches=max_batches,
                                          row_dtype=row_dtype_of(row_dtype)):
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
                    fisher: str = "sampled", row_dtype: str | None = None,
                    ) -> dict[str, EigenvalueStatistic]:
    """The eigenvalue-correction pass: Lambda = mean over examples of (Q_S^T G_n Q_A)^2.

    With ``bases=None`` the bases are the identity: the result is the diagonal Fisher.
    """
    stats = {layer.name: EigenvalueStatistic(layer.d_in, layer.d_out) for layer in tracker}
    for _, _, _, rows, _ in iterate_rows(model, loader, task, tracker, row_mode(fisher),
                                         desc="influence: eigenvalue correction", progress=progress,
                                         seed=seed, stream=EIGENVALUE_STREAM,
                                         max_batches=max_batches,
                                         row_dtype=row_dtype_of(row_dtype)):
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
                            damping: Damping | float | str | None = None) -> Factors:
    """Assemble :class:`Factors` from eigenbases and (corrected) eigenvalues, damped by a
    :class:`~lightning_influence.factors.Damping` (or its rule)."""
    damping = Damping.of(damping)
    row = strategy_row(strategy, fitted_only=True)
    layers: dict[str, LayerFactors] = {}
    num_examples = 0
    for layer in tracker:
        name = layer.name
        q_a = q_s = computed = basis = None
        if row.needs_covariances:
            assert bases is not None
            basis = bases[name]
            q_a, q_s = basis["q_a"], basis["q_s"]
            num_examples = int(basis["examples"])
        if row.needs_eigenvalue_pass:
            assert eigenvalues is not None
            computed = eigenvalues[name].result()
            num_examples = int(computed["examples"])
        lam = row.eigenvalues(basis, computed)
        if lam is not None and not torch.isfinite(lam).all():
            raise FloatingPointError(f"Non-finite eigenvalues for layer {name!r}.")
        layer_damping = damping.resolve(lam)
        if lam is not None and not layer_damping > 0 and not bool((lam > 0).all()):
            what = ("no curvature at all (every eigenvalue is 0: it never ran in the pass, or "
                    "its output does not affect the loss at these weights, e.g. a head the loss "
                    "ignores, a language model whose labels are all ignored, or a LoRA A matrix "
                    "whose B is still zero because the adapter was never trained)"
                    if not bool((lam > 0).any()) else "zero eigenvalues (e.g. dead units)")
            raise FloatingPointError(
                f"Layer {name!r} has {what} and damping {layer_damping}: every score would be "
                "NaN or infinite. Exclude the layer (exclude=[...]) or pass a positive damping "
                "(a number, or 'weight_decay')."
            )
        layers[name] = LayerFactors(lam, q_a, q_s, layer_damping)
    return Factors(strategy, layers, tracker.describe(), model_fingerprint(tracker), num_examples,
                   damping.describe())


def fit_factors(model: nn.Module, loader: Any, task: Task | str | None = None, *,
                strategy: str = "ekfac", layers: Sequence[str] | None = None,
                exclude: Sequence[str] | None = None, tracker: LayerTracker | None = None,
                damping: Damping | float | str | None = None, damping_factor: float = 0.1,
                weight_decay: float | None = None,
                covariances: dict[str, CovarianceStatistic] | None = None,
                output_dir: str | Path | None = None, overwrite: bool = False, seed: int = 0,
                max_batches: int | None = None, progress: bool = True,
                write: bool = True, fisher: str = "sampled",
                row_dtype: str | None = None) -> Factors:
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
            and regression; on the digits MLP it lifts LDS from 0.870 to 0.899 of the exact
            influence's for 1.25x the time, on a conv net it gains nothing for 2.3x: see
            benchmarks/accuracy_ceiling.py) or ``"empirical"`` (the true labels, as
            Kronfluence's ``use_empirical_fisher``: deterministic, for agreement checks).
        row_dtype: ``None`` (default: the rows as the model makes them) or ``"bfloat16"``:
            the covariance products, eigenbasis rotations and per-example contractions run in
            bfloat16 (3-4x faster on hardware with native bfloat16 products, ~0.2% error per
            product); recorded in the factors, and the scoring passes use it too. See
            :func:`~lightning_influence.passes.row_dtype_of`.

    Raises:
        FactorMismatchError: stored factors belong to another model, layer set or strategy.
        ValueError: empty dataloader, unsupported layers, bad arguments.
        FloatingPointError: NaN/Inf in losses, activations, gradients or covariances.
    """
    row = strategy_row(strategy, fitted_only=True)
    rule = Damping.of(damping, damping_factor, weight_decay)  # checked before any pass
    fisher_mode(fisher)
    row_dtype_of(row_dtype)
    task = resolve_task(task, model)
    tracker = _tracker(model, tracker, layers, exclude)

    def fit() -> Factors:
        check_loader(loader, "training")
        bases = None
        if row.needs_covariances:
            covs = covariances
            if covs is None:
                covs = fit_covariances(model, loader, task, tracker=tracker, seed=seed,
                                       max_batches=max_batches, progress=progress, fisher=fisher,
                                       row_dtype=row_dtype)
            bases = eigenbases(covs)
        eigenvalues = None
        if row.needs_eigenvalue_pass:
            eigenvalues = fit_eigenvalues(model, loader, task, tracker, bases, seed=seed,
                                          max_batches=max_batches, progress=progress,
                                          fisher=fisher, row_dtype=row_dtype)
        factors = factors_from_statistics(tracker, strategy, bases, eigenvalues, damping=rule)
        factors.extra["fisher"] = fisher
        factors.extra["batch_layout"] = tracker.batch_layout
        if row_dtype_of(row_dtype) is not None:
            factors.extra["row_dtype"] = row_dtype
        if not (row.needs_covariances or row.needs_eigenvalue_pass):  # no pass counted them
            factors.num_examples = count_examples(loader)
        return factors

    if output_dir is None:
        return fit()
    return load_or_fit_factors(output_dir, fit, tracker=tracker, strategy=strategy, damping=rule,
                               fisher=fisher, overwrite=overwrite, write=write,
                               row_dtype=row_dtype)


def load_or_fit_factors(output_dir: str | Path, fit: Callable[[], Factors], *,
                        tracker: LayerTracker, strategy: str, damping: Damping,
                        fisher: str = "sampled", overwrite: bool = False,
                        write: bool = True, row_dtype: str | None = None) -> Factors:
    """The reuse decision, in one place: the factors in ``output_dir`` when they were fitted
    for this model (layers, shapes, and everything the model computes: see
    :mod:`~lightning_influence.fingerprint`), strategy, Fisher and row dtype, with today's
    ``damping``;
    else ``fit()``, saved there (with ``write``; atomically).

    Raises:
        FactorMismatchError: the stored factors belong to another model, layer set, strategy
            or Fisher (``overwrite=True`` refits).
        CorruptFactorsError: the stored file cannot be trusted (``overwrite=True`` refits).
    """
    if not overwrite and Factors.exists(output_dir):
        stored = Factors.load(output_dir)
        stored.check_fits(tracker, strategy, source=f"The factors in {output_dir}")
        row = strategy_row(strategy)
        stored_fisher = stored.extra.get("fisher", "sampled")
        if (row.needs_covariances or row.needs_eigenvalue_pass) and stored_fisher != fisher:
            raise FactorMismatchError(
                f"The factors in {output_dir} were fitted with fisher={stored_fisher!r}, not "
                f"{fisher!r}. Refit (overwrite=True) or use another output directory."
            )
        stored_rows = stored.extra.get("row_dtype")
        if (row.needs_covariances or row.needs_eigenvalue_pass) and \
                row_dtype_of(stored_rows) != row_dtype_of(row_dtype):
            raise FactorMismatchError(
                f"The factors in {output_dir} were fitted with row_dtype={stored_rows!r}, not "
                f"{row_dtype!r}. Refit (overwrite=True) or use another output directory."
            )
        log.info("Reusing the factors in %s", output_dir)
        # the curvature is reused; the damping is always the one asked for now
        return stored.with_damping(damping)
    factors = fit()
    if write:
        try:
            factors.save(output_dir)
        except OSError as err:  # the fit is not thrown away because its file could not be written
            warnings.warn(
                f"Could not save the fitted factors to {output_dir} ({err}). They are kept in "
                "memory for this run; save them once the folder is fixed with "
                "factors.save(folder), or they are fitted again next time.",
                stacklevel=3,
            )
    return factors
