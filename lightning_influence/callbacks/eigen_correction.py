"""EigenCorrection: finalize the curvature (eigendecomposition, eigenvalue pass) and save it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_influence.callbacks._common import find_callback, output_dir, training_loader
from lightning_influence.callbacks.influence_statistics import InfluenceStatistics
from lightning_influence.factors import Damping, Factors, Preconditioner
from lightning_influence.fitting import fit_factors, load_or_fit_factors
from lightning_influence.io import check_writable
from lightning_influence.memory import estimate_bytes, format_estimate
from lightning_influence.passes import fisher_mode, row_dtype_of
from lightning_influence.solvers import CurvatureSolver, make_solver
from lightning_influence.strategies import ALL_STRATEGIES, SOLVER_STRATEGIES
from lightning_influence.strategies import strategy as strategy_row
from lightning_influence.task import Task, resolve_task
from lightning_influence.tracking import LayerTracker


class EigenCorrection(Callback):
    """Turns covariance statistics into curvature factors when fit ends, and saves them.

    For ``ekfac`` it eigendecomposes A and S (float64) and runs the eigenvalue-correction pass
    over the training data; ``kfac`` needs no extra pass; ``diagonal`` runs only the eigenvalue
    pass; ``identity`` needs nothing. Factors are written atomically to
    ``<output_dir>/factors.{safetensors,json}`` and, on a rerun, reused when they match the model
    (same layers, shapes, weights and strategy) instead of being recomputed.

    The task and layers come from the :class:`InfluenceStatistics` callback when one is attached
    (it is required for ``kfac``/``ekfac``), else from this callback's own arguments.

    The reference solvers are strategies too: ``lissa``, ``cg`` (conjugate gradient on the
    damped Gauss-Newton product) and ``explicit`` (the dense damped Gauss-Newton inverse, small
    models only); see :mod:`lightning_influence.solvers`. They solve the full (cross-layer)
    damped Gauss-Newton system instead of approximating it, are built in memory when fit ends
    (nothing to save or reuse) and are slow: use them to check EK-FAC on your model, or where
    the model is small. With the heuristic damping they need the EK-FAC factors (and so an
    InfluenceStatistics callback) for the per-layer damping, and solve the same damped system
    EK-FAC approximates.

    Args:
        strategy: ``identity``, ``diagonal``, ``kfac``, ``ekfac``, or a solver: ``lissa``,
            ``cg``, ``explicit``.
        damping: a number, ``None``/``"heuristic"`` (``damping_factor`` x mean eigenvalue per
            layer) or ``"weight_decay"`` (the first optimizer's weight decay).
        damping_factor: the heuristic's factor (0.1, the paper's).
        output_dir: where factor files go (default ``<default_root_dir>/influence``).
        overwrite: refit even when matching factors exist.
        task, layers, exclude, include_frozen, batch_layout: used when no InfluenceStatistics
            callback is attached (see :class:`InfluenceStatistics`).
        max_batches, batch_size, seed, progress: of the eigenvalue pass.
        fisher: ``"sampled"``, ``"exact"`` or ``"empirical"`` (see
            :func:`~lightning_influence.fit_factors`);
            ``None`` takes the InfluenceStatistics callback's (``"sampled"`` without one).
        row_dtype: ``None`` or ``"bfloat16"``: the eigenvalue pass's and the scoring passes'
            products in bfloat16 (see :func:`~lightning_influence.fit_factors`).
        solver_options: keyword arguments of the solver class (e.g. ``{"iterations": 2000,
            "scale": 50.0}`` for LiSSA, ``{"max_iterations": 100, "rtol": 1e-6}`` for CG); for
            ``cg``, ``ekfac_preconditioner: true`` preconditions CG with the EK-FAC factors.
    """

    def __init__(self, strategy: str = "ekfac", damping: float | str | None = None,
                 damping_factor: float = 0.1, output_dir: str | Path | None = None,
                 overwrite: bool = False, task: Task | str | None = None,
                 layers: list[str] | None = None, exclude: list[str] | None = None,
                 max_batches: int | None = None, batch_size: int | None = None, seed: int = 0,
                 progress: bool = True, solver_options: dict[str, Any] | None = None,
                 fisher: str | None = None, include_frozen: bool = False,
                 batch_layout: str = "auto", row_dtype: str | None = None) -> None:
        super().__init__()
        if strategy not in ALL_STRATEGIES:
            raise ValueError(f"EigenCorrection: strategy={strategy!r} is not one of "
                             f"{list(ALL_STRATEGIES)}.")
        if solver_options and strategy_row(strategy).solver is None:
            raise ValueError(f"EigenCorrection: solver_options are for the solver strategies "
                             f"{list(SOLVER_STRATEGIES)}, not {strategy!r}.")
        try:
            self.rule = Damping(damping, damping_factor)  # the weight decay comes with the fit
        except ValueError as err:
            raise ValueError(f"EigenCorrection: {err}") from err
        self.strategy = strategy
        self.damping = damping
        self.damping_factor = damping_factor
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.task_spec, self.layers, self.exclude = task, layers, exclude
        self.include_frozen, self.batch_layout = include_frozen, batch_layout
        self.max_batches, self.batch_size, self.seed = max_batches, batch_size, seed
        self.progress = progress
        self.solver_options = dict(solver_options or {})
        self.fisher = fisher_mode(fisher) if fisher is not None else None
        row_dtype_of(row_dtype)
        self.row_dtype = row_dtype
        self.factors: Preconditioner | None = None
        self.factors_path: str | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:  # before training, not after both passes
            check_writable(output_dir(trainer, self.output_dir), "EigenCorrection")

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.ensure_factors(trainer, pl_module)

    def ensure_factors(self, trainer: Any, pl_module: Any) -> Preconditioner:
        """The fitted factors (from memory, from matching files, or fitted now), or the solver."""
        if self.factors is not None:
            return self.factors
        if strategy_row(self.strategy).solver is not None:
            self.factors = self._build_solver(trainer, pl_module)
            return self.factors
        self.factors = self._fit(trainer, pl_module, self.strategy, self.damping)
        return self.factors

    def task_and_tracker(self, trainer: Any, pl_module: Any,
                         ) -> tuple[Task, LayerTracker, InfluenceStatistics | None]:
        """The task and tracked layers: the InfluenceStatistics callback's when one is attached,
        else this callback's own arguments; and that callback (or None)."""
        stats = find_callback(trainer, InfluenceStatistics)
        if stats is not None:
            stats.bind(pl_module)
            return stats.task, stats.tracker, stats
        return (resolve_task(self.task_spec, pl_module),
                LayerTracker(pl_module, self.layers, self.exclude,
                             include_frozen=self.include_frozen,
                             batch_layout=self.batch_layout), None)

    def _fit(self, trainer: Any, pl_module: Any, strategy: str, damping: Any) -> Factors:
        needs_covariances = strategy_row(strategy).needs_covariances
        if needs_covariances and find_callback(trainer, InfluenceStatistics) is None:
            why = "" if strategy == self.strategy else (
                f" (strategy={self.strategy!r} with the heuristic damping or the EK-FAC "
                "preconditioner fits EK-FAC factors first)")
            raise RuntimeError(
                f"EigenCorrection(strategy={self.strategy!r}) needs an InfluenceStatistics "
                f"callback in the Trainer's callbacks (it accumulates the covariances){why}."
            )
        task, tracker, stats = self.task_and_tracker(trainer, pl_module)
        folder = output_dir(trainer, self.output_dir)
        rule = Damping(damping, self.damping_factor, _weight_decay(trainer))
        fisher = self.fisher or (stats.fisher if stats is not None else "sampled")

        def fit() -> Factors:  # only when nothing reusable is in the folder
            rank_zero_info(f"lightning-influence: fitting {strategy} factors in {folder}")
            rank_zero_info("lightning-influence: " + format_estimate(
                estimate_bytes(tracker.describe(), strategy)))
            covariances = (stats.ensure_covariances(trainer, pl_module)
                           if stats is not None and needs_covariances else None)
            return fit_factors(
                pl_module, training_loader(trainer, pl_module, self.batch_size), task,
                strategy=strategy, tracker=tracker, damping=rule, covariances=covariances,
                seed=self.seed, max_batches=self.max_batches,
                progress=self.progress and trainer.is_global_zero, fisher=fisher,
                row_dtype=self.row_dtype)

        factors = load_or_fit_factors(folder, fit, tracker=tracker, strategy=strategy,
                                      damping=rule, fisher=fisher, overwrite=self.overwrite,
                                      row_dtype=self.row_dtype,
                                      write=trainer.is_global_zero)
        self.factors_path = str(folder)
        return factors

    def _build_solver(self, trainer: Any, pl_module: Any) -> CurvatureSolver:
        """The solver strategy, with its damping (and CG's optional EK-FAC preconditioner)."""
        options = dict(self.solver_options)
        use_ekfac = bool(options.pop("ekfac_preconditioner", False))
        if use_ekfac and self.strategy != "cg":
            raise ValueError("EigenCorrection: ekfac_preconditioner is an option of "
                             f"strategy='cg', not {self.strategy!r}.")
        damping: Any = self.damping
        ekfac = None
        if damping is None or damping == "heuristic" or use_ekfac:
            ekfac = self._fit(trainer, pl_module, "ekfac", self.damping)
        if damping is None or damping == "heuristic":
            damping = ekfac  # its per-layer heuristic damping: the system EK-FAC approximates
        elif damping == "weight_decay":
            damping = _weight_decay(trainer)
            if damping is None:
                raise ValueError("EigenCorrection(damping='weight_decay'): the optimizer has no "
                                 "weight decay; pass a number.")
        if use_ekfac:
            options["preconditioner"] = ekfac
        task, tracker, _ = self.task_and_tracker(trainer, pl_module)
        rank_zero_info(f"lightning-influence: building the {self.strategy} solver")
        try:
            solver = make_solver(self.strategy, pl_module,
                                 training_loader(trainer, pl_module, self.batch_size), task,
                                 damping=damping, tracker=tracker,
                                 progress=self.progress and trainer.is_global_zero, **options)
        except TypeError as err:
            raise ValueError(f"EigenCorrection(strategy={self.strategy!r}): bad solver_options "
                             f"{self.solver_options}: {err}") from err
        self.factors_path = self.factors_path or str(output_dir(trainer, self.output_dir))
        return solver

    def state_dict(self) -> dict[str, Any]:
        return {"factors_path": self.factors_path, "strategy": self.strategy}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: where files go comes from this run's configuration, never from
        a checkpoint (a run resumed elsewhere must not write into the original run's folder;
        the factors are reused from this run's folder when they match)."""


def attached_curvature(trainer: Any, pl_module: Any, consumer: str,
                       ) -> tuple[EigenCorrection, Preconditioner, Task]:
    """For a callback that consumes the curvature: the Trainer's EigenCorrection (a clear
    error naming ``consumer`` when there is none), its factors (fitted now if needed) and the
    task they were fitted for."""
    eigen = find_callback(trainer, EigenCorrection)
    if eigen is None:
        raise RuntimeError(f"{consumer} needs an EigenCorrection callback in the Trainer's "
                           "callbacks (it provides the curvature factors).")
    factors = eigen.ensure_factors(trainer, pl_module)
    stats = find_callback(trainer, InfluenceStatistics)  # bound by ensure_factors
    task = stats.task if stats is not None else resolve_task(eigen.task_spec, pl_module)
    return eigen, factors, task


def _weight_decay(trainer: Any) -> float | None:
    for optimizer in getattr(trainer, "optimizers", []) or []:
        for group in optimizer.param_groups:
            if group.get("weight_decay"):
                return float(group["weight_decay"])
    return None
