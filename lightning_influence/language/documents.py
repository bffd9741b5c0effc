"""Which training documents drive a completion: document-, token- and layer-wise influence.

Index letters: Q queries, N training chunks, D documents, T tokens per chunk, L tracked layers,
K kept per query (top-k documents or TF-IDF candidates).

:func:`document_influence` runs it in named steps: a (low-rank) query store of every query,
one streaming pass that scores every training chunk (:func:`score_chunks`), chunk scores summed
per document (:func:`document_scores`), each layer's share (:func:`layer_influence`), token-wise
scores of each query's top documents (:func:`token_influence`), the rank correlation of the
low-rank scores with full rank (:func:`compare_full_rank_scores`), and the recall of the
prefilters (:func:`recall_table`): TF-IDF, and a training-gradient index of the corpus
(:func:`index_document_estimates`, :func:`index_candidates`) when one is given.

Sign: positive = proponent (helpful): up-weighting the document raises the completion's
log-likelihood (lowers its loss).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.stats import spearmanr
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_influence.index import open_index
from lightning_influence.language.corpus import (
    ChunkedCorpus,
    Query,
    QueryDataset,
    as_tokenizer,
)
from lightning_influence.lowrank import QueryStore
from lightning_influence.options import DocumentOptions, resolve_options
from lightning_influence.scoring import BoundInfluence, bind, build_query_store
from lightning_influence.task import CausalLMTask

__all__ = [
    "document_scores",
    "token_scores",
    "layer_influence",
    "rank_correlation",
    "tfidf_candidates",
    "candidate_recall",
    "recall_table",
    "DocumentInfluenceResult",
    "document_influence",
    "ChunkScores",
    "score_chunks",
    "token_influence",
    "compare_full_rank_scores",
    "model_context",
    "check_query_lengths",
    "index_document_estimates",
    "index_candidates",
    "index_recall",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- scores
def document_scores(chunk_scores: Tensor, chunk_document: Tensor, num_documents: int) -> Tensor:
    """A document's score is the sum of its chunks': ``[..., N]`` -> ``[..., D]``.

    A NaN chunk score (a chunk left unscored by a prefilter) makes its document NaN.
    """
    out = chunk_scores.new_zeros(chunk_scores.shape[:-1] + (num_documents,))
    return out.index_add_(-1, chunk_document.to(chunk_scores.device), chunk_scores)


def token_scores(model: nn.Module, store: Mapping[str, Any], loader: Any, task: Any,
                 tracker: Any, *, per_layer: bool = False) -> Tensor:
    """Token-wise influence ``[Q, N, T]`` (``[L, Q, N, T]`` with ``per_layer``) of a loader's
    examples, in loader order.

    Token t of example n carries ``sum_layers g_nt^T P_q a_nt``: summing over tokens gives the
    example's pairwise score; padding tokens carry exactly zero.
    """
    from lightning_influence.passes import batch_rows, evaluation_mode
    from lightning_influence.scores import token_layer_scores

    names = list(store)
    parts = []
    with evaluation_mode(model):
        for b, batch in enumerate(loader):
            rows, _ = batch_rows(model, batch, task, tracker, "loss", batch_index=b)
            per = torch.stack([token_layer_scores(store[name], *rows[name]).double().cpu()
                               for name in names])  # [L, Q, n, T]
            parts.append(per if per_layer else per.sum(0))
    return torch.cat(parts, dim=-2)


def layer_influence(document_layer_scores: Tensor, documents: Tensor) -> tuple[Tensor, Tensor]:
    """Layer-wise influence of each query over a set of its documents (e.g. its top proponents).

    Args:
        document_layer_scores: ``[L, Q, D]`` per-layer document scores (they sum over L to the
            document scores).
        documents: ``[Q, K]`` the documents of each query to sum over.

    Returns:
        ``(totals [Q, L], shares [Q, L])``: each layer's summed score, and its share of the
        query's total (the shares of a query sum to 1).
    """
    idx = documents.to(document_layer_scores.device).unsqueeze(0).expand(
        document_layer_scores.shape[0], -1, -1)  # [L, Q, K]
    totals = document_layer_scores.gather(2, idx).sum(2).T  # [Q, L]
    total = totals.sum(1, keepdim=True)
    shares = totals / torch.where(total == 0, torch.ones_like(total), total)
    return totals, shares


def rank_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Spearman correlation of each row of ``x [Q, N]`` with the same row of ``y [Q, N]``
    (scipy's, average ranks for ties) -> ``[Q]``."""
    x2, y2 = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    return torch.tensor([spearmanr(a.numpy(), b.numpy())[0] for a, b in zip(x2, y2, strict=True)],
                        dtype=torch.float64)


# ----------------------------------------------------------------------------------- TF-IDF
def tfidf_candidates(queries: Sequence[str], documents: Sequence[str], k: int,
                     **vectorizer: Any) -> tuple[Tensor, Tensor]:
    """The ``k`` documents most similar to each query by TF-IDF cosine similarity.

    The vectorizer (scikit-learn's ``TfidfVectorizer``; keyword arguments are passed on, default
    ``sublinear_tf=True``) is fitted on the documents; ties keep document order.

    Returns:
        ``(indices [Q, K], similarities [Q, K])``, most similar first.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    options = {"sublinear_tf": True, **vectorizer}
    vec = TfidfVectorizer(**options)
    docs = vec.fit_transform(list(documents))  # rows L2-normalised
    sims = torch.as_tensor((vec.transform(list(queries)) @ docs.T).toarray(), dtype=torch.float64)
    k = min(k, sims.shape[1])
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
    return order, sims.gather(1, order)


def candidate_recall(candidates: Tensor, exact_top: Tensor) -> Tensor:
    """Per query, the fraction of ``exact_top [Q, k]`` documents inside ``candidates [Q, K]``."""
    hits = (exact_top.unsqueeze(-1) == candidates.unsqueeze(1)).any(-1)  # [Q, k]
    return hits.double().mean(-1)


def recall_table(query_texts: Sequence[str], document_texts: Sequence[str], scores: Tensor,
                 ks: Sequence[int], top_k: int, index_estimates: Tensor | None = None,
                 ) -> list[dict[str, float]]:
    """Recall of the exact top-``top_k`` proponent documents among the TF-IDF top-K, per K,
    and with ``index_estimates`` among the index's top-K (proponents, and the exact top
    opponents among its K most negative estimates).

    Args:
        query_texts: the queries' texts (prompt + completion).
        document_texts: the documents' texts.
        scores: ``[Q, D]`` exact document scores (no NaN).
        ks: the candidate-set sizes K.
        top_k: k, the exact top documents looked for.
        index_estimates: ``[Q, D]`` the index's document estimates (:func:`index_document_estimates`).

    Returns:
        One row per K: ``K``, ``fraction`` (K / D), ``recall`` (TF-IDF, mean over queries),
        ``min_recall`` and ``random_recall`` (the expected recall of K random candidates, K / D);
        with the index also ``index_recall``, ``index_min_recall`` and ``index_opponent_recall``.
    """
    d = scores.shape[1]
    top_k = min(top_k, d)
    exact = scores.topk(top_k, dim=1).indices
    ranked, _ = tfidf_candidates(query_texts, document_texts, max(min(max(ks), d), 1))
    rows = []
    for k in sorted(set(min(int(k), d) for k in ks)):
        recall = candidate_recall(ranked[:, :k], exact)
        rows.append({"K": k, "fraction": k / d, "recall": float(recall.mean()),
                     "min_recall": float(recall.min()), "random_recall": k / d})
        if index_estimates is not None:
            ours = candidate_recall(index_estimates.topk(k, dim=1).indices, exact)
            opponents = candidate_recall(index_estimates.topk(k, dim=1, largest=False).indices,
                                         scores.topk(top_k, dim=1, largest=False).indices)
            rows[-1].update(index_recall=float(ours.mean()), index_min_recall=float(ours.min()),
                            index_opponent_recall=float(opponents.mean()))
    return rows


# ----------------------------------------------------------------------------------- index
def index_document_estimates(index: Any, query_grads: Mapping[str, Tensor],
                             corpus: ChunkedCorpus) -> Tensor:
    """The index's estimates of every document's score ``[Q, D]`` (sums of chunk estimates),
    from the queries' preconditioned gradients ``{layer: [Q, O, I]}`` (full rank)."""
    codes = index.compression.encode_matrices(dict(query_grads))
    chunks = index.estimates(codes).double()  # [Q, N]
    return document_scores(chunks, corpus.chunk_document, corpus.num_documents)


def index_candidates(estimates: Tensor, k: int) -> Tensor:
    """Candidate documents ``[Q, 2K]``: the K largest and the K most negative index estimates
    of each query (the two ends: proponents and opponents)."""
    k = min(k, estimates.shape[1])
    return torch.cat([estimates.topk(k, dim=1).indices,
                      estimates.topk(k, dim=1, largest=False).indices], dim=1)


# ----------------------------------------------------------------------------------- analysis
@dataclass
class DocumentInfluenceResult:
    """What :func:`document_influence` finds. Scores: positive = proponent (helpful).

    Attributes:
        queries: the queries.
        titles: ``[D]`` document titles.
        query_losses: ``[Q]`` each completion's negative log-likelihood (nats).
        chunk_scores: ``[Q, N]`` chunk scores (NaN where a prefilter left a chunk unscored).
        document_scores: ``[Q, D]`` sums of chunk scores.
        document_layer_scores: ``[L, Q, D]`` per-layer document scores (sum over L: the above).
        layer_names: the L axis.
        proponents, opponents: ``[Q, K]`` top documents (largest / most negative scores).
        layer_totals, layer_shares: ``[Q, L]`` layer-wise influence over each query's top-K
            proponents (see :func:`layer_influence`).
        token_scores: ``{(q, d): [tokens of d]}`` token-wise influence of document d on query q
            for each query's top documents (all chunks of d, in reading order).
        rank: the query store's rank (None: full).
        memory: the query store's bytes, full-rank bytes and their ratio.
        full_rank_chunk_scores: ``[Q, N]`` scores with full-rank queries (when compared).
        spearman_chunks, spearman_documents: ``[Q]`` rank correlation of low-rank with
            full-rank scores (when compared).
        candidates: ``[Q, K]`` the prefilter's candidates (TF-IDF: ``[Q, K]``; the index:
            ``[Q, 2K]``, the K largest and K most negative estimates), when prefiltered.
        index_estimates: ``[Q, D]`` the index's document estimates (with an index).
        recall: the TF-IDF recall table (when scores are exact).
        timings: seconds per stage.
    """

    queries: list[Query]
    titles: list[str]
    query_losses: Tensor
    chunk_scores: Tensor
    document_scores: Tensor
    document_layer_scores: Tensor
    layer_names: list[str]
    proponents: Tensor
    opponents: Tensor
    layer_totals: Tensor
    layer_shares: Tensor
    token_scores: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    rank: int | None = None
    memory: dict[str, float] = field(default_factory=dict)
    full_rank_chunk_scores: Tensor | None = None
    spearman_chunks: Tensor | None = None
    spearman_documents: Tensor | None = None
    candidates: Tensor | None = None
    index_estimates: Tensor | None = None
    recall: list[dict[str, float]] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def top_documents(self, q: int, kind: str = "proponent") -> list[tuple[int, float]]:
        """``[(document, score), ...]`` of query q, best first."""
        idx = self.proponents[q] if kind == "proponent" else self.opponents[q]
        return [(int(d), float(self.document_scores[q, d])) for d in idx]


def _top(scores: Tensor, k: int, largest: bool) -> Tensor:
    """Top-k indices per row ignoring NaN (unscored) entries."""
    fill = float("-inf") if largest else float("inf")
    clean = torch.where(torch.isnan(scores), torch.full_like(scores, fill), scores)
    return clean.topk(min(k, scores.shape[-1]), dim=-1, largest=largest).indices


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


_CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "block_size",
                       "max_seq_len", "max_sequence_length", "context_length")
_POSITION_EMBEDDINGS = ("wpe", "pos_emb", "pos_embedding", "position_embedding",
                        "position_embeddings", "embed_positions")


def model_context(model: nn.Module) -> tuple[int, str] | None:
    """The longest input the model takes and where that was read, or ``None`` when it does
    not say: a context length in a config (``config`` or ``cfg`` of the model or a submodule:
    ``max_position_embeddings``, ``n_positions``, ``block_size``, ...), else the size of a
    learned position embedding (an ``nn.Embedding`` named ``wpe``, ``position_embeddings``,
    ...)."""
    for name, module in model.named_modules():
        for holder in ("config", "cfg"):
            config = getattr(module, holder, None)
            for attr in _CONTEXT_ATTRIBUTES:
                value = config.get(attr) if isinstance(config, Mapping) else getattr(
                    config, attr, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value, f"{name + '.' if name else ''}{holder}.{attr}"
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_EMBEDDINGS:
            return module.num_embeddings, f"the position embedding {name!r}"
    return None


def check_query_lengths(model: nn.Module, queries: Sequence[Query], tokenizer: Any) -> None:
    """Refuse, before any pass, a query longer than the model's context
    (:func:`model_context`; nothing is checked when the model does not say)."""
    found = model_context(model)
    if found is None:
        return
    context, source = found
    tokenizer = as_tokenizer(tokenizer)
    for i, query in enumerate(queries):
        prompt, completion = len(tokenizer.encode(query.prompt)), len(
            tokenizer.encode(query.completion))
        if prompt + completion > context:
            raise ValueError(
                f"Query {i} ({query.prompt[:40]!r} -> {query.completion[:40]!r}) has "
                f"{prompt + completion} tokens ({prompt} of prompt, {completion} of completion), "
                f"more than the model's context of {context} ({source}). Shorten its prompt "
                "(the measurement is the completion's) or its completion."
            )


def document_influence(model: nn.Module, factors: Any, corpus: ChunkedCorpus,
                       queries: Sequence[Query], task: Any = None,
                       options: DocumentOptions | None = None, *, tracker: Any = None,
                       **overrides: Any) -> DocumentInfluenceResult:
    """Which training documents drive each query's completion.

    1. Preconditioned query gradients of all queries are held at once (rank ``rank`` per
       layer, or full), so one streaming pass over the training chunks scores every query.
    2. Chunk scores are summed per document; per-layer scores give layer-wise influence.
    3. Token-wise influence is computed for each query's top ``token_documents`` proponent and
       opponent documents (a second pass over those documents' chunks only).
    4. With ``candidates=K`` only the K documents most similar to each query by TF-IDF are
       scored (the others are NaN), or with ``prefilter="index"`` the K largest and K most
       negative estimates of the training-gradient index at ``index`` (no pass over the
       corpus: only the candidates' chunks are scored); without it, the scores are exact and
       the recall table over ``recall_ks`` is computed from them (TF-IDF, and the index's
       beside it when ``index`` is given).
    5. With ``compare_full_rank``, a second pass with full-rank queries measures the rank
       correlation (Spearman) of the low-rank scores with them.

    A query longer than the model's context (:func:`model_context`) is refused before any
    pass.

    Args:
        model: the trained language model (called on ``input_ids [N, T]``, returns logits).
        factors: fitted curvature factors of the model.
        corpus: the chunked training corpus (chunks in the order the scores index).
        queries: prompt + completion pairs.
        task: the task (default: ``CausalLMTask`` with the tokenizer's pad id).
        options: :class:`~lightning_influence.options.DocumentOptions` (``rank``, ``top_k``,
            ``compare_full_rank``, ``candidates``, ``recall_ks``, ``token_documents``,
            ``batch_size``, ``progress``); any field may also be passed as a keyword.
        tracker: a tracker over the factors' layers (built when ``None``).
    """
    options = resolve_options(DocumentOptions, options, overrides, "document_influence()")
    rank, top_k, candidates = options.rank, options.top_k, options.candidates
    batch_size, progress = options.batch_size, options.progress
    queries = list(queries)
    check_query_lengths(model, queries, corpus.tokenizer)  # before any pass
    task = task if task is not None else CausalLMTask(pad_token_id=corpus.tokenizer.pad_id)
    tracker = tracker or factors.tracker(model)
    timings: dict[str, float] = {}
    query_loader = _loader(QueryDataset(queries, corpus.tokenizer), batch_size)
    n_docs = corpus.num_documents

    start = time.perf_counter()
    store = build_query_store(model, query_loader, task, factors, rank=rank, tracker=tracker)
    timings["query_store"] = time.perf_counter() - start
    memory = {"bytes": store.memory_bytes(), "full_rank_bytes": store.full_rank_bytes(),
              "ratio": store.memory_ratio()}

    bound = bind(model, factors, task, tracker)
    estimates = None
    if options.index is not None:  # the training-gradient index of the corpus
        start = time.perf_counter()
        index = open_index(options.index, model, factors, _loader(corpus, batch_size), task)
        estimates = index_document_estimates(index, bound.query_gradients(
            query_loader, progress=False), corpus)
        timings["index_estimates"] = time.perf_counter() - start

    cands = chunk_ids = None
    if candidates is not None:
        if options.prefilter == "index":
            cands = index_candidates(estimates, candidates)
        else:
            cands, _ = tfidf_candidates([q.text for q in queries],
                                        [d.text for d in corpus.documents], candidates)
        chunk_ids = corpus.chunks_of(cands.unique())

    def score(query_grads: QueryStore) -> ChunkScores:
        return score_chunks(bound, corpus, query_loader, query_grads, chunk_ids,
                            batch_size=batch_size, progress=progress)

    start = time.perf_counter()
    chunks = score(store)
    timings["scoring_pass"] = time.perf_counter() - start
    docs = document_scores(chunks.scores, corpus.chunk_document, n_docs)
    doc_layers = document_scores(chunks.layer_scores, corpus.chunk_document, n_docs)
    if cands is not None:  # a document counts only for the queries it is a candidate of
        allowed = torch.zeros(len(queries), n_docs, dtype=torch.bool)
        allowed.scatter_(1, cands, True)
        docs = torch.where(allowed, docs, torch.full_like(docs, float("nan")))
        doc_layers = torch.where(allowed, doc_layers, torch.full_like(doc_layers, float("nan")))
    proponents, opponents = _top(docs, top_k, True), _top(docs, top_k, False)
    totals, shares = layer_influence(torch.nan_to_num(doc_layers), proponents)

    result = DocumentInfluenceResult(
        queries=queries, titles=corpus.titles, query_losses=chunks.query_losses,
        chunk_scores=chunks.scores, document_scores=docs, document_layer_scores=doc_layers,
        layer_names=chunks.layer_names, proponents=proponents, opponents=opponents,
        layer_totals=totals, layer_shares=shares, rank=rank, memory=memory, candidates=cands,
        index_estimates=estimates, timings=timings)

    if options.token_documents > 0:
        start = time.perf_counter()
        shown = torch.cat([proponents[:, :options.token_documents],
                           opponents[:, :options.token_documents]], 1)
        result.token_scores = token_influence(model, store, task, corpus, shown,
                                              batch_size=batch_size, tracker=tracker)
        timings["token_scores"] = time.perf_counter() - start

    if options.compare_full_rank and rank is not None:
        start = time.perf_counter()
        full_store = build_query_store(model, query_loader, task, factors, rank=None,
                                       tracker=tracker)
        compare_full_rank_scores(result, score(full_store).scores, corpus, chunk_ids)
        timings["full_rank_pass"] = time.perf_counter() - start
    if cands is None:
        result.recall = recall_table([q.text for q in queries], [d.text for d in corpus.documents],
                                     docs, options.recall_ks, top_k, estimates)
    return result


@dataclass
class ChunkScores:
    """One scoring pass over the training chunks: ``scores [Q, N]``, ``layer_scores [L, Q, N]``
    (NaN for chunks left out by a prefilter), the queries' measurements and the layer names."""

    scores: Tensor
    layer_scores: Tensor
    query_losses: Tensor
    layer_names: list[str]


def score_chunks(bound: BoundInfluence, corpus: ChunkedCorpus, query_loader: Any,
                 query_grads: QueryStore, chunk_ids: Tensor | None = None, *,
                 batch_size: int = 32, progress: bool = True) -> ChunkScores:
    """Score every query against the training chunks (only ``chunk_ids`` when given) in one
    streaming pass of a bound model, with the per-layer breakdown."""
    n_chunks = len(corpus)
    subset = Subset(corpus, chunk_ids.tolist()) if chunk_ids is not None else corpus
    ids = chunk_ids if chunk_ids is not None else torch.arange(n_chunks)
    result = bound.pairwise(query_loader, _loader(subset, batch_size), top_k=1, keep_scores=True,
                            per_layer=True, query_grads=query_grads, progress=progress)
    full = torch.full((result.scores.shape[0], n_chunks), float("nan"), dtype=torch.float64)
    full[:, ids] = result.scores
    layers = torch.full((len(result.layer_names),) + full.shape, float("nan"),
                        dtype=torch.float64)
    layers[:, :, ids] = result.layer_scores
    return ChunkScores(full, layers, result.query_losses, result.layer_names)


def token_influence(model: nn.Module, store: QueryStore, task: Any, corpus: ChunkedCorpus,
                    documents: Tensor, *, batch_size: int = 32,
                    tracker: Any = None) -> dict[tuple[int, int], Tensor]:
    """Token-wise scores ``{(query, document): [tokens]}`` of the documents ``[Q, k]`` chosen
    per query (a pass over those documents' chunks only, padding left out)."""
    wanted = {(q, int(d)) for q in range(documents.shape[0]) for d in documents[q].tolist()}
    ids = corpus.chunks_of(sorted({d for _, d in wanted}))
    tokens = token_scores(model, store, _loader(Subset(corpus, ids.tolist()), batch_size),
                          task, tracker)  # [Q, n, T]
    position = {int(c): j for j, c in enumerate(ids)}
    out = {}
    for q, d in sorted(wanted):
        rows = [tokens[q, position[int(c)]] for c in corpus.document_chunks(d)]
        masks = [corpus.attention_mask[int(c)] for c in corpus.document_chunks(d)]
        out[(q, d)] = torch.cat([r[m] for r, m in zip(rows, masks, strict=True)])
    return out


def compare_full_rank_scores(result: DocumentInfluenceResult, full_chunk: Tensor,
                             corpus: ChunkedCorpus, chunk_ids: Tensor | None) -> None:
    """Record the full-rank chunk scores and the Spearman correlation of the low-rank chunk and
    document scores with them, per query, on ``result``."""
    seen = chunk_ids if chunk_ids is not None else torch.arange(full_chunk.shape[1])
    result.full_rank_chunk_scores = full_chunk
    result.spearman_chunks = rank_correlation(result.chunk_scores[:, seen], full_chunk[:, seen])
    full_docs = document_scores(full_chunk, corpus.chunk_document, corpus.num_documents)
    scored = ~torch.isnan(result.document_scores).any(0)
    result.spearman_documents = rank_correlation(result.document_scores[:, scored],
                                                 full_docs[:, scored])


def index_recall(result: DocumentInfluenceResult, index: Any, corpus: ChunkedCorpus, task: Any,
                 options: DocumentOptions) -> list[dict[str, float]]:
    """The recall table of an exact ``result`` with the index's recall beside TF-IDF's (the
    index of the corpus, e.g. just built from the same pass); also sets
    ``result.index_estimates``."""
    loader = _loader(QueryDataset(result.queries, corpus.tokenizer), options.batch_size)
    grads = bind(index.bound.model, index.bound.preconditioner, task,
                 index.bound.tracker).query_gradients(loader, progress=False)
    result.index_estimates = index_document_estimates(index, grads, corpus)
    return recall_table([q.text for q in result.queries], [d.text for d in corpus.documents],
                        result.document_scores, options.recall_ks, options.top_k,
                        result.index_estimates)
