"""Brute-force references for the influence tests (float64, tiny models only).

Nothing here calls lightning_influence's math. Everything is spelled out from the definitions in
/work/shared/DESIGN.md:

- per-example parameter gradients come from ``torch.func`` (``vmap(grad(...))``) over the model's
  own parameters, reshaped per layer to the matrix ``[W, b]`` of shape ``[O, I]`` (bias = last
  column, a Conv2d weight as ``weight.reshape(O, -1)``);
- activation rows and output-gradient rows come from plain forward hooks and tensor hooks, and a
  convolution's rows are cut out patch by patch with a Python loop (no ``F.unfold``);
- curvature matrices are dense ``[P, P]`` matrices built with ``torch.kron`` and inverted with
  ``torch.linalg.solve``; the exact damped Gauss-Newton matrix is ``mean_n J_n^T H_n J_n``.

Index letters: N examples, T rows per example, O = d_out, I = d_in (+1 with a bias), C classes,
P parameters of the tracked layers.

Vectorisation: ``vec`` stacks COLUMNS, so that ``(Q_A kron Q_S) vec(X) = vec(Q_S X Q_A^T)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap

# ------------------------------------------------------------------------------- labels
IGNORE = -100


def class_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example cross-entropy ``[N]`` for logits ``[N, C]`` and class indices ``[N]``."""
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example token cross-entropy SUMMED over positions ``[N]``.

    ``logits [N, T, C]``, ``targets [N, T]`` (already aligned with the logits: the target of
    position t is the token at t + 1); positions with target ``IGNORE`` count for nothing.
    """
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != IGNORE
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [N, T]
    return -(picked * valid).sum(dim=1)


def lm_targets(ids: Tensor, mask: Tensor, labels: Tensor | None = None) -> Tensor:
    """Next-token targets ``[N, T]`` of a right-padded batch: IGNORE where no token follows."""
    labels = ids.clone() if labels is None else labels.clone()
    labels[~mask.bool()] = IGNORE
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets


def batch_generator(seed: int, stream: int, batch: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{stream}:{batch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**32)


def inverse_cdf(probs: Tensor, gen: torch.Generator) -> Tensor:
    """Row r gets the first class whose cumulative probability exceeds u_r * total, u_r being
    the r-th uniform number the generator gives."""
    u = torch.rand(probs.shape[0], generator=gen)
    cdf = probs.cumsum(dim=1)
    below = (cdf <= (u * cdf[:, -1]).unsqueeze(1)).sum(dim=1)
    return below.clamp_max(probs.shape[1] - 1)


def sampled_class_labels(model: nn.Module, batches: Sequence[Tensor], seed: int,
                         stream: int = 0) -> Tensor:
    """Labels drawn from the model's predictive distribution, as the package draws them.

    One ``torch.Generator`` per batch, seeded with the low 32 bits of the 8-byte BLAKE2b digest
    of ``"{seed}:{stream}:{batch_index}"`` (stream 0: covariance pass, 1: eigenvalue pass; so the
    draw does not depend on how batches are shared among processes), one uniform number per
    example mapped through the inverse cumulative distribution of its float32 probabilities.
    """
    out = []
    with torch.no_grad():
        for b, x in enumerate(batches):
            gen = batch_generator(seed, stream, b)
            probs = torch.softmax(model(x).float(), dim=-1)
            out.append(inverse_cdf(probs, gen))
    return torch.cat(out)


def sampled_lm_targets(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]],
                       seed: int, stream: int = 0) -> Tensor:
    """Sampled tokens ``[N, T]`` at every position where the training loss has a target.

    The Fisher of the training loss only involves the predictive distributions that the loss
    uses: positions with a next-token target (not padding, not the last real token).
    """
    out = []
    with torch.no_grad():
        for b, (ids, mask) in enumerate(batches):
            gen = batch_generator(seed, stream, b)
            logits = model(ids)
            n, t, c = logits.shape
            probs = torch.softmax(logits.float().reshape(n * t, c), dim=-1)
            sampled = inverse_cdf(probs, gen).reshape(n, t)
            sampled[lm_targets(ids, mask) == IGNORE] = IGNORE
            out.append(sampled)
    return torch.cat(out)


# ------------------------------------------------------------------------------- layers
def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(O, I)`` of a Linear / Conv2d seen as ``[W, b]``."""
    o = module.weight.shape[0]
    return o, module.weight[0].numel() + int(module.bias is not None)


def as_matrix(module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Weight-shaped (and bias-shaped) tensors with leading batch dims -> ``[..., O, I]``."""
    o = module.weight.shape[0]
    lead = weight.shape[: weight.dim() - module.weight.dim()]
    w = weight.reshape(*lead, o, -1)
    if bias is None:
        return w
    return torch.cat([w, bias.reshape(*lead, o, 1)], dim=-1)


def vec(m: Tensor) -> Tensor:
    """Column-stacking ``vec`` of ``[..., O, I]`` -> ``[..., O * I]``."""
    return m.transpose(-1, -2).reshape(*m.shape[:-2], -1)


def unvec(v: Tensor, o: int, i: int) -> Tensor:
    """Inverse of :func:`vec`."""
    return v.reshape(*v.shape[:-1], i, o).transpose(-1, -2)


# ------------------------------------------------------------------------------- gradients
def per_example_gradients(model: nn.Module, names: Sequence[str],
                          loss: Callable[..., Tensor], inputs: Tensor, *targets: Tensor,
                          ) -> dict[str, Tensor]:
    """``{layer: [N, O, I]}``: the gradient of ``loss(model(x_n), *targets_n)`` for every n.

    Each example is run alone (a batch of one) through ``functional_call``.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, x, *t):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return loss(out, *(ti.unsqueeze(0) for ti in t)).sum()

    in_dims = (None, 0) + (0,) * len(targets)
    grads = vmap(grad(one), in_dims=in_dims)(params, inputs, *targets)
    out = {}
    for name in names:
        module = model.get_submodule(name)
        bias = grads.get(f"{name}.bias") if module.bias is not None else None
        out[name] = as_matrix(module, grads[f"{name}.weight"], bias)
    return out


def flat_gradients(grads: dict[str, Tensor], names: Sequence[str]) -> Tensor:
    """``[N, P]``: per-layer ``vec`` of ``[N, O, I]`` gradients, layers in ``names`` order."""
    return torch.cat([vec(grads[n]) for n in names], dim=1)


# ------------------------------------------------------------------------------- rows
def conv_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Input patches ``[N, T, C*kh*kw]`` of a Conv2d (dilation 1, groups 1), one per output.

    Output positions in row-major order; a patch is flattened as ``(C, kh, kw)``, like the weight.
    """
    assert conv.dilation == (1, 1) and conv.groups == 1
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    n, c, h, w = x.shape
    padded = x.new_zeros(n, c, h + 2 * ph, w + 2 * pw)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    out_h = (h + 2 * ph - kh) // sh + 1
    out_w = (w + 2 * pw - kw) // sw + 1
    patches = []
    for i in range(out_h):
        for j in range(out_w):
            patches.append(padded[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].reshape(n, -1))
    return torch.stack(patches, dim=1)


def capture_rows(model: nn.Module, names: Sequence[str], loss: Callable[..., Tensor],
                 inputs: Tensor, *targets: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer: (a [N, T, I], g [N, T, O])}`` for ``loss(model(inputs), *targets).sum()``.

    ``a`` are the layer's input rows (a 1 appended with a bias), ``g`` the gradient of the summed
    loss with respect to the layer's output rows. A module called several times (shared) gets
    the rows of every call, concatenated along T in call order. The model must not modify a
    tracked layer's output in place (the tensor hooks would see the modified tensor).
    """
    seen_in, seen_grad = {}, {}
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod, args, output, name=name):
            seen_in.setdefault(name, []).append(args[0].detach())
            slot = len(seen_in[name]) - 1
            grads = seen_grad.setdefault(name, {})
            output.register_hook(lambda g, slot=slot, grads=grads: grads.__setitem__(
                slot, g.detach()))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            loss(model(inputs), *targets).sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    out = {}
    for name in names:
        module = model.get_submodule(name)
        a_calls, g_calls = [], []
        for slot, x in enumerate(seen_in[name]):
            g = seen_grad[name][slot]
            n = x.shape[0]
            if isinstance(module, nn.Conv2d):
                a = conv_patches(x, module)
                g = g.permute(0, 2, 3, 1).reshape(n, -1, g.shape[1])  # [N, H'W', O]
            else:
                a = x.reshape(n, -1, x.shape[-1])
                g = g.reshape(n, -1, g.shape[-1])
            if module.bias is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            a_calls.append(a)
            g_calls.append(g)
        out[name] = (torch.cat(a_calls, dim=1), torch.cat(g_calls, dim=1))
    return out


def covariances(rows: dict[str, tuple[Tensor, Tensor]], mask: Tensor | None = None,
                ) -> dict[str, tuple[Tensor, Tensor, int]]:
    """``{layer: (A [I, I], S [O, O], number of rows)}``: means over the (unmasked) rows."""
    out = {}
    for name, (a, g) in rows.items():
        keep = torch.ones(a.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
        a_rows, g_rows = a[keep], g[keep]  # [R, I], [R, O]
        count = a_rows.shape[0]
        out[name] = (a_rows.T @ a_rows / count, g_rows.T @ g_rows / count, count)
    return out


# ------------------------------------------------------------------------------- curvature
def kron_curvature(q_a: Tensor, q_s: Tensor, lam: Tensor, damping: float) -> Tensor:
    """Dense ``[O*I, O*I]``: ``(Q_A kron Q_S) diag(vec(Lambda) + damping) (Q_A kron Q_S)^T``."""
    q = torch.kron(q_a, q_s)
    return q @ torch.diag(vec(lam) + damping) @ q.T


def kfac_curvature(a_cov: Tensor, s_cov: Tensor, rows_per_example: float,
                   damping: float) -> Tensor:
    """Dense damped K-FAC block ``rows_per_example * (A kron S) + damping * 1``."""
    m = rows_per_example * torch.kron(a_cov, s_cov)
    return m + damping * torch.eye(m.shape[0], dtype=m.dtype)


def ekfac_lambda(q_a: Tensor, q_s: Tensor, grads: Tensor) -> Tensor:
    """EK-FAC eigenvalues ``[O, I]``: mean over n of ``(Q_S^T G_n Q_A)^2``, ``grads [N, O, I]``."""
    return (q_s.T @ grads @ q_a).square().mean(dim=0)


def eigh_sorted(m: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of the symmetric part (ascending eigenvalues)."""
    return torch.linalg.eigh(0.5 * (m + m.T))


def block_diagonal(blocks: Sequence[Tensor]) -> Tensor:
    return torch.block_diag(*blocks)


def influence(curvature: Tensor, query: Tensor, train: Tensor) -> Tensor:
    """``[Q, N]``: ``query_q^T curvature^-1 train_n`` for ``query [Q, P]``, ``train [N, P]``."""
    solved = torch.linalg.solve(curvature, train.T)  # [P, N]
    return query @ solved


def self_influence(curvature: Tensor, train: Tensor) -> Tensor:
    """``[N]``: ``train_n^T curvature^-1 train_n``."""
    return (train * torch.linalg.solve(curvature, train.T).T).sum(dim=1)


def exact_ggn(model: nn.Module, names: Sequence[str], inputs: Tensor) -> Tensor:
    """Exact Gauss-Newton matrix ``[P, P]`` of the MEAN cross-entropy loss over ``inputs``.

    ``G = mean_n J_n^T (diag(p_n) - p_n p_n^T) J_n`` with ``J_n = d logits_n / d theta``
    ``[C, P]``; parameters ordered like :func:`flat_gradients` (per layer ``vec([W, b])``).
    Only the parameters of the layers in ``names`` are differentiated.
    """
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits(p, x):
        return functional_call(model, p, (x.unsqueeze(0),))[0]  # [C]

    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, inputs)  # {name: [N, C, *shape]}
    blocks = []
    for name in names:
        module = model.get_submodule(name)
        bias = jac.get(f"{name}.bias") if module.bias is not None else None
        blocks.append(vec(as_matrix(module, jac[f"{name}.weight"], bias)))  # [N, C, O*I]
    j = torch.cat(blocks, dim=-1)  # [N, C, P]
    with torch.no_grad():
        p = torch.softmax(model(inputs), dim=-1)  # [N, C]
    h = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # [N, C, C]
    return torch.einsum("ncp,ncd,ndq->pq", j, h, j) / inputs.shape[0]


# ------------------------------------------------------------------------------- tiny models
def mlp(d_in: int = 5, hidden: int = 4, classes: int = 3, bias: bool = True,
        seed: int = 0) -> nn.Sequential:
    """``Linear -> tanh -> Linear`` in float64 (tracked layers are named "0" and "2")."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(),
                         nn.Linear(hidden, classes, bias=bias)).double().eval()


class ConvNet(nn.Module):
    """``Conv2d(2, 3, 3, stride 2, padding 1) -> tanh -> Linear`` on ``[N, 2, 6, 6]`` images."""

    def __init__(self, bias: bool = True, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias)  # -> [N, 3, 3, 3]
        self.fc = nn.Linear(27, classes, bias=bias)
        self.double().eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class TinyLM(nn.Module):
    """A causal toy LM: embeddings, a causal running mean, ``Linear -> tanh -> Linear``.

    ``ids [N, T]`` -> logits ``[N, T, V]``; position t only sees tokens ``<= t``.
    """

    def __init__(self, vocab: int = 7, dim: int = 4, hidden: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, vocab)
        self.double().eval()

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids)  # [N, T, D]
        steps = torch.arange(1, ids.shape[1] + 1, dtype=x.dtype).reshape(1, -1, 1)
        x = x.cumsum(dim=1) / steps  # causal running mean [N, T, D]
        return self.fc2(torch.tanh(self.fc1(x)))  # [N, T, V]


def classification_data(n: int, d_in: int = 5, classes: int = 3, seed: int = 0,
                        ) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def image_data(n: int, classes: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def token_data(n: int, length: int = 6, vocab: int = 7, pad: int = 0, seed: int = 0,
               ) -> tuple[Tensor, Tensor]:
    """Right-padded ``ids [N, T]`` (tokens in 1..V-1, padding ``pad``) and ``mask [N, T]``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    lengths = torch.randint(2, length + 1, (n,), generator=gen)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    ids[~mask] = pad
    return ids, mask.long()
