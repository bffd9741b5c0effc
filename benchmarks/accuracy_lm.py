"""Accuracy versus compute time on a tiny language model (accuracy.py's comparison, for text).

    .venv/bin/python benchmarks/accuracy_lm.py

Protocol: the LM recipe's character GPT (recipes/lm_influence.py), made tiny so that the ground
truth is affordable on a CPU: ``--layers`` blocks of width ``--width``, context ``--context``,
trained with AdamW (float32) on the first ``--train-chunks`` chunks of the recipe's corpus (Python's help
topics and module docstrings); ``--queries`` chunks of later documents are the queries, each
measured by its summed next-token loss. Every method solves the same damped Gauss-Newton system,
the damping being EK-FAC's per-layer heuristic (0.1 x mean eigenvalue, the package default).

Methods, timed from the trained model to the ``[Q, N]`` scores: ours ``identity`` (TracIn at one
checkpoint), ``kfac``, ``ekfac``; LiSSA along one series; CG preconditioned by EK-FAC at a few
iteration counts; CG run to ``--cg-iterations`` on the full system. Kronfluence is left out here:
its language-model setup (a task class per model) has no counterpart in this protocol yet.

Ground truth: LDS on ``--subsets`` models retrained on random halves of the training chunks
(Spearman between measured and predicted query losses, mean over queries). PBRF needs an L-BFGS
solve over all chunks per training example (at most 100 iterations here) and is off by default
(``--pbrf-examples``): with the heuristic damping (about 1e-3 and less) it did not converge in
that budget (largest final gradient entry 66 on 4 chunks), so its correlations were noise. For
the same reason LiSSA (scale about 350: some 10^5 iterations would be needed) and plain CG do
not converge here either; the table shows them at the depths affordable on a CPU. The defaults
keep the whole run near 5 minutes.

Writes ``<out>/accuracy_lm.md``, ``<out>/accuracy_lm.json`` and ``<out>/accuracy_lm.png``.
"""

from __future__ import annotations

import argparse
from typing import Any

import accuracy  # the methods, table and plot
import harness
import torch
from torch.utils.data import DataLoader, Subset

import lightning_influence as li
from lightning_influence.evaluation import (
    QueryMeasure,
    SimpleTrainer,
    correlations,
    lds,
    pbrf,
    subset_measurements,
)
from lightning_influence.language import CharTokenizer, chunk_documents, python_docs
from recipes.lm_influence import CharGPT, GPTConfig

BATCH = 32


def corpus(args: argparse.Namespace):
    docs = python_docs()
    tokenizer = CharTokenizer.from_texts([d.text for d in docs])
    chunks = chunk_documents(docs, tokenizer, args.context)
    n = min(args.train_chunks, len(chunks) - args.queries)
    # queries: chunks of documents that have no chunk in the training set
    last_doc = int(chunks.chunk_document[n - 1])
    later = (chunks.chunk_document > last_doc).nonzero().flatten()
    if len(later) < args.queries:
        raise ValueError("Not enough later documents for the queries: lower --train-chunks.")
    step = len(later) // args.queries
    query_idx = later[::step][:args.queries]
    return tokenizer, Subset(chunks, range(n)), Subset(chunks, query_idx.tolist())


def main() -> None:
    p = harness.parser(__doc__, threads=2, seed=0)
    p.add_argument("--train-chunks", type=int, default=128)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--subsets", type=int, default=40)
    p.add_argument("--pbrf-examples", type=int, default=0)
    p.add_argument("--lissa-steps", default="10,30,100,300")
    p.add_argument("--pcg-steps", default="1,3,10")
    p.add_argument("--cg-iterations", type=int, default=40)
    args = p.parse_args()

    bench = harness.start(args)
    tokenizer, train_set, query_set = corpus(args)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.context,
                    n_layer=args.layers, n_head=2, n_embd=args.width)
    task = li.CausalLMTask(pad_token_id=tokenizer.pad_id)

    def make_model():
        return CharGPT(cfg)

    train_fn = SimpleTrainer(make_model, train_set, task, epochs=args.epochs, batch_size=BATCH,
                             lr=3e-3, weight_decay=0.1)
    train_seconds, model = harness.timed(lambda: train_fn(None, args.seed))
    train = DataLoader(train_set, batch_size=BATCH, shuffle=False)
    queries = DataLoader(query_set, batch_size=BATCH, shuffle=False)
    measure = QueryMeasure(queries, task)
    n = len(train_set)
    print(f"torch {torch.__version__}, {args.threads} threads, {bench.load(end=False)}; "
          f"N={n} chunks of {args.context} tokens, Q={len(query_set)},"
          f" {sum(p.numel() for p in model.parameters())} parameters, trained in "
          f"{train_seconds:.1f}s, mean query loss {float(measure(model).mean()):.1f}")

    def ours(strategy: str) -> dict[str, Any]:  # default (heuristic) damping
        return accuracy.ours(model, strategy, None, train, queries, task=task)

    ekfac = ours("ekfac")  # also the warm-up; its per-layer damping is every method's
    damping = ekfac["factors"].damping
    rows: list[dict[str, Any]] = []
    for strategy in ("identity", "kfac", "ekfac"):
        r = ours(strategy)
        rows.append({"name": f"ours {strategy}", "scores": r["scores"], "seconds": r["seconds"]})

    steps = sorted(int(s) for s in args.lissa_steps.split(","))
    rows.extend(accuracy.lissa_path(model, damping, train, queries, steps, task=task,
                                    batch_size=BATCH, dtype=torch.float64))
    print(f"LiSSA scale {rows[-1]['scale']:.3g}, {rows[-1]['seconds']:.1f}s to depth {steps[-1]}")
    # CG preconditioned by EK-FAC at the default damping (fitted in each run's time)
    rows.extend(accuracy.preconditioned_cg_path(
        model, damping, None, train, queries, sorted(int(s) for s in args.pcg_steps.split(",")),
        task=task))
    r = accuracy.conjugate_gradient(model, damping, train, queries, task=task,
                                    max_iterations=args.cg_iterations)
    state = "converged" if r["residual"] <= 1e-6 else f"{r['iterations']} it."
    rows.append({"name": f"CG ({state}, max residual {r['residual']:.0e})", **r})
    print(f"CG: {r['iterations']} iterations, max residual {r['residual']:.1e}, "
          f"{r['seconds']:.1f}s")

    subsets = subset_measurements(train_fn, measure, n, num_subsets=args.subsets, fraction=0.5,
                                  seed=args.seed + 2)
    print(f"LDS: {args.subsets} subsets retrained in {subsets.seconds:.1f}s")
    response = None
    if args.pbrf_examples:
        gen = torch.Generator().manual_seed(args.seed + 1)
        picked = torch.randperm(n, generator=gen)[:args.pbrf_examples].sort().values
        response = pbrf(model, train, queries, task, picked, damping=damping, max_iterations=100)
        print(f"PBRF: {len(picked)} chunks, {response.seconds:.1f}s, max |grad| "
              f"{max(response.grad_norms):.1e}")
    for r in rows:
        r["lds"] = lds(r["scores"], subsets).mean
        if response is not None:
            c = correlations(r["scores"][:, picked], response.changes)
            r["pbrf_pearson"], r["pbrf_spearman_q"] = c["pearson"], c["spearman_per_query"]
            r["pbrf_pearson_q"] = c["pearson_per_query"]

    header = (f"character GPT ({args.layers} blocks, width {args.width}, context "
              f"{args.context}), N={n} training chunks, Q={len(query_set)} query chunks of later "
              f"documents, float32 model (solvers and PBRF in float64), damping EK-FAC's "
              f"per-layer heuristic, LDS on {args.subsets} half-size subsets; seconds on "
              f"{args.threads} CPU threads, {bench.load()}")
    text = accuracy.table(rows, header) + "\n"
    if response is not None:
        text += (f"\nPBRF on {len(picked)} chunks: largest final gradient entry "
                 f"{max(response.grad_norms):.1e} after at most 100 L-BFGS iterations (converged "
                 "only when small).\n")
    print()
    summary = {r["name"]: {k: v for k, v in r.items() if k not in ("scores", "name")}
               for r in rows}
    bench.report("accuracy_lm", text, summary)
    accuracy.plot(rows, bench.out / "accuracy_lm.png",
                  title=f"tiny character GPT: accuracy versus compute time ({args.threads} "
                        "CPU threads)")
    print(f"written: {bench.out / 'accuracy_lm.md'}, {bench.out / 'accuracy_lm.png'}")


if __name__ == "__main__":
    main()
