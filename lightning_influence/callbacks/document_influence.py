"""DocumentInfluence: which training documents drive a language model's completions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_influence.callbacks._common import output_dir
from lightning_influence.callbacks.eigen_correction import attached_curvature
from lightning_influence.language import (
    ChunkedCorpus,
    DocumentInfluenceResult,
    document_influence,
    queries_from_config,
)
from lightning_influence.language.documents import check_query_lengths
from lightning_influence.language.reporting import log_document_influence, write_document_influence
from lightning_influence.memory import estimate_bytes, format_estimate
from lightning_influence.task import CausalLMTask


class DocumentInfluence(Callback):
    """Logs, for each prompt + completion query, the training documents that drive it.

    When fit ends (after :class:`EigenCorrection` has its factors) it holds the preconditioned
    gradients of all queries at once (rank ``rank`` per layer), scores them in one streaming pass
    over the training chunks, sums chunk scores per document, computes token-wise influence of
    each query's top documents and layer-wise influence, and writes and logs (W&B) the tables,
    token-coloured HTML, a layer-wise bar chart and the log-log distribution of influence.

    The training corpus is a :class:`~lightning_influence.language.ChunkedCorpus`: the
    ``corpus`` argument, else the datamodule's ``corpus`` attribute.

    Args:
        queries: ``[{prompt: ..., completion: ...}, ...]``; the measurement is the completion's
            log-likelihood (prompt tokens and padding count nothing).
        rank: rank per layer of the stored query gradients (truncated SVD); ``None``: full.
        top_k: proponent and opponent documents kept per query.
        compare_full_rank: also score with full-rank queries (one more pass) and report the
            Spearman correlation of the rank-``rank`` scores with them.
        candidates: score only the K documents most similar to each query by TF-IDF
            (``None``: every document, exact, and the TF-IDF recall table is reported).
        recall_ks: candidate-set sizes K of the recall table.
        token_documents: top proponent and opponent documents per query shown token by token.
        render_tokens: tokens of a document shown (the window holding the most influence).
        batch_size: batch size of the passes.
        output_dir: where files go (default: ``<factors folder>/documents``).
        corpus: the chunked training corpus (default: ``trainer.datamodule.corpus``).
        progress: show progress bars.
    """

    def __init__(self, queries: Sequence[Any] = (), rank: int | None = 32, top_k: int = 5,
                 compare_full_rank: bool = False, candidates: int | None = None,
                 recall_ks: Sequence[int] = (5, 10, 20, 40), token_documents: int = 2,
                 render_tokens: int = 1200, batch_size: int = 32,
                 output_dir: str | Path | None = None, corpus: ChunkedCorpus | None = None,
                 progress: bool = True) -> None:
        super().__init__()
        self.queries = queries_from_config(list(queries))
        if rank is not None and rank < 1:
            raise ValueError(f"DocumentInfluence: rank must be >= 1 or None, got {rank}.")
        if top_k < 1:
            raise ValueError(f"DocumentInfluence: top_k must be >= 1, got {top_k}.")
        if candidates is not None and candidates < 1:
            raise ValueError(f"DocumentInfluence: candidates must be >= 1 or None, got "
                             f"{candidates}.")
        if token_documents < 0:
            raise ValueError(f"DocumentInfluence: token_documents must be >= 0, got "
                             f"{token_documents}.")
        self.rank = rank
        self.top_k = top_k
        self.compare_full_rank = compare_full_rank
        self.candidates = candidates
        self.recall_ks = [int(k) for k in recall_ks]
        self.token_documents = token_documents
        self.render_tokens = render_tokens
        self.batch_size = batch_size
        self.output_dir = output_dir
        self.corpus = corpus
        self.progress = progress
        self.result: DocumentInfluenceResult | None = None
        self.files: dict[str, str] = {}
        self.logged_keys: list[str] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        corpus = self._corpus(trainer)
        if stage == "fit" and corpus is not None:  # before training, not after the passes
            check_query_lengths(pl_module, self.queries, corpus.tokenizer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.run(trainer, pl_module)

    def _corpus(self, trainer: Any) -> ChunkedCorpus | None:
        corpus = self.corpus if self.corpus is not None else getattr(
            getattr(trainer, "datamodule", None), "corpus", None)
        return corpus if isinstance(corpus, ChunkedCorpus) else None

    def run(self, trainer: Any, pl_module: Any) -> DocumentInfluenceResult:
        """Compute, write and log. Called when fit ends; callable by hand after ``fit``."""
        corpus = self._corpus(trainer)
        if corpus is None:
            raise ValueError("DocumentInfluence needs the training corpus: pass corpus=<ChunkedCorpus> "
                             "or give the datamodule a `corpus` attribute (lightning_influence."
                             "language.chunk_documents builds one).")
        check_query_lengths(pl_module, self.queries, corpus.tokenizer)  # before the fit
        eigen, factors, task = attached_curvature(trainer, pl_module, "DocumentInfluence")
        if not isinstance(task, CausalLMTask):
            raise TypeError(f"DocumentInfluence needs a CausalLMTask, got {type(task).__name__}.")
        rank_zero_info(f"lightning-influence: {len(self.queries)} queries against {len(corpus)} "
                       f"chunks of {corpus.num_documents} documents, query rank {self.rank}")
        rank_zero_info("lightning-influence: " + format_estimate(estimate_bytes(
            factors.shapes, factors.strategy, num_queries=len(self.queries), query_rank=self.rank,
            batch_size=self.batch_size, rows_per_example=corpus.context)))
        show = self.progress and trainer.is_global_zero
        self.result = document_influence(
            pl_module, factors, corpus, self.queries, task, rank=self.rank, top_k=self.top_k,
            compare_full_rank=self.compare_full_rank, candidates=self.candidates,
            recall_ks=self.recall_ks, token_documents=self.token_documents,
            batch_size=self.batch_size, progress=show)
        if trainer.is_global_zero:
            folder = output_dir(trainer, self.output_dir or (
                Path(eigen.factors_path) / "documents" if eigen.factors_path else None))
            paths = write_document_influence(folder, self.result, corpus, self.render_tokens,
                                             extra={"strategy": factors.strategy})
            self.files = {k: str(v) for k, v in paths.items()}
            self.logged_keys = log_document_influence(trainer.loggers, self.result, corpus, paths,
                                                      render_tokens=self.render_tokens)
            rank_zero_info(f"lightning-influence: document influence written to {folder}")
        return self.result

    def state_dict(self) -> dict[str, Any]:
        return {"files": self.files}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.files = dict(state_dict.get("files", {}))
