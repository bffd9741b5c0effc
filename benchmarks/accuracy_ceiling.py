"""How close each configuration gets to the exact influence, and at what cost, over trained models.

    .venv/bin/python benchmarks/accuracy_ceiling.py [--models 5]
    .venv/bin/python benchmarks/accuracy_ceiling.py --task conv --models 3 --no-exact --pcg-steps ""

Issue 13's second bar on the digits MLP (benchmarks/digits_protocol.py, 64-128-128-10): a
configuration at <= 2x the default EK-FAC's wall time whose LDS is >= 0.9 of the exact damped
Gauss-Newton influence's. One trained model is one draw, so the ratio is measured on ``--models``
models trained with different seeds (the LDS ground truth, ``--subsets`` models retrained on
random halves, is the training procedure's and is shared; cached in ``<out>/cache`` like
benchmarks/accuracy_tasks.py's).

For each model:

- the ceiling: the exact influence at damping 1e-2 (the weight decay; CG in float64 to a relative
  residual of 1e-6);
- the default: EK-FAC, one sampled label per example, heuristic damping, LDS averaged over
  ``--label-seeds`` label-sampling seeds; its wall time (fit + pairwise scores, minimum of
  ``--timing-runs``) is the unit of time;
- EK-FAC and K-FAC with ``fisher="exact"`` (every class weighted by its probability: no label
  sampling), heuristic damping;
- the road beyond: CG on the exact damped system preconditioned by exact-Fisher EK-FAC (fitted at
  the same damping), stopped after ``--pcg-steps`` iterations (float64, the solvers' default).

``--task conv`` runs the same configurations on benchmarks/accuracy_tasks.py's conv net (BatchNorm,
in-place ReLU), where the exact solve is too slow to be the default (``--no-exact`` leaves it out,
and with it the ratio column).

Writes ``<out>/accuracy_ceiling.md`` and ``<out>/accuracy_ceiling.json`` (``_conv`` appended to
the stem for the conv net).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import accuracy
import accuracy_tasks
import digits_protocol as protocol
import harness

from lightning_influence.evaluation import lds


def measure(problem: accuracy_tasks.Problem, seed: int, truth: Any,
            args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """LDS and seconds of every configuration on the model trained with ``seed``."""
    model = problem.train_fn(None, seed)
    wd = problem.weight_decay
    train, queries, task = problem.train, problem.queries, problem.task
    rows: dict[str, dict[str, float]] = {}

    def ours(strategy: str, fisher: str, label_seed: int = 0, runs: int = 1):
        """Scores of the first of ``runs`` runs and the minimum of their times (fit + scores,
        as accuracy.ours times them)."""
        seconds, first = harness.fastest(
            lambda: accuracy.ours(model, strategy, None, train, queries, seed=label_seed,
                                  fisher=fisher, task=task), runs, seconds=lambda r: r["seconds"])
        return first["scores"], seconds

    scores, seconds = ours("ekfac", "sampled", runs=args.timing_runs)
    values = [lds(scores, truth).mean] + [lds(ours("ekfac", "sampled", s)[0], truth).mean
                                         for s in range(1, args.label_seeds)]
    rows["EK-FAC, default (sampled labels)"] = {"lds": statistics.mean(values),
                                                "seconds": seconds}
    for strategy in ("ekfac", "kfac"):
        scores, seconds = ours(strategy, "exact", runs=args.timing_runs)
        rows[f"{'EK-FAC' if strategy == 'ekfac' else 'K-FAC'}, fisher=exact"] = {
            "lds": lds(scores, truth).mean, "seconds": seconds}
    steps = [int(s) for s in args.pcg_steps.split(",") if s.strip()]
    for r in accuracy.preconditioned_cg_path(model, wd, wd, train, queries, steps,
                                             fisher="exact", task=task):
        rows[f"CG + exact-Fisher EK-FAC, {r['depth']} it."] = {
            "lds": lds(r["scores"], truth).mean, "seconds": r["seconds"]}
    if not args.exact:
        return rows
    cg = accuracy.conjugate_gradient(model, wd, train, queries, task=task,
                                     max_iterations=args.cg_iterations)
    rows[f"exact damped GGN ({wd:g}), CG"] = {"lds": lds(cg["scores"], truth).mean,
                                              "seconds": cg["seconds"],
                                              "residual": cg["residual"]}
    return rows


def main() -> None:
    p = harness.parser(__doc__, threads=2)
    p.add_argument("--task", default="mlp", choices=("mlp", "conv"))
    p.add_argument("--models", type=int, default=5, help="models trained with seeds 0..n-1")
    p.add_argument("--label-seeds", type=int, default=3)
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--pcg-steps", default="2,3,5")
    p.add_argument("--timing-runs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs of every model and of the LDS retraining (default: "
                        f"the task's, {protocol.EPOCHS} for the MLP, 20 for the conv net)")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default=True,
                   help="the exact damped GGN influence (the ceiling) on every model")
    p.add_argument("--cg-iterations", type=int, default=1000,
                   help="CG iterations at most for the exact solve (to a residual of 1e-6)")
    args = p.parse_args()

    bench = harness.start(args)
    problem = accuracy_tasks.Problem(args.task, argparse.Namespace(queries=args.queries,
                                                                    conv_epochs=20))
    cache = bench.out / "cache"
    if args.epochs is not None and args.epochs != problem.train_fn.epochs:
        problem.train_fn.epochs = args.epochs
        cache = cache / f"e{args.epochs}"  # another training procedure: another ground truth
    truth = accuracy_tasks.ground_truth(problem, args, cache)
    per_model = []
    for seed in range(args.models):
        rows = measure(problem, seed, truth, args)
        per_model.append(rows)
        print(f"model {seed}: " + "; ".join(f"{k} {v['lds']:.3f} ({v['seconds']:.2f} s)"
                                            for k, v in rows.items()), flush=True)

    default = next(iter(per_model[0]))
    ceiling = list(per_model[0])[-1] if args.exact else None
    what = ("digits MLP 64-128-128-10" if args.task == "mlp" else
            "digits conv net (BatchNorm, in-place ReLU)")
    lines = [f"{what}, N={len(problem.train_set)}, Q={args.queries}; LDS over "
             f"{args.subsets} retrained halves; {args.models} models trained with seeds "
             f"0..{args.models - 1}; {args.threads} threads, {bench.load()}", ""]
    if ceiling is not None:
        residual = max(m[ceiling]["residual"] for m in per_model)
        state = ("converged on every model" if residual <= 1e-6 else
                 f"NOT converged (max relative residual {residual:.1e}): raise --cg-iterations")
        lines += ["Ratios are taken per model, then averaged (mean ± standard deviation over "
                  "models): LDS over the exact GGN's, time over the default EK-FAC's. The exact "
                  f"solve (CG, float64, to a relative residual of 1e-6): {state}.", ""]
        header = ["configuration", "LDS", "LDS / exact", "time / default",
                  "per model (LDS / exact)"]
    else:
        lines += ["Mean ± standard deviation over models; time over the default EK-FAC's, per "
                  "model. No exact solve (--no-exact).", ""]
        header = ["configuration", "LDS", "time / default", "per model (LDS)"]
    summary: dict[str, Any] = {"per_model": per_model}
    cells = []
    for name in per_model[0]:
        ratio = [m[name]["lds"] / m[ceiling]["lds"] if m[ceiling]["lds"] else float("nan")
                 for m in per_model] if ceiling is not None else []
        cost = [m[name]["seconds"] / m[default]["seconds"] for m in per_model]
        value = [m[name]["lds"] for m in per_model]

        def ms(v: list[float], digits: int = 3) -> str:
            std = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):.{digits}f} ± {std:.{digits}f}"

        summary[name] = {"lds": value, "ratio": ratio, "time_ratio": cost}
        if ceiling is not None:
            cells.append([name, ms(value), ms(ratio), ms(cost, 2),
                          ", ".join(f"{r:.3f}" for r in ratio)])
        else:
            cells.append([name, ms(value), ms(cost, 2), ", ".join(f"{v:.3f}" for v in value)])
    lines += harness.markdown_table(header, cells, align="l" + "r" * (len(header) - 2) + "l")
    stem = "accuracy_ceiling" if args.task == "mlp" else f"accuracy_ceiling_{args.task}"
    bench.report(stem, "\n".join(lines) + "\n", summary)


if __name__ == "__main__":
    main()
