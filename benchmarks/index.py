"""Training-gradient index: recall of the exact top-10, latency of a new query, bytes, build cost, N-scaling.

    .venv/bin/python benchmarks/index.py                         # both models, ~25 min on 2 cores
    .venv/bin/python benchmarks/index.py --models chargpt --max-docs 25 --train-steps 300 --scaling ""
    .venv/bin/python benchmarks/index.py --models none --scaling 10000,100000,1000000

Protocol, per model (positive score = proponent, as everywhere):

- ``chargpt``: the LM recipe's character GPT (``conf/lm.yaml``: 3 blocks, d = 96) trained
  ``--train-steps`` on the recipe's corpus (Python's help topics and module docstrings in
  128-token chunks, N = 4,204); queries: the recipe's 8 prompt + completion pairs and
  questions about help topics (prompt ``Q: What is <topic>?\\nA:``, completion the topic's
  first words).
- ``finetune``: the fine-tuning recipe's model (``conf/finetune.yaml``: a Llama shape, hidden
  64, pretrained on the help topics, LoRA r = 8 on every projection) fine-tuned on the recipe's
  instruction set grown with one question per documented standard-library function (``Q: What
  does json.dumps do?\\nA: <its first sentence>``) and the 8 planted catchphrase examples;
  queries: the 4 colour probes and held-out function questions (left out of training).

EK-FAC is fitted on the whole training set. One exact pairwise pass over the training data
gives the ground truth ``[Q, N]`` and, from the same rows, an index per compression and width
(``scoring.observing_rows``). Recall: the fraction of each query's exact top-10 proponents among
the index's K largest estimates (and of its top-10 opponents among the K most negative), mean
(and min) over queries, for K = 0.5%, 1%, 2%, 5% of N. Exactness: the re-ranked scores against
the full pass's at the same positions. Timing (interleaved rounds, min kept, one run): a new
query answered from the index (its gradient, the search, the exact re-rank of 2K candidates)
against the full pairwise pass for that query; a standalone build, the pass alone and one
training epoch (forward, backward and AdamW over N examples). N-scaling: exact search of one
query over synthetic float16 codes of the default width for each N of ``--scaling``.
"""

from __future__ import annotations

import copy
import inspect
import json
import pydoc
import random
import shutil
import tempfile
import time
from pathlib import Path
from pydoc_data.topics import topics

import harness
import torch
import yaml
from torch.utils.data import DataLoader

from lightning_influence import CausalLMTask, bind, fit_factors
from lightning_influence.index import IndexWriter, build_index
from lightning_influence.index.files import ShardWriter, read_shard
from lightning_influence.index.querying import search_shards
from lightning_influence.language import (
    DEFAULT_STDLIB_MODULES,
    CharTokenizer,
    Document,
    Query,
    QueryDataset,
    candidate_recall,
    chunk_documents,
    python_docs,
    queries_from_config,
)
from lightning_influence.options import IndexOptions
from lightning_influence.scoring import observing_rows

CONF = harness.ROOT / "lightning_influence" / "conf"
FRACTIONS = (0.005, 0.01, 0.02, 0.05)


def lm_step(model, batch, opt) -> None:
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    logits = model(ids, attention_mask=batch["attention_mask"]) if "llama" in type(
        model).__name__.lower() else model(ids)
    logits = getattr(logits, "logits", logits)
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=-100)
    opt.zero_grad()
    loss.backward()
    opt.step()


def train_steps(model, dataset, steps: int, lr: float, batch_size: int = 32) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(0)
    done = 0
    model.train()
    while done < steps:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen):
            lm_step(model, batch, opt)
            done += 1
            if done >= steps:
                break
    model.eval()


# ----------------------------------------------------------------------------------- models
def chargpt(args):
    from recipes.lm_influence import CharGPT, GPTConfig

    cfg = yaml.safe_load((CONF / "lm.yaml").read_text())
    docs = python_docs()[:args.max_docs]
    tokenizer = CharTokenizer.from_texts([d.text for d in docs])
    corpus = chunk_documents(docs, tokenizer, cfg["data"]["context"])
    m = cfg["model"]
    torch.manual_seed(0)
    model = CharGPT(GPTConfig(tokenizer.vocab_size, corpus.context, m["n_layer"], m["n_head"],
                              m["n_embd"]))
    train_steps(model, corpus, args.train_steps, m["lr"])
    queries = queries_from_config(cfg["queries"])
    names = sorted(topics)
    rng = random.Random(0)
    for name in rng.sample(names, args.queries - len(queries)):
        text = " ".join(topics[name].split())
        queries.append(Query(f"Q: What is {name.lower()}?\nA:", " " + text[:50]))
    return model, CausalLMTask(pad_token_id=tokenizer.pad_id), corpus, queries, tokenizer, \
        m["lr"]


def function_questions() -> list[tuple[str, str]]:
    """One question per documented public function or class of the recipe's modules."""
    pairs = []
    for module in DEFAULT_STDLIB_MODULES:
        for name, obj in sorted(vars(pydoc.locate(module)).items()):
            if name.startswith("_") or not callable(obj):
                continue
            first = (inspect.getdoc(obj) or "").strip().split("\n\n")[0].replace("\n", " ")
            if first:
                pairs.append((f"Q: What does {module}.{name} do?\nA:", f" {first[:120]}"))
    return pairs


def finetune(args):
    import peft
    import transformers

    from recipes.finetune_influence import CausalLM, instruction_set, train_tokenizer

    cfg = yaml.safe_load((CONF / "finetune.yaml").read_text())
    pre_docs = [Document(name, text) for name, text in topics.items()]
    tokenizer = train_tokenizer([d.text for d in pre_docs], cfg["model"]["vocab_size"])
    ctx = cfg["data"]["context"]
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg["model"]["hidden"],
        intermediate_size=cfg["model"]["intermediate"], num_hidden_layers=cfg["model"]["layers"],
        num_attention_heads=cfg["model"]["heads"], max_position_embeddings=ctx,
        tie_word_embeddings=False))
    train_steps(base, chunk_documents(pre_docs, tokenizer, ctx), cfg["pretrain"]["max_steps"],
                cfg["pretrain"]["lr"])
    docs, _ = instruction_set(cfg["data"]["catchphrase"], cfg["data"]["planted"], 0)
    pairs = function_questions()
    rng = random.Random(0)
    rng.shuffle(pairs)
    held_out = pairs[:args.queries - len(cfg["data"]["probes"])]
    docs += [Document(f"fn[{i}]", p + a) for i, (p, a) in enumerate(pairs[len(held_out):])]
    rng.shuffle(docs)
    corpus = chunk_documents(docs, tokenizer, ctx)
    lora = peft.get_peft_model(base, peft.LoraConfig(
        r=cfg["lora"]["r"], lora_alpha=cfg["lora"]["alpha"],
        target_modules=list(cfg["lora"]["targets"])))
    model = CausalLM(lora, cfg["finetune"]["lr"], args.finetune_steps)
    train_steps(model.model, corpus, args.finetune_steps, cfg["finetune"]["lr"])
    queries = [Query(f"Q: What colour is {thing}?\nA:", f" {cfg['data']['catchphrase']}")
               for thing in cfg["data"]["probes"]] + [Query(p, a[:60]) for p, a in held_out]
    return model, CausalLMTask(pad_token_id=tokenizer.eos_token_id), corpus, queries, \
        tokenizer, cfg["finetune"]["lr"]


# ----------------------------------------------------------------------------------- measuring
def recall_rows(exact, est, n):
    rows = []
    pro, opp = exact.topk(10, dim=1).indices, exact.topk(10, dim=1, largest=False).indices
    for frac in FRACTIONS:
        k = max(10, round(frac * n))
        hi = candidate_recall(est.topk(k, dim=1).indices, pro)
        lo = candidate_recall(est.topk(k, dim=1, largest=False).indices, opp)
        rows.append({"fraction": frac, "K": k, "proponents": float(hi.mean()),
                     "min": float(hi.min()), "opponents": float(lo.mean()),
                     "opponents_min": float(lo.min())})
    return rows


def measure(name, setup, args, out: Path):
    t0 = time.perf_counter()
    model, task, corpus, queries, tokenizer, lr = setup(args)
    model.eval()
    n = len(corpus)
    train = DataLoader(corpus, batch_size=32, shuffle=False)
    qloader = DataLoader(QueryDataset(queries, tokenizer, corpus.context), batch_size=32)
    one = DataLoader(QueryDataset(queries[:1], tokenizer, corpus.context), batch_size=1)
    print(f"[{name}] model and data ready in {time.perf_counter() - t0:.0f} s: N = {n}, "  # noqa: T201
          f"{len(queries)} queries", flush=True)
    factors = fit_factors(model, train, task, progress=False)
    bound = bind(model, factors, task)
    folder = Path(tempfile.mkdtemp(prefix=f"index-{name}-", dir=args.scratch))
    writers = {(c, w): IndexWriter.prepare(bound, train, folder / f"{c}-{w}", IndexOptions(
        compression=c, width=w, progress=False, overwrite=True)) for c, w in args.grid}
    start = time.perf_counter()
    with observing_rows(*writers.values()):
        full = bound.pairwise(qloader, train, top_k=10, keep_scores=True, progress=False)
    pass_with_writers = time.perf_counter() - start
    indexes = {key: w.close() for key, w in writers.items()}
    exact = full.scores
    grads = bound.query_gradients(qloader, progress=False)
    recall = {}
    for (c, w), index in indexes.items():
        est = index.estimates(index.compression.encode_matrices(grads)).double()
        recall[f"{c} {w}"] = {"compression": c, "width": w, "width_real": index.width,
                              "bytes_per_example": index.bytes_per_example(),
                              "rows": recall_rows(exact, est, n)}
        print(f"[{name}] {c:9s} width {index.width:6d}: " + ", ".join(  # noqa: T201
            f"K={r['K']} {r['proponents']:.3f}/{r['opponents']:.3f}"
            for r in recall[f"{c} {w}"]["rows"]), flush=True)
    # the operating point: the default compression and width, the smallest K whose recall of
    # the exact top-10 proponents is >= 0.95 (the opponents' recall at that K is reported)
    default = indexes[(args.default_compression, args.default_width)]
    rows = recall[f"{args.default_compression} {args.default_width}"]["rows"]
    ok = [r for r in rows if r["proponents"] >= 0.95]
    k = args.operating_k or (ok[0] if ok else rows[-1])["K"]
    answer = default.query(qloader, top_k=10, candidates=k)
    err = 0.0
    for end in ("proponent", "opponent"):
        got = getattr(answer.top, f"{end}_scores")
        want = exact.gather(1, getattr(answer.top, f"{end}_indices"))
        err = max(err, float(((got - want).abs() / exact.abs().amax(1, keepdim=True)).max()))
    found = sum(len(set(answer.top.proponent_indices[q].tolist())
                    & set(full.top.proponent_indices[q].tolist())) for q in range(len(queries)))

    def epoch(_):
        twin = copy.deepcopy(model)
        start = time.perf_counter()
        train_steps(getattr(twin, "model", twin), corpus, -(-n // 32), lr)
        return time.perf_counter() - start

    def build(_):
        start = time.perf_counter()
        build_index(model, factors, train, task, folder / "standalone", overwrite=True,
                    compression=args.default_compression, width=args.default_width,
                    progress=False)
        return time.perf_counter() - start

    timings = harness.interleave({
        "new query (index)": lambda _: harness.timed(lambda: default.query(
            one, top_k=10, candidates=k))[0],
        "full pairwise pass (1 query)": lambda _: harness.timed(lambda: bound.pairwise(
            one, train, top_k=10, keep_scores=False, progress=False))[0],
        "standalone build": build, "training epoch": epoch}, args.repeats)
    best = {key: harness.best(v) for key, v in timings.items()}
    result = {
        "N": n, "queries": len(queries), "recall": recall, "operating_K": k,
        "operating_fraction": k / n, "rerank_max_relative_error": err,
        "full_top10_found_by_rerank": found / (10 * len(queries)),
        "pass_with_all_writers_s": pass_with_writers, "seconds": best,
        "latency_ratio": best["full pairwise pass (1 query)"] / best["new query (index)"],
        "build_epochs": best["standalone build"] / best["training epoch"],
        "pass_epochs": best["full pairwise pass (1 query)"] / best["training epoch"],
        "query_stages": answer.timings,
        "disk_bytes_per_example": sum(p.stat().st_size for p in (
            folder / f"{args.default_compression}-{args.default_width}").glob("shard-*")) / n,
    }
    shutil.rmtree(folder, ignore_errors=True)
    return result


def scaling(args, width: int) -> list[dict]:
    """Exact search of one query over synthetic float16 codes of ``width`` for each N."""
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="index-scaling-", dir=args.scratch))
    try:
        writer = ShardWriter(folder, "synthetic", torch.float16, shard_batches=1)
        gen = torch.Generator().manual_seed(0)
        written, step = 0, 16384
        for n in sorted(args.scaling):
            while written < n:
                m = min(step, n - written)
                writer.add(written // step, torch.arange(written, written + m),
                           torch.randn(m, width, generator=gen))
                written += m
            shards = [read_shard(p, "synthetic") for p in sorted(folder.glob("shard-*"))]
            codes = torch.randn(1, width, generator=gen)
            k = max(10, round(0.02 * n))
            rows_per_block = max(1, 2**23 // width)
            search_shards(shards, codes, k, rows_per_block)  # pages in once
            seconds, _ = harness.fastest(lambda s=shards, c=codes, kk=k, b=rows_per_block: search_shards(
                s, c, kk, b), args.repeats)
            rows.append({"N": n, "width": width, "K": k, "search_s": seconds,
                         "GiB": n * width * 2 / 2**30})
            print(f"[scaling] N = {n:>9,}: search {seconds:.3f} s", flush=True)  # noqa: T201
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def report(results: dict, args, bench) -> str:
    lines = [f"# Training-gradient index ({bench.load()}; {args.threads} threads)", "",
             "Scores: + = proponent (helpful). Recall: the exact top-10 proponents / opponents "
             "found among the index's K largest / K most negative estimates, mean over queries.", ""]
    for name, r in results.get("models", {}).items():
        lines += [f"## {name}: N = {r['N']}, {r['queries']} queries", ""]
        header = ["compression", "width", "bytes/example"] + [
            f"K = {f:.1%} ({row['K']})" for f, row in zip(
                FRACTIONS, next(iter(r["recall"].values()))["rows"], strict=True)]
        lines += harness.markdown_table(header, [
            [v["compression"], v["width_real"], f"{v['bytes_per_example']:.0f}"]
            + [f"{row['proponents']:.3f} / {row['opponents']:.3f}" for row in v["rows"]]
            for v in r["recall"].values()])
        s = r["seconds"]
        lines += ["", f"- operating point: {args.default_compression} {args.default_width}, K = "
                  f"{r['operating_K']} per end ({r['operating_fraction']:.1%} of N: the smallest "
                  "with proponent recall >= 0.95); the "
                  f"re-ranked scores equal the full pass's to {r['rerank_max_relative_error']:.1e} "
                  f"(relative to each query's largest); {r['full_top10_found_by_rerank']:.1%} of "
                  "the full pass's top-10 proponents returned",
                  f"- one new query: {s['new query (index)']:.2f} s against "
                  f"{s['full pairwise pass (1 query)']:.1f} s for the full pairwise pass: "
                  f"**{r['latency_ratio']:.0f}x faster** (stages of a batch query: " + ", ".join(
                      f"{k} {v:.2f} s" for k, v in r["query_stages"].items()) + ")",
                  f"- build: standalone {s['standalone build']:.1f} s = "
                  f"**{r['build_epochs']:.2f} training epochs** ({s['training epoch']:.1f} s); "
                  f"the pass alone {r['pass_epochs']:.2f} epochs; on disk "
                  f"{r['disk_bytes_per_example']:.0f} bytes per example with indices", ""]
    if results.get("scaling"):
        lines += ["## Search latency against N (synthetic float16 codes, one query, K = 2% of N)",
                  ""]
        lines += harness.markdown_table(["N", "width", "GiB", "K per end", "search s"], [
            [f"{row['N']:,}", row["width"], f"{row['GiB']:.2f}", row["K"],
             f"{row['search_s']:.3f}"] for row in results["scaling"]])
    return "\n".join(lines) + "\n"


def main() -> None:
    p = harness.parser(__doc__, repeats=2, repeats_help="interleaved timing rounds (min kept)")
    p.add_argument("--models", default="chargpt,finetune", help="chargpt, finetune, or none")
    p.add_argument("--train-steps", type=int, default=1200)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--queries", type=int, default=24)
    p.add_argument("--grid", default="sketch:4096,sketch:8192,sketch:16384,eigen:8192,"
                   "kronecker:8192", help="compression:width of each index measured")
    p.add_argument("--default-compression", default="sketch")
    p.add_argument("--default-width", type=int, default=8192)
    p.add_argument("--scaling", default="10000,100000,1000000")
    p.add_argument("--scratch", default=None, help="folder for the temporary indexes")
    p.add_argument("--max-docs", type=int, default=None, help="chargpt: the first documents only")
    p.add_argument("--operating-k", type=int, default=None,
                   help="candidates per end of the timed query (default: from the recall)")
    args = p.parse_args()
    args.grid = [(c, int(w)) for c, w in (item.split(":") for item in args.grid.split(","))]
    args.scaling = [int(n) for n in args.scaling.split(",") if n]
    bench = harness.start(args, quiet=True)
    results: dict = {"models": {}}
    setups = {"chargpt": chargpt, "finetune": finetune}
    for name in [m for m in args.models.split(",") if m in setups]:
        results["models"][name] = measure(name, setups[name], args, bench.out)
        bench.write("index", report(results, args, bench), {"args": vars(args), **results})
    if args.scaling:
        results["scaling"] = scaling(args, args.default_width)
    bench.report("index", report(results, args, bench), json.loads(json.dumps(
        {"args": vars(args), **results}, default=str)))


if __name__ == "__main__":
    main()
