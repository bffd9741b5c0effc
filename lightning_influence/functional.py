"""Functional views of a model, shared by the solvers and the ground-truth evaluators.

Index letters: P parameters of the tracked layers.

``torch.func`` differentiates a function of explicit parameters. :class:`TaskModel` turns a model
and its task into ``batch -> logits`` as a module; :func:`split_state` splits its state into the
tracked layers' parameters (the P coordinates a solver or PBRF moves) and everything else (held
fixed); :func:`cast_batch` moves a batch to the model's device and dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.passes import move_to_device
from lightning_influence.task import Task
from lightning_influence.tracking import LayerTracker

__all__ = ["TaskModel", "cast_batch", "split_state", "parameter_keys"]


class TaskModel(nn.Module):
    """``batch -> task.logits(task.forward(model, batch))`` as a module, so that
    ``torch.func.functional_call`` can run it; its state keys are the model's, prefixed
    ``"model."``."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Any) -> Tensor:
        return self.task.logits(self.task.forward(self.model, batch))


def cast_batch(batch: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Move a (nested) batch to ``device``, floating tensors cast to ``dtype``."""
    batch = move_to_device(batch, device)
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: cast_batch(v, dtype, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(cast_batch(v, dtype, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(cast_batch(v, dtype, device) for v in batch)
    return batch


def parameter_keys(tracker: LayerTracker) -> dict[str, dict[str, str]]:
    """``{layer: {"weight": TaskModel key, "bias": ...}}`` for every tracked layer."""
    return {layer.name: {kind: f"model.{layer.name}.{kind}"
                         for kind in ("weight", "bias")
                         if getattr(layer.module, kind, None) is not None}
            for layer in tracker}


def split_state(model: nn.Module, tracked: Sequence[str], dtype: torch.dtype,
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The model's parameters and buffers under :class:`TaskModel` keys, detached, floating
    ones cast to ``dtype``: ``(tracked, rest)`` with ``tracked`` ordered like ``tracked``."""
    state = {f"model.{k}": v for k, v in model.named_parameters()}
    state.update({f"model.{k}": v for k, v in model.named_buffers()})
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v.detach()
             for k, v in state.items()}
    return {k: state[k] for k in tracked}, {k: v for k, v in state.items() if k not in tracked}
