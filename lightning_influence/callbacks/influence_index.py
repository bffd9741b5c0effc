"""InfluenceIndex: the training-gradient index, built when fit ends, for questions asked later."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_influence.callbacks._common import output_dir, training_loader
from lightning_influence.callbacks.run import InfluenceRun
from lightning_influence.index import IndexResult, IndexWriter, TrainingIndex, open_index
from lightning_influence.options import DEFAULT_INDEX, IndexOptions, callback_options
from lightning_influence.scoring import bind


class InfluenceIndex(Callback):
    """Writes a compressed index of every training example's gradient, so that new queries are
    answered later without a pass over the training data (:meth:`query`).

    When another influence callback streams the training data when fit ends
    (:class:`InfluenceScores`, or :class:`DocumentInfluence` over the training corpus), the index
    is built from the rows of that pass: put this callback after it in the Trainer's callbacks.
    Otherwise (or for the batches that pass skipped) it runs its own pass: one forward and
    backward per training batch. A finished index of the same model, factors, compression and
    data is reused; an interrupted build resumes.

    Args:
        output_dir: the index folder (default: ``<factors folder>/index``).
        compression: shortcut for ``options.compression`` (``"sketch"``, ``"eigen"`` or
            ``"kronecker"``).
        width: shortcut for ``options.width``: numbers stored per training example.
        dtype: shortcut for ``options.dtype``.
        candidates: shortcut for ``options.candidates``: candidates per end re-ranked per query.
        top_k: shortcut for ``options.top_k``.
        options: :class:`~lightning_influence.options.IndexOptions` (``IndexOptions.help()``).
    """

    def __init__(self, output_dir: str | Path | None = None, compression: str | None = None,
                 width: int | None = None, dtype: str | None = None,
                 candidates: int | None = None, top_k: int | None = None,
                 options: IndexOptions = DEFAULT_INDEX) -> None:
        super().__init__()
        shortcuts = {k: v for k, v in dict(compression=compression, width=width, dtype=dtype,
                                           candidates=candidates, top_k=top_k).items()
                     if v is not None}
        try:
            self.options = callback_options(IndexOptions, options, shortcuts, {},
                                            "InfluenceIndex", "options")
        except ValueError as err:
            raise ValueError(f"InfluenceIndex: {err}") from err
        self.output_dir = output_dir
        self.index: TrainingIndex | None = None
        self.folder: str | None = None
        self.influence_run: InfluenceRun | None = None
        self._writer: IndexWriter | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.influence_run = InfluenceRun.join(trainer, self, "consumer")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.influence_run.check()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.run(trainer, pl_module)

    def run(self, trainer: Any, pl_module: Any) -> TrainingIndex:
        """Build (or finish, or reuse) the index. Called when fit ends; callable after ``fit``."""
        if self.index is None:
            writer = self._writer or self._prepare(trainer, pl_module)
            if not writer.complete and self._writer is None:
                rank_zero_info("lightning-influence: building the index in its own pass over "
                               "the training data (no scoring pass before it fed it)")
            self._finish(writer)
        return self.index

    # ------------------------------------------------------------------ fed by a scoring pass
    def training_rows_observer(self, trainer: Any, pl_module: Any) -> IndexWriter | None:
        """The writer that another callback's scoring pass feeds (see
        :meth:`InfluenceRun.training_pass`), or None when the index exists already."""
        if self.index is not None:
            return None
        if self._writer is None:
            self._writer = self._prepare(trainer, pl_module)
        return None if self._writer.complete else self._writer

    def training_pass_done(self) -> None:
        """After the pass that fed the writer: build what it missed, open the index."""
        if self.index is None and self._writer is not None:
            self._finish(self._writer)

    # ------------------------------------------------------------------ questions
    def query(self, model: Any, queries: Any, top_k: int | None = None,
              candidates: int | None = None, rerank: bool | None = None) -> IndexResult:
        """Top-k proponents and opponents of new queries from the index (see
        :meth:`~lightning_influence.index.TrainingIndex.query`): exact scores of the re-ranked
        candidates, or with ``rerank=False`` the index estimates (marked as such)."""
        if self.index is None:
            raise RuntimeError("InfluenceIndex.query: no index yet; it is built when fit ends "
                               "(or call run(trainer, pl_module) after fit).")
        index = self.index
        if model is not index.bound.model:  # another object: check that it is the same model
            index = open_index(index.folder, model, index.bound.preconditioner, index.loader,
                               index.bound.task, self.options)
        return index.query(queries, top_k, candidates, rerank)

    # ------------------------------------------------------------------ helpers
    def _prepare(self, trainer: Any, pl_module: Any) -> IndexWriter:
        if self.influence_run is None:
            self.setup(trainer, pl_module, "fit")
        factors, task = self.influence_run.curvature(trainer, pl_module, "InfluenceIndex")
        base = self.influence_run.factors_path
        folder = output_dir(trainer, self.output_dir or (Path(base) / "index" if base else None))
        if self.output_dir is None and base is None:
            folder = folder / "index"
        options = dataclasses.replace(self.options, progress=self.options.progress
                                      and trainer.is_global_zero)
        loader = training_loader(trainer, pl_module, options.batch_size)
        bound = bind(pl_module, factors, task, factors.tracker(pl_module))
        self.folder = str(folder)
        return IndexWriter.prepare(bound, loader, folder, options)

    def _finish(self, writer: IndexWriter) -> None:
        self.index = writer.close()
        self.influence_run.index = self.index
        self._writer = None
        rank_zero_info(f"lightning-influence: index of {self.index.num_examples} training "
                       f"examples ({self.index.width} {self.index.meta['dtype']} numbers each, "
                       f"{self.index.compression.kind}) at {self.index.folder}")

    def state_dict(self) -> dict[str, Any]:
        return {"folder": self.folder}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.folder = state_dict.get("folder")
