"""Accuracy versus compute time on the digits MLP (the paper's PBRF comparison, in miniature).

    .venv/bin/python benchmarks/accuracy.py                                  # without Kronfluence
    benchmarks/.venv-kronfluence/bin/python benchmarks/accuracy.py            # with it as the peer

Protocol (benchmarks/digits_protocol.py): one 64-128-128-10 MLP trained on sklearn digits; Q test
digits as queries; every method solves the same damped Gauss-Newton system, damping = 1e-2 on
every layer (the optimizer's weight decay: the curvature of the objective actually trained;
``--damping heuristic`` uses EK-FAC's per-layer 0.1 x mean(Lambda) for every method instead).

Methods, each timed from the trained model to the full ``[Q, N]`` score matrix (fitting +
preconditioning + one scoring pass over the training set): ours ``identity`` (TracIn at one
checkpoint), ``diagonal``, ``kfac``, ``ekfac``; Kronfluence's ``ekfac`` (when importable);
LiSSA at several depths (one run of the series; the time at depth j is the time a run of depth j
takes); CG to a relative residual of 1e-6 in float64 (the converged reference). Fast methods are
timed as the minimum of ``--timing-runs`` runs; Kronfluence's time includes its disk I/O.

``CG + EK-FAC preconditioner`` runs CG on the full damped system with our EK-FAC factors as the
preconditioner, stopped after ``--pcg-steps`` iterations (the EK-FAC-preconditioned iteration
that ASTRA, Wang et al. 2025, builds on a Neumann series): how few full-data products it takes
to go from EK-FAC's accuracy to the converged solution's.

Two more rows locate EK-FAC's error: ``ours kfac/ekfac, exact Fisher`` (every label weighted
by its probability instead of one sampled label: no sampling noise) and ``block-diagonal GGN``
(CG on the exact layer-wise system, cross-layer blocks left out: the best any layer-wise method
such as K-FAC or EK-FAC could do with this damping).

Ground truth:
- PBRF (lightning_influence.evaluation.pbrf, eps = 1/N) for ``--pbrf-examples`` random training
  examples: correlation of each method's scores with the PBRF responses over all Q x M pairs
  (Pearson; one outlying pair can swing it) and per query (Pearson and Spearman over the M
  examples, averaged over queries; the plot shows the per-query Pearson).
- LDS: ``--subsets`` models retrained on random halves of the training set (``--repeats``
  seeds each, averaged); Spearman between measured and predicted query losses, averaged over
  queries. EK-FAC's LDS is also given per label-sampling seed (``--fisher-seeds``) for both
  libraries, since their difference is within that noise.

Writes ``<out>/accuracy.md`` (the table), ``<out>/accuracy.png`` (correlation with PBRF and LDS
against seconds), ``<out>/accuracy.json`` and an offline W&B run under ``<out>/wandb``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import digits_protocol as protocol
import harness
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.evaluation import (
    QueryMeasure,
    correlations,
    lds,
    pbrf,
    subset_measurements,
)
from lightning_influence.solvers import Arnoldi, ConjugateGradient, LiSSA

kronfluence_side = harness.optional_peer()  # the peer, only in the Kronfluence venv

BATCH = 128


def ours(model, strategy: str, damping, train, queries, seed: int = 0,
         fisher: str = "sampled", task: Any = "classification") -> dict[str, Any]:
    clock = harness.Stopwatch()
    factors = li.fit_factors(model, train, task, strategy=strategy, damping=damping,
                             seed=seed, progress=False, fisher=fisher)
    scores = li.compute_pairwise_scores(model, factors, queries, train, task,
                                        top_k=1, progress=False).scores
    return {"scores": scores, "seconds": clock.lap(), "factors": factors}


def kronfluence(model, damping, x, y, qx, qy, seed: int = 0) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kronfluence_") as tmp:
        r = kronfluence_side.run_kronfluence(model, x, y, qx, qy, strategy="ekfac",
                                             damping=damping, batch_size=BATCH, output_dir=tmp,
                                             seed=seed)
    return {"scores": r["pairwise"].double(), "seconds": r["fit_seconds"] + r["pairwise_seconds"]}


def lissa_path(model, damping, train, queries, steps: list[int], task: Any = "classification",
               batch_size: int = BATCH, dtype: torch.dtype = torch.float32,
               ) -> list[dict[str, Any]]:
    """One LiSSA series; the estimate (and time) at each depth in ``steps``: the setup, the
    series to that depth, and one scoring pass."""
    clock = harness.Stopwatch()
    solver = LiSSA(model, train, task, damping=damping, iterations=max(steps),
                   batch_size=batch_size, dtype=dtype)
    grads = li.query_gradients(model, queries, task, solver, precondition=False, progress=False)
    setup = clock.lap()
    out, elapsed = [], 0.0
    for depth, estimate in solver.series(grads, steps):
        elapsed += clock.lap()
        scores = li.compute_pairwise_scores(model, solver, queries, train, task,
                                            top_k=1, progress=False, query_grads=estimate).scores
        score_pass = clock.lap()
        out.append({"name": f"lissa ({depth} it.)", "scores": scores,
                    "seconds": setup + elapsed + score_pass, "depth": depth})
        clock.lap()  # the series resumes from here
    for row in out:
        row["scale"] = solver.scale
    return out


def conjugate_gradient(model, damping, train, queries, block_diagonal: bool = False,
                       max_iterations: int = 1000, task: Any = "classification") -> dict[str, Any]:
    clock = harness.Stopwatch()
    solver = ConjugateGradient(model, train, task, damping=damping, rtol=1e-6,
                               max_iterations=max_iterations, dtype=torch.float64,
                               block_diagonal=block_diagonal)
    scores = li.compute_pairwise_scores(model, solver, queries, train, task,
                                        top_k=1, progress=False).scores
    return {"scores": scores, "seconds": clock.lap(),
            "iterations": solver.iterations, "residual": float(solver.residuals.max())}


def preconditioned_cg_path(model, damping, number, train, queries, steps: list[int],
                           fisher: str = "sampled", task: Any = "classification",
                           ) -> list[dict[str, Any]]:
    """CG on the full damped system preconditioned by our EK-FAC factors (fitted with
    ``fisher``), stopped after each number of iterations in ``steps`` (one run per depth; the
    time includes the EK-FAC fit)."""
    out = []
    for depth in steps:
        clock = harness.Stopwatch()
        fitted = li.fit_factors(model, train, task, strategy="ekfac", damping=number,
                                progress=False, fisher=fisher)
        solver = ConjugateGradient(model, train, task, damping=damping, rtol=1e-6,
                                   max_iterations=depth, dtype=torch.float64,
                                   preconditioner=fitted)
        scores = li.compute_pairwise_scores(model, solver, queries, train, task,
                                            top_k=1, progress=False).scores
        out.append({"name": f"CG + EK-FAC preconditioner ({depth} it.)", "scores": scores,
                    "seconds": clock.lap(), "depth": depth,
                    "residual": float(solver.residuals.max()), "iterations": solver.iterations})
    return out


def arnoldi_path(model, damping, train, queries, steps: list[int]) -> list[dict[str, Any]]:
    """Arnoldi (Schioppa et al. 2022) with each number of Krylov steps in ``steps`` (one
    full-data product each; one run per depth), every Ritz pair kept, float64."""
    out = []
    for depth in steps:
        clock = harness.Stopwatch()
        solver = Arnoldi(model, train, "classification", damping=damping, iterations=depth,
                         dtype=torch.float64)
        scores = li.compute_pairwise_scores(model, solver, queries, train, "classification",
                                            top_k=1, progress=False).scores
        out.append({"name": f"arnoldi ({depth} it.)", "scores": scores,
                    "seconds": clock.lap(), "depth": depth})
    return out


def _cg_state(cg: dict[str, Any]) -> str:
    return "converged" if cg["residual"] <= 1e-6 else f"{cg['iterations']} it., not converged"


def table(rows: list[dict[str, Any]], header: str) -> str:
    cells = [[r["name"], f"{r['seconds']:.2f}"] + [f"{r[k]:.3f}" if k in r else "-" for k in
                                                  ("pbrf_pearson", "pbrf_pearson_q",
                                                   "pbrf_spearman_q", "lds")] for r in rows]
    return "\n".join([header, "", *harness.markdown_table(
        ["method", "seconds", "PBRF Pearson", "PBRF Pearson/query", "PBRF Spearman/query", "LDS"],
        cells)])


def plot(rows: list[dict[str, Any]], path: Path,
         title: str = "digits MLP: accuracy versus compute time (2 CPU threads)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "pbrf_pearson_q", "correlation with PBRF (Pearson, mean over queries)"),
                           (axes[1], "lds", "LDS (Spearman, mean over queries)")):
        for prefix, color, path_label in (("lissa", "tab:gray", "LiSSA (depth grows)"),
                                          ("arnoldi", "tab:purple",
                                           "Arnoldi (Krylov steps grow)"),
                                          ("CG + EK-FAC", "tab:green",
                                           "CG preconditioned by EK-FAC (iterations grow)")):
            path_rows = [r for r in rows if r["name"].startswith(prefix) and key in r]
            if not path_rows:
                continue
            ax.plot([r["seconds"] for r in path_rows], [r[key] for r in path_rows], "o-",
                    color=color, label=path_label)
            for r in path_rows:
                ax.annotate(str(r["depth"]), (r["seconds"], r[key]), fontsize=7,
                            textcoords="offset points", xytext=(3, -9))
        for r in rows:
            if "depth" in r or key not in r:
                continue
            ax.plot(r["seconds"], r[key], "s" if "Kronfluence" in r["name"] else "o",
                    markersize=8, label=r["name"])
        ax.set_xscale("log")
        ax.set_xlabel("seconds (fit + precondition + score, Q x N)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    for ax, key in ((axes[0], "pbrf_pearson_q"), (axes[1], "lds")):
        if not any(key in r for r in rows):
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = harness.parser(__doc__, threads=2, repeats=1, repeats_help="training seeds per LDS subset",
                       seed=0)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--pbrf-examples", type=int, default=40)
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--lissa-steps", default="10,30,100,300,1000,3000,10000")
    p.add_argument("--arnoldi-steps", default="20,50,100",
                   help="Krylov steps of the Arnoldi rows (empty: none)")
    p.add_argument("--pcg-steps", default="1,3,10,30",
                   help="iterations of CG preconditioned by EK-FAC")
    p.add_argument("--damping", default="weight_decay", choices=("weight_decay", "heuristic"))
    p.add_argument("--fisher-seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=protocol.EPOCHS,
                   help="training epochs of the model and of every LDS retraining")
    p.add_argument("--cg-iterations", type=int, default=1000, help="CG iterations at most")
    p.add_argument("--timing-runs", type=int, default=3, help="runs of each fast method (min)")
    p.add_argument("--no-wandb", action="store_true")
    args = p.parse_args()

    bench = harness.start(args)
    out = bench.out
    x, y, xt, yt = protocol.make_digits()
    train_fn = protocol.trainer(x, y, epochs=args.epochs)
    model = train_fn(None, args.seed)
    n = len(x)
    train = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)
    qx, qy = xt[:args.queries], yt[:args.queries]
    queries = DataLoader(TensorDataset(qx, qy), batch_size=BATCH, shuffle=False)
    print(f"torch {torch.__version__}, {args.threads} threads, {bench.load(end=False)}; "
          f"N={n}, Q={len(qx)}, test acc "
          f"{(model(xt).argmax(1) == yt).float().mean():.4f}, Kronfluence "
          f"{'available' if kronfluence_side else 'not available'}")

    # the damping every method uses (EK-FAC's, layer by layer); the first call also warms up
    number = protocol.WEIGHT_DECAY if args.damping == "weight_decay" else None
    damping = ours(model, "ekfac", number, train, queries)["factors"].damping
    print("damping per layer:", {k: f"{v:.3g}" for k, v in damping.items()})

    def best_of(fn, *fargs) -> dict[str, Any]:  # cheap methods: min time of `--timing-runs`
        seconds, first = harness.fastest(lambda: fn(*fargs), args.timing_runs,
                                         seconds=lambda r: r["seconds"])
        return dict(first, seconds=seconds)

    rows: list[dict[str, Any]] = []
    for strategy in ("identity", "diagonal", "kfac", "ekfac"):
        r = best_of(ours, model, strategy, number, train, queries)
        rows.append({"name": f"ours {strategy}", "scores": r["scores"], "seconds": r["seconds"]})
    for strategy in ("kfac", "ekfac"):  # every label weighted by its probability: no sampling
        r = best_of(ours, model, strategy, number, train, queries, 0, "exact")
        rows.append({"name": f"ours {strategy}, exact Fisher", "scores": r["scores"],
                     "seconds": r["seconds"]})
    if kronfluence_side is not None and args.damping == "weight_decay":
        rows.append({"name": "Kronfluence ekfac",
                     **best_of(kronfluence, model, number, x, y, qx, qy)})
    cg = conjugate_gradient(model, damping, train, queries,
                            max_iterations=args.cg_iterations)
    print(f"CG: {cg['iterations']} iterations, max residual {cg['residual']:.1e}, "
          f"{cg['seconds']:.1f}s")
    rows.append({"name": f"CG (float64, {_cg_state(cg)})", **cg})
    cg = conjugate_gradient(model, damping, train, queries, block_diagonal=True,
                            max_iterations=args.cg_iterations)
    print(f"block-diagonal CG: {cg['iterations']} iterations, max residual "
          f"{cg['residual']:.1e}, {cg['seconds']:.1f}s")
    rows.append({"name": f"block-diagonal GGN, CG (float64, {_cg_state(cg)})", **cg})
    steps = [int(s) for s in args.lissa_steps.split(",")]
    rows.extend(lissa_path(model, damping, train, queries, steps))
    print(f"LiSSA scale {rows[-1]['scale']:.3g}, {rows[-1]['seconds']:.1f}s to depth {steps[-1]}")
    if args.arnoldi_steps:
        rows.extend(arnoldi_path(model, damping, train, queries,
                                 [int(s) for s in args.arnoldi_steps.split(",")]))
        print("Arnoldi: " + ", ".join(f"{r['seconds']:.1f}s for {r['depth']} steps"
                                      for r in rows if r["name"].startswith("arnoldi")))
    pcg = preconditioned_cg_path(model, damping, number, train, queries,
                                 [int(s) for s in args.pcg_steps.split(",")])
    rows.extend(pcg)
    print("EK-FAC-preconditioned CG: max residual " + ", ".join(
        f"{r['residual']:.1e} after {r['depth']} it." for r in pcg))

    gen = torch.Generator().manual_seed(args.seed + 1)
    picked = torch.randperm(n, generator=gen)[:args.pbrf_examples].sort().values
    response = pbrf(model, train, queries, "classification", picked, damping=damping)
    print(f"PBRF: {len(picked)} examples, {response.seconds:.1f}s, L-BFGS iterations "
          f"median {int(np.median(response.iterations))}, max |grad| "
          f"{max(response.grad_norms):.1e}")
    subsets = subset_measurements(train_fn, QueryMeasure(queries), n, num_subsets=args.subsets,
                                  fraction=args.fraction, seed=args.seed + 2,
                                  repeats=args.repeats)
    print(f"LDS: {args.subsets} subsets x {args.repeats} seeds retrained in "
          f"{subsets.seconds:.1f}s")
    for r in rows:
        c = correlations(r["scores"][:, picked], response.changes)
        r["pbrf_pearson"], r["pbrf_spearman_q"] = c["pearson"], c["spearman_per_query"]
        r["pbrf_pearson_q"] = c["pearson_per_query"]
        r["lds"] = lds(r["scores"], subsets).mean
    # the package's default damping (EK-FAC's per-layer heuristic, also Kronfluence's): LDS only,
    # since PBRF, CG and LiSSA above solve the system damped by the protocol's value
    if number is not None:
        r = best_of(ours, model, "ekfac", None, train, queries)
        rows.append({"name": "ours ekfac, heuristic damping", "seconds": r["seconds"],
                     "lds": lds(r["scores"], subsets).mean})
        if kronfluence_side is not None:
            r = best_of(kronfluence, model, None, x, y, qx, qy)
            rows.append({"name": "Kronfluence ekfac, heuristic damping", "seconds": r["seconds"],
                         "lds": lds(r["scores"], subsets).mean})
    seeds = {"ours": [], "Kronfluence": []}
    for s in range(args.fisher_seeds):
        seeds["ours"].append(lds(ours(model, "ekfac", number, train, queries, seed=s)["scores"],
                                 subsets).mean)
        if kronfluence_side is not None and args.damping == "weight_decay":
            seeds["Kronfluence"].append(lds(kronfluence(model, number, x, y, qx, qy,
                                                        seed=s)["scores"], subsets).mean)

    header = (f"digits MLP 64-128-128-10, N={n}, Q={len(qx)}, damping "
              f"{'1e-2 (weight decay)' if number else 'EK-FAC heuristic per layer'}, "
              f"PBRF on {len(picked)} examples (eps=1/N), LDS on {args.subsets} half-size "
              f"subsets x {args.repeats} seed(s); seconds on {args.threads} CPU threads, "
              f"{bench.load()}")
    text = table(rows, header)
    text += "\n\nEK-FAC LDS per label-sampling seed: " + "; ".join(
        f"{k} {', '.join(f'{v:.3f}' for v in vals)} (mean {np.mean(vals):.3f})"
        for k, vals in seeds.items() if vals)
    text += "\nScores: positive = proponent; LDS correlates the measured query loss with -sum of scores.\n"
    print()
    summary = {r["name"]: {k: v for k, v in r.items() if k not in ("scores", "name", "factors")}
               for r in rows}
    summary["ekfac_lds_per_seed"] = seeds
    bench.report("accuracy", text, summary)
    plot(rows, out / "accuracy.png")
    if not args.no_wandb:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(project="lightning-influence-benchmarks", name="accuracy",
                         mode="offline", dir=str(out), config=vars(args))
        columns = ["method", "seconds", "pbrf_pearson", "pbrf_spearman_per_query", "lds"]
        data = [[r["name"], r["seconds"], r.get("pbrf_pearson"), r.get("pbrf_spearman_q"), r["lds"]]
                for r in rows]
        run.log({"accuracy/table": wandb.Table(columns=columns, data=data),
                 "accuracy/plot": wandb.Image(str(out / "accuracy.png"))})
        run.finish()
    print(f"written: {out / 'accuracy.md'}, {out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
