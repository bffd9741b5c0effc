"""Curvature factors: eigenbases, eigenvalues, damping, preconditioning, files.

Index letters: Q queries (or any leading batch of matrices), O = d_out, I = d_in (+1 bias).

Per tracked layer the damped curvature block is ``Q_S diag(Lambda + damping) Q_S^T`` in the
Kronecker eigenbasis, and its inverse applied to a gradient-shaped ``V [..., O, I]`` is

    P(V) = Q_S [ (Q_S^T V Q_A) / (Lambda + damping) ] Q_A^T.

Strategies differ only in what they store (the table is :mod:`lightning_influence.strategies`):
identity stores nothing, diagonal Lambda in the identity basis, kfac and ekfac Lambda and the
Kronecker eigenbases.

K-FAC's ``A`` and ``S`` are means over rows (tokens); an example with T rows contributes
``sum_t g_t a_t^T``, so ``l_S l_A^T`` is multiplied by the mean number of rows per example to sit
on the same per-example scale as EK-FAC's Lambda (this is the tokens-vs-examples mismatch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_influence import fingerprint
from lightning_influence.blocks import BlockDiagonal, blocked_shape, rows_times, rows_times_t
from lightning_influence.io import (
    atomic_save_json,
    atomic_save_safetensors,
    read_safetensors,
    tensors_checksum,
)
from lightning_influence.strategies import STRATEGIES, strategy
from lightning_influence.tracking import LayerTracker

__all__ = [
    "STRATEGIES",
    "LayerFactors",
    "Damping",
    "Factors",
    "FactorMismatchError",
    "Preconditioner",
    "PreconditionerBase",
    "eigendecompose",
    "model_fingerprint",
]

FORMAT_VERSION = 3  # 3: the whole-model fingerprint
_HEADER_KEY = "lightning_influence"


class FactorMismatchError(ValueError):
    """Factors on disk (or in memory) were fitted for another model, layer set or strategy."""


class CorruptFactorsError(FactorMismatchError):
    """A factor file that cannot be trusted: unreadable, truncated, edited or inconsistent."""


def content_checksum(tensors: dict[str, Tensor], meta: dict[str, Any]) -> str:
    """Checksum of the tensors and the metadata (canonical JSON without its ``checksum``)."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return tensors_checksum(tensors, json.dumps(body, sort_keys=True, default=str))


def checked_metadata(header: str, tensors: dict[str, Tensor], version: int,
                     corrupt: Any) -> dict[str, Any]:
    """The metadata of a file written with :func:`content_checksum` (factor files, index
    manifests): its JSON ``header`` parsed, its format ``version`` and its checksum over
    ``tensors`` checked; ``corrupt(reason)`` makes the error raised otherwise."""
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as err:
        raise corrupt(f"its metadata is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format_version") != version:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise corrupt(f"format version {found}, this version reads {version}")
    if meta.get("checksum") != content_checksum(tensors, meta):
        raise corrupt("its checksum does not match its contents (flipped bytes, or an edited "
                      "field)")
    return meta


def eigendecompose(matrix: Tensor, what: str, layer: str, dim: int | None = None,
                   dtype: torch.dtype | None = torch.float64,
                   ) -> tuple[Tensor, Tensor | BlockDiagonal]:
    """``eigh`` in ``dtype`` (float64 by default; ``None``: chosen by :func:`eigh_dtype_for`)
    of a covariance side: ``(eigenvalues [D], eigenvectors [D, D])``.

    ``matrix`` may be ``[K, B, B]``, the diagonal blocks of a side of width ``dim`` (see
    :mod:`lightning_influence.blocks`): the eigenvectors are then a
    :class:`~lightning_influence.blocks.BlockDiagonal`, and the last block, narrower than B
    when ``dim < K B``, is decomposed on its real ``r x r`` part (the identity on its padding).
    Only the lower triangle is read (the sums are symmetric to rounding); the eigenvalues come
    back in float64, negative rounding noise clamped to 0.
    """
    if not bool(torch.isfinite(matrix.sum(dtype=torch.float64))):
        raise FloatingPointError(
            f"The {what} covariance of layer {layer!r} holds NaN/Inf; the statistics pass saw "
            "non-finite activations or gradients. Check the data and the model."
        )
    if matrix.dim() not in (2, 3) or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(f"The {what} covariance of layer {layer!r} has shape "
                         f"{tuple(matrix.shape)}; a square matrix was expected (fit the "
                         "statistics again).")
    dtype = eigh_dtype_for(matrix, dtype)
    if matrix.dim() == 3:
        return _eigendecompose_blocks(matrix, what, layer, dim, dtype)
    values, vectors = _eigh(matrix.to(dtype), what, layer)
    return values.double().clamp_min(0.0), vectors


#: ``eigh_dtype="auto"`` decomposes a float32 side in float32 only when it is at least this wide
#: (narrower ones cost little in float64) ...
FLOAT32_EIGH_MIN_WIDTH = 1024
#: ... and its condition number is checked to be at most this. float32 ``eigh``'s backward error
#: (measured: 10-15 float32 epsilons of the largest eigenvalue at width 3072) is then at most
#: ~2% of the smallest eigenvalue (2.5e-4 measured on GPT-2's MLP sides, in the covariance's own
#: metric); on nearly singular sides it would be many times the smallest eigenvalues.
FLOAT32_EIGH_MAX_CONDITION = 1e4


def float32_suffices(matrix: Tensor, bound: float = FLOAT32_EIGH_MAX_CONDITION) -> bool:
    """Whether a covariance side (symmetric; its lower triangle is read) is positive definite
    with condition number at most about ``bound``, checked in float64: its largest eigenvalue
    ``l`` estimated by block power iteration (a lower bound, from 8 fixed start vectors: the
    global random state is not touched), then a Cholesky factorization of ``A - (l / bound) I``,
    which succeeds only if every eigenvalue exceeds ``l / bound``.

    About 10% of a float64 ``eigh`` at width 3072 (0.3 s of 3.1 s on 2 cores; a float32
    ``eigh`` takes 1.6 s). On GPT-2 small's MLP layers it admits the 12 gradient sides (condition
    numbers 430-2,100) and refuses the 12 activation sides (1e5-3e6); the scores move by 1.6e-3
    of the largest (Pearson 0.999998 with float64's), another label-sampling seed by 0.21
    (``benchmarks/results/eigh_precision.md``).
    """
    if matrix.dim() != 2 or matrix.shape[0] < 2:
        return False
    lower = torch.tril(matrix).float()  # A x = L x + L^T x - diag(A) x
    diagonal = lower.diagonal().clone()

    def times(x: Tensor) -> Tensor:  # (x^T L)^T: a transposed L is 4x slower on the CPU
        return lower @ x + (x.T @ lower).T - diagonal[:, None] * x

    generator = torch.Generator(device=lower.device).manual_seed(0)
    x = torch.randn(lower.shape[0], 8, generator=generator, dtype=lower.dtype,
                    device=lower.device)
    for _ in range(6):
        x = torch.linalg.qr(times(x)).Q
    top = float(torch.linalg.eigvalsh((x.T @ times(x)).double())[-1])
    del x
    if not (0 < top < float("inf")):
        return False
    shifted = matrix.to(torch.float64, copy=True)  # Cholesky reads the lower triangle
    shifted.diagonal().sub_(top / bound)
    _, info = torch.linalg.cholesky_ex(shifted)
    return int(info) == 0


def eigh_dtype_for(matrix: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype``, or for ``None`` (``eigh_dtype="auto"`` on float32 factors) float32 where
    :func:`float32_suffices` on a side at least :data:`FLOAT32_EIGH_MIN_WIDTH` wide, else
    float64 (blocks of block-diagonal factors: float64)."""
    if dtype is not None:
        return dtype
    if matrix.dim() == 2 and matrix.shape[0] >= FLOAT32_EIGH_MIN_WIDTH and \
            float32_suffices(matrix):
        return torch.float32
    return torch.float64


def _eigh(m: Tensor, what: str, layer: str) -> tuple[Tensor, Tensor]:
    try:
        return torch.linalg.eigh(m)
    except RuntimeError as err:  # torch.linalg.LinAlgError: no convergence
        raise FloatingPointError(
            f"The eigendecomposition of the {what} covariance of layer {layer!r} "
            f"({m.shape[-1]} x {m.shape[-1]}) failed: {err}. The covariance is badly conditioned "
            "(e.g. huge activations, or rows that are almost all equal): check the layer's "
            "inputs, exclude the layer, or use strategy='diagonal'."
        ) from err


def _eigendecompose_blocks(blocks: Tensor, what: str, layer: str, dim: int | None,
                           dtype: torch.dtype) -> tuple[Tensor, BlockDiagonal]:
    k, b = blocks.shape[0], blocks.shape[1]
    dim = dim if dim is not None else k * b
    r = dim - (k - 1) * b  # width of the last block
    values = torch.zeros(k, b, dtype=torch.float64, device=blocks.device)
    vectors = torch.empty(k, b, b, dtype=dtype, device=blocks.device)
    for j in range(k):  # one block at a time: working memory of one block
        w = b if j < k - 1 else r
        vals, vecs = _eigh(blocks[j, :w, :w].to(dtype), what, f"{layer} (block {j})")
        values[j, :w] = vals.double().clamp_min(0.0)
        vectors[j] = torch.eye(b, dtype=dtype, device=blocks.device)
        vectors[j, :w, :w] = vecs
    return values.reshape(-1)[:dim], BlockDiagonal(vectors, dim)


@dataclass(frozen=True)
class Damping:
    """How each layer's damping is chosen: one value that travels from the user to every layer.

    Attributes:
        rule: a number (used as is for every layer), ``None`` or ``"heuristic"`` (``factor`` x
            the mean eigenvalue of each layer: the paper's default) or ``"weight_decay"`` (the
            optimizer's weight decay: the curvature of the objective actually trained).
        factor: the heuristic's factor (0.1, the paper's).
        weight_decay: the optimizer's weight decay, for ``"weight_decay"``.
    """

    rule: float | str | None = None
    factor: float = 0.1
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rule, str) and self.rule not in ("heuristic", "weight_decay"):
            raise ValueError(f"damping={self.rule!r} is not a number nor one of 'heuristic', "
                             "'weight_decay'.")
        if self.rule is not None and not isinstance(self.rule, str) and not (
                0 <= float(self.rule) < float("inf")):
            raise ValueError(f"damping must be >= 0, got {self.rule} (a finite number is "
                             "needed).")
        if not self.factor > 0:
            raise ValueError(f"damping_factor must be > 0, got {self.factor}.")

    @classmethod
    def of(cls, damping: Damping | float | str | None, factor: float = 0.1,
           weight_decay: float | None = None) -> Damping:
        """``damping`` as a Damping (a Damping passes through unchanged)."""
        return damping if isinstance(damping, Damping) else cls(damping, factor, weight_decay)

    def resolve(self, eigenvalues: Tensor | None) -> float:
        """The damping of one layer whose eigenvalues (Lambda, for the heuristic) are given."""
        if self.rule is None or self.rule == "heuristic":
            if eigenvalues is None:
                return 0.0
            return float(self.factor * eigenvalues.double().mean().item())
        if self.rule == "weight_decay":
            if self.weight_decay is None or not self.weight_decay > 0:
                raise ValueError(
                    "damping='weight_decay' needs a positive weight decay; the optimizer has "
                    f"weight_decay={self.weight_decay}. Pass a number or damping='heuristic'."
                )
            return float(self.weight_decay)
        return float(self.rule)

    def describe(self) -> dict[str, Any]:
        """The rule as stored with the factors."""
        return {"damping_rule": self.rule if self.rule is not None else "heuristic",
                "damping_factor": self.factor}


@dataclass
class LayerFactors:
    """The preconditioner of one layer (see the module docstring for each strategy's content)."""

    eigenvalues: Tensor | None = None  # Lambda [O, I]
    basis_in: Tensor | BlockDiagonal | None = None  # Q_A [I, I] (or its diagonal blocks)
    basis_out: Tensor | BlockDiagonal | None = None  # Q_S [O, O]
    damping: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def _get(self, name: str, like: Tensor) -> Tensor | None:
        value = getattr(self, name)
        if value is None:
            return None
        key = (name, like.dtype, like.device)
        if key not in self._cache:
            if name == "eigenvalues":
                # The reciprocal is taken in float64, then cast.
                value = (1.0 / (value.double() + self.damping))
            self._cache[key] = value.to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def inverse_eigenvalues(self, like: Tensor) -> Tensor | None:
        """``1 / (Lambda + damping)`` ``[O, I]`` in ``like``'s dtype and device."""
        return self._get("eigenvalues", like)

    def rotate(self, v: Tensor) -> Tensor:
        """``Q_S^T V Q_A`` for ``V [..., O, I]``."""
        q_out, q_in = self._get("basis_out", v), self._get("basis_in", v)
        if q_out is not None:
            v = q_out.T @ v if isinstance(q_out, Tensor) else q_out.right(v.mT).mT
        if q_in is not None:
            v = rows_times(q_in, v)
        return v

    def unrotate(self, v: Tensor) -> Tensor:
        """``Q_S V Q_A^T`` for ``V [..., O, I]``."""
        q_out, q_in = self._get("basis_out", v), self._get("basis_in", v)
        if q_out is not None:
            v = q_out @ v if isinstance(q_out, Tensor) else q_out.right_t(v.mT).mT
        if q_in is not None:
            v = rows_times_t(q_in, v)
        return v

    def rotate_rows(self, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Rows into the Kronecker eigenbasis: ``(a Q_A, g Q_S)`` (as they are without bases)."""
        if self.basis_in is not None:
            a = rows_times(self._get("basis_in", a), a)
        if self.basis_out is not None:
            g = rows_times(self._get("basis_out", g), g)
        return a, g

    def block_sizes(self) -> dict[str, int]:
        """``{"in": B, "out": B}`` for the sides whose basis is block-diagonal."""
        return {side: basis.blocks.shape[-1] for side, basis in (
            ("in", self.basis_in), ("out", self.basis_out)) if isinstance(basis, BlockDiagonal)}

    def precondition(self, v: Tensor, in_eigenbasis: bool = False) -> Tensor:
        """``P(V) = Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T`` for ``V [..., O, I]``;
        with ``in_eigenbasis`` the bracket alone, ``Q_S^T P(V) Q_A`` (what a pass over rows
        rotated into the eigenbasis contracts with)."""
        inv = self.inverse_eigenvalues(v)
        if inv is None:
            return self.rotate(v) if in_eigenbasis else v
        rotated = self.rotate(v) * inv
        return rotated if in_eigenbasis else self.unrotate(rotated)

    def precondition_rows(self, a: Tensor, g: Tensor, in_eigenbasis: bool = False) -> Tensor:
        """:meth:`precondition` of the per-example gradients ``G_n = sum_t g_nt a_nt^T`` of
        rows ``a [N, T, I]``, ``g [N, T, O]``, rotated through the rows where that is cheaper.

        ``Q_S^T G_n Q_A = sum_t (Q_S^T g_nt)(Q_A^T a_nt)^T``: rotating the ``T`` rows costs
        ``T (I^2 + O^2 + O I)`` multiply-adds per example against ``O I (O + I)`` for the
        matrix (a GPT-2 MLP layer, T = 128: 5.7x fewer), the same product in another order.
        """
        n, t, i = a.shape
        o = g.shape[-1]
        has_basis = self.basis_in is not None or self.basis_out is not None
        if self.eigenvalues is None or not has_basis or t * (i * i + o * o + o * i) >= o * i * (o + i):
            return self.precondition(torch.einsum("nto,nti->noi", g, a), in_eigenbasis)
        a, g = self.rotate_rows(a, g)
        rotated = torch.einsum("nto,nti->noi", g, a)
        rotated = rotated * self.inverse_eigenvalues(rotated)
        return rotated if in_eigenbasis else self.unrotate(rotated)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {}
        for key in ("eigenvalues", "basis_in", "basis_out"):
            value = getattr(self, key)
            if isinstance(value, BlockDiagonal):
                value = value.blocks
            if value is not None:
                out[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
        return out

    def nbytes(self) -> int:
        """Bytes the factors hold."""
        return sum(t.numel() * t.element_size() for t in self.tensors("").values())


def model_fingerprint(tracker: LayerTracker) -> dict[str, Any]:
    """What ties factors and scores to a model: the fingerprint of the whole function it
    computes (module structure, tracked weights, every other parameter and every buffer; see
    :mod:`lightning_influence.fingerprint`), for the tracker's model and tracked layers."""
    return fingerprint.model_fingerprint(
        tracker.model, {layer.name: layer.module for layer in tracker}, tracker.describe())


@runtime_checkable
class Preconditioner(Protocol):
    """Anything that applies ``(G + damping)^-1`` to per-layer gradients: the fitted
    :class:`Factors` (EK-FAC, K-FAC, diagonal, identity) and every solver of
    :mod:`lightning_influence.solvers`. The scoring functions take one and need nothing else.

    ``layerwise`` says whether the inverse is block-diagonal over layers with per-layer factors
    in ``layers`` (``{name: LayerFactors}``): self-influence then contracts each layer's rows
    directly; a coupled solver (``layerwise=False``) preconditions all layers at once.
    """

    strategy: str
    shapes: dict[str, list[int]]
    fingerprint: dict[str, Any]
    num_examples: int
    extra: dict[str, Any]
    layerwise: bool

    @property
    def damping(self) -> dict[str, float]: ...

    def precondition(self, gradients: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def signature(self) -> dict[str, str]: ...

    def tracker(self, model: nn.Module) -> LayerTracker: ...

    def check_fits(self, tracker: LayerTracker, strategy: str | None = None,
                   check_weights: bool = True, source: str | None = None) -> None: ...


class PreconditionerBase:
    """What every :class:`Preconditioner` shares: its tracker, the fit check and the signature
    of a scoring pass."""

    strategy: str
    shapes: dict[str, list[int]]
    fingerprint: dict[str, Any]
    extra: dict[str, Any]
    layerwise = False

    def precondition(self, gradients: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    @property
    def damping(self) -> dict[str, float]:
        raise NotImplementedError

    def tracker(self, model: nn.Module) -> LayerTracker:
        """A tracker over the layers this preconditioner was made for; a model without them is
        a :class:`FactorMismatchError`."""
        try:
            return LayerTracker(model, layers=list(self.shapes),
                                batch_layout=self.extra.get("batch_layout", "auto"))
        except ValueError as err:
            raise FactorMismatchError(
                f"These factors were fitted for another model or layer set: {err} Fit factors "
                "for this model (delete the files or pass overwrite=True)."
            ) from err

    def check_matches(self, *args: Any, **kwargs: Any) -> None:
        """The former name of :meth:`check_fits`."""
        self.check_fits(*args, **kwargs)

    def signature(self) -> dict[str, str]:
        """What a scoring pass's results depend on, for resumable score files: the strategy,
        the whole model (each part of its fingerprint), the damping and any other setting (a
        solver's iterations)."""
        settings = {k: v for k, v in self.extra.items() if k not in ("fisher", "batch_layout")}
        return {"strategy": self.strategy,
                **{f"model_{part}": str(self.fingerprint.get(part, ""))
                   for part in fingerprint.PARTS},
                "damping": json.dumps(self.damping, sort_keys=True),
                "settings": json.dumps(settings, sort_keys=True, default=str)}

    def check_fits(self, tracker: LayerTracker, strategy: str | None = None,
                   check_weights: bool = True, source: str | None = None) -> None:
        """Raise :class:`FactorMismatchError` when this preconditioner was made for another
        model, layer set or strategy (``source`` names it in the message). With
        ``check_weights``, the model must compute what it computed then: the same module
        structure, tracked weights, other parameters and buffers (the message says which
        changed)."""
        source = source or ("these factors" if self.layerwise else
                            f"this {self.strategy} solver")
        if strategy is not None and strategy != self.strategy:
            raise FactorMismatchError(
                f"{source} use strategy {self.strategy!r} but {strategy!r} was asked for. Fit "
                "again (delete the files or pass overwrite=True) or ask for the stored strategy."
            )
        if self.shapes != tracker.describe():
            theirs, ours = set(self.shapes), set(tracker.describe())
            detail = []
            if theirs - ours:
                detail.append(f"layers not in this model: {sorted(theirs - ours)[:5]}")
            if ours - theirs:
                detail.append(f"layers missing from the factors: {sorted(ours - theirs)[:5]}")
            shape_diff = [n for n in theirs & ours if self.shapes[n] != tracker.describe()[n]]
            if shape_diff:
                detail.append(f"layers whose shapes differ: {shape_diff[:5]}")
            raise FactorMismatchError(
                f"{source} were fitted for another model or layer set ({'; '.join(detail)}). "
                "Fit factors for this model (delete the files or pass overwrite=True)."
            )
        if check_weights:
            changes = fingerprint.fingerprint_changes(self.fingerprint, model_fingerprint(tracker))
            if changes:
                what = ("an unknown model" if "missing" in changes else
                        "a model of another structure" if "structure" in changes else
                        "the same architecture with different weights"
                        if changes.keys() & {"tracked", "untracked"} else
                        "the same architecture and weights with different buffers")
                raise FactorMismatchError(
                    f"{source} were fitted for {what}: {'; '.join(changes.values())}. They "
                    "hold for the function the model computed when they were made (every "
                    "parameter and buffer, tracked or not, and the module structure). Fit "
                    "again for this model (delete the files or pass overwrite=True)."
                )


@dataclass
class Factors(PreconditionerBase):
    """Curvature factors of every tracked layer, plus the metadata that ties them to a model."""

    strategy: str
    layers: dict[str, LayerFactors]
    shapes: dict[str, list[int]]
    fingerprint: dict[str, Any]
    num_examples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    FILE_STEM = "factors"
    layerwise = True

    @property
    def damping(self) -> dict[str, float]:
        return {name: lf.damping for name, lf in self.layers.items()}

    def with_damping(self, damping: Damping | float | str | None) -> Factors:
        """Copy with the damping of every layer set anew by a :class:`Damping` (or its rule);
        the factors stay shared."""
        damping = Damping.of(damping)
        layers = {name: LayerFactors(lf.eigenvalues, lf.basis_in, lf.basis_out,
                                     damping.resolve(lf.eigenvalues))
                  for name, lf in self.layers.items()}
        extra = dict(self.extra, **damping.describe())
        return Factors(self.strategy, layers, self.shapes, self.fingerprint, self.num_examples,
                       extra)

    def precondition(self, gradients: dict[str, Tensor],
                     in_eigenbasis: bool = False) -> dict[str, Tensor]:
        """Apply every layer's ``P`` to a dict of ``[..., O, I]`` gradients (left in each
        layer's Kronecker eigenbasis with ``in_eigenbasis``: see
        :meth:`LayerFactors.precondition`)."""
        return {name: self.layers[name].precondition(v, in_eigenbasis)
                for name, v in gradients.items()}

    def metadata(self) -> dict[str, Any]:
        meta = {
            "format_version": FORMAT_VERSION,
            "strategy": self.strategy,
            "layers": self.shapes,
            "damping": self.damping,
            "fingerprint": self.fingerprint,
            "num_examples": self.num_examples,
            "extra": self.extra,
        }
        blocks = {name: sizes for name, lf in self.layers.items() if (sizes := lf.block_sizes())}
        if blocks:  # block-diagonal sides: their block size B (absent for whole factors)
            meta["blocks"] = blocks
        return meta

    def nbytes(self) -> int:
        """Bytes the factors hold (every layer's eigenbases and eigenvalues)."""
        return sum(lf.nbytes() for lf in self.layers.values())

    def save(self, directory: str | Path, stem: str | None = None) -> Path:
        """Write ``<stem>.safetensors`` atomically, the metadata and a checksum of everything in
        its header: one file, one rename, so a reader never pairs one fit's tensors with
        another's metadata. ``<stem>.json`` is a readable copy of the metadata (never read
        back). Returns the tensor path."""
        directory = Path(directory)
        stem = stem or self.FILE_STEM
        tensors: dict[str, Tensor] = {}
        for name, lf in self.layers.items():
            tensors.update(lf.tensors(name))
        meta = self.metadata()
        meta["checksum"] = content_checksum(tensors, meta)
        path = directory / f"{stem}.safetensors"
        atomic_save_safetensors(tensors, path, metadata={_HEADER_KEY: json.dumps(
            meta, sort_keys=True, default=str)})
        atomic_save_json(meta, directory / f"{stem}.json")
        return path

    @classmethod
    def exists(cls, directory: str | Path, stem: str | None = None) -> bool:
        return (Path(directory) / f"{stem or cls.FILE_STEM}.safetensors").is_file()

    @classmethod
    def load(cls, directory: str | Path, stem: str | None = None) -> Factors:
        """Read factors written by :meth:`save`, checking everything before trusting it.

        Raises:
            FileNotFoundError: no factor file.
            CorruptFactorsError: unreadable or truncated file, metadata from another version,
                unknown strategy, missing or misshapen tensors, NaN/Inf or negative values,
                invalid damping, or a checksum that does not match the contents (a flipped byte,
                an edited field). The message names the file; ``overwrite=True`` refits.
        """
        path = Path(directory) / f"{stem or cls.FILE_STEM}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"No factors at {path}; fit them first.")

        def corrupt(why: str) -> CorruptFactorsError:
            return CorruptFactorsError(
                f"The factor file {path} cannot be trusted: {why}. Refit it (overwrite=True, or "
                "delete the file)."
            )

        try:  # through one open file: a file replaced meanwhile is read whole, old or new
            tensors, metadata = read_safetensors(path)
        except ValueError as err:
            raise corrupt(f"it is not a readable safetensors file (truncated or damaged: "
                          f"{err})") from err
        header = metadata.get(_HEADER_KEY)
        if header is None:
            raise corrupt("it has no lightning-influence metadata (written by an older version "
                          "or another tool)")
        meta = checked_metadata(header, tensors, FORMAT_VERSION, corrupt)
        return cls._validated(meta, tensors, corrupt)

    @classmethod
    def _validated(cls, meta: dict[str, Any], tensors: dict[str, Tensor], corrupt) -> Factors:
        """Factors from checked metadata and tensors; ``corrupt(why)`` makes the error."""
        strategy_name = meta.get("strategy")
        if strategy_name not in STRATEGIES:
            raise corrupt(f"unknown strategy {strategy_name!r} (known: {list(STRATEGIES)})")
        stored = strategy(strategy_name).stored
        shapes, damping = meta.get("layers"), meta.get("damping")
        if not isinstance(shapes, dict) or not shapes or not isinstance(damping, dict):
            raise corrupt("its layer list or damping is missing")
        num_examples = meta.get("num_examples")
        if not isinstance(num_examples, int) or num_examples < 0:
            raise corrupt(f"num_examples={num_examples!r} is not a count")
        expected_keys = {f"{name}.{kind}" for name in shapes for kind in stored}
        if set(tensors) != expected_keys:
            missing, extra = sorted(expected_keys - set(tensors)), sorted(set(tensors) - expected_keys)
            raise corrupt(f"tensors missing: {missing[:5]}, unexpected: {extra[:5]}")
        blocks = meta.get("blocks", {})
        if not isinstance(blocks, dict):
            raise corrupt("its block sizes are not a mapping")
        layers = {}
        for name, shape in shapes.items():
            if not (isinstance(shape, list) and len(shape) == 2
                    and all(isinstance(d, int) and d > 0 for d in shape)):
                raise corrupt(f"layer {name!r} has shape {shape!r}")
            o, i = shape
            sizes = blocks.get(name, {})
            if not isinstance(sizes, dict) or not all(
                    isinstance(b, int) and b > 0 for b in sizes.values()):
                raise corrupt(f"layer {name!r} has block sizes {sizes!r}")
            want = {"eigenvalues": (o, i), "basis_in": blocked_shape(i, sizes.get("in")),
                    "basis_out": blocked_shape(o, sizes.get("out"))}
            for kind in stored:
                t = tensors[f"{name}.{kind}"]
                if tuple(t.shape) != want[kind] or not t.is_floating_point():
                    raise corrupt(f"{name}.{kind} is {t.dtype} {tuple(t.shape)}, expected a "
                                  f"float {want[kind]}")
                if not bool(torch.isfinite(t).all()):
                    raise corrupt(f"{name}.{kind} holds NaN or Inf")
                if kind == "eigenvalues" and bool((t < 0).any()):
                    raise corrupt(f"{name}.eigenvalues holds negative values")
            d = damping.get(name)
            if not isinstance(d, int | float) or not 0 <= d < float("inf"):
                raise corrupt(f"layer {name!r} has damping {d!r} (a finite number >= 0 is "
                              "needed)")
            layers[name] = LayerFactors(
                eigenvalues=tensors.get(f"{name}.eigenvalues"),
                basis_in=_stored_basis(tensors.get(f"{name}.basis_in"), i),
                basis_out=_stored_basis(tensors.get(f"{name}.basis_out"), o),
                damping=float(d),
            )
        return cls(strategy_name, layers, shapes, meta.get("fingerprint", {}), num_examples,
                   meta.get("extra", {}))


def _stored_basis(tensor: Tensor | None, dim: int) -> Tensor | BlockDiagonal | None:
    """A stored eigenbasis: ``[D, D]`` as is, ``[K, B, B]`` as the blocks of a side of width D."""
    return BlockDiagonal(tensor, dim) if tensor is not None and tensor.dim() == 3 else tensor
