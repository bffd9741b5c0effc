"""Speed ratios on the digits MLP and a character transformer, measured in one run.

    .venv/bin/python benchmarks/speed.py                               # floor and training only
    benchmarks/.venv-kronfluence/bin/python benchmarks/speed.py         # + ours / Kronfluence
    ... speed.py --workload sequence                                    # the transformer only

Sequence workload (``--workload sequence`` or ``both``): the LM recipe's character GPT with 2
blocks of width 64 (116k parameters, 105k in nn.Linear), ``--seq-chunks`` windows of 64
characters of Python's own documentation (no padding), 8 queries, batch 64, EK-FAC, damping
1e-2, the per-token sampled Fisher. Per pass, ours (float32 rows, and ``row_dtype="bfloat16"``)
and Kronfluence's (its float32 defaults), interleaved, minimum over ``--repeats``; each over the
floor of its passes: one forward + backward over the same batches (summed next-token loss,
parameter gradients). The fit is two passes (covariances; eigendecompositions + eigenvalue
correction), reported separately and together.

Protocol (benchmarks/digits_protocol.py): the 64-128-128-10 MLP trained on sklearn digits
(N = 1437), batch 128 for every pass, ``--queries`` test digits, EK-FAC, damping 1e-2 on every
layer for both libraries, float32, ``--threads`` CPU threads.

Ratios (each time is the minimum over ``--repeats`` interleaved runs):

1. ours / Kronfluence for fitting the factors, pairwise scores (Q x N) and self-influence (N).
   Kronfluence's times include its disk I/O (it always writes factors and scores); ours run in
   memory, as compute_pairwise_scores does by default.
2. ours / the floor, the floor being ONE forward and backward pass over the same training data
   (same batches, summed cross-entropy, parameter gradients): the least any method that touches
   every training gradient once can cost. Fitting EK-FAC needs two such passes (covariances, then
   the eigenvalue correction) plus the eigendecompositions; scoring and self-influence one each.
3. Lightning training with ``InfluenceStatistics(mode="during_training")`` updating the
   covariances every N steps (``--every``, default 1, 10 and 20), over plain training (same
   Trainer, no callback), and with a callback that does nothing (what merely attaching any
   callback costs in Lightning's hook calls). Each period is run twice: with the default
   ``reuse_forward=True`` (one extra backward through the training step's own graph) and with
   ``reuse_forward=False`` (a separate eval-mode forward and backward after the step).

Training times are reported four ways, because a 10% effect is within the run-to-run noise
of a shared 2-core machine (the same plain run varies by up to 30% here): min over repeats /
min of plain; the median over repeats of each run / the plain run of the same repeat; the time
spent inside the callback's hooks / plain; and, measured inside each run, the extra time of the
update steps over the run's median other step, divided by the rest of that run (the overhead
over the same run without updates; median over repeats). The last one compares steps of one
run, so machine drift between runs does not enter it.

Writes ``<out>/speed.md`` and ``<out>/speed.json`` (digits) and ``<out>/speed_sequence.md``
and ``<out>/speed_sequence.json`` (the transformer).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
from typing import Any

import digits_protocol as protocol
import harness
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.callbacks import InfluenceStatistics
from lightning_influence.evaluation import correlations

kronfluence_side = harness.optional_peer()  # the peer, only in the Kronfluence venv

BATCH = 128
DAMPING = 1e-2


def ours(model, train, queries) -> dict[str, float]:
    clock, times = harness.Stopwatch(), {}
    factors = li.fit_factors(model, train, "classification", strategy="ekfac", damping=DAMPING,
                             progress=False)
    times["fit"] = clock.lap()
    li.compute_pairwise_scores(model, factors, queries, train, "classification", top_k=10,
                               keep_scores=True, progress=False)
    times["pairwise"] = clock.lap()
    li.compute_self_scores(model, factors, train, "classification", progress=False)
    times["self"] = clock.lap()
    return times


def kronfluence(model, x, y, qx, qy) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kronfluence_") as tmp:
        r = kronfluence_side.run_kronfluence(model, x, y, qx, qy, strategy="ekfac",
                                             damping=DAMPING, batch_size=BATCH, output_dir=tmp)
    return {"fit": r["fit_seconds"], "pairwise": r["pairwise_seconds"],
            "self": r["self_seconds"]}


def contraction_floor(q: int, n: int, p: int) -> float:
    """One float32 GEMM ``[Q, P] x [P, N]``: the Q x N dot products of P-dimensional gradients
    that any pairwise method must form, with no other work."""
    a, b = torch.randn(q, p), torch.randn(p, n)
    return harness.timed(lambda: a @ b)[0]


def floor(model, train) -> float:
    """One forward and backward pass over the training data (parameter gradients)."""
    clock = harness.Stopwatch()
    for xb, yb in train:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb, reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    return clock.lap()


class DigitsModule(pl.LightningModule):
    """The protocol's MLP and optimizer as a LightningModule."""

    influence_task = "classification"

    def __init__(self) -> None:
        super().__init__()
        self.net = protocol.make_mlp()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=protocol.LR,
                                 weight_decay=protocol.WEIGHT_DECAY)


class TimedStatistics(InfluenceStatistics):
    """InfluenceStatistics that adds up the wall time spent inside its training hooks: a
    second, noise-robust view of the overhead (it misses only the few microseconds its
    recording hooks add inside the training forward)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = 0.0

    def _timed(self, hook: Any, *args: Any) -> None:
        t0 = time.perf_counter()
        hook(*args)
        self.seconds += time.perf_counter() - t0

    def on_train_batch_start(self, *args: Any) -> None:
        self._timed(super().on_train_batch_start, *args)

    def on_before_backward(self, *args: Any) -> None:
        self._timed(super().on_before_backward, *args)

    def on_train_batch_end(self, *args: Any) -> None:
        self._timed(super().on_train_batch_end, *args)


class StepClock:
    """Wall time of every training step, from the first callback's ``on_train_batch_start`` to
    the last callback's ``on_train_batch_end`` (the covariance update included, in either
    path), and whether the step was an update step. Two callbacks, put first and last."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.times: list[float] = []
        self.updates: list[bool] = []
        self._start = 0.0
        self._due = False
        clock = self

        class Start(pl.Callback):
            def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
                clock._due = trainer.global_step % clock.every == 0
                clock._start = time.perf_counter()

        class End(pl.Callback):
            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                clock.times.append(time.perf_counter() - clock._start)
                clock.updates.append(clock._due)

        self.start, self.end = Start(), End()

    def extra_seconds(self) -> float:
        """Time of the update steps beyond the median of the other steps of the same run: the
        update's cost measured inside one run, immune to run-to-run drift of the machine."""
        others = [t for t, u in zip(self.times, self.updates, strict=True) if not u]
        base = statistics.median(others) if others else 0.0
        return sum(t - base for t, u in zip(self.times, self.updates, strict=True) if u)


def training(x, y, every: int | None, epochs: int, reuse_forward: bool = True,
             ) -> tuple[float, float, float]:
    """Seconds of ``trainer.fit``, of those spent inside the covariance callback, and the extra
    time of its update steps over the run's other steps (:class:`StepClock`): no callback
    (None), a no-op callback (0), or covariance updates every ``every`` steps (from the training
    forward, or from a separate pass)."""
    clock = None
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(x, y), batch_size=protocol.BATCH_SIZE, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    if every is None:
        callbacks = []
    elif every == 0:
        callbacks = [pl.Callback()]
    else:
        clock = StepClock(every)
        callbacks = [clock.start,
                     TimedStatistics(mode="during_training", every_n_steps=every,
                                     progress=False, reuse_forward=reuse_forward),
                     clock.end]
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                         callbacks=callbacks, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tempfile.gettempdir())
    module = DigitsModule()
    gc.collect()
    gc.disable()  # as timeit does: a collection landing in one run and not another is noise
    try:
        t0 = time.perf_counter()
        trainer.fit(module, loader)
        seconds = time.perf_counter() - t0
    finally:
        gc.enable()
    inside = sum(getattr(c, "seconds", 0.0) for c in callbacks)
    return seconds, inside, clock.extra_seconds() if clock is not None else 0.0


# ------------------------------------------------------------------- sequence workload
SEQ_BATCH, SEQ_LEN, SEQ_QUERIES = 64, 64, 8


class Windows(torch.utils.data.Dataset):
    """``[N, T]`` token windows as the batches our causal-LM task reads (no padding)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ_LEN, dtype=torch.bool)}


def sequence_problem(chunks: int, seed: int = 0, device: str = "cpu"):
    """The character GPT (briefly trained, on ``device``) and ``chunks`` + 8 windows of Python's
    docs (on the CPU, as a loader yields them)."""
    from lightning_influence.language import CharTokenizer, python_docs
    from recipes.lm_influence import CharGPT, GPTConfig

    text = "\n".join(d.text for d in python_docs())
    tokenizer = CharTokenizer.from_texts([text])
    ids = torch.tensor(tokenizer.encode(text))
    need = (chunks + SEQ_QUERIES) * SEQ_LEN
    if len(ids) < need:
        raise ValueError(f"The corpus has {len(ids)} characters; {need} are needed.")
    windows = ids[:need].reshape(-1, SEQ_LEN)
    torch.manual_seed(seed)
    model = CharGPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=SEQ_LEN, n_layer=2,
                              n_head=4, n_embd=64)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for b in range(0, chunks, SEQ_BATCH):  # one epoch: a model with some structure
        loss = seq_loss(model, windows[b:b + SEQ_BATCH].to(device)) / SEQ_BATCH
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), windows[:chunks], windows[chunks:]


def seq_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="sum")


def synchronize(model) -> None:
    """Wait for the model's device to finish its queued work (CUDA runs asynchronously), so
    that a lap of the clock covers the work done."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seq_floor(model, train_ids: torch.Tensor) -> float:
    """One forward and backward over the training windows (parameter gradients), moved to the
    model's device batch by batch as a loader's would be."""
    device = next(model.parameters()).device
    synchronize(model)
    clock = harness.Stopwatch()
    for b in range(0, len(train_ids), SEQ_BATCH):
        model.zero_grad(set_to_none=True)
        seq_loss(model, train_ids[b:b + SEQ_BATCH].to(device)).backward()
    model.zero_grad(set_to_none=True)
    synchronize(model)
    return clock.lap()


def seq_ours(model, train, queries, row_dtype: str | None) -> tuple[dict[str, float], Any]:
    from lightning_influence.fitting import fit_covariances

    task = li.CausalLMTask()  # no padding: every position counts
    synchronize(model)
    clock, times = harness.Stopwatch(), {}

    def lap() -> float:
        synchronize(model)
        return clock.lap()
    covs = fit_covariances(model, train, task, progress=False, row_dtype=row_dtype)
    times["covariances"] = lap()
    factors = li.fit_factors(model, train, task, damping=DAMPING, covariances=covs,
                             progress=False, row_dtype=row_dtype)
    times["eigen"] = lap()
    times["fit"] = times["covariances"] + times["eigen"]
    pairwise = li.compute_pairwise_scores(model, factors, queries, train, task, top_k=10,
                                          keep_scores=True, progress=False).scores
    times["pairwise"] = lap()
    li.compute_self_scores(model, factors, train, task, progress=False)
    times["self"] = lap()
    li.compute_pairwise_scores(model, factors, queries, train, task, top_k=10, keep_scores=True,
                               self_influence=True, progress=False)
    times["pairwise+self"] = lap()
    return times, pairwise


def seq_kronfluence(model, train_ids, query_ids) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kronfluence_") as tmp:
        r = kronfluence_side.run_kronfluence_datasets(
            model, TensorDataset(train_ids), TensorDataset(query_ids),
            task=kronfluence_side.CausalLMTask(), damping=DAMPING, batch_size=SEQ_BATCH,
            output_dir=tmp, name="sequence", cpu=next(model.parameters()).device.type == "cpu")
    return {"fit": r["fit_seconds"], "pairwise": r["pairwise_seconds"], "self": r["self_seconds"]}


def sequence_benchmark(args: argparse.Namespace, bench: harness.Bench) -> None:
    model, train_ids, query_ids = sequence_problem(args.seq_chunks, device=args.device)
    train = DataLoader(Windows(train_ids), batch_size=SEQ_BATCH)
    queries = DataLoader(Windows(query_ids), batch_size=SEQ_BATCH)
    scores = {}

    def ours(key: str, row_dtype: str | None):
        def run(_: int) -> dict[str, float]:
            seconds, scores[key] = seq_ours(model, train, queries, row_dtype)
            return seconds
        return run

    contenders = {"floor": lambda _: {"pass": seq_floor(model, train_ids)},
                  "ours": ours("ours", None), "ours_bf16": ours("ours_bf16", "bfloat16")}
    if kronfluence_side is not None:
        contenders["kronfluence"] = lambda _: seq_kronfluence(model, train_ids, query_ids)
    # a warm-up call of each (first calls allocate, import and build kernels), then the rounds
    times = harness.interleave(contenders, args.repeats, warmup=True)
    times.setdefault("kronfluence", [])

    def best(key: str, stage: str) -> float:
        return harness.best(times[key], stage)

    def total(key: str, fused: bool = False) -> float:
        stages = ("fit", "pairwise+self") if fused else ("fit", "pairwise", "self")
        return harness.best_total(times[key], stages)

    fl = best("floor", "pass")
    agreement = correlations(scores["ours"], scores["ours_bf16"])["pearson"]
    params = sum(p.numel() for p in model.parameters())
    rows = []
    summary: dict[str, Any] = {"floor_seconds": fl, "bf16_vs_float32_pairwise_pearson": agreement}
    stages = [("covariances", 1), ("eigen", 1), ("fit", 2), ("pairwise", 1), ("self", 1),
              ("pairwise+self", 1)]
    for stage, passes in stages:
        o, b = best("ours", stage), best("ours_bf16", stage)
        k = best("kronfluence", stage) if stage in ("fit", "pairwise", "self") else float("nan")
        if stage == "pairwise+self" and times["kronfluence"]:  # the peer runs two passes
            k = harness.best_total(times["kronfluence"], ("pairwise", "self"))
        rows.append([stage, passes, f"{o:.2f}", f"{b:.2f}", f"{k:.2f}", f"{o / k:.2f}",
                     f"{b / k:.2f}", f"{o / (passes * fl):.2f}", f"{b / (passes * fl):.2f}"])
        summary[stage] = {"ours": o, "ours_bf16": b, "kronfluence": k, "ours_over_kronfluence": o / k,
                          "ours_bf16_over_kronfluence": b / k,
                          "ours_over_floor": o / (passes * fl),
                          "ours_bf16_over_floor": b / (passes * fl)}
    for key, label, passes, fused in (("total", "fit + pairwise + self", 4, False),
                                      ("total_fused", "fit + one scoring pass (pairwise and self)",
                                       3, True)):
        o, b, k = total("ours", fused), total("ours_bf16", fused), total("kronfluence")
        rows.append([label, passes, f"{o:.2f}", f"{b:.2f}", f"{k:.2f}", f"{o / k:.2f}",
                     f"{b / k:.2f}", f"{o / (passes * fl):.2f}", f"{b / (passes * fl):.2f}"])
        summary[key] = {"ours": o, "ours_bf16": b, "kronfluence": k,
                        "ours_over_kronfluence": o / k, "ours_bf16_over_kronfluence": b / k}
    lines = [f"character GPT (2 blocks, width 64, {params} parameters), N={len(train_ids)} "
             f"windows of {SEQ_LEN} characters, Q={len(query_ids)}, batch {SEQ_BATCH}, EK-FAC, "
             f"damping {DAMPING:g}, {describe_device(args)}, min of {args.repeats} interleaved "
             f"runs; {bench.load()}",
             "", f"floor (one forward + backward over the training windows): {fl:.3f} s", "",
             *harness.markdown_table(
                 ["stage", "passes", "ours (s)", "ours bf16 rows (s)", "Kronfluence (s)",
                  "ours / Kronfluence", "ours bf16 / Kronfluence", "ours / floor of its passes",
                  "ours bf16 / floor of its passes"], rows),
             "", "pairwise+self: `compute_pairwise_scores(..., self_influence=True)`, both from "
             "one pass over the training data (the `InfluenceScores` callback does this); "
             "Kronfluence's column there is its pairwise + self passes.",
             "", f"bf16 rows vs float32 rows: pairwise scores Pearson {agreement:.6f}"]
    bench.report("speed_sequence", "\n".join(lines) + "\n", {"summary": summary, "runs": times})


def describe_device(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(args.device))} (CUDA)"
    return f"{args.threads} threads"


def main() -> None:
    p = harness.parser(__doc__, threads=2, repeats=5,
                       repeats_help="interleaved rounds; the minimum time is kept")
    p.add_argument("--workload", choices=["digits", "sequence", "both"], default="both")
    p.add_argument("--seq-chunks", type=int, default=2048, help="training windows (sequence)")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--epochs", type=int, default=10, help="epochs of the training comparison")
    p.add_argument("--every", default="1,10,20", help="periods of the covariance updates")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N: the device of the sequence workload (the digits "
                        "workload and its Lightning training run on the CPU)")
    args = p.parse_args()
    if args.device != "cpu" and args.workload != "sequence":
        p.error(f"--device {args.device} applies to --workload sequence only.")

    bench = harness.start(args, quiet=True)
    if args.workload in ("sequence", "both"):
        sequence_benchmark(args, bench)
    if args.workload == "sequence":
        return
    x, y, xt, yt = protocol.make_digits()
    model = protocol.trainer(x, y)(None, 0)
    train = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    qx, qy = xt[:args.queries], yt[:args.queries]
    queries = DataLoader(TensorDataset(qx, qy), batch_size=BATCH, shuffle=False)

    # warm-up (first calls allocate, import and build kernels), not timed
    floor(model, train)
    ours(model, train, queries)
    if kronfluence_side is not None:
        kronfluence(model, x, y, qx, qy)
    training(x, y, 1, 1)
    every = [int(e) for e in args.every.split(",")]
    params = sum(p.numel() for p in model.parameters())
    contenders: dict[str, Any] = {"floor": lambda _: floor(model, train),
                                  "gemm": lambda _: contraction_floor(len(qx), len(x), params),
                                  "ours": lambda _: ours(model, train, queries)}
    if kronfluence_side is not None:
        contenders["kronfluence"] = lambda _: kronfluence(model, x, y, qx, qy)
    # an untimed run first (the scoring stages above leave the allocator and caches in another
    # state), then the variants in a new random order every round: measured, the first run
    # after the scoring stages was up to 15% slower whatever it was
    contenders["settle"] = lambda _: training(x, y, None, 1)
    first = list(contenders)
    variants = [("plain", None, True), ("noop", 0, True)]
    variants += [(f"every_{e}", e, True) for e in every]
    variants += [(f"every_{e}_separate", e, False) for e in every]
    for key, period, reuse in variants:
        contenders[key] = (lambda _, period=period, reuse=reuse:
                           training(x, y, period, args.epochs, reuse))
    times = harness.interleave(contenders, args.repeats, first=first, shuffle=random.Random(0))
    del times["settle"]
    times.setdefault("kronfluence", [])

    def wall(key: str) -> list[float]:
        return [t[0] for t in times[key]]

    fl = harness.best(times["floor"])
    rows = []
    summary: dict[str, Any] = {"floor_seconds": fl}
    for stage in ("fit", "pairwise", "self"):
        o, k = harness.best(times["ours"], stage), harness.best(times["kronfluence"], stage)
        rows.append([stage, f"{o:.3f}", f"{k:.3f}", f"{o / k:.3f}", f"{o / fl:.2f}"])
        summary[stage] = {"ours": o, "kronfluence": k, "ours_over_kronfluence": o / k,
                          "ours_over_floor": o / fl}
    o, k = harness.best_total(times["ours"]), harness.best_total(times["kronfluence"])
    rows.append(["fit + pairwise + self", f"{o:.3f}", f"{k:.3f}", f"{o / k:.3f}", f"{o / fl:.2f}"])
    summary["total"] = {"ours": o, "kronfluence": k, "ours_over_kronfluence": o / k}
    gemm = harness.best(times["gemm"])
    summary["gemm_floor_seconds"] = gemm
    summary["pairwise"]["ours_over_floor_plus_gemm"] = (harness.best(times["ours"], "pairwise")
                                                        / (fl + gemm))
    lines = [f"digits MLP 64-128-128-10, N={len(x)}, Q={len(qx)}, batch {BATCH}, EK-FAC, damping "
             f"{DAMPING:g}, float32, {args.threads} threads, min of {args.repeats} interleaved "
             f"runs; {bench.load()}", "",
             *harness.markdown_table(["stage", "ours (s)", "Kronfluence (s)", "ours / Kronfluence",
                                      "ours / floor"], rows),
             "", f"floor: one forward + backward pass over the {len(x)} training examples = "
             f"{fl * 1e3:.1f} ms; the pairwise stage also forms {len(qx)} x {len(x)} dot "
             f"products of {params}-dim gradients (one float32 GEMM alone: {gemm * 1e3:.1f} ms): "
             f"pairwise / (floor + GEMM) = {summary['pairwise']['ours_over_floor_plus_gemm']:.2f}",
             ""]
    plain = min(wall("plain"))
    labels = [("plain", "plain"), ("noop", "a callback that does nothing")]
    for e in every:
        steps = f"every {e} step{'s' if e > 1 else ''}"
        labels += [(f"every_{e}", f"covariances {steps} (default: rows of the training forward)"),
                   (f"every_{e}_separate", f"covariances {steps}, separate eval-mode pass "
                                            "(reuse_forward=False)")]
    rows = []
    for key, label in labels:
        seconds = min(wall(key))
        paired = statistics.median(t / p for t, p in zip(wall(key), wall("plain"), strict=True))
        inside = min(t[1] for t in times[key]) / plain
        # with an update at every step there is no step without one to compare with
        every_step = key.startswith("every_1") and key.split("_")[1] == "1"
        in_run = None if every_step else statistics.median(t[2] / (t[0] - t[2])
                                                            for t in times[key])
        rows.append([label, f"{seconds:.3f}", f"{seconds / plain:.3f}", f"{paired:.3f}",
                     f"{inside:.3f}", "n/a" if in_run is None else f"{in_run:+.3f}"])
        summary[f"training_{key}"] = {"seconds": seconds, "over_plain": seconds / plain,
                                      "paired_median_over_plain": paired,
                                      "callback_seconds_over_plain": inside,
                                      "in_run_extra_over_rest": in_run}
    lines += harness.markdown_table(
        [f"Lightning training, {args.epochs} epochs", "seconds (min)", "/ plain (min / min)",
         "/ plain (median of paired runs)", "time inside the callback / plain",
         "in-run: extra time of the update steps / the run"], rows)
    bench.report("speed", "\n".join(lines) + "\n", {"summary": summary, "runs": times})


if __name__ == "__main__":
    main()
