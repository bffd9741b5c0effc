"""InfluenceValidation: check the fitted factors against LiSSA (and PBRF) on the user's model."""

from __future__ import annotations

from collections.abc import Mapping
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
from lightning_influence.callbacks.eigen_correction import attached_curvature
from lightning_influence.evaluation import validate_influence
from lightning_influence.io import atomic_save_json
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
        num_train: training examples sampled (seeded) for the comparison.
        lissa_iterations: depth of the LiSSA series.
        lissa_options: other :class:`~lightning_influence.solvers.LiSSA` arguments (``scale``,
            ``batch_size``, ``repeats``...).
        pbrf_examples: sampled training examples that also get PBRF (0: none).
        pbrf_options: :func:`~lightning_influence.evaluation.pbrf` arguments.
        queries: the query loader (default: the Trainer's validation loader).
        seed: seed of the training sample.
        output_dir: where ``validation.json`` goes (default: the EigenCorrection's folder).
    """

    def __init__(self, num_queries: int = 4, num_train: int = 100, lissa_iterations: int = 500,
                 lissa_options: Mapping[str, Any] | None = None, pbrf_examples: int = 0,
                 pbrf_options: Mapping[str, Any] | None = None, queries: DataLoader | None = None,
                 seed: int = 0, output_dir: str | Path | None = None) -> None:
        super().__init__()
        for name, value, low in (("num_queries", num_queries, 1), ("num_train", num_train, 2),
                                 ("lissa_iterations", lissa_iterations, 2),
                                 ("pbrf_examples", pbrf_examples, 0)):
            if value < low:
                raise ValueError(f"InfluenceValidation: {name} must be >= {low}, got {value}.")
        if pbrf_examples > num_train:
            raise ValueError(f"InfluenceValidation: pbrf_examples={pbrf_examples} exceeds "
                             f"num_train={num_train} (PBRF runs on the sampled examples).")
        self.num_queries = num_queries
        self.num_train = num_train
        self.lissa_options = {**(lissa_options or {}), "iterations": lissa_iterations}
        self.pbrf_examples = pbrf_examples
        self.pbrf_options = dict(pbrf_options or {})
        self.queries = queries
        self.seed = seed
        self.output_dir = output_dir
        self.metrics: dict[str, float] = {}

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.run(trainer, pl_module)

    def run(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        """Compare, log and write. Called when fit ends; callable by hand after ``fit``."""
        eigen, factors, task = attached_curvature(trainer, pl_module, "InfluenceValidation")
        train = training_loader(trainer, pl_module)
        queries = query_loader(trainer, pl_module, self.queries, self.num_queries)
        rank_zero_info(f"lightning-influence: validating {factors.strategy} against LiSSA"
                       f"{' and PBRF' if self.pbrf_examples else ''} on {self.num_train} "
                       f"training examples and {count_examples(queries)} queries")
        self.metrics = validate_influence(
            pl_module, factors, queries, train, task, num_train=self.num_train, seed=self.seed,
            lissa=self.lissa_options, pbrf_examples=self.pbrf_examples,
            pbrf_options=self.pbrf_options)
        if trainer.is_global_zero:
            logged = {f"influence_validation/{k}": v for k, v in self.metrics.items()}
            for logger in trainer.loggers:
                logger.log_metrics(logged)
            folder = output_dir(trainer, self.output_dir or eigen.factors_path)
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
