"""InfluenceScores: score queries against the training data and log what it finds."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_influence.callbacks._common import (
    output_dir,
    query_loader,
    training_loader,
)
from lightning_influence.callbacks.run import InfluenceRun
from lightning_influence.memory import estimate_bytes, format_estimate
from lightning_influence.options import CALLBACK_SCORE, ScoreOptions, callback_options
from lightning_influence.passes import count_examples
from lightning_influence.ranking import flag_top_fraction
from lightning_influence.reporting import (
    ExampleLookup,
    InfluenceReport,
    log_results,
    write_results,
)
from lightning_influence.scoring import (
    PairwiseResult,
    SelfResult,
    compute_pairwise_scores,
    compute_self_scores,
)


class InfluenceScores(Callback):
    """Logs the top influential training examples of each query and the data-debugging flags.

    When fit ends (after :class:`EigenCorrection` has its factors), it

    - scores every query (the validation set's first ``num_queries`` examples by default, or
      the ``queries`` loader) against every training example in one streaming pass, keeping the
      ``top_k`` proponents (positive: helpful) and opponents (negative: harmful) per query;
    - computes the self-influence of every training example and flags the top
      ``flag_fraction`` (likely mislabeled, conflicting or out-of-distribution examples);
    - writes ``scores.safetensors``, ``top_influential.csv``, ``self_influence_flags.csv``,
      ``layer_influence.csv`` and ``summary.json`` to the output folder, with ``report.html``
      (per query its proponents and opponents, the flagged examples, score histograms and the
      layer-wise bars as PNG files beside it: readable in a browser, no account), and logs
      tables (with images or text of the examples), histograms and a layer-wise bar chart to
      W&B.

    Args:
        queries: the query loader (default: the Trainer's validation loader).
        num_queries: how many queries to take from the start of that loader (None: all).
        top_k: shortcut for ``score.top_k``: proponents and opponents kept per query.
        flag_fraction: the fraction of training examples flagged by self-influence.
        pairwise: compute the query x training scores.
        self_influence: compute self-influence and the flags (from the same pass as the
            pairwise scores when both are on).
        output_dir: where files go (default: the EigenCorrection's, ``<root>/influence``).
        score: :class:`~lightning_influence.ScoreOptions`; the callback's default keeps top-k
            lists (``keep_scores=False``, set it to write the full ``[Q, N]`` matrix), each
            layer's share (``per_layer=True``) and runs the score pass under autocast when the
            Trainer runs mixed precision (``precision="auto"``: ``"bf16-mixed"`` -> bfloat16,
            ``"16-mixed"`` -> float16; ``"bf16"``/``"16"`` force it, ``None``/``"32"`` keep full
            precision; curvature math stays in float32/float64 either way). ``resumable``
            writes score chunks to ``<output_dir>/score_chunks`` so that an interrupted pass
            resumes; ``batch_size``, ``normalize``, ``render``, ``progress`` as documented
            there.
        **legacy: the options this constructor took before :class:`ScoreOptions` held them
            (``per_layer``, ``keep_scores``, ``normalize``, ``render``, ``batch_size``,
            ``precision``, ``resumable``, ``progress``) still work, with a deprecation
            warning.
    """

    def __init__(self, queries: DataLoader | None = None, num_queries: int | None = 8,
                 top_k: int | None = None, flag_fraction: float = 0.1, pairwise: bool = True,
                 self_influence: bool = True, output_dir: str | Path | None = None,
                 score: ScoreOptions = CALLBACK_SCORE, **legacy: Any) -> None:
        super().__init__()
        if top_k is not None and top_k < 1:
            raise ValueError(f"InfluenceScores: top_k must be >= 1, got {top_k}.")
        if not 0 < flag_fraction <= 1:
            raise ValueError(f"InfluenceScores: flag_fraction must be in (0, 1], got "
                             f"{flag_fraction}.")
        if num_queries is not None and num_queries < 1:
            raise ValueError(f"InfluenceScores: num_queries must be >= 1 or None, got "
                             f"{num_queries}.")
        if not (pairwise or self_influence):
            raise ValueError("InfluenceScores: pairwise and self_influence are both False; "
                             "nothing to compute.")
        try:
            self.score = callback_options(ScoreOptions, score, {} if top_k is None else {
                "top_k": top_k}, legacy, "InfluenceScores", "score")
        except ValueError as err:
            raise ValueError(f"InfluenceScores: {err}") from err
        self.queries = queries
        self.num_queries = num_queries
        self.flag_fraction = flag_fraction
        self.pairwise = pairwise
        self.self_influence = self_influence
        self.output_dir = output_dir
        self.pairwise_result: PairwiseResult | None = None
        self.self_result: SelfResult | None = None
        self.files: dict[str, str] = {}
        self.logged_keys: list[str] = []
        self.influence_run: InfluenceRun | None = None

    @property
    def top_k(self) -> int:
        return self.score.top_k

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.influence_run = InfluenceRun.join(trainer, self, "consumer")

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.influence_run.check()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.influence_run.check_memory(trainer, pl_module)  # before the first step

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.run(trainer, pl_module)

    def run(self, trainer: Any, pl_module: Any) -> None:
        """Compute, write and log. Called when fit ends; callable by hand after ``fit``."""
        if self.influence_run is None:
            self.setup(trainer, pl_module, "fit")
        influence = self.influence_run
        options = dataclasses.replace(
            self.score, progress=self.score.progress and trainer.is_global_zero,
            precision={torch.bfloat16: "bf16", torch.float16: "16"}.get(self._autocast(trainer)))
        queries = None  # the loaders first: a problem with them is found before the fit
        if self.pairwise:
            queries = query_loader(trainer, pl_module, self.queries, self.num_queries,
                                   options.batch_size)
        train = training_loader(trainer, pl_module, options.batch_size)
        factors, task = influence.curvature(trainer, pl_module, "InfluenceScores")
        tracker = factors.tracker(pl_module)
        chunks = self._chunk_dir(trainer, influence) if options.resumable else None
        if self.pairwise:
            num_train = count_examples(train)
            rank_zero_info(f"lightning-influence: scoring {count_examples(queries)} queries "
                           f"against {num_train or 'the stream of'} training examples")
            rank_zero_info("lightning-influence: " + format_estimate(estimate_bytes(
                factors.shapes, factors.strategy, num_queries=count_examples(queries),
                batch_size=train.batch_size or 1, num_train=num_train,
                keep_scores=options.keep_scores)))
            with influence.training_pass(trainer, pl_module):  # an InfluenceIndex is fed too
                self.pairwise_result = compute_pairwise_scores(
                    pl_module, factors, queries, train, task, options, tracker=tracker,
                    scores_dir=chunks,
                    self_influence=self.self_influence)  # both from one pass over the data
            self.self_result = self.pairwise_result.self_result
        if self.self_influence and not factors.layerwise:
            rank_zero_info(f"lightning-influence: self-influence through the "
                           f"{factors.strategy} solver (one solve per training batch)")
        if self.self_influence and self.self_result is None:
            with influence.training_pass(trainer, pl_module):
                self.self_result = compute_self_scores(pl_module, factors, train, task, options,
                                                       tracker=tracker, scores_dir=chunks)
        note = getattr(factors, "convergence_note", lambda: None)()
        if note:
            rank_zero_warn(f"lightning-influence: {note}; the scores are approximate.")
        if not trainer.is_global_zero:
            return
        folder = output_dir(trainer, self.output_dir or influence.factors_path)
        train_lookup = ExampleLookup(train, task, self._shown_indices())
        query_lookup = ExampleLookup(queries, task) if queries is not None else None
        report = InfluenceReport(self.pairwise_result, self.self_result, query_lookup,
                                 train_lookup, self.flag_fraction)
        paths = write_results(folder, report,
                              extra={"strategy": factors.strategy, "damping": factors.damping,
                                     **({"solver_convergence": note} if note else {})},
                              render=options.render)
        self.files = {k: str(v) for k, v in paths.items()}
        self.logged_keys = log_results(trainer.loggers, report, render=options.render)
        rank_zero_info(f"lightning-influence: results written to {folder}; open "
                       f"{paths['report']} in a browser")

    def _shown_indices(self) -> list[int]:
        """Training examples the tables show: top-k entries and flags."""
        shown: set[int] = set()
        if self.pairwise_result is not None:
            top = self.pairwise_result.top
            shown.update(top.proponent_indices.flatten().tolist())
            shown.update(top.opponent_indices.flatten().tolist())
        if self.self_result is not None:
            shown.update(flag_top_fraction(self.self_result.scores, self.flag_fraction).tolist())
        return sorted(shown)

    def _autocast(self, trainer: Any) -> torch.dtype | None:
        """The score pass's autocast dtype: from ``score.precision``, or the Trainer's with
        ``"auto"``."""
        return self.score.autocast(getattr(trainer, "precision", "32"))

    def _chunk_dir(self, trainer: Any, influence: InfluenceRun) -> Path:
        return output_dir(trainer, self.output_dir or influence.factors_path) / "score_chunks"

    def state_dict(self) -> dict[str, Any]:
        return {"files": self.files}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.files = dict(state_dict.get("files", {}))
