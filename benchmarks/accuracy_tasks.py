"""EK-FAC accuracy on three tasks, over label-sampling seeds, ours beside Kronfluence's.

    .venv/bin/python benchmarks/accuracy_tasks.py                        # ours only
    benchmarks/.venv-kronfluence/bin/python benchmarks/accuracy_tasks.py  # with the peer

Tasks (each trained with :class:`lightning_influence.evaluation.SimpleTrainer`, AdamW):

- ``mlp``: the digits protocol's 64-128-128-10 MLP (benchmarks/digits_protocol.py), Q test
  digits as queries.
- ``conv``: a small conv net on the same 8x8 digits, with BatchNorm and in-place ReLU
  (Conv 1->16, BN, ReLU, Conv 16->32, BN, ReLU, 2x2 average pool, Linear 512->10).
- ``gpt``: benchmarks/accuracy_lm.py's character GPT (2 blocks of width 32) on 128 chunks of 64
  characters of Python's documentation, chunks of later documents as queries.

Ground truth: LDS over ``--subsets`` models retrained on random halves (computed once per task
and cached in ``<out>/cache``). For each of ``--seeds`` label-sampling seeds, EK-FAC scores of
ours and of Kronfluence (when importable) at

- each library's default damping: ours ``0.1 x mean(Lambda)`` per layer; Kronfluence's
  ``damping_factor`` default, an absolute 1e-8;
- a matched damping: both at the per-layer heuristic (Kronfluence's ``damping_factor=None``)
  and both at one absolute value (``--damping``, the optimizer's weight decay).

The table gives the mean and standard deviation of LDS over the seeds. On ``mlp`` it adds the
exact damped Gauss-Newton influence (CG to convergence, float64) at both dampings: the ceiling
that any approximation of the same system can reach.

Writes ``<out>/accuracy_tasks.md`` and ``<out>/accuracy_tasks.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import accuracy  # its methods, with a task
import digits_protocol as protocol
import harness
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.evaluation import (
    QueryMeasure,
    SimpleTrainer,
    lds,
    subset_measurements,
)

kronfluence_side = harness.optional_peer()  # the peer, only in the Kronfluence venv

KRONFLUENCE_DEFAULT_DAMPING = 1e-8  # ScoreArguments.damping_factor's default in Kronfluence 1.0.1


# ------------------------------------------------------------------------------------ tasks
def make_conv() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 10),
    )


class Problem:
    """A task: training set, queries, our task object, the retraining function, and the
    datasets in the form the Kronfluence side reads."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        if name in ("mlp", "conv"):
            x, y, xt, yt = protocol.make_digits()
            self.train_set = TensorDataset(x, y)
            self.query_set = TensorDataset(xt[:args.queries], yt[:args.queries])
            self.task: Any = li.ClassificationTask()
            self.kf_task = kronfluence_side.ClassificationTask() if kronfluence_side else None
            epochs = protocol.EPOCHS if name == "mlp" else args.conv_epochs
            self.train_fn = SimpleTrainer(protocol.make_mlp if name == "mlp" else make_conv,
                                          self.train_set, self.task, epochs=epochs,
                                          batch_size=protocol.BATCH_SIZE, lr=protocol.LR,
                                          weight_decay=protocol.WEIGHT_DECAY)
            self.batch = 128
        elif name == "gpt":
            import accuracy_lm

            from recipes.lm_influence import CharGPT, GPTConfig

            lm_args = argparse.Namespace(context=64, train_chunks=128, queries=8)
            tokenizer, self.train_set, self.query_set = accuracy_lm.corpus(lm_args)
            cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2,
                            n_embd=32)
            self.task = li.CausalLMTask(pad_token_id=tokenizer.pad_id)
            self.kf_task = (kronfluence_side.CausalLMTask(pad_token_id=tokenizer.pad_id)
                            if kronfluence_side else None)
            self.train_fn = SimpleTrainer(lambda: CharGPT(cfg), self.train_set, self.task,
                                          epochs=15, batch_size=32, lr=3e-3, weight_decay=0.1)
            self.batch = 32
        else:
            raise ValueError(name)
        self.weight_decay = self.train_fn.weight_decay
        self.train = DataLoader(self.train_set, batch_size=self.batch, shuffle=False)
        self.queries = DataLoader(self.query_set, batch_size=self.batch, shuffle=False)


def ground_truth(problem: Problem, args: argparse.Namespace, cache: Path):
    path = cache / f"{problem.name}_subsets{args.subsets}_q{args.queries}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    measure = QueryMeasure(problem.queries, problem.task)
    result = subset_measurements(problem.train_fn, measure, len(problem.train_set),
                                 num_subsets=args.subsets, seed=0)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return result


# ---------------------------------------------------------------------------------- methods
def ours(problem: Problem, model: nn.Module, damping: Any, seed: int) -> tuple[torch.Tensor, float]:
    r = accuracy.ours(model, "ekfac", damping, problem.train, problem.queries, seed=seed,
                      task=problem.task)
    return r["scores"], r["seconds"]


def kronfluence(problem: Problem, model: nn.Module, damping: float | None,
                seed: int) -> tuple[torch.Tensor, float]:
    with tempfile.TemporaryDirectory(prefix="kronfluence_") as tmp:
        r = kronfluence_side.run_kronfluence_datasets(
            model, problem.train_set, problem.query_set, task=problem.kf_task, damping=damping,
            batch_size=problem.batch, output_dir=tmp, seed=seed, name=problem.name)
    return r["pairwise"].double(), r["fit_seconds"] + r["pairwise_seconds"]


def exact(problem: Problem, model: nn.Module, damping: Any) -> tuple[torch.Tensor, float, str]:
    cg = accuracy.conjugate_gradient(model, damping, problem.train, problem.queries,
                                     task=problem.task)
    residual = cg["residual"]
    state = "converged" if residual <= 1e-6 else f"not converged: residual {residual:.1e}"
    return cg["scores"], cg["seconds"], state


# ------------------------------------------------------------------------------------- main
def main() -> None:
    p = harness.parser(__doc__, threads=2)
    p.add_argument("--tasks", default="mlp,conv,gpt")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--conv-epochs", type=int, default=20)
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                   help="the exact-GGN ceiling on mlp")
    args = p.parse_args()

    bench = harness.start(args)
    lines = []
    summary: dict[str, Any] = {}
    for name in args.tasks.split(","):
        problem = Problem(name, args)
        model = problem.train_fn(None, 0)
        seconds, truth = harness.timed(
            lambda problem=problem: ground_truth(problem, args, bench.out / "cache"))
        print(f"[{name}] ground truth ready ({seconds:.0f} s)", flush=True)
        wd = problem.weight_decay
        methods: list[tuple[str, Any, Any]] = [
            ("ours, default (heuristic)", ours, None),
            (f"ours, absolute {wd:g}", ours, wd),
        ]
        if kronfluence_side is not None:
            methods += [
                (f"Kronfluence, default (absolute {KRONFLUENCE_DEFAULT_DAMPING:g})", kronfluence,
                 KRONFLUENCE_DEFAULT_DAMPING),
                ("Kronfluence, heuristic", kronfluence, None),
                (f"Kronfluence, absolute {wd:g}", kronfluence, wd),
            ]
        rows = {}
        for label, method, damping in methods:
            values, seconds = [], []
            for seed in range(args.seeds):
                scores, sec = method(problem, model, damping, seed)
                values.append(lds(scores, truth).mean)
                seconds.append(sec)
            rows[label] = {"lds": values, "mean": statistics.mean(values),
                           "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                           "seconds": min(seconds)}
            print(f"[{name}] {label}: {rows[label]['mean']:.3f} ± {rows[label]['std']:.3f}",
                  flush=True)
        if name == "mlp" and args.exact:
            for label, damping in (("exact damped GGN (CG), heuristic damping of ours",
                                    li.fit_factors(model, problem.train, problem.task,
                                                   progress=False).damping),
                                   (f"exact damped GGN (CG), absolute {wd:g}", wd)):
                scores, sec, state = exact(problem, model, damping)
                value = lds(scores, truth).mean
                label = f"{label} ({state} after at most 1000 iterations)"
                rows[label] = {"lds": [value], "mean": value, "std": 0.0, "seconds": sec}
                print(f"[{name}] {label}: {value:.3f}", flush=True)
        summary[name] = rows
        lines += [f"**{name}** (N={len(problem.train_set)}, Q={len(problem.query_set)})", "",
                  *harness.markdown_table(
                      ["method", "LDS mean", "LDS std", "per seed", "seconds (min)"],
                      [[label, f"{r['mean']:.3f}", f"{r['std']:.3f}",
                        ", ".join(f"{v:.3f}" for v in r["lds"]), f"{r['seconds']:.2f}"]
                       for label, r in rows.items()], align="lrrlr"), ""]
    lines = [f"EK-FAC LDS, mean ± standard deviation over {args.seeds} label-sampling seeds; "
             f"LDS over {args.subsets} retrained half subsets; {args.threads} threads; "
             f"{bench.load()}", "", *lines]
    bench.report("accuracy_tasks", "\n".join(lines) + "\n", summary)


if __name__ == "__main__":
    main()
