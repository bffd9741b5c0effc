"""InfluenceRun: the one object the influence callbacks of a Trainer share.

Lightning hands every hook the ``trainer`` and the ``pl_module`` rather than letting callbacks
search for each other; the influence callbacks do the same with their own state. The first of
them to be set up creates an :class:`InfluenceRun` for the Trainer, and each of the others
receives that same object in its ``setup`` (:meth:`InfluenceRun.join`). The run holds what the
stages share (the task, the tracked layers, the fit options of the statistics and eigen
callbacks merged, the fitted factors and their folder) and checks, before training starts,
that the callbacks present make a whole (:meth:`InfluenceRun.check`).

No tensor math lives here.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pytorch_lightning.utilities import rank_zero_info

from lightning_influence.callbacks._common import training_loader
from lightning_influence.fitting import options_tracker
from lightning_influence.memory import check_plan, plan_memory
from lightning_influence.options import FitOptions
from lightning_influence.scoring import observing_rows
from lightning_influence.strategies import strategy as strategy_row
from lightning_influence.task import resolve_task

if TYPE_CHECKING:  # pragma: no cover
    from lightning_influence.callbacks.eigen_correction import EigenCorrection
    from lightning_influence.callbacks.influence_statistics import InfluenceStatistics
    from lightning_influence.factors import Preconditioner
    from lightning_influence.task import Task
    from lightning_influence.tracking import LayerTracker

__all__ = ["InfluenceRun"]

_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class InfluenceRun:
    """What the influence callbacks of one Trainer share.

    Attributes:
        statistics: the :class:`InfluenceStatistics` callback, if one is attached.
        eigen: the :class:`EigenCorrection` callback, if one is attached.
        consumers: the callbacks that read the curvature (scores, documents, validation).
        task, tracker: the task and the tracked layers, resolved once per module (by the
            statistics callback when there is one, else by the eigen callback).
        factors: the fitted factors (or the solver), once :class:`EigenCorrection` has them.
        factors_path: the folder they were read from or written to.
        index: the training-gradient index, once :class:`InfluenceIndex` has built it.
    """

    def __init__(self) -> None:
        self.statistics: InfluenceStatistics | None = None
        self.eigen: EigenCorrection | None = None
        self.consumers: list[Any] = []
        self.task: Task | None = None
        self.tracker: LayerTracker | None = None
        self.factors: Preconditioner | None = None
        self.factors_path: str | None = None
        self.memory_checked = False
        self.index: Any = None

    # ------------------------------------------------------------------ joining
    @classmethod
    def join(cls, trainer: Any, callback: Any, role: str) -> InfluenceRun:
        """The Trainer's run (created by the first callback that joins), with ``callback``
        registered in ``role``: ``"statistics"``, ``"eigen"`` or ``"consumer"``."""
        run = _RUNS.get(trainer)
        if run is None:
            run = _RUNS[trainer] = cls()
        if role == "consumer":
            if callback not in run.consumers:
                run.consumers.append(callback)
            return run
        current = getattr(run, role)
        if current is not None and current is not callback:
            raise ValueError(
                f"The Trainer has two {type(callback).__name__} callbacks; influence needs one "
                "of each stage. Remove one of them."
            )
        setattr(run, role, callback)
        return run

    # ------------------------------------------------------------------ rules
    def check(self) -> None:
        """The presence rules, checked before training: a fit that needs covariances needs
        an InfluenceStatistics callback; a consumer of the curvature needs an EigenCorrection;
        the two fit-option sets agree."""
        for consumer in self.consumers:
            if self.eigen is None:
                raise RuntimeError(
                    f"{type(consumer).__name__} needs an EigenCorrection callback in the "
                    "Trainer's callbacks (it provides the curvature factors).")
        if self.eigen is not None:
            options = self.fit_options()
            needs = self.eigen.fitted_strategy()
            if strategy_row(needs).needs_covariances and self.statistics is None:
                why = "" if needs == options.strategy else (
                    f" (strategy={options.strategy!r} with the heuristic damping or the EK-FAC "
                    "preconditioner fits EK-FAC factors first)")
                raise RuntimeError(
                    f"EigenCorrection(strategy={options.strategy!r}) needs an "
                    f"InfluenceStatistics callback in the Trainer's callbacks (it accumulates the "
                    f"covariances){why}."
                )

    def fit_options(self) -> FitOptions:
        """The fit options of the statistics and eigen callbacks, merged: a field that one of
        them sets away from its default is taken from it; two different non-default values
        are an error naming the field."""
        sources = [(type(cb).__name__, cb.fit) for cb in (self.statistics, self.eigen)
                   if cb is not None]
        if len(sources) == 1:
            return sources[0][1]
        default = FitOptions()
        merged = {}
        for field in dataclasses.fields(FitOptions):
            name = field.name
            chosen = {who: getattr(options, name) for who, options in sources
                      if getattr(options, name) != getattr(default, name)}
            if len({repr(v) for v in chosen.values()}) > 1:
                said = ", ".join(f"{who}: {value!r}" for who, value in chosen.items())
                raise ValueError(
                    f"The influence callbacks disagree on the fit option {name!r} ({said}). Set "
                    "it on one of them (fit=FitOptions(...)), or to the same value on both."
                )
            merged[name] = next(iter(chosen.values())) if chosen else getattr(default, name)
        return FitOptions(**merged)

    def check_memory(self, trainer: Any, pl_module: Any) -> None:
        """The memory plan of the whole run (fit and scores), refused before the first training
        step when it cannot fit (once per run; ``FitOptions.memory_limit``)."""
        if self.memory_checked:
            return
        self.memory_checked = True
        fit = self.fit_options()
        if fit.memory_limit == "off":
            return
        self.bind(pl_module)
        if self.eigen is not None:
            fit = dataclasses.replace(fit, strategy=self.eigen.fitted_strategy())
        scores = next((c for c in self.consumers if hasattr(c, "score")), None)
        num_queries = 0
        if scores is not None and scores.pairwise:
            num_queries = scores.num_queries or 0
        loader = training_loader(trainer, pl_module, fit.batch_size)
        plan = plan_memory(pl_module, loader, self.task, fit,
                           scores.score if scores is not None else None,
                           num_queries=num_queries, tracker=self.tracker)
        if self.eigen is None:  # only the covariances are accumulated
            plan.stages = {k: v for k, v in plan.stages.items() if k == "covariances"}
        check_plan(plan, fit.memory_limit, "lightning-influence callbacks")
        rank_zero_info(f"lightning-influence: {plan.format()}")

    # ------------------------------------------------------------------ shared work
    def bind(self, pl_module: Any) -> None:
        """Resolve the task (the statistics callback's, else the eigen callback's, else the
        module's ``influence_task``) and the tracked layers (as the fit options select) of
        ``pl_module``, once per module."""
        if self.tracker is not None and self.tracker.model is pl_module:
            return
        spec = next((cb.task_spec for cb in (self.statistics, self.eigen)
                     if cb is not None and cb.task_spec is not None), None)
        self.task = resolve_task(spec, pl_module)
        self.tracker = options_tracker(pl_module, self.fit_options(), self.task)


    def curvature(self, trainer: Any, pl_module: Any, consumer: str,
                  ) -> tuple[Preconditioner, Task]:
        """For a callback that consumes the curvature: the factors (fitted now if needed) and
        the task they were fitted for."""
        if self.eigen is None:
            raise RuntimeError(f"{consumer} needs an EigenCorrection callback in the Trainer's "
                               "callbacks (it provides the curvature factors).")
        factors = self.eigen.ensure_factors(trainer, pl_module)
        assert self.task is not None  # bound by ensure_factors
        return factors, self.task

    @contextmanager
    def training_pass(self, trainer: Any, pl_module: Any) -> Iterator[None]:
        """Around a consumer's scoring pass over the training data: the consumers that build
        something from the same rows (an :class:`InfluenceIndex`: ``training_rows_observer``)
        are fed them (:func:`~lightning_influence.scoring.observing_rows`), and told when the
        pass has ended (``training_pass_done``), so no second pass is needed."""
        feeding = [(c, c.training_rows_observer(trainer, pl_module)) for c in self.consumers
                   if hasattr(c, "training_rows_observer")]
        feeding = [(c, o) for c, o in feeding if o is not None]
        with observing_rows(*(o for _, o in feeding)):
            yield
        for consumer, _ in feeding:
            consumer.training_pass_done()
