"""InfluenceStatistics: accumulate the K-FAC covariances A and S."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_influence.callbacks._common import training_loader
from lightning_influence.callbacks.run import InfluenceRun
from lightning_influence.distributed import sampling_generator
from lightning_influence.fitting import (
    add_rows,
    fit_covariances,
    new_covariances,
    update_covariances,
)
from lightning_influence.options import DEFAULT_FIT, FitOptions, callback_options
from lightning_influence.passes import (
    check_rows,
    model_device,
    move_to_device,
    row_mode,
    rows_from_outputs,
)
from lightning_influence.recording import StepRecording
from lightning_influence.statistics import CovarianceStatistic
from lightning_influence.task import Task
from lightning_influence.tracking import LayerTracker

log = logging.getLogger(__name__)

MODES = ("after_fit", "during_training")


class InfluenceStatistics(Callback):
    """Accumulates activation and pseudo-gradient covariances of the tracked layers.

    Two modes:

    - ``"after_fit"`` (default): when fit ends, one pass over the training data (unshuffled)
      with labels sampled from the model: the covariances of the final model.
    - ``"during_training"``: every ``every_n_steps`` optimizer steps, the covariances of the
      current training batch with sampled labels (no parameter gradients touched). Cheaper, at
      the price of mixing a few recent models.

    In ``"during_training"`` mode with ``reuse_forward=True`` (default) the update costs one
    extra backward and no extra forward: the activations and layer outputs of the training
    step's own forward are recorded, and before the training backward the pseudo-gradients are
    taken from that graph (kept alive for the training backward). This is exact only when the
    model computes the same thing in train and eval mode on the same inputs, so the first such
    update is checked against a separate eval-mode forward; when they differ (dropout, batch
    norm, a forward that branches on ``self.training``), or when the training step does not
    call the LightningModule itself on the task's inputs exactly once, every update falls back
    to one separate eval-mode forward and backward after the step (logged once, with the
    reason).

    A training step that returns None (the module skips the batch, e.g. a non-finite loss)
    skips that step's update too: counted in ``skipped_updates``, warned about once.

    The covariances are consumed by :class:`~lightning_influence.callbacks.EigenCorrection`
    through the Trainer's :class:`~lightning_influence.callbacks.run.InfluenceRun`. They are
    part of the callback's state, so they survive checkpoint and resume.

    Args:
        task: a Task, a built-in name (``"classification"``, ``"regression"``, ``"causal_lm"``)
            or ``None`` to use the LightningModule's ``influence_task``.
        layers, exclude: shortcuts for ``fit.layers`` and ``fit.exclude`` (``fnmatch``
            patterns of module names to track / leave out).
        mode: ``"after_fit"`` or ``"during_training"``.
        every_n_steps: the period of the during-training update.
        reuse_forward: during training, take the rows from the training step's forward
            (checked once against eval mode, see above); ``False`` always runs a separate
            eval-mode pass.
        fit: :class:`~lightning_influence.FitOptions` of the pass (Fisher, seed, batch size,
            layer selection, row dtype, ...), merged with those of :class:`EigenCorrection`
            (a field set on either is used; two different values are an error).
        **legacy: the options this constructor took before :class:`FitOptions` held them
            (``fisher``, ``seed``, ``max_batches``, ``batch_size``, ``progress``,
            ``include_frozen``, ``batch_layout``) still work, with a deprecation warning.
    """

    def __init__(self, task: Task | str | None = None, layers: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, mode: str = "after_fit",
                 every_n_steps: int = 10, reuse_forward: bool = True,
                 fit: FitOptions = DEFAULT_FIT, **legacy: Any) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"InfluenceStatistics: mode={mode!r} is not one of {list(MODES)}.")
        if every_n_steps < 1:
            raise ValueError(f"InfluenceStatistics: every_n_steps must be >= 1, got "
                             f"{every_n_steps}.")
        shortcuts = {k: v for k, v in (("layers", layers), ("exclude", exclude)) if v is not None}
        self.fit = callback_options(FitOptions, fit, shortcuts, legacy, "InfluenceStatistics",
                                    "fit")
        self.task_spec = task
        self.mode = mode
        self.every_n_steps = every_n_steps
        self.reuse_forward = reuse_forward
        # None: not checked yet; True: train-mode rows equal eval-mode rows; False: fall back
        self.reuse_verified: bool | None = None
        self.fallback_reason: str | None = None
        self._recording: StepRecording | None = None
        self._updated_this_step = False
        self._layer_counts: dict[str, int] | None = None
        self.covariances: dict[str, CovarianceStatistic] | None = None
        self.updates = 0
        self.skipped_updates = 0
        self._last_step = -1
        self._due_batch: Any = None
        self.finished = False
        self._pending_state: dict[str, Any] | None = None
        self.influence_run: InfluenceRun | None = None
        self._bound_module: Any = None

    @property
    def tracker(self) -> LayerTracker | None:
        return self.influence_run.tracker if self.influence_run is not None else None

    @property
    def task(self) -> Task | None:
        return self.influence_run.task if self.influence_run is not None else None

    @property
    def fisher(self) -> str:
        """The Fisher the covariance pass uses (the run's merged fit options)."""
        return self.options.fisher

    @property
    def options(self) -> FitOptions:
        return self.influence_run.fit_options() if self.influence_run is not None else self.fit

    # ------------------------------------------------------------------ when
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.influence_run = InfluenceRun.join(trainer, self, "statistics")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.influence_run.check()
        self.bind(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.influence_run.check_memory(trainer, pl_module)  # before the first step
        if self.mode == "during_training":
            self._allocate(pl_module)
            rank_zero_info(
                f"lightning-influence: covariances accumulated during training, on the current "
                f"batch every {self.every_n_steps} optimizer steps ("
                + ("reusing the training step's forward, checked against eval mode on the first "
                   "update)" if self.reuse_forward else "a separate eval-mode forward and "
                   "backward after each update step)"))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        # once per optimizer step: the first (micro-)batch of every every_n_steps-th step
        if (self.mode != "during_training" or step % self.every_n_steps != 0
                or step == self._last_step):
            return
        self._last_step = step
        self.bind(pl_module)
        self._allocate(pl_module)
        self._updated_this_step = False
        self._due_batch = batch
        if self.reuse_forward and self.reuse_verified is not False:
            self._recording = StepRecording(self.tracker, pl_module)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        recording, self._recording = self._recording, None
        if recording is None:
            return
        recording.stop()
        self._updated_this_step = self._update_from_recording(pl_module, recording)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._recording is not None:  # the step ran no backward (e.g. returned None)
            self._recording.stop()
            self._recording = None
        if self._due_batch is None:
            return
        due, self._due_batch = self._due_batch, None
        if pl_module.automatic_optimization and not self._updated_this_step and not outputs:
            # the step returned None ({} here): it skipped the batch (e.g. NaN), and so do we
            self._skip_update(batch_idx)
            return
        if not self._updated_this_step:
            # seeded by the update count: reproducible, and resumed runs continue the sequence
            update_covariances(pl_module, due, self.task, self.tracker, self.covariances,
                               sampling_generator(self.options.seed, self.updates), batch_idx,
                               fisher=self.fisher)
        self.updates += 1

    def _skip_update(self, batch_idx: int) -> None:
        """Follow a training step that returned None: no covariance update from its batch
        (counted in ``skipped_updates``; warned once)."""
        self.skipped_updates += 1
        if self.skipped_updates == 1:
            rank_zero_warn(
                f"lightning-influence: the training step returned None for batch {batch_idx} "
                "(it skipped the batch, e.g. a non-finite loss), so InfluenceStatistics skips "
                "its covariance update too; skipped updates are counted in "
                "InfluenceStatistics.skipped_updates and not warned about again."
            )

    def _update_from_recording(self, pl_module: Any, recording: StepRecording) -> bool:
        """Covariances from the training step's forward; False (and a reason) when unusable."""
        batch = move_to_device(self._due_batch, model_device(pl_module))
        reason = recording.unusable_reason(self.task, batch, self._layer_counts)
        if reason is None and self.reuse_verified is None:
            reason = recording.differs_from_eval(pl_module, self.task, batch)
            self.reuse_verified = reason is None
            self._layer_counts = recording.layer_counts()
        if reason is not None:
            self.reuse_verified = False
            self.fallback_reason = reason
            rank_zero_info(f"lightning-influence: the training step's own forward cannot be "
                           f"reused for the covariance updates: {reason}. Each update runs a "
                           "separate eval-mode forward and backward instead.")
            return False
        rows, _ = rows_from_outputs(recording.output, recording.capture, batch, self.task,
                                    self.tracker, row_mode(self.fisher),
                                    sampling_generator(self.options.seed, self.updates),
                                    retain_graph=True)
        check_rows(rows, None)
        add_rows(self.covariances, rows, self.task.row_mask(batch))
        return True

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.finished = self.mode == "during_training" and self.updates > 0

    # ------------------------------------------------------------------ what others call
    def ensure_covariances(self, trainer: Any, pl_module: Any) -> dict[str, CovarianceStatistic]:
        """The finished covariances, running the after-fit pass first if it has not run."""
        self.bind(pl_module)
        self._allocate(pl_module)
        if self.mode == "during_training" and self.updates == 0:
            raise RuntimeError(
                "InfluenceStatistics(mode='during_training') saw no training step with an update; "
                f"lower every_n_steps (now {self.every_n_steps}) or use mode='after_fit'."
            )
        if self.mode == "after_fit" and not self.finished:
            rank_zero_info("lightning-influence: covariance pass over the training data")
            options = self.options
            loader = training_loader(trainer, pl_module, options.batch_size)
            self.covariances = None  # freed before the new sums are allocated
            self.covariances = new_covariances(self.tracker, model_device(pl_module), options)
            fit_covariances(pl_module, loader, self.task, options, tracker=self.tracker,
                            covariances=self.covariances,
                            progress=options.progress and trainer.is_global_zero)
            self.finished = True
        return self.covariances

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        # once the eigendecomposition has consumed them (their sums freed), a checkpoint holds
        # no covariances, and a run resumed from it accumulates them again
        kept = self.covariances is not None and not any(
            stat.__dict__.get("released") for stat in self.covariances.values())
        state: dict[str, Any] = {"mode": self.mode, "updates": self.updates,
                                 "skipped_updates": self.skipped_updates,
                                 "finished": self.finished and kept}
        if kept:
            state["covariances"] = {name: stat.sums() for name, stat in self.covariances.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", 0))
        self.skipped_updates = int(state_dict.get("skipped_updates", 0))
        self.finished = bool(state_dict.get("finished", False))
        self._pending_state = state_dict.get("covariances")
        if self.tracker is not None and self._bound_module is not None:
            self._allocate(self._bound_module)

    # ------------------------------------------------------------------ internals
    def bind(self, pl_module: Any) -> None:
        """Resolve the task and the tracked layers of ``pl_module`` in the run (once per
        module); the covariance sums are allocated only when a pass needs them (after the
        memory plan was checked) or a checkpoint restores them."""
        if self.influence_run is None:  # used without a Trainer: a run of its own
            self.influence_run = InfluenceRun()
            self.influence_run.statistics = self
        self.influence_run.bind(pl_module)
        if self._bound_module is not pl_module:
            self._bound_module = pl_module
            self.covariances = None
        if self._pending_state is not None:
            self._allocate(pl_module)

    def _allocate(self, pl_module: Any) -> None:
        """Empty sums for every tracked layer (once), then any checkpointed state."""
        if self.covariances is None:
            self.covariances = new_covariances(self.tracker, model_device(pl_module),
                                               self.options)
        self._restore()

    def _restore(self) -> None:
        if self._pending_state is None or self.covariances is None:
            return
        for name, sums in self._pending_state.items():
            if name not in self.covariances:
                raise ValueError(f"The checkpoint holds covariances for layer {name!r}, which "
                                 "this model does not track; resume with the same layers.")
            self.covariances[name].load_sums(sums)
        self._pending_state = None
