"""Curvature factors against brute-force references (tests/reference.py), in float64.

The package draws pseudo-labels with one ``torch.Generator`` per pass: seeded with ``seed`` in the
covariance pass and in its own stream in the eigenvalue-correction pass, batches in loader order. The
references replay exactly that, so A, S and Lambda can be compared to round-off.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import (
    CausalLMTask,
    FactorMismatchError,
    Factors,
    compute_self_scores,
    fit_covariances,
    fit_factors,
)

SEED = 3


def loader(*tensors, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


class NeverIterate:
    """A loader that fails when iterated: proves stored factors were reused, not refitted."""

    dataset = range(1)

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        raise AssertionError("the loader was iterated although stored factors should be reused")


# ------------------------------------------------------------------------------- cases
def mlp_case(bias: bool = True):
    model = ref.mlp(bias=bias)
    x, y = ref.classification_data(20)
    return model, ["0", "2"], loader(x, y, batch_size=7), "classification", x, None


def conv_case(bias: bool = True):
    model = ref.ConvNet(bias=bias)
    x, y = ref.image_data(10)
    return model, ["conv", "fc"], loader(x, y, batch_size=4), "classification", x, None


def lm_case():
    model = ref.TinyLM()
    ids, mask = ref.token_data(12)
    return model, ["fc1", "fc2"], loader(ids, mask, batch_size=5), CausalLMTask(), ids, mask


CASES = {
    "linear": lambda: mlp_case(True),
    "linear-nobias": lambda: mlp_case(False),
    "conv-stride-pad": lambda: conv_case(True),
    "conv-nobias": lambda: conv_case(False),
    "sequence-padded": lm_case,
}


def sampled_targets(model, data, inputs, mask, seed, stream=0):
    """Pseudo-labels of one pass, replayed, with the matching per-example loss."""
    if mask is None:
        return ref.class_nll, ref.sampled_class_labels(model, [b[0] for b in data], seed, stream)
    return ref.token_nll, ref.sampled_lm_targets(model, list(data), seed, stream)


# ------------------------------------------------------------------------------- A and S
@pytest.mark.parametrize("case", list(CASES))
def test_covariances_equal_explicit_rows(case):
    model, names, data, task, inputs, mask = CASES[case]()
    covs = fit_covariances(model, data, task, seed=SEED, progress=False)
    loss, targets = sampled_targets(model, data, inputs, mask, SEED)
    expected = ref.covariances(ref.capture_rows(model, names, loss, inputs, targets), mask)
    assert sorted(covs) == sorted(names)
    for name in names:
        got = covs[name].compute()
        a_cov, s_cov, rows = expected[name]
        assert_close(got["A"], a_cov, rtol=1e-10, atol=1e-12)
        assert_close(got["S"], s_cov, rtol=1e-10, atol=1e-12)
        assert float(got["rows"]) == rows
        assert float(got["examples"]) == inputs.shape[0]


def test_padded_rows_do_not_count():
    """Changing what sits in the padding changes neither A nor S nor the row count."""
    model, names, data, task, ids, mask = lm_case()
    assert (mask == 0).any()
    other = ids.clone()
    other[mask == 0] = 3  # a real token id instead of the pad id, still masked out
    covs = fit_covariances(model, data, task, seed=SEED, progress=False)
    covs_other = fit_covariances(model, loader(other, mask, batch_size=5), task, seed=SEED,
                                 progress=False)
    for name in names:
        a, b = covs[name].compute(), covs_other[name].compute()
        assert_close(a["A"], b["A"], rtol=1e-12, atol=1e-14)
        assert_close(a["S"], b["S"], rtol=1e-12, atol=1e-14)
        assert float(a["rows"]) == float(mask.sum()) < mask.numel()


def test_conv_rows_match_unfold_order():
    """Sanity of the reference itself: patch rows times the weight matrix give the conv output."""
    model = ref.ConvNet()
    x, _ = ref.image_data(3)
    rows = ref.conv_patches(x, model.conv)  # [N, 9, 18]
    w = ref.as_matrix(model.conv, model.conv.weight, model.conv.bias)  # [3, 19]
    ones = torch.ones(rows.shape[:-1] + (1,), dtype=rows.dtype)
    out = torch.cat([rows, ones], -1) @ w.T  # [N, 9, 3]
    assert_close(out, model.conv(x).flatten(2).transpose(1, 2))


# ------------------------------------------------------------------------------- Lambda
@pytest.mark.parametrize("case", list(CASES))
def test_ekfac_bases_and_eigenvalues(case):
    model, names, data, task, inputs, mask = CASES[case]()
    factors = fit_factors(model, data, task, strategy="ekfac", seed=SEED, progress=False)
    loss, targets = sampled_targets(model, data, inputs, mask, SEED)
    covs = ref.covariances(ref.capture_rows(model, names, loss, inputs, targets), mask)
    loss, targets = sampled_targets(model, data, inputs, mask, SEED, stream=1)
    grads = ref.per_example_gradients(model, names, loss, inputs, targets)
    assert factors.num_examples == inputs.shape[0]
    for name in names:
        lf = factors.layers[name]
        a_cov, s_cov, _ = covs[name]
        for q, cov in ((lf.basis_in, a_cov), (lf.basis_out, s_cov)):
            eye = torch.eye(q.shape[0], dtype=q.dtype)
            assert_close(q.T @ q, eye, rtol=0, atol=1e-12)
            rotated = q.T @ cov @ q
            assert_close(rotated, torch.diag(torch.linalg.eigvalsh(cov)), rtol=0, atol=1e-12)
        expected = ref.ekfac_lambda(lf.basis_in, lf.basis_out, grads[name])
        assert_close(lf.eigenvalues, expected, rtol=1e-9, atol=1e-14)
        assert lf.damping == pytest.approx(0.1 * expected.mean().item(), rel=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_diagonal_is_mean_squared_gradient(case):
    model, names, data, task, inputs, mask = CASES[case]()
    factors = fit_factors(model, data, task, strategy="diagonal", seed=SEED, progress=False)
    loss, targets = sampled_targets(model, data, inputs, mask, SEED, stream=1)
    grads = ref.per_example_gradients(model, names, loss, inputs, targets)
    for name in names:
        lf = factors.layers[name]
        assert lf.basis_in is None and lf.basis_out is None
        assert_close(lf.eigenvalues, grads[name].square().mean(0), rtol=1e-9, atol=1e-14)


def test_ekfac_trace_equals_diagonal_trace():
    """A rotation keeps ||G_n||_F: sum(Lambda) is the same for ekfac and diagonal (same samples)."""
    model, names, data, task, _, _ = lm_case()
    ekfac = fit_factors(model, data, task, strategy="ekfac", seed=SEED, progress=False)
    diag = fit_factors(model, data, task, strategy="diagonal", seed=SEED, progress=False)
    for name in names:
        assert ekfac.layers[name].eigenvalues.sum().item() == pytest.approx(
            diag.layers[name].eigenvalues.sum().item(), rel=1e-10)


@pytest.mark.parametrize("case", ["linear", "conv-stride-pad", "sequence-padded"])
def test_kfac_eigenvalues_on_the_per_example_scale(case):
    """K-FAC Lambda = outer(l_S, l_A) * rows per example (A, S are means over rows)."""
    model, names, data, task, inputs, mask = CASES[case]()
    factors = fit_factors(model, data, task, strategy="kfac", seed=SEED, progress=False)
    loss, targets = sampled_targets(model, data, inputs, mask, SEED)
    covs = ref.covariances(ref.capture_rows(model, names, loss, inputs, targets), mask)
    for name in names:
        a_cov, s_cov, rows = covs[name]
        rows_per_example = rows / inputs.shape[0]
        if name in ("conv", "fc1", "fc2"):
            assert rows_per_example > 1  # several rows per example: the scale matters
        expected = torch.outer(torch.linalg.eigvalsh(s_cov), torch.linalg.eigvalsh(a_cov))
        assert_close(factors.layers[name].eigenvalues, expected * rows_per_example,
                     rtol=1e-9, atol=1e-14)


# ------------------------------------------------------------------------------- files
@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_save_load_round_trip(tmp_path, strategy):
    model, names, data, task, _, _ = conv_case()
    factors = fit_factors(model, data, task, strategy=strategy, output_dir=tmp_path,
                          progress=False)
    assert Factors.exists(tmp_path)
    loaded = Factors.load(tmp_path)
    assert loaded.strategy == strategy
    assert loaded.shapes == factors.shapes
    assert loaded.fingerprint == factors.fingerprint
    assert loaded.num_examples == factors.num_examples == 10
    assert loaded.damping == factors.damping
    for name in names:
        for key in ("eigenvalues", "basis_in", "basis_out"):
            ours, theirs = getattr(factors.layers[name], key), getattr(loaded.layers[name], key)
            assert (ours is None) == (theirs is None)
            if ours is not None:
                assert torch.equal(ours, theirs)
    # A rerun with the same output_dir reuses the files instead of touching the data.
    again = fit_factors(model, NeverIterate(), task, strategy=strategy, output_dir=tmp_path,
                        progress=False)
    assert again.damping == factors.damping
    scores = compute_self_scores(model, loaded, data, task, progress=False).scores
    assert_close(scores, compute_self_scores(model, factors, data, task, progress=False).scores,
                 rtol=1e-12, atol=0)


def test_reuse_with_new_damping(tmp_path):
    model, names, data, task, _, _ = mlp_case()
    fit_factors(model, data, task, strategy="ekfac", output_dir=tmp_path, progress=False)
    again = fit_factors(model, NeverIterate(), task, strategy="ekfac", damping=0.25,
                        output_dir=tmp_path, progress=False)
    assert again.damping == {name: 0.25 for name in names}


# ------------------------------------------------------------------------------- mismatch
def test_mismatch_other_model(tmp_path):
    model, _, data, task, _, _ = mlp_case()
    fit_factors(model, data, task, output_dir=tmp_path, progress=False)
    wider = ref.mlp(hidden=6)
    with pytest.raises(FactorMismatchError, match="another model"):
        fit_factors(wider, NeverIterate(), task, output_dir=tmp_path, progress=False)
    factors = Factors.load(tmp_path)
    x, y = ref.classification_data(20)
    with pytest.raises(FactorMismatchError, match="shapes differ"):
        compute_self_scores(wider, factors, loader(x, y, batch_size=7), task, progress=False)


def test_mismatch_model_with_other_layer_names():
    model, _, data, task, _, _ = mlp_case()
    factors = fit_factors(model, data, task, progress=False)
    conv = ref.ConvNet()
    x, y = ref.image_data(10)
    with pytest.raises(FactorMismatchError, match="another model or layer set"):
        compute_self_scores(conv, factors, loader(x, y, batch_size=4), task, progress=False)


def test_mismatch_other_layers(tmp_path):
    model, _, data, task, _, _ = mlp_case()
    fit_factors(model, data, task, layers=["2"], output_dir=tmp_path, progress=False)
    with pytest.raises(FactorMismatchError, match="layers missing from the factors"):
        fit_factors(model, NeverIterate(), task, output_dir=tmp_path, progress=False)


def test_mismatch_other_strategy(tmp_path):
    model, _, data, task, _, _ = mlp_case()
    fit_factors(model, data, task, strategy="ekfac", output_dir=tmp_path, progress=False)
    with pytest.raises(FactorMismatchError, match="strategy 'ekfac' but 'kfac'"):
        fit_factors(model, NeverIterate(), task, strategy="kfac", output_dir=tmp_path,
                    progress=False)


def test_mismatch_changed_weights(tmp_path):
    model, _, data, task, _, _ = mlp_case()
    factors = fit_factors(model, data, task, output_dir=tmp_path, progress=False)
    with torch.no_grad():
        model[2].bias.add_(1e-3)
    with pytest.raises(FactorMismatchError, match="different weights"):
        compute_self_scores(model, factors, data, task, progress=False)
    with pytest.raises(FactorMismatchError, match="different weights"):
        fit_factors(model, NeverIterate(), task, output_dir=tmp_path, progress=False)
    # overwrite=True refits for the new weights.
    refit = fit_factors(model, data, task, output_dir=tmp_path, overwrite=True, progress=False)
    assert refit.fingerprint != factors.fingerprint


# ------------------------------------------------------------------------------- exact Fisher
EXACT_CASES = ["linear", "linear-nobias", "conv-stride-pad"]


def _layer_blocks(model, names):
    sizes = [ref.layer_shape(model.get_submodule(n)) for n in names]
    starts = [0]
    for o, i in sizes:
        starts.append(starts[-1] + o * i)
    return {n: (slice(starts[k], starts[k + 1]), sizes[k]) for k, n in enumerate(names)}


@pytest.mark.parametrize("case", EXACT_CASES)
def test_exact_fisher_ekfac_is_the_exact_ggn_block_in_the_kronecker_eigenbasis(case):
    """fisher="exact": Lambda is exactly the diagonal of the layer's block of the exact
    Gauss-Newton matrix (tests/reference.exact_ggn) rotated into Q_A kron Q_S, and the diagonal
    strategy is that block's diagonal: no label sampling left anywhere."""
    model, names, data, task, inputs, _ = CASES[case]()
    ggn = ref.exact_ggn(model, names, inputs)
    ekfac = fit_factors(model, data, task, strategy="ekfac", fisher="exact", progress=False)
    diagonal = fit_factors(model, data, task, strategy="diagonal", fisher="exact",
                           progress=False)
    assert ekfac.num_examples == inputs.shape[0] and ekfac.extra["fisher"] == "exact"
    for name, (block, (o, i)) in _layer_blocks(model, names).items():
        g = ggn[block, block]
        lf = ekfac.layers[name]
        q = torch.kron(lf.basis_in, lf.basis_out)
        assert_close(lf.eigenvalues, ref.unvec(torch.diagonal(q.T @ g @ q), o, i),
                     rtol=1e-9, atol=1e-13)
        assert_close(diagonal.layers[name].eigenvalues, ref.unvec(torch.diagonal(g), o, i),
                     rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("case", EXACT_CASES)
def test_exact_fisher_covariances_weight_every_label_by_its_probability(case):
    model, names, data, task, inputs, _ = CASES[case]()
    covs = fit_covariances(model, data, task, fisher="exact", progress=False)
    with torch.no_grad():
        probs = torch.softmax(model(inputs), dim=-1)  # [N, C]
    s_exact = {n: 0.0 for n in names}
    for c in range(probs.shape[1]):
        labels = torch.full((inputs.shape[0],), c, dtype=torch.long)
        rows = ref.capture_rows(model, names, ref.class_nll, inputs, labels)
        for name, (_, g) in rows.items():  # g [N, T, O]
            weighted = g * probs[:, c].sqrt().reshape(-1, 1, 1)
            flat = weighted.reshape(-1, g.shape[-1])
            s_exact[name] = s_exact[name] + flat.T @ flat / flat.shape[0]
    a_ref = ref.covariances(rows)
    for name in names:
        got = covs[name].compute()
        assert_close(got["A"], a_ref[name][0], rtol=1e-10, atol=1e-12)
        assert_close(got["S"], s_exact[name], rtol=1e-10, atol=1e-12)
        assert float(got["examples"]) == inputs.shape[0]


def test_exact_fisher_is_refused_for_language_models_and_on_reuse_with_sampled(tmp_path):
    model, _, data, task, _, _ = lm_case()
    with pytest.raises(NotImplementedError, match="fisher='sampled'"):
        fit_factors(model, data, task, fisher="exact", progress=False)
    with pytest.raises(ValueError, match="fisher='approximate'"):
        fit_factors(model, data, task, fisher="approximate", progress=False)
    model, _, data, task, _, _ = mlp_case()
    fit_factors(model, data, task, fisher="exact", output_dir=tmp_path, progress=False)
    with pytest.raises(FactorMismatchError, match="fisher='exact'"):
        fit_factors(model, data, task, output_dir=tmp_path, progress=False)
