"""Query batching: scoring 64 queries costs little more than scoring 1 (the training data is read once).

    .venv/bin/python benchmarks/query_batching.py                  # 1 vs 64 queries, full and rank 32
    .venv/bin/python benchmarks/query_batching.py --max-chunks 640 --threads 1

Protocol: the LM recipe's model shape (a character GPT, ``lightning_influence/conf/lm.yaml``) over
the recipe's default corpus (Python's help topics and module docstrings cut into 128-token chunks),
EK-FAC factors fitted on the first ``--factor-batches`` batches (the factors' values do not change
the cost of scoring), untrained weights unless ``--train-steps`` is given. Queries: the recipe's 8
prompt + completion pairs, then snippets of the documents (a 48-character prompt and the next 40
characters) up to ``--queries``.

For each query store (full-rank ``[Q, O, I]`` per layer, and rank ``--rank`` factors) and for 1 and
``--queries`` queries, it times building the store (query gradients, preconditioning, SVD) and the
scoring pass over the same training chunks (``compute_pairwise_scores(query_grads=store)``), each
the minimum over ``--repeats`` runs. Printed: the times, the 64-vs-1 ratio of the pass and of store
+ pass, what scoring the queries one at a time would cost (Q x the 1-query pass), and each store's
memory against full rank. Writes ``<out>/query_batching.md`` and ``<out>/query_batching.json``.
"""

from __future__ import annotations

import random

import harness
import torch
import yaml
from torch.utils.data import DataLoader, Subset

from lightning_influence import CausalLMTask, compute_pairwise_scores, fit_factors
from lightning_influence.language import (
    CharTokenizer,
    Query,
    QueryDataset,
    chunk_documents,
    python_docs,
    queries_from_config,
)
from lightning_influence.scoring import build_query_store
from recipes.lm_influence import CharGPT, GPTConfig

CONFIG = harness.ROOT / "lightning_influence" / "conf" / "lm.yaml"


def make_queries(n: int, documents, seed: int = 0) -> list[Query]:
    """The recipe's queries, then document snippets: a 48-character prompt, 40 more as completion."""
    cfg = yaml.safe_load(CONFIG.read_text())
    queries = queries_from_config(cfg["queries"])[:n]
    rng = random.Random(seed)
    while len(queries) < n:
        doc = rng.choice(documents).text
        if len(doc) < 200:
            continue
        s = rng.randrange(0, len(doc) - 100)
        queries.append(Query(doc[s:s + 48], doc[s + 48:s + 88]))
    return queries


def main() -> None:
    parser = harness.parser(__doc__, threads=1, repeats=1,
                            repeats_help="runs of each timing; the minimum is kept")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--max-chunks", type=int, default=None, help="score only the first chunks")
    parser.add_argument("--factor-batches", type=int, default=20)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    bench = harness.start(args)
    torch.manual_seed(0)

    cfg = yaml.safe_load(CONFIG.read_text())
    docs = python_docs()
    tokenizer = CharTokenizer.from_texts([d.text for d in docs])
    corpus = chunk_documents(docs, tokenizer, cfg["data"]["context"])
    m = cfg["model"]
    model = CharGPT(GPTConfig(tokenizer.vocab_size, corpus.context, m["n_layer"], m["n_head"],
                              m["n_embd"]))
    if args.train_steps:
        opt = torch.optim.AdamW(model.parameters(), lr=m["lr"])
        loader = DataLoader(corpus, batch_size=args.batch_size, shuffle=True)
        step = 0
        while step < args.train_steps:
            for batch in loader:
                ids, mask = batch["input_ids"], batch["attention_mask"]
                logits = model(ids)
                targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step >= args.train_steps:
                    break
    model.eval()
    task = CausalLMTask(pad_token_id=tokenizer.pad_id)
    chunks = corpus if args.max_chunks is None else Subset(corpus, range(min(args.max_chunks,
                                                                              len(corpus))))
    train = DataLoader(chunks, batch_size=args.batch_size, shuffle=False)
    factors = fit_factors(model, train, task, strategy="ekfac", max_batches=args.factor_batches,
                          progress=False)
    queries = make_queries(args.queries, docs)

    rows = []
    for rank in (None, args.rank):
        for q in (1, args.queries):
            qloader = DataLoader(QueryDataset(queries[:q], tokenizer, corpus.context),
                                 batch_size=args.batch_size)
            t_store, store = harness.fastest(lambda ql=qloader, r=rank: build_query_store(
                model, ql, task, factors, rank=r), args.repeats)
            t_pass, _ = harness.fastest(lambda ql=qloader, s=store: compute_pairwise_scores(
                model, factors, ql, train, task, query_grads=s, top_k=5, keep_scores=True,
                progress=False), args.repeats)
            rows.append({"store": "full" if rank is None else f"rank {rank}", "queries": q,
                         "store_s": t_store, "pass_s": t_pass,
                         "store_MiB": store.memory_bytes() / 2**20,
                         "memory_ratio": store.memory_ratio()})
            print(f"  {rows[-1]['store']:>8} {q:>4} queries: store {t_store:6.2f} s, "  # noqa: T201
                  f"pass {t_pass:6.2f} s, {rows[-1]['store_MiB']:.2f} MiB", flush=True)

    lines = ["",
             f"Training data: {len(chunks)} chunks of {corpus.context} tokens; model "
             f"{sum(p.numel() for p in model.parameters()):,} parameters; {args.threads} threads; "
             f"min of {args.repeats} run(s); {bench.load()}.", "",
             *harness.markdown_table(
                 ["store", "Q", "store s", "pass s", "MiB", "memory ratio"],
                 [[r["store"], r["queries"], f"{r['store_s']:.2f}", f"{r['pass_s']:.2f}",
                   f"{r['store_MiB']:.2f}", f"{r['memory_ratio']:.3f}"] for r in rows]), ""]
    summary = {}
    for name in ("full", f"rank {args.rank}"):
        one, many = [r for r in rows if r["store"] == name]
        pass_ratio = many["pass_s"] / one["pass_s"]
        total_ratio = (many["pass_s"] + many["store_s"]) / (one["pass_s"] + one["store_s"])
        serial = args.queries * (one["pass_s"] + one["store_s"])
        summary[name] = {"pass_ratio": pass_ratio, "total_ratio": total_ratio,
                         "one_at_a_time_s": serial}
        lines.append(f"- {name}: {args.queries} queries vs 1, scoring pass x{pass_ratio:.2f}, store + "
                     f"pass x{total_ratio:.2f} (one query at a time: {serial:.0f} s, "
                     f"x{args.queries:.0f})")
    bench.report("query_batching", "\n".join(lines) + "\n",
                 {"args": vars(args), "rows": rows, "summary": summary, "chunks": len(chunks)})


if __name__ == "__main__":
    main()
