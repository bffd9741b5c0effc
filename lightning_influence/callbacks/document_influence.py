"""DocumentInfluence: which training documents drive a language model's completions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_influence.callbacks._common import output_dir
from lightning_influence.callbacks.run import InfluenceRun
from lightning_influence.language import (
    ChunkedCorpus,
    DocumentInfluenceResult,
    document_influence,
    index_recall,
    queries_from_config,
)
from lightning_influence.language.documents import check_query_lengths
from lightning_influence.language.reporting import log_document_influence, write_document_influence
from lightning_influence.memory import estimate_bytes, format_estimate
from lightning_influence.options import DEFAULT_DOCUMENTS, DocumentOptions, callback_options
from lightning_influence.task import CausalLMTask


class DocumentInfluence(Callback):
    """Logs, for each prompt + completion query, the training documents that drive it.

    When fit ends (after :class:`EigenCorrection` has its factors) it holds the preconditioned
    gradients of all queries at once (rank ``rank`` per layer), scores them in one streaming pass
    over the training chunks, sums chunk scores per document, computes token-wise influence of
    each query's top documents and layer-wise influence, and writes and logs (W&B) the tables,
    token-coloured HTML, a layer-wise bar chart and the log-log distribution of influence.
    With an :class:`InfluenceIndex` after it in the callbacks, the index is built from the rows of
    that same pass, and the recall table shows the index's recall beside TF-IDF's.

    The training corpus is a :class:`~lightning_influence.language.ChunkedCorpus`: the
    ``corpus`` argument, else the datamodule's ``corpus`` attribute.

    Args:
        queries: ``[{prompt: ..., completion: ...}, ...]``; the measurement is the completion's
            log-likelihood (prompt tokens and padding count nothing).
        top_k: shortcut for ``options.top_k``: documents kept per query.
        output_dir: where files go (default: ``<factors folder>/documents``).
        corpus: the chunked training corpus (default: ``trainer.datamodule.corpus``).
        options: :class:`~lightning_influence.options.DocumentOptions` (``rank`` of the stored
            query gradients, ``None`` for full rank; ``compare_full_rank``, ``candidates``,
            ``recall_ks``, ``token_documents``, ``render_tokens``, ``batch_size``,
            ``progress``; ``DocumentOptions.help()`` lists them).
        **legacy: those options as plain keywords (as before :class:`DocumentOptions` held
            them) still work, with a deprecation warning.
    """

    def __init__(self, queries: Sequence[Any] = (), top_k: int | None = None,
                 output_dir: str | Path | None = None,
                 corpus: ChunkedCorpus | None = None,
                 options: DocumentOptions = DEFAULT_DOCUMENTS, **legacy: Any) -> None:
        super().__init__()
        self.queries = queries_from_config(list(queries))
        shortcuts = {"top_k": top_k} if top_k is not None else {}
        try:
            self.options = callback_options(DocumentOptions, options, shortcuts, legacy,
                                            "DocumentInfluence", "options")
        except ValueError as err:
            raise ValueError(f"DocumentInfluence: {err}") from err
        self.output_dir = output_dir
        self.corpus = corpus
        self.result: DocumentInfluenceResult | None = None
        self.files: dict[str, str] = {}
        self.logged_keys: list[str] = []
        self.influence_run: InfluenceRun | None = None

    @property
    def rank(self) -> int | None:
        return self.options.rank

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.influence_run.check()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.influence_run = InfluenceRun.join(trainer, self, "consumer")
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
        if self.influence_run is None:
            self.setup(trainer, pl_module, "fit")
        factors, task = self.influence_run.curvature(trainer, pl_module, "DocumentInfluence")
        factors_path = self.influence_run.factors_path
        if not isinstance(task, CausalLMTask):
            raise TypeError(f"DocumentInfluence needs a CausalLMTask, got {type(task).__name__}.")
        rank_zero_info(f"lightning-influence: {len(self.queries)} queries against {len(corpus)} "
                       f"chunks of {corpus.num_documents} documents, query rank {self.rank}")
        options = self.options
        rank_zero_info("lightning-influence: " + format_estimate(estimate_bytes(
            factors.shapes, factors.strategy, num_queries=len(self.queries),
            query_rank=options.rank, batch_size=options.batch_size,
            rows_per_example=corpus.context)))
        with self.influence_run.training_pass(trainer, pl_module):  # feeds an InfluenceIndex
            self.result = document_influence(
                pl_module, factors, corpus, self.queries, task, options,
                progress=options.progress and trainer.is_global_zero)
        index = self.influence_run.index
        if index is not None and options.index is None and self.result.recall is not None:
            self.result.recall = index_recall(self.result, index, corpus, task, options)
        if trainer.is_global_zero:
            folder = output_dir(trainer, self.output_dir or (
                Path(factors_path) / "documents" if factors_path else None))
            paths = write_document_influence(folder, self.result, corpus, options.render_tokens,
                                             extra={"strategy": factors.strategy})
            self.files = {k: str(v) for k, v in paths.items()}
            self.logged_keys = log_document_influence(trainer.loggers, self.result, corpus, paths,
                                                      render_tokens=options.render_tokens)
            rank_zero_info(f"lightning-influence: document influence written to {folder}")
        return self.result

    def state_dict(self) -> dict[str, Any]:
        return {"files": self.files}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.files = dict(state_dict.get("files", {}))
