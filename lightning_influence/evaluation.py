"""Ground truth for influence: PBRF, leave-one-out retraining and the linear datamodeling score.

Index letters: Q queries, M chosen training examples (or subsets), N training examples,
P parameters of the tracked layers.

Every evaluator reports in the unit and sign of the scores (``positive = proponent``):

- :func:`pbrf` (Bae et al. 2022): the proximal Bregman response to removing example m,

      u* = argmin_u  1/(N eps^2) sum_n D_L(f(theta_s + eps u, x_n), f(theta_s, x_n))
                     - (L_m(theta_s + eps u) - L_m(theta_s)) / eps  +  1/2 sum_layers d_l |u_l|^2

  (``D_L`` the Bregman divergence of the loss in output space, ``d_l`` the damping, ``u`` the
  parameter change in units of eps), and reports ``(f_q(theta_s + eps u*) - f_q(theta_s)) / eps``
  ``[Q, M]``. Linearised, ``u* = (G + D)^-1 grad L_m``, so as ``eps -> 0`` it equals the exact
  damped Gauss-Newton influence; ``eps = 1/N`` (the default) is the removal of one example.
- :func:`leave_one_out`: ``f_q(theta_{-m}) - f_q(theta)`` after retraining from scratch (same
  seed), ``[Q, M]``; about ``score / N``.
- :func:`subset_measurements` + :func:`lds` (Park et al. 2023): retrain on random subsets of a
  fraction of the data; LDS is the Spearman correlation, over subsets, between the measured query
  loss and the loss the scores predict (``-sum_{n in S} score[q, n]``: proponents lower it),
  averaged over queries.

Retraining takes a ``train_fn(indices, seed) -> model`` (:class:`SimpleTrainer` is a plain loop)
and a ``measure_fn(model) -> [Q]`` (:class:`QueryMeasure`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset

from lightning_influence.factors import Factors, Preconditioner
from lightning_influence.functional import TaskModel, cast_batch, parameter_keys, split_state
from lightning_influence.options import ValidationOptions, resolve_options
from lightning_influence.passes import evaluation_mode, move_to_device
from lightning_influence.scoring import compute_pairwise_scores, query_gradients
from lightning_influence.solvers import LiSSA, layer_damping
from lightning_influence.task import ClassificationTask, Task, resolve_task
from lightning_influence.tracking import LayerTracker

__all__ = [
    "PBRFResult",
    "pbrf",
    "leave_one_out",
    "SimpleTrainer",
    "QueryMeasure",
    "SubsetMeasurements",
    "subset_measurements",
    "LDSResult",
    "lds",
    "correlations",
    "validate_influence",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- correlations
def correlations(a: Tensor, b: Tensor) -> dict[str, float]:
    """Agreement of two ``[Q, M]`` score matrices: Pearson and Spearman over all entries, and
    the mean over queries of the per-query (row) Pearson and Spearman."""
    x, y = a.double().cpu().numpy(), b.double().cpu().numpy()
    rows = [(pearsonr(x[i], y[i])[0], spearmanr(x[i], y[i])[0]) for i in range(x.shape[0])
            if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0]
    return {
        "pearson": float(pearsonr(x.ravel(), y.ravel())[0]),
        "spearman": float(spearmanr(x.ravel(), y.ravel())[0]),
        "pearson_per_query": float(np.mean([r[0] for r in rows])) if rows else float("nan"),
        "spearman_per_query": float(np.mean([r[1] for r in rows])) if rows else float("nan"),
    }


# ----------------------------------------------------------------------------- PBRF
@dataclass
class PBRFResult:
    """Proximal Bregman responses.

    Attributes:
        changes: ``[Q, M]`` ``(f_q(theta_s + eps u*_m) - f_q(theta_s)) / eps``: comparable with
            scores (positive = removing example m raises the query measurement = proponent).
        train_indices: ``[M]`` the examples, positions in the training loader's order.
        epsilon: eps.
        iterations: L-BFGS iterations per example; ``grad_norms``: the final gradient norm.
        seconds: wall time of all solves.
    """

    changes: Tensor
    train_indices: Tensor
    epsilon: float
    iterations: list[int] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _batches(loader: Any, dtype: torch.dtype, device: torch.device) -> list[Any]:
    return [cast_batch(b, dtype, device) for b in loader]


def _subset_batch(loader: Any, indices: Sequence[int]) -> Any:
    """One batch holding the examples ``indices`` of a map-style loader's dataset."""
    return loader.collate_fn([loader.dataset[int(i)] for i in indices])


@dataclass
class PBRFOptions:
    """How :func:`pbrf` optimises each example's response.

    Attributes:
        epsilon: the up-weight of ``-L_m``; None: ``1 / N`` (removal of one example).
        max_iterations: L-BFGS iterations at most per example.
        tolerance: stop when the largest gradient entry of the (eps-scaled) objective is below.
        history_size: L-BFGS history.
        dtype: the dtype of the optimisation (float64: the reference).
        layers: the parameters optimised when ``damping`` is no fitted preconditioner (name
            patterns, as for :class:`~lightning_influence.LayerTracker`; None: every supported
            layer).
    """

    epsilon: float | None = None
    max_iterations: int = 500
    tolerance: float = 1e-9
    history_size: int = 50
    dtype: torch.dtype = torch.float64
    layers: Sequence[str] | None = None


def pbrf(model: nn.Module, train_loader: Any, query_loader: Any, task: Task | str | None,
         train_indices: Sequence[int] | Tensor, *,
         damping: float | Mapping[str, float] | Factors, options: PBRFOptions | None = None,
         **overrides: Any) -> PBRFResult:
    """The proximal Bregman response function for chosen training examples (module docstring).

    Each example's objective is minimised from ``u = 0`` with full-batch L-BFGS (strong Wolfe
    line search) over the parameters of the tracked layers, in ``options.dtype``; the model is
    not modified. Cost: about ``max_iterations`` full passes over the training data per example.

    Args:
        model: the trained model theta_s.
        train_loader: the training data (map-style dataset; indices refer to it).
        query_loader: the queries; their measurement is the task's ``measurement``.
        task: a Task or built-in name.
        train_indices: the M examples m.
        damping: the proximity weight per layer (a number, a mapping, or EK-FAC
            :class:`Factors`' damping), the same ``D`` as the influence being checked; fitted
            factors also choose the tracked layers.
        options: :class:`PBRFOptions` (``epsilon``, ``max_iterations``, ``tolerance``,
            ``history_size``, ``dtype``, ``layers``); its fields may also be keywords.
    """
    options = resolve_options(PBRFOptions, options, overrides, "pbrf()")
    epsilon, max_iterations, tolerance = options.epsilon, options.max_iterations, options.tolerance
    history_size, dtype = options.history_size, options.dtype
    task = resolve_task(task, model)
    tracker = (damping.tracker(model) if isinstance(damping, Preconditioner)
               else LayerTracker(model, layers=options.layers))
    names = tracker.names()
    per_layer = layer_damping(damping, names, "pbrf")
    device = next(model.parameters()).device
    wrapper = TaskModel(model, task)
    keys = {name: list(kinds.values()) for name, kinds in parameter_keys(tracker).items()}
    tracked = [k for name in names for k in keys[name]]
    base, frozen = split_state(model, tracked, dtype)
    weights = {k: per_layer[name] for name in names for k in keys[name]}

    def outputs(params: dict[str, Tensor], batch: Any) -> Tensor:
        return task.logits(functional_call(wrapper, {**frozen, **params}, (batch,)))

    train = _batches(train_loader, dtype, device)
    queries = _batches(query_loader, dtype, device)
    n_train = len(train_loader.dataset)
    eps = float(epsilon) if epsilon is not None else 1.0 / n_train
    closed_form = type(task).loss is ClassificationTask.loss
    with torch.no_grad(), evaluation_mode(model):
        base_out = [outputs(base, b) for b in train]
        base_query = torch.cat([task.measurement(outputs(base, b), b) for b in queries])
    base_logp = [torch.log_softmax(o, -1) for o in base_out] if closed_form else None
    base_grad = []
    if not closed_form:
        for o, b in zip(base_out, train, strict=True):
            o = o.detach().requires_grad_(True)
            with torch.enable_grad():
                base_grad.append(torch.autograd.grad(task.loss(o, b).sum(), o)[0])
            del o
    base_loss = [task.loss(o, b).detach() for o, b in zip(base_out, train, strict=True)]

    def bregman(out: Tensor, i: int) -> Tensor:
        """``sum_n D_L(out_n, base_n)`` for training batch ``i``."""
        if closed_form:  # cross-entropy: KL(p_s || p), label-free
            logp_s = base_logp[i]
            return (logp_s.exp() * (logp_s - torch.log_softmax(out, -1))).sum()
        b = train[i]
        diff = task.loss(out, b) - base_loss[i]
        return diff.sum() - (base_grad[i] * (out - base_out[i])).sum()

    indices = [int(i) for i in (train_indices.tolist() if isinstance(train_indices, Tensor)
                                else train_indices)]

    def respond(m: int) -> tuple[Tensor, int, float]:
        """Minimise example m's objective; its query changes ``[Q]``, iterations, |grad|."""
        example = cast_batch(_subset_batch(train_loader, [m]), dtype, device)
        with torch.no_grad():
            base_m = task.loss(outputs(base, example), example).sum()
        u = {k: torch.zeros_like(v, requires_grad=True) for k, v in base.items()}

        def closure() -> Tensor:
            for p in u.values():
                p.grad = None
            total = 0.0
            for i, b in enumerate(train):  # one backward per batch: memory of one batch
                params = {k: base[k] + eps * u[k] for k in base}
                term = bregman(outputs(params, b), i) / (n_train * eps * eps)
                term.backward()
                total += float(term.detach())
            params = {k: base[k] + eps * u[k] for k in base}
            rest = -(task.loss(outputs(params, example), example).sum() - base_m) / eps
            rest = rest + 0.5 * sum(weights[k] * u[k].square().sum() for k in u)
            rest.backward()
            return torch.tensor(total + float(rest.detach()), dtype=dtype)

        opt = torch.optim.LBFGS(list(u.values()), lr=1.0, max_iter=max_iterations,
                                history_size=history_size, tolerance_grad=tolerance,
                                tolerance_change=0.0, line_search_fn="strong_wolfe")
        with torch.enable_grad():
            opt.step(closure)
        steps = int(opt.state[opt.param_groups[0]["params"][0]].get("n_iter", 0))
        # With ReLUs the objective is piecewise smooth: L-BFGS may stop at a kink with a gradient
        # above tolerance (restarting does not help); grad_norms reports it.
        norm = float(max(p.grad.abs().max() for p in u.values()))
        with torch.no_grad():
            params = {k: base[k] + eps * u[k] for k in base}
            query = torch.cat([task.measurement(outputs(params, b), b) for b in queries])
        return (query - base_query) / eps, steps, norm

    changes, iterations, grad_norms = [], [], []
    start = time.perf_counter()
    with evaluation_mode(model):
        for m in indices:
            change, steps, norm = respond(m)
            changes.append(change)
            iterations.append(steps)
            grad_norms.append(norm)
    return PBRFResult(torch.stack(changes, dim=1).cpu(), torch.tensor(indices), eps,
                      iterations, grad_norms, time.perf_counter() - start)


# ----------------------------------------------------------------------------- retraining
@dataclass
class TrainingRecipe:
    """The loop :class:`SimpleTrainer` retrains with.

    Attributes:
        epochs, batch_size, lr, weight_decay: of the loop.
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"``.
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ValueError(f"SimpleTrainer: optimizer={self.optimizer!r}; choose 'adamw', "
                             "'adam' or 'sgd'.")


class SimpleTrainer:
    """A plain PyTorch training loop, seeded, for retraining on subsets (LOO, LDS).

    ``trainer(indices, seed)`` builds ``make_model()`` under ``torch.manual_seed(seed)``, trains
    it on the examples ``indices`` of ``dataset`` (mean of the task's per-example loss,
    reshuffled every epoch by a generator seeded with ``seed``) and returns it in eval mode.

    Args:
        make_model: builds a fresh model.
        dataset: the full training set (map-style).
        task: how a batch becomes per-example losses.
        recipe: the loop's :class:`TrainingRecipe` (``epochs``, ``batch_size``, ``lr``,
            ``weight_decay``, ``optimizer``); its fields may also be keywords.
        collate_fn: the loader's collate function (default PyTorch's).
    """

    def __init__(self, make_model: Callable[[], nn.Module], dataset: Any,
                 task: Task | str = "classification", recipe: TrainingRecipe | None = None, *,
                 collate_fn: Callable | None = None, **overrides: Any) -> None:
        recipe = resolve_options(TrainingRecipe, recipe, overrides, "SimpleTrainer()")
        self.make_model = make_model
        self.dataset = dataset
        self.task = resolve_task(task)
        self.epochs, self.batch_size = recipe.epochs, recipe.batch_size
        self.lr, self.weight_decay, self.optimizer = (recipe.lr, recipe.weight_decay,
                                                      recipe.optimizer)
        self.collate_fn = collate_fn

    def __call__(self, indices: Sequence[int] | Tensor | None, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = self.make_model()
        subset = self.dataset if indices is None else Subset(
            self.dataset, [int(i) for i in indices])
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(subset, batch_size=self.batch_size, shuffle=True, generator=gen,
                            collate_fn=self.collate_fn)
        params = model.parameters()
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        elif self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        device = next(model.parameters()).device
        model.train()
        for _ in range(self.epochs):
            for batch in loader:
                batch = move_to_device(batch, device)
                loss = self.task.loss(self.task.forward(model, batch), batch).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return model.eval()


class QueryMeasure:
    """``measure(model) -> [Q]``: the task's measurement of every query (no gradients)."""

    def __init__(self, query_loader: Any, task: Task | str = "classification") -> None:
        self.loader = query_loader
        self.task = resolve_task(task)

    def __call__(self, model: nn.Module) -> Tensor:
        device = next(model.parameters()).device
        out = []
        with torch.no_grad(), evaluation_mode(model):
            for batch in self.loader:
                batch = move_to_device(batch, device)
                out.append(self.task.measurement(self.task.forward(model, batch), batch).double())
        return torch.cat(out).cpu()


def leave_one_out(train_fn: Callable[[Tensor | None, int], nn.Module],
                  measure_fn: Callable[[nn.Module], Tensor], num_train: int,
                  indices: Sequence[int] | Tensor, *, seeds: Sequence[int] = (0,)) -> Tensor:
    """``[Q, M]``: ``f_q(theta_{-m}) - f_q(theta)``, each retrained with the same seed as the
    full model, averaged over ``seeds`` (about ``score / N``; positive = proponent)."""
    everything = torch.arange(num_train)
    out = []
    full = {s: measure_fn(train_fn(everything, s)) for s in seeds}
    for m in (indices.tolist() if isinstance(indices, Tensor) else indices):
        keep = everything[everything != int(m)]
        out.append(torch.stack([measure_fn(train_fn(keep, s)) - full[s] for s in seeds]).mean(0))
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------- LDS
@dataclass
class SubsetMeasurements:
    """Query measurements of models retrained on random subsets.

    Attributes:
        masks: ``[M, N]`` True where example n was in subset j.
        measurements: ``[M, Q]`` each query's measurement after training on subset j (mean
            over ``repeats`` seeds).
        fraction, seed, repeats: how the subsets were drawn and trained.
        seconds: wall time of the retraining.
    """

    masks: Tensor
    measurements: Tensor
    fraction: float
    seed: int
    repeats: int = 1
    seconds: float = 0.0


def subset_measurements(train_fn: Callable[[Tensor | None, int], nn.Module],
                        measure_fn: Callable[[nn.Module], Tensor], num_train: int, *,
                        num_subsets: int = 50, fraction: float = 0.5, seed: int = 0,
                        repeats: int = 1) -> SubsetMeasurements:
    """Retrain on ``num_subsets`` random subsets of ``round(fraction * N)`` examples (seeded)
    and measure every query; each subset is trained with ``repeats`` seeds, averaged."""
    if not 0 < fraction < 1:
        raise ValueError(f"subset_measurements: fraction must be in (0, 1), got {fraction}.")
    if num_subsets < 2:
        raise ValueError(f"subset_measurements: num_subsets must be >= 2, got {num_subsets}.")
    gen = torch.Generator().manual_seed(seed)
    size = max(1, round(fraction * num_train))
    masks = torch.zeros(num_subsets, num_train, dtype=torch.bool)
    values = []
    start = time.perf_counter()
    for j in range(num_subsets):
        chosen = torch.randperm(num_train, generator=gen)[:size].sort().values
        masks[j, chosen] = True
        runs = [measure_fn(train_fn(chosen, seed * 100_003 + j * 101 + r)) for r in range(repeats)]
        values.append(torch.stack(runs).mean(0))
    return SubsetMeasurements(masks, torch.stack(values), fraction, seed, repeats,
                              time.perf_counter() - start)


@dataclass
class LDSResult:
    """Linear datamodeling score: ``mean`` over queries of ``per_query [Q]`` Spearman."""

    mean: float
    per_query: Tensor


def lds(scores: Tensor, subsets: SubsetMeasurements) -> LDSResult:
    """LDS of ``scores [Q, N]`` (positive = proponent) against retrained subset measurements.

    For query q and subset S_j the scores predict the measurement ``-sum_{n in S_j} score[q, n]``
    (up to a constant and scale); LDS is Spearman(prediction, measured) over j, averaged over q.
    """
    if scores.shape[1] != subsets.masks.shape[1]:
        raise ValueError(f"lds: scores cover {scores.shape[1]} training examples, the subsets "
                         f"{subsets.masks.shape[1]}.")
    if scores.shape[0] != subsets.measurements.shape[1]:
        raise ValueError(f"lds: {scores.shape[0]} queries scored, {subsets.measurements.shape[1]} "
                         "measured.")
    predicted = -(subsets.masks.double() @ scores.double().T.cpu())  # [M, Q]
    per_query = []
    for q in range(scores.shape[0]):
        a, b = predicted[:, q].numpy(), subsets.measurements[:, q].double().numpy()
        rho = spearmanr(a, b)[0] if np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")
        per_query.append(float(rho))
    per_query_t = torch.tensor(per_query, dtype=torch.float64)
    return LDSResult(float(np.nanmean(per_query)), per_query_t)


# ----------------------------------------------------------------------------- validation
def validate_influence(model: nn.Module, factors: Factors, query_loader: Any, train_loader: Any,
                       task: Task | str | None = None, options: ValidationOptions | None = None,
                       **overrides: Any) -> dict[str, float]:
    """Check EK-FAC (or any factors) on a user's model against LiSSA and, optionally, PBRF.

    On a seeded sample of ``num_train`` training examples, scores the queries with ``factors``
    and with LiSSA on the same damped Gauss-Newton system (the factors' per-layer damping), and
    reports their correlations. LiSSA's own convergence is reported as the correlation of its
    estimate at half depth with the full-depth one (near 1: converged). With
    ``pbrf_examples > 0`` the first that many sampled examples also get PBRF responses, and both
    estimates are correlated with them.

    Args:
        options: :class:`~lightning_influence.options.ValidationOptions` (``num_train``,
            ``seed``, ``lissa_iterations``, ``lissa_options``, ``pbrf_examples``,
            ``pbrf_options``); its fields may also be keywords.

    Returns:
        A flat dict of metrics (``"<a>_vs_<b>/<correlation>"``, ``"seconds/<stage>"``,
        ``"lissa/scale"``...).
    """
    if "lissa" in overrides:  # the earlier keyword: LiSSA's arguments, iterations included
        lissa = dict(overrides.pop("lissa") or {})
        overrides.setdefault("lissa_iterations", lissa.pop("iterations", 500))
        overrides.setdefault("lissa_options", lissa or None)
    options = resolve_options(ValidationOptions, options, overrides, "validate_influence()")
    num_train, seed, pbrf_examples = options.num_train, options.seed, options.pbrf_examples
    task = resolve_task(task, model)
    n = len(train_loader.dataset)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[:min(num_train, n)].sort().values
    sample = DataLoader(Subset(train_loader.dataset, chosen.tolist()),
                        batch_size=getattr(train_loader, "batch_size", None) or 64, shuffle=False,
                        collate_fn=train_loader.collate_fn)
    metrics: dict[str, float] = {"num_train": float(len(chosen))}
    t0 = time.perf_counter()
    ours = compute_pairwise_scores(model, factors, query_loader, sample, task, top_k=1,
                                   progress=False).scores
    metrics[f"seconds/{factors.strategy}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    solver = LiSSA(model, train_loader, task, damping=factors,
                   **{**(options.lissa_options or {}), "iterations": options.lissa_iterations})
    half = max(1, solver.iterations // 2)
    grads = query_gradients(model, query_loader, task, factors, precondition=False,
                            progress=False)
    grads = {k: v.to(solver.operator.dtype) for k, v in grads.items()}
    estimates = dict(solver.series(grads, [half, solver.iterations]))
    lissa_scores = {}
    for depth, estimate in estimates.items():
        lissa_scores[depth] = compute_pairwise_scores(
            model, solver, query_loader, sample, task, top_k=1, progress=False,
            query_grads={k: v.float() for k, v in estimate.items()}).scores
    metrics["seconds/lissa"] = time.perf_counter() - t0
    metrics["lissa/scale"] = float(solver.scale)
    metrics["lissa/iterations"] = float(solver.iterations)
    full = lissa_scores[solver.iterations]
    for key, value in correlations(ours, full).items():
        metrics[f"{factors.strategy}_vs_lissa/{key}"] = value
    for key, value in correlations(lissa_scores[half], full).items():
        metrics[f"lissa_half_vs_full/{key}"] = value
    if pbrf_examples > 0:
        picked = chosen[:pbrf_examples]
        t0 = time.perf_counter()
        response = pbrf(model, train_loader, query_loader, task, picked, damping=factors,
                        **(options.pbrf_options or {})).changes
        metrics["seconds/pbrf"] = time.perf_counter() - t0
        k = len(picked)
        for name, scores in ((factors.strategy, ours), ("lissa", full)):
            for key, value in correlations(scores[:, :k], response).items():
                metrics[f"{name}_vs_pbrf/{key}"] = value
    return metrics
