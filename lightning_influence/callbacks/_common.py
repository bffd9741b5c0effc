"""Small helpers the callbacks share: finding loaders, the output folder, rank zero.

Only the public Trainer API is used. No tensor math lives here.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_influence.passes import order_problem, ordered_loader

__all__ = ["training_loader", "query_loader", "output_dir", "single_loader"]


def single_loader(loaders: Any, what: str) -> DataLoader | None:
    """The one DataLoader inside what the Trainer holds (a loader, or a list/dict of one)."""
    if loaders is None:
        return None
    if isinstance(loaders, DataLoader):
        return loaders
    values = list(loaders.values()) if isinstance(loaders, dict) else list(loaders)
    if len(values) == 1 and isinstance(values[0], DataLoader):
        return values[0]
    raise ValueError(
        f"The Trainer has {len(values)} {what} dataloaders; influence needs one. Pass the loader "
        "to use explicitly to the callback."
    )


def training_loader(trainer: Any, pl_module: Any, batch_size: int | None = None) -> DataLoader:
    """A non-shuffled loader over the training dataset the Trainer fitted on."""
    loader = single_loader(trainer.train_dataloader, "training")
    if loader is None:
        datamodule = getattr(trainer, "datamodule", None)
        source = datamodule if datamodule is not None else pl_module
        loader = single_loader(source.train_dataloader(), "training")
    problem = order_problem(loader, whole_dataset_ok=True)
    if problem is not None:
        raise ValueError(
            f"The Trainer's training loader {problem}, so it does not train on its whole dataset "
            "with each example once per epoch; the influence callbacks score loader.dataset in "
            "its own order and their indices would name examples it never trained on. Train on "
            "a torch.utils.data.Subset of exactly the examples to use (shuffle=True is fine), or "
            "call the functions (lightning_influence.fit_factors, ...) with loaders of your own."
        )
    return ordered_loader(loader, batch_size)


def query_loader(trainer: Any, pl_module: Any, queries: DataLoader | None,
                 num_queries: int | None, batch_size: int | None = None) -> DataLoader:
    """The query loader: the one given, else the validation loader; its first ``num_queries``
    examples (of a stream: the first ones it yields, kept in memory)."""
    loader = queries
    if loader is None:
        loader = single_loader(trainer.val_dataloaders, "validation")
    if loader is None:
        datamodule = getattr(trainer, "datamodule", None)
        source = datamodule if datamodule is not None else pl_module
        try:
            loader = single_loader(source.val_dataloader(), "validation")
        except Exception as err:  # noqa: BLE001 - a module without val data
            raise ValueError(
                "No queries: the Trainer has no validation dataloader. Pass queries=<DataLoader> "
                "to InfluenceScores."
            ) from err
    loader = ordered_loader(loader, batch_size)
    if num_queries is None:
        return loader
    if isinstance(loader.dataset, IterableDataset):  # a stream: its first examples, kept
        if loader.batch_size is None:
            raise ValueError(
                f"num_queries={num_queries} cannot be taken from a query loader that streams "
                "whole batches (batch_size=None). Pass queries=<DataLoader> with exactly the "
                "queries, or num_queries=None to use every batch."
            )
        first = list(itertools.islice(iter(loader.dataset), num_queries))
        if not first:
            raise ValueError("No queries: the query stream yielded no example. Pass "
                             "queries=<DataLoader> to InfluenceScores.")
        return DataLoader(first, batch_size=loader.batch_size, shuffle=False,
                          collate_fn=loader.collate_fn)
    if num_queries < len(loader.dataset):
        subset = Subset(loader.dataset, range(num_queries))
        loader = DataLoader(subset, batch_size=loader.batch_size, shuffle=False,
                            collate_fn=loader.collate_fn)
    return loader


def output_dir(trainer: Any, configured: str | Path | None) -> Path:
    """The folder for factor and score files: the one configured, else <root>/influence."""
    if configured is not None:
        return Path(configured)
    return Path(trainer.default_root_dir) / "influence"
