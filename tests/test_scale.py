"""Real widths: block-diagonal factors against explicit block-Kronecker references, factor
dtypes, sums held once and freed once consumed, and the memory plan's refusal before any pass."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import reference as ref
import torch
from scipy.stats import pearsonr
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.blocks import BlockDiagonal, blocked_shape
from lightning_influence.fitting import eigenbases
from lightning_influence.memory import MemoryPlanError, plan_memory
from lightning_influence.statistics import factor_dtypes


def loader(*tensors, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


def _block_mask(dim: int, block: int) -> torch.Tensor:
    ids = torch.arange(dim) // block
    return (ids[:, None] == ids[None, :]).double()


@pytest.fixture(scope="module")
def wide_mlp():
    model = ref.mlp(d_in=9, hidden=7, classes=5, seed=2)  # fc0: [7, 10], fc2: [5, 8]
    x, y = ref.classification_data(30, d_in=9, classes=5, seed=3)
    xq, yq = ref.classification_data(4, d_in=9, classes=5, seed=4)
    return model, ["0", "2"], x, y, xq, yq


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_block_diagonal_factors_equal_explicit_block_kronecker_curvature(wide_mlp, strategy):
    """block_size=4: each side wider than 4 keeps its diagonal 4 x 4 blocks (the last narrower);
    the scores are those of the dense block-diagonal A and S, decomposed and inverted
    explicitly in float64 (empirical Fisher: no label draw to replay)."""
    model, names, x, y, xq, yq = wide_mlp
    factors = li.fit_factors(model, loader(x, y, batch_size=8), "classification",
                             strategy=strategy, fisher="empirical", block_size=4,
                             damping=1e-3, progress=False)
    rows = ref.capture_rows(model, names, ref.class_nll, x, y)
    covs = ref.covariances(rows)
    grads = ref.per_example_gradients(model, names, ref.class_nll, x, y)
    blocks = []
    for name in names:
        a_cov, s_cov, count = covs[name]
        a_cov = a_cov * _block_mask(a_cov.shape[0], 4)
        s_cov = s_cov * _block_mask(s_cov.shape[0], 4)
        l_a, q_a = ref.eigh_sorted(a_cov)
        l_s, q_s = ref.eigh_sorted(s_cov)
        lam = (ref.ekfac_lambda(q_a, q_s, grads[name]) if strategy == "ekfac" else
               torch.outer(l_s.clamp_min(0), l_a.clamp_min(0)) * count / x.shape[0])
        blocks.append(ref.kron_curvature(q_a, q_s, lam, 1e-3))
        lf = factors.layers[name]
        assert isinstance(lf.basis_in, BlockDiagonal) and isinstance(lf.basis_out, BlockDiagonal)
        o, i = lf.eigenvalues.shape
        assert tuple(lf.basis_in.blocks.shape) == blocked_shape(i, 4)
        assert_close(lf.basis_in.dense() @ lf.basis_in.dense().T, torch.eye(i, dtype=torch.float64))
    curvature = ref.block_diagonal(blocks)
    train = ref.flat_gradients(grads, names)
    queries = ref.flat_gradients(ref.per_example_gradients(model, names, ref.class_nll, xq, yq),
                                 names)
    got = li.compute_pairwise_scores(model, factors, loader(xq, yq, batch_size=4),
                                     loader(x, y, batch_size=8), "classification",
                                     progress=False).scores
    expected = ref.influence(curvature, queries, train)
    assert_close(got, expected, rtol=1e-8, atol=1e-8 * expected.abs().max().item())
    self_scores = li.compute_self_scores(model, factors, loader(x, y, batch_size=8),
                                         "classification", progress=False).scores
    want = ref.self_influence(curvature, train)
    assert_close(self_scores, want, rtol=1e-8, atol=1e-8 * want.abs().max().item())


def test_block_diagonal_factors_round_trip_through_their_file(wide_mlp, tmp_path):
    model, _, x, y, xq, yq = wide_mlp
    data = loader(x, y, batch_size=8)
    fitted = li.fit_factors(model, data, "classification", block_size=4, output_dir=tmp_path,
                            progress=False)
    loaded = li.Factors.load(tmp_path)
    assert loaded.metadata()["blocks"] == {"0": {"in": 4, "out": 4}, "2": {"in": 4, "out": 4}}
    for name, lf in fitted.layers.items():
        assert_close(loaded.layers[name].basis_out.dense(), lf.basis_out.dense())
    queries = loader(xq, yq, batch_size=4)
    a = li.compute_pairwise_scores(model, fitted, queries, data, "classification",
                                   progress=False).scores
    b = li.compute_pairwise_scores(model, loaded, queries, data, "classification",
                                   progress=False).scores
    assert_close(a, b)


def test_factor_dtypes_store_what_they_say_and_score_alike(wide_mlp):
    _, _, x, y, xq, yq = wide_mlp
    data = loader(x.float(), y, batch_size=8)
    queries = loader(xq.float(), yq, batch_size=4)
    model32 = ref.mlp(d_in=9, hidden=7, classes=5, seed=2).float()
    scores = {}
    for dtype in ("float64", "float32", "bfloat16"):
        f = li.fit_factors(model32, data, "classification", factor_dtype=dtype,
                           fisher="empirical", progress=False)
        want = {"float64": torch.float64, "float32": torch.float32,
                "bfloat16": torch.bfloat16}[dtype]
        assert all(lf.eigenvalues.dtype == lf.basis_in.dtype == want for lf in f.layers.values())
        scores[dtype] = li.compute_pairwise_scores(model32, f, queries, data, "classification",
                                                   progress=False).scores.flatten()
    base = scores["float64"]
    assert_close(scores["float32"], base, rtol=1e-4, atol=1e-4 * base.abs().max().item())
    assert pearsonr(scores["bfloat16"], base)[0] > 0.999
    # auto: float64 for small layers and float64 models, float32 for wide ones
    assert factor_dtypes("auto", 10, 7) == (torch.float64, torch.float64)
    assert factor_dtypes("auto", 3073, 768) == (torch.float32, torch.float32)
    assert factor_dtypes("auto", 3073, 768, torch.float64)[1] == torch.float64
    assert factor_dtypes("bfloat16", 10, 7) == (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="factor_dtype='half'"):
        li.FitOptions(factor_dtype="half")


def test_covariance_sums_are_held_once_and_freed_as_they_are_decomposed(wide_mlp):
    model, _, x, y, _, _ = wide_mlp
    covs = li.fit_covariances(model, loader(x, y, batch_size=8), "classification",
                              progress=False)
    for stat in covs.values():  # torchmetrics' default copies are empty, not a second sum
        assert stat._defaults["activation_sum"].numel() == 0
        assert stat._defaults["gradient_sum"].numel() == 0
    expected = {n: stat.compute()["A"].clone() for n, stat in covs.items()}
    bases = eigenbases(covs)
    for name, stat in covs.items():
        assert stat.activation_sum.numel() == 0 and stat.gradient_sum.numel() == 0
        assert float(stat.compute()["examples"]) == 30  # the counts stay
        q, lam = bases[name]["q_a"], bases[name]["l_a"]
        assert_close(q @ torch.diag(lam) @ q.T, expected[name], rtol=1e-9, atol=1e-12)
    with pytest.raises(RuntimeError, match="consumed"):
        next(iter(covs.values())).update(torch.zeros(1, 1, 10), torch.zeros(1, 1, 7))


# ------------------------------------------------------------------------------- the plan
class WideHead(nn.Module):
    """A small trunk and a 3000-wide head: the head's 3000 x 3000 output factor dominates."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3000)

    def forward(self, x):
        return self.head(torch.tanh(self.trunk(x)))


class CountingLoader:
    """A loader that counts the batches drawn from it."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.drawn = loader, 0
        self.dataset, self.batch_size = loader.dataset, loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.drawn += 1
            yield batch


def _wide_data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(24, 6, generator=g), torch.randint(0, 3000, (24,),
                                                                           generator=g))


def test_a_plan_that_cannot_fit_is_refused_before_any_pass_with_fixes_that_work():
    model, data = WideHead(), CountingLoader(DataLoader(_wide_data(), batch_size=8))
    plan = plan_memory(model, data, "classification")
    head = plan.layers["head"]
    assert head["covariances"] == (9 * 9 + 3000 * 3000) * 4  # float32 sums: a wide layer
    assert head["eigenbases"] == (9 * 9 + 3000 * 3000) * 4
    limit = 0.02  # GiB: the trunk fits easily, the head's 3000 x 3000 factors do not
    assert plan.peak_bytes > limit * 2**30
    data.drawn = 0
    with pytest.raises(MemoryPlanError) as info:
        li.fit_factors(model, data, "classification", memory_limit=limit, progress=False)
    message = str(info.value)
    assert data.drawn <= 1  # the probe's first batch; no pass ran
    assert "head [3000 x 9]" in message and "exclude=['head']" in message
    assert "memory_limit='off'" in message
    block = int(message.split("block_size=")[1].split(")")[0])  # the largest block that fits
    # the stated fixes fit: leaving out the head, or block-diagonal factors
    li.fit_factors(model, data, "classification", exclude=["head"], memory_limit=limit,
                   progress=False)
    li.fit_factors(model, data, "classification", block_size=block, memory_limit=limit,
                   progress=False)


def test_a_scoring_pass_that_cannot_fit_is_refused_before_it_runs():
    model = WideHead()
    data = DataLoader(_wide_data(), batch_size=8)
    factors = li.fit_factors(model, data, "classification", exclude=["head"], progress=False)
    queries = DataLoader(TensorDataset(torch.randn(500, 6), torch.randint(0, 3000, (500,))),
                         batch_size=100)
    counting = CountingLoader(data)
    with pytest.raises(MemoryPlanError, match="pairwise"):  # 500 query gradients kept
        li.compute_pairwise_scores(model, factors, queries, counting, "classification",
                                   memory_limit=0.0001, progress=False)
    assert counting.drawn <= 1


def test_the_callbacks_refuse_a_plan_before_the_first_training_step(tmp_path):
    steps = []

    class Module(pl.LightningModule):
        influence_task = "classification"

        def __init__(self) -> None:
            super().__init__()
            self.net = WideHead()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callbacks = [li.InfluenceStatistics(fit=li.FitOptions(memory_limit=0.02, progress=False)),
                 li.EigenCorrection()]
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=callbacks,
                         default_root_dir=str(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(MemoryPlanError, match="net.head"):
        trainer.fit(Module(), DataLoader(_wide_data(), batch_size=8))
    assert steps == []


def test_float32_eigendecompositions_give_orthonormal_bases_and_the_same_scores(wide_mlp):
    """eigh_dtype="float32" (opt-in, about 2x faster than float64 at real widths): bases
    orthonormal to float32 precision, scores close to float64 decompositions' on a
    well-conditioned problem; the default decides per side (tests below)."""
    assert li.FitOptions().eigh_dtype == "auto"
    _, _, x, y, xq, yq = wide_mlp
    model = ref.mlp(d_in=9, hidden=7, classes=5, seed=2).float()
    data = loader(x.float(), y, batch_size=8)
    queries = loader(xq.float(), yq, batch_size=4)
    got = {}
    for eigh in ("float32", "float64"):
        f = li.fit_factors(model, data, "classification", factor_dtype="float32",
                           eigh_dtype=eigh, fisher="empirical", progress=False)
        for lf in f.layers.values():
            q = lf.basis_out.double()
            assert_close(q.T @ q, torch.eye(q.shape[0], dtype=torch.float64), atol=1e-5, rtol=0)
        got[eigh] = li.compute_pairwise_scores(model, f, queries, data, "classification",
                                               progress=False).scores
    top = got["float64"].abs().max().item()
    assert_close(got["float32"], got["float64"], rtol=0, atol=1e-4 * top)
    with pytest.raises(ValueError, match="eigh_dtype='half'"):
        li.FitOptions(eigh_dtype="half")


def _spd(width: int, condition: float, seed: int) -> torch.Tensor:
    """A symmetric positive definite float32 matrix with eigenvalues spread geometrically
    from 1 down to 1 / condition (only its lower triangle holds the values, like the wide
    CPU sums)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64)).Q
    values = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), width,
                            dtype=torch.float64)
    return torch.tril(q @ torch.diag(values) @ q.T).float()


def test_auto_eigh_takes_float32_only_for_wide_sides_checked_well_conditioned(monkeypatch):
    """eigh_dtype="auto" decomposes a float32 side in float32 only when it is wide enough to
    pay and a float64 Cholesky test shows its condition number to be at most about 1e4; nearly singular,
    singular, indefinite and narrow sides stay float64; the test leaves torch's global random
    state alone (it must not change the user's run)."""
    from lightning_influence import factors as fmod

    monkeypatch.setattr(fmod, "FLOAT32_EIGH_MIN_WIDTH", 48)
    well, near = _spd(64, 1e3, 0), _spd(64, 1e6, 1)
    assert fmod.float32_suffices(_spd(64, 5e3, 2))
    assert not fmod.float32_suffices(_spd(64, 3e4, 2))
    singular = well.clone()
    singular[:, 0] = 0.0
    singular[0, :] = 0.0
    indefinite = well.clone()
    indefinite[5, 5] = -1.0
    state = torch.random.get_rng_state()
    assert fmod.eigh_dtype_for(well, None) == torch.float32
    for m in (near, singular, indefinite, _spd(32, 10.0, 3)):  # the last: narrower than 48
        assert fmod.eigh_dtype_for(m, None) == torch.float64
    assert fmod.eigh_dtype_for(well, torch.float64) == torch.float64  # a named dtype is kept
    assert torch.equal(torch.random.get_rng_state(), state)
    # what float32 gives where the test allows it: the same decomposition to float32 precision
    values, vectors = fmod.eigendecompose(well, "activation", "x", dtype=None)
    assert vectors.dtype == torch.float32
    exact = torch.tril(well.double()) + torch.tril(well.double(), -1).T
    rebuilt = vectors.double() @ torch.diag(values) @ vectors.double().T
    assert (rebuilt - exact).norm() <= 1e-5 * exact.norm()
    # nearly singular: float64, bit for bit what eigh_dtype="float64" gives
    v64, q64 = fmod.eigendecompose(near, "activation", "x", dtype=torch.float64)
    v_auto, q_auto = fmod.eigendecompose(near, "activation", "x", dtype=None)
    assert torch.equal(v64, v_auto) and torch.equal(q64, q_auto)


def test_auto_eigh_records_each_sides_dtype_in_the_factors(monkeypatch, tmp_path):
    """fit_factors with the default records what each side was decomposed in (saved with the
    factors); with the width threshold lowered, a well-conditioned wide side goes float32 and
    the scores stay within 1e-4 of the largest of an all-float64 fit's."""
    from lightning_influence import factors as fmod

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 3)).float()
    x, y = torch.randn(256, 24), torch.randint(0, 3, (256,))
    data, queries = loader(x, y, batch_size=32), loader(x[:4], y[:4], batch_size=4)
    monkeypatch.setattr(fmod, "FLOAT32_EIGH_MIN_WIDTH", 20)
    fits = {e: li.fit_factors(model, data, "classification", factor_dtype="float32",
                              eigh_dtype=e, fisher="empirical", progress=False)
            for e in ("auto", "float64")}
    chosen = fits["auto"].extra["eigh_dtypes"]
    assert set(chosen) == {"0", "2"}
    assert chosen["0"]["a"] == "float32"  # 25 wide (24 inputs + bias), Gaussian inputs
    assert all(d in ("float32", "float64") for c in chosen.values() for d in c.values())
    assert all(d == "float64" for c in fits["float64"].extra["eigh_dtypes"].values()
               for d in c.values())
    fits["auto"].save(tmp_path)
    assert li.Factors.load(tmp_path).extra["eigh_dtypes"] == chosen
    got = {e: li.compute_pairwise_scores(model, f, queries, data, "classification",
                                         progress=False).scores for e, f in fits.items()}
    top = got["float64"].abs().max().item()
    assert_close(got["auto"], got["float64"], rtol=0, atol=1e-4 * top)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_cpu_covariances_accumulate_one_triangle_and_mirror_it(dtype, threads):
    """Wide sides on the CPU are updated in their lower triangle only (about half the
    multiply-adds): through BLAS syrk on one thread (nothing above the diagonal written), by
    block rows on more (nothing above the diagonal blocks written); compute() mirrors it, and
    the result is x^T x."""
    from lightning_influence.statistics import CovarianceStatistic

    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 5, 300, generator=gen, dtype=dtype),
                torch.randn(4, 5, 260, generator=gen, dtype=dtype)) for _ in range(3)]
    stat = CovarianceStatistic(300, 260, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for a, g in batches:
            stat.update(a, g)
    finally:
        torch.set_num_threads(before)
    # syrk: one triangle; blocks of 64 (300 wide: 5 blocks): nothing right of the first
    assert stat.activation_sum.triu(1 if threads == 1 else 64).abs().max() == 0
    a_all = torch.cat([a.reshape(-1, 300) for a, _ in batches]).double()
    g_all = torch.cat([g.reshape(-1, 260) for _, g in batches]).double()
    got = stat.compute()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(got["A"].double(), a_all.T @ a_all / 60, rtol=tol, atol=tol)
    assert_close(got["S"].double(), g_all.T @ g_all / 60, rtol=tol, atol=tol)
    basis = eigenbases({"x": stat})["x"]  # the decomposition reads the written triangle
    q, lam = basis["q_a"].double(), basis["l_a"]
    assert_close(q @ torch.diag(lam) @ q.T, got["A"].double(), rtol=0, atol=1e-4 if dtype ==
                 torch.float32 else 1e-10)


@pytest.mark.parametrize("basis_dtype", [torch.float32, torch.float64])
def test_rows_times_pads_odd_bases_and_returns_the_product(basis_dtype):
    """On the CPU, many rows times a basis whose width is not a multiple of 16 go through a
    zero-padded copy (faster BLAS): the result is x Q in the rows' dtype, a view of the first D
    columns; few rows or an aligned width multiply directly."""
    from lightning_influence.blocks import PAD_MIN_ROWS, padded_width, rows_times

    gen = torch.Generator().manual_seed(0)
    for dim, rows in ((257, PAD_MIN_ROWS), (257, 3), (256, PAD_MIN_ROWS)):
        q = torch.randn(dim, dim, generator=gen, dtype=basis_dtype)
        x = torch.randn(2, rows, dim, generator=gen)
        got = rows_times(q, x)
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_close(got.double(), x.double() @ q.double(), rtol=1e-5, atol=1e-4)
        padded = dim % 16 != 0 and rows * 2 >= PAD_MIN_ROWS
        assert got.is_contiguous() != padded
        if padded:
            assert got.stride(-2) == padded_width(dim)


def test_memory_plan_counts_rotated_rows_at_their_padded_width():
    """Rows rotated by a basis whose width is not a multiple of 16 live in a padded buffer
    (blocks.rows_times): the plan of the eigenvalue pass counts that width, so one more real
    column (256 -> 257) costs 16 more columns of rotated rows, not one."""
    from lightning_influence.memory import BatchProfile, plan_layers

    batch = {"batch_size": 8, "rows": {"l": 128}}
    plans = {i: plan_layers({"l": [64, i]}, li.FitOptions(),
                            BatchProfile(**batch)).stages["eigenvalues"] for i in (256, 257)}
    assert plans[257] - plans[256] >= 4 * 8 * 128 * 16
