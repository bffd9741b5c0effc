"""Reference solvers for the damped Gauss-Newton system: explicit inverse, CG and LiSSA.

Index letters: K vectors solved at once (queries, or examples), N training examples of a batch,
C model outputs per example, O = d_out, I = d_in (+1 bias), P = sum over tracked layers of O * I.

Each solver applies ``(G + D)^-1`` to gradient-shaped vectors, where

    G = (1/N) sum_n J_n^T H_n J_n,   J_n = d f(x_n) / d theta  [C, P],   H_n = d^2 L_n / d f^2  [C, C]

is the Gauss-Newton matrix of the MEAN training loss over the parameters of the tracked layers
(cross-layer blocks included, unlike EK-FAC's block-diagonal approximation), with ``L_n`` the
task's per-example loss summed over tokens (cross-entropy: ``H_n = diag(p_n) - p_n p_n^T``;
squared error: the identity), and ``D`` the damping, one value per layer.

The product ``G v`` is never formed from G: ``J v`` comes from forward mode (``torch.func.jvp``),
``H (J v)`` from forward-over-reverse on the task's loss, ``J^T u`` from reverse mode
(``torch.func.vjp``); K vectors go through at once under ``torch.func.vmap``.

- :class:`ExplicitGGN` builds G densely (P columns of products) and factorises ``G + D``: exact,
  for models with a few thousand parameters.
- :class:`ConjugateGradient` runs (optionally EK-FAC-preconditioned) CG on ``G + D`` with the
  full-data product: exact at convergence, one pass over the training data per iteration.
- :class:`LiSSA` (Agarwal et al. 2017) runs the stochastic Neumann series
  ``h_j = v + (I - (G_j + D) / scale) h_{j-1}``, ``(G + D)^-1 v ~ h_J / scale``, with ``G_j`` the
  product on the j-th random mini-batch.

Each is a :class:`~lightning_influence.factors.Preconditioner`, like the fitted factors, so
every scoring function takes one where it takes EK-FAC factors. A solver couples the layers
(``layerwise = False``): ``compute_self_scores`` then preconditions each batch's per-example
gradients of all layers at once instead of contracting layer by layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from itertools import cycle
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils.data import DataLoader, RandomSampler, Subset

from lightning_influence.factors import (
    Factors,
    Preconditioner,
    PreconditionerBase,
    model_fingerprint,
)
from lightning_influence.functional import TaskModel, cast_batch, parameter_keys, split_state
from lightning_influence.passes import (
    count_examples,
    evaluation_mode,
    iterate_rows,
    model_device,
    ordered_loader,
)
from lightning_influence.scoring import SelfResult, compute_self_scores, self_terms
from lightning_influence.strategies import SOLVER_STRATEGIES, STRATEGY_TABLE
from lightning_influence.task import (
    CausalLMTask,
    ClassificationTask,
    RegressionTask,
    Task,
    resolve_task,
)
from lightning_influence.tracking import LayerTracker

__all__ = [
    "SOLVERS",
    "GaussNewtonOperator",
    "Arnoldi",
    "CurvatureSolver",
    "ExplicitGGN",
    "ConjugateGradient",
    "LiSSA",
    "layer_damping",
    "make_solver",
    "self_influence",
    "solver_self_scores",
]

log = logging.getLogger(__name__)

Vectors = dict[str, Tensor]  # {layer: [K, O, I]}


# ----------------------------------------------------------------------------- vector helpers
def _flatten(vectors: Vectors, names: Sequence[str]) -> Tensor:
    """``{layer: [K, O, I]}`` -> ``[K, P]`` (layers in ``names`` order, each row-major)."""
    return torch.cat([vectors[n].reshape(vectors[n].shape[0], -1) for n in names], dim=1)


def _unflatten(flat: Tensor, shapes: Mapping[str, Sequence[int]]) -> Vectors:
    """``[K, P]`` -> ``{layer: [K, O, I]}``."""
    out, start = {}, 0
    for name, (o, i) in shapes.items():
        out[name] = flat[:, start:start + o * i].reshape(-1, o, i)
        start += o * i
    return out


def layer_damping(damping: float | Mapping[str, float] | Preconditioner, names: Sequence[str],
                  who: str = "damping") -> dict[str, float]:
    """``{layer: damping}`` from a number, a per-layer mapping or :class:`Factors`' damping."""
    if isinstance(damping, Preconditioner):
        damping = damping.damping
    if isinstance(damping, Mapping):
        missing = [n for n in names if n not in damping]
        if missing:
            raise ValueError(f"{who}: damping has no value for layers {missing}; give one per "
                             "tracked layer or a single number.")
        values = {n: float(damping[n]) for n in names}
    else:
        values = dict.fromkeys(names, float(damping))
    bad = {n: v for n, v in values.items() if not v >= 0}
    if bad:
        raise ValueError(f"{who}: damping must be >= 0, got {bad}.")
    return values


# ----------------------------------------------------------------------------- G v
def _math_attention() -> Any:
    """Run ``F.scaled_dot_product_attention`` with its plain math kernel: the fused (flash,
    memory-efficient) kernels have no forward-mode derivative, which the ``J v`` products
    need, so a transformer would otherwise fail with a NotImplementedError from PyTorch."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the old switch
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False,
                                              enable_math=True)
    return sdpa_kernel([SDPBackend.MATH])


class GaussNewtonOperator:
    """Products of the Gauss-Newton matrix of the tracked layers with gradient-shaped vectors.

    The model's parameters and buffers are read once, cast to ``dtype``, and used through
    ``torch.func.functional_call``: the model itself is neither copied nor modified. Products
    run in eval mode.

    Args:
        model: the trained model.
        task: how a batch becomes outputs and per-example losses (its ``loss`` with the true
            labels: for cross-entropy and squared error ``H_n`` does not depend on them).
        tracker: the tracked layers (their parameters are the P coordinates).
        dtype: the dtype of the products (default: the model's).
    """

    def __init__(self, model: nn.Module, task: Task, tracker: LayerTracker,
                 dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.task = task
        self.tracker = tracker
        self.device = model_device(model)
        first = next(model.parameters(), None)
        self.dtype = dtype or (first.dtype if first is not None else torch.float32)
        self.wrapper = TaskModel(model, task)
        self.shapes = {name: tuple(shape) for name, shape in tracker.describe().items()}
        self.param_names = parameter_keys(tracker)  # layer -> {"weight": wrapper key, ...}
        self.refresh()

    def refresh(self) -> None:
        """Read the model's current parameters and buffers again."""
        tracked = [key for keys in self.param_names.values() for key in keys.values()]
        # primals ordered like to_parameters
        self.primals, self.frozen = split_state(self.model, tracked, self.dtype)

    def to_parameters(self, vectors: Vectors) -> dict[str, Tensor]:
        """``{layer: [K, O, I]}`` -> ``{wrapper parameter name: [K, *param.shape]}``."""
        out = {}
        for layer in self.tracker:
            keys = self.param_names[layer.name]
            for kind, value in layer.split_matrix(vectors[layer.name]).items():
                out[keys[kind]] = value
        return out

    def from_parameters(self, params: dict[str, Tensor]) -> Vectors:
        """Inverse of :meth:`to_parameters`."""
        out = {}
        for layer in self.tracker:
            keys = self.param_names[layer.name]
            out[layer.name] = layer.params_to_matrix(params[keys["weight"]],
                                                     params.get(keys.get("bias", "")))
        return out

    def _outputs(self, primals: dict[str, Tensor], batch: Any) -> Tensor:
        return functional_call(self.wrapper, {**self.frozen, **primals}, (batch,))

    def product(self, batch: Any, vectors: Vectors) -> tuple[Vectors, int]:
        """``sum_n J_n^T H_n J_n v`` over one batch for ``vectors {layer: [K, O, I]}``.

        Returns the (summed, not averaged) products and the number of examples N of the batch.
        """
        batch = cast_batch(batch, self.dtype, self.device)
        tangents = self.to_parameters({n: v.to(self.dtype) for n, v in vectors.items()})

        def outputs(p: dict[str, Tensor]) -> Tensor:
            return self._outputs(p, batch)

        with evaluation_mode(self.model), torch.enable_grad(), _math_attention():
            out, pullback = vjp(outputs, self.primals)  # [N, C...]
            hessian_product = self._output_hessian_product(out.detach(), batch)

            def one(tangent: dict[str, Tensor]) -> dict[str, Tensor]:
                _, jv = jvp(outputs, (self.primals,), (tangent,))  # J v  [N, C...]
                return pullback(hessian_product(jv))[0]  # J^T H J v

            result = vmap(one)(tangents)
        return self.from_parameters({k: v.detach() for k, v in result.items()}), int(out.shape[0])

    def _output_hessian_product(self, out: Tensor, batch: Any):
        """``u -> H u`` with ``H = d^2 L / d f^2`` at the outputs ``out`` (per example).

        Closed forms for the built-in cross-entropy (``p * u - p (p . u)`` over the class axis)
        and squared error (the identity); any other task goes through forward-over-reverse
        differentiation of its ``loss``.
        """
        task = self.task
        loss = getattr(type(task), "loss", None)
        if loss is ClassificationTask.loss or loss is CausalLMTask.loss:
            p = torch.softmax(out, dim=-1)
            if loss is CausalLMTask.loss:  # positions without a target count for nothing
                valid = task._shifted_labels(out, batch) != task.ignore_index  # [N, T]
                p = p * valid.unsqueeze(-1).to(p.dtype)

            def softmax_product(u: Tensor) -> Tensor:
                return p * u - p * (p * u).sum(-1, keepdim=True)

            return softmax_product
        if loss is RegressionTask.loss:
            return lambda u: u

        def loss_grad(o: Tensor) -> Tensor:
            return grad(lambda x: task.loss(x, batch).sum())(o)

        return lambda u: jvp(loss_grad, (out,), (u,))[1]

    def block_product(self, batch: Any, vectors: Vectors) -> tuple[Vectors, int]:
        """Like :meth:`product` with the cross-layer blocks of G left out (``G_ll v_l`` for
        every layer l: the block-diagonal, layer-wise system that K-FAC and EK-FAC approximate
        further). One product per layer."""
        out, count = {}, 0
        for name in vectors:
            only = {n: v if n == name else torch.zeros_like(v) for n, v in vectors.items()}
            prod, count = self.product(batch, only)
            out[name] = prod[name]
        return out, count

    def mean_product(self, batches: Any, vectors: Vectors,
                     block_diagonal: bool = False) -> Vectors:
        """``G v``: the product averaged over every example of ``batches`` (a loader or list);
        with ``block_diagonal``, of the layer-wise blocks only."""
        total: Vectors | None = None
        count = 0
        product = self.block_product if block_diagonal else self.product
        for batch in batches:
            prod, n = product(batch, vectors)
            count += n
            total = prod if total is None else {k: total[k] + prod[k] for k in total}
        if total is None or count == 0:
            raise ValueError("The Gauss-Newton product saw no training example: empty dataloader.")
        return {k: v / count for k, v in total.items()}


# ----------------------------------------------------------------------------- solvers
class CurvatureSolver(PreconditionerBase):
    """Base class of the solvers: a :class:`~lightning_influence.factors.Preconditioner` that
    solves ``(G + D) x = v`` with the damped Gauss-Newton product.

    Args:
        model: the trained model.
        loader: the training data the curvature is the mean over (batches as the task expects).
        task: a Task or built-in name (default: the model's ``influence_task``).
        damping: a number for every layer, ``{layer: number}``, or :class:`Factors` whose
            per-layer damping is taken (to solve the same damped system EK-FAC approximates).
        tracker, layers, exclude: the tracked layers (default every Linear/Conv2d).
        dtype: dtype of the solve (default float64; the model is not copied).
        progress: log progress of long solves.
        block_diagonal: solve the layer-wise system (the cross-layer blocks of G left out), the
            system K-FAC and EK-FAC approximate further: a diagnostic that separates what
            ignoring cross-layer curvature costs from what the Kronecker factorisation costs.
            Each product then costs one product per layer.
    """

    strategy = "solver"

    def __init__(self, model: nn.Module, loader: Any, task: Task | str | None = None, *,
                 damping: float | Mapping[str, float] | Factors = 0.0,
                 tracker: LayerTracker | None = None, layers: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, dtype: torch.dtype | None = torch.float64,
                 progress: bool = False, block_diagonal: bool = False) -> None:
        self.task = resolve_task(task, model)
        if tracker is None:
            tracker = (damping.tracker(model) if isinstance(damping, Preconditioner)
                       else LayerTracker(model, layers=layers, exclude=exclude))
        self.layer_tracker = tracker
        self.model = model
        self.loader = loader
        self.shapes = tracker.describe()
        self.names = list(self.shapes)
        self.fingerprint = model_fingerprint(tracker)
        self.num_examples = count_examples(loader)
        self.progress = progress
        self.block_diagonal = block_diagonal
        self._damping = self._resolve_damping(damping)
        self.operator = GaussNewtonOperator(model, self.task, tracker, dtype)
        self.extra: dict[str, Any] = {"block_diagonal": True} if block_diagonal else {}

    def _resolve_damping(self, damping: Any) -> dict[str, float]:
        return layer_damping(damping, self.names, type(self).__name__)

    @property
    def damping(self) -> dict[str, float]:
        return dict(self._damping)

    def tracker(self, model: nn.Module) -> LayerTracker:
        """The solver's own tracker for the model it was built on, else a new one."""
        return self.layer_tracker if model is self.model else super().tracker(model)

    def signature(self) -> dict[str, str]:
        return {**super().signature(), "block_diagonal": str(self.block_diagonal)}

    def _product(self, batch: Any, vectors: Vectors) -> tuple[Vectors, int]:
        """One batch's (summed) product, block-diagonal when the solver is."""
        if self.block_diagonal:
            return self.operator.block_product(batch, vectors)
        return self.operator.product(batch, vectors)

    def damp(self, vectors: Vectors) -> Vectors:
        """``D v``."""
        return {n: v * self._damping[n] for n, v in vectors.items()}

    def solve(self, vectors: Vectors) -> Vectors:
        """``(G + D)^-1 v`` for ``{layer: [K, O, I]}`` in the solver's dtype."""
        raise NotImplementedError

    def precondition(self, gradients: dict[str, Tensor]) -> dict[str, Tensor]:
        """Apply ``(G + D)^-1`` to ``{layer: [Q, O, I]}`` (all layers at once, coupled)."""
        if not gradients:
            return {}
        like = next(iter(gradients.values()))
        k = like.shape[0]
        dtype = self.operator.dtype
        full = {n: (gradients[n].to(dtype) if n in gradients
                    else like.new_zeros(k, *self.shapes[n], dtype=dtype)) for n in self.names}
        solved = self.solve(full)
        return {n: solved[n].to(gradients[n].dtype) for n in gradients}

    def metadata(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "layers": self.shapes, "damping": self.damping,
                "fingerprint": self.fingerprint, "num_examples": self.num_examples,
                "extra": self.extra}


class ExplicitGGN(CurvatureSolver):
    """The dense damped Gauss-Newton matrix ``[P, P]``, factorised once (Cholesky, float64).

    G is built from P columns ``G e_p``, ``chunk`` at a time, with one pass over the training
    data per chunk; memory ``8 P^2`` bytes. For small models only.

    Args:
        max_parameters: refuse models with more tracked parameters than this.
        chunk: columns per pass.
    """

    strategy = "explicit"

    def __init__(self, model: nn.Module, loader: Any, task: Task | str | None = None, *,
                 max_parameters: int = 20_000, chunk: int = 512, **kwargs: Any) -> None:
        super().__init__(model, loader, task, **kwargs)
        p = sum(o * i for o, i in self.shapes.values())
        if p > max_parameters:
            raise ValueError(
                f"ExplicitGGN: the tracked layers have {p} parameters; the dense matrix would "
                f"take {8 * p * p / 2**30:.1f} GiB (max_parameters={max_parameters}). Use "
                "ConjugateGradient or LiSSA, or track fewer layers."
            )
        dtype = self.operator.dtype
        columns = []
        eye = torch.eye(p, dtype=dtype, device=self.operator.device)
        for start in range(0, p, chunk):
            block = _unflatten(eye[start:start + chunk], self.shapes)
            columns.append(_flatten(self.operator.mean_product(loader, block,
                                                               self.block_diagonal), self.names))
        g = torch.cat(columns).T  # [P, P]
        self.matrix = 0.5 * (g + g.T)
        self._diag = torch.cat([torch.full((o * i,), self._damping[n], dtype=dtype)
                                for n, (o, i) in self.shapes.items()]).to(g.device)
        damped = self.matrix + torch.diag(self._diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        self._chol = chol if int(info) == 0 else None
        if self._chol is None:
            log.warning("ExplicitGGN: G + damping is not positive definite (singular without "
                        "damping); using the pseudo-inverse.")
            self._pinv = torch.linalg.pinv(damped, hermitian=True)

    def solve(self, vectors: Vectors) -> Vectors:
        v = _flatten(vectors, self.names)  # [K, P]
        if self._chol is not None:
            x = torch.cholesky_solve(v.T, self._chol).T
        else:
            x = v @ self._pinv
        return _unflatten(x, self.shapes)


class ConjugateGradient(CurvatureSolver):
    """Conjugate gradient on ``(G + D) x = v`` with the full-data Gauss-Newton product.

    All K right-hand sides are solved together (one pass over the training data per iteration
    serves all of them). With ``preconditioner`` (e.g. EK-FAC :class:`Factors`), runs
    preconditioned CG: ``M^-1 r = preconditioner.precondition(r)``.

    Args:
        max_iterations: CG iterations at most.
        rtol: stop when every ``||r|| / ||v||`` is below this.
        preconditioner: optional Factors-like object with ``precondition``.

    Attributes:
        iterations: iterations taken by the last solve; ``residuals [K]``: its final relative
            residuals.
    """

    strategy = "cg"

    def __init__(self, model: nn.Module, loader: Any, task: Task | str | None = None, *,
                 max_iterations: int = 200, rtol: float = 1e-6, preconditioner: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(model, loader, task, **kwargs)
        if max_iterations < 1:
            raise ValueError(f"ConjugateGradient: max_iterations must be >= 1, got "
                             f"{max_iterations}.")
        self.max_iterations = max_iterations
        self.rtol = rtol
        self.preconditioner = preconditioner
        self.iterations = 0
        self.residuals: Tensor | None = None

    def _apply(self, x: Tensor) -> Tensor:
        v = _unflatten(x, self.shapes)
        gv = self.operator.mean_product(self.loader, v, self.block_diagonal)
        dv = self.damp(v)
        return _flatten({n: gv[n] + dv[n] for n in self.names}, self.names)

    def _m_inv(self, r: Tensor) -> Tensor:
        if self.preconditioner is None:
            return r
        z = self.preconditioner.precondition(_unflatten(r, self.shapes))
        return _flatten({n: z[n].to(r.dtype) for n in self.names}, self.names)

    def solve(self, vectors: Vectors) -> Vectors:
        b = _flatten(vectors, self.names)  # [K, P]
        b_norm = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
        x = torch.zeros_like(b)
        r = b.clone()
        z = self._m_inv(r)
        p = z.clone()
        rz = (r * z).sum(1)
        active = r.norm(dim=1) / b_norm > self.rtol
        it = 0
        for it in range(1, self.max_iterations + 1):  # noqa: B007 - kept for the record
            if not active.any():
                it -= 1
                break
            ap = self._apply(p)
            pap = (p * ap).sum(1)
            alpha = torch.where(active & (pap > 0), rz / pap.clamp_min(torch.finfo(b.dtype).tiny),
                                torch.zeros_like(rz))
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            active = active & (r.norm(dim=1) / b_norm > self.rtol)
            z = self._m_inv(r)
            rz_new = (r * z).sum(1)
            beta = torch.where(active, rz_new / rz.clamp_min(torch.finfo(b.dtype).tiny),
                               torch.zeros_like(rz))
            p = z + beta[:, None] * p
            rz = rz_new
            if self.progress and it % 10 == 0:
                log.info("CG iteration %d: max relative residual %.2e", it,
                         float((r.norm(dim=1) / b_norm).max()))
        self.iterations = it
        self.residuals = (r.norm(dim=1) / b_norm).cpu()
        return _unflatten(x, self.shapes)


class LiSSA(CurvatureSolver):
    """LiSSA: the stochastic Neumann series for ``(G + D)^-1 v`` (Agarwal et al. 2017).

    ``h_0 = v``, ``h_j = v + h_{j-1} - (G_j h_{j-1} + D h_{j-1}) / scale``, result
    ``h_J / scale``, averaged over ``repeats`` independent runs. ``G_j`` is the product on the
    j-th random mini-batch. The series converges when ``scale`` exceeds the largest eigenvalue
    of every ``G_j + D``; the error of a direction of eigenvalue ``l`` shrinks by
    ``1 - (l + damping) / scale`` per iteration, so about ``scale / damping`` iterations are
    needed.

    Args:
        iterations: J, the depth of the series.
        scale: the scale; ``None`` estimates ``scale_safety`` x the largest eigenvalue of the
            mini-batch products by power iteration on ``scale_batches`` mini-batches.
        repeats: independent runs averaged.
        batch_size: mini-batch size (default: the loader's).
        seed: seed of the mini-batch draw (each solve restarts it: deterministic).
    """

    strategy = "lissa"

    def __init__(self, model: nn.Module, loader: Any, task: Task | str | None = None, *,
                 iterations: int = 1000, scale: float | None = None, repeats: int = 1,
                 batch_size: int | None = None, seed: int = 0, scale_safety: float = 1.2,
                 scale_batches: int = 4, power_iterations: int = 30, **kwargs: Any) -> None:
        super().__init__(model, loader, task, **kwargs)
        if iterations < 1 or repeats < 1:
            raise ValueError(f"LiSSA: iterations and repeats must be >= 1, got {iterations}, "
                             f"{repeats}.")
        if scale is not None and scale <= 0:
            raise ValueError(f"LiSSA: scale must be > 0, got {scale}.")
        self.iterations = iterations
        self.repeats = repeats
        self.batch_size = batch_size or getattr(loader, "batch_size", None) or 32
        self.seed = seed
        self.scale = scale if scale is not None else scale_safety * self.estimate_scale(
            scale_batches, power_iterations)
        self.extra = {"scale": self.scale, "iterations": iterations, "repeats": repeats,
                      "batch_size": self.batch_size}

    def _batches(self, seed: int) -> Iterator[Any]:
        """An endless stream of random mini-batches (reshuffled every epoch, seeded)."""
        dataset = getattr(self.loader, "dataset", None)
        if dataset is None:  # an iterable loader: cycle it as it comes
            yield from cycle(self.loader)
            return
        gen = torch.Generator().manual_seed(seed)
        drop_last = len(dataset) >= self.batch_size
        loader = DataLoader(dataset, batch_size=self.batch_size,
                            sampler=RandomSampler(dataset, generator=gen),
                            collate_fn=getattr(self.loader, "collate_fn", None),
                            drop_last=drop_last)
        while True:
            yield from loader

    def estimate_scale(self, batches: int = 4, iterations: int = 30) -> float:
        """The largest eigenvalue of ``G_j + D`` over a few mini-batches (power iteration)."""
        stream = self._batches(self.seed + 7919)
        gen = torch.Generator().manual_seed(self.seed)
        dtype = self.operator.dtype
        top = 0.0
        for _ in range(batches):
            batch = next(stream)
            v = {n: torch.randn(1, *s, generator=gen, dtype=dtype) for n, s in self.shapes.items()}
            value = 0.0
            for _ in range(iterations):
                norm = math.sqrt(sum(float(x.square().sum()) for x in v.values()))
                v = {n: x / norm for n, x in v.items()}
                prod, count = self._product(batch, v)
                dv = self.damp(v)
                gv = {n: prod[n] / count + dv[n] for n in self.names}
                value = sum(float((gv[n] * v[n]).sum()) for n in self.names)
                v = gv
            top = max(top, value)
        return top

    def solve(self, vectors: Vectors) -> Vectors:
        total = {n: torch.zeros_like(v) for n, v in vectors.items()}
        for r in range(self.repeats):
            for _, estimate in self.series(vectors, [self.iterations], repeat=r):
                for n in self.names:
                    total[n] += estimate[n]
        return {n: v / self.repeats for n, v in total.items()}

    def series(self, vectors: Vectors, steps: Sequence[int], repeat: int = 0,
               ) -> Iterator[tuple[int, Vectors]]:
        """Yield ``(j, h_j / scale)`` at each depth ``j`` in ``steps`` of one run of the series.

        The estimate at depth j is exactly what a solver with ``iterations=j`` (and the same
        seed) returns with one repeat: a single run gives the whole accuracy-versus-depth path.
        """
        wanted = sorted({int(j) for j in steps})
        if not wanted or wanted[0] < 1:
            raise ValueError(f"LiSSA.series: steps must be >= 1, got {list(steps)}.")
        stream = self._batches(self.seed + repeat)
        h = {n: v.clone() for n, v in vectors.items()}
        for j in range(1, wanted[-1] + 1):
            prod, count = self._product(next(stream), h)
            h = {n: vectors[n] + h[n] - (prod[n] / count + self._damping[n] * h[n]) / self.scale
                 for n in self.names}
            if self.progress and j % 100 == 0:
                log.info("LiSSA repeat %d, iteration %d", repeat, j)
            if j in wanted:
                yield j, {n: v / self.scale for n, v in h.items()}


class Arnoldi(CurvatureSolver):
    """Arnoldi influence (Schioppa et al. 2022): the top eigenpairs of G from a Krylov
    subspace, then the inverse of the damped low-rank approximation.

    ``iterations`` Arnoldi steps from a random start (one full-data product ``G v`` each, with
    full re-orthogonalisation; G is symmetric, so this is Lanczos done carefully) give an
    orthonormal basis ``V [P, m]`` and ``H = V^T G V``; the ``rank`` largest eigenpairs
    ``(theta, s)`` of H give Ritz vectors ``U = V s [P, r]`` and ``G ~ U diag(theta) U^T``. Then,
    by the Woodbury identity with the (diagonal, per-layer) damping D,

        (U diag(theta) U^T + D)^-1 v = D^-1 v - W C (I + U^T W C)^-1 W^T v,
        W = D^-1 U,  C = diag(theta),

    exact for that approximation: directions outside span U keep only the damping (Schioppa et
    al. drop them; with damping they are the damping's). Fitting costs ``iterations`` passes
    over the training data and ``8 m P`` bytes; every later solve is two small products.

    Args:
        iterations: Krylov steps m (full-data products).
        rank: eigenpairs kept (at most ``iterations``; default all of them).
        seed: seed of the random start.

    Attributes:
        eigenvalues: ``[r]`` the kept Ritz values, largest first.
    """

    strategy = "arnoldi"

    def __init__(self, model: nn.Module, loader: Any, task: Task | str | None = None, *,
                 iterations: int = 50, rank: int | None = None, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(model, loader, task, **kwargs)
        if iterations < 1:
            raise ValueError(f"Arnoldi: iterations must be >= 1, got {iterations}.")
        if rank is not None and not 1 <= rank <= iterations:
            raise ValueError(f"Arnoldi: rank must be in 1..iterations ({iterations}), got {rank}.")
        d = torch.cat([torch.full((o * i,), self._damping[n], dtype=self.operator.dtype)
                       for n, (o, i) in self.shapes.items()])
        if not bool((d > 0).all()):
            raise ValueError("Arnoldi: the damping must be > 0 on every layer (directions "
                             "outside the Krylov subspace keep only the damping).")
        self.extra.update(iterations=iterations, rank=rank, seed=seed)
        basis, h = self._krylov(iterations, seed)
        theta, s = torch.linalg.eigh(0.5 * (h + h.T))
        keep = theta.argsort(descending=True)[: rank or len(theta)]
        self.eigenvalues = theta[keep]
        u = basis.T @ s[:, keep]  # [P, r] Ritz vectors
        self._d = d
        self._w = u / d[:, None]  # D^-1 U
        c = torch.diag(self.eigenvalues)
        inner = torch.eye(len(keep), dtype=d.dtype) + (u.T @ self._w) @ c
        self._k = c @ torch.linalg.inv(inner)  # C (I + U^T D^-1 U C)^-1

    def _krylov(self, m: int, seed: int) -> tuple[Tensor, Tensor]:
        """``(V [m', P], H [m', m'])``: the orthonormal Krylov basis and ``V G V^T``."""
        gen = torch.Generator().manual_seed(seed)
        size = sum(o * i for o, i in self.shapes.values())
        v = torch.randn(1, size, generator=gen, dtype=self.operator.dtype)
        rows = [v / v.norm()]
        h = torch.zeros(m + 1, m, dtype=self.operator.dtype)
        for j in range(m):
            gv = self.operator.mean_product(self.loader, _unflatten(rows[j], self.shapes),
                                            self.block_diagonal)
            w = _flatten(gv, self.names)
            for _ in range(2):  # Gram-Schmidt twice: orthogonal to working precision
                coeff = torch.cat(rows) @ w[0]
                h[: j + 1, j] += coeff
                w = w - coeff @ torch.cat(rows)
            h[j + 1, j] = w.norm()
            if self.progress and (j + 1) % 10 == 0:
                log.info("Arnoldi step %d of %d", j + 1, m)
            if j + 1 == m or float(h[j + 1, j]) <= 1e-12 * float(h[: j + 1, : j + 1].abs().max()):
                m = j + 1  # the subspace is exhausted (or complete)
                break
            rows.append(w / h[j + 1, j])
        return torch.cat(rows[:m]), h[:m, :m]

    def solve(self, vectors: Vectors) -> Vectors:
        b = _flatten(vectors, self.names).to(self._d.dtype)  # [K, P]
        x = b / self._d - (b @ self._w) @ self._k.T @ self._w.T
        return _unflatten(x, self.shapes)


# the solver strategies of the strategy table, by name
SOLVERS: dict[str, type[CurvatureSolver]] = {
    name: globals()[STRATEGY_TABLE[name].solver] for name in SOLVER_STRATEGIES}


def make_solver(strategy: str, model: nn.Module, loader: Any, task: Task | str | None = None,
                **kwargs: Any) -> CurvatureSolver:
    """Build a solver by name: ``"explicit"``, ``"cg"`` or ``"lissa"`` (kwargs go to its class)."""
    if strategy not in SOLVERS:
        raise ValueError(f"Unknown solver {strategy!r}; choose one of {list(SOLVERS)}.")
    return SOLVERS[strategy](model, loader, task, **kwargs)


# ----------------------------------------------------------------------------- self-influence
def self_influence(model: nn.Module, preconditioner: Any, loader: Any,
                   task: Task | str | None = None, *, indices: Sequence[int] | Tensor | None = None,
                   batch_size: int = 64, tracker: LayerTracker | None = None) -> Tensor:
    """``score(z_n, z_n) = grad L_n^T P(grad L_n)`` ``[M]`` for examples ``indices`` of a loader.

    Works with any Factors-like ``preconditioner`` (a solver, or EK-FAC :class:`Factors`):
    per-example gradients are built for the chosen examples (all when ``indices`` is None) and
    preconditioned ``batch_size`` at a time.
    """
    layer_terms, _ = _self_terms(model, preconditioner, loader, task, indices=indices,
                                 batch_size=batch_size, tracker=tracker)
    return layer_terms.sum(0)


def solver_self_scores(model: nn.Module, solver: CurvatureSolver, loader: Any,
                       task: Task | str | None = None, *, normalize: bool = False,
                       batch_size: int = 64, tracker: LayerTracker | None = None,
                       progress: bool = True) -> SelfResult:
    """Self-influence of every training example through a solver: :func:`compute_self_scores`
    over ``loader``'s dataset in batches of ``batch_size`` (one solve with K right-hand sides
    per batch: cheap for :class:`ExplicitGGN`, a full iterative solve for
    :class:`ConjugateGradient` and :class:`LiSSA`)."""
    return compute_self_scores(model, solver, ordered_loader(loader, batch_size), task,
                               normalize=normalize, tracker=tracker, progress=progress)


def _self_terms(model: nn.Module, preconditioner: Any, loader: Any, task: Task | str | None,
                *, indices: Sequence[int] | Tensor | None = None, batch_size: int = 64,
                tracker: LayerTracker | None = None, progress: bool = False,
                ) -> tuple[Tensor, Tensor]:
    """Per-layer self-influence terms ``[L, M]`` (float64) and the training losses ``[M]``."""
    task = resolve_task(task, model)
    tracker = tracker or preconditioner.tracker(model)
    preconditioner.check_fits(tracker)
    dataset = loader.dataset
    chosen = range(len(dataset)) if indices is None else [int(i) for i in indices]
    outside = [i for i in chosen if not 0 <= i < len(dataset)]
    if outside:
        raise IndexError(f"Examples {outside[:5]} are outside the training set of "
                         f"{len(dataset)} examples; pass indices in range({len(dataset)}).")
    sub = DataLoader(Subset(dataset, list(chosen)), batch_size=batch_size, shuffle=False,
                     collate_fn=loader.collate_fn)
    terms, losses = [], []
    for _, _, _, rows, batch_losses in iterate_rows(
            model, sub, task, tracker, "loss", shard=False, progress=progress,
            desc=f"influence: self-influence ({preconditioner.strategy}, per example)"):
        terms.append(self_terms(preconditioner, rows, batch_losses.shape[0]).cpu())
        losses.append(batch_losses.double().cpu())
    return torch.cat(terms, dim=1), torch.cat(losses)
