"""Fitting the curvature: the covariance pass, eigendecompositions, the eigenvalue pass.

Index letters: N examples, T rows per example, I = d_in (+1 bias), O = d_out.

    A = mean over rows of a a^T,  S = mean over rows of g g^T          (covariance pass)
    A = Q_A diag(l_A) Q_A^T,  S = Q_S diag(l_S) Q_S^T                  (eigh, see eigh_dtype)
    Lambda = mean over examples of (Q_S^T G_n Q_A)^2                    (eigenvalue pass)

:func:`fit_factors` runs what a strategy needs and returns :class:`~lightning_influence.Factors`;
with ``output_dir`` it reuses matching factors from disk instead of fitting.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.blocks import BlockDiagonal, rows_times
from lightning_influence.distributed import (
    EIGENVALUE_STREAM,
    all_gather_objects,
    broadcast_object,
    broadcast_tensor,
    rank,
    world_size,
)
from lightning_influence.factors import (
    FLOAT32_EIGH_MAX_CONDITION,
    Damping,
    FactorMismatchError,
    Factors,
    LayerFactors,
    eigendecompose,
    eigh_dtype_for,
    model_fingerprint,
)
from lightning_influence.memory import check_plan, plan_memory
from lightning_influence.options import FitOptions, resolve_options
from lightning_influence.passes import (
    RowPass,
    batch_rows,
    check_loader,
    count_examples,
    evaluation_mode,
    iterate_rows,
    model_device,
    move_to_device,
    return_freed_memory,
    row_dtype_of,
    row_mode,
)
from lightning_influence.statistics import (
    CovarianceStatistic,
    EigenvalueStatistic,
    eigh_dtype_of,
    factor_dtypes,
)
from lightning_influence.strategies import strategy as strategy_row
from lightning_influence.task import CausalLMTask, Task, resolve_task
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
    "options_tracker",
]

log = logging.getLogger(__name__)


def options_tracker(model: nn.Module, options: FitOptions,
                    task: Task | None = None) -> LayerTracker:
    """The tracker over the layers ``options`` select (layers, exclude, frozen, layer preset,
    batch layout); for a language-model ``task`` (``CausalLMTask``) the default selection
    leaves out a vocabulary-sized head (see :class:`~lightning_influence.LayerTracker`)."""
    return LayerTracker(model, layers=options.layers, exclude=options.exclude,
                        include_frozen=options.include_frozen,
                        batch_layout=options.batch_layout, preset=options.layer_preset,
                        language_model=isinstance(task, CausalLMTask))


def layer_dtypes(tracker: LayerTracker, options: FitOptions | None = None,
                 ) -> dict[str, tuple[torch.dtype, torch.dtype]]:
    """``{layer: (accumulation dtype, storage dtype)}`` of the factors (``factor_dtype``)."""
    option = options.factor_dtype if options is not None else "auto"
    return {layer.name: factor_dtypes(option, layer.d_in, layer.d_out, layer.module.weight.dtype)
            for layer in tracker}


def new_covariances(tracker: LayerTracker, device: torch.device | None = None,
                    options: FitOptions | None = None) -> dict[str, CovarianceStatistic]:
    """Fresh, empty covariance statistics for every tracked layer, in the dtype and block
    layout ``options`` ask for (``factor_dtype``, ``block_size``)."""
    dtypes = layer_dtypes(tracker, options)
    block = options.block_size if options is not None else None
    out = {}
    for layer in tracker:
        acc, storage = dtypes[layer.name]
        stat = CovarianceStatistic(layer.d_in, layer.d_out, dtype=acc, block_size=block)
        stat.storage_dtype = storage
        out[layer.name] = stat.to(device or "cpu")
    return out


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
    a mean over every training example, and those contribute zero. A mask that keeps every
    row is dropped (no masked copies of the rows)."""
    if mask is not None and bool((mask == 1).all()):
        mask = None
    for name, (a, g) in rows.items():
        covariances[name].accumulate(a, g, mask)
    n = next(iter(rows.values()))[0].shape[0] if rows else 0
    for name in covariances.keys() - rows.keys():
        covariances[name].examples.add_(n)


def fit_covariances(model: nn.Module, loader: Any, task: Task | str | None = None,
                    options: FitOptions | None = None, *, tracker: LayerTracker | None = None,
                    covariances: dict[str, CovarianceStatistic] | None = None,
                    **overrides: Any) -> dict[str, CovarianceStatistic]:
    """Accumulate the K-FAC covariances ``A`` and ``S`` over a dataloader.

    Args:
        model, loader, task: as in :func:`fit_factors`.
        options: :class:`~lightning_influence.FitOptions` (``fisher``, ``seed``,
            ``max_batches``, ``row_dtype``, ``progress`` and the layer selection apply); any of
            its fields may also be passed as a keyword.
        tracker: the tracked layers (default: those ``options`` select).
        covariances: statistics to add to (default: fresh ones).

    Returns per layer a :class:`CovarianceStatistic` (sums; ``compute()`` divides and, under
    ``torch.distributed``, sums across processes first).
    """
    options = resolve_options(FitOptions, options, overrides, "fit_covariances()")
    task = resolve_task(task, model)
    tracker = tracker or options_tracker(model, options, task)
    check_loader(loader, "covariance")
    if covariances is None and options.memory_limit != "off":  # before the pass
        plan = plan_memory(model, loader, task, options, tracker=tracker)
        plan.stages = {"covariances": plan.stages.get("covariances", 0)}
        check_plan(plan, options.memory_limit, "fit_covariances()")
    covs = covariances if covariances is not None else new_covariances(
        tracker, model_device(model), options)
    spec = RowPass.fitting(options, "influence: covariances")
    for _, _, batch, rows, _ in iterate_rows(model, loader, task, tracker, spec):
        add_rows(covs, rows, task.row_mask(move_to_device(batch, model_device(model))))
    return covs


def eigenbases(covariances: dict[str, CovarianceStatistic],
               eigh_dtype: str = "auto") -> dict[str, dict[str, Any]]:
    """Eigendecompose every layer's ``A`` and ``S`` (float64) -> eigenvalues and eigenvectors,
    one layer and side at a time: each side's sums are freed as soon as they are decomposed
    (the statistics are spent afterwards), and the eigenvectors are kept in the layer's
    storage dtype, so the covariances and the eigenbases are never all held at once.

    Inside a process group, each side is summed across ranks in place, layer ``i`` is
    decomposed on rank ``i % W`` only, and its results are broadcast to every rank.
    ``eigh_dtype``: ``"auto"`` (the default): float64, except float32 for a float32 side at
    least :data:`~lightning_influence.factors.FLOAT32_EIGH_MIN_WIDTH` wide whose condition
    number is checked to be at most about 1e4 (:func:`~lightning_influence.factors.float32_suffices`);
    ``"float64"`` or ``"float32"`` for every side. The dtype each side was decomposed in is
    returned under ``"eigh_dtypes"`` (``{"a": ..., "s": ...}``) and logged.
    """
    return_freed_memory()  # what the covariance pass freed, before the decompositions
    out: dict[str, dict[str, Any]] = {}
    chosen: dict[str, str] = {}
    me, world = rank(), world_size()
    for i, (name, stat) in enumerate(covariances.items()):
        storage = getattr(stat, "storage_dtype", stat.activation_sum.dtype)
        solve = eigh_dtype_of(eigh_dtype, storage)
        device = stat.rows.device
        owner = i % world == me
        sides = {}
        for side, what, dim in (("a", "activation", stat.activation_dim),
                                ("s", "pseudo-gradient", stat.gradient_dim)):
            mean = stat.take(side.upper())  # collective (sum over ranks), sums freed
            if float(stat.rows) == 0:
                raise ValueError(f"Layer {name!r} has no covariance rows: the statistics pass "
                                 "never ran it. Exclude it or check the data.")
            if owner:
                dtype = eigh_dtype_for(mean, solve)
                chosen[f"{name}.{side}"] = str(dtype).removeprefix("torch.")
                values, vectors = eigendecompose(mean, what, name, dim, dtype)
                del mean
                sides[f"l_{side}"] = values
                sides[f"q_{side}"] = vectors.to(storage)
                del vectors
            else:
                del mean
        if world > 1:
            for key in ("l_a", "q_a", "l_s", "q_s"):
                sides[key] = _broadcast_basis(sides.get(key), i % world, device)
        out[name] = {**sides, "rows_per_example": float(stat.rows / stat.examples.clamp_min(1)),
                     "examples": float(stat.examples), "storage": storage}
    if world > 1:  # each rank decomposed its own layers
        chosen = {k: v for part in all_gather_objects(chosen) for k, v in part.items()}
    for name, basis in out.items():
        basis["eigh_dtypes"] = {side: chosen.get(f"{name}.{side}") for side in ("a", "s")}
    in_float32 = sum(v == "float32" for v in chosen.values())
    if in_float32 and eigh_dtype == "auto":
        log.info("Eigendecomposed %d of %d covariance sides in float32 (wide, condition number "
                 "at most %g, checked), the others in float64.", in_float32, len(chosen),
                 FLOAT32_EIGH_MAX_CONDITION)
    return out


def _broadcast_basis(value: Any, src: int, device: torch.device) -> Any:
    """An eigenbasis (dense or block-diagonal) or eigenvalues from rank ``src``."""
    dim = broadcast_object(value.dim if isinstance(value, BlockDiagonal) else None, src)
    tensor = broadcast_tensor(value.blocks if isinstance(value, BlockDiagonal) else value, src,
                              device)
    return BlockDiagonal(tensor, dim) if dim is not None else tensor


def fit_eigenvalues(model: nn.Module, loader: Any, task: Task, tracker: LayerTracker,
                    bases: dict[str, dict[str, Tensor]] | None,
                    options: FitOptions | None = None) -> dict[str, EigenvalueStatistic]:
    """The eigenvalue-correction pass: Lambda = mean over examples of (Q_S^T G_n Q_A)^2.

    With ``bases=None`` the bases are the identity: the result is the diagonal Fisher.
    ``options``: the passes' settings (``fisher``, ``seed``, ``max_batches``, ``row_dtype``,
    ``progress``).
    """
    options = options or FitOptions()
    return_freed_memory()
    dtypes = layer_dtypes(tracker, options)
    device = model_device(model)
    stats = {layer.name: EigenvalueStatistic(layer.d_in, layer.d_out,
                                             dtype=dtypes[layer.name][0]).to(device)
             for layer in tracker}
    spec = RowPass.fitting(options, "influence: eigenvalue correction", EIGENVALUE_STREAM)
    for _, _, _, rows, _ in iterate_rows(model, loader, task, tracker, spec):
        for name, (a, g) in rows.items():
            if bases is not None:
                a = rows_times(bases[name]["q_a"], a)
                g = rows_times(bases[name]["q_s"], g)
            stats[name].update(a, g)
        n = next(iter(rows.values()))[0].shape[0]
        for name in stats.keys() - rows.keys():  # did not run: zero gradient, still examples
            stats[name].examples.add_(n)
    return stats


def factors_from_statistics(tracker: LayerTracker, strategy: str,
                            bases: dict[str, dict[str, Tensor]] | None,
                            eigenvalues: dict[str, EigenvalueStatistic] | None, *,
                            damping: Damping | float | str | None = None,
                            options: FitOptions | None = None) -> Factors:
    """Assemble :class:`Factors` from eigenbases and (corrected) eigenvalues, damped by a
    :class:`~lightning_influence.factors.Damping` (or its rule), kept in each layer's storage
    dtype (``options.factor_dtype``); each eigenvalue statistic is freed once read."""
    damping = Damping.of(damping)
    dtypes = layer_dtypes(tracker, options)
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
            eigenvalues[name].release()
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
        storage = basis["storage"] if basis is not None else dtypes[name][1]
        layers[name] = LayerFactors(lam.to(storage) if lam is not None else None, q_a, q_s,
                                    layer_damping)
        del lam, computed
    return Factors(strategy, layers, tracker.describe(), model_fingerprint(tracker), num_examples,
                   damping.describe())


def fit_factors(model: nn.Module, loader: Any, task: Task | str | None = None,
                options: FitOptions | None = None, *, output_dir: str | Path | None = None,
                covariances: dict[str, CovarianceStatistic] | None = None,
                tracker: LayerTracker | None = None, **overrides: Any) -> Factors:
    """Fit the curvature factors of a model on a dataloader.

    Args:
        model: the trained model (any ``nn.Module``; a LightningModule works).
        loader: training data, batches as the task expects them.
        task: a :class:`~lightning_influence.task.Task` or a built-in name.
        options: :class:`~lightning_influence.FitOptions`: the strategy, damping, Fisher,
            layers, row dtype, seed, ... (``FitOptions.help()`` lists them). Any field may also
            be passed as a keyword, e.g. ``fit_factors(model, loader, "classification",
            strategy="kfac", damping=1e-3)``; keywords override ``options``.
        output_dir: when given, factors are saved there (atomically) and reused on a rerun if
            they match the model, its layers and the strategy (``overwrite=True`` refits).
        covariances: covariance statistics accumulated already (e.g. during training); the
            covariance pass is then skipped.
        tracker: the tracked layers, when they need more than the options say (default:
            the layers ``options`` select).

    On the Fisher: ``fisher="exact"`` lifts LDS on the digits MLP from 0.870 to 0.899 of the
    exact influence's for 1.25x the time, and gains nothing on a conv net for 2.3x (see
    benchmarks/accuracy_ceiling.py); ``row_dtype="bfloat16"`` makes the products 3-4x faster
    on hardware with native bfloat16 products (see
    :func:`~lightning_influence.passes.row_dtype_of`).

    Raises:
        FactorMismatchError: stored factors belong to another model, layer set or strategy.
        ValueError: empty dataloader, unsupported layers, bad options.
        TypeError: a keyword that is no :class:`~lightning_influence.FitOptions` field.
        FloatingPointError: NaN/Inf in losses, activations, gradients or covariances.
    """
    options = resolve_options(FitOptions, options, overrides, "fit_factors()")
    row = strategy_row(options.strategy, fitted_only=True)
    rule = options.damping_rule()  # checked before any pass
    task = resolve_task(task, model)
    tracker = tracker or options_tracker(model, options, task)

    def fit() -> Factors:
        check_loader(loader, "training")
        if covariances is None and options.memory_limit != "off":  # before any pass
            check_plan(plan_memory(model, loader, task, options, tracker=tracker),
                       options.memory_limit, "fit_factors()")
        bases = None
        if row.needs_covariances:
            covs = covariances
            if covs is None:  # (the plan was checked above)
                covs = fit_covariances(model, loader, task, options, tracker=tracker,
                                       memory_limit="off")
            bases = eigenbases(covs, options.eigh_dtype)
        eigenvalues = None
        if row.needs_eigenvalue_pass:
            eigenvalues = fit_eigenvalues(model, loader, task, tracker, bases, options)
        factors = factors_from_statistics(tracker, options.strategy, bases, eigenvalues,
                                          damping=rule, options=options)
        factors.extra["fisher"] = options.fisher
        factors.extra["batch_layout"] = tracker.batch_layout
        if row_dtype_of(options.row_dtype) is not None:
            factors.extra["row_dtype"] = options.row_dtype
        if bases is not None:  # what each side was eigendecomposed in (eigh_dtype="auto")
            factors.extra["eigh_dtypes"] = {n: b["eigh_dtypes"] for n, b in bases.items()}
        if not (row.needs_covariances or row.needs_eigenvalue_pass):  # no pass counted them
            factors.num_examples = count_examples(loader)
        return factors

    if output_dir is None:
        return fit()
    return load_or_fit_factors(output_dir, fit, tracker=tracker, options=options)


def load_or_fit_factors(output_dir: str | Path, fit: Callable[[], Factors], *,
                        tracker: LayerTracker, options: FitOptions,
                        write: bool = True) -> Factors:
    """The reuse decision, in one place: the factors in ``output_dir`` when they were fitted
    for this model (layers, shapes, and everything the model computes: see
    :mod:`~lightning_influence.fingerprint`) with the strategy, Fisher and row dtype of
    ``options``, damped as ``options`` say now; else ``fit()``, saved there (with ``write``;
    atomically; ``options.overwrite`` always refits).

    Raises:
        FactorMismatchError: the stored factors belong to another model, layer set, strategy
            or Fisher (``overwrite=True`` refits).
        CorruptFactorsError: the stored file cannot be trusted (``overwrite=True`` refits).
    """
    strategy, fisher, row_dtype = options.strategy, options.fisher, options.row_dtype
    if not options.overwrite and Factors.exists(output_dir):
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
        return stored.with_damping(options.damping_rule())
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
