"""Peak memory of top-k scoring does not grow with the training set.

Runs the same scoring job (EK-FAC factors of a digits MLP, pairwise top-k for 32 queries and
self-influence over the training set) in fresh subprocesses, on the training set and on 10x the
training set (the digits repeated with a little noise), and prints each one's peak RSS and the
ratio, measured in one run. Installs nothing.

    python benchmarks/memory.py [--scale 10] [--queries 32] [--threads 2]
"""

from __future__ import annotations

import argparse

import harness


def job(scale: int, queries: int) -> dict:
    import torch
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_influence as li
    from lightning_influence.memory import estimate_bytes, format_estimate

    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    base = DataLoader(TensorDataset(x, y), batch_size=128)
    factors = li.fit_factors(model, base, "classification", progress=False)
    g = torch.Generator().manual_seed(1)
    big_x = torch.cat([x + 0.01 * torch.randn(x.shape, generator=g) for _ in range(scale)])
    train = DataLoader(TensorDataset(big_x, y.repeat(scale)), batch_size=128)
    query = DataLoader(TensorDataset(x[:queries], y[:queries]), batch_size=queries)
    before = harness.max_rss_bytes()
    clock = harness.Stopwatch()
    li.compute_pairwise_scores(model, factors, query, train, "classification", top_k=10,
                               keep_scores=False, progress=False)
    li.compute_self_scores(model, factors, train, "classification", progress=False)
    est = estimate_bytes(factors.shapes, "ekfac", num_queries=queries, batch_size=128,
                         num_train=len(train.dataset))
    return {"scale": scale, "train_size": len(train.dataset),
            "peak_rss_mib": harness.max_rss_bytes() / 2**20,
            "rss_before_scoring_mib": before / 2**20, "seconds": clock.lap(),
            "estimate": format_estimate(est)}


def main() -> None:
    parser = harness.parser(__doc__, threads=2, out=None)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # one scoring job, in this fresh process
        harness.start(args)
        harness.child_result(job(args.child, args.queries))
        return
    results = [harness.run_child(__file__, "--child", str(scale), "--queries", str(args.queries),
                                 "--threads", str(args.threads)) for scale in (1, args.scale)]
    print(f"{'training set':>14}{'examples':>10}{'peak RSS (MiB)':>16}{'scoring s':>11}")  # noqa: T201
    for r in results:
        print(f"{str(r['scale']) + 'x':>14}{r['train_size']:>10}{r['peak_rss_mib']:>16.1f}"  # noqa: T201
              f"{r['seconds']:>11.2f}")
    ratio = results[1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    print(f"peak RSS ratio {args.scale}x / 1x: {ratio:.3f} (target <= 1.2)")  # noqa: T201
    print(results[0]["estimate"])  # noqa: T201


if __name__ == "__main__":
    main()
