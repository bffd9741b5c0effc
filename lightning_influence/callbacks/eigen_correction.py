"""EigenCorrection: finalize the curvature (eigendecomposition, eigenvalue pass) and save it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_influence.api import fit_factors
from lightning_influence.callbacks._common import find_callback, output_dir, training_loader
from lightning_influence.callbacks.influence_statistics import InfluenceStatistics
from lightning_influence.factors import STRATEGIES, Factors
from lightning_influence.memory import estimate_bytes, format_estimate
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

    Args:
        strategy: one of ``identity``, ``diagonal``, ``kfac``, ``ekfac``.
        damping: a number, ``None``/``"heuristic"`` (``damping_factor`` x mean eigenvalue per
            layer) or ``"weight_decay"`` (the first optimizer's weight decay).
        damping_factor: the heuristic's factor (0.1, the paper's).
        output_dir: where factor files go (default ``<default_root_dir>/influence``).
        overwrite: refit even when matching factors exist.
        task, layers, exclude: used when no InfluenceStatistics callback is attached.
        max_batches, batch_size, seed, progress: of the eigenvalue pass.
    """

    def __init__(self, strategy: str = "ekfac", damping: float | str | None = None,
                 damping_factor: float = 0.1, output_dir: str | Path | None = None,
                 overwrite: bool = False, task: Task | str | None = None,
                 layers: list[str] | None = None, exclude: list[str] | None = None,
                 max_batches: int | None = None, batch_size: int | None = None, seed: int = 0,
                 progress: bool = True) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"EigenCorrection: strategy={strategy!r} is not one of "
                             f"{list(STRATEGIES)}.")
        if isinstance(damping, str) and damping not in ("heuristic", "weight_decay"):
            raise ValueError(f"EigenCorrection: damping={damping!r}; use a number, 'heuristic' "
                             "or 'weight_decay'.")
        if damping_factor <= 0:
            raise ValueError(f"EigenCorrection: damping_factor must be > 0, got {damping_factor}.")
        self.strategy = strategy
        self.damping = damping
        self.damping_factor = damping_factor
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.task_spec, self.layers, self.exclude = task, layers, exclude
        self.max_batches, self.batch_size, self.seed = max_batches, batch_size, seed
        self.progress = progress
        self.factors: Factors | None = None
        self.factors_path: str | None = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.ensure_factors(trainer, pl_module)

    def ensure_factors(self, trainer: Any, pl_module: Any) -> Factors:
        """The fitted factors: from memory, from matching files, or fitted now."""
        if self.factors is not None:
            return self.factors
        stats = find_callback(trainer, InfluenceStatistics)
        if stats is not None:
            stats._bind(pl_module)
            task, tracker = stats.task, stats.tracker
        else:
            if self.strategy in ("kfac", "ekfac"):
                raise RuntimeError(
                    f"EigenCorrection(strategy={self.strategy!r}) needs an InfluenceStatistics "
                    "callback in the Trainer's callbacks (it accumulates the covariances)."
                )
            task = resolve_task(self.task_spec, pl_module)
            tracker = LayerTracker(pl_module, self.layers, self.exclude)
        folder = output_dir(trainer, self.output_dir)
        reuse = Factors.exists(folder) and not self.overwrite
        covariances = None
        if not reuse and stats is not None and self.strategy in ("kfac", "ekfac"):
            covariances = stats.ensure_covariances(trainer, pl_module)
        rank_zero_info(f"lightning-influence: {'reusing' if reuse else 'fitting'} "
                       f"{self.strategy} factors in {folder}")
        if not reuse:
            rank_zero_info("lightning-influence: " + format_estimate(
                estimate_bytes(tracker.describe(), self.strategy)))
        self.factors = fit_factors(
            pl_module, training_loader(trainer, pl_module, self.batch_size), task,
            strategy=self.strategy, tracker=tracker, damping=self.damping,
            damping_factor=self.damping_factor, weight_decay=_weight_decay(trainer),
            covariances=covariances,
            output_dir=folder, write=trainer.is_global_zero, overwrite=self.overwrite,
            seed=self.seed, max_batches=self.max_batches,
            progress=self.progress and trainer.is_global_zero,
        )
        self.factors_path = str(folder)
        return self.factors

    def state_dict(self) -> dict[str, Any]:
        return {"factors_path": self.factors_path, "strategy": self.strategy}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factors_path = state_dict.get("factors_path")


def _weight_decay(trainer: Any) -> float | None:
    for optimizer in getattr(trainer, "optimizers", []) or []:
        for group in optimizer.param_groups:
            if group.get("weight_decay"):
                return float(group["weight_decay"])
    return None
