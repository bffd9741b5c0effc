"""On a CUDA device, the factors and scores are the CPU's: the plain functions (EK-FAC, K-FAC,
diagonal; a Hugging Face causal LM with padding), the callbacks in a Lightning Trainer on
``accelerator="cuda"`` (after fit and during training), factors fitted on the device reused on
the CPU, and the bfloat16 paths (autocast scoring, bfloat16 rows).

Skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them on a GPU machine. The device is
``LIGHTNING_INFLUENCE_TEST_DEVICE`` (default ``cuda``): ``gpu_check.sh --cpu`` sets it to
``cpu`` so that these tests run, against themselves, where there is no GPU and cannot rot.
Labels come from the data (``fisher="empirical"``): the CPU and CUDA random streams differ, so
sampled labels would too.
"""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.callbacks import EigenCorrection, InfluenceScores, InfluenceStatistics
from lightning_influence.evaluation import correlations

DEVICE = torch.device(os.environ.get("LIGHTNING_INFLUENCE_TEST_DEVICE", "cuda"))

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(),
    reason="needs CUDA (LIGHTNING_INFLUENCE_TEST_DEVICE=cpu runs these tests on the CPU)")

EMPIRICAL = li.FitOptions(fisher="empirical", progress=False)


def mlp(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 4)).to(dtype)


def digits(dtype: torch.dtype = torch.float64) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(48, 12, generator=g).to(dtype)
    y = x[:, :4].argmax(1)
    return (DataLoader(TensorDataset(x, y), batch_size=8),
            DataLoader(TensorDataset(x[:5] + 0.1, y[:5]), batch_size=5))


def fit_and_score(model, train, queries, task, options: li.FitOptions):
    factors = li.fit_factors(model, train, task, options)
    pairwise = li.compute_pairwise_scores(model, factors, queries, train, task,
                                          self_influence=True, progress=False)
    return factors, pairwise


def assert_same_scores(got, expected, rtol: float = 1e-6) -> None:
    scale = expected.scores.abs().max()
    torch.testing.assert_close(got.scores.cpu(), expected.scores, rtol=rtol, atol=rtol * scale)
    self_scale = expected.self_result.scores.abs().max()
    torch.testing.assert_close(got.self_result.scores.cpu(), expected.self_result.scores,
                               rtol=rtol, atol=rtol * self_scale)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal"])
def test_factors_and_scores_on_the_device_equal_the_cpus(strategy, tmp_path):
    train, queries = digits()
    options = li.FitOptions(strategy=strategy, fisher="empirical", progress=False)
    reference, expected = fit_and_score(mlp(), train, queries, "classification", options)
    model = mlp().to(DEVICE)
    factors, got = fit_and_score(model, train, queries, "classification", options)
    assert factors.fingerprint == reference.fingerprint  # the same weights, wherever they are
    for name, layer in reference.layers.items():
        torch.testing.assert_close(factors.layers[name].eigenvalues.cpu(), layer.eigenvalues,
                                   rtol=1e-6, atol=1e-12)
    assert_same_scores(got, expected)
    # factors fitted on the device are the CPU's to reuse
    factors.save(tmp_path)
    reloaded = li.compute_pairwise_scores(mlp(), li.Factors.load(tmp_path), queries, train,
                                          "classification", self_influence=True, progress=False)
    assert_same_scores(reloaded, expected)


def test_a_hugging_face_causal_lm_on_the_device():
    transformers = pytest.importorskip("transformers")

    def llama() -> nn.Module:
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16)).double().eval()

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 32, (12, 10), generator=g)
    mask = (torch.arange(10) < torch.randint(5, 11, (12, 1), generator=g)).long()
    rows = [{"input_ids": i * m, "attention_mask": m} for i, m in zip(ids, mask, strict=True)]
    train, queries = DataLoader(rows, batch_size=4), DataLoader(rows[:3], batch_size=3)
    _, expected = fit_and_score(llama(), train, queries, "causal_lm", EMPIRICAL)
    _, got = fit_and_score(llama().to(DEVICE), train, queries, "causal_lm", EMPIRICAL)
    assert_same_scores(got, expected)


class Classifier(pl.LightningModule):
    """The MLP in float32, trained with a learning rate of 0: the weights stay those of the
    reference fit."""

    influence_task = "classification"

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(torch.float32)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("mode", ["after_fit", "during_training"])
def test_the_callbacks_on_the_device_give_the_cpus_factors(mode, tmp_path):
    train, queries = digits(torch.float32)
    reference = li.fit_factors(Classifier(), train, "classification", EMPIRICAL)
    callbacks = [InfluenceStatistics(mode=mode, every_n_steps=1, progress=False),
                 EigenCorrection(fit=EMPIRICAL),
                 InfluenceScores(num_queries=5, top_k=3, progress=False)]
    trainer = pl.Trainer(max_epochs=1, accelerator=DEVICE.type, devices=1, logger=False,
                         callbacks=callbacks, default_root_dir=str(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(Classifier(), train, queries)
    fitted = li.Factors.load(tmp_path / "influence")
    assert set(fitted.shapes) == set(reference.shapes)
    for name, layer in reference.layers.items():
        torch.testing.assert_close(fitted.layers[name].eigenvalues.cpu(), layer.eigenvalues,
                                   rtol=1e-4, atol=1e-7)
    assert callbacks[2].self_result.scores.shape == (48,)
    assert (tmp_path / "influence" / "top_influential.csv").is_file()


def test_bfloat16_scoring_and_rows_on_the_device():
    train, queries = digits(torch.float32)
    model = mlp(torch.float32).to(DEVICE)
    factors, expected = fit_and_score(model, train, queries, "classification", EMPIRICAL)
    autocast = li.compute_pairwise_scores(model, factors, queries, train, "classification",
                                          precision="bf16", progress=False)
    assert correlations(autocast.scores, expected.scores)["pearson"] > 0.99
    half = li.FitOptions(fisher="empirical", progress=False, row_dtype="bfloat16")
    _, rows = fit_and_score(model, train, queries, "classification", half)
    assert correlations(rows.scores, expected.scores)["pearson"] > 0.99
