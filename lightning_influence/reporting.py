"""Results to people: files on disk (safetensors, CSV, JSON, an HTML page with PNG plots) and
W&B tables and plots.

Sign convention, repeated in every table: a positive score marks a proponent (helpful) training
example: up-weighting it lowers the query loss; a negative score an opponent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from lightning_influence.io import atomic_save_csv, atomic_save_json, atomic_save_safetensors
from lightning_influence.ranking import flag_top_fraction
from lightning_influence.report_html import example_image, write_html_report
from lightning_influence.scoring import PairwiseResult, SelfResult
from lightning_influence.task import Task

__all__ = ["ExampleLookup", "InfluenceReport", "write_results", "log_results", "SCORE_COLUMN"]

log = logging.getLogger(__name__)

SCORE_COLUMN = "score (+ = proponent/helpful, - = opponent)"
SELF_COLUMN = "self_influence (high = suspicious)"


class ExampleLookup:
    """Describe and render dataset examples by index, through the loader's collate_fn.

    An iterable-style dataset has no index access: the examples at ``indices`` are collected
    in one pass over its stream; any other index describes as ``None``. A loader without
    automatic batching (``batch_size=None``: each item is a whole batch) has no item per
    example either: its examples describe as ``None``.
    """

    def __init__(self, loader: Any, task: Task, indices: Any = None) -> None:
        self.dataset = loader.dataset
        self.collate = loader.collate_fn
        self.task = task
        self.streamed: dict[int, Any] | None = None
        if getattr(loader, "batch_size", 1) is None and getattr(loader, "batch_sampler",
                                                                  None) is None:
            self.streamed = {}
        elif isinstance(self.dataset, IterableDataset):
            wanted = {int(i) for i in (indices if indices is not None else [])}
            self.streamed = {}
            if wanted:
                for i, item in enumerate(self.dataset):
                    if i in wanted:
                        self.streamed[i] = item
                        if len(self.streamed) == len(wanted):
                            break

    def batch(self, index: int) -> Any:
        if self.streamed is not None:
            item = self.streamed.get(int(index))
            return None if item is None else self.collate([item])
        return self.collate([self.dataset[int(index)]])

    def label(self, index: int) -> Any:
        batch = self.batch(index)
        if batch is None:
            return None
        info = self.task.describe(batch, 0)
        return info.get("label", info.get("tokens"))

    def render(self, index: int) -> Any:
        batch = self.batch(index)
        return None if batch is None else self.task.render(batch, 0)


def _top_rows(result: PairwiseResult, queries: ExampleLookup, train: ExampleLookup,
              ) -> list[dict[str, Any]]:
    rows = []
    top = result.top
    for q in range(top.proponent_indices.shape[0]):
        q_label = queries.label(q)
        for kind, idx, val in (("proponent", top.proponent_indices, top.proponent_scores),
                               ("opponent", top.opponent_indices, top.opponent_scores)):
            for rank in range(idx.shape[1]):
                n = int(idx[q, rank])
                rows.append({"query_index": q, "query_label": q_label,
                             "query_loss": float(result.query_losses[q]), "kind": kind,
                             "rank": rank + 1, "train_index": n, "train_label": train.label(n),
                             SCORE_COLUMN: float(val[q, rank])})
    return rows


def _flag_rows(result: SelfResult, train: ExampleLookup, fraction: float) -> list[dict[str, Any]]:
    flagged = flag_top_fraction(result.scores, fraction)
    return [{"rank": r + 1, "train_index": int(n), "label": train.label(int(n)),
             SELF_COLUMN: float(result.scores[n]), "train_loss": float(result.losses[n])}
            for r, n in enumerate(flagged.tolist())]


@dataclass
class InfluenceReport:
    """What a scoring run reports: its results and how to show their examples.

    Attributes:
        pairwise: the query x training scores (or None when only self-influence was computed).
        self_result: the self-influence of every training example (or None).
        queries: looks up and renders the queries (None without pairwise scores).
        train: looks up and renders the training examples.
        flag_fraction: the share of training examples flagged by self-influence.
    """

    pairwise: PairwiseResult | None
    self_result: SelfResult | None
    queries: ExampleLookup | None
    train: ExampleLookup
    flag_fraction: float = 0.1


def write_results(folder: str | Path, report: InfluenceReport,
                  extra: dict[str, Any] | None = None, html: bool = True,
                  render: bool = True) -> dict[str, Path]:
    """Write ``scores.safetensors``, ``top_influential.csv``, ``self_influence_flags.csv``,
    ``layer_influence.csv`` and ``summary.json`` to ``folder`` (atomically), and with ``html``
    the page ``report.html`` with its PNG plots (:func:`~lightning_influence.report_html.
    write_html_report`; ``render`` shows the examples as images or text there). Returns the
    paths."""
    pairwise, self_result, queries, train = (report.pairwise, report.self_result,
                                             report.queries, report.train)
    flag_fraction = report.flag_fraction
    folder = Path(folder)
    tensors: dict[str, Tensor] = {}
    paths: dict[str, Path] = {}
    summary: dict[str, Any] = {"sign": "positive = proponent (helpful), negative = opponent",
                               **(extra or {})}
    if pairwise is not None:
        top = pairwise.top
        tensors.update({"proponent_indices": top.proponent_indices,
                        "proponent_scores": top.proponent_scores,
                        "opponent_indices": top.opponent_indices,
                        "opponent_scores": top.opponent_scores,
                        "query_losses": pairwise.query_losses})
        if pairwise.scores is not None:
            tensors["pairwise_scores"] = pairwise.scores
        rows = _top_rows(pairwise, queries, train)
        paths["top_influential"] = atomic_save_csv(
            rows, folder / "top_influential.csv", list(rows[0]) if rows else ["query_index"])
        summary.update(num_queries=int(top.proponent_indices.shape[0]),
                       num_train=pairwise.num_train, normalized=pairwise.normalized)
    shares = layer_share_rows(pairwise, self_result)
    if shares:
        paths["layer_influence"] = atomic_save_csv(shares, folder / "layer_influence.csv",
                                                   ["layer", "mean_abs_share", "source"])
    if self_result is not None:
        tensors["self_influence"] = self_result.scores
        tensors["self_influence_per_layer"] = self_result.layer_scores
        tensors["train_losses"] = self_result.losses
        rows = _flag_rows(self_result, train, flag_fraction)
        paths["self_influence_flags"] = atomic_save_csv(rows, folder / "self_influence_flags.csv",
                                                        list(rows[0]))
        summary.update(flag_fraction=flag_fraction, num_flagged=len(rows))
    paths["scores"] = atomic_save_safetensors(tensors, folder / "scores.safetensors")
    paths["summary"] = atomic_save_json(summary, folder / "summary.json")
    if html:
        paths.update(write_html_report(folder, report, extra=extra, render=render,
                                       files=[p.name for p in paths.values()]))
    return paths


def layer_share_rows(pairwise: PairwiseResult | None,
                     self_result: SelfResult | None) -> list[dict[str, Any]]:
    """Each layer's share of the influence, from the best per-layer scores computed: the full
    pairwise matrix (``keep_scores``), else the top-k entries' breakdown (``per_layer``), else
    self-influence (always per layer). Rows ``{layer, mean_abs_share, source}``; empty when
    none was computed."""
    if pairwise is not None and pairwise.layer_scores is not None:
        names, shares, source = (pairwise.layer_names, layer_shares(pairwise.layer_scores),
                                 "all pairwise scores")
    elif pairwise is not None and pairwise.top.proponent_layers is not None:
        top = pairwise.top
        per = torch.cat([top.proponent_layers, top.opponent_layers], dim=1)  # [Q, 2K, L]
        names, shares, source = (pairwise.layer_names, layer_shares(per.permute(2, 0, 1)),
                                 "top-k pairwise scores")
    elif self_result is not None and self_result.layer_scores is not None:
        names, shares, source = (self_result.layer_names, layer_shares(self_result.layer_scores),
                                 "self-influence")
    else:
        return []
    return [{"layer": name, "mean_abs_share": float(shares[i]), "source": source}
            for i, name in enumerate(names)]


def layer_shares(layer_scores: Tensor) -> Tensor:
    """Mean over queries and examples of each layer's share of the absolute score ``[L]``."""
    mag = layer_scores.abs().flatten(1).sum(1)
    return mag / mag.sum().clamp_min(1e-300)


def _wandb_media(obj: Any) -> Any:
    import wandb

    if obj is None or isinstance(obj, str):
        return obj
    image = example_image(obj)  # tiny images (8x8 digits) upscaled, nearest-neighbour
    return None if image is None else wandb.Image(image)


def log_results(loggers: list[Any], report: InfluenceReport, prefix: str = "influence",
                render: bool = True, metrics: dict[str, float] | None = None) -> list[str]:
    """Log tables and histograms to every W&B logger, scalar metrics to every logger.

    Returns the keys logged to W&B (empty when no W&B logger is attached).
    """
    pairwise, self_result, queries, train = (report.pairwise, report.self_result,
                                             report.queries, report.train)
    flag_fraction = report.flag_fraction
    scalars = dict(metrics or {})
    if self_result is not None:
        scalars[f"{prefix}/self_influence_mean"] = float(self_result.scores.mean())
    keys: list[str] = []
    for logger in loggers:
        if scalars:
            logger.log_metrics(scalars)
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        run = logger.experiment
        payload: dict[str, Any] = {}
        if pairwise is not None:
            columns = ["query_index", "query", "query_label", "kind", "rank", "train_index",
                       "train_example", "train_label", SCORE_COLUMN]
            table = wandb.Table(columns=columns)
            for row in _top_rows(pairwise, queries, train):
                table.add_data(row["query_index"],
                               _wandb_media(queries.render(row["query_index"])) if render else None,
                               str(row["query_label"]), row["kind"], row["rank"],
                               row["train_index"],
                               _wandb_media(train.render(row["train_index"])) if render else None,
                               str(row["train_label"]), row[SCORE_COLUMN])
            payload[f"{prefix}/top_influential"] = table
            values = pairwise.scores if pairwise.scores is not None else torch.cat(
                [pairwise.top.proponent_scores, pairwise.top.opponent_scores], dim=1)
            payload[f"{prefix}/pairwise_score_histogram"] = wandb.Histogram(
                values.flatten().double().numpy(), num_bins=64)
        shares = layer_share_rows(pairwise, self_result)
        if shares:
            layer_table = wandb.Table(columns=["layer", "mean_abs_share"],
                                      data=[[r["layer"], r["mean_abs_share"]] for r in shares])
            payload[f"{prefix}/layer_influence"] = wandb.plot.bar(
                layer_table, "layer", "mean_abs_share",
                title=f"Layer-wise share of influence ({shares[0]['source']})")
        if self_result is not None:
            columns = ["rank", "train_index", "example", "label", SELF_COLUMN, "train_loss"]
            table = wandb.Table(columns=columns)
            for row in _flag_rows(self_result, train, flag_fraction):
                table.add_data(row["rank"], row["train_index"],
                               _wandb_media(train.render(row["train_index"])) if render else None,
                               str(row["label"]), row[SELF_COLUMN], row["train_loss"])
            payload[f"{prefix}/self_influence_flags"] = table
            payload[f"{prefix}/self_influence_histogram"] = wandb.Histogram(
                self_result.scores.double().numpy(), num_bins=64)
        with _staged_in(run):
            run.log(payload)
        keys.extend(payload)
    return keys


@contextmanager
def _staged_in(run: Any) -> Iterator[None]:
    """Stage table media (the example images) inside the run's own folder instead of W&B's
    user-wide data folder, so that one folder holds everything ``wandb sync`` needs."""
    folder = Path(run.dir).parent if getattr(run, "dir", None) else None
    previous = os.environ.get("WANDB_DATA_DIR")
    if folder is not None:
        os.environ["WANDB_DATA_DIR"] = str(folder)
    try:
        yield
    finally:
        if folder is not None:
            if previous is None:
                os.environ.pop("WANDB_DATA_DIR", None)
            else:
                os.environ["WANDB_DATA_DIR"] = previous
