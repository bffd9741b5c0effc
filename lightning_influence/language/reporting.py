"""Document influence to people: token-coloured HTML, plots, tables; on disk and in W&B.

Index letters: Q queries, N training chunks, D documents, L layers, K documents kept per query.

Sign convention, repeated in every table: a positive score marks a proponent (helpful) document:
up-weighting it raises the completion's log-likelihood; a negative score an opponent. Tokens are
coloured green (proponent) or red (opponent), with opacity proportional to the token's share of
the largest token magnitude shown.
"""

from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_influence.io import atomic_save_csv, atomic_save_json, atomic_save_safetensors, atomic_write
from lightning_influence.language.corpus import ChunkedCorpus
from lightning_influence.language.documents import DocumentInfluenceResult
from lightning_influence.plots import layer_bar_figure, save_png
from lightning_influence.reporting import SCORE_COLUMN

__all__ = [
    "token_html",
    "token_ansi",
    "render_window",
    "tail_exponent",
    "query_rows",
    "document_rows",
    "write_document_influence",
    "log_document_influence",
]

log = logging.getLogger(__name__)


def render_window(scores: Tensor, width: int) -> tuple[int, int]:
    """``(start, end)`` of the ``width`` consecutive tokens of ``scores [T]`` that carry the most
    of the sequence's influence in its own direction (the most positive window of a proponent,
    the most negative of an opponent; the whole sequence when it is shorter)."""
    n = scores.numel()
    if n <= width:
        return 0, n
    sign = 1.0 if float(scores.sum()) >= 0 else -1.0
    csum = torch.cat([scores.new_zeros(1, dtype=torch.float64), (sign * scores.double()).cumsum(0)])
    mass = csum[width:] - csum[:-width]  # [n - width + 1]
    start = int(mass.argmax())
    return start, start + width


def token_ansi(tokens: list[str], scores: Tensor, scale: float | None = None) -> str:
    """Tokens coloured for a terminal (ANSI 256 colours): green background for a proponent
    token (+), red for an opponent (-), in four steps of ``|score| / scale`` (default: the
    largest magnitude); tokens under an eighth of it stay plain."""
    scale = float(scores.abs().max()) if scale is None else scale
    greens, reds = (22, 28, 34, 40), (52, 88, 124, 160)
    out = []
    for token, score in zip(tokens, scores.tolist(), strict=True):
        level = min(3, int(4 * abs(score) / scale)) if scale > 0 else 0
        text = token.replace("\n", "\u21b5\n")
        if scale > 0 and abs(score) >= scale / 8:
            colour = (greens if score > 0 else reds)[level]
            out.append(f"\x1b[48;5;{colour}m{text}\x1b[0m")
        else:
            out.append(text)
    return "".join(out)


def token_html(tokens: list[str], scores: Tensor, title: str = "", scale: float | None = None) -> str:
    """Tokens as HTML spans coloured by influence (green +, red -); hover shows each score.

    Args:
        tokens: the token strings.
        scores: ``[T]`` their scores.
        title: a heading above the text.
        scale: the magnitude shown fully opaque (default: the largest ``|score|``).
    """
    scores = scores.double().cpu()
    top = float(scores.abs().max()) if scale is None and scores.numel() else (scale or 0.0)
    top = top if top > 0 else 1.0
    spans = []
    for tok, s in zip(tokens, scores.tolist(), strict=True):
        alpha = min(1.0, abs(s) / top)
        rgb = "0,160,60" if s >= 0 else "220,40,40"
        spans.append(f'<span title="{s:+.4g}" style="background:rgba({rgb},{alpha:.3f})">'
                     f"{html.escape(tok)}</span>")
    head = f"<div style='font-weight:bold'>{html.escape(title)}</div>" if title else ""
    return (f"<div style='font-family:monospace;font-size:12px'>{head}"
            f"<div style='white-space:pre-wrap'>{''.join(spans)}</div></div>")


def tail_exponent(scores: Tensor, tail: float = 0.1) -> float:
    """The slope of the log-log complementary CDF of ``|scores|`` over its top ``tail`` fraction.

    A power-law tail ``P(|S| > s) ~ s^-alpha`` gives ``alpha`` (returned positive); a light tail
    gives a large value. NaN when fewer than 3 non-zero values are in the tail.
    """
    mags = scores[torch.isfinite(scores)].abs().double()
    mags = mags[mags > 0].sort(descending=True).values
    k = max(3, int(math.ceil(tail * mags.numel())))
    if mags.numel() < 3:
        return float("nan")
    top = mags[:k]
    ccdf = torch.arange(1, top.numel() + 1, dtype=torch.float64) / mags.numel()
    x, y = top.log(), ccdf.log()
    x = x - x.mean()
    slope = float((x * (y - y.mean())).sum() / (x * x).sum().clamp_min(1e-300))
    return -slope


def _title(result: DocumentInfluenceResult, d: int) -> str:
    return result.titles[d]


def query_rows(result: DocumentInfluenceResult) -> list[dict[str, Any]]:
    """One row per query: the completion's NLL, its top documents, top layer, tail exponent."""
    rows = []
    for q, query in enumerate(result.queries):
        pro = result.top_documents(q, "proponent")[0]
        opp = result.top_documents(q, "opponent")[0]
        top_layer = int(result.layer_shares[q].argmax())
        row = {"query_index": q, "prompt": query.prompt, "completion": query.completion,
               "completion_nll": float(result.query_losses[q]),
               "top_proponent": _title(result, pro[0]), "top_proponent_score": pro[1],
               "top_opponent": _title(result, opp[0]), "top_opponent_score": opp[1],
               "top_layer": result.layer_names[top_layer],
               "top_layer_share": float(result.layer_shares[q, top_layer]),
               "tail_exponent": tail_exponent(result.chunk_scores[q])}
        if result.spearman_chunks is not None:
            row["spearman_vs_full_rank"] = float(result.spearman_chunks[q])
        rows.append(row)
    return rows


def document_rows(result: DocumentInfluenceResult) -> list[dict[str, Any]]:
    """Per query, its top proponent and opponent documents with their scores."""
    rows = []
    for q in range(len(result.queries)):
        for kind in ("proponent", "opponent"):
            for rank, (d, score) in enumerate(result.top_documents(q, kind)):
                rows.append({"query_index": q, "kind": kind, "rank": rank + 1, "document": d,
                             "title": _title(result, d), SCORE_COLUMN: score})
    return rows


def _token_sections(result: DocumentInfluenceResult, corpus: ChunkedCorpus,
                    render_tokens: int) -> dict[tuple[int, int], str]:
    """HTML of every document with token-wise scores (the window holding the most influence)."""
    out = {}
    for (q, d), scores in result.token_scores.items():
        ids = corpus.tokenizer.encode(corpus.documents[d].text)
        start, end = render_window(scores, render_tokens)
        tokens = corpus.tokenizer.token_strings(ids[start:end])
        share = float(scores[start:end].sum()) / float(scores.sum()) if float(scores.sum()) else 0.0
        title = (f"{corpus.documents[d].title}: score {float(scores.sum()):+.4g} "
                 f"(tokens {start}-{end} of {len(ids)} shown, carrying {share:.0%} of it)")
        out[(q, d)] = token_html(tokens, scores[start:end], title)
    return out


def _distribution_figure(result: DocumentInfluenceResult, path: Path) -> Path:
    from matplotlib.figure import Figure

    queries = len(result.queries)
    fig = Figure(figsize=(6.5, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for q in range(queries):
        s = result.chunk_scores[q]
        mags = s[torch.isfinite(s)].abs()
        mags = mags[mags > 0].sort(descending=True).values.numpy()
        ccdf = (torch.arange(1, mags.size + 1) / max(mags.size, 1)).numpy()
        ax.loglog(mags, ccdf, lw=1, label=f"q{q}")
    ax.set_xlabel("|influence| of a training chunk")
    ax.set_ylabel("fraction of chunks with larger |influence|")
    ax.set_title("Influence magnitudes (log-log complementary CDF)", fontsize=10)
    if queries:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  ncol=1 if queries <= 24 else 2)
    return save_png(fig, path)


def _layer_figure(result: DocumentInfluenceResult, path: Path) -> Path:
    """Each layer's share of each query's top-document influence: one row per layer (the
    figure grows with the count), one bar per query, names shortened (full in the CSV)."""
    queries = len(result.queries)
    series = [f"q{q}" for q in range(queries)] if queries > 1 else None
    fig = layer_bar_figure(result.layer_names, result.layer_shares.double().numpy(),
                           "Layer-wise influence: each layer's share of the query's "
                           "top-document influence", "share", series=series)
    return save_png(fig, path)


def write_document_influence(folder: str | Path, result: DocumentInfluenceResult,
                             corpus: ChunkedCorpus, render_tokens: int = 1200,
                             extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write the results to ``folder`` (atomically) and return the paths.

    Files: ``queries.csv`` (the table over queries), ``top_documents.csv``, ``layer_influence.csv``
    (share of each layer per query), ``tfidf_recall.csv`` (when computed), ``token_influence.html``
    (each query's top documents, tokens coloured), ``influence_distribution.png`` (log-log),
    ``layer_influence.png``, ``document_scores.safetensors`` and ``summary.json``.
    """
    folder = Path(folder)
    paths: dict[str, Path] = {}
    rows = query_rows(result)
    paths["queries"] = atomic_save_csv(rows, folder / "queries.csv", list(rows[0]))
    docs = document_rows(result)
    paths["top_documents"] = atomic_save_csv(docs, folder / "top_documents.csv", list(docs[0]))
    layer_rows = [{"query_index": q, "layer": name, "share": float(result.layer_shares[q, i]),
                   "total": float(result.layer_totals[q, i])}
                  for q in range(len(result.queries)) for i, name in enumerate(result.layer_names)]
    paths["layer_influence"] = atomic_save_csv(layer_rows, folder / "layer_influence.csv",
                                               ["query_index", "layer", "share", "total"])
    if result.recall is not None:
        paths["tfidf_recall"] = atomic_save_csv(result.recall, folder / "tfidf_recall.csv",
                                                list(result.recall[0]))
    sections = _token_sections(result, corpus, render_tokens)
    page = ["<html><head><meta charset='utf-8'><title>Document influence</title></head><body>",
            "<p>Green tokens are proponents (+, helpful: they raise the completion's "
            "log-likelihood), red tokens opponents (-).</p>"]
    for q, query in enumerate(result.queries):
        page.append(f"<h2>Query {q}: {html.escape(query.prompt)}<u>{html.escape(query.completion)}"
                    f"</u></h2>")
        for kind in ("proponent", "opponent"):
            for d, _ in result.top_documents(q, kind):
                if (q, d) in sections:
                    page.append(f"<h3>{kind}</h3>{sections[(q, d)]}")
    page.append("</body></html>")
    paths["token_influence"] = atomic_write(folder / "token_influence.html", lambda tmp: Path(
        tmp).write_text("\n".join(page), encoding="utf-8", errors="backslashreplace"))
    paths["influence_distribution"] = _distribution_figure(result, folder / "influence_distribution.png")
    paths["layer_figure"] = _layer_figure(result, folder / "layer_influence.png")
    tensors = {"document_scores": result.document_scores, "chunk_scores": result.chunk_scores,
               "document_layer_scores": result.document_layer_scores,
               "layer_shares": result.layer_shares, "proponents": result.proponents,
               "opponents": result.opponents, "query_losses": result.query_losses}
    if result.full_rank_chunk_scores is not None:
        tensors["full_rank_chunk_scores"] = result.full_rank_chunk_scores
    paths["scores"] = atomic_save_safetensors(tensors, folder / "document_scores.safetensors")
    summary = {"sign": "positive = proponent (helpful), negative = opponent",
               "rank": result.rank, "query_store": result.memory, "timings": result.timings,
               "num_queries": len(result.queries), "num_documents": len(result.titles),
               "num_chunks": int(result.chunk_scores.shape[1]), "layers": result.layer_names,
               **(extra or {})}
    if result.spearman_chunks is not None:
        summary["spearman_vs_full_rank"] = {
            "chunks_mean": float(result.spearman_chunks.mean()),
            "chunks_min": float(result.spearman_chunks.min()),
            "documents_mean": float(result.spearman_documents.mean()),
            "documents_min": float(result.spearman_documents.min())}
    if result.recall is not None:
        summary["tfidf_recall"] = result.recall
    paths["summary"] = atomic_save_json(summary, folder / "summary.json")
    return paths


def log_document_influence(loggers: list[Any], result: DocumentInfluenceResult,
                           corpus: ChunkedCorpus, files: dict[str, Path] | None = None,
                           prefix: str = "lm_influence", render_tokens: int = 1200) -> list[str]:
    """Log the results to every W&B logger (tables, token-coloured HTML, plots) and scalar
    metrics to every logger. Returns the keys logged to W&B."""
    scalars = {f"{prefix}/query_store_memory_ratio": float(result.memory["ratio"])}
    if result.spearman_chunks is not None:
        scalars[f"{prefix}/spearman_vs_full_rank"] = float(result.spearman_chunks.mean())
    keys: list[str] = []
    for logger in loggers:
        logger.log_metrics(scalars)
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        payload: dict[str, Any] = {}
        rows = query_rows(result)
        payload[f"{prefix}/queries"] = wandb.Table(columns=list(rows[0]),
                                                   data=[list(r.values()) for r in rows])
        sections = _token_sections(result, corpus, render_tokens)
        table = wandb.Table(columns=["query_index", "query", "kind", "rank", "document",
                                     SCORE_COLUMN, "tokens (green +, red -)"])
        for row in document_rows(result):
            q, d = row["query_index"], row["document"]
            section = sections.get((q, d))
            table.add_data(q, result.queries[q].prompt + "|" + result.queries[q].completion,
                           row["kind"], row["rank"], row["title"], row[SCORE_COLUMN],
                           wandb.Html(section) if section is not None else None)
        payload[f"{prefix}/top_documents"] = table
        mean_share = result.layer_shares.mean(0)
        layer_table = wandb.Table(columns=["layer", "mean_share"],
                                  data=[[n, float(mean_share[i])]
                                        for i, n in enumerate(result.layer_names)])
        payload[f"{prefix}/layer_influence"] = wandb.plot.bar(
            layer_table, "layer", "mean_share", title="Layer-wise share of influence (mean over queries)")
        if files is not None:
            for key in ("influence_distribution", "layer_figure"):
                if key in files:
                    payload[f"{prefix}/{key}"] = wandb.Image(str(files[key]))
        if result.recall is not None:
            payload[f"{prefix}/tfidf_recall"] = wandb.Table(
                columns=list(result.recall[0]), data=[list(r.values()) for r in result.recall])
        logger.experiment.log(payload)
        keys.extend(payload)
    return keys
