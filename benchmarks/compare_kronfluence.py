"""Compare lightning_influence with Kronfluence on the same trained digits MLP.

Run with the Kronfluence venv, into which our package is installed editable (benchmarks/README.md);
this script installs nothing:

    benchmarks/.venv-kronfluence/bin/python benchmarks/compare_kronfluence.py
    benchmarks/.venv-kronfluence/bin/python benchmarks/compare_kronfluence.py --damping 1e-3

What it does:

1. Trains a 64-128-128-10 ReLU MLP on sklearn digits (80/20 stratified split, AdamW, plain PyTorch).
2. On that SAME model and data, fits both libraries with the same strategy (ekfac | kfac) and the
   same damping (absolute, or each library's 0.1 * mean(Lambda) per-layer heuristic), then scores
   the first ``--queries`` test examples against every training example and computes training
   self-influence. Both use summed per-example cross-entropy, labels sampled from the model for
   the Fisher, the query's cross-entropy as the measurement, and float32 model/data.
3. Prints agreement metrics (ours vs Kronfluence at the same sampling seed, and the noise floor:
   each library against itself under another sampling seed) and wall-clock timings.

Timing: every library runs ``max(2, repeats + 1)`` times (alternating sampling seeds ``seed`` and
``seed + 1``); each stage's time is the MIN over all runs, the first (warm-up) run included. Stages
are timed with ``time.perf_counter`` around the library calls. Kronfluence's times INCLUDE its disk
I/O (it saves factors, then loads them and saves scores; reading the scores back afterwards is not
timed); ours keep everything in memory (no output_dir). Kronfluence's output directory is
``--kf-output-dir`` (default: a temporary directory under the system temp dir).
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile

import harness
import kronfluence_side
import numpy as np
import torch
from digits_protocol import make_digits, make_mlp, train_plain  # the shared digits protocol
from kronfluence_side import run_kronfluence
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li

TOP_K = 10


# ------------------------------------------------------------------------------- data / model
def train_mlp(x, y, *, epochs: int, seed: int, lr: float = 1e-3, weight_decay: float = 1e-2,
              batch_size: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    model = make_mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return train_plain(model, opt, x, y, epochs=epochs, seed=seed, batch_size=batch_size)


# ------------------------------------------------------------------------------- empirical Fisher
class _OursEmpiricalTask(li.ClassificationTask):
    """Our classification task with the TRUE labels in the curvature passes (empirical Fisher)."""

    def sampled_loss(self, outputs, batch, generator):
        return self.loss(outputs, batch)


class _KronfluenceEmpiricalTask(kronfluence_side.ClassificationTask):
    """kronfluence_side's task with the TRUE labels in the curvature passes (empirical Fisher)."""

    def compute_train_loss(self, batch, model, sample: bool = False):
        return super().compute_train_loss(batch, model, sample=False)


def use_empirical_fisher() -> None:
    """Both libraries fit on true labels: no sampling noise, so the two must agree to float
    precision if their semantics (scale, damping, bias, layers) match. run_kronfluence builds
    ``kronfluence_side.ClassificationTask()``; swap in the subclass (helper file unchanged)."""
    kronfluence_side.ClassificationTask = _KronfluenceEmpiricalTask


# ------------------------------------------------------------------------------- our side
def run_ours(model, train_x, train_y, query_x, query_y, *, strategy: str, damping: float | None,
             batch_size: int = 128, seed: int = 0, task=None) -> dict:
    """Our three stages, timed like run_kronfluence (same batch size, in memory)."""
    task = task or "classification"
    model = copy.deepcopy(model).eval()
    train_loader = DataLoader(TensorDataset(train_x, train_y), batch_size=batch_size,
                              shuffle=False)
    query_loader = DataLoader(TensorDataset(query_x, query_y), batch_size=batch_size,
                              shuffle=False)
    clock = harness.Stopwatch()
    factors = li.fit_factors(model, train_loader, task, strategy=strategy,
                             damping=damping, seed=seed, progress=False)
    fit_seconds = clock.lap()
    pairwise = li.compute_pairwise_scores(model, factors, query_loader, train_loader,
                                          task, top_k=TOP_K, keep_scores=True,
                                          progress=False)
    pairwise_seconds = clock.lap()
    self_result = li.compute_self_scores(model, factors, train_loader, task,
                                         progress=False)
    self_seconds = clock.lap()
    return {"pairwise": pairwise.scores, "self": self_result.scores, "factors": factors,
            "fit_seconds": fit_seconds, "pairwise_seconds": pairwise_seconds,
            "self_seconds": self_seconds}


# ------------------------------------------------------------------------------- metrics
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def agreement(a: dict, b: dict) -> dict[str, float]:
    pa, pb = _np(a["pairwise"]), _np(b["pairwise"])
    sa, sb = _np(a["self"]), _np(b["self"])
    q = pa.shape[0]
    top = []
    for i in range(q):
        ta = set(np.argsort(-pa[i], kind="stable")[:TOP_K].tolist())
        tb = set(np.argsort(-pb[i], kind="stable")[:TOP_K].tolist())
        top.append(len(ta & tb) / TOP_K)
    return {
        "spearman_all": float(spearmanr(pa.ravel(), pb.ravel())[0]),
        "pearson_all": float(pearsonr(pa.ravel(), pb.ravel())[0]),
        "spearman_query": float(np.mean([spearmanr(pa[i], pb[i])[0] for i in range(q)])),
        "pearson_query": float(np.mean([pearsonr(pa[i], pb[i])[0] for i in range(q)])),
        "top10": float(np.mean(top)),
        "self_spearman": float(spearmanr(sa, sb)[0]),
        # least-squares slope of a on b (through 0): the scale of a in units of b
        "scale": float((pa * pb).sum() / (pb * pb).sum()),
        # relative Frobenius difference of the pairwise matrices
        "rel_err": float(np.linalg.norm(pa - pb) / np.linalg.norm(pb)),
    }


# ------------------------------------------------------------------------------- main
def main() -> None:
    p = harness.parser(__doc__, threads=2, repeats=1, seed=0, out=None,
                       repeats_help="timed runs after the warm-up (at least 2 runs in all; min "
                                    "is reported)",
                       seed_help="training seed and first label-sampling seed (the second is "
                                 "seed+1)")
    p.add_argument("--damping", type=float, default=None,
                   help="absolute damping for both libraries; default: the 0.1*mean(Lambda) "
                        "per-layer heuristic of each")
    p.add_argument("--strategy", choices=("ekfac", "kfac"), default="ekfac")
    p.add_argument("--queries", type=int, default=100, help="first Q test examples as queries")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--fisher", choices=("sampled", "empirical"), default="sampled",
                   help="labels of the curvature passes: sampled from the model (default, the "
                        "true Fisher) or the true labels (deterministic: a semantics check)")
    p.add_argument("--kf-output-dir", default=None,
                   help="Kronfluence's output directory (default: a fresh temporary directory)")
    args = p.parse_args()

    bench = harness.start(args)
    x_tr, y_tr, x_te, y_te = make_digits()
    train_seconds, model = harness.timed(lambda: train_mlp(x_tr, y_tr, epochs=args.epochs,
                                                           seed=args.seed))
    with torch.no_grad():
        acc = (model(x_te).argmax(-1) == y_te).float().mean().item()
    qx, qy = x_te[: args.queries], y_te[: args.queries]
    n_runs = max(2, args.repeats + 1)
    seeds = [args.seed + (i % 2) for i in range(n_runs)]
    damping_txt = ("heuristic 0.1*mean(Lambda)/layer" if args.damping is None
                   else f"{args.damping:g} (absolute)")

    print(f"torch {torch.__version__}, {args.threads} threads, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {bench.load(end=False)}")
    print(f"MLP 64-128-128-10 (ReLU, AdamW, {args.epochs} epochs, {train_seconds:.1f}s): "
          f"N={len(x_tr)} train, test acc {acc:.4f}; Q={len(qx)} queries")
    print(f"strategy={args.strategy}, damping={damping_txt}, batch={args.batch_size}, "
          f"float32, Fisher labels={args.fisher}, runs per library={n_runs} (seeds {seeds})")

    kw = dict(strategy=args.strategy, damping=args.damping, batch_size=args.batch_size)
    our_task = None
    if args.fisher == "empirical":
        use_empirical_fisher()
        our_task = _OursEmpiricalTask()
    with tempfile.TemporaryDirectory(prefix="kronfluence_") as tmp:
        out_dir = args.kf_output_dir or tmp
        # the libraries alternate, so that drift of the machine hits both alike
        runs = harness.interleave({
            "kronfluence": lambda i: run_kronfluence(model, x_tr, y_tr, qx, qy,
                                                     output_dir=out_dir, seed=seeds[i], **kw),
            "ours": lambda i: run_ours(model, x_tr, y_tr, qx, qy, seed=seeds[i], task=our_task,
                                       **kw),
        }, n_runs)
    kron_times, ours_times = runs["kronfluence"], runs["ours"]
    kron: dict[int, dict] = {}
    ours: dict[int, dict] = {}
    for s, k, o in zip(seeds, kron_times, ours_times, strict=True):
        kron.setdefault(s, k)
        ours.setdefault(s, o)

    s0, s1 = args.seed, args.seed + 1
    rows = [
        ("ours vs Kronfluence (seed s)", agreement(ours[s0], kron[s0])),
        ("ours vs Kronfluence (seed s+1)", agreement(ours[s1], kron[s1])),
        ("Kronfluence s vs s+1", agreement(kron[s0], kron[s1])),
        ("ours s vs s+1", agreement(ours[s0], ours[s1])),
        ("ours s vs Kronfluence s+1", agreement(ours[s0], kron[s1])),
    ]
    cols = [("spearman_all", "Spear.all"), ("pearson_all", "Pears.all"),
            ("spearman_query", "Spear/q"), ("pearson_query", "Pears/q"),
            ("top10", "top10"), ("self_spearman", "selfSpear"), ("scale", "scale a/b"),
            ("rel_err", "|a-b|/|b|")]
    print()
    print(f"{'agreement (a vs b)':32s}" + "".join(f"{c[1]:>10s}" for c in cols))
    for name, m in rows:
        print(f"{name:32s}" + "".join(f"{m[c[0]]:10.4f}" if c[0] != "rel_err" else f"{m[c[0]]:10.1e}"
                                   for c in cols))

    print()
    print(f"{'wall-clock seconds (min of ' + str(n_runs) + ')':32s}{'ours':>10s}{'Kronfl.':>10s}"
          f"{'ours/KF':>10s}")
    stages = [f"{s}_seconds" for s in ("fit", "pairwise", "self")]
    for stage in stages:
        o, k = harness.best(ours_times, stage), harness.best(kron_times, stage)
        print(f"{stage.removesuffix('_seconds'):32s}{o:10.3f}{k:10.3f}{o / k:10.3f}")
    o, k = harness.best_total(ours_times, stages), harness.best_total(kron_times, stages)
    print(f"{'total (min over runs)':32s}{o:10.3f}{k:10.3f}{o / k:10.3f}")
    print("(Kronfluence's times include its disk I/O: saving factors, loading them and saving "
          f"scores under {'--kf-output-dir' if args.kf_output_dir else 'a temp dir'}; ours are in "
          "memory.)")

    print(f"{bench.load()} (timings are only trustworthy when it stays well under the CPU "
          "count)")
    damp = ours[s0]["factors"].damping
    print("ours damping per layer (seed s): "
          + ", ".join(f"{n}={v:.3g}" for n, v in damp.items()))


if __name__ == "__main__":
    main()
