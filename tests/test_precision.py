"""Mixed precision: a bf16 score pass stays close to the float32 one; the callback follows the
Trainer's precision."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.callbacks import InfluenceScores


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return _pearson(a.flatten().argsort().argsort(), b.flatten().argsort().argsort())


def test_bf16_score_pass_correlates_with_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 5))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=g)
    y = (x[:, :5].argmax(1) + (torch.rand(256, generator=g) < 0.2).long()) % 5
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    queries = DataLoader(TensorDataset(x[:8] + 0.3, y[:8]), batch_size=8)
    factors = li.fit_factors(model, train, "classification", progress=False)
    full = li.compute_pairwise_scores(model, factors, queries, train, "classification",
                                      progress=False)
    half = li.compute_pairwise_scores(model, factors, queries, train, "classification",
                                      autocast=torch.bfloat16, progress=False)
    self_full = li.compute_self_scores(model, factors, train, "classification", progress=False)
    self_half = li.compute_self_scores(model, factors, train, "classification",
                                       autocast=torch.bfloat16, progress=False)
    assert half.scores.dtype == torch.float64  # sums are kept in float64
    # Measured here: pairwise Pearson 0.9996 / Spearman 0.995, self-influence Spearman 0.9992
    # (fp16: Pearson 0.99999 / Spearman 0.9999).
    # bf16 keeps 8 bits of mantissa (relative error ~0.4% per product), so the bars sit at 0.99.
    assert _pearson(half.scores, full.scores) > 0.99
    assert _spearman(half.scores, full.scores) > 0.99
    assert _spearman(self_half.scores, self_full.scores) > 0.99
    assert not torch.equal(half.scores, full.scores)  # it really ran in bf16


def test_callback_follows_trainer_precision():
    class FakeTrainer:
        precision = "bf16-mixed"

    assert InfluenceScores()._autocast(FakeTrainer()) == torch.bfloat16
    FakeTrainer.precision = "16-mixed"
    assert InfluenceScores()._autocast(FakeTrainer()) == torch.float16
    FakeTrainer.precision = "32-true"
    assert InfluenceScores()._autocast(FakeTrainer()) is None
    assert InfluenceScores(precision="bf16")._autocast(FakeTrainer()) == torch.bfloat16
    assert InfluenceScores(precision=None)._autocast(FakeTrainer()) is None
