"""The damped Gauss-Newton operator, and the base class every solver builds on.

Index letters: K vectors solved at once (queries, or examples), N training examples of a batch,
C model outputs per example, O = d_out, I = d_in (+1 bias), P = sum over tracked layers of O * I.

:class:`GaussNewtonOperator` multiplies gradient-shaped vectors ``{layer: [K, O, I]}`` by

    G = (1/N) sum_n J_n^T H_n J_n,   J_n = d f(x_n) / d theta  [C, P],   H_n = d^2 L_n / d f^2  [C, C]

the Gauss-Newton matrix of the MEAN training loss over the parameters of the tracked layers
(cross-layer blocks included, unlike EK-FAC's block-diagonal approximation), with ``L_n`` the
task's per-example loss summed over tokens (cross-entropy: ``H_n = diag(p_n) - p_n p_n^T``;
squared error: the identity). G is never formed: ``J v`` comes from forward mode
(``torch.func.jvp``), ``H (J v)`` from forward-over-reverse on the task's loss, ``J^T u`` from
reverse mode (``torch.func.vjp``); K vectors go through at once under ``torch.func.vmap``.

:class:`CurvatureSolver` is the :class:`~lightning_influence.factors.Preconditioner` face of a
solver: it holds the operator and the damping ``D`` (one value per layer, :func:`layer_damping`)
and applies ``(G + D)^-1`` to all layers at once; a subclass writes only ``solve``. The
helpers :func:`_flatten` / :func:`_unflatten` move between ``{layer: [K, O, I]}`` and ``[K, P]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from lightning_influence.factors import (
    Factors,
    Preconditioner,
    PreconditionerBase,
    model_fingerprint,
)
from lightning_influence.functional import TaskModel, cast_batch, parameter_keys, split_state
from lightning_influence.options import resolve_options
from lightning_influence.passes import count_examples, evaluation_mode, model_device
from lightning_influence.task import (
    CausalLMTask,
    ClassificationTask,
    RegressionTask,
    Task,
    resolve_task,
)
from lightning_influence.tracking import LayerTracker

__all__ = ["GaussNewtonOperator", "CurvatureSolver", "SolverOptions", "Vectors", "layer_damping"]

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



# ----------------------------------------------------------------------------- the solvers' base
@dataclass
class SolverOptions:
    """What every solver shares.

    Attributes:
        layers, exclude: the tracked layers when neither ``tracker`` nor fitted ``damping``
            names them (default every supported layer).
        dtype: dtype of the solve (default float64; the model is not copied).
        progress: log progress of long solves.
        block_diagonal: solve the layer-wise system (the cross-layer blocks of G left out),
            the system K-FAC and EK-FAC approximate further: a diagnostic that separates what
            ignoring cross-layer curvature costs from what the Kronecker factorisation costs.
            Each product then costs one product per layer.
    """

    layers: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    dtype: torch.dtype | None = torch.float64
    progress: bool = False
    block_diagonal: bool = False


class CurvatureSolver(PreconditionerBase):
    """Base class of the solvers: a :class:`~lightning_influence.factors.Preconditioner` that
    solves ``(G + D) x = v`` with the damped Gauss-Newton product.

    Args:
        model: the trained model.
        loader: the training data the curvature is the mean over (batches as the task expects).
        task: a Task or built-in name (default: the model's ``influence_task``).
        damping: a number for every layer, ``{layer: number}``, or :class:`Factors` whose
            per-layer damping is taken (to solve the same damped system EK-FAC approximates).
        tracker: the tracked layers (default: those of fitted ``damping``, else
            ``options.layers``).
        options: :class:`SolverOptions` (``layers``, ``exclude``, ``dtype``, ``progress``,
            ``block_diagonal``); its fields may also be keywords.
    """

    strategy = "solver"

    def __init__(self, model: nn.Module, loader: Any, task: Task | str | None = None, *,
                 damping: float | Mapping[str, float] | Factors = 0.0,
                 tracker: LayerTracker | None = None, options: SolverOptions | None = None,
                 **overrides: Any) -> None:
        options = resolve_options(SolverOptions, options, overrides, f"{type(self).__name__}()")
        dtype, progress, block_diagonal = options.dtype, options.progress, options.block_diagonal
        self.task = resolve_task(task, model)
        if tracker is None:
            tracker = (damping.tracker(model) if isinstance(damping, Preconditioner)
                       else LayerTracker(model, layers=options.layers, exclude=options.exclude))
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

    def convergence_note(self) -> str | None:
        """A one-line summary of solves that did not converge (None: all did, or the solver
        has no such notion)."""
        return None

    def metadata(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "layers": self.shapes, "damping": self.damping,
                "fingerprint": self.fingerprint, "num_examples": self.num_examples,
                "extra": self.extra}
