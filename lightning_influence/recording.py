"""Reusing a training step's forward: what the tracked layers and the module did during it.

``InfluenceStatistics(mode="during_training")`` takes the covariance rows of a training step
from the step's own forward (one extra backward, no extra forward). :class:`StepRecording`
observes that forward and says when it cannot stand in for the task's own eval-mode forward
(a forward that branches on ``self.training``, dropout, batch norm, a module called twice).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_influence.passes import evaluation_mode
from lightning_influence.task import Task
from lightning_influence.tracking import Capture, LayerTracker

__all__ = ["StepRecording"]


class StepRecording:
    """The tracked layers' rows and the LightningModule's output during one training forward."""

    def __init__(self, tracker: LayerTracker, module: Any) -> None:
        self.tracker = tracker
        self.module = module
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
        expected = task.model_kwargs(self.module, batch)
        same_kwargs = kwargs.keys() == expected.keys() and all(
            kwargs[k] is v or (isinstance(v, Tensor) and isinstance(kwargs[k], Tensor)
                               and kwargs[k].shape == v.shape and torch.equal(kwargs[k], v))
            for k, v in expected.items())
        if not same_kwargs or len(args) != 1 or args[0] is not task.inputs(batch):
            return ("the training step did not call the LightningModule on exactly the task's "
                    "inputs" + (f" and keyword arguments {sorted(expected)}" if expected else ""))
        try:
            logits = task.logits(output)
        except TypeError:
            return "the task finds no logits in the LightningModule's output"
        if not logits.requires_grad:
            return "the LightningModule's output does not require grad"
        no_grad = self.capture.without_gradient()
        if len(no_grad) == len(self.capture.edges):  # none at all (or no tracked layer ran)
            return "no tracked layer produced an output that requires grad"
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
        pairs = [("the model's outputs", task.logits(self.output).detach(),
                  task.logits(expected))]
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
