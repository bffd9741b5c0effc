"""Covariance sums of float32 rows: float32 buffers folded into float64 sums give the same A, S."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from lightning_influence.statistics import CovarianceStatistic


def test_float32_rows_accumulate_through_folded_buffers():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 2, 5, generator=gen), torch.randn(6, 2, 3, generator=gen))
               for _ in range(5)]
    stat = CovarianceStatistic(5, 3, fold_every=2)
    exact = CovarianceStatistic(5, 3)
    for a, g in batches:
        stat.update(a, g)
        exact.update(a.double(), g.double())  # float64 rows: straight into the sums
    assert stat.activation_pending.abs().sum() > 0  # 5 updates, folded after 2 and 4
    got, want = stat.compute(), exact.compute()
    assert got["A"].dtype == torch.float64
    for key in ("A", "S", "rows", "examples"):
        assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
    # checkpoint round trip keeps the pending part
    restored = CovarianceStatistic(5, 3)
    restored.load_sums(stat.sums())
    assert_close(restored.compute()["A"], got["A"])
