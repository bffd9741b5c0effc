"""The GEMM route of single-row pairwise scores equals the two-step contraction (float64)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lightning_influence import scores


@pytest.mark.parametrize("shape", [(20, 7, 5), (32, 3, 9)])
def test_gemm_route_equals_the_contraction(monkeypatch, shape):
    q, o, i = shape
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(q, o, i, generator=gen, dtype=torch.float64)
    a = torch.randn(11, 1, i, generator=gen, dtype=torch.float64)
    g = torch.randn(11, 1, o, generator=gen, dtype=torch.float64)
    want = torch.einsum("nto,qoi,nti->qn", g, p, a)
    assert q >= scores.GEMM_MIN_QUERIES
    assert_close(scores.pairwise_layer_scores(p, a, g), want)  # GEMM route
    monkeypatch.setattr(scores, "GEMM_MIN_QUERIES", 10**9)
    assert_close(scores.pairwise_layer_scores(p, a, g), want)  # two-step route
    monkeypatch.setattr(scores, "GEMM_MIN_QUERIES", 1)
    monkeypatch.setattr(scores, "GEMM_MAX_ELEMENTS", 10)  # too big a batch: two-step route
    assert_close(scores.pairwise_layer_scores(p, a, g), want)
