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
- a TF-IDF candidate prefilter (:func:`tfidf_candidates`), or the training-gradient index's
  (:func:`index_candidates`), and the recall of the exact top-k documents among each
  prefilter's candidates (:func:`recall_table`);
- :func:`document_influence`, which runs all of it with a (low-rank) query store and one
  streaming pass over the training chunks.

Sign: positive = proponent (helpful): up-weighting the document raises the completion's
log-likelihood (lowers its loss).
"""

from lightning_influence.language.corpus import (
    DEFAULT_STDLIB_MODULES,
    IGNORE_INDEX,
    CharTokenizer,
    ChunkedCorpus,
    Document,
    HFTokenizer,
    Query,
    QueryDataset,
    as_tokenizer,
    chunk_documents,
    documents_from_rows,
    hf_documents,
    python_docs,
    queries_from_config,
    read_text_files,
)
from lightning_influence.language.documents import (
    DocumentInfluenceResult,
    candidate_recall,
    document_influence,
    document_scores,
    index_candidates,
    index_document_estimates,
    index_recall,
    layer_influence,
    rank_correlation,
    recall_table,
    tfidf_candidates,
    token_scores,
)

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
    "DEFAULT_STDLIB_MODULES",
    "IGNORE_INDEX",
    "HFTokenizer",
    "as_tokenizer",
    "documents_from_rows",
    "document_scores",
    "token_scores",
    "layer_influence",
    "rank_correlation",
    "tfidf_candidates",
    "index_candidates",
    "index_document_estimates",
    "index_recall",
    "candidate_recall",
    "recall_table",
    "DocumentInfluenceResult",
    "document_influence",
]
