"""Reference solvers (explicit damped GGN, CG, LiSSA) against the brute-force exact damped
Gauss-Newton inverse of tests/reference.py, in float64."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from scipy.stats import pearsonr
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import (
    ClassificationTask,
    FactorMismatchError,
    compute_pairwise_scores,
    compute_self_scores,
    fit_factors,
)
from lightning_influence.solvers import (
    Arnoldi,
    ConjugateGradient,
    ExplicitGGN,
    LiSSA,
    make_solver,
    self_influence,
)

NAMES = ["0", "2"]


def loader(*tensors, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


@pytest.fixture(scope="module")
def setup():
    model = ref.mlp(5, 4, 3)
    x, y = ref.classification_data(40)
    xq, yq = ref.classification_data(5, seed=1)
    ggn = ref.exact_ggn(model, NAMES, x)
    train = ref.flat_gradients(ref.per_example_gradients(model, NAMES, ref.class_nll, x, y), NAMES)
    query = ref.flat_gradients(ref.per_example_gradients(model, NAMES, ref.class_nll, xq, yq),
                               NAMES)
    return model, (x, y), (xq, yq), ggn, train, query


def damping_matrix(model, damping) -> torch.Tensor:
    """Diagonal ``[P, P]`` damping, per layer in the reference's parameter order."""
    diag = [torch.full((o * i,), float(damping[n] if isinstance(damping, dict) else damping),
                       dtype=torch.float64)
            for n in NAMES for o, i in [ref.layer_shape(model.get_submodule(n))]]
    return torch.diag(torch.cat(diag))


def solve_reference(ggn, damp, vectors) -> torch.Tensor:
    return torch.linalg.solve(ggn + damp, vectors.T).T


def as_dict(model, flat, names=NAMES) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for n in names:
        o, i = ref.layer_shape(model.get_submodule(n))
        out[n] = ref.unvec(flat[:, start:start + o * i], o, i)
        start += o * i
    return out


@pytest.mark.parametrize("damping", [0.05, {"0": 0.02, "2": 0.1}])
def test_explicit_and_cg_equal_the_exact_damped_ggn_inverse(setup, damping):
    model, (x, y), _, ggn, _, query = setup
    expected = solve_reference(ggn, damping_matrix(model, damping), query)
    explicit = ExplicitGGN(model, loader(x, y), "classification", damping=damping)
    assert_close(explicit.matrix.shape[0], ggn.shape[0])
    got = ref.flat_gradients(explicit.precondition(as_dict(model, query)), NAMES)
    assert_close(got, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())
    cg = ConjugateGradient(model, loader(x, y), "classification", damping=damping, rtol=1e-12,
                           max_iterations=300)
    got = ref.flat_gradients(cg.precondition(as_dict(model, query)), NAMES)
    assert_close(got, expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())
    assert cg.residuals.max() <= 1e-12


def test_ekfac_preconditioned_cg_reaches_the_same_solution(setup):
    model, (x, y), _, ggn, _, query = setup
    expected = solve_reference(ggn, damping_matrix(model, 0.01), query)
    ekfac = fit_factors(model, loader(x, y), "classification", strategy="ekfac", damping=0.01,
                        progress=False)
    plain = ConjugateGradient(model, loader(x, y), damping=ekfac, rtol=1e-10, task="classification")
    pcg = ConjugateGradient(model, loader(x, y), "classification", damping=ekfac, rtol=1e-10,
                            preconditioner=ekfac)
    for solver in (plain, pcg):
        got = ref.flat_gradients(solver.precondition(as_dict(model, query)), NAMES)
        assert_close(got, expected, rtol=1e-7, atol=1e-7 * expected.abs().max().item())
        assert 0 < solver.iterations <= solver.max_iterations


def test_lissa_converges_to_the_exact_inverse(setup):
    model, (x, y), _, ggn, _, query = setup
    expected = solve_reference(ggn, damping_matrix(model, 0.1), query)
    # one batch holding every example: the series is deterministic (Richardson iteration)
    full = LiSSA(model, loader(x, y, batch_size=40), "classification", damping=0.1,
                 iterations=600, batch_size=40)
    assert full.scale > torch.linalg.eigvalsh(ggn).max() + 0.1
    errors = {j: (ref.flat_gradients(est, NAMES) - expected).norm() / expected.norm()
              for j, est in full.series(as_dict(model, query), [10, 100, 600])}
    assert errors[10] > errors[100] > errors[600]
    assert errors[600] < 1e-6
    # the last point of the series is what precondition() returns
    got = ref.flat_gradients(full.precondition(as_dict(model, query)), NAMES)
    assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    # stochastic mini-batches: unbiased but noisy, close in correlation
    noisy = LiSSA(model, loader(x, y), "classification", damping=0.1, iterations=600,
                  batch_size=10, repeats=2, seed=3)
    got = ref.flat_gradients(noisy.precondition(as_dict(model, query)), NAMES)
    assert pearsonr(got.flatten().numpy(), expected.flatten().numpy())[0] > 0.95


def test_solvers_plug_into_pairwise_scores_and_self_influence(setup):
    model, (x, y), (xq, yq), ggn, train, query = setup
    damp = damping_matrix(model, 0.05)
    expected = ref.influence(ggn + damp, query, train)
    solver = make_solver("explicit", model, loader(x, y), "classification", damping=0.05)
    result = compute_pairwise_scores(model, solver, loader(xq, yq), loader(x, y),
                                     "classification", top_k=3, progress=False)
    assert_close(result.scores, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())
    got = self_influence(model, solver, loader(x, y), "classification", indices=[3, 0, 17])
    want = ref.self_influence(ggn + damp, train[[3, 0, 17]])
    assert_close(got, want, rtol=1e-9, atol=0)
    # compute_self_scores preconditions a coupled solver's per-example gradients jointly
    everyone = compute_self_scores(model, solver, loader(x, y), "classification", progress=False)
    assert_close(everyone.scores, ref.self_influence(ggn + damp, train), rtol=1e-9, atol=0)
    assert_close(everyone.layer_scores.sum(0), everyone.scores, rtol=1e-12, atol=0)
    # self_influence also takes EK-FAC factors and equals compute_self_scores
    ekfac = fit_factors(model, loader(x, y), "classification", progress=False)
    assert_close(self_influence(model, ekfac, loader(x, y), "classification"),
                 compute_self_scores(model, ekfac, loader(x, y), "classification",
                                     progress=False).scores, rtol=1e-9, atol=1e-12)


class _HandWrittenCrossEntropy(ClassificationTask):
    """Same loss, written out: the solver must take the generic forward-over-reverse path."""

    def loss(self, outputs, batch):
        logp = outputs - torch.logsumexp(outputs, dim=-1, keepdim=True)
        return -logp.gather(-1, self.targets(batch).unsqueeze(-1)).squeeze(-1)


def test_generic_output_hessian_and_conv_layers():
    model = ref.ConvNet()
    x, y = ref.image_data(12)
    names = ["conv", "fc"]
    ggn = ref.exact_ggn(model, names, x)
    closed = ExplicitGGN(model, loader(x, y, batch_size=5), "classification", damping=0.0)
    generic = ExplicitGGN(model, loader(x, y, batch_size=5), _HandWrittenCrossEntropy(),
                          damping=0.0)
    # the solver's P coordinates are row-major per layer; the reference's column-stacked
    perm = []
    start = 0
    for n in names:
        o, i = ref.layer_shape(model.get_submodule(n))
        perm.append(start + torch.arange(o * i).reshape(i, o).T.reshape(-1))
        start += o * i
    perm = torch.cat(perm)
    want = ggn[perm][:, perm]
    assert_close(closed.matrix, want, rtol=1e-10, atol=1e-12)
    assert_close(generic.matrix, want, rtol=1e-10, atol=1e-12)


def test_regression_task_uses_the_identity_output_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    solver = ExplicitGGN(model, loader(x, y, batch_size=4), "regression", damping=0.0)
    params = dict(model.named_parameters())

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    jac = torch.func.jacrev(f)(params)  # {name: [N, 2, *shape]}
    rows = []
    for n in ("0", "2"):
        w, b = jac[f"{n}.weight"], jac[f"{n}.bias"]
        rows.append(torch.cat([w.reshape(10, 2, w.shape[2], -1),
                               b.reshape(10, 2, -1, 1)], dim=-1).reshape(10, 2, -1))
    j = torch.cat(rows, dim=-1)  # [N, 2, P], row-major per layer
    assert_close(solver.matrix, torch.einsum("ncp,ncq->pq", j, j) / 10, rtol=1e-10, atol=1e-12)


def test_solver_refuses_another_model_and_too_many_parameters(setup):
    model, (x, y), (xq, yq), *_ = setup
    solver = ExplicitGGN(model, loader(x, y), "classification", damping=0.1)
    other = ref.mlp(5, 4, 3, seed=1)
    with pytest.raises(FactorMismatchError, match="solver .*same architecture with different "
                                                  "weights"):
        compute_pairwise_scores(other, solver, loader(xq, yq), loader(x, y), "classification",
                                progress=False)
    with pytest.raises(ValueError, match="max_parameters"):
        ExplicitGGN(model, loader(x, y), "classification", damping=0.1, max_parameters=10)
    with pytest.raises(ValueError, match="damping has no value"):
        LiSSA(model, loader(x, y), "classification", damping={"0": 0.1}, scale=1.0)
    with pytest.raises(ValueError, match="Unknown solver"):
        make_solver("newton", model, loader(x, y), "classification")


def test_block_diagonal_solvers_solve_the_layer_wise_system(setup):
    """block_diagonal=True: the exact GGN with its cross-layer blocks zeroed (brute force)."""
    model, (x, y), _, ggn, _, query = setup
    o, i = ref.layer_shape(model.get_submodule(NAMES[0]))
    blocks = ggn.clone()
    blocks[:o * i, o * i:] = 0
    blocks[o * i:, :o * i] = 0
    expected = solve_reference(blocks, damping_matrix(model, 0.05), query)
    explicit = ExplicitGGN(model, loader(x, y), "classification", damping=0.05,
                           block_diagonal=True)
    assert explicit.matrix[:o * i, o * i:].abs().max() == 0  # layers are contiguous there too
    assert explicit.matrix[o * i:, o * i:].abs().max() > 0
    cg = ConjugateGradient(model, loader(x, y), "classification", damping=0.05, rtol=1e-12,
                           max_iterations=300, block_diagonal=True)
    for solver in (explicit, cg):
        got = ref.flat_gradients(solver.precondition(as_dict(model, query)), NAMES)
        assert_close(got, expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())


class TinyAttention(torch.nn.Module):
    """Self-attention through F.scaled_dot_product_attention, mean-pooled to class logits."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, x):  # [N, T, d]
        q, k, v = (z.unsqueeze(1) for z in self.qkv(x).chunk(3, dim=-1))  # [N, 1 head, T, d]
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(y.squeeze(1).mean(dim=1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # the vmapped reference
def test_solvers_run_through_scaled_dot_product_attention():
    """The fused attention kernels have no forward-mode derivative; the products must still
    work (and equal the brute-force GGN, built in reverse mode) on a transformer layer."""
    torch.manual_seed(0)
    model = TinyAttention().double().eval()
    x = torch.randn(12, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    names = ["qkv", "head"]
    ggn = ref.exact_ggn(model, names, x)
    query = ref.flat_gradients(ref.per_example_gradients(model, names, ref.class_nll, x[:2],
                                                         y[:2]), names)
    damp = 0.1 * torch.eye(ggn.shape[0], dtype=ggn.dtype)
    expected = torch.linalg.solve(ggn + damp, query.T).T
    solver = ExplicitGGN(model, loader(x, y, batch_size=6), "classification", damping=0.1)

    got = ref.flat_gradients(solver.precondition(as_dict(model, query, names)), names)
    assert_close(got, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("damping", [0.05, {"0": 0.02, "2": 0.1}])
def test_arnoldi_over_the_whole_space_equals_the_exact_damped_ggn_inverse(setup, damping):
    """With as many Krylov steps as parameters (39), the Ritz pairs are G's eigenpairs and the
    Woodbury solve is the exact ``(G + D)^-1``, per-layer damping included."""
    model, (x, y), _, ggn, _, query = setup
    expected = solve_reference(ggn, damping_matrix(model, damping), query)
    solver = Arnoldi(model, loader(x, y), "classification", damping=damping, iterations=39)
    got = ref.flat_gradients(solver.precondition(as_dict(model, query)), NAMES)
    assert_close(got, expected, rtol=1e-7, atol=1e-7 * expected.abs().max().item())


def test_arnoldi_finds_the_top_eigenvalues_and_inverts_its_low_rank_model(setup):
    model, (x, y), _, ggn, _, query = setup
    top = torch.linalg.eigvalsh(ggn).flip(0)[:3]
    solver = Arnoldi(model, loader(x, y), "classification", damping=0.05, iterations=20, rank=6)
    assert_close(solver.eigenvalues[:3], top, rtol=1e-6, atol=0)  # Lanczos: extremes first
    # the solve is the exact inverse of U diag(theta) U^T + D for its own Ritz vectors
    from lightning_influence.solvers import _flatten, _unflatten

    u = solver._w * solver._d[:, None]
    dense = u @ torch.diag(solver.eigenvalues) @ u.T + torch.diag(solver._d)
    b = torch.randn(3, dense.shape[0], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    got = _flatten(solver.solve(_unflatten(b, solver.shapes)), solver.names)
    assert_close(got, torch.linalg.solve(dense, b.T).T, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="damping must be > 0"):
        Arnoldi(model, loader(x, y), "classification", damping=0.0, iterations=3)

