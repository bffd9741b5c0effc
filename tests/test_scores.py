"""Influence scores against brute-force references (tests/reference.py), in float64.

Exactness: the EK-FAC / K-FAC references are rebuilt from scratch (covariances from hooked rows,
their eigenbases, Lambda from explicit per-example gradients with the replayed pseudo-labels),
turned into a dense block-diagonal matrix with ``torch.kron`` and solved densely.
Accuracy: on a tiny MLP, EK-FAC is compared with the exact damped Gauss-Newton influence.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from scipy.stats import pearsonr, spearmanr
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import (
    CausalLMTask,
    LayerFactors,
    compute_pairwise_scores,
    compute_self_scores,
    fit_factors,
)
from lightning_influence.scores import self_layer_scores
from lightning_influence.statistics import EigenvalueStatistic

SEED = 5


def loader(*tensors, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


def assert_scores_close(got, expected, rel=1e-8):
    """Equal to ``rel`` relative to the largest expected magnitude (scores can cross zero)."""
    assert got.shape == expected.shape
    assert_close(got, expected, rtol=rel, atol=rel * expected.abs().max().item())


# ------------------------------------------------------------------------------- references
def reference_curvature(model, names, strategy, loss, inputs, fisher_targets, lambda_targets,
                        mask=None, damping=None):
    """Dense block-diagonal damped curvature ``[P, P]`` built from the definitions.

    ``fisher_targets`` are the covariance pass's pseudo-labels, ``lambda_targets`` the
    eigenvalue pass's. ``damping=None`` is the heuristic 0.1 x mean(Lambda) per layer.
    """
    covs = ref.covariances(ref.capture_rows(model, names, loss, inputs, fisher_targets), mask)
    grads = ref.per_example_gradients(model, names, loss, inputs, lambda_targets)
    blocks = []
    for name in names:
        a_cov, s_cov, rows = covs[name]
        l_a, q_a = ref.eigh_sorted(a_cov)
        l_s, q_s = ref.eigh_sorted(s_cov)
        if strategy == "ekfac":
            lam = ref.ekfac_lambda(q_a, q_s, grads[name])
        else:  # kfac, on the per-example scale
            lam = torch.outer(l_s.clamp_min(0), l_a.clamp_min(0)) * rows / inputs.shape[0]
        d = 0.1 * lam.mean().item() if damping is None else damping
        blocks.append(ref.kron_curvature(q_a, q_s, lam, d))
    return ref.block_diagonal(blocks)


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def mlp_problem():
    model = ref.mlp(d_in=5, hidden=4, classes=3, seed=1)
    x, y = ref.classification_data(23, seed=1)
    xq, yq = ref.classification_data(4, seed=2)
    names = ["0", "2"]
    train = loader(x, y, batch_size=6)
    queries = loader(xq, yq, batch_size=3)
    grads = ref.flat_gradients(ref.per_example_gradients(model, names, ref.class_nll, x, y), names)
    qgrads = ref.flat_gradients(
        ref.per_example_gradients(model, names, ref.class_nll, xq, yq), names)
    fisher = ref.sampled_class_labels(model, [b[0] for b in train], SEED)
    lam = ref.sampled_class_labels(model, [b[0] for b in train], SEED, stream=1)
    return dict(model=model, names=names, x=x, y=y, train=train, queries=queries, grads=grads,
                qgrads=qgrads, fisher=fisher, lam=lam)


@pytest.fixture(scope="module")
def lm_problem():
    """A causal toy LM, right-padded training data, queries with prompt tokens ignored."""
    model = ref.TinyLM(seed=1)
    names = ["fc1", "fc2"]
    ids, mask = ref.token_data(14, seed=1)
    train = loader(ids, mask, batch_size=4)
    q_ids, _ = ref.token_data(3, seed=2)
    q_mask = (torch.arange(6) < torch.tensor([[6], [5], [4]])).long()  # prompt + completion
    q_ids[q_mask == 0] = 0
    q_labels = q_ids.clone()
    q_labels[:, :2] = ref.IGNORE  # a two-token prompt: only the completion is measured
    queries = DataLoader([{"input_ids": i, "attention_mask": m, "labels": lab}
                          for i, m, lab in zip(q_ids, q_mask, q_labels, strict=True)], batch_size=2)
    targets = ref.lm_targets(ids, mask)
    grads = ref.flat_gradients(
        ref.per_example_gradients(model, names, ref.token_nll, ids, targets), names)
    q_targets = ref.lm_targets(q_ids, q_mask, q_labels)
    assert (q_targets != ref.IGNORE).any(dim=1).all()
    qgrads = ref.flat_gradients(
        ref.per_example_gradients(model, names, ref.token_nll, q_ids, q_targets), names)
    fisher = ref.sampled_lm_targets(model, list(train), SEED)
    lam = ref.sampled_lm_targets(model, list(train), SEED, stream=1)
    return dict(model=model, names=names, ids=ids, mask=mask, train=train, queries=queries,
                grads=grads, qgrads=qgrads, fisher=fisher, lam=lam)


# ------------------------------------------------------------------------------- preconditioning
def random_orthogonal(n, gen):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q


def test_precondition_equals_kron_inverse_synthetic():
    gen = torch.Generator().manual_seed(0)
    o, i = 3, 4
    lf = LayerFactors(eigenvalues=torch.rand(o, i, generator=gen, dtype=torch.float64),
                      basis_in=random_orthogonal(i, gen), basis_out=random_orthogonal(o, gen),
                      damping=0.3)
    v = torch.randn(5, o, i, generator=gen, dtype=torch.float64)
    dense = ref.kron_curvature(lf.basis_in, lf.basis_out, lf.eigenvalues, lf.damping)
    expected = ref.unvec(torch.linalg.solve(dense, ref.vec(v).T).T, o, i)
    assert_close(lf.precondition(v), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rows", [2, 40])  # 2: rotated through the rows; 40: as a matrix
@pytest.mark.parametrize("blocked", [False, True])
def test_preconditioning_query_rows_equals_the_matrix_route(rows, blocked):
    """Queries' gradients are rotated through their rows when that is cheaper: the same
    product in another order (float64: equal to 1e-12), in and out of the eigenbasis."""
    from lightning_influence.blocks import BlockDiagonal

    gen = torch.Generator().manual_seed(1)
    o, i = 12, 9
    basis_out = random_orthogonal(o, gen)
    if blocked:  # the output side as 3 orthogonal blocks of 4
        basis_out = BlockDiagonal(torch.stack([random_orthogonal(4, gen) for _ in range(3)]), o)
    lf = LayerFactors(eigenvalues=torch.rand(o, i, generator=gen, dtype=torch.float64),
                      basis_in=random_orthogonal(i, gen), basis_out=basis_out, damping=0.3)
    a = torch.randn(3, rows, i, generator=gen, dtype=torch.float64)
    g = torch.randn(3, rows, o, generator=gen, dtype=torch.float64)
    grads = torch.einsum("nto,nti->noi", g, a)
    for in_eigenbasis in (False, True):
        assert_close(lf.precondition_rows(a, g, in_eigenbasis),
                     lf.precondition(grads, in_eigenbasis), rtol=1e-12, atol=1e-12)
    dense = ref.kron_curvature(random_orthogonal(i, torch.Generator().manual_seed(2)),
                               random_orthogonal(o, torch.Generator().manual_seed(3)),
                               lf.eigenvalues, lf.damping)
    plain = LayerFactors(lf.eigenvalues, random_orthogonal(i, torch.Generator().manual_seed(2)),
                         random_orthogonal(o, torch.Generator().manual_seed(3)), damping=0.3)
    expected = ref.unvec(torch.linalg.solve(dense, ref.vec(grads).T).T, o, i)
    assert_close(plain.precondition_rows(a, g), expected, rtol=1e-10, atol=1e-12)


def test_query_gradients_in_the_eigenbasis_need_fitted_factors(mlp_problem):
    """Gradients "left in the Kronecker eigenbasis" exist only for preconditioned fitted
    factors: asked for without preconditioning, the call refuses rather than returning raw
    gradients; with it, they are the rotated ones."""
    import lightning_influence as li

    p = mlp_problem
    factors = fit_factors(p["model"], p["train"], "classification", progress=False)
    bound = li.bind(p["model"], factors, "classification")
    with pytest.raises(ValueError, match="in_eigenbasis=True.*needs fitted factors"):
        bound.query_gradients(p["queries"], precondition=False, in_eigenbasis=True,
                              progress=False)
    raw = bound.query_gradients(p["queries"], precondition=False, progress=False)
    rotated = bound.query_gradients(p["queries"], in_eigenbasis=True, progress=False)
    for name, lf in factors.layers.items():
        assert_close(rotated[name], lf.precondition(raw[name], in_eigenbasis=True),
                     rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_precondition_equals_kron_inverse_fitted(mlp_problem, strategy):
    p = mlp_problem
    factors = fit_factors(p["model"], p["train"], "classification", strategy=strategy, seed=SEED,
                          progress=False)
    covs = ref.covariances(
        ref.capture_rows(p["model"], p["names"], ref.class_nll, p["x"], p["fisher"]))
    gen = torch.Generator().manual_seed(1)
    for name in p["names"]:
        lf = factors.layers[name]
        o, i = lf.eigenvalues.shape
        v = torch.randn(3, o, i, generator=gen, dtype=torch.float64)
        if strategy == "kfac":
            # Independent of the package's bases: (r A kron S + damping)^-1 with r = 1 row.
            a_cov, s_cov, _ = covs[name]
            dense = ref.kfac_curvature(a_cov, s_cov, 1.0, lf.damping)
        else:
            dense = ref.kron_curvature(lf.basis_in, lf.basis_out, lf.eigenvalues, lf.damping)
        expected = ref.unvec(torch.linalg.solve(dense, ref.vec(v).T).T, o, i)
        assert_close(lf.precondition(v), expected, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------- exact scores
def test_identity_scores_are_gradient_dot_products(mlp_problem):
    p = mlp_problem
    factors = fit_factors(p["model"], p["train"], "classification", strategy="identity",
                          progress=False)
    result = compute_pairwise_scores(p["model"], factors, p["queries"], p["train"],
                                     "classification", progress=False)
    assert_scores_close(result.scores, p["qgrads"] @ p["grads"].T, rel=1e-10)
    self_scores = compute_self_scores(p["model"], factors, p["train"], "classification",
                                      progress=False)
    assert_scores_close(self_scores.scores, p["grads"].square().sum(1), rel=1e-10)
    expected_losses = ref.class_nll(p["model"](p["x"]), p["y"]).detach()
    assert_close(self_scores.losses.double(), expected_losses)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_pairwise_and_self_scores_equal_explicit(mlp_problem, strategy):
    p = mlp_problem
    factors = fit_factors(p["model"], p["train"], "classification", strategy=strategy, seed=SEED,
                          progress=False)
    dense = reference_curvature(p["model"], p["names"], strategy, ref.class_nll, p["x"],
                                p["fisher"], p["lam"])
    result = compute_pairwise_scores(p["model"], factors, p["queries"], p["train"],
                                     "classification", progress=False)
    assert_scores_close(result.scores, ref.influence(dense, p["qgrads"], p["grads"]))
    self_scores = compute_self_scores(p["model"], factors, p["train"], "classification",
                                      progress=False)
    assert_scores_close(self_scores.scores, ref.self_influence(dense, p["grads"]))


def test_fixed_damping_scores_equal_explicit(mlp_problem):
    p = mlp_problem
    factors = fit_factors(p["model"], p["train"], "classification", strategy="ekfac", seed=SEED,
                          damping=0.02, progress=False)
    assert factors.damping == {"0": 0.02, "2": 0.02}
    dense = reference_curvature(p["model"], p["names"], "ekfac", ref.class_nll, p["x"],
                                p["fisher"], p["lam"], damping=0.02)
    result = compute_pairwise_scores(p["model"], factors, p["queries"], p["train"],
                                     "classification", progress=False)
    assert_scores_close(result.scores, ref.influence(dense, p["qgrads"], p["grads"]))


def test_per_layer_scores_sum_to_totals(mlp_problem):
    p = mlp_problem
    factors = fit_factors(p["model"], p["train"], "classification", strategy="ekfac", seed=SEED,
                          progress=False)
    result = compute_pairwise_scores(p["model"], factors, p["queries"], p["train"],
                                     "classification", per_layer=True, progress=False)
    assert result.layer_names == p["names"]
    assert result.layer_scores.shape == (2, 4, 23)
    assert_close(result.layer_scores.sum(0), result.scores, rtol=1e-12, atol=1e-15)
    # Each layer's term is its own block of the block-diagonal inverse.
    dense = reference_curvature(p["model"], p["names"], "ekfac", ref.class_nll, p["x"],
                                p["fisher"], p["lam"])
    start = 0
    for layer, name in enumerate(p["names"]):
        size = factors.shapes[name][0] * factors.shapes[name][1]
        block = slice(start, start + size)
        expected = ref.influence(dense[block, block], p["qgrads"][:, block], p["grads"][:, block])
        assert_scores_close(result.layer_scores[layer], expected)
        start += size
    # The top-k lists carry the per-layer breakdown of the kept entries.
    top = result.top
    assert_close(top.proponent_layers.sum(-1), top.proponent_scores, rtol=1e-12, atol=1e-15)
    self_scores = compute_self_scores(p["model"], factors, p["train"], "classification",
                                      progress=False)
    assert_close(self_scores.layer_scores.sum(0), self_scores.scores, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [5, 40])
def test_streaming_top_k_equals_full_sort(mlp_problem, k):
    p = mlp_problem
    factors = fit_factors(p["model"], p["train"], "classification", strategy="ekfac", seed=SEED,
                          progress=False)
    result = compute_pairwise_scores(p["model"], factors, p["queries"], p["train"],
                                     "classification", top_k=k, progress=False)
    full = result.scores  # [Q, N], N = 23 over 4 batches of the stream
    keep = min(k, full.shape[1])
    hi = full.sort(dim=1, descending=True)
    lo = full.sort(dim=1)
    top = result.top
    assert top.proponent_indices.shape == (4, keep)
    assert torch.equal(top.proponent_indices, hi.indices[:, :keep])
    assert torch.equal(top.proponent_scores, hi.values[:, :keep])
    assert torch.equal(top.opponent_indices, lo.indices[:, :keep])
    assert torch.equal(top.opponent_scores, lo.values[:, :keep])
    # Memory does not depend on keep_scores: the same lists without the full matrix.
    streamed = compute_pairwise_scores(p["model"], factors, p["queries"], p["train"],
                                       "classification", top_k=k, keep_scores=False,
                                       progress=False)
    assert streamed.scores is None
    assert torch.equal(streamed.top.proponent_indices, top.proponent_indices)


def test_normalize_divides_by_number_of_training_examples(mlp_problem):
    p = mlp_problem
    factors = fit_factors(p["model"], p["train"], "classification", strategy="ekfac", seed=SEED,
                          progress=False)
    assert factors.num_examples == 23
    raw = compute_pairwise_scores(p["model"], factors, p["queries"], p["train"],
                                  "classification", per_layer=True, progress=False)
    norm = compute_pairwise_scores(p["model"], factors, p["queries"], p["train"],
                                   "classification", per_layer=True, normalize=True,
                                   progress=False)
    assert norm.normalized and not raw.normalized
    assert_close(norm.scores, raw.scores / 23, rtol=1e-12, atol=0)
    assert_close(norm.layer_scores, raw.layer_scores / 23, rtol=1e-12, atol=0)
    raw_self = compute_self_scores(p["model"], factors, p["train"], "classification",
                                   progress=False)
    norm_self = compute_self_scores(p["model"], factors, p["train"], "classification",
                                    normalize=True, progress=False)
    assert norm_self.normalized
    assert_close(norm_self.scores, raw_self.scores / 23, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------- sequences
@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "identity"])
def test_sequence_scores_equal_explicit(lm_problem, strategy):
    p = lm_problem
    task = CausalLMTask()
    factors = fit_factors(p["model"], p["train"], task, strategy=strategy, seed=SEED,
                          progress=False)
    if strategy == "identity":
        dense = torch.eye(p["grads"].shape[1], dtype=torch.float64)
    else:
        dense = reference_curvature(p["model"], p["names"], strategy, ref.token_nll, p["ids"],
                                    p["fisher"], p["lam"], mask=p["mask"])
    result = compute_pairwise_scores(p["model"], factors, p["queries"], p["train"], task,
                                     per_layer=True, progress=False)
    assert_scores_close(result.scores, ref.influence(dense, p["qgrads"], p["grads"]))
    self_scores = compute_self_scores(p["model"], factors, p["train"], task, progress=False)
    assert_scores_close(self_scores.scores, ref.self_influence(dense, p["grads"]))
    # both from one pass over the training data: the same numbers (the pairwise ones are
    # contracted in the Kronecker eigenbasis there, <R_q, G'_n> = <P_q, G_n>: equal to float
    # error; self-influence takes the same steps as its own pass: bit for bit)
    fused = compute_pairwise_scores(p["model"], factors, p["queries"], p["train"], task,
                                    per_layer=True, self_influence=True, progress=False)
    assert_scores_close(fused.scores, result.scores, rel=1e-12)
    assert torch.equal(fused.self_result.scores, self_scores.scores)
    assert torch.equal(fused.self_result.layer_scores, self_scores.layer_scores)
    assert torch.equal(fused.self_result.losses, self_scores.losses)
    assert result.self_result is None


@pytest.mark.parametrize("bias", [True, False])
def test_conv_scores_equal_explicit(bias):
    """Conv2d (stride 2, padding 1): 9 rows per example, contracted without building G_n."""
    model = ref.ConvNet(bias=bias, seed=2)
    names = ["conv", "fc"]
    x, y = ref.image_data(9, seed=3)
    xq, yq = ref.image_data(2, seed=4)
    train = loader(x, y, batch_size=4)
    factors = fit_factors(model, train, "classification", strategy="ekfac", seed=SEED,
                          progress=False)
    fisher = ref.sampled_class_labels(model, [b[0] for b in train], SEED)
    lam = ref.sampled_class_labels(model, [b[0] for b in train], SEED, stream=1)
    dense = reference_curvature(model, names, "ekfac", ref.class_nll, x, fisher, lam)
    grads = ref.flat_gradients(ref.per_example_gradients(model, names, ref.class_nll, x, y), names)
    qgrads = ref.flat_gradients(
        ref.per_example_gradients(model, names, ref.class_nll, xq, yq), names)
    result = compute_pairwise_scores(model, factors, loader(xq, yq, batch_size=2), train,
                                     "classification", progress=False)
    assert_scores_close(result.scores, ref.influence(dense, qgrads, grads))
    self_scores = compute_self_scores(model, factors, train, "classification", progress=False)
    assert_scores_close(self_scores.scores, ref.self_influence(dense, grads))


def test_chunked_contractions_equal_unchunked(lm_problem):
    """The per-example chunking of self-scores and Lambda sums does not change the result."""
    p = lm_problem
    factors = fit_factors(p["model"], p["train"], CausalLMTask(), strategy="ekfac", seed=SEED,
                          progress=False)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 6, 5, generator=gen, dtype=torch.float64)  # [N, T, I] of fc1 (4 + 1)
    g = torch.randn(5, 6, 5, generator=gen, dtype=torch.float64)  # [N, T, O]
    lf = factors.layers["fc1"]
    whole = self_layer_scores(lf, a, g)
    one_by_one = self_layer_scores(lf, a, g, chunk_elements=1)
    assert_close(one_by_one, whole, rtol=1e-12, atol=0)
    stats = [EigenvalueStatistic(5, 5, chunk_elements=c) for c in (2**25, 1, 50)]
    for stat in stats:
        stat.update(a, g)
    for stat in stats[1:]:
        assert_close(stat.compute()["eigenvalues"], stats[0].compute()["eigenvalues"],
                     rtol=1e-12, atol=0)


def test_bfloat16_rows_square_and_sum_in_float32_with_one_row_or_many():
    """Self-influence from 16-bit rows is squared and summed in float32 on both paths (one row
    per example, and sequences): equal to float64 arithmetic on the same rotated rows."""
    from lightning_influence.factors import LayerFactors

    gen = torch.Generator().manual_seed(0)
    o, i = 6, 5
    lf = LayerFactors(torch.rand(o, i, generator=gen, dtype=torch.float64) + 0.1,
                      torch.linalg.qr(torch.randn(i, i, generator=gen, dtype=torch.float64))[0],
                      torch.linalg.qr(torch.randn(o, o, generator=gen, dtype=torch.float64))[0],
                      damping=1e-3)
    for t in (1, 3):
        a = torch.randn(64, t, i, generator=gen).bfloat16()
        g = torch.randn(64, t, o, generator=gen).bfloat16()
        got = self_layer_scores(lf, a, g)
        assert got.dtype == torch.float32
        # the same bf16 rotations, then float64 from there on
        a_rot = (a @ lf.basis_in.bfloat16()).double()
        g_rot = (g @ lf.basis_out.bfloat16()).double()
        grads = torch.einsum("nto,nti->noi", g_rot, a_rot)
        if t > 1:  # the sequence path forms the per-example gradient from bf16 rows
            grads = torch.einsum("nto,nti->noi", g_rot.bfloat16(), a_rot.bfloat16()).double()
        expected = (grads.square() / (lf.eigenvalues + lf.damping)).sum((1, 2))
        assert_close(got.double(), expected, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------- accuracy
def blobs(n, seed):
    """Three Gaussian classes in 8 dimensions, 10% of the labels flipped at random."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 8, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64) * 1.2
    y = torch.randint(0, 3, (n,), generator=gen)
    x = centers[y] + torch.randn(n, 8, generator=gen, dtype=torch.float64)
    flip = torch.rand(n, generator=gen) < 0.1
    return x, torch.where(flip, torch.randint(0, 3, (n,), generator=gen), y)


def test_ekfac_tracks_exact_gauss_newton_influence():
    """EK-FAC vs the exact damped GGN influence on an 8-8-3 MLP (99 parameters, N = 200).

    Both use the same damping: EK-FAC's default per-layer heuristic (0.1 x mean Lambda), put on
    the diagonal of the exact GGN block by block.

    Why not higher: the gap is the approximation, not sampling noise or a bug (the exact
    equalities are tested above): the exact GGN's block-diagonal part alone reaches only about
    0.78 Spearman against the full matrix.

    Thresholds, by a stated principle: the minimum over label-sampling seeds 0-3 of this model
    (the only randomness the package adds), rounded down to two decimals, so that only a result
    worse than every seed's is a failure. Measured with the inverse-CDF label draw and one
    generator stream per pass (this test runs sampling seed 0):

        Spearman vs exact                       0.413 - 0.437   -> > 0.41
        Pearson vs exact                        0.732 - 0.795   -> > 0.73
        Spearman vs the exact block-diagonal    0.563 - 0.586   -> > 0.56
        self-influence Spearman                 0.993 - 0.994   -> > 0.99
        margin over identity (Spearman)         0.227 - 0.262   -> > 0.22

    Across model seeds 1-3 (other data and queries) the same figures span 0.31-0.48, 0.40-0.82,
    0.52-0.68, 0.986-0.995 and 0.15-0.26: the model matters more than the label draw.
    """
    torch.manual_seed(0)
    x, y = blobs(200, seed=0)
    xq, yq = blobs(20, seed=100)
    model = ref.mlp(8, 8, 3, seed=0).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        ref.class_nll(model(x), y).mean().backward()
        opt.step()
    model.eval()
    names = ["0", "2"]
    train, queries = loader(x, y, batch_size=50), loader(xq, yq, batch_size=20)

    grads = ref.flat_gradients(ref.per_example_gradients(model, names, ref.class_nll, x, y), names)
    qgrads = ref.flat_gradients(
        ref.per_example_gradients(model, names, ref.class_nll, xq, yq), names)
    ekfac = fit_factors(model, train, "classification", strategy="ekfac", progress=False)
    damping = torch.cat([torch.full((o * i,), ekfac.layers[n].damping, dtype=torch.float64)
                         for n, (o, i) in ekfac.shapes.items()])
    ggn = ref.exact_ggn(model, names, x) + torch.diag(damping)
    exact = ref.influence(ggn, qgrads, grads).flatten()
    exact_self = ref.self_influence(ggn, grads)
    split = 8 * 9
    block = ggn.clone()
    block[:split, split:] = 0
    block[split:, :split] = 0
    exact_block = ref.influence(block, qgrads, grads).flatten()

    measured = {}
    for strategy in ("identity", "kfac", "ekfac"):
        factors = ekfac if strategy == "ekfac" else fit_factors(
            model, train, "classification", strategy=strategy, progress=False)
        scores = compute_pairwise_scores(model, factors, queries, train, "classification",
                                         progress=False).scores.flatten()
        selfs = compute_self_scores(model, factors, train, "classification",
                                    progress=False).scores
        measured[strategy] = (spearmanr(scores, exact)[0], pearsonr(scores, exact)[0],
                              spearmanr(scores, exact_block)[0], spearmanr(selfs, exact_self)[0])
    ek_spearman, ek_pearson, ek_block, ek_self = measured["ekfac"]
    assert ek_spearman > 0.41, measured
    assert ek_pearson > 0.73, measured
    assert ek_block > 0.56, measured
    assert ek_self > 0.99, measured
    assert ek_spearman > measured["identity"][0] + 0.22, measured


def test_label_draw_follows_the_probabilities():
    """The Fisher labels come from draw_labels (inverse CDF, one uniform per row): their
    frequencies match the probabilities (within 5 standard errors on 200k draws), a class of
    probability 0 is never drawn, and unnormalised weights are normalised."""
    from lightning_influence.task import draw_labels

    probs = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05])
    rows = 200_000
    gen = torch.Generator().manual_seed(0)
    drawn = draw_labels((3 * probs).expand(rows, -1), gen)
    freq = torch.bincount(drawn, minlength=5).double() / rows
    stderr = (probs.double() * (1 - probs.double()) / rows).sqrt()
    assert freq[1] == 0
    assert bool(((freq - probs.double()).abs() <= 5 * stderr + 1e-12).all()), freq
    # one class with all the mass, first or last: always that class
    one_hot = torch.zeros(4, 3)
    one_hot[:2, 0] = 1
    one_hot[2:, 2] = 1
    assert draw_labels(one_hot, gen).tolist() == [0, 0, 2, 2]


def test_fits_with_different_seeds_draw_independent_labels():
    """Each pass has its own stream: the eigenvalue pass of seed s does not replay the
    covariance pass of seed s + 1 (it once did, which made neighbouring seeds share half their
    labels and understated the seed-to-seed spread)."""
    from lightning_influence.distributed import EIGENVALUE_STREAM, sampling_generator

    def draw(seed, stream):
        return torch.rand(64, generator=sampling_generator(seed, 3, stream))

    assert not torch.equal(draw(0, EIGENVALUE_STREAM), draw(1, 0))
    assert not torch.equal(draw(0, EIGENVALUE_STREAM), draw(0, 0))
    assert torch.equal(draw(2, EIGENVALUE_STREAM), draw(2, EIGENVALUE_STREAM))  # reproducible
