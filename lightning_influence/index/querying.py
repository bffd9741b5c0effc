"""Asking the index: candidates from the codes, then an exact EK-FAC re-rank.

Index letters: Q queries, N training examples, D numbers per example, K candidates per end,
k results per end.

1. The queries' preconditioned gradients ``P_q = P(grad L(z_q))`` (one forward and backward
   over the queries) and their query codes ``y [Q, D]``.
2. Index estimates ``y X^T [Q, N]`` block by block over the memory-mapped shards (exact search
   by matrix products), keeping the K largest (proponent candidates) and the K most negative
   (opponent candidates) per query.
3. Re-rank: the candidates' gradients are recomputed (one forward and backward over at most
   ``2 K Q`` examples) and scored against ``P_q`` with the full preconditioner, exactly as
   :func:`~lightning_influence.compute_pairwise_scores` scores them; each query's top-k
   proponents and opponents are taken among its own candidates.

Sign: positive = proponent (helpful): up-weighting the example lowers the query loss.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Subset

from lightning_influence.index.compression import Compression
from lightning_influence.index.files import (
    CorruptIndexError,
    IncompleteIndexError,
    IndexMismatchError,
    Shard,
    iterate_blocks,
    read_manifest,
    read_shard,
)
from lightning_influence.options import IndexOptions, resolve_options
from lightning_influence.passes import ordered_loader
from lightning_influence.ranking import TopKResult
from lightning_influence.scoring import BoundInfluence, bind
from lightning_influence.task import Task

__all__ = ["TrainingIndex", "IndexResult", "open_index", "search_shards"]

# rows of codes multiplied at once: at most this many numbers per block
BLOCK_ELEMENTS = 2**23


@dataclass
class IndexResult:
    """The answer to queries from the index. Scores: positive = proponent (helpful).

    Attributes:
        top: per query the top-k proponents (largest scores) and opponents (most negative).
        exact: True: the scores are exact (the candidates re-ranked with the full
            preconditioner); False: they are the index's estimates, not exact scores.
        proponent_candidates, opponent_candidates: ``[Q, K]`` the candidates per end (the
            index's K largest and K most negative estimates).
        query_losses: ``[Q]`` the queries' measurements (with ``exact``).
        num_train: N.
        timings: seconds per stage (query gradients, search, re-rank).
    """

    top: TopKResult
    exact: bool
    proponent_candidates: Tensor
    opponent_candidates: Tensor
    num_train: int
    query_losses: Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def score_kind(self) -> str:
        """What the scores are, in words (for tables)."""
        return ("exact score (+ = proponent/helpful)" if self.exact else
                "index estimate, not an exact score (+ = proponent/helpful)")


class TrainingIndex:
    """An opened, checked index bound to its model and training data. Made by
    :func:`open_index` or :func:`~lightning_influence.index.build_index`.

    Attributes:
        folder: the index folder.
        bound: the model bound to its preconditioner and task.
        loader: the training loader (its dataset gives the candidates to re-rank).
        compression: the codes (query side).
        shards: the shards (codes memory-mapped on use).
        meta: the manifest.
        options: the query defaults (``top_k``, ``candidates``, ``rerank``, ``progress``).
    """

    def __init__(self, folder: Path, bound: BoundInfluence, loader: Any,
                 compression: Compression, shards: list[Shard], meta: dict[str, Any],
                 options: IndexOptions) -> None:
        self.folder, self.bound, self.loader = folder, bound, loader
        self.compression, self.shards, self.meta, self.options = (compression, shards, meta,
                                                                   options)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, folder: str | Path, bound: BoundInfluence, loader: Any,
             options: IndexOptions) -> TrainingIndex:
        """Read and check the index in ``folder`` against a bound model and its training
        loader: refused (:class:`IndexMismatchError` and subclasses, naming the file and the
        fix) when the manifest is damaged, the build unfinished, or the model, factors,
        layers or training data differ; every shard's checksum with ``options.verify``."""
        folder = Path(folder)
        meta, tensors = read_manifest(folder)
        path = folder / "index.safetensors"
        if not meta.get("complete"):
            raise IncompleteIndexError(
                f"The index at {folder} is unfinished (its build was interrupted or is still "
                "running). Run build_index (or the InfluenceIndex callback) again with the same "
                "arguments: it resumes and builds only the missing batches.")
        pre = bound.preconditioner
        problems = []
        if meta.get("factors") != pre.signature() or meta.get("layers") != pre.shapes:
            ours, theirs = pre.signature(), meta.get("factors") or {}
            keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if meta.get("layers") != pre.shapes:
                keys.append("tracked layers")
            problems.append(f"factors differ ({', '.join(keys)})")
        if json.dumps(meta.get("fingerprint"), sort_keys=True, default=str) != json.dumps(
                pre.fingerprint, sort_keys=True, default=str):
            problems.append("the model fingerprint differs")
        if problems:
            raise IndexMismatchError(
                f"The index {path} was built for another model or factors: "
                f"{'; '.join(problems)}. Rebuild it for this model and these factors "
                "(build_index(..., overwrite=True)).")
        loader = _matching_loader(loader, meta["data"])
        from lightning_influence.index.building import data_identity

        data = data_identity(loader)
        if data != meta["data"]:
            raise IndexMismatchError(
                f"The index {path} was built over other training data ({meta['data']['num_examples']} "
                f"examples in {meta['data']['num_batches']} batches, fingerprint "
                f"{meta['data']['fingerprint']}; this loader: {data['num_examples']} examples in "
                f"{data['num_batches']} batches, {data['fingerprint']}). Pass the training data "
                "it was built from, in the same order, or rebuild it (overwrite=True).")
        compression = Compression.from_tensors(meta["compression"], tensors)
        shards = []
        for entry in meta.get("shards", []):
            shard_path = folder / entry["file"]
            if not shard_path.is_file():
                raise CorruptIndexError(
                    f"The index shard {shard_path} listed in {path} is missing. Rebuild the "
                    "index (build_index(..., overwrite=True)).")
            shard = read_shard(shard_path, meta["identity"])
            if shard.checksum != entry["checksum"] or shard.rows != entry["rows"]:
                raise CorruptIndexError(
                    f"The index shard {shard_path} is not the one its manifest lists (replaced "
                    "or edited). Rebuild the index (overwrite=True).")
            if options.verify and (why := shard.verify(meta["identity"])) is not None:
                raise CorruptIndexError(f"The index shard {shard_path} cannot be trusted: {why}. "
                                        "Rebuild the index (overwrite=True).")
            shards.append(shard)
        return cls(folder, bound, loader, compression, shards, meta, options)

    # ------------------------------------------------------------------ facts
    @property
    def num_examples(self) -> int:
        return int(self.meta["data"]["num_examples"])

    @property
    def width(self) -> int:
        return self.compression.width

    def bytes_per_example(self) -> float:
        """Bytes of codes per training example (shards' codes over N)."""
        size = torch.empty((), dtype=_dtype(self.meta["dtype"])).element_size()
        return float(self.width * size)

    # ------------------------------------------------------------------ estimates
    def query_codes(self, queries: Any, progress: bool = False) -> tuple[dict[str, Tensor],
                                                                          Tensor]:
        """The queries' preconditioned gradients ``{layer: [Q, O, I]}`` and codes ``[Q, D]``."""
        grads = self.bound.query_gradients(queries, progress=progress)
        return grads, self.compression.encode_matrices(grads)

    def estimates(self, codes: Tensor) -> Tensor:
        """Index estimates ``[Q, N]`` of every training example (positions in loader order)."""
        out = torch.empty(codes.shape[0], self.num_examples, dtype=codes.dtype)
        for indices, block in iterate_blocks(self.shards, self._block_rows()):
            out[:, indices] = _products(codes, block)
        return out

    def search(self, codes: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The ``k`` largest and ``k`` most negative estimates per query, by exact search over
        the shards: ``(largest [Q, k], their indices, smallest [Q, k], their indices)``."""
        return search_shards(self.shards, codes, k, self._block_rows())

    def _block_rows(self) -> int:
        return max(1, BLOCK_ELEMENTS // max(self.width, 1))

    # ------------------------------------------------------------------ questions
    def query(self, queries: Any, top_k: int | None = None, candidates: int | None = None,
              rerank: bool | None = None, *, query_grads: dict[str, Tensor] | None = None,
              ) -> IndexResult:
        """Top-k proponents and opponents of each query.

        Args:
            queries: the queries (a loader, or a list of batches).
            top_k: results per end (default ``options.top_k``).
            candidates: K candidates per end taken from the index (default
                ``options.candidates``, or 2% of N); at most ``2 K`` per query are re-ranked.
            rerank: recompute the candidates' gradients and score them exactly (default
                ``options.rerank``); False returns the index estimates (``result.exact`` is
                False: they are not exact scores).
            query_grads: the queries' preconditioned gradients, when computed already.
        """
        o = self.options
        top_k = top_k or o.top_k
        rerank = o.rerank if rerank is None else rerank
        k = candidates or o.candidates or max(top_k, -(-2 * self.num_examples // 100))
        k = min(max(k, top_k), self.num_examples)
        top_k = min(top_k, k)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        if query_grads is None:
            query_grads = self.bound.query_gradients(queries, progress=False)
        codes = self.compression.encode_matrices(query_grads)
        timings["query_gradients"] = time.perf_counter() - start
        start = time.perf_counter()
        hi_v, hi_i, lo_v, lo_i = self.search(codes, k)
        timings["search"] = time.perf_counter() - start
        if not rerank:
            top = TopKResult(hi_i[:, :top_k], hi_v[:, :top_k].double(), lo_i[:, :top_k],
                             lo_v[:, :top_k].double())
            return IndexResult(top, False, hi_i, lo_i, self.num_examples, timings=timings)
        start = time.perf_counter()
        top, losses = self._rerank(queries, query_grads, hi_i, lo_i, top_k)
        timings["rerank"] = time.perf_counter() - start
        return IndexResult(top, True, hi_i, lo_i, self.num_examples, losses, timings)

    def _rerank(self, queries: Any, query_grads: dict[str, Tensor], hi: Tensor, lo: Tensor,
                top_k: int) -> tuple[TopKResult, Tensor]:
        """Exact scores of each query's candidates, as the pairwise pass computes them."""
        dataset = getattr(self.loader, "dataset", None)
        batch_size = getattr(self.loader, "batch_size", None)
        if dataset is None or isinstance(dataset, IterableDataset) or batch_size is None:
            raise TypeError(
                "Re-ranking recomputes the candidates' gradients from the training loader's "
                "dataset, which needs a DataLoader over a map-style dataset with a batch size "
                f"(got {type(self.loader).__name__}). Pass such a loader, or rerank=False for "
                "the index estimates.")
        union = torch.unique(torch.cat([hi.flatten(), lo.flatten()]))  # sorted
        subset = DataLoader(Subset(dataset, union.tolist()), batch_size=batch_size,
                            shuffle=False, collate_fn=self.loader.collate_fn)
        result = self.bound.pairwise(queries, subset, query_grads=query_grads, top_k=1,
                                     keep_scores=True, progress=False)
        exact = result.scores  # [Q, U] float64
        rows = []
        for q in range(exact.shape[0]):
            mine = torch.unique(torch.cat([hi[q], lo[q]]))
            values = exact[q, torch.searchsorted(union, mine)]
            kk = min(top_k, mine.numel())
            best, worst = values.topk(kk), values.topk(kk, largest=False)
            rows.append((mine[best.indices], best.values, mine[worst.indices], worst.values))
        top = TopKResult(*(torch.stack([r[j] for r in rows]) for j in range(4)))
        return top, result.query_losses


def search_shards(shards: list[Shard], codes: Tensor, k: int, block_rows: int,
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact search: the ``k`` largest and ``k`` most negative products of ``codes [Q, D]``
    with every shard's codes, ``block_rows`` rows at a time: ``(largest [Q, k], their training
    positions, smallest [Q, k], their positions)``."""
    q = codes.shape[0]
    hi_v = lo_v = codes.new_empty(q, 0)
    hi_i = lo_i = torch.empty(q, 0, dtype=torch.long)
    for indices, block in iterate_blocks(shards, block_rows):
        est = _products(codes, block)  # [Q, b]
        idx = indices.unsqueeze(0).expand(q, -1)
        hi_v, hi_i = _keep(hi_v, hi_i, est, idx, k, True)
        lo_v, lo_i = _keep(lo_v, lo_i, est, idx, k, False)
    return hi_v, hi_i, lo_v, lo_i


def _products(codes: Tensor, block: Tensor) -> Tensor:
    """``codes [Q, D] x block [b, D]^T`` in the codes' dtype. 16-bit blocks are multiplied as
    they are stored (no conversion: 3-5x faster on CPU, measured), with each query scaled to a
    largest magnitude of 1 first (no float16 overflow) and scaled back after."""
    if block.dtype not in (torch.float16, torch.bfloat16):
        return codes @ block.to(codes.dtype).T
    scale = codes.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(codes.dtype).tiny)
    return ((codes / scale).to(block.dtype) @ block.T).to(codes.dtype) * scale


def _keep(values: Tensor, indices: Tensor, new: Tensor, new_indices: Tensor, k: int,
          largest: bool) -> tuple[Tensor, Tensor]:
    both = torch.cat([values, new], dim=1)
    keep = min(k, both.shape[1])
    top, pos = both.topk(keep, dim=1, largest=largest, sorted=True)
    return top, torch.cat([indices, new_indices], dim=1).gather(1, pos)


def _dtype(name: str) -> torch.dtype:
    from lightning_influence.index.files import DTYPES

    return DTYPES[name]


def _matching_loader(loader: Any, data: dict[str, Any]) -> Any:
    """``loader``, or an ordered copy with the index's batch size when it is a DataLoader with
    another one (the data identity covers the batches)."""
    size = data.get("batch_size")
    if isinstance(loader, DataLoader) and size is not None and loader.batch_size not in (
            None, size):
        return ordered_loader(loader, size)
    return loader


def open_index(folder: str | Path, model: nn.Module, factors: Any, train_loader: Any,
               task: Task | str | None = None, options: IndexOptions | None = None,
               **overrides: Any) -> TrainingIndex:
    """Open the index in ``folder`` for ``model`` and its ``factors`` over ``train_loader``
    (the data it was built from: same examples, same order), checking the manifest, the model
    and factors, the training data's identity and (``verify``) every shard's checksum; a
    mismatch is an :class:`~lightning_influence.index.IndexMismatchError` naming the file and
    the fix. ``options`` (:class:`~lightning_influence.options.IndexOptions`: ``top_k``,
    ``candidates``, ``rerank`` as query defaults, ``verify``) may also be given as keywords.
    """
    options = resolve_options(IndexOptions, options, overrides, "open_index()")
    return TrainingIndex.open(folder, bind(model, factors, task), train_loader, options)
