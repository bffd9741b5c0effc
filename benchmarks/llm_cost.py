"""What influence costs on a Hugging Face language model, as a multiple of training it.

    .venv/bin/python benchmarks/llm_cost.py                       # both sizes, ~2k chunks each
    benchmarks/.venv-kronfluence/bin/python benchmarks/llm_cost.py  # + Kronfluence as the peer

Protocol: Llama-shaped models built from ``transformers`` configs (random init; the cost does not
depend on the weights) at two sizes, ``--chunks`` training chunks of ``--length`` tokens (random
tokens from a ``--vocab`` vocabulary), batch ``--batch-size``, float32, ``--threads`` CPU threads.
In one run, per size:

- one plain training epoch over the chunks (forward, backward, AdamW step) of a fresh copy of the
  model: the unit;
- fitting EK-FAC (covariance pass, eigendecompositions, eigenvalue pass), pairwise scores of
  ``--queries`` queries against every chunk, and self-influence of every chunk;
- the same scores from one pass (``compute_pairwise_scores(..., self_influence=True)``, as the
  ``InfluenceScores`` callback does), in float32 and with ``row_dtype="bfloat16"`` (fit and
  scoring products in bfloat16);
- Kronfluence's EK-FAC fit, pairwise and self-influence on the same model and data, with the
  same per-layer heuristic damping (``--kronfluence-rounds`` rounds, where it is importable);
- the peak resident memory of each stage (process RSS high-water mark sampled on a thread), and
  the library's own estimate (``lightning_influence.memory``) plus the model's size.

The method needs about four passes over the data (covariances, eigenvalues, pairwise,
self-influence), each a forward and a backward: about four epochs is the floor to compare with.
Each time is the minimum over ``--repeats`` rounds (the same run varies by tens of percent on
a shared machine). Writes ``<out>/llm_cost.md`` and ``<out>/llm_cost.json``.
"""

from __future__ import annotations

import argparse

import harness
import torch
from torch.utils.data import DataLoader

import lightning_influence as li
from lightning_influence.memory import estimate_bytes

kronfluence_side = harness.optional_peer()  # the peer, only in the Kronfluence venv

SIZES = {"small": dict(hidden=64, layers=2, heads=4, intermediate=128),
         "large": dict(hidden=256, layers=4, heads=8, intermediate=512)}


def make_model(size: str, vocab: int, length: int) -> torch.nn.Module:
    import transformers

    s = SIZES[size]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=s["hidden"],
                                      num_hidden_layers=s["layers"],
                                      num_attention_heads=s["heads"],
                                      intermediate_size=s["intermediate"],
                                      max_position_embeddings=length, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def chunks(n: int, length: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones(length, dtype=torch.long)} for i in ids]


def train_epoch(model: torch.nn.Module, loader: DataLoader) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    task = li.CausalLMTask()
    model.train()
    clock = harness.Stopwatch()
    for batch in loader:
        opt.zero_grad(set_to_none=True)
        loss = task.loss(task.forward(model, batch), batch).mean()
        loss.backward()
        opt.step()
    model.eval()
    return clock.lap()


def measure(size: str, args: argparse.Namespace) -> dict[str, float]:
    """The minimum over ``--repeats`` interleaved rounds of each time (a shared machine's times
    vary by tens of percent from run to run); peaks are the largest seen."""
    rounds = [measure_once(size, args, with_peer=i < args.kronfluence_rounds)
              for i in range(args.repeats)]
    row = harness.best_per_key(rounds, keep_max=lambda key: "peak" in key)
    row["total_s"] = row["fit_s"] + row["pairwise_s"] + row["self_s"]
    row["total_over_epoch"] = row["total_s"] / row["epoch_s"]
    row["one_pass_total_s"] = row["fit_s"] + row["fused_s"]
    row["one_pass_over_epoch"] = row["one_pass_total_s"] / row["epoch_s"]
    row["bf16_total_s"] = row["fit_bf16_s"] + row["fused_bf16_s"]
    row["bf16_over_epoch"] = row["bf16_total_s"] / row["epoch_s"]
    nan = float("nan")
    row["kronfluence_s"] = row.get("kronfluence_s", nan)
    row["kronfluence_over_epoch"] = row["kronfluence_s"] / row["epoch_s"]
    for key in ("total", "one_pass_total", "bf16_total"):
        row[f"{key}_over_kronfluence"] = row[f"{key}_s"] / row["kronfluence_s"]
    row["peak_mb"] = max(row["fit_peak_mb"], row["pairwise_peak_mb"], row["self_peak_mb"])
    row["repeats"] = args.repeats
    return row


def measure_once(size: str, args: argparse.Namespace, with_peer: bool = False,
                 ) -> dict[str, float]:
    model = make_model(size, args.vocab, args.length)
    train = DataLoader(chunks(args.chunks, args.length, args.vocab, 0), batch_size=args.batch_size)
    queries = DataLoader(chunks(args.queries, args.length, args.vocab, 1),
                         batch_size=args.queries)
    row: dict[str, float] = {"parameters": sum(p.numel() for p in model.parameters())}
    row["epoch_s"] = train_epoch(make_model(size, args.vocab, args.length), train)
    with harness.PeakRSS() as mem:
        row["fit_s"], factors = harness.timed(
            lambda: li.fit_factors(model, train, "causal_lm", progress=False))
    row["fit_peak_mb"] = mem.mib
    with harness.PeakRSS() as mem:
        row["pairwise_s"], _ = harness.timed(lambda: li.compute_pairwise_scores(
            model, factors, queries, train, "causal_lm", top_k=10, keep_scores=False,
            progress=False))
    row["pairwise_peak_mb"] = mem.mib
    with harness.PeakRSS() as mem:
        row["self_s"], _ = harness.timed(
            lambda: li.compute_self_scores(model, factors, train, "causal_lm", progress=False))
    row["self_peak_mb"] = mem.mib
    row["fused_s"], _ = harness.timed(lambda: li.compute_pairwise_scores(
        model, factors, queries, train, "causal_lm", top_k=10, keep_scores=False,
        self_influence=True, progress=False))
    row["fit_bf16_s"], half = harness.timed(
        lambda: li.fit_factors(model, train, "causal_lm", progress=False, row_dtype="bfloat16"))
    row["fused_bf16_s"], _ = harness.timed(lambda: li.compute_pairwise_scores(
        model, half, queries, train, "causal_lm", top_k=10, keep_scores=False,
        self_influence=True, progress=False))
    if with_peer and kronfluence_side is not None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="kronfluence_") as tmp:
            r = kronfluence_side.run_kronfluence_datasets(
                model, train.dataset, queries.dataset, task=kronfluence_side.CausalLMTask(),
                damping=None, batch_size=args.batch_size, query_batch_size=args.queries,
                output_dir=tmp, name=f"llama_{size}")
        row["kronfluence_s"] = r["fit_seconds"] + r["pairwise_seconds"] + r["self_seconds"]
    row["estimate_mb"] = estimate_mb(factors.shapes, args)
    return row


def stage_in_this_process(args: argparse.Namespace) -> None:
    """``--stage``: build the model and data, then run one stage and print its peak as JSON.

    The peak is the process's resident high-water mark (``ru_maxrss``) at the end minus the
    resident memory just before the stage (after one warm-up forward and backward): in a fresh
    process no memory freed by an earlier stage can be reused unseen, so this is the stage's
    own peak."""
    model = make_model(args.size, args.vocab, args.length)
    train = DataLoader(chunks(args.chunks, args.length, args.vocab, 0), batch_size=args.batch_size)
    queries = DataLoader(chunks(args.queries, args.length, args.vocab, 1),
                         batch_size=args.queries)
    factors = None if args.stage == "fit" else li.Factors.load(args.factors_dir)
    # warm torch's runtime (kernels, thread pools, autograd engine) with one plain forward and
    # backward, so that its one-time allocations are not counted as the stage's
    task = li.CausalLMTask()
    batch = next(iter(train))
    task.loss(task.forward(model, batch), batch).sum().backward()
    model.zero_grad(set_to_none=True)
    before = harness.rss_bytes()
    if args.stage == "fit":
        li.fit_factors(model, train, "causal_lm", progress=False, output_dir=args.factors_dir,
                       overwrite=True)
    elif args.stage == "pairwise":
        li.compute_pairwise_scores(model, factors, queries, train, "causal_lm", top_k=10,
                                   keep_scores=False, progress=False)
    else:
        li.compute_self_scores(model, factors, train, "causal_lm", progress=False)
    harness.child_result({"peak_mb": (harness.max_rss_bytes() - before) / 2**20})


def estimate_mb(shapes: dict[str, list[int]], args: argparse.Namespace) -> float:
    """The library's memory estimate of these runs, in MiB."""
    estimate = estimate_bytes(shapes, "ekfac", num_queries=args.queries,
                              batch_size=args.batch_size, rows_per_example=args.length)
    return sum(estimate.values()) / 2**20


STAGES = ("fit", "pairwise", "self")


def isolated_peaks(size: str, args: argparse.Namespace, estimate: float) -> dict[str, float]:
    """Each stage's peak in a fresh process (see :func:`stage_in_this_process`), the largest,
    and the ``estimate`` (MiB) over it."""
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory(prefix="llm_cost_") as tmp:
        for stage in STAGES:
            out[f"{stage}_isolated_peak_mb"] = harness.run_child(
                __file__, "--stage", stage, "--size", size, "--factors-dir", tmp, "--chunks",
                str(args.chunks), "--length", str(args.length), "--vocab", str(args.vocab),
                "--queries", str(args.queries), "--batch-size", str(args.batch_size),
                "--threads", str(args.threads))["peak_mb"]
    out["isolated_peak_mb"] = max(out[f"{stage}_isolated_peak_mb"] for stage in STAGES)
    out["estimate_over_isolated_peak"] = estimate / out["isolated_peak_mb"]
    return out


def isolated_table(rows: dict[str, dict[str, float]]) -> list[str]:
    """The markdown table of :func:`isolated_peaks` beside the estimate, one row per size."""
    return harness.markdown_table(
        ["size", "fit", "pairwise", "self", "estimate", "estimate / largest peak"],
        [[size, *(f"{r[f'{stage}_isolated_peak_mb']:.0f} MiB" for stage in STAGES),
          f"{r['estimate_mb']:.0f} MiB", f"{r['estimate_over_isolated_peak']:.2f}"]
         for size, r in rows.items()])


def memory_report(args: argparse.Namespace, bench: harness.Bench) -> None:
    """``--memory-only``: each stage's peak in a fresh process against the estimate."""
    from lightning_influence.tracking import LayerTracker

    rows = {}
    for size in args.sizes.split(","):
        estimate = estimate_mb(LayerTracker(make_model(size, args.vocab, args.length)).describe(),
                               args)
        rows[size] = {"estimate_mb": estimate, **isolated_peaks(size, args, estimate)}
    lines = [f"Llama-shaped models, {args.chunks} chunks x {args.length} tokens, {args.queries} "
             f"queries, batch {args.batch_size}; each stage in a fresh process (after one warm-up "
             "forward and backward), peak = ru_maxrss - resident memory before the stage", "",
             *isolated_table(rows)]
    bench.report("llm_memory", "\n".join(lines) + "\n", rows)


def main() -> None:
    p = harness.parser(__doc__, threads=2, repeats=3,
                       repeats_help="rounds; the minimum time is kept")
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--chunks", type=int, default=2048)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--kronfluence-rounds", type=int, default=1,
                   help="rounds that also time Kronfluence (where it is importable)")
    p.add_argument("--isolated-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure each stage's peak in a fresh process")
    p.add_argument("--memory-only", action="store_true",
                   help="only each stage's peak in a fresh process beside the estimate "
                        "(writes llm_memory.md/json)")
    p.add_argument("--stage", choices=["fit", "pairwise", "self"], help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--factors-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage:  # a child of isolated_peaks: its result is one line on stdout
        torch.set_num_threads(args.threads)
        stage_in_this_process(args)
        return
    bench = harness.start(args)
    if args.memory_only:
        memory_report(args, bench)
        return
    rows = {size: measure(size, args) for size in args.sizes.split(",")}
    if args.isolated_memory:
        for size, row in rows.items():
            row.update(isolated_peaks(size, args, row["estimate_mb"]))
    lines = [f"Llama-shaped models, {args.chunks} chunks x {args.length} tokens, {args.queries} "
             f"queries, batch {args.batch_size}, float32, {args.threads} CPU threads, minimum "
             f"of {args.repeats} rounds, {bench.load()}; peak = resident-memory increase over "
             "the stage", "",
             *harness.markdown_table(
                 ["size", "parameters", "epoch (s)", "fit (s)", "pairwise (s)", "self (s)",
                  "fit+pairwise+self / epoch", "fit + one scoring pass / epoch",
                  "same, bf16 rows / epoch", "Kronfluence / epoch",
                  "ours / Kronfluence (separate, one pass, bf16)", "peak MiB", "estimate MiB"],
                 [[size, f"{r['parameters']:,.0f}", f"{r['epoch_s']:.1f}", f"{r['fit_s']:.1f}",
                   f"{r['pairwise_s']:.1f}", f"{r['self_s']:.1f}", f"{r['total_over_epoch']:.2f}",
                   f"{r['one_pass_over_epoch']:.2f}", f"{r['bf16_over_epoch']:.2f}",
                   f"{r['kronfluence_over_epoch']:.2f}",
                   f"{r['total_over_kronfluence']:.2f}, "
                   f"{r['one_pass_total_over_kronfluence']:.2f}, "
                   f"{r['bf16_total_over_kronfluence']:.2f}",
                   f"{r['peak_mb']:.0f}", f"{r['estimate_mb']:.0f}"] for size, r in rows.items()],
                 align="l" + "r" * 9 + "lrr")]
    if args.isolated_memory:
        lines += ["", "Peaks of each stage in a fresh process:", "", *isolated_table(rows)]
    lines += ["", "The floor is about 4 epochs (four passes, each a forward and a backward)."]
    bench.report("llm_cost", "\n".join(lines) + "\n", rows)


if __name__ == "__main__":
    main()
