"""Scoring: preconditioned query gradients, then one streaming pass over the training data.

Index letters: Q queries, N training examples, L tracked layers, O = d_out, I = d_in (+1 bias).

    score[q, n] = sum over layers of <P(grad L(z_q)), grad L(z_n)>    (positive = proponent)

Top-k lists are kept while streaming; full matrices only on request; with ``scores_dir`` every
group of batches is written as a score chunk and a rerun resumes from the finished ones.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.distributed import (
    all_gather_objects,
    barrier,
    is_distributed,
    rank,
)
from lightning_influence.factors import Factors, Preconditioner
from lightning_influence.io import check_writable
from lightning_influence.lowrank import QueryStore, truncate
from lightning_influence.memory import check_plan, plan_scoring
from lightning_influence.options import ScoreOptions, resolve_options
from lightning_influence.passes import (
    RowPass,
    check_loader,
    count_examples,
    evaluation_mode,
    iterate_rows,
    model_device,
    move_to_device,
    return_freed_memory,
    row_dtype_of,
)
from lightning_influence.ranking import StreamingTopK, TopKResult
from lightning_influence.score_store import ScoreStore, data_fingerprint
from lightning_influence.scores import (
    pairwise_and_self_rotated,
    pairwise_layer_scores,
    per_example_gradients,
    rotate_rows,
    self_layer_scores,
)
from lightning_influence.task import Task, resolve_task
from lightning_influence.tracking import LayerTracker

__all__ = [
    "query_gradients",
    "compute_pairwise_scores",
    "compute_self_scores",
    "self_terms",
    "PairwiseResult",
    "SelfResult",
    "BoundInfluence",
    "bind",
    "build_query_store",
    "observing_rows",
]

log = logging.getLogger(__name__)

_PASS_DESCRIPTIONS = {"pairwise": "influence: pairwise scores", "self": "influence: self-influence"}

_ROW_OBSERVERS: ContextVar[tuple[Any, ...]] = ContextVar("lightning_influence_row_observers",
                                                         default=())


@contextmanager
def observing_rows(*observers: Any) -> Iterator[None]:
    """Hand the training rows of every scoring pass run inside the block to ``observers``
    (e.g. an :class:`~lightning_influence.index.IndexWriter`, so that the pass builds the index
    as well): each has ``wants(train_loader, bound) -> bool``, asked once per pass, and
    ``add(batch_index, first_example, rows, n)``, called with each batch's rows. ``None``
    entries are ignored."""
    token = _ROW_OBSERVERS.set(_ROW_OBSERVERS.get() + tuple(o for o in observers if o is not None))
    try:
        yield
    finally:
        _ROW_OBSERVERS.reset(token)


# ----------------------------------------------------------------------------------- binding
@dataclass
class BoundInfluence:
    """A model bound to its preconditioner, task and tracked layers, resolved and checked once;
    then scored as often as needed. Made by :func:`bind`.

    Attributes:
        model: the trained model.
        preconditioner: the fitted factors or a solver (a :class:`Preconditioner`).
        task: how batches become losses and measurements.
        tracker: the tracked layers (those the preconditioner was made for).
    """

    model: nn.Module
    preconditioner: Preconditioner
    task: Task
    tracker: LayerTracker

    def query_gradients(self, loader: Any, *, precondition: bool = True,
                        progress: bool = True, in_eigenbasis: bool = False) -> dict[str, Tensor]:
        """Per-query gradients of the measurement, ``{layer: [Q, O, I]}``, preconditioned by
        default (in at least float32; float64 when the model is float64). With fitted factors
        and ``in_eigenbasis`` they are left in each layer's Kronecker eigenbasis,
        ``Q_S^T P(G) Q_A`` (see :meth:`~lightning_influence.factors.LayerFactors.precondition`)."""
        check_loader(loader, "query")
        pre = self.preconditioner
        # fitted factors precondition layer by layer, each layer's gradient rotated through
        # its rows where that is cheaper; a solver preconditions all layers at once
        by_layer = precondition and isinstance(pre, Factors)
        if in_eigenbasis and not by_layer:
            raise ValueError("query_gradients(in_eigenbasis=True) needs fitted factors "
                             "(a Kronecker eigenbasis) and precondition=True.")
        chunks: dict[str, list[Tensor]] = {name: [] for name in pre.shapes}
        spec = RowPass("measurement", "influence: query gradients", progress)
        for _, offset, _, rows, _ in iterate_rows(self.model, loader, self.task, self.tracker,
                                                  spec, shard=False):
            dtype = torch.promote_types(next(iter(rows.values()))[0].dtype, torch.float32)
            grads = {name: _query_gradient(rows, name, shape, dtype, pre.layers[name]
                                           if by_layer else None, in_eigenbasis)
                     for name, shape in pre.shapes.items()}
            # (P is positive definite: P(G) = 0 exactly where G = 0, so preconditioned
            # gradients serve this check as well)
            _warn_zero_queries(grads, offset)
            if precondition and not by_layer:
                grads = pre.precondition(grads)
            for name, grad in grads.items():
                chunks[name].append(grad)
        return {name: torch.cat(parts) for name, parts in chunks.items() if parts}


    def pairwise(self, query_loader: Any, train_loader: Any, options: ScoreOptions | None = None,
                 *, query_grads: dict[str, Tensor] | None = None,
                 scores_dir: str | Path | None = None, self_influence: bool = False,
                 **overrides: Any) -> PairwiseResult:
        """Score every query against every training example in one streaming pass.

        ``score[q, n] = sum_layers <P(grad L(z_q)), grad L(z_n)>``; positive = proponent (helpful).
        Top-k lists are kept while streaming, so memory does not grow with the training set unless
        ``keep_scores=True`` (the whole ``[Q, N]`` matrix, in memory) is asked for.

        Args:
            query_loader: the queries (their measurement's gradient is taken).
            train_loader: the training data, in a fixed order (result indices are positions).
            options: :class:`~lightning_influence.ScoreOptions` (``top_k``, ``keep_scores``,
                ``per_layer``, ``normalize``, ``precision``, ``chunk_batches``,
                ``progress``); any field may also be passed as a keyword.
            query_grads: preconditioned query gradients computed already (``query_gradients``,
                or a :class:`~lightning_influence.lowrank.QueryStore`).
            scores_dir: write the scores in chunk files there (atomically); a rerun of the same
                pass skips the finished chunks and reads them back (resume after a crash).
            self_influence: also compute every training example's self-influence from the
                same rows.

        With ``self_influence`` the result also holds every training example's self-influence
        (``result.self_result``, as :meth:`self_scores` would return it) from the same rows: one
        forward and backward over the training data instead of two. Inside a process group the
        training batches are shared out among the ranks; every rank returns the same merged
        result.
        """
        options = resolve_options(ScoreOptions, options, overrides, "pairwise scores")
        top_k, keep_scores, per_layer = options.top_k, options.keep_scores, options.per_layer
        autocast = options.autocast()
        model, factors, task = self.model, self.preconditioner, self.task
        check_loader(train_loader, "training", ordered=True)
        _check_scores_dir(scores_dir, "compute_pairwise_scores")
        with evaluation_mode(model):
            query_losses = _measurements(model, query_loader, task)
        self._check_memory(train_loader, options, count_examples(query_loader) or
                           int(query_losses.numel()))
        # Both scores from one pass, with fitted factors: rows rotated once into each layer's
        # eigenbasis serve self-influence and the pairwise scores (queries kept in that basis)
        in_eigenbasis = self_influence and factors.layerwise and query_grads is None
        if query_grads is None:
            query_grads = self.query_gradients(query_loader, progress=options.progress,
                                               in_eigenbasis=in_eigenbasis)
        names = list(query_grads)
        num_queries = next(iter(query_grads.values())).shape[0]
        scale = _normalization(factors, options.normalize)
        topk = StreamingTopK(num_queries, top_k, len(names) if per_layer else 0)
        kept: list[dict[str, Tensor]] = []

        always_kept = ("indices", "losses", "self_scores", "self_layer_scores")

        def fold(chunk: dict[str, Tensor]) -> None:
            topk.update(chunk["scores"], chunk["indices"], chunk.get("layer_scores"))
            kept.append({k: v for k, v in chunk.items() if keep_scores or k in always_kept})

        def pairwise_chunk(rows: dict[str, tuple[Tensor, Tensor]], losses: Tensor) -> dict:
            n = losses.shape[0]
            if in_eigenbasis:
                return _pairwise_and_self_chunk(factors, query_grads, rows, n, scale, per_layer)
            per = torch.stack([pairwise_layer_scores(query_grads[name], *rows[name])
                               if name in rows else losses.new_zeros(num_queries, n)
                               for name in names]).double().cpu() * scale  # [L, Q, N]
            chunk = {"scores": per.sum(0), **({"layer_scores": per} if per_layer else {})}
            if self_influence:
                chunk.update(_self_chunk(factors, rows, n, scale, prefix="self_"))
            return chunk

        self._stream("pairwise", train_loader, pairwise_chunk, fold, lambda: _signature(
            factors, query_losses, top_k=top_k, per_layer=per_layer, scale=scale,
            autocast=str(autocast), train=data_fingerprint(train_loader),
            **({"self_influence": True} if self_influence else {})), options,
            scores_dir=scores_dir)
        topk, kept = _gather(topk, kept)
        merged = _assemble(kept)
        return PairwiseResult(
            top=topk.result(), layer_names=names, query_losses=query_losses,
            num_train=merged["indices"].numel(), scores=merged.get("scores") if keep_scores else None,
            layer_scores=merged.get("layer_scores") if keep_scores else None,
            normalized=scale != 1.0, train_losses=merged["losses"],
            self_result=_self_result(merged, names, scale, prefix="self_") if self_influence
            else None,
        )

    def self_scores(self, train_loader: Any, options: ScoreOptions | None = None, *,
                    scores_dir: str | Path | None = None, **overrides: Any) -> SelfResult:
        """Self-influence of every training example, in one pass over the training data.

        ``options`` (``normalize``, ``precision``, ``chunk_batches``, ``progress`` apply; any
        field may also be a keyword) and ``scores_dir`` work as in :meth:`pairwise`; inside a
        process group the batches are shared out.
        """
        options = resolve_options(ScoreOptions, options, overrides, "self-influence scores")
        normalize, autocast = options.normalize, options.autocast()
        factors = self.preconditioner
        check_loader(train_loader, "training", ordered=True)
        _check_scores_dir(scores_dir, "compute_self_scores")
        self._check_memory(train_loader, options, 0)
        names = list(factors.shapes)
        scale = _normalization(factors, normalize)
        kept: list[dict[str, Tensor]] = []
        def self_chunk(rows: dict[str, tuple[Tensor, Tensor]], losses: Tensor) -> dict:
            return _self_chunk(factors, rows, losses.shape[0], scale)

        self._stream("self", train_loader, self_chunk, kept.append, lambda: _signature(
            factors, None, scale=scale, autocast=str(autocast),
            train=data_fingerprint(train_loader)), options, scores_dir=scores_dir)
        _, kept = _gather(None, kept)
        merged = _assemble(kept)
        return _self_result(merged, names, scale)


    def _check_memory(self, train_loader: Any, options: ScoreOptions, num_queries: int) -> None:
        """Refuse a scoring pass whose memory plan cannot fit, before the pass."""
        if options.memory_limit == "off":
            return
        plan = plan_scoring(self.model, self.preconditioner, train_loader, self.task,
                            self.tracker, options, num_queries)
        check_plan(plan, options.memory_limit,
                   "pairwise scores" if num_queries else "self-influence scores")

    def _stream(self, kind: str, train_loader: Any,
                chunk_of: Callable[[dict[str, tuple[Tensor, Tensor]], Tensor], dict[str, Tensor]],
                fold: Callable[[dict[str, Tensor]], None], signature: Callable[[], dict[str, str]],
                options: ScoreOptions, scores_dir: str | Path | None) -> None:
        """The skeleton both scoring passes share: one pass over the training batches (this
        rank's share; the finished ones of an interrupted run read back from ``scores_dir``),
        each batch's scores ``chunk_of(rows, losses)`` with its indices and losses handed to
        ``fold`` and, with ``scores_dir``, written as score chunks under ``signature()``. The
        training rows are in the dtype the factors were fitted with (their ``row_dtype``)."""
        return_freed_memory()  # what earlier stages freed, before this pass
        store = (ScoreStore(scores_dir, kind, signature(), options.chunk_batches)
                 if scores_dir is not None else None)
        skip = _resume(store, fold)
        observers = [o for o in _ROW_OBSERVERS.get() if o.wants(train_loader, self)]
        row_dtype = getattr(self.preconditioner, "extra", {}).get("row_dtype")
        spec = RowPass("loss", _PASS_DESCRIPTIONS[kind], options.progress,
                       autocast=options.autocast(), row_dtype=row_dtype_of(row_dtype))
        for b, offset, _, rows, losses in iterate_rows(self.model, train_loader, self.task,
                                                       self.tracker, spec, skip=skip):
            chunk = {"indices": torch.arange(offset, offset + losses.shape[0]),
                     **chunk_of(rows, losses), "losses": losses.double().cpu()}
            for observer in observers:  # e.g. an index built from this pass's rows
                observer.add(b, offset, rows, losses.shape[0])
            fold(chunk)
            if store is not None:
                store.add(b, **chunk)
        if store is not None:
            store.flush()


def bind(model: nn.Module, preconditioner: Preconditioner, task: Task | str | None = None,
         tracker: LayerTracker | None = None, check_weights: bool = True) -> BoundInfluence:
    """Resolve the task (default: the model's ``influence_task``) and the tracked layers, and
    check once that ``preconditioner`` was made for this model (layers, shapes and, with
    ``check_weights``, everything else the model computes: structure, parameters, buffers);
    then score through the returned object."""
    task = resolve_task(task, model)
    tracker = tracker or preconditioner.tracker(model)
    preconditioner.check_fits(tracker, check_weights=check_weights)
    return BoundInfluence(model, preconditioner, task, tracker)


def _check_scores_dir(scores_dir: str | Path | None, what: str) -> None:
    """A ``scores_dir`` where no chunk can be written is refused before any pass."""
    if scores_dir is not None:
        check_writable(scores_dir, what, option="scores_dir")


def _normalization(factors: Any, normalize: bool) -> float:
    """``1 / N`` with ``normalize`` (N: the training examples the factors were fitted on)."""
    if not normalize:
        return 1.0
    if not factors.num_examples:
        raise ValueError(
            "normalize=True divides by the number of training examples, which these factors do "
            "not know (fitted from data without a length, e.g. an iterable dataset, with "
            "strategy='identity'). Pass normalize=False and divide by N yourself, or set "
            "factors.num_examples = N."
        )
    return 1.0 / factors.num_examples


def _query_gradient(rows: dict[str, tuple[Tensor, Tensor]], name: str, shape: list[int],
                    dtype: torch.dtype, factors: Any, in_eigenbasis: bool) -> Tensor:
    """One layer's per-query gradients ``[Q, O, I]`` in ``dtype`` from a batch's rows:
    preconditioned by the layer's ``factors`` when given (rotated through the rows where that is
    cheaper, see :meth:`~lightning_influence.factors.LayerFactors.precondition_rows`), zeros for
    a layer that did not run."""
    if name not in rows:
        like = next(iter(rows.values()))[0]
        return like.new_zeros(like.shape[0], *shape, dtype=dtype)
    a, g = rows[name]
    if factors is not None:
        return factors.precondition_rows(a.to(dtype), g.to(dtype), in_eigenbasis)
    return per_example_gradients(a, g).to(dtype)


def _warn_zero_queries(grads: dict[str, Tensor], offset: int) -> None:
    """Warn about queries whose measurement has a zero gradient in every tracked layer (e.g.
    every label ignored): their scores are all 0 and their top-k lists arbitrary."""
    norms = sum(g.reshape(g.shape[0], -1).abs().sum(dim=1) for g in grads.values())
    zero = (norms == 0).nonzero().flatten()
    if len(zero):
        warnings.warn(
            f"Queries {(zero + offset).tolist()[:10]} have a zero gradient in every tracked "
            "layer (a measurement that does not depend on the weights, e.g. every label -100): "
            "their scores are all 0 and their top-k lists carry no information.",
            stacklevel=3,
        )


@dataclass
class PairwiseResult:
    """Pairwise influence of training examples on queries.

    Attributes:
        top: top-k proponents (largest scores) and opponents (smallest) per query.
        scores: the full ``[Q, N]`` matrix, when asked for (``keep_scores=True``).
        layer_scores: ``[L, Q, N]`` per-layer scores when asked for (sums to ``scores``).
        layer_names: the order of the L axis.
        query_losses: ``[Q]`` the measurement of each query.
        num_train: N.
        normalized: True when scores were divided by the number of training examples.
        self_result: the training examples' self-influence when it was computed in the same
            pass (``self_influence=True``).
    """

    top: TopKResult
    layer_names: list[str]
    query_losses: Tensor
    num_train: int
    scores: Tensor | None = None
    layer_scores: Tensor | None = None
    normalized: bool = False
    train_losses: Tensor | None = field(default=None, repr=False)
    self_result: SelfResult | None = field(default=None, repr=False)


def compute_pairwise_scores(model: nn.Module, factors: Preconditioner, query_loader: Any,
                            train_loader: Any, task: Task | str | None = None,
                            options: ScoreOptions | None = None, *,
                            tracker: LayerTracker | None = None, **overrides: Any,
                            ) -> PairwiseResult:
    """Score every query against every training example in one streaming pass:
    ``bind(model, factors, task, tracker).pairwise(query_loader, train_loader, options, ...)``.

    ``options`` is a :class:`~lightning_influence.ScoreOptions`; its fields (``top_k``,
    ``keep_scores``, ``per_layer``, ``normalize``, ``precision``, ``chunk_batches``,
    ``progress``) may also be passed as keywords, beside ``query_grads``, ``scores_dir`` and
    ``self_influence`` (see :meth:`BoundInfluence.pairwise`)."""
    return bind(model, factors, task, tracker).pairwise(query_loader, train_loader, options,
                                                        **overrides)


def query_gradients(model: nn.Module, loader: Any, task: Task | str | None,
                    factors: Preconditioner, *, tracker: LayerTracker | None = None,
                    precondition: bool = True, progress: bool = True) -> dict[str, Tensor]:
    """Per-query gradients of the measurement, ``{layer: [Q, O, I]}``, preconditioned by default
    (see :meth:`BoundInfluence.query_gradients`; the weights need not be those fitted on)."""
    return bind(model, factors, task, tracker, check_weights=False).query_gradients(
        loader, precondition=precondition, progress=progress)


def _signature(factors: Preconditioner, query_losses: Tensor | None, **options: Any,
               ) -> dict[str, str]:
    """What identifies a scoring pass: the preconditioner, the queries, the options."""
    sig = factors.signature()
    if query_losses is not None:
        sig["queries"] = hashlib.sha256(query_losses.double().numpy().tobytes()).hexdigest()[:16]
    sig.update({k: str(v) for k, v in options.items()})
    return sig


def _resume(store: ScoreStore | None, fold: Callable[[dict[str, Tensor]], None]) -> set[int]:
    """Fold finished chunks in (on rank zero only: merging adds the other ranks' results)."""
    if store is None:
        return set()
    done = store.done_batches()
    barrier()  # every rank reads the finished chunks before any rank writes new ones
    if done and rank() == 0:
        log.info("Resuming: %d finished batches read from %s", len(done), store.folder)
        for chunk in store.load():
            fold({k: v for k, v in chunk.items() if k != "batches"})
    return done


def _gather(topk: StreamingTopK | None, kept: list[dict[str, Tensor]],
            ) -> tuple[StreamingTopK | None, list[dict[str, Tensor]]]:
    """Merge every rank's top-k and kept chunks (identity without a process group)."""
    if not is_distributed():
        return topk, kept
    merged_topk, merged = None, []
    for their_topk, their_kept in all_gather_objects((topk, kept)):
        if their_topk is not None:
            if merged_topk is None:
                merged_topk = their_topk
            else:
                merged_topk.merge(their_topk)
        merged.extend(their_kept)
    return merged_topk, merged


def _assemble(kept: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate chunks along the example axis, ordered by training index."""
    out = {key: torch.cat([c[key] for c in kept], dim=-1) for key in kept[0]}
    order = out["indices"].argsort()
    if not torch.equal(out["indices"][order], torch.arange(order.numel())):
        raise RuntimeError("Scoring chunks do not cover the training set exactly once; delete the "
                           "chunk files and score again.")
    return {key: value[..., order] for key, value in out.items()}


def _measurements(model: nn.Module, loader: Any, task: Task) -> Tensor:
    out = []
    with torch.no_grad():
        for batch in loader:
            batch = move_to_device(batch, model_device(model))
            out.append(task.measurement(task.forward(model, batch), batch).double().cpu())
    if not out:
        raise ValueError("The query dataloader yielded no batch: influence needs queries.")
    return torch.cat(out)


def self_terms(preconditioner: Preconditioner, rows: dict[str, tuple[Tensor, Tensor]],
               n: int) -> Tensor:
    """Per-layer self-influence terms ``[L, N]`` (float64, layers in ``shapes`` order) of one
    batch's rows; they sum to ``score(z_n, z_n)``.

    A layerwise preconditioner (the fitted factors) contracts each layer's rows with its own
    factors (no per-example gradient for single-row layers); a coupled one (a solver)
    preconditions the batch's per-example gradients of every layer at once, and its terms
    ``g_l . P(g)_l`` may be negative. A layer missing from ``rows`` (it did not run) has a zero
    gradient.
    """
    like = next(iter(rows.values()))[0]
    if preconditioner.layerwise:
        return torch.stack([
            self_layer_scores(preconditioner.layers[name], *rows[name]).double()
            if name in rows else torch.zeros(n, dtype=torch.float64, device=like.device)
            for name in preconditioner.shapes])
    dtype = torch.promote_types(like.dtype, torch.float32)
    grads = {name: per_example_gradients(*rows[name]).to(dtype) if name in rows
             else like.new_zeros(n, *shape, dtype=dtype)
             for name, shape in preconditioner.shapes.items()}
    solved = preconditioner.precondition(grads)
    return torch.stack([(solved[name].double() * grads[name].double()).flatten(1).sum(1)
                        for name in preconditioner.shapes])


def _self_chunk(preconditioner: Preconditioner, rows: dict[str, tuple[Tensor, Tensor]], n: int,
                scale: float, prefix: str = "") -> dict[str, Tensor]:
    """One batch's self-influence as chunk entries: ``{prefix}scores [N]`` and
    ``{prefix}layer_scores [L, N]`` (the self-influence pass, or the pairwise pass that also
    computes it, under ``prefix="self_"``)."""
    per = self_terms(preconditioner, rows, n).cpu() * scale  # [L, N]
    return {f"{prefix}scores": per.sum(0), f"{prefix}layer_scores": per}


def _pairwise_and_self_chunk(factors: Any, rotated: dict[str, Tensor],
                             rows: dict[str, tuple[Tensor, Tensor]], n: int, scale: float,
                             per_layer: bool) -> dict[str, Tensor]:
    """One batch's pairwise and self-influence chunk entries in each layer's eigenbasis:
    ``rotated`` are the queries' ``Q_S^T P Q_A`` (see
    :func:`~lightning_influence.scores.pairwise_and_self_rotated`)."""
    pair, selfs = [], []
    for name, queries in rotated.items():
        if name not in rows:  # the layer did not run: zero gradient
            pair.append(torch.zeros(queries.shape[0], n, dtype=torch.float64))
            selfs.append(torch.zeros(n, dtype=torch.float64))
            continue
        lf = factors.layers[name]
        p, s = pairwise_and_self_rotated(lf, queries, *rotate_rows(lf, *rows[name]))
        pair.append(p.double().cpu())
        selfs.append(s.double().cpu())
    per = torch.stack(pair) * scale  # [L, Q, N]
    self_per = torch.stack(selfs) * scale  # [L, N]
    return {"scores": per.sum(0), **({"layer_scores": per} if per_layer else {}),
            "self_scores": self_per.sum(0), "self_layer_scores": self_per}


def _self_result(merged: dict[str, Tensor], names: list[str], scale: float,
                 prefix: str = "") -> SelfResult:
    """The :class:`SelfResult` of assembled chunks written by :func:`_self_chunk`."""
    return SelfResult(merged[f"{prefix}scores"], merged[f"{prefix}layer_scores"], names,
                      merged["losses"], normalized=scale != 1.0)


@dataclass
class SelfResult:
    """Self-influence ``score(z_n, z_n)`` of every training example.

    Attributes:
        scores: ``[N]``; large values flag surprising, hard-to-fit examples (mislabeled,
            conflicting duplicates, out-of-distribution).
        layer_scores: ``[L, N]`` per-layer terms (sum to ``scores``).
        losses: ``[N]`` the training loss of each example (the plain baseline ranking).
    """

    scores: Tensor
    layer_scores: Tensor
    layer_names: list[str]
    losses: Tensor
    normalized: bool = False


def compute_self_scores(model: nn.Module, factors: Preconditioner, train_loader: Any,
                        task: Task | str | None = None, options: ScoreOptions | None = None, *,
                        tracker: LayerTracker | None = None, **overrides: Any) -> SelfResult:
    """Self-influence of every training example in one pass:
    ``bind(model, factors, task, tracker).self_scores(train_loader, options, ...)`` (the
    :class:`~lightning_influence.ScoreOptions` fields ``normalize``, ``precision``,
    ``chunk_batches``, ``progress`` may also be keywords, beside ``scores_dir``)."""
    return bind(model, factors, task, tracker).self_scores(train_loader, options, **overrides)


def build_query_store(model: nn.Module, query_loader: Any, task: Any, factors: Any, *,
                      rank: int | None = 32, tracker: Any = None,
                      progress: bool = False) -> QueryStore:
    """Preconditioned query gradients of every query, truncated to ``rank`` per layer.

    Query batches are preconditioned and truncated one at a time, so no more than one batch of
    full ``[B, O, I]`` matrices is ever held. ``rank=None`` keeps the full matrices.

    Args:
        model: the trained model.
        query_loader: batches of queries (their measurement's gradient is taken).
        task: a :class:`~lightning_influence.Task` or built-in name.
        factors: the fitted :class:`~lightning_influence.Factors`.
        rank: the rank R kept per layer (clipped to ``min(O, I)``), or ``None``.
        tracker: a tracker over the factors' layers (built when ``None``).
        progress: show progress bars.
    """
    tracker = tracker or factors.tracker(model)
    parts = []
    for batch in query_loader:
        grads = query_gradients(model, [batch], task, factors, tracker=tracker, progress=progress)
        if rank is not None:
            grads = {name: truncate(g, rank) for name, g in grads.items()}
        parts.append(QueryStore(grads, rank))
    if not parts:
        raise ValueError("The query dataloader yielded no batch: influence needs queries.")
    store = QueryStore.concatenate(parts)
    log.info("query store: %d queries, rank %s, %.1f MiB (%.3f of full rank)", store.num_queries,
             rank, store.memory_bytes() / 2**20, store.memory_ratio())
    return store

