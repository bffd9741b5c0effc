"""The memory estimate counts what each stage holds."""

from lightning_influence.memory import estimate_bytes, format_estimate


def test_estimate_counts_each_stage():
    shapes = {"a": [3, 5], "b": [2, 4]}  # [O, I]
    est = estimate_bytes(shapes, "ekfac", num_queries=7, batch_size=10, rows_per_example=4,
                         num_train=100, keep_scores=True)
    sq = 3 * 3 + 5 * 5 + 2 * 2 + 4 * 4
    assert est["eigenbases"] == 8 * sq
    assert est["covariances"] == (8 + 4) * sq  # float64 sums + float32 batch buffers
    assert est["eigenvalues"] == 8 * (15 + 8)
    assert est["query_gradients"] == 4 * 7 * (15 + 8)
    assert est["batch_rows"] == 4 * 10 * (4 * (8 + 6) + (15 + 8))
    assert est["forward_graph"] == 4 * 10 * 4 * (8 + 6)  # the graph's saved inputs + grads
    assert est["model_outputs"] == 4 * 4 * 10 * 4 * 3  # widest output, O = 3, four copies
    assert est["score_matrix"] == 8 * 7 * 100
    low = estimate_bytes(shapes, "ekfac", num_queries=7, query_rank=2)
    assert low["query_gradients"] == 4 * 7 * 2 * (8 + 6)
    ident = estimate_bytes(shapes, "identity")
    assert ident["covariances"] == ident["eigenvalues"] == 0
    assert "total" in format_estimate(est)
