"""Recipe: which training documents drive a language model's completion.

A small character-level GPT (nanoGPT-shaped: token and position embeddings, pre-norm blocks whose
attention and MLP projections are ``nn.Linear``) is trained from scratch on Python's own
documentation: the help topics of ``pydoc_data.topics`` and the docstrings of some standard-library
modules, each a document, all offline in every CPython. Documents longer than the context are cut
into chunks; each chunk is a training example. The lightning-influence callbacks, attached through
the Hydra config, fit EK-FAC when training ends; ``DocumentInfluence`` then scores the configured
prompt + completion queries against every document in one streaming pass (rank-32 query
gradients), and logs to W&B (offline by default) and to files: each query's top proponent and
opponent documents with their tokens coloured by influence, layer-wise influence, the log-log
distribution of influence magnitudes, the TF-IDF prefilter's recall and a table over queries.

    python -m recipes.lm_influence
    python -m recipes.lm_influence 'data.files=[notes/*.txt]' trainer.max_steps=2000
    python -m recipes.lm_influence data.hf_dataset=wikitext data.hf_config=wikitext-2-raw-v1

The ``InfluenceIndex`` callback builds a training-gradient index from the rows of
``DocumentInfluence``'s pass, and the recall table shows its recall beside TF-IDF's. A finished
run then answers new prompts from that index, without a pass over the corpus (query mode):

    python -m recipes.lm_influence mode=query ask.run_dir=outputs/<date>/<time> \
        'ask.prompt="Q: What does the yield statement do?\nA:"'
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_influence
from lightning_influence.callbacks import DocumentInfluence
from lightning_influence.io import atomic_save_json, atomic_save_safetensors
from lightning_influence.language import (
    CharTokenizer,
    ChunkedCorpus,
    Document,
    Query,
    chunk_documents,
    document_influence,
    hf_documents,
    python_docs,
    read_text_files,
)
from lightning_influence.language.reporting import (
    render_window,
    token_ansi,
    write_document_influence,
)
from lightning_influence.options import DocumentOptions
from recipes._common import recipe_loggers, start_run

log = logging.getLogger(__name__)
CONF_DIR = str(Path(lightning_influence.__file__).parent / "conf")


# ----------------------------------------------------------------------------------- model
@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 96


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)  # [N, T, D] each
        q, k, v = (z.view(n, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [N, H, T, D/H]
        return self.c_proj(y.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharGPT(pl.LightningModule):
    """A GPT over characters; ``forward(input_ids [N, T]) -> logits [N, T, V]``.

    Trained on the mean next-token cross-entropy over real (non-padding) tokens with AdamW,
    linear warm-up and cosine decay.
    """

    def __init__(self, cfg: GPTConfig, lr: float = 3e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 50, max_steps: int = 1000) -> None:
        super().__init__()
        self.cfg = cfg
        self.lr, self.weight_decay = lr, weight_decay
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.influence_task = lightning_influence.CausalLMTask(pad_token_id=0)

    def forward(self, input_ids: Tensor) -> Tensor:
        t = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(t, device=input_ids.device))  # [N, T, D]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # [N, T, V]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self(ids)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-100)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=self.lr, betas=(0.9, 0.99))

        def schedule(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------- data
class TextData(pl.LightningDataModule):
    """The chunked corpus; shuffled for training (the callbacks read it in order)."""

    def __init__(self, corpus: ChunkedCorpus, batch_size: int = 32) -> None:
        super().__init__()
        self.corpus = corpus
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.corpus, batch_size=self.batch_size, shuffle=True, drop_last=True)


def load_documents(data: DictConfig) -> list[Document]:
    """The corpus the config names: ``data.files``, ``data.hf_dataset`` or Python's docs."""
    if data.get("files"):
        docs = read_text_files(list(data.files))
    elif data.get("hf_dataset"):
        docs = hf_documents(data.hf_dataset, split=data.hf_split, text_field=data.hf_text_field,
                            title_field=data.hf_title_field, config=data.hf_config,
                            max_documents=data.max_documents)
    else:
        modules = data.stdlib_modules if data.stdlib_modules is not None else \
            lightning_influence.language.DEFAULT_STDLIB_MODULES
        docs = python_docs(topics=data.pydoc_topics, modules=list(modules))
    if data.get("max_documents"):
        docs = docs[: int(data.max_documents)]
    if not docs:
        raise ValueError("The corpus is empty: no document with text.")
    return docs


# ----------------------------------------------------------------------------------- run
def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, attribute, report. Returns the figures (also in ``<output_dir>/lm_report.json``)."""
    start = time.perf_counter()
    out = start_run(cfg)
    docs = load_documents(cfg.data)
    tokenizer = CharTokenizer.from_texts([d.text for d in docs])
    corpus = chunk_documents(docs, tokenizer, cfg.data.context)
    atomic_save_json(tokenizer.state_dict(), out / "tokenizer.json")
    log.info("corpus: %d documents, %d characters, %d chunks of %d tokens, vocabulary %d",
             len(docs), sum(len(d.text) for d in docs), len(corpus), corpus.context,
             tokenizer.vocab_size)
    data = TextData(corpus, cfg.data.batch_size)
    gpt = GPTConfig(tokenizer.vocab_size, cfg.data.context, cfg.model.n_layer, cfg.model.n_head,
                    cfg.model.n_embd)
    model = CharGPT(gpt, cfg.model.lr, cfg.model.weight_decay, cfg.model.warmup_steps,
                    cfg.trainer.max_steps)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = recipe_loggers(cfg, out)
    trainer = pl.Trainer(**cfg.trainer, default_root_dir=str(out), callbacks=callbacks,
                         logger=loggers or False)
    train_start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    atomic_save_safetensors(model.state_dict(), out / "model.safetensors")  # for query mode
    doc_cb = next(c for c in callbacks if isinstance(c, DocumentInfluence))
    result = doc_cb.result
    wall = time.perf_counter() - start
    figures: dict[str, Any] = {
        "documents": corpus.num_documents, "chunks": len(corpus),
        "characters": sum(len(d.text) for d in docs), "parameters": sum(
            p.numel() for p in model.parameters()),
        "train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "query_rank": result.rank, "query_store": result.memory,
        "tfidf_recall": result.recall, "timings": result.timings,
        "wall_time_s": wall, "fit_and_influence_s": time.perf_counter() - train_start,
        "files": doc_cb.files,
    }
    if result.spearman_chunks is not None:
        figures["spearman_vs_full_rank"] = {
            "chunks": [float(v) for v in result.spearman_chunks],
            "documents": [float(v) for v in result.spearman_documents]}
    atomic_save_json(figures, out / "lm_report.json")
    _print_report(figures, result)
    for logger in loggers:
        logger.experiment.summary["lm_influence/wall_time_s"] = wall
        logger.experiment.finish()
    return figures


def _print_report(figures: dict[str, Any], result: Any) -> None:
    mem = figures["query_store"]
    lines = [
        "",
        f"Corpus: {figures['documents']} documents, {figures['characters']:,} characters, "
        f"{figures['chunks']} chunks; model {figures['parameters']:,} parameters, final training "
        f"loss {figures['train_loss']:.3f} nats/char.",
        "Top documents per query (score: + = proponent/helpful, - = opponent; removing a document "
        f"raises the completion's NLL by about score / {figures['chunks']}, the number of chunks):",
    ]
    for q, query in enumerate(result.queries):
        lines.append(f"  q{q} {query.prompt!r} -> {query.completion!r} "
                     f"(NLL {float(result.query_losses[q]):.1f} nats)")
        pro = ", ".join(f"{result.titles[d]} ({s:+.3g})" for d, s in result.top_documents(q)[:3])
        opp = ", ".join(f"{result.titles[d]} ({s:+.3g})"
                        for d, s in result.top_documents(q, "opponent")[:2])
        top_layer = int(result.layer_shares[q].argmax())
        lines.append(f"      + {pro}")
        lines.append(f"      - {opp}")
        lines.append(f"      layer with the largest share: {result.layer_names[top_layer]} "
                     f"({float(result.layer_shares[q, top_layer]):.0%})")
    ratio = mem["ratio"]
    lines.append(f"Query store (rank {figures['query_rank']}): {mem['bytes'] / 2**20:.2f} MiB vs "
                 f"{mem['full_rank_bytes'] / 2**20:.2f} MiB at full rank: memory ratio {ratio:.3f} "
                 f"({1 / ratio:.1f}x smaller)")
    if "spearman_vs_full_rank" in figures:
        sp = figures["spearman_vs_full_rank"]
        lines.append(f"Rank-{figures['query_rank']} vs full-rank scores, Spearman over chunks: mean "
                     f"{sum(sp['chunks']) / len(sp['chunks']):.3f}, min {min(sp['chunks']):.3f}; "
                     f"over documents: mean {sum(sp['documents']) / len(sp['documents']):.3f}, min "
                     f"{min(sp['documents']):.3f}")
    if figures["tfidf_recall"]:
        with_index = "index_recall" in figures["tfidf_recall"][0]
        lines.append("TF-IDF prefilter: recall of the exact top-k proponent documents among the K "
                     "most TF-IDF-similar documents" + (
                         "; index prefilter: among the K largest index estimates (and of the "
                         "top-k opponents among the K most negative)" if with_index else ""))
        lines.append(f"  {'K':>5} {'K/D':>7} {'recall':>8} {'min':>6} {'random':>8}" + (
            f" {'index':>8} {'min':>6} {'opponents':>10}" if with_index else ""))
        for row in figures["tfidf_recall"]:
            lines.append(f"  {row['K']:>5} {row['fraction']:>7.1%} {row['recall']:>8.1%} "
                         f"{row['min_recall']:>6.0%} {row['random_recall']:>8.1%}" + (
                             f" {row['index_recall']:>8.1%} {row['index_min_recall']:>6.0%} "
                             f"{row['index_opponent_recall']:>10.1%}" if with_index else ""))
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in figures["timings"].items())
    lines.append(f"Influence stages: {timings}")
    lines.append(f"Wall time, end to end: {figures['wall_time_s']:.0f} s")
    lines.append(f"Files: {figures['files'].get('summary', '')}")
    print("\n".join(lines))  # noqa: T201 - the recipe's report is its output


# ----------------------------------------------------------------------------------- query mode
def complete(model: CharGPT, tokenizer: CharTokenizer, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy completion of ``prompt``, up to the end of the line (at least one
    character: the measurement needs a completion)."""
    ids = tokenizer.encode(prompt)
    newline = tokenizer.encode("\n")
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            context = torch.tensor([ids[-model.cfg.block_size:]])
            logits = model(context)[0, -1]
            if not out and newline:
                logits[newline[0]] = float("-inf")
            nxt = int(logits.argmax())
            text = tokenizer.decode([nxt])
            if text == "\n":
                break
            ids.append(nxt)
            out.append(text)
    return "".join(out)


def ask(cfg: DictConfig) -> dict[str, Any]:
    """Query mode: a finished run's model, factors and index answer ``cfg.ask.prompt`` (its
    completion given, or the model's own) without a pass over the corpus: the index's
    candidates are scored exactly and the top documents shown with their tokens coloured."""
    import json

    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    start = time.perf_counter()
    out = start_run(cfg)
    if not cfg.ask.run_dir:
        raise ValueError("mode=query needs ask.run_dir=<the folder of a finished run> (it holds "
                         "model.safetensors, tokenizer.json and influence/index).")
    run_dir = Path(cfg.ask.run_dir)
    trained = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    tokenizer = CharTokenizer.from_state_dict(json.loads((run_dir / "tokenizer.json").read_text()))
    corpus = chunk_documents(load_documents(trained.data), tokenizer, trained.data.context)
    m = trained.model
    model = CharGPT(GPTConfig(tokenizer.vocab_size, trained.data.context, m.n_layer, m.n_head,
                              m.n_embd))
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    model.eval()
    factors = lightning_influence.Factors.load(run_dir / "influence")
    completion = cfg.ask.completion or complete(model, tokenizer, cfg.ask.prompt,
                                                cfg.ask.max_new_tokens)
    query = Query(cfg.ask.prompt, completion)
    result = document_influence(model, factors, corpus, [query], model.influence_task,
                                DocumentOptions(
        rank=None, top_k=cfg.ask.top_k, candidates=cfg.ask.candidates, prefilter="index",
        index=str(run_dir / "influence" / "index"), token_documents=1,
        batch_size=trained.data.batch_size, progress=False))
    seconds = time.perf_counter() - start
    paths = write_document_influence(out / "answer", result, corpus, 1200)
    lines = [f"{query.prompt!r} -> {query.completion!r} (NLL {float(result.query_losses[0]):.1f} "
             f"nats)", f"Answered in {seconds:.1f} s from the index of {len(corpus)} chunks: "
             f"{len(result.candidates[0].unique())} candidate documents scored exactly (scores: "
             "+ = proponent/helpful, - = opponent).", "Proponents:"]
    lines += [f"  {corpus.titles[d]} ({s:+.3g})" for d, s in result.top_documents(0)]
    lines.append("Opponents:")
    lines += [f"  {corpus.titles[d]} ({s:+.3g})" for d, s in result.top_documents(0, "opponent")]
    top = int(result.proponents[0, 0])
    scores = result.token_scores[(0, top)]
    ids = torch.cat([corpus.input_ids[int(c)][corpus.attention_mask[int(c)]]
                     for c in corpus.document_chunks(top)])
    a, b = render_window(scores, cfg.ask.show_tokens)
    lines += [f"Top proponent {corpus.titles[top]!r}, tokens coloured by influence (green + / "
              "red -):", token_ansi(tokenizer.token_strings(ids[a:b].tolist()), scores[a:b]),
              f"Token-coloured HTML: {paths['token_influence']}"]
    print("\n".join(lines))  # noqa: T201 - the recipe's report is its output
    figures = {"prompt": query.prompt, "completion": query.completion, "seconds": seconds,
               "proponents": [[corpus.titles[d], s] for d, s in result.top_documents(0)],
               "opponents": [[corpus.titles[d], s] for d, s in result.top_documents(0, "opponent")],
               "files": {k: str(v) for k, v in paths.items()}}
    atomic_save_json(figures, out / "answer.json")
    return figures


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="lm")
def main(cfg: DictConfig) -> None:
    if cfg.get("mode", "train") == "query":
        ask(cfg)
    else:
        run(cfg)


if __name__ == "__main__":
    main()
