"""What the index keeps of each training gradient: a linear code per layer, D numbers in all.

Index letters: N training examples, T rows per example, Q queries, O = d_out, I = d_in (+1 bias),
L tracked layers, K_l the numbers kept for layer l (D = sum_l K_l per example), U_O / U_I the
eigenvectors of the output / input side that the kept coordinates use.

Each layer's code is linear in the gradient, ``x = C(G) [K_l]`` for a training example's
``G = sum_t g_t a_t^T`` (built from the rows, never as ``[O, I]``), and there is a query-side
code ``y = C*(P)`` of a preconditioned query gradient ``P = P(grad L(z_q))`` such that

    y . x  ~  <P, G>    (the exact EK-FAC score term of that layer; equal at full width)

so the index estimate of a score is ``sum_l y_l . x_l``: one ``[Q, D] x [D, N]`` product.

Three codes (``IndexOptions.compression``); ``"sketch"``, the default, recalled best by far
in ``benchmarks/index.py`` (the whitened gradients' energy is spread over a large effective
dimension ``sum Lambda / (Lambda + damping)``, so no small subset of coordinates holds most of
it, and a Kronecker-structured sketch of the near-low-rank per-example matrices multiplies two
noisy estimates):

- ``"sketch"``: a count-sketch of the whole whitened gradient in the eigenbasis. With
  ``W = (Q_S^T G Q_A) * s`` (``s = (Lambda + damping)^(-1/2)``, the per-example gradient built
  from the rotated rows), ``x_b = sum_{h(o,i) = b} sigma_oi W_oi`` over ``K_l`` buckets, a
  fixed random bucket ``h`` and sign ``sigma`` per coordinate; the query side hashes
  ``(Q_S^T P Q_A) / s`` the same way, so ``E[y . x] = <P, G>`` with an error of about
  ``|W| |Y| / sqrt(K_l)``. Buckets are shared out in proportion to each layer's effective
  dimension (a layer given as many buckets as coordinates is stored exactly). Without
  eigenvalues (identity, solvers) ``s = 1`` and no rotation: an unbiased sketch for any
  preconditioner.

- ``"eigen"``: in the Kronecker eigenbasis ``(Q_S, Q_A)`` the EK-FAC term is
  ``sum_{o,i} (Q_S^T P Q_A)_{oi} (Q_S^T G Q_A)_{oi} (Lambda_{oi} + damping)``, because
  ``Q_S^T P Q_A = (Q_S^T G_q Q_A) / (Lambda + damping)``. The index keeps the coordinates
  ``(o_k, i_k)`` whose ``Lambda / (Lambda + damping)`` is largest over every layer (the
  directions where the curvature outweighs the damping; for training gradients that is the
  expected square of the whitened coordinate, so they hold most of the whitened energy):
  ``x_k = (Q_S^T G Q_A)_{o_k i_k} s_k`` and ``y_k = (Q_S^T P Q_A)_{o_k i_k} / s_k`` with
  ``s_k = (Lambda + damping)^(-1/2)`` (whitened codes are O(1): safe in float16). From rows:
  ``x_k = sum_t (g_t^T Q_S)_{o_k} (a_t^T Q_A)_{i_k} s_k``, only the ``U_O`` and ``U_I`` used
  eigenvectors rotated. Needs eigenvalues (diagonal, kfac, ekfac factors).
- ``"kronecker"``: a whitened Kronecker sketch. Random projections ``R_S [r_S, O]``,
  ``R_A [r_A, I]`` with orthonormal rows scaled by ``sqrt(O / r_S)``, ``sqrt(I / r_A)`` (so
  ``E[R^T R] = 1``), applied in the eigenbasis after diagonal scalings ``u [O]``, ``v [I]``:
  ``M_S = R_S diag(u) Q_S^T``, ``M_A = R_A diag(v) Q_A^T``,
  ``x = vec(M_S G M_A^T) = vec(sum_t (M_S g_t)(M_A a_t)^T)`` (activations and output gradients
  projected before their product: cheap for sequence layers), and on the query side
  ``y = vec(R_S diag(1/u) Q_S^T P Q_A diag(1/v) R_A^T)``. ``E[y . x] = <P, G>`` for any
  positive ``u, v``; they are fitted so that ``u v^T ~ (Lambda + damping)^(-1/2)`` (least
  squares in log space), so that the sketch sees whitened gradients, whose coordinates matter
  alike, and its noise is spread over all of them. Without eigenbases (identity, solvers)
  ``Q = 1`` and ``u = v = 1``: an unbiased sketch for any preconditioner. Exact at full size.
  One ``r`` for every layer, the largest with ``sum_l min(O, r) min(I, r) <= width``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["LayerCode", "Compression", "make_compression", "COMPRESSIONS"]

COMPRESSIONS = ("sketch", "eigen", "kronecker")

_CODE_TENSORS = ("left", "right", "out_pos", "in_pos", "scale", "query_left", "query_right",
                 "bucket", "sign")

# cap on the [n, T, K] intermediates of the row encoding (examples are chunked to fit)
MAX_ELEMENTS = 2**24


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.promote_types(dtype, torch.float32)


@dataclass
class LayerCode:
    """One layer's code (see the module docstring).

    Attributes:
        kind: ``"eigen"`` or ``"kronecker"``.
        left: eigen: ``Q_S[:, U_O] [O, U_O]`` (None: identity basis); kronecker: ``R_S [r_S, O]``.
        right: eigen: ``Q_A[:, U_I] [I, U_I]`` (None: identity); kronecker: ``R_A [r_A, I]``.
        out_pos, in_pos: eigen: ``[K]`` positions of each kept coordinate in ``U_O`` / ``U_I``.
        scale: eigen: ``s [K]`` = ``(Lambda + damping)^(-1/2)`` of each kept coordinate.
        query_left, query_right: kronecker: the query side's ``[r_S, O]``, ``[r_A, I]`` (None:
            ``left``, ``right``).
        bucket, sign: sketch: ``[O * I]`` each coordinate's bucket and sign (row-major);
            ``scale`` is then ``s [O * I]``, ``left``/``right`` the whole ``Q_S``/``Q_A``.
        buckets: sketch: ``K_l``.
    """

    kind: str
    left: Tensor | None
    right: Tensor | None
    out_pos: Tensor | None = None
    in_pos: Tensor | None = None
    scale: Tensor | None = None
    query_left: Tensor | None = None
    query_right: Tensor | None = None
    bucket: Tensor | None = None
    sign: Tensor | None = None
    buckets: int = 0

    @property
    def size(self) -> int:
        """K: numbers kept per example."""
        if self.kind == "sketch":
            return self.buckets
        if self.kind == "eigen":
            return int(self.scale.numel())
        return self.left.shape[0] * self.right.shape[0]

    def _hash(self, w: Tensor) -> Tensor:
        """Count-sketch of ``w [n, O*I]`` (already scaled and signed) into ``[n, K]``."""
        return w.new_zeros(w.shape[0], self.buckets).index_add_(1, self.bucket, w)

    def encode_rows(self, a: Tensor, g: Tensor) -> Tensor:
        """Training codes ``[N, K]`` from activation rows ``a [N, T, I]`` and output-gradient
        rows ``g [N, T, O]`` (in at least float32)."""
        dtype = _compute_dtype(a, g)
        a, g = a.to(dtype), g.to(dtype)
        left, right = self.left, self.right
        left = None if left is None else left.to(dtype)
        right = None if right is None else right.to(dtype)
        if self.kind == "kronecker":
            u, v = g @ left.T, a @ right.T  # [N, T, r_S], [N, T, r_A]
            return torch.einsum("ntr,nts->nrs", u, v).flatten(1)
        if self.kind == "sketch":
            g_rot = g @ left if left is not None else g  # [N, T, O]
            a_rot = a @ right if right is not None else a  # [N, T, I]
            weights = (self.scale * self.sign).to(dtype)  # [O*I]
            o, i = g.shape[-1], a.shape[-1]
            step = max(1, MAX_ELEMENTS // max(o * i, 1))
            return torch.cat([self._hash(torch.einsum("nto,nti->noi", g_rot[s:s + step],
                                                      a_rot[s:s + step]).flatten(1) * weights)
                              for s in range(0, a.shape[0], step)])
        gs = g @ left if left is not None else g  # [N, T, U_O]
        as_ = a @ right if right is not None else a  # [N, T, U_I]
        out_pos, in_pos = self.out_pos, self.in_pos
        scale = self.scale.to(dtype)
        n, t = a.shape[:2]
        step = max(1, MAX_ELEMENTS // max(t * self.size, 1))
        parts = []
        for s in range(0, n, step):  # [n, T, K] products summed over the rows
            parts.append((gs[s:s + step, :, out_pos] * as_[s:s + step, :, in_pos]).sum(1))
        return torch.cat(parts) * scale

    def encode_matrices(self, p: Tensor) -> Tensor:
        """Query codes ``[Q, K]`` of preconditioned gradients ``p [Q, O, I]``."""
        dtype = _compute_dtype(p)
        p = p.to(dtype)
        if self.kind == "kronecker":
            left = self.left if self.query_left is None else self.query_left
            right = self.right if self.query_right is None else self.query_right
            return (left.to(dtype) @ p @ right.to(dtype).T).flatten(1)
        left = None if self.left is None else self.left.to(dtype)
        right = None if self.right is None else self.right.to(dtype)
        rot = left.T @ p if left is not None else p  # [Q, U_O, I]
        rot = rot @ right if right is not None else rot  # [Q, U_O, U_I]
        if self.kind == "sketch":
            return self._hash(rot.flatten(1) * (self.sign / self.scale).to(dtype))
        return rot[:, self.out_pos, self.in_pos] / self.scale.to(dtype)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {}
        for key in _CODE_TENSORS:
            value = getattr(self, key)
            if value is not None:
                out[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
        return out


@dataclass
class Compression:
    """The codes of every tracked layer, in ``layers`` order (the D axis of the index).

    Attributes:
        kind: ``"eigen"`` or ``"kronecker"``.
        layers: ``{name: LayerCode}``.
        seed: the kronecker projections' seed.
    """

    kind: str
    layers: dict[str, LayerCode]
    seed: int = 0

    @property
    def width(self) -> int:
        """D: numbers per example."""
        return sum(code.size for code in self.layers.values())

    def sizes(self) -> dict[str, int]:
        return {name: code.size for name, code in self.layers.items()}

    def encode_rows(self, rows: dict[str, tuple[Tensor, Tensor]], n: int) -> Tensor:
        """Training codes ``[N, D]`` of one batch's rows (a layer that did not run: zeros)."""
        like = next(iter(rows.values()))[0]
        dtype = _compute_dtype(like)
        return torch.cat([code.encode_rows(*rows[name]).to(dtype) if name in rows
                          else like.new_zeros(n, code.size, dtype=dtype)
                          for name, code in self.layers.items()], dim=1)

    def encode_matrices(self, grads: dict[str, Tensor]) -> Tensor:
        """Query codes ``[Q, D]`` of preconditioned gradients ``{layer: [Q, O, I]}``."""
        return torch.cat([code.encode_matrices(grads[name])
                          for name, code in self.layers.items()], dim=1)

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, code in self.layers.items():
            out.update(code.tensors(name))
        return out

    def describe(self) -> dict[str, Any]:
        # the D axis's layer order as a list: the manifest's JSON sorts the keys of ``sizes``
        return {"kind": self.kind, "width": self.width, "seed": self.seed, "sizes": self.sizes(),
                "order": list(self.layers)}

    @classmethod
    def from_tensors(cls, description: dict[str, Any], tensors: dict[str, Tensor],
                     ) -> Compression:
        """The compression a manifest describes (``describe()`` and ``tensors()``)."""
        kind = description["kind"]
        layers = {}
        for name in description["order"]:
            get = {key: tensors.get(f"{name}.{key}") for key in _CODE_TENSORS}
            layers[name] = LayerCode(kind, **get, buckets=int(description["sizes"][name]) if
                                     kind == "sketch" else 0)
        return cls(kind, layers, int(description.get("seed", 0)))


def make_compression(preconditioner: Any, kind: str, width: int, seed: int = 0) -> Compression:
    """The compression of ``width`` numbers per example for a preconditioner's layers.

    ``"eigen"`` needs fitted factors with eigenvalues (diagonal, kfac, ekfac); ``"kronecker"``
    works with any preconditioner (it needs only the layer shapes).
    """
    shapes = {name: tuple(shape) for name, shape in preconditioner.shapes.items()}
    if kind == "sketch":
        layers = getattr(preconditioner, "layers", None) if getattr(
            preconditioner, "layerwise", False) else None
        return _sketch(shapes, width, seed, layers)
    if kind == "kronecker":
        layers = getattr(preconditioner, "layers", None) if getattr(
            preconditioner, "layerwise", False) else None
        return _kronecker(shapes, width, seed, layers)
    if kind != "eigen":
        raise ValueError(f"compression={kind!r} is not one of {list(COMPRESSIONS)}.")
    layers = getattr(preconditioner, "layers", None)
    if not getattr(preconditioner, "layerwise", False) or layers is None or any(
            lf.eigenvalues is None for lf in layers.values()):
        raise ValueError(
            f"compression='eigen' keeps EK-FAC eigenbasis coordinates, which a "
            f"{preconditioner.strategy!r} preconditioner does not have (it needs fitted "
            "diagonal, kfac or ekfac factors). Use compression='kronecker' (random projections, "
            "any preconditioner) or fit strategy='ekfac'.")
    return _eigen(layers, width)


def _eigen(layers: dict[str, Any], width: int) -> Compression:
    """Keep the ``width`` coordinates with the largest ``Lambda / (Lambda + damping)`` over all
    layers (ties: layer order, then row-major position)."""
    candidates = []  # per layer: (ratio [k], flat index [k]) of its own top-width coordinates
    for lf in layers.values():
        lam = lf.eigenvalues.double()
        total = lam + lf.damping
        ratio = torch.where(total > 0, lam / total.clamp_min(1e-300),
                            torch.full_like(lam, -1.0)).flatten()
        order = torch.sort(ratio, descending=True, stable=True).indices[:width]
        keep = order[ratio[order] >= 0]  # a coordinate with Lambda + damping = 0 is never kept
        candidates.append((ratio[keep], keep))
    ratios = torch.cat([r for r, _ in candidates])
    if ratios.numel() == 0:
        raise ValueError("compression='eigen': no layer has a coordinate with Lambda + damping > 0.")
    owner = torch.cat([torch.full((len(k),), j) for j, (_, k) in enumerate(candidates)])
    chosen = torch.sort(ratios, descending=True, stable=True).indices[:width]
    out: dict[str, LayerCode] = {}
    for j, (name, lf) in enumerate(layers.items()):
        mine = chosen[owner[chosen] == j]
        offset = sum(len(k) for _, k in candidates[:j])
        flat = candidates[j][1][(mine - offset).sort().values]  # row-major order within the layer
        o, i = lf.eigenvalues.shape
        rows, cols = flat // i, flat % i
        used_out, out_pos = torch.unique(rows, return_inverse=True)
        used_in, in_pos = torch.unique(cols, return_inverse=True)
        lam = lf.eigenvalues.double()[rows, cols]
        left = lf.basis_out.double()[:, used_out] if lf.basis_out is not None else None
        right = lf.basis_in.double()[:, used_in] if lf.basis_in is not None else None
        if left is None:  # no basis (diagonal): select the kept rows of the identity
            left = torch.eye(o, dtype=torch.float64)[:, used_out]
        if right is None:
            right = torch.eye(i, dtype=torch.float64)[:, used_in]
        out[name] = LayerCode("eigen", left, right, out_pos, in_pos,
                              (lam + lf.damping).rsqrt())
    return Compression("eigen", out)


def _sketch(shapes: dict[str, tuple[int, int]], width: int, seed: int,
            layers: dict[str, Any] | None) -> Compression:
    """Count-sketch codes: ``K_l`` buckets per layer in proportion to its effective dimension
    ``sum Lambda / (Lambda + damping)`` (its coordinate count without eigenvalues), at most its
    ``O I`` coordinates (then stored exactly), ``sum_l K_l = min(width, sum_l O I)``."""
    if width < len(shapes):
        raise ValueError(f"width={width} is below one number per layer ({len(shapes)} tracked "
                         "layers): raise width.")
    weights, scales, bases = {}, {}, {}
    for name, (o, i) in shapes.items():
        lf = (layers or {}).get(name)
        if lf is None or lf.eigenvalues is None:
            weights[name], bases[name] = float(o * i), (None, None)
            scales[name] = torch.ones(o * i, dtype=torch.float64)
            continue
        total = lf.eigenvalues.double() + lf.damping
        lam = lf.eigenvalues.double()
        weights[name] = float(torch.where(total > 0, lam / total.clamp_min(1e-300), 0).sum())
        scales[name] = torch.where(total > 0, total.clamp_min(1e-300).rsqrt(), 0).flatten()
        bases[name] = (None if lf.basis_out is None else lf.basis_out.double(),
                       None if lf.basis_in is None else lf.basis_in.double())
    sizes = _share(width, {n: o * i for n, (o, i) in shapes.items()}, weights)
    gen = torch.Generator().manual_seed(seed)
    codes = {}
    for name, (o, i) in shapes.items():
        k = sizes[name]
        if k >= o * i:  # as many buckets as coordinates: the whitened gradient itself
            bucket, sign = torch.arange(o * i), torch.ones(o * i, dtype=torch.float64)
        else:
            bucket = torch.randint(0, k, (o * i,), generator=gen)
            sign = torch.randint(0, 2, (o * i,), generator=gen).double() * 2 - 1
        left, right = bases[name]
        codes[name] = LayerCode("sketch", left, right, scale=scales[name], bucket=bucket,
                                sign=sign, buckets=k)
    return Compression("sketch", codes, seed)


def _share(width: int, caps: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """Integer shares of ``min(width, sum caps)`` in proportion to ``weights``, each between 1
    and its cap (what a capped layer does not use goes to the others)."""
    budget = min(width, sum(caps.values()))
    sizes = dict.fromkeys(caps, 0)
    open_ = set(caps)
    while open_ and budget > sum(sizes.values()):
        left = budget - sum(sizes[n] for n in caps if n not in open_)
        total = sum(max(weights[n], 1e-12) for n in open_)
        capped = {n for n in open_ if left * max(weights[n], 1e-12) / total >= caps[n]}
        if not capped:
            for n in open_:
                sizes[n] = max(1, int(left * max(weights[n], 1e-12) / total))
            for n in sorted(open_, key=lambda n: -weights[n]):  # the rounding's remainder
                if sum(sizes.values()) >= budget:
                    break
                sizes[n] = min(caps[n], sizes[n] + budget - sum(sizes.values()))
            break
        for n in capped:
            sizes[n] = caps[n]
        open_ -= capped
    return sizes


def _kronecker(shapes: dict[str, tuple[int, int]], width: int, seed: int,
               layers: dict[str, Any] | None = None) -> Compression:
    """One projection size ``r`` for every layer: the largest with ``sum_l min(O, r) min(I, r)
    <= width``; orthonormal random rows (QR of a seeded Gaussian) scaled to ``E[R^T R] = 1``,
    in each layer's eigenbasis with its whitening scalings when ``layers`` has them."""
    def cost(r: int) -> int:
        return sum(min(o, r) * min(i, r) for o, i in shapes.values())

    if cost(1) > width:
        raise ValueError(f"width={width} is below one number per layer ({len(shapes)} tracked "
                         "layers): raise width.")
    r = 1
    while r < max(max(s) for s in shapes.values()) and cost(r + 1) <= width:
        r += 1
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    codes = {}
    for name, (o, i) in shapes.items():
        r_s, r_a = _projection(min(o, r), o, gen), _projection(min(i, r), i, gen)
        lf = (layers or {}).get(name)
        if lf is None or lf.eigenvalues is None:
            codes[name] = LayerCode("kronecker", r_s, r_a)
            continue
        u, v = _whitening(lf.eigenvalues.double() + lf.damping)
        q_s = lf.basis_out.double() if lf.basis_out is not None else torch.eye(o).double()
        q_a = lf.basis_in.double() if lf.basis_in is not None else torch.eye(i).double()
        codes[name] = LayerCode("kronecker", (r_s * u) @ q_s.T, (r_a * v) @ q_a.T,
                                query_left=(r_s / u) @ q_s.T, query_right=(r_a / v) @ q_a.T)
    return Compression("kronecker", codes, seed)


def _whitening(total: Tensor) -> tuple[Tensor, Tensor]:
    """``u [O]``, ``v [I]`` with ``u_o v_i ~ total_oi^(-1/2)``: the least-squares fit of
    ``-log(total) / 2`` by ``log u_o + log v_i`` (row and column means), over the positive
    entries."""
    log_w = -0.5 * total.clamp_min(total[total > 0].min() if bool((total > 0).any()) else 1.0
                                   ).log()  # [O, I]
    mean = log_w.mean()
    log_u = log_w.mean(1) - mean / 2
    log_v = log_w.mean(0) - mean / 2
    return log_u.exp(), log_v.exp()


def _projection(r: int, d: int, gen: torch.Generator) -> Tensor:
    """``[r, d]``: r orthonormal random rows scaled by ``sqrt(d / r)``."""
    gauss = torch.randn(d, r, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(gauss)  # [d, r] orthonormal columns
    return (q.T * math.sqrt(d / r)).contiguous()
