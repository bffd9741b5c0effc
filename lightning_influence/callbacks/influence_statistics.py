"""InfluenceStatistics: accumulate the K-FAC covariances A and S."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_influence.callbacks._common import training_loader
from lightning_influence.distributed import sampling_generator
from lightning_influence.fitting import (
    add_rows,
    fit_covariances,
    new_covariances,
    update_covariances,
)
from lightning_influence.passes import (
    evaluation_mode,
    fisher_mode,
    move_to_device,
    row_mode,
    rows_from_outputs,
)
from lightning_influence.statistics import CovarianceStatistic
from lightning_influence.task import Task, resolve_task
from lightning_influence.tracking import BATCH_LAYOUTS, Capture, LayerTracker

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
        reuse_forward: during training, take the rows from the training step's forward
            (checked once against eval mode, see above); ``False`` always runs a separate
            eval-mode pass.
        fisher: ``"sampled"`` (one label per example drawn from the model, as in the paper),
            ``"exact"`` (every label weighted by its probability: no sampling noise, one
            backward per class; classification and regression) or ``"empirical"`` (the true
            labels). EigenCorrection's eigenvalue pass follows this choice.
        include_frozen: also track layers whose weight does not require grad (default: only
            trainable layers, e.g. a LoRA adapter's).
        batch_layout: how rows map to examples when the model reshapes its batch inside
            (``"auto"``, ``"contiguous"``, ``"interleaved"``; see
            :class:`~lightning_influence.LayerTracker`).
    """

    def __init__(self, task: Task | str | None = None, layers: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, mode: str = "after_fit",
                 every_n_steps: int = 10, max_batches: int | None = None,
                 batch_size: int | None = None, seed: int = 0, progress: bool = True,
                 reuse_forward: bool = True, fisher: str = "sampled",
                 include_frozen: bool = False, batch_layout: str = "auto") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"InfluenceStatistics: mode={mode!r} is not one of {list(MODES)}.")
        if every_n_steps < 1:
            raise ValueError(f"InfluenceStatistics: every_n_steps must be >= 1, got "
                             f"{every_n_steps}.")
        self.fisher = fisher_mode(fisher)
        if batch_layout not in BATCH_LAYOUTS:
            raise ValueError(f"InfluenceStatistics: batch_layout={batch_layout!r} is not one of "
                             f"{list(BATCH_LAYOUTS)}.")
        self.include_frozen, self.batch_layout = include_frozen, batch_layout
        self.task_spec = task
        self.layers = list(layers) if layers is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.mode = mode
        self.every_n_steps = every_n_steps
        self.max_batches = max_batches
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.reuse_forward = reuse_forward
        # None: not checked yet; True: train-mode rows equal eval-mode rows; False: fall back
        self.reuse_verified: bool | None = None
        self.fallback_reason: str | None = None
        self._recording: _StepRecording | None = None
        self._updated_this_step = False
        self._layer_counts: dict[str, int] | None = None
        self.covariances: dict[str, CovarianceStatistic] | None = None
        self.updates = 0
        self._last_step = -1
        self._due_batch: Any = None
        self.finished = False
        self._pending_state: dict[str, Any] | None = None
        self.tracker: LayerTracker | None = None
        self.task: Task | None = None

    # ------------------------------------------------------------------ when
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.bind(pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        # once per optimizer step: the first (micro-)batch of every every_n_steps-th step
        if (self.mode != "during_training" or step % self.every_n_steps != 0
                or step == self._last_step):
            return
        self._last_step = step
        self.bind(pl_module)
        self._updated_this_step = False
        self._due_batch = batch
        if self.reuse_forward and self.reuse_verified is not False:
            self._recording = _StepRecording(self.tracker, pl_module)

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
        if not self._updated_this_step:
            # seeded by the update count: reproducible, and resumed runs continue the sequence
            update_covariances(pl_module, due, self.task, self.tracker, self.covariances,
                               sampling_generator(self.seed, self.updates), batch_idx,
                               fisher=self.fisher)
        self.updates += 1

    def _update_from_recording(self, pl_module: Any, recording: _StepRecording) -> bool:
        """Covariances from the training step's forward; False (and a reason) when unusable."""
        batch = move_to_device(self._due_batch, _device(pl_module))
        reason = recording.unusable_reason(self.task, batch, self._layer_counts)
        if reason is None and self.reuse_verified is None:
            reason = recording.differs_from_eval(pl_module, self.task, batch)
            self.reuse_verified = reason is None
            self._layer_counts = recording.layer_counts()
        if reason is not None:
            self.reuse_verified = False
            self.fallback_reason = reason
            rank_zero_info(f"lightning-influence: covariance updates during training run a "
                           f"separate eval-mode forward ({reason}).")
            return False
        rows, _ = rows_from_outputs(recording.output, recording.capture, batch, self.task,
                                    self.tracker, row_mode(self.fisher),
                                    sampling_generator(self.seed, self.updates),
                                    retain_graph=True)
        add_rows(self.covariances, rows, self.task.row_mask(batch))
        return True

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.finished = self.mode == "during_training" and self.updates > 0

    # ------------------------------------------------------------------ what others call
    def ensure_covariances(self, trainer: Any, pl_module: Any) -> dict[str, CovarianceStatistic]:
        """The finished covariances, running the after-fit pass first if it has not run."""
        self.bind(pl_module)
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
                            covariances=self.covariances, fisher=self.fisher)
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
    def bind(self, pl_module: Any) -> None:
        """Resolve the task and the tracked layers of ``pl_module`` (once per module) and
        restore covariances from a checkpoint; EigenCorrection reads ``task`` and ``tracker``
        from here."""
        if self.tracker is None or self.tracker.model is not pl_module:
            self.task = resolve_task(self.task_spec, pl_module)
            self.tracker = LayerTracker(pl_module, self.layers, self.exclude,
                                        include_frozen=self.include_frozen,
                                        batch_layout=self.batch_layout)
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


class _StepRecording:
    """The tracked layers' rows and the LightningModule's output during one training forward."""

    def __init__(self, tracker: LayerTracker, module: Any) -> None:
        self.tracker = tracker
        self.capture, self._detach = tracker.attach()
        # calls of the LightningModule that call no other one inside: under DDP, Lightning
        # calls the module once more around the training step (its forward redirected to
        # training_step), and that wrapping call is not a model forward
        self.calls: list[tuple[tuple, dict, Any]] = []
        self._open: list[bool] = []  # per open call: did another call start inside it

        def pre_hook(_module: Any, args: tuple, kwargs: dict) -> None:
            if self._open:
                self._open[-1] = True
            self._open.append(False)

        def hook(_module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            wrapped_another = self._open.pop() if self._open else False
            if not wrapped_another:
                self.calls.append((args, kwargs, output))
        self._handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True),
                         module.register_forward_hook(hook, with_kwargs=True)]

    def stop(self) -> None:
        self._detach()
        for handle in self._handles:
            handle.remove()

    @property
    def output(self) -> Any:
        return self.calls[0][2]

    def layer_counts(self) -> dict[str, int]:
        """How many times each tracked layer ran during the recording."""
        return self.capture.layer_counts()

    def unusable_reason(self, task: Task, batch: Any, counts: dict[str, int] | None,
                        ) -> str | None:
        """Why this forward cannot stand in for ``task.forward(model, batch)``, or None.
        ``counts``: the tracked layers' run counts of the verified forward (None before)."""
        if type(task).forward is not Task.forward:
            return f"{type(task).__name__} overrides Task.forward"
        if not self.calls:
            return ("the training step did not call the LightningModule itself (only its "
                    "submodules)")
        if len(self.calls) > 1:
            return (f"the training step called the LightningModule {len(self.calls)} times, "
                    "not once")
        args, kwargs, output = self.calls[0]
        if kwargs or len(args) != 1 or args[0] is not task.inputs(batch):
            return ("the training step did not call the LightningModule on exactly the task's "
                    "inputs")
        try:
            logits = task.logits(output)
        except TypeError:
            return "the task finds no logits in the LightningModule's output"
        if not logits.requires_grad:
            return "the LightningModule's output does not require grad"
        if not self.capture.outputs:
            return "no tracked layer produced an output that requires grad"
        no_grad = [name for name, edges in self.capture.edges.items()
                   if all(edge is None for edge in edges)]
        if no_grad:
            return (f"tracked layers {no_grad} ran without gradient in the training step "
                    "(frozen, or under no_grad/reentrant checkpointing)")
        if counts is not None and self.layer_counts() != counts:
            return "the tracked layers ran a different number of times than in the checked step"
        return None

    def differs_from_eval(self, module: Any, task: Task, batch: Any) -> str | None:
        """Compare this (train-mode) forward with an eval-mode forward on the same batch."""
        with evaluation_mode(module), torch.no_grad():
            reference = Capture()
            _, detach = self.tracker.attach(reference)
            try:
                expected = task.forward(module, batch)
            finally:
                detach()
        pairs = [("the model output", task.logits(self.output).detach(), task.logits(expected))]
        for name, acts in self.capture.activations.items():
            ref = reference.activations.get(name, [])
            if len(ref) != len(acts):
                return f"layer {name!r} ran a different number of times in eval mode"
            pairs += [(f"the inputs of layer {name!r}", a, r) for a, r in zip(acts, ref, strict=True)]
        for what, got, want in pairs:
            if got.shape != want.shape:
                return f"{what} have another shape in eval mode"
            low = torch.finfo(got.dtype).bits <= 16 or torch.finfo(want.dtype).bits <= 16
            tolerance = 5e-2 if low else 1e-3
            error = float((got.float() - want.float()).norm())
            if error > tolerance * float(want.float().norm()) + 1e-12:
                return (f"{what} differ between train and eval mode (dropout, batch norm or a "
                        "forward that depends on self.training)")
        return None
