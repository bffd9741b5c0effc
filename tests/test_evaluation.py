"""Ground-truth evaluators: PBRF, leave-one-out, LDS, the validation function and callback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import reference as ref
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from lightning_influence import compute_pairwise_scores, fit_factors
from lightning_influence.callbacks import EigenCorrection, InfluenceStatistics
from lightning_influence.callbacks.influence_validation import InfluenceValidation
from lightning_influence.evaluation import (
    QueryMeasure,
    SimpleTrainer,
    SubsetMeasurements,
    correlations,
    lds,
    leave_one_out,
    pbrf,
    subset_measurements,
    validate_influence,
)

NAMES = ["0", "2"]


def loader(*tensors, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


@pytest.fixture(scope="module")
def tiny():
    model = ref.mlp(5, 4, 3)
    x, y = ref.classification_data(40)
    xq, yq = ref.classification_data(5, seed=1)
    return model, (x, y), (xq, yq)


def exact_influence(model, x, y, xq, yq, damping, rows):
    ggn = ref.exact_ggn(model, NAMES, x)
    train = ref.flat_gradients(ref.per_example_gradients(model, NAMES, ref.class_nll, x[rows],
                                                         y[rows]), NAMES)
    query = ref.flat_gradients(ref.per_example_gradients(model, NAMES, ref.class_nll, xq, yq),
                               NAMES)
    return ref.influence(ggn + damping * torch.eye(ggn.shape[0], dtype=ggn.dtype), query, train)


def test_pbrf_with_a_small_perturbation_is_the_exact_damped_ggn_influence(tiny):
    model, (x, y), (xq, yq) = tiny
    rows = [0, 5, 9, 21]
    before = [p.detach().clone() for p in model.parameters()]
    result = pbrf(model, loader(x, y), loader(xq, yq), "classification", rows, damping=0.05,
                  epsilon=1e-4)
    expected = exact_influence(model, x, y, xq, yq, 0.05, rows)
    assert result.changes.shape == (5, 4)
    assert_close(result.changes, expected, rtol=0, atol=3e-3 * expected.abs().max().item())
    assert (torch.sign(result.changes) == torch.sign(expected)).float().mean() > 0.95
    assert correlations(result.changes, expected)["spearman_per_query"] > 0.99
    assert all(a.equal(b) for a, b in zip(before, model.parameters(), strict=True))
    # EK-FAC ranks the examples the way PBRF does (sign and order, loosely on this tiny model)
    ekfac = fit_factors(model, loader(x, y), "classification", damping=0.05, progress=False)
    scores = compute_pairwise_scores(model, ekfac, loader(xq, yq), loader(x[rows], y[rows]),
                                     "classification", progress=False).scores
    assert correlations(scores, result.changes)["pearson"] > 0.8


def test_pbrf_departs_from_the_linear_response_as_epsilon_grows(tiny):
    model, (x, y), (xq, yq) = tiny
    expected = exact_influence(model, x, y, xq, yq, 0.05, [0, 1])
    gaps = []
    for eps in (1e-4, 0.3):
        changes = pbrf(model, loader(x, y), loader(xq, yq), "classification", [0, 1],
                       damping={"0": 0.05, "2": 0.05}, epsilon=eps).changes
        gaps.append(float((changes - expected).norm() / expected.norm()))
    assert gaps[0] < 1e-2 < gaps[1]


class _Additive(nn.Module):
    """A stand-in "trained model" whose query loss is exactly ``-sum_{n in S} w[q, n]``."""

    def __init__(self, loss: torch.Tensor) -> None:
        super().__init__()
        self.loss = loss


def _additive(weights: torch.Tensor, noise: float = 0.0):
    def train_fn(indices, seed):
        gen = torch.Generator().manual_seed(seed)
        mask = torch.zeros(weights.shape[1], dtype=torch.float64)
        mask[indices] = 1
        return _Additive(-(weights @ mask) + noise * torch.randn(weights.shape[0], generator=gen,
                                                                 dtype=torch.float64))

    return train_fn, (lambda model: model.loss)


def test_lds_is_one_for_exact_additive_scores_and_matches_a_known_correlation():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 30, generator=gen, dtype=torch.float64)
    train_fn, measure = _additive(weights)
    subsets = subset_measurements(train_fn, measure, 30, num_subsets=20, fraction=0.5, seed=1)
    assert subsets.masks.shape == (20, 30) and bool((subsets.masks.sum(1) == 15).all())
    assert lds(weights, subsets).mean == pytest.approx(1.0)
    assert lds(-weights, subsets).mean == pytest.approx(-1.0)
    # a hand-made case: scores that predict a known ordering of the measured losses
    masks = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    measured = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    scores = torch.tensor([[3.0, 1.0, 2.0]])  # predicted losses -3, -1, -2, -4
    known = spearmanr([-3, -1, -2, -4], [0, 1, 2, 3])[0]
    assert lds(scores, SubsetMeasurements(masks, measured, 0.5, 0)).mean == pytest.approx(known)


def test_leave_one_out_recovers_the_removed_examples_contribution():
    weights = torch.randn(2, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    train_fn, measure = _additive(weights)
    changes = leave_one_out(train_fn, measure, 8, [1, 6], seeds=(0, 1))
    assert_close(changes, weights[:, [1, 6]])  # removing n raises the loss by w[q, n]


def test_simple_trainer_is_seeded_and_query_measure_gives_losses(tiny):
    _, (x, y), (xq, yq) = tiny
    data = TensorDataset(x.float(), y)
    trainer = SimpleTrainer(lambda: nn.Sequential(nn.Linear(5, 3)), data, epochs=2,
                            batch_size=8)
    a, b = trainer(torch.arange(20), seed=3), trainer(torch.arange(20), seed=3)
    assert all(p.equal(q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    losses = QueryMeasure(loader(xq.float(), yq))(a)
    assert losses.shape == (5,) and bool((losses > 0).all())


def test_validate_influence_compares_ekfac_with_lissa_and_pbrf(tiny):
    model, (x, y), (xq, yq) = tiny
    ekfac = fit_factors(model, loader(x, y), "classification", damping=0.1, progress=False)
    metrics = validate_influence(model, ekfac, loader(xq, yq), loader(x, y), "classification",
                                 num_train=12, lissa={"iterations": 300}, pbrf_examples=3,
                                 pbrf_options={"epsilon": 1e-3})
    for key in ("ekfac_vs_lissa/pearson", "lissa_half_vs_full/pearson", "ekfac_vs_pbrf/pearson",
                "lissa_vs_pbrf/spearman_per_query", "seconds/lissa", "lissa/scale"):
        assert np.isfinite(metrics[key]), key
    assert metrics["lissa_half_vs_full/pearson"] > 0.95
    assert metrics["lissa_vs_pbrf/pearson"] > 0.9
    assert metrics["ekfac_vs_lissa/pearson"] > 0.5


class _Classifier(pl.LightningModule):
    influence_task = "classification"

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=1e-2)


def test_validation_callback_logs_and_writes_the_comparison(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(48, 6)
    y = x[:, :3].argmax(1)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[:6], y[:6]), batch_size=16)
    logger = pl.loggers.CSVLogger(str(tmp_path))
    validation = InfluenceValidation(num_queries=3, num_train=16, lissa_iterations=100,
                                     pbrf_examples=2)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=logger,
                         callbacks=[InfluenceStatistics(progress=False),
                                    EigenCorrection(progress=False, damping="weight_decay"),
                                    validation],
                         default_root_dir=str(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_Classifier(), train, val)
    assert "ekfac_vs_lissa/pearson" in validation.metrics
    assert "ekfac_vs_pbrf/pearson" in validation.metrics
    written = json.loads((tmp_path / "influence" / "validation.json").read_text())
    assert written == pytest.approx(validation.metrics)
    logger.save()
    csv = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "influence_validation/ekfac_vs_lissa/pearson" in csv
    with pytest.raises(ValueError, match="pbrf_examples"):
        InfluenceValidation(num_train=4, pbrf_examples=5)
