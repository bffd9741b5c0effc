"""Two processes, CPU, gloo (Lightning's ddp_spawn): the same factors, top-k and self-influence
as one process."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_influence as li
from lightning_influence.callbacks import EigenCorrection, InfluenceScores, InfluenceStatistics
from tests.test_callbacks import TinyClassifier


class StillClassifier(TinyClassifier):
    """Trains with a zero learning rate: the weights in this process stay those of the ranks."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _double_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g, dtype=torch.float64)
    y = (x[:, :3].argmax(1) + (torch.rand(n, generator=g) < 0.1).long()) % 3
    return TensorDataset(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ekfac"])
def test_ddp_two_processes_equal_one_process(tmp_path, strategy):
    torch.manual_seed(0)
    model = StillClassifier().double()
    # 90 examples in batches of 16: 6 batches, uneven between the ranks (3 + 3, last one short)
    train, val = _double_data(90, 0), _double_data(12, 1)
    callbacks = [InfluenceStatistics(progress=False), EigenCorrection(strategy=strategy,
                                                                      progress=False),
                 InfluenceScores(num_queries=5, top_k=4, progress=False)]
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn",
                         precision="64-true", logger=False, callbacks=callbacks,
                         default_root_dir=str(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(train, batch_size=16, shuffle=True),
                DataLoader(val, batch_size=16))

    # The one-process reference, on the same weights.
    ordered = DataLoader(train, batch_size=16)
    queries = DataLoader(Subset(val, range(5)), batch_size=16)
    factors = li.fit_factors(model, ordered, "classification", strategy=strategy,
                             progress=False)
    folder = tmp_path / "influence"
    ddp_factors = li.Factors.load(folder)
    ddp_factors.check_fits(li.LayerTracker(model), strategy)  # same weights, same layers
    for name, layer in factors.layers.items():
        other = ddp_factors.layers[name]
        rel = (other.eigenvalues - layer.eigenvalues).norm() / layer.eigenvalues.norm()
        assert rel <= 1e-5, (name, float(rel))
        # eigenvectors are defined up to sign: compare the projectors they span
        for attr in ("basis_in", "basis_out"):
            q, q2 = getattr(layer, attr), getattr(other, attr)
            torch.testing.assert_close(q2.abs(), q.abs(), rtol=1e-5, atol=1e-6)
        assert other.damping == pytest.approx(layer.damping, rel=1e-5)

    pairwise = li.compute_pairwise_scores(model, factors, queries, ordered, top_k=4,
                                          progress=False)
    self_scores = li.compute_self_scores(model, factors, ordered, progress=False)
    saved = load_file(str(folder / "scores.safetensors"))
    assert torch.equal(saved["proponent_indices"], pairwise.top.proponent_indices)
    assert torch.equal(saved["opponent_indices"], pairwise.top.opponent_indices)
    torch.testing.assert_close(saved["proponent_scores"], pairwise.top.proponent_scores,
                               rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(saved["self_influence"], self_scores.scores, rtol=1e-5, atol=1e-8)
    assert saved["self_influence"].shape == (90,)


@pytest.mark.slow
def test_ddp_during_training_reuses_the_training_forward(tmp_path, capfd):
    """Two processes, covariances during training from the training step's own forward: the
    activation covariance (label-free) is the one-process A over all 90 examples, so the
    factors' input eigenbasis matches; the update path runs inside DDP's forward/backward
    (where Lightning calls the module around the training step too) without falling back."""
    torch.manual_seed(0)
    model = StillClassifier().double()
    train, val = _double_data(90, 0), _double_data(12, 1)
    callbacks = [InfluenceStatistics(mode="during_training", every_n_steps=1, progress=False),
                 EigenCorrection(strategy="kfac", progress=False)]
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn",
                         precision="64-true", logger=False, callbacks=callbacks,
                         default_root_dir=str(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(train, batch_size=15, shuffle=False),
                DataLoader(val, batch_size=16))
    logged = "".join(capfd.readouterr())
    assert "fitting kfac factors" in logged  # the processes' log lines are captured here
    assert "separate eval-mode forward" not in logged  # so a fallback would show
    ddp_factors = li.Factors.load(tmp_path / "influence")
    reference = li.fit_covariances(model, DataLoader(train, batch_size=15), "classification",
                                   progress=False)
    for name, stat in reference.items():
        a_cov = stat.compute()["A"]
        q = ddp_factors.layers[name].basis_in
        rotated = q.T @ a_cov @ q  # diagonal when q is the eigenbasis of the same A
        off = rotated - torch.diag(torch.diagonal(rotated))
        assert off.abs().max() <= 1e-8 * a_cov.abs().max(), name
