"""What factor dtypes and block-diagonal factors do to the scores (issue 21).

    .venv/bin/python benchmarks/factor_precision.py              # mlp and gpt, ~10 min on 2 cores
    .venv/bin/python benchmarks/factor_precision.py --tasks mlp --subsets 60

On the tasks of ``accuracy_tasks.py`` (the digits MLP, 64-128-128-10; the character GPT, two
blocks of width 32), for each configuration of the EK-FAC factors:

- ``factor_dtype`` float64 (the reference), float32 (eigendecomposed in float32, the default,
  and in float64) and bfloat16 (float32 sums, bfloat16 eigenbases and eigenvalues), whole factors;
- block-diagonal factors (``block_size`` B) in float64, for B below the layers' widths;

it reports, over ``--seeds`` label-sampling seeds, the Pearson and Spearman correlation of the
pairwise scores ``[Q, N]`` with float64 whole factors of the same seed (what the change itself
does, free of sampling noise), and LDS against models retrained on ``--subsets`` random halves
(the ground truth is cached with accuracy_tasks.py's, in ``<out>/cache``). Writes
``<out>/factor_precision.md`` and ``.json``.
"""

from __future__ import annotations

import statistics
from typing import Any

import accuracy_tasks
import harness
import torch
from scipy.stats import pearsonr, spearmanr

import lightning_influence as li
from lightning_influence.evaluation import lds


def configurations(problem: Any, blocks: list[int]) -> list[tuple[str, dict[str, Any]]]:
    out = [("float64 (reference)", {"factor_dtype": "float64"}),
           ("float32", {"factor_dtype": "float32"}),
           ("float32, float64 eigh", {"factor_dtype": "float32", "eigh_dtype": "float64"}),
           ("bfloat16", {"factor_dtype": "bfloat16"})]
    widest = max(max(shape) for shape in li.LayerTracker(problem.model).describe().values())
    out += [(f"block_size={b} (float64)", {"factor_dtype": "float64", "block_size": b})
            for b in blocks if b < widest]
    return out


def scores(problem: Any, seed: int, **options: Any) -> torch.Tensor:
    factors = li.fit_factors(problem.model, problem.train, problem.task, seed=seed,
                             progress=False, **options)
    return li.compute_pairwise_scores(problem.model, factors, problem.queries, problem.train,
                                      problem.task, progress=False).scores.double()


def main() -> None:
    p = harness.parser(__doc__, threads=2)
    p.add_argument("--tasks", default="mlp,gpt")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--subsets", type=int, default=60)
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--blocks", default="64,32,16")
    p.add_argument("--conv-epochs", type=int, default=20)
    args = p.parse_args()
    bench = harness.start(args)
    blocks = [int(b) for b in args.blocks.split(",") if b]
    lines, summary = [], {}
    for name in args.tasks.split(","):
        problem = accuracy_tasks.Problem(name, args)
        problem.model = problem.train_fn(None, 0)
        truth = accuracy_tasks.ground_truth(problem, args, bench.out / "cache")
        rows = {}
        reference = {seed: scores(problem, seed, factor_dtype="float64")
                     for seed in range(args.seeds)}
        for label, options in configurations(problem, blocks):
            pear, spear, ldss = [], [], []
            for seed in range(args.seeds):
                got = reference[seed] if options == {"factor_dtype": "float64"} else scores(
                    problem, seed, **options)
                pear.append(pearsonr(got.flatten(), reference[seed].flatten())[0])
                spear.append(spearmanr(got.flatten(), reference[seed].flatten())[0])
                ldss.append(lds(got, truth).mean)
            rows[label] = {"pearson": min(pear), "spearman": min(spear),
                           "lds_mean": statistics.mean(ldss),
                           "lds_std": statistics.stdev(ldss) if len(ldss) > 1 else 0.0}
            print(f"[{name}] {label}: Pearson {min(pear):.6f}, Spearman {min(spear):.6f}, "
                  f"LDS {rows[label]['lds_mean']:.3f}", flush=True)
        summary[name] = rows
        shapes = li.LayerTracker(problem.model).describe()
        lines += [f"**{name}** (layers [O, I]: {', '.join(f'{v}' for v in shapes.values())}; "
                  f"N={len(problem.train_set)}, Q={len(problem.query_set)})", "",
                  *harness.markdown_table(
                      ["factors", "Pearson vs float64 (min over seeds)", "Spearman (min)",
                       "LDS mean ± std"],
                      [[label, f"{r['pearson']:.6f}", f"{r['spearman']:.6f}",
                        f"{r['lds_mean']:.3f} ± {r['lds_std']:.3f}"]
                       for label, r in rows.items()], align="lrrr"), ""]
    head = (f"EK-FAC with other factor dtypes and block-diagonal factors, against float64 whole "
            f"factors of the same label-sampling seed ({args.seeds} seeds); LDS over "
            f"{args.subsets} retrained halves; {bench.load()}")
    bench.report("factor_precision", "\n".join([head, "", *lines]) + "\n", summary)


if __name__ == "__main__":
    main()
