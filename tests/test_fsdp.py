"""Sharded models: the tracker sees the layers under their wrapped names, every rank
contributes its rows, and factors and scores equal the unsharded ones.

- On CPU: two processes (gloo) with PyTorch's FSDP2 (``fully_shard``), whose parameters are
  DTensors; this runs everywhere.
- Through Lightning's FSDPStrategy: needs CUDA (NCCL); skipped without a GPU, run on a GPU
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

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="Lightning's FSDPStrategy runs on CUDA (NCCL); no GPU here")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sharded_vs_plain(rank: int, world: int, port: int, out: str) -> None:
    """One rank: fit and score the same model plain and sharded with FSDP2; save both."""
    import copy
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                              nn.Linear(32, 4))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 16, generator=g)
        train = DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=8)
        queries = DataLoader(TensorDataset(x[:6] + 0.1, x[:6, :4].argmax(1)), batch_size=6)
        sharded = copy.deepcopy(plain)
        for module in sharded:
            if isinstance(module, nn.Linear):
                fully_shard(module)
        fully_shard(sharded)
        assert any(hasattr(p, "full_tensor") for p in sharded.parameters())  # really sharded
        results = {}
        for name, model in (("plain", plain), ("sharded", sharded)):
            factors = li.fit_factors(model, train, "classification", progress=False)
            pairwise = li.compute_pairwise_scores(model, factors, queries, train,
                                                  "classification", self_influence=True,
                                                  progress=False)
            results[name] = {"eigenvalues": {n: f.eigenvalues for n, f in factors.layers.items()},
                             "fingerprint": factors.fingerprint, "scores": pairwise.scores,
                             "self": pairwise.self_result.scores}
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_on_cpu_gives_the_unsharded_factors_and_scores(tmp_path):
    """FSDP2-sharded parameters (DTensors) on two CPU processes: the same layers, the same
    weight fingerprint (the shards are gathered), the same EK-FAC eigenvalues and scores as the
    unsharded model in the same process group, on every rank."""
    import torch.multiprocessing as mp

    pytest.importorskip("torch.distributed.fsdp")
    mp.spawn(_sharded_vs_plain, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        plain, sharded = r["plain"], r["sharded"]
        assert sharded["fingerprint"] == plain["fingerprint"]
        assert set(sharded["eigenvalues"]) == set(plain["eigenvalues"]) == {"0", "2", "4"}
        for name, lam in plain["eigenvalues"].items():
            torch.testing.assert_close(sharded["eigenvalues"][name], lam, rtol=1e-6, atol=0)
        torch.testing.assert_close(sharded["scores"], plain["scores"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(sharded["self"], plain["self"], rtol=1e-6, atol=1e-9)


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


@needs_cuda
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
