"""Sharded models (Lightning's FSDPStrategy): the tracker sees the layers under their wrapped
names, every rank contributes its rows, and the factors equal the unsharded ones.

FSDP needs CUDA here (NCCL); the test is skipped without at least one GPU, and runs on a GPU
machine with ``pytest tests/test_fsdp.py``.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.callbacks import EigenCorrection, InfluenceStatistics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="FSDP runs on CUDA (NCCL); no GPU here")


class Classifier(pl.LightningModule):
    influence_task = "classification"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                                 nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1]) * 0.0  # weights stay put

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_fsdp_factors_equal_the_unsharded_ones(tmp_path):
    from pytorch_lightning.strategies import FSDPStrategy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    data = TensorDataset(x, x[:, :4].argmax(1))
    reference = li.fit_factors(Classifier(), DataLoader(data, batch_size=16), "classification",
                               strategy="kfac", progress=False)
    callbacks = [InfluenceStatistics(progress=False), EigenCorrection(strategy="kfac",
                                                                      progress=False)]
    trainer = pl.Trainer(max_epochs=1, accelerator="cuda", devices=torch.cuda.device_count(),
                         strategy=FSDPStrategy(), logger=False, callbacks=callbacks,
                         default_root_dir=str(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False)
    trainer.fit(Classifier(), DataLoader(data, batch_size=16))
    sharded = li.Factors.load(tmp_path / "influence")
    assert set(sharded.shapes) == set(reference.shapes)
    for name, layer in reference.layers.items():
        torch.testing.assert_close(sharded.layers[name].eigenvalues.cpu(), layer.eigenvalues,
                                   rtol=1e-4, atol=1e-6)
