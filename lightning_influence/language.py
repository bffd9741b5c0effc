"""Language models: which training documents drive a completion.

Index letters: Q queries, N training chunks, D documents, T tokens per chunk, L tracked layers,
K kept per query (top-k documents or TF-IDF candidates).

The pieces, in the order data flows through them:

- documents (:class:`Document`): Python's own documentation (offline in every CPython), text
  files, or a Hugging Face ``datasets`` corpus;
- a character tokenizer (:class:`CharTokenizer`) and chunking: a document longer than the
  context is split into consecutive chunks (:class:`ChunkedCorpus`); each chunk is one training
  example;
- queries (:class:`Query`): a prompt and a completion; the measurement is the completion's
  negative log-likelihood (prompt tokens and padding carry ``labels = -100`` and count nothing);
- document-level influence: the sum of a document's chunk scores (:func:`document_scores`);
  token-wise influence of a document's tokens (:func:`token_scores`); layer-wise influence,
  each layer's share of a query's total (:func:`layer_influence`);
- a TF-IDF candidate prefilter (:func:`tfidf_candidates`) and the recall of the exact top-k
  documents among the candidates (:func:`recall_table`);
- :func:`document_influence`, which runs all of it with a (low-rank) query store and one
  streaming pass over the training chunks.

Sign: positive = proponent (helpful): up-weighting the document raises the completion's
log-likelihood (lowers its loss).
"""

from __future__ import annotations

import glob
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_influence.lowrank import QueryStore
from lightning_influence.scoring import build_query_store

__all__ = [
    "Document",
    "Query",
    "CharTokenizer",
    "ChunkedCorpus",
    "QueryDataset",
    "python_docs",
    "read_text_files",
    "hf_documents",
    "chunk_documents",
    "queries_from_config",
    "document_scores",
    "token_scores",
    "layer_influence",
    "rank_correlation",
    "tfidf_candidates",
    "candidate_recall",
    "recall_table",
    "DocumentInfluenceResult",
    "document_influence",
    "DEFAULT_STDLIB_MODULES",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

#: Standard-library modules whose docstrings join the default corpus (each a document). Chosen
#: for long docstrings and imports without side effects.
DEFAULT_STDLIB_MODULES = (
    "argparse", "ast", "cmd", "configparser", "copy", "csv", "difflib", "doctest", "fileinput",
    "gc", "hashlib", "heapq", "inspect", "io", "itertools", "json", "os", "random", "re", "sched",
    "shelve", "socket", "statistics", "struct", "subprocess", "sys", "tempfile", "time", "timeit",
    "typing", "unittest", "uuid",
)


# ----------------------------------------------------------------------------------- documents
@dataclass(frozen=True)
class Document:
    """A training document: a title (for people) and its text."""

    title: str
    text: str


def python_docs(topics: bool = True, modules: Sequence[str] = DEFAULT_STDLIB_MODULES,
                ) -> list[Document]:
    """Python's own documentation, available offline in every CPython.

    Args:
        topics: include the help topics of ``pydoc_data.topics`` (79 documents, ~465k characters
            in CPython 3.11), titled ``"topic <name>"``.
        modules: standard-library modules whose docstring is a document, titled
            ``"module <name>"`` (a module that does not import or has no docstring is skipped).
    """
    import importlib

    docs = []
    if topics:
        from pydoc_data.topics import topics as help_topics

        docs += [Document(f"topic {name}", text) for name, text in sorted(help_topics.items())]
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - depends on the Python build
            log.warning("skipping module %r: it does not import", name)
            continue
        if module.__doc__ and module.__doc__.strip():
            docs.append(Document(f"module {name}", module.__doc__.strip() + "\n"))
    return docs


def read_text_files(paths: Sequence[str | Path], suffixes: Sequence[str] = (".txt", ".md", ".rst"),
                    ) -> list[Document]:
    """Each text file is one document, titled by its path.

    Args:
        paths: files, directories (searched recursively for ``suffixes``) or glob patterns.
        suffixes: file endings taken from directories.

    Raises:
        FileNotFoundError: a path or pattern matches no file.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for spec in paths:
        spec = str(Path(spec).expanduser())
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
        if not found:
            raise FileNotFoundError(f"data.files: {spec!r} matches no file (give files, "
                                    f"directories holding {list(suffixes)} files, or glob patterns).")
        files += found
    docs = [Document(str(f), f.read_text(encoding="utf-8", errors="replace")) for f in files]
    return [d for d in docs if d.text.strip()]


def hf_documents(name: str, split: str = "train", text_field: str = "text",
                 title_field: str | None = None, config: str | None = None,
                 max_documents: int | None = None) -> list[Document]:
    """Documents from a Hugging Face ``datasets`` corpus (imported only here).

    Args:
        name: the dataset name or a local path (``datasets.load_dataset``'s first argument).
        split: the split to read.
        text_field: the column holding the text.
        title_field: the column holding a title (default: ``"<name>[<row>]"``).
        config: the dataset configuration name.
        max_documents: read at most this many rows.

    Raises:
        ImportError: ``datasets`` is not installed (with the command that installs it).
        KeyError: ``text_field`` or ``title_field`` is not a column.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "data.hf_dataset needs the Hugging Face `datasets` package, which is not installed: "
            "`pip install datasets` (or use data.files=[...] for local text files)."
        ) from err
    split_spec = split if max_documents is None else f"{split}[:{int(max_documents)}]"
    rows = datasets.load_dataset(name, config, split=split_spec)
    columns = list(rows.column_names)
    for column in (text_field, title_field):
        if column is not None and column not in columns:
            raise KeyError(f"The dataset {name!r} has no column {column!r}; columns: {columns}.")
    docs = []
    for i, row in enumerate(rows):
        title = str(row[title_field]) if title_field else f"{name}[{i}]"
        if row[text_field] and str(row[text_field]).strip():
            docs.append(Document(title, str(row[text_field])))
    return docs


# ----------------------------------------------------------------------------------- tokens
class CharTokenizer:
    """Characters as tokens: id 0 pads, id 1 stands for characters outside the vocabulary.

    Args:
        alphabet: the characters of the vocabulary (ids 2, 3, ... in this order).
    """

    PAD, UNK = 0, 1

    def __init__(self, alphabet: str) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("CharTokenizer: the alphabet repeats characters.")
        self.alphabet = alphabet
        self._ids = {c: i + 2 for i, c in enumerate(alphabet)}

    @classmethod
    def from_texts(cls, texts: Sequence[str], min_count: int = 1) -> CharTokenizer:
        """The characters seen at least ``min_count`` times, in code-point order."""
        counts = Counter()
        for text in texts:
            counts.update(text)
        return cls("".join(sorted(c for c, n in counts.items() if n >= min_count)))

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 2

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.UNK) for c in text]

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """One string per id: its character, ``""`` for padding, ``"\\ufffd"`` for unknown."""
        out = []
        for i in ids:
            i = int(i)
            out.append("" if i == self.PAD else "\ufffd" if i == self.UNK
                       else self.alphabet[i - 2])
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.token_strings(ids))

    def state_dict(self) -> dict[str, str]:
        return {"alphabet": self.alphabet}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, str]) -> CharTokenizer:
        return cls(state["alphabet"])


@dataclass
class ChunkedCorpus(Dataset):
    """Documents cut into chunks of at most ``context`` tokens: one training example per chunk.

    Items are dicts ``{"input_ids": [T] long, "attention_mask": [T] bool}`` (right-padded with
    the tokenizer's pad id), which :class:`~lightning_influence.CausalLMTask` understands.

    Attributes:
        documents: the documents, in order.
        tokenizer: the tokenizer.
        context: T.
        input_ids: ``[N, T]`` token ids.
        attention_mask: ``[N, T]`` True on real tokens.
        chunk_document: ``[N]`` the document of each chunk.
        chunk_offset: ``[N]`` the position of each chunk's first token in its document.
    """

    documents: list[Document]
    tokenizer: CharTokenizer
    context: int
    input_ids: Tensor
    attention_mask: Tensor
    chunk_document: Tensor
    chunk_offset: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}

    @property
    def num_documents(self) -> int:
        return len(self.documents)

    @property
    def titles(self) -> list[str]:
        return [d.title for d in self.documents]

    def document_chunks(self, document: int) -> Tensor:
        """Indices ``[n]`` of one document's chunks, in reading order."""
        return (self.chunk_document == document).nonzero().flatten()

    def chunks_of(self, documents: Sequence[int] | Tensor) -> Tensor:
        """Sorted indices of every chunk of the given documents."""
        docs = torch.as_tensor(list(documents) if not isinstance(documents, Tensor) else documents)
        return torch.isin(self.chunk_document, docs).nonzero().flatten()


def chunk_documents(documents: Sequence[Document], tokenizer: CharTokenizer,
                    context: int) -> ChunkedCorpus:
    """Tokenize and split every document into consecutive chunks of ``context`` tokens.

    The last chunk of a document is padded; chunks of a single token (nothing to predict) are
    dropped; a document left with no chunk is dropped too.
    """
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens, got {context}.")
    kept_docs: list[Document] = []
    rows, masks, doc_ids, offsets = [], [], [], []
    for doc in documents:
        ids = tokenizer.encode(doc.text)
        starts = [s for s in range(0, len(ids), context) if len(ids) - s >= 2]
        if not starts:
            continue
        d = len(kept_docs)
        kept_docs.append(doc)
        for s in starts:
            piece = ids[s:s + context]
            rows.append(piece + [tokenizer.pad_id] * (context - len(piece)))
            masks.append([True] * len(piece) + [False] * (context - len(piece)))
            doc_ids.append(d)
            offsets.append(s)
    if not rows:
        raise ValueError("No document has two tokens or more: nothing to train on.")
    return ChunkedCorpus(kept_docs, tokenizer, context, torch.tensor(rows, dtype=torch.long),
                         torch.tensor(masks, dtype=torch.bool), torch.tensor(doc_ids),
                         torch.tensor(offsets))


# ----------------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class Query:
    """A prompt and the completion whose log-likelihood is measured."""

    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def queries_from_config(items: Sequence[Any]) -> list[Query]:
    """Queries from config items: mappings with ``prompt`` and ``completion`` (or Query objects)."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Query):
            out.append(item)
            continue
        if not isinstance(item, Mapping) or "prompt" not in item or "completion" not in item:
            raise ValueError(f"Query {i} is {item!r}; each query needs 'prompt' and 'completion'.")
        if not str(item["completion"]):
            raise ValueError(f"Query {i} has an empty completion: nothing to measure.")
        out.append(Query(str(item["prompt"]), str(item["completion"])))
    if not out:
        raise ValueError("No queries: give at least one {prompt, completion} pair.")
    return out


class QueryDataset(Dataset):
    """Queries as dict items ``input_ids``, ``attention_mask`` and ``labels`` (right-padded).

    ``labels`` equal the input ids on completion tokens and ``-100`` on prompt tokens and padding,
    so :class:`~lightning_influence.CausalLMTask`'s measurement is the completion's negative
    log-likelihood: the first completion token is predicted from the prompt's last token.

    Args:
        queries: the queries.
        tokenizer: the tokenizer.
        max_length: the model's context; a longer query is refused.
    """

    def __init__(self, queries: Sequence[Query], tokenizer: CharTokenizer,
                 max_length: int | None = None) -> None:
        self.queries = list(queries)
        encoded = [(tokenizer.encode(q.prompt), tokenizer.encode(q.completion)) for q in self.queries]
        width = max(len(p) + len(c) for p, c in encoded)
        if max_length is not None and width > max_length:
            raise ValueError(f"A query has {width} tokens, more than the model's context of "
                             f"{max_length}; shorten it.")
        n = len(encoded)
        self.input_ids = torch.full((n, width), tokenizer.pad_id, dtype=torch.long)
        self.attention_mask = torch.zeros(n, width, dtype=torch.bool)
        self.labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for q, (p, c) in enumerate(encoded):
            ids = torch.tensor(p + c, dtype=torch.long)
            self.input_ids[q, :ids.numel()] = ids
            self.attention_mask[q, :ids.numel()] = True
            self.labels[q, len(p):ids.numel()] = ids[len(p):]

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "labels": self.labels[index]}


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
    (average ranks for ties) -> ``[Q]``."""

    def ranks(v: Tensor) -> Tensor:
        v = v.double()
        order = v.argsort(dim=-1)
        r = torch.empty_like(v)
        r.scatter_(-1, order, torch.arange(v.shape[-1], dtype=v.dtype).expand_as(v).contiguous())
        # average the ranks of ties
        out = torch.empty_like(r)
        for q in range(v.shape[0]):
            values, inverse = torch.unique(v[q], return_inverse=True)
            sums = torch.zeros_like(values).index_add_(0, inverse, r[q])
            counts = torch.zeros_like(values).index_add_(0, inverse, torch.ones_like(r[q]))
            out[q] = (sums / counts)[inverse]
        return out

    rx, ry = ranks(x.reshape(-1, x.shape[-1])), ranks(y.reshape(-1, y.shape[-1]))
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    return (rx * ry).sum(-1) / (rx.norm(dim=-1) * ry.norm(dim=-1)).clamp_min(1e-300)


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
                 ks: Sequence[int], top_k: int) -> list[dict[str, float]]:
    """Recall of the exact top-``top_k`` proponent documents among the TF-IDF top-K, per K.

    Args:
        query_texts: the queries' texts (prompt + completion).
        document_texts: the documents' texts.
        scores: ``[Q, D]`` exact document scores (no NaN).
        ks: the candidate-set sizes K.
        top_k: k, the exact top documents looked for.

    Returns:
        One row per K: ``K``, ``fraction`` (K / D), ``recall`` (mean over queries), ``min_recall``
        and ``random_recall`` (the expected recall of K random candidates, K / D).
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
    return rows


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
        candidates: ``[Q, K]`` TF-IDF candidates (when prefiltered).
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


def document_influence(model: nn.Module, factors: Any, corpus: ChunkedCorpus,
                       queries: Sequence[Query], task: Any = None, *, rank: int | None = 32,
                       top_k: int = 5, compare_full_rank: bool = False,
                       candidates: int | None = None, recall_ks: Sequence[int] = (5, 10, 20, 40),
                       token_documents: int = 2, batch_size: int = 32, tracker: Any = None,
                       progress: bool = True) -> DocumentInfluenceResult:
    """Which training documents drive each query's completion.

    1. Preconditioned query gradients of all queries are held at once (rank ``rank`` per
       layer, or full), so one streaming pass over the training chunks scores every query.
    2. Chunk scores are summed per document; per-layer scores give layer-wise influence.
    3. Token-wise influence is computed for each query's top ``token_documents`` proponent and
       opponent documents (a second pass over those documents' chunks only).
    4. With ``candidates=K`` only the K documents most similar to each query by TF-IDF are
       scored (the others are NaN); without it, the scores are exact and the TF-IDF recall
       table over ``recall_ks`` is computed from them.
    5. With ``compare_full_rank``, a second pass with full-rank queries measures the rank
       correlation (Spearman) of the low-rank scores with them.

    Args:
        model: the trained language model (called on ``input_ids [N, T]``, returns logits).
        factors: fitted curvature factors of the model.
        corpus: the chunked training corpus (chunks in the order the scores index).
        queries: prompt + completion pairs.
        task: the task (default: ``CausalLMTask`` with the tokenizer's pad id).
        rank: rank per layer of the query store (``None``: full rank).
        top_k: documents kept per query and kind (also the k of the recall table).
        compare_full_rank: also score with full-rank queries and report the correlation.
        candidates: TF-IDF prefilter size K (``None``: score every document).
        recall_ks: candidate-set sizes of the recall table.
        token_documents: proponent and opponent documents per query with token-wise scores.
        batch_size: batch size of the training passes.
        tracker: a tracker over the factors' layers (built when ``None``).
        progress: show progress bars.
    """
    from lightning_influence.scoring import compute_pairwise_scores
    from lightning_influence.task import CausalLMTask

    queries = list(queries)
    task = task if task is not None else CausalLMTask(pad_token_id=corpus.tokenizer.pad_id)
    tracker = tracker or factors.tracker(model)
    timings: dict[str, float] = {}
    query_set = QueryDataset(queries, corpus.tokenizer)
    query_loader = _loader(query_set, batch_size)
    n_docs, n_chunks = corpus.num_documents, len(corpus)

    start = time.perf_counter()
    store = build_query_store(model, query_loader, task, factors, rank=rank, tracker=tracker)
    timings["query_store"] = time.perf_counter() - start
    memory = {"bytes": store.memory_bytes(), "full_rank_bytes": store.full_rank_bytes(),
              "ratio": store.memory_ratio()}

    cands = None
    chunk_ids = torch.arange(n_chunks)
    if candidates is not None:
        cands, _ = tfidf_candidates([q.text for q in queries], [d.text for d in corpus.documents],
                                    candidates)
        chunk_ids = corpus.chunks_of(cands.unique())
    train_loader = _loader(Subset(corpus, chunk_ids.tolist()) if candidates is not None
                           else corpus, batch_size)

    def score(query_grads: QueryStore) -> tuple[Tensor, Tensor, Tensor, list[str]]:
        result = compute_pairwise_scores(model, factors, query_loader, train_loader, task,
                                         top_k=1, keep_scores=True, per_layer=True,
                                         tracker=tracker, query_grads=query_grads,
                                         progress=progress)
        full = torch.full((len(queries), n_chunks), float("nan"), dtype=torch.float64)
        full[:, chunk_ids] = result.scores
        layers = torch.full((len(result.layer_names),) + full.shape, float("nan"),
                            dtype=torch.float64)
        layers[:, :, chunk_ids] = result.layer_scores
        return full, layers, result.query_losses, result.layer_names

    start = time.perf_counter()
    chunk, chunk_layers, query_losses, names = score(store)
    timings["scoring_pass"] = time.perf_counter() - start
    docs = document_scores(chunk, corpus.chunk_document, n_docs)
    doc_layers = document_scores(chunk_layers, corpus.chunk_document, n_docs)
    if cands is not None:  # a document counts only for the queries it is a candidate of
        allowed = torch.zeros(len(queries), n_docs, dtype=torch.bool)
        allowed.scatter_(1, cands, True)
        docs = torch.where(allowed, docs, torch.full_like(docs, float("nan")))
        doc_layers = torch.where(allowed, doc_layers, torch.full_like(doc_layers, float("nan")))
    proponents, opponents = _top(docs, top_k, True), _top(docs, top_k, False)
    totals, shares = layer_influence(torch.nan_to_num(doc_layers), proponents)

    result = DocumentInfluenceResult(
        queries=queries, titles=corpus.titles, query_losses=query_losses, chunk_scores=chunk,
        document_scores=docs, document_layer_scores=doc_layers, layer_names=names,
        proponents=proponents, opponents=opponents, layer_totals=totals, layer_shares=shares,
        rank=rank, memory=memory, candidates=cands, timings=timings)

    if token_documents > 0:
        start = time.perf_counter()
        wanted = {(q, int(d)) for q in range(len(queries))
                  for d in torch.cat([proponents[q, :token_documents],
                                      opponents[q, :token_documents]]).tolist()}
        doc_set = sorted({d for _, d in wanted})
        ids = corpus.chunks_of(doc_set)
        tokens = token_scores(model, store, _loader(Subset(corpus, ids.tolist()), batch_size),
                              task, tracker)  # [Q, n, T]
        position = {int(c): j for j, c in enumerate(ids)}
        for q, d in sorted(wanted):
            rows = [tokens[q, position[int(c)]] for c in corpus.document_chunks(d)]
            masks = [corpus.attention_mask[int(c)] for c in corpus.document_chunks(d)]
            result.token_scores[(q, d)] = torch.cat([r[m] for r, m in zip(rows, masks, strict=True)])
        timings["token_scores"] = time.perf_counter() - start

    if compare_full_rank and rank is not None:
        start = time.perf_counter()
        full_store = build_query_store(model, query_loader, task, factors, rank=None,
                                       tracker=tracker)
        full_chunk, _, _, _ = score(full_store)
        timings["full_rank_pass"] = time.perf_counter() - start
        seen = chunk_ids
        result.full_rank_chunk_scores = full_chunk
        result.spearman_chunks = rank_correlation(chunk[:, seen], full_chunk[:, seen])
        full_docs = document_scores(full_chunk, corpus.chunk_document, n_docs)
        scored = ~torch.isnan(docs).any(0)
        result.spearman_documents = rank_correlation(docs[:, scored], full_docs[:, scored])
    if cands is None:
        result.recall = recall_table([q.text for q in queries], [d.text for d in corpus.documents],
                                     docs, recall_ks, top_k)
    return result
