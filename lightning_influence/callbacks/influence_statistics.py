"""InfluenceStatistics: accumulate the K-FAC covariances A and S."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_influence.api import fit_covariances, new_covariances, update_covariances
from lightning_influence.callbacks._common import training_loader
from lightning_influence.distributed import sampling_generator
from lightning_influence.statistics import CovarianceStatistic
from lightning_influence.task import Task, resolve_task
from lightning_influence.tracking import LayerTracker

log = logging.getLogger(__name__)

MODES = ("after_fit", "during_training")


class InfluenceStatistics(Callback):
    """Accumulates activation and pseudo-gradient covariances of the tracked layers.

    Two modes:

    - ``"after_fit"`` (default): when fit ends, one pass over the training data (unshuffled)
      with labels sampled from the model: the covariances of the final model.
    - ``"during_training"``: every ``every_n_steps`` optimizer steps, one extra forward and
      backward with sampled labels on the current training batch (in eval mode, no parameter
      gradients touched). Cheaper, at the price of mixing a few recent models.

    The covariances are consumed by :class:`~lightning_influence.callbacks.EigenCorrection`.
    They are part of the callback's state, so they survive checkpoint and resume.

    Args:
        task: a Task, a built-in name (``"classification"``, ``"regression"``, ``"causal_lm"``)
            or ``None`` to use the LightningModule's ``influence_task``.
        layers: ``fnmatch`` patterns of module names to track (default every Linear/Conv2d).
        exclude: patterns of module names to leave out.
        mode: ``"after_fit"`` or ``"during_training"``.
        every_n_steps: the period of the during-training update.
        max_batches: cap on the batches of the after-fit pass.
        batch_size: batch size of the after-fit pass (default: the training loader's).
        seed: seed of the label sampling.
        progress: show a progress bar on the after-fit pass.
    """

    def __init__(self, task: Task | str | None = None, layers: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, mode: str = "after_fit",
                 every_n_steps: int = 10, max_batches: int | None = None,
                 batch_size: int | None = None, seed: int = 0, progress: bool = True) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"InfluenceStatistics: mode={mode!r} is not one of {list(MODES)}.")
        if every_n_steps < 1:
            raise ValueError(f"InfluenceStatistics: every_n_steps must be >= 1, got "
                             f"{every_n_steps}.")
        self.task_spec = task
        self.layers = list(layers) if layers is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.mode = mode
        self.every_n_steps = every_n_steps
        self.max_batches = max_batches
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.covariances: dict[str, CovarianceStatistic] | None = None
        self.updates = 0
        self._last_step = -1
        self.finished = False
        self._pending_state: dict[str, Any] | None = None
        self.tracker: LayerTracker | None = None
        self.task: Task | None = None

    # ------------------------------------------------------------------ when
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._bind(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if (self.mode == "during_training" and step % self.every_n_steps == 0
                and step != self._last_step):  # once per step, also with gradient accumulation
            self._last_step = step
            self._bind(pl_module)
            # seeded by the update count: reproducible, and resumed runs continue the sequence
            update_covariances(pl_module, batch, self.task, self.tracker, self.covariances,
                               sampling_generator(self.seed, self.updates), batch_idx)
            self.updates += 1

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.finished = self.mode == "during_training" and self.updates > 0

    # ------------------------------------------------------------------ what others call
    def ensure_covariances(self, trainer: Any, pl_module: Any) -> dict[str, CovarianceStatistic]:
        """The finished covariances, running the after-fit pass first if it has not run."""
        self._bind(pl_module)
        if self.mode == "during_training" and self.updates == 0:
            raise RuntimeError(
                "InfluenceStatistics(mode='during_training') saw no training step with an update; "
                f"lower every_n_steps (now {self.every_n_steps}) or use mode='after_fit'."
            )
        if self.mode == "after_fit" and not self.finished:
            rank_zero_info("lightning-influence: covariance pass over the training data")
            loader = training_loader(trainer, pl_module, self.batch_size)
            self.covariances = new_covariances(self.tracker, _device(pl_module))
            fit_covariances(pl_module, loader, self.task, tracker=self.tracker, seed=self.seed,
                            max_batches=self.max_batches,
                            progress=self.progress and trainer.is_global_zero,
                            covariances=self.covariances)
            self.finished = True
        return self.covariances

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"mode": self.mode, "updates": self.updates,
                                 "finished": self.finished}
        if self.covariances is not None:
            state["covariances"] = {name: stat.sums() for name, stat in self.covariances.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", 0))
        self.finished = bool(state_dict.get("finished", False))
        self._pending_state = state_dict.get("covariances")
        if self.tracker is not None:
            self._restore()

    # ------------------------------------------------------------------ internals
    def _bind(self, pl_module: Any) -> None:
        if self.tracker is None or self.tracker.model is not pl_module:
            self.task = resolve_task(self.task_spec, pl_module)
            self.tracker = LayerTracker(pl_module, self.layers, self.exclude)
            self.covariances = new_covariances(self.tracker, _device(pl_module))
        self._restore()

    def _restore(self) -> None:
        if self._pending_state is None:
            return
        for name, sums in self._pending_state.items():
            if name not in self.covariances:
                raise ValueError(f"The checkpoint holds covariances for layer {name!r}, which "
                                 "this model does not track; resume with the same layers.")
            self.covariances[name].load_sums(sums)
        self._pending_state = None


def _device(pl_module: Any) -> torch.device:
    for p in pl_module.parameters():
        return p.device
    return torch.device("cpu")
