"""The digits protocol shared by the benchmarks (accuracy, speed, Kronfluence comparison).

Sklearn digits scaled to [0, 1], stratified 80/20 split (1437 train / 360 test), a 64-128-128-10
ReLU MLP trained with AdamW (lr 1e-3, weight decay 1e-2, batch 64, 30 epochs), float32.
:func:`trainer` goes through :class:`lightning_influence.evaluation.SimpleTrainer`, so the model
behind the scores and the models retrained for LDS come out of one loop;
:func:`train_plain` is the plain PyTorch loop of the Kronfluence scripts (it needs only torch, so
``kronfluence_side.py`` runs where lightning_influence is not installed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

if TYPE_CHECKING:
    from lightning_influence.evaluation import SimpleTrainer

EPOCHS = 30
BATCH_SIZE = 64
LR = 1e-3
WEIGHT_DECAY = 1e-2


def make_digits(split_seed: int = 0):
    """``(x_train [1437, 64], y_train, x_test [360, 64], y_test)``, float32 / int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype("float32") / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=split_seed,
                                              stratify=y)
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
            torch.from_numpy(x_te), torch.from_numpy(y_te).long())


def make_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def trainer(x: torch.Tensor, y: torch.Tensor, epochs: int = EPOCHS) -> SimpleTrainer:
    """``trainer(indices, seed) -> model``: the protocol's training loop on a subset (a
    :class:`~lightning_influence.evaluation.SimpleTrainer`)."""
    from lightning_influence.evaluation import SimpleTrainer

    return SimpleTrainer(make_mlp, TensorDataset(x, y), "classification", epochs=epochs,
                         batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY)


def train_plain(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor, *, epochs: int, seed: int, batch_size: int = BATCH_SIZE,
                ) -> nn.Module:
    """Mean cross-entropy on ``x [N, 64]``, ``y [N]`` for ``epochs`` epochs of batches drawn
    by a permutation seeded with ``seed``; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()
