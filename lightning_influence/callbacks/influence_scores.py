"""InfluenceScores: score queries against the training data and log what it finds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_influence.callbacks._common import (
    output_dir,
    query_loader,
    training_loader,
)
from lightning_influence.callbacks.eigen_correction import EigenCorrection, attached_curvature
from lightning_influence.memory import estimate_bytes, format_estimate
from lightning_influence.passes import count_examples
from lightning_influence.ranking import flag_top_fraction
from lightning_influence.reporting import ExampleLookup, log_results, write_results
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
      ``layer_influence.csv`` and ``summary.json`` to the output folder, and logs tables (with
      images or text of the examples), histograms and a layer-wise bar chart to W&B.

    Args:
        queries: the query loader (default: the Trainer's validation loader).
        num_queries: how many queries to take from the start of that loader (None: all).
        top_k: proponents and opponents kept per query.
        flag_fraction: the fraction of training examples flagged by self-influence.
        pairwise: compute the query x training scores.
        self_influence: compute self-influence and the flags.
        per_layer: keep the per-layer breakdown (layer-wise influence).
        keep_scores: keep the full ``[Q, N]`` score matrix (written to scores.safetensors).
        normalize: divide scores by the number of training examples.
        render: render examples (images/text) in the W&B tables.
        output_dir: where files go (default: the EigenCorrection's, ``<root>/influence``).
        batch_size: batch size of the scoring passes (default: the training loader's).
        precision: ``"auto"`` runs the score pass under autocast when the Trainer runs mixed
            precision (``"bf16-mixed"`` -> bfloat16, ``"16-mixed"`` -> float16); ``"bf16"``,
            ``"16"`` force it; ``None`` or ``"32"`` keep full precision. Curvature math stays in
            float32/float64 either way.
        resumable: write score chunks to ``<output_dir>/score_chunks`` so that an interrupted
            scoring pass resumes where it stopped.
        progress: show progress bars.
    """

    def __init__(self, queries: DataLoader | None = None, num_queries: int | None = 8,
                 top_k: int = 10, flag_fraction: float = 0.1, pairwise: bool = True,
                 self_influence: bool = True, per_layer: bool = True, keep_scores: bool = False,
                 normalize: bool = False, render: bool = True,
                 output_dir: str | Path | None = None, batch_size: int | None = None,
                 precision: str | None = "auto", resumable: bool = True,
                 progress: bool = True) -> None:
        super().__init__()
        if top_k < 1:
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
        self.queries = queries
        self.num_queries = num_queries
        self.top_k = top_k
        self.flag_fraction = flag_fraction
        self.pairwise = pairwise
        self.self_influence = self_influence
        self.per_layer = per_layer
        self.keep_scores = keep_scores
        self.normalize = normalize
        self.render = render
        self.output_dir = output_dir
        self.batch_size = batch_size
        if precision not in (None, "auto", "32", "bf16", "16"):
            raise ValueError(f"InfluenceScores: precision={precision!r}; choose 'auto', '32', "
                             "'bf16', '16' or None.")
        self.precision = precision
        self.resumable = resumable
        self.progress = progress
        self.pairwise_result: PairwiseResult | None = None
        self.self_result: SelfResult | None = None
        self.files: dict[str, str] = {}
        self.logged_keys: list[str] = []

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.run(trainer, pl_module)

    def run(self, trainer: Any, pl_module: Any) -> None:
        """Compute, write and log. Called when fit ends; callable by hand after ``fit``."""
        queries = None  # the loaders first: a problem with them is found before the fit
        if self.pairwise:
            queries = query_loader(trainer, pl_module, self.queries, self.num_queries,
                                   self.batch_size)
        train = training_loader(trainer, pl_module, self.batch_size)
        eigen, factors, task = attached_curvature(trainer, pl_module, "InfluenceScores")
        tracker = factors.tracker(pl_module)
        show = self.progress and trainer.is_global_zero
        if self.pairwise:
            num_train = count_examples(train)
            rank_zero_info(f"lightning-influence: scoring {count_examples(queries)} queries "
                           f"against {num_train or 'the stream of'} training examples")
            rank_zero_info("lightning-influence: " + format_estimate(estimate_bytes(
                factors.shapes, factors.strategy, num_queries=count_examples(queries),
                batch_size=train.batch_size or 1, num_train=num_train,
                keep_scores=self.keep_scores)))
            self.pairwise_result = compute_pairwise_scores(
                pl_module, factors, queries, train, task, top_k=self.top_k,
                keep_scores=self.keep_scores, per_layer=self.per_layer,
                normalize=self.normalize, tracker=tracker, progress=show,
                autocast=self._autocast(trainer), scores_dir=self._chunk_dir(trainer, eigen),
                self_influence=self.self_influence)  # both from one pass over the training data
            self.self_result = self.pairwise_result.self_result
        if self.self_influence and not factors.layerwise:
            rank_zero_info(f"lightning-influence: self-influence through the "
                           f"{factors.strategy} solver (one solve per training batch)")
        if self.self_influence and self.self_result is None:
            self.self_result = compute_self_scores(pl_module, factors, train, task,
                                                   normalize=self.normalize, tracker=tracker,
                                                   progress=show, autocast=self._autocast(trainer),
                                                   scores_dir=self._chunk_dir(trainer, eigen))
        if not trainer.is_global_zero:
            return
        folder = output_dir(trainer, self.output_dir or eigen.factors_path)
        train_lookup = ExampleLookup(train, task, self._shown_indices())
        query_lookup = ExampleLookup(queries, task) if queries is not None else None
        paths = write_results(folder, self.pairwise_result, self.self_result, query_lookup,
                              train_lookup, self.flag_fraction,
                              extra={"strategy": factors.strategy, "damping": factors.damping})
        self.files = {k: str(v) for k, v in paths.items()}
        self.logged_keys = log_results(trainer.loggers, self.pairwise_result, self.self_result,
                                       query_lookup, train_lookup, self.flag_fraction,
                                       render=self.render)
        rank_zero_info(f"lightning-influence: results written to {folder}")

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
        """The score pass's autocast dtype: from ``precision``, or the Trainer's with "auto"."""
        precision = self.precision
        if precision == "auto":
            precision = str(getattr(trainer, "precision", "32"))
        if precision is None or not precision.endswith("mixed") and precision not in ("bf16",
                                                                                       "16"):
            return None
        return torch.bfloat16 if precision.startswith("bf16") else torch.float16

    def _chunk_dir(self, trainer: Any, eigen: EigenCorrection) -> Path | None:
        if not self.resumable:
            return None
        return output_dir(trainer, self.output_dir or eigen.factors_path) / "score_chunks"

    def state_dict(self) -> dict[str, Any]:
        return {"files": self.files}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.files = dict(state_dict.get("files", {}))

