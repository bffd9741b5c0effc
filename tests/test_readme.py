"""Every Python snippet of README.md runs as written.

The snippets stand for a user's own code, so this test gives them what a user would have: a
small LightningModule ``model``, a datamodule ``dm``, non-shuffling ``train_loader`` and
``query_loader``, and it runs them in order in one namespace (later snippets use ``factors``
from earlier ones), in a temporary working directory with W&B offline.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]


def python_snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 12), nn.ReLU(inplace=True), nn.Linear(12, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return TensorDataset(x, x[:, :3].argmax(1))


@pytest.mark.slow
def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    snippets = python_snippets()
    assert len(snippets) >= 3
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    train, val = _data(256, 0), _data(12, 1)
    dm = pl.LightningDataModule.from_datasets(train_dataset=train, val_dataset=val, batch_size=16)
    namespace = {"model": Classifier(), "dm": dm,
                 "train_loader": DataLoader(train, batch_size=16),
                 "query_loader": DataLoader(val, batch_size=16)}
    for snippet in snippets:
        snippet = snippet.replace("iterations=3000", "iterations=30")  # the same call, quicker
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["pairwise"].top.proponent_indices.shape[0] == 12
    assert len(namespace["flagged"]) == round(0.1 * 256)
    assert namespace["suspects"].shape == (200,)
    assert (tmp_path / "factors" / "factors.safetensors").is_file()
    assert (tmp_path / "lightning_logs").exists() or list(tmp_path.glob("**/influence"))
