"""InfluenceValidation: check the fitted factors against LiSSA (and PBRF) on the user's model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_influence.callbacks._common import (
    output_dir,
    query_loader,
    training_loader,
)
from lightning_influence.callbacks.run import InfluenceRun
from lightning_influence.evaluation import validate_influence
from lightning_influence.io import atomic_save_json
from lightning_influence.options import DEFAULT_VALIDATION, ValidationOptions, callback_options
from lightning_influence.passes import count_examples


class InfluenceValidation(Callback):
    """Validation mode: compares the fitted factors (EK-FAC) with reference solvers, logs how
    well they agree.

    When fit ends (after :class:`EigenCorrection` has its factors), on ``num_queries`` queries and
    a seeded sample of ``num_train`` training examples it scores with the factors and with LiSSA
    on the same damped Gauss-Newton system (the factors' per-layer damping), and with
    ``pbrf_examples > 0`` also computes PBRF responses for that many of the sampled examples
    (costly: an optimisation over the full training set per example). It logs, under
    ``influence_validation/``:

    - ``<strategy>_vs_lissa/{pearson,spearman,pearson_per_query,spearman_per_query}``;
    - ``lissa_half_vs_full/...``: LiSSA's half-depth estimate against its full-depth one (near 1
      when LiSSA has converged; if not, raise ``lissa_iterations`` before trusting the
      comparison: LiSSA needs about ``scale / damping`` iterations);
    - ``<strategy>_vs_pbrf/...`` and ``lissa_vs_pbrf/...`` when PBRF is asked for;
    - seconds per stage. They are also written to ``<output_dir>/validation.json``.

    Args:
        num_queries: queries from the start of the validation loader (or ``queries``).
        queries: the query loader (default: the Trainer's validation loader).
        output_dir: where ``validation.json`` goes (default: the EigenCorrection's folder).
        options: :class:`~lightning_influence.options.ValidationOptions` (``num_train``,
            ``seed``, ``lissa_iterations``, ``lissa_options``, ``pbrf_examples``,
            ``pbrf_options``).
        **legacy: those options as plain keywords (as before :class:`ValidationOptions` held
            them) still work, with a deprecation warning.
    """

    def __init__(self, num_queries: int = 4, queries: DataLoader | None = None,
                 output_dir: str | Path | None = None,
                 options: ValidationOptions = DEFAULT_VALIDATION, **legacy: Any) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"InfluenceValidation: num_queries must be >= 1, got {num_queries}.")
        try:
            self.options = callback_options(ValidationOptions, options, {}, legacy,
                                            "InfluenceValidation", "options")
        except ValueError as err:
            raise ValueError(f"InfluenceValidation: {err}") from err
        self.num_queries = num_queries
        self.queries = queries
        self.output_dir = output_dir
        self.metrics: dict[str, float] = {}
        self.influence_run: InfluenceRun | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.influence_run = InfluenceRun.join(trainer, self, "consumer")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.influence_run.check()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.run(trainer, pl_module)

    def run(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        """Compare, log and write. Called when fit ends; callable by hand after ``fit``."""
        if self.influence_run is None:
            self.setup(trainer, pl_module, "fit")
        factors, task = self.influence_run.curvature(trainer, pl_module, "InfluenceValidation")
        train = training_loader(trainer, pl_module)
        queries = query_loader(trainer, pl_module, self.queries, self.num_queries)
        options = self.options
        rank_zero_info(f"lightning-influence: validating {factors.strategy} against LiSSA"
                       f"{' and PBRF' if options.pbrf_examples else ''} on {options.num_train} "
                       f"training examples and {count_examples(queries)} queries")
        self.metrics = validate_influence(pl_module, factors, queries, train, task, options)
        if trainer.is_global_zero:
            logged = {f"influence_validation/{k}": v for k, v in self.metrics.items()}
            for logger in trainer.loggers:
                logger.log_metrics(logged)
            folder = output_dir(trainer, self.output_dir or self.influence_run.factors_path)
            atomic_save_json(self.metrics, folder / "validation.json")
            key = f"{factors.strategy}_vs_lissa/pearson"
            rank_zero_info(f"lightning-influence: {key} = {self.metrics[key]:.3f}, LiSSA "
                           "half-vs-full depth pearson = "
                           f"{self.metrics['lissa_half_vs_full/pearson']:.3f}")
        return self.metrics

    def state_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.metrics = dict(state_dict.get("metrics", {}))
