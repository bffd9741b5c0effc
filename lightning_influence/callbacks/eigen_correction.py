"""EigenCorrection: finalize the curvature (eigendecomposition, eigenvalue pass) and save it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_influence.callbacks._common import output_dir, training_loader
from lightning_influence.callbacks.run import InfluenceRun
from lightning_influence.factors import Factors, Preconditioner
from lightning_influence.fitting import fit_factors, load_or_fit_factors
from lightning_influence.io import check_writable
from lightning_influence.memory import estimate_bytes, format_estimate
from lightning_influence.options import DEFAULT_FIT, FitOptions, callback_options
from lightning_influence.solvers import CurvatureSolver, make_solver
from lightning_influence.strategies import SOLVER_STRATEGIES
from lightning_influence.strategies import strategy as strategy_row
from lightning_influence.task import Task


class EigenCorrection(Callback):
    """Turns covariance statistics into curvature factors when fit ends, and saves them.

    For ``ekfac`` it eigendecomposes A and S (float64) and runs the eigenvalue-correction pass
    over the training data; ``kfac`` needs no extra pass; ``diagonal`` runs only the eigenvalue
    pass; ``identity`` needs nothing. Factors are written atomically to
    ``<output_dir>/factors.{safetensors,json}`` and, on a rerun, reused when they match the model
    (same layers, shapes, weights and strategy) instead of being recomputed.

    The task and the tracked layers come from the :class:`InfluenceStatistics` callback when one
    is attached (it is required for ``kfac``/``ekfac``), else from this callback's ``task`` and
    ``fit`` options. The fit options of the two callbacks are merged (a field set on either is
    used); the Trainer's influence callbacks share them through their
    :class:`~lightning_influence.callbacks.run.InfluenceRun`.

    The reference solvers are strategies too: ``lissa``, ``cg`` (conjugate gradient on the
    damped Gauss-Newton product), ``explicit`` (the dense damped Gauss-Newton inverse, small
    models only) and ``arnoldi``; see :mod:`lightning_influence.solvers`. They solve the full
    (cross-layer) damped Gauss-Newton system instead of approximating it, are built in memory
    when fit ends (nothing to save or reuse) and are slow: use them to check EK-FAC on your
    model, or where the model is small. With the heuristic damping they need the EK-FAC factors
    (and so an InfluenceStatistics callback) for the per-layer damping, and solve the same
    damped system EK-FAC approximates.

    Args:
        strategy: shortcut for ``fit.strategy``: ``identity``, ``diagonal``, ``kfac``,
            ``ekfac``, or a solver: ``lissa``, ``cg``, ``explicit``, ``arnoldi``.
        damping: shortcut for ``fit.damping``: a number, ``"heuristic"`` (``damping_factor``
            x mean eigenvalue per layer) or ``"weight_decay"`` (the first optimizer's weight
            decay).
        output_dir: where factor files go (default ``<default_root_dir>/influence``).
        solver_options: keyword arguments of the solver class (e.g. ``{"iterations": 2000,
            "scale": 50.0}`` for LiSSA, ``{"max_iterations": 100, "rtol": 1e-6}`` for CG); for
            ``cg``, ``ekfac_preconditioner: true`` preconditions CG with the EK-FAC factors.
        task: the task when no InfluenceStatistics callback is attached.
        fit: :class:`~lightning_influence.FitOptions` (Fisher, row dtype, layers, seed,
            overwrite, ...; ``FitOptions.help()`` lists them).
        **legacy: the options this constructor took before :class:`FitOptions` held them
            (``damping_factor``, ``overwrite``, ``fisher``, ``row_dtype``, ``seed``,
            ``max_batches``, ``batch_size``, ``progress``, ``layers``, ``exclude``,
            ``include_frozen``, ``batch_layout``) still work, with a deprecation warning.
    """

    def __init__(self, strategy: str | None = None, damping: float | str | None = None,
                 output_dir: str | Path | None = None,
                 solver_options: dict[str, Any] | None = None, task: Task | str | None = None,
                 fit: FitOptions = DEFAULT_FIT, **legacy: Any) -> None:
        super().__init__()
        shortcuts = {k: v for k, v in (("strategy", strategy), ("damping", damping))
                     if v is not None}
        try:
            self.fit = callback_options(FitOptions, fit, shortcuts, legacy, "EigenCorrection",
                                        "fit")
        except ValueError as err:
            raise ValueError(f"EigenCorrection: {err}") from err
        if solver_options and strategy_row(self.fit.strategy).solver is None:
            raise ValueError(f"EigenCorrection: solver_options are for the solver strategies "
                             f"{list(SOLVER_STRATEGIES)}, not {self.fit.strategy!r}.")
        self.output_dir = output_dir
        self.task_spec = task
        self.solver_options = dict(solver_options or {})
        self.factors: Preconditioner | None = None
        self.factors_path: str | None = None
        self.influence_run: InfluenceRun | None = None

    @property
    def strategy(self) -> str:
        return self.fit.strategy

    @property
    def damping(self) -> Any:
        return self.fit.damping

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.influence_run = InfluenceRun.join(trainer, self, "eigen")
        if stage == "fit" and trainer.is_global_zero:  # before training, not after both passes
            check_writable(output_dir(trainer, self.output_dir), "EigenCorrection")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.influence_run.check()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.influence_run.check_memory(trainer, pl_module)  # before the first step

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.ensure_factors(trainer, pl_module)

    def fitted_strategy(self) -> str:
        """The strategy whose factors are fitted: this one, or ``ekfac`` for a solver that
        takes the EK-FAC damping or preconditioner."""
        if strategy_row(self.fit.strategy).solver is None:
            return self.fit.strategy
        if self.fit.damping == "heuristic" or self.solver_options.get("ekfac_preconditioner"):
            return "ekfac"
        return self.fit.strategy

    def ensure_factors(self, trainer: Any, pl_module: Any) -> Preconditioner:
        """The fitted factors (from memory, from matching files, or fitted now), or the solver."""
        if self.factors is not None:
            return self.factors
        if self.influence_run is None:
            self.setup(trainer, pl_module, "fit")
        self.influence_run.check()
        self.influence_run.bind(pl_module)
        if strategy_row(self.fit.strategy).solver is not None:
            self.factors = self._build_solver(trainer, pl_module)
        else:
            self.factors = self._fit(trainer, pl_module, self.influence_run.fit_options())
        run = self.influence_run
        run.factors, run.factors_path = self.factors, self.factors_path
        return self.factors

    def _fit(self, trainer: Any, pl_module: Any, options: FitOptions) -> Factors:
        run = self.influence_run
        folder = output_dir(trainer, self.output_dir)
        if options.weight_decay is None:  # the optimizer's, for damping="weight_decay"
            options = dataclasses.replace(options, weight_decay=_weight_decay(trainer))
        needs_covariances = strategy_row(options.strategy).needs_covariances
        task, tracker = run.task, run.tracker

        def fit() -> Factors:  # only when nothing reusable is in the folder
            rank_zero_info(f"lightning-influence: fitting {options.strategy} factors in {folder}")
            rank_zero_info("lightning-influence: " + format_estimate(
                estimate_bytes(tracker.describe(), options.strategy)))
            covariances = (run.statistics.ensure_covariances(trainer, pl_module)
                           if run.statistics is not None and needs_covariances else None)
            return fit_factors(
                pl_module, training_loader(trainer, pl_module, options.batch_size), task,
                options, tracker=tracker, covariances=covariances,
                progress=options.progress and trainer.is_global_zero)

        factors = load_or_fit_factors(folder, fit, tracker=tracker, options=options,
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
        damping: Any = self.fit.damping
        ekfac = None
        if self.fitted_strategy() == "ekfac":
            ekfac = self._fit(trainer, pl_module, dataclasses.replace(
                self.influence_run.fit_options(), strategy="ekfac"))
        if damping == "heuristic":
            damping = ekfac  # its per-layer heuristic damping: the system EK-FAC approximates
        elif damping == "weight_decay":
            damping = _weight_decay(trainer)
            if damping is None:
                raise ValueError("EigenCorrection(damping='weight_decay'): the optimizer has no "
                                 "weight decay; pass a number.")
        if use_ekfac:
            options["preconditioner"] = ekfac
        rank_zero_info(f"lightning-influence: building the {self.strategy} solver")
        if self.strategy == "cg":
            rank_zero_warn(
                "lightning-influence: strategy='cg' is a reference solver, not a fast one: each "
                "solve runs up to max_iterations passes over the training data, and "
                "self-influence takes one solve per training batch; with the default heuristic "
                "damping a few iterations do not converge (ekfac_preconditioner or not). Use it "
                "to check ekfac on a small model; ekfac and kfac are the fast strategies.")
        run = self.influence_run
        fit = run.fit_options()
        try:
            solver = make_solver(self.strategy, pl_module,
                                 training_loader(trainer, pl_module, fit.batch_size), run.task,
                                 damping=damping, tracker=run.tracker,
                                 progress=fit.progress and trainer.is_global_zero, **options)
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


def _weight_decay(trainer: Any) -> float | None:
    for optimizer in getattr(trainer, "optimizers", []) or []:
        for group in optimizer.param_groups:
            if group.get("weight_decay"):
                return float(group["weight_decay"])
    return None
