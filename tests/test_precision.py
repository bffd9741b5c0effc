"""Mixed precision: a bf16 score pass stays close to the float32 one; the callback follows the
Trainer's precision."""

from __future__ import annotations

import pytest
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


def test_bfloat16_rows_stay_close_to_float32_and_are_recorded(tmp_path):
    """row_dtype="bfloat16" multiplies the rows in bfloat16 for the fit and both score passes
    (the model runs unchanged): the scores stay within bf16 rounding of the float32 ones, far
    closer than two label-sampling seeds are to each other; the choice is stored with the
    factors, and reusing them under another row dtype is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=g)
    y = x[:, :5].argmax(1)
    train = DataLoader(TensorDataset(x, y), batch_size=64)
    queries = DataLoader(TensorDataset(x[:8] + 0.3, y[:8]), batch_size=8)

    def run(**kw):
        f = li.fit_factors(model, train, "classification", progress=False, **kw)
        return (f, li.compute_pairwise_scores(model, f, queries, train, "classification",
                                              progress=False).scores,
                li.compute_self_scores(model, f, train, "classification", progress=False).scores)

    f32, pair32, self32 = run()
    f16, pair16, self16 = run(row_dtype="bfloat16", output_dir=tmp_path)
    _, pair_seed, _ = run(seed=1)
    assert f16.extra["row_dtype"] == "bfloat16" and "row_dtype" not in f32.extra
    for name, layer in f32.layers.items():
        rel = (layer.eigenvalues - f16.layers[name].eigenvalues).norm() / layer.eigenvalues.norm()
        assert 0 < rel < 2e-2, (name, rel)  # bf16 really ran, within its rounding
    seed_gap = 1 - _pearson(pair32, pair_seed)
    assert 1 - _pearson(pair16, pair32) < min(1e-3, seed_gap / 10)
    assert _spearman(self16, self32) > 0.999
    assert li.Factors.load(tmp_path).extra["row_dtype"] == "bfloat16"
    with pytest.raises(li.FactorMismatchError, match="row_dtype='bfloat16'"):
        li.fit_factors(model, train, "classification", output_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="row_dtype='float16'"):
        li.fit_factors(model, train, "classification", row_dtype="float16", progress=False)
