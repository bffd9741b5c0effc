"""What the eigendecomposition's dtype does to the scores at GPT-2 width (issues 21 and 25).

    benchmarks/.venv-kronfluence/bin/python benchmarks/eigh_precision.py   # ~25 min on 2 cores
    .venv/bin/python benchmarks/eigh_precision.py --smoke                   # seconds

GPT-2 small (random init from its ``transformers`` config, MLP layers: 24 layers, covariance
sides of width 768 and 3072), 64 sequences of 128 random tokens, 16 queries: EK-FAC fitted with
``eigh_dtype`` float64 (the reference), ``auto`` (the default: float32 only for wide sides whose
condition number a float64 Cholesky test proves at most 1e4) and float32, from one covariance
pass (the same sums), each with its own eigenvalue pass; and float64 again with another
label-sampling seed (a new covariance pass): what sampling alone moves, to set the dtypes'
differences against. For each: the eigendecompositions' time, the sides decomposed in float32,
and the Pearson and Spearman correlations and the largest difference (relative to the largest
score) of the pairwise ``[Q, N]`` and self-influence ``[N]`` scores with the reference's.
Writes ``<out>/eigh_precision.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import harness
import llm_scale
import torch
from scipy.stats import pearsonr, spearmanr

import lightning_influence as li
from lightning_influence import factors as factors_module

MODES = (("float64", 0), ("auto", 0), ("float32", 0), ("float64", 1))


def problem(args: argparse.Namespace) -> tuple[Any, ...]:
    ns = argparse.Namespace(device="cpu", smoke=args.smoke, layers=1, length=args.length,
                            sequences=args.sequences, batch_size=8, queries=args.queries)
    model = llm_scale.make_model("gpt2", ns)
    train, queries = llm_scale.loaders(ns, llm_scale.vocabulary(model))
    return model, train, queries, li.CausalLMTask()


def fit_and_score(model: Any, train: Any, queries: Any, task: li.Task, covs: dict[str, Any],
                  eigh: str, seed: int) -> dict[str, Any]:
    """Factors fitted from ``covs`` (the library's own fit, its covariance pass skipped) with
    ``eigh``, the time of its eigendecompositions, and the scores."""
    options = li.FitOptions(layer_preset="mlp", progress=False, seed=seed, eigh_dtype=eigh)
    meter = llm_scale.Meter(torch.device("cpu"))
    with llm_scale.measured_fit_parts(meter):
        factors = li.fit_factors(model, train, task, options, covariances=covs)
    sides = [d for layer in factors.extra["eigh_dtypes"].values() for d in layer.values()]
    result = li.compute_pairwise_scores(model, factors, queries, train, task,
                                        self_influence=True, progress=False)
    return {"eigh_seconds": meter.results["eigendecomposition"]["seconds"],
            "float32_sides": sides.count("float32"), "sides": len(sides),
            "pairwise": result.scores.double(), "self": result.self_result.scores.double()}


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    g, r = got.flatten().numpy(), ref.flatten().numpy()
    return {"pearson": float(pearsonr(g, r)[0]), "spearman": float(spearmanr(g, r)[0]),
            "max_diff": float((got - ref).abs().max() / ref.abs().max())}


def main() -> None:
    p = harness.parser(__doc__, threads=2)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--smoke", action="store_true",
                   help="a 2-block GPT-2 of width 64, 16 sequences of 16 tokens, every side "
                        "eligible for float32 (the width threshold lowered to 0)")
    args = p.parse_args()
    if args.smoke:
        args.sequences, args.length, args.queries = 16, 16, 2
        factors_module.FLOAT32_EIGH_MIN_WIDTH = 0
    bench = harness.start(args, quiet=True)
    model, train, queries, task = problem(args)
    runs: dict[str, dict[str, Any]] = {}
    for seed in sorted({s for _, s in MODES}):
        options = li.FitOptions(layer_preset="mlp", progress=False, seed=seed)
        covs = li.fit_covariances(model, train, task, options)
        modes = [e for e, s in MODES if s == seed]
        for j, eigh in enumerate(modes):  # eigenbases spends the sums: a copy for all but one
            own = covs if j == len(modes) - 1 else copy.deepcopy(covs)
            runs[f"{eigh}, seed {seed}"] = fit_and_score(model, train, queries, task, own, eigh,
                                                         seed)
    reference = runs["float64, seed 0"]
    rows, data = [], {}
    for label, run in runs.items():
        pair, own = compare(run["pairwise"], reference["pairwise"]), compare(run["self"],
                                                                             reference["self"])
        data[label] = {"eigh_seconds": run["eigh_seconds"], "float32_sides": run["float32_sides"],
                       "sides": run["sides"], "pairwise": pair, "self": own}
        rows.append([label, f"{run['eigh_seconds']:.1f}", f"{run['float32_sides']}/{run['sides']}",
                     f"{pair['pearson']:.7f}", f"{pair['spearman']:.6f}", f"{pair['max_diff']:.1e}",
                     f"{own['pearson']:.7f}", f"{own['spearman']:.6f}", f"{own['max_diff']:.1e}"])
    shape = "smoke GPT-2 (width 64)" if args.smoke else "GPT-2 small, MLP layers"
    text = (f"{shape}; {args.sequences} sequences x {args.length} random tokens, "
            f"{args.queries} queries; {args.threads} threads; against eigh float64, seed 0; "
            f"{bench.load()}\n\n" + "\n".join(harness.markdown_table(
                ["eigh_dtype, label seed", "eigendecompositions (s)", "sides in float32",
                 "pairwise Pearson", "pairwise Spearman", "pairwise max diff / max",
                 "self Pearson", "self Spearman", "self max diff / max"], rows)) + "\n")
    bench.report("eigh_precision", text, data)


if __name__ == "__main__":
    main()
