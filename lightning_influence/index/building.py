"""Building the index: one pass over the training data (or a scoring pass already running).

Index letters: N training examples, B batches of the training loader, D numbers per example.

:func:`build_index` binds the model to its preconditioner, makes the compression
(:mod:`~lightning_influence.index.compression`), writes a manifest that says the build is under
way, and streams the training data once: each batch's rows ``(a, g)`` become codes ``[n, D]``
buffered into shards (:mod:`~lightning_influence.index.files`). The same :class:`IndexWriter`
can instead watch a scoring pass that runs over the same loader
(:func:`lightning_influence.scoring.observing_rows`): the callbacks build the index from the
rows of the pairwise pass they run anyway, and only the batches that pass did not see (all of
them when it resumed from score chunks) get a pass of their own when the writer closes.

A rerun of an interrupted build finds the finished shards (same identity, intact) and builds
only the missing batches; a damaged shard is deleted and its batches built again. Under DDP
each rank builds its round-robin share of the batches into its own shards, and rank zero writes
the manifest once every rank has finished.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler

from lightning_influence.distributed import (
    all_gather_objects,
    barrier,
    broadcast_object,
    rank,
)
from lightning_influence.index.compression import Compression, make_compression
from lightning_influence.index.files import (
    DTYPES,
    CorruptIndexError,
    IndexMismatchError,
    ShardWriter,
    read_manifest,
    read_shard,
    shard_files,
    write_manifest,
)
from lightning_influence.io import check_writable
from lightning_influence.options import IndexOptions, resolve_options
from lightning_influence.passes import RowPass, iterate_rows, row_dtype_of
from lightning_influence.score_store import data_fingerprint
from lightning_influence.scoring import BoundInfluence, bind
from lightning_influence.task import Task

__all__ = ["IndexWriter", "build_index", "data_identity", "same_loader"]

log = logging.getLogger(__name__)

KIND = "lightning-influence training-gradient index"


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    return _batch_len(batch[0])


def data_identity(loader: Any) -> dict[str, Any]:
    """What the index's training data is: ``data_fingerprint`` (contents and order, batch by
    batch), the number of examples and batches, and the batch size (a re-rank rebuilds the
    examples' batches from ``loader.dataset``)."""
    examples = batches = 0
    for batch in loader:
        examples += _batch_len(batch)
        batches += 1
    return {"fingerprint": data_fingerprint(loader), "num_examples": examples,
            "num_batches": batches, "batch_size": getattr(loader, "batch_size", None)}


def same_loader(loader: Any, reference: Any) -> bool:
    """Whether ``loader`` yields ``reference``'s batches: the same object, or a DataLoader over
    the same dataset with the same batch size, in order, keeping the last batch."""
    if loader is reference:
        return True
    return (isinstance(loader, DataLoader) and isinstance(reference, DataLoader)
            and loader.dataset is reference.dataset and loader.batch_size == reference.batch_size
            and isinstance(loader.sampler, SequentialSampler)
            and isinstance(reference.sampler, SequentialSampler)
            and not loader.drop_last and not reference.drop_last)


def _identity(meta: dict[str, Any], compression: Compression) -> str:
    """A digest of everything the codes depend on (the manifest without its build state)."""
    body = {k: meta[k] for k in ("kind", "factors", "fingerprint", "layers", "compression",
                                 "dtype", "data")}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode())
    for key, value in sorted(compression.tensors().items()):
        digest.update(key.encode())
        digest.update(value.double().numpy().tobytes())
    return digest.hexdigest()[:32]


class IndexWriter:
    """Writes the index of one training loader from the rows of passes over it.

    Made by :meth:`prepare`; fed by :meth:`add` (its own pass, or a scoring pass that it
    observes: :meth:`wants` says which); :meth:`close` builds what no pass fed, writes the
    manifest and returns the opened :class:`~lightning_influence.index.TrainingIndex`.

    Attributes:
        folder: the index folder.
        bound: the model bound to its preconditioner and task.
        loader: the training loader the index is built over.
        compression: the codes.
        meta: the manifest's metadata.
        identity: the build's identity (in every shard).
        complete: True when a finished index of this identity was found (nothing to build).
    """

    def __init__(self, folder: Path, bound: BoundInfluence, loader: Any,
                 compression: Compression, options: IndexOptions, meta: dict[str, Any]) -> None:
        self.folder, self.bound, self.loader = folder, bound, loader
        self.compression, self.options, self.meta = compression, options, meta
        self.identity = meta["identity"]
        self.complete = False
        self.done: set[int] = set()
        self.seen: set[int] = set()
        self.shards = ShardWriter(folder, self.identity, DTYPES[options.dtype],
                                  options.shard_batches)

    # ------------------------------------------------------------------ preparing
    @classmethod
    def prepare(cls, bound: BoundInfluence, loader: Any, output_dir: str | Path,
                options: IndexOptions) -> IndexWriter:
        """Check the folder, make the compression and the manifest, and find the finished
        shards of an interrupted build of the same identity. A folder holding another index
        is refused unless ``options.overwrite``."""
        folder = check_writable(output_dir, "build_index")
        pre = bound.preconditioner
        compression = make_compression(pre, options.compression, options.width, options.seed)
        meta: dict[str, Any] = {
            "kind": KIND, "factors": pre.signature(), "fingerprint": pre.fingerprint,
            "layers": pre.shapes, "compression": compression.describe(),
            "dtype": options.dtype, "data": data_identity(loader)}
        meta["identity"] = _identity(meta, compression)
        writer = cls(folder, bound, loader, compression, options, meta)
        writer._start()
        return writer

    def _start(self) -> None:
        folder, options = self.folder, self.options
        existing = None
        if (folder / "index.safetensors").is_file():
            try:
                existing, _ = read_manifest(folder)
            except CorruptIndexError:
                if not options.overwrite:
                    raise
        if existing is not None and existing.get("identity") == self.identity \
                and existing.get("complete") and not options.overwrite:
            self.complete = True
            return
        if existing is not None and existing.get("identity") != self.identity \
                and not options.overwrite:
            raise IndexMismatchError(
                f"{folder} holds an index of another build ({_differences(existing, self.meta)}"
                "). Pass overwrite=True to replace it, or build into another folder.")
        barrier()  # every rank has read the old manifest before rank zero replaces it
        if rank() == 0:
            if options.overwrite or (existing is not None
                                     and existing.get("identity") != self.identity):
                for path in shard_files(folder):
                    path.unlink()
            write_manifest(folder, dict(self.meta, complete=False, shards=[]),
                           self.compression.tensors())
        self.done = broadcast_object(self._finished_batches() if rank() == 0 else None, 0)

    def _finished_batches(self) -> set[int]:
        """Batches in the folder's intact shards of this identity (damaged ones deleted)."""
        done: set[int] = set()
        for path in shard_files(self.folder):
            try:
                shard = read_shard(path, self.identity)
                problem = shard.verify(self.identity)
            except CorruptIndexError as err:
                problem = str(err)
            if problem is not None:
                log.warning("Index shard %s is damaged (%s); its batches are built again.",
                            path, problem)
                path.unlink()
                continue
            done.update(shard.batches.tolist())
        if done:
            log.info("Resuming the index build: %d finished batches in %s", len(done),
                     self.folder)
        return done

    # ------------------------------------------------------------------ feeding
    def wants(self, loader: Any, bound: BoundInfluence) -> bool:
        """Whether a scoring pass of ``bound`` over ``loader`` yields this index's rows: the same
        model, preconditioner and batches, and every indexed layer tracked."""
        tracked = {layer.name for layer in bound.tracker}
        return (not self.complete and bound.model is self.bound.model
                and bound.preconditioner is self.bound.preconditioner
                and set(self.compression.layers) <= tracked and same_loader(loader, self.loader))

    def add(self, batch_index: int, offset: int, rows: dict[str, Any], n: int) -> None:
        """Encode and buffer one training batch (``n`` examples from position ``offset``);
        a batch already written is skipped."""
        if batch_index in self.done or batch_index in self.seen:
            return
        codes = self.compression.encode_rows(rows, n)
        self.shards.add(batch_index, torch.arange(offset, offset + n), codes)
        self.seen.add(batch_index)

    def build_missing(self) -> None:
        """One pass (this rank's share) over the batches no pass has fed yet."""
        self.shards.flush()
        fed = set().union(*all_gather_objects(self.seen))
        skip = self.done | fed
        total = self.meta["data"]["num_batches"]
        if len(skip) >= total:
            return
        pre = self.bound.preconditioner
        spec = RowPass("loss", "influence: index", self.options.progress,
                       row_dtype=row_dtype_of(getattr(pre, "extra", {}).get("row_dtype")))
        for b, offset, _, rows, losses in iterate_rows(self.bound.model, self.loader,
                                                       self.bound.task, self.bound.tracker,
                                                       spec, skip=skip):
            self.add(b, offset, rows, losses.shape[0])
        self.shards.flush()

    def close(self) -> Any:
        """Build what is missing, check that the shards cover every example once, write the
        finished manifest and open the index."""
        from lightning_influence.index.querying import TrainingIndex

        if not self.complete:
            self.build_missing()
            barrier()
            if rank() == 0:
                self._finish()
            barrier()
        return TrainingIndex.open(self.folder, self.bound, self.loader,
                                  dataclasses.replace(self.options, verify=False))  # just written

    def _finish(self) -> None:
        entries, covered = [], []
        for path in shard_files(self.folder):
            shard = read_shard(path, self.identity)
            entries.append({"file": path.name, "rows": shard.rows, "checksum": shard.checksum})
            covered.append(shard.indices)
        n = self.meta["data"]["num_examples"]
        indices = torch.cat(covered) if covered else torch.empty(0, dtype=torch.long)
        if not torch.equal(indices.sort().values, torch.arange(n)):
            raise CorruptIndexError(
                f"The shards in {self.folder} do not cover the {n} training examples exactly "
                f"once ({indices.numel()} rows, {indices.unique().numel()} distinct): delete the "
                "shards and build again.")
        write_manifest(self.folder, dict(self.meta, complete=True, shards=entries),
                       self.compression.tensors())
        log.info("index: %d examples x %d numbers (%s, %s) in %d shards at %s", n,
                 self.compression.width, self.compression.kind, self.options.dtype,
                 len(entries), self.folder)


def _differences(stored: dict[str, Any], ours: dict[str, Any]) -> str:
    """Which parts of two manifests differ, in words."""
    words = {"factors": "factors", "fingerprint": "model", "layers": "tracked layers",
             "compression": "compression", "dtype": "dtype", "data": "training data"}
    diff = [word for key, word in words.items()
            if json.dumps(stored.get(key), sort_keys=True, default=str)
            != json.dumps(ours.get(key), sort_keys=True, default=str)]
    return "differs in: " + ", ".join(diff) if diff else "another format"


def build_index(model: nn.Module, factors: Any, train_loader: Any, task: Task | str | None,
                output_dir: str | Path, options: IndexOptions | None = None,
                **overrides: Any) -> Any:
    """Write the training-gradient index of ``train_loader`` to ``output_dir`` and open it.

    One forward and backward per training batch (in eval mode, the training loss): each
    example's gradient is compressed per tracked layer to ``width`` numbers in all
    (``compression``, see :mod:`~lightning_influence.index.compression`) and written to
    memory-mapped shards. A finished index of the same model, factors, compression and data
    is reused; an interrupted build resumes.

    Args:
        model: the trained model.
        factors: its fitted factors (``compression="sketch"`` or ``"kronecker"``: any
            preconditioner, solvers included).
        train_loader: the training data in a fixed order (positions name examples).
        task: the task (default: the model's ``influence_task``).
        output_dir: the index folder.
        options: :class:`~lightning_influence.options.IndexOptions` (``compression``,
            ``width``, ``dtype``, ``shard_batches``, ``seed``, ``overwrite``, ``progress``);
            any field may also be a keyword.

    Returns:
        The opened :class:`~lightning_influence.index.TrainingIndex`.
    """
    options = resolve_options(IndexOptions, options, overrides, "build_index()")
    from lightning_influence.passes import check_loader

    check_loader(train_loader, "training", ordered=True)
    writer = IndexWriter.prepare(bind(model, factors, task), train_loader, output_dir, options)
    return writer.close()
