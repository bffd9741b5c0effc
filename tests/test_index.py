"""The training-gradient index (issue 23) against brute force and the full pairwise pass.

- codes: at full width both compressions give the exact pairwise scores; the eigen code at a
  partial width is the EK-FAC score restricted to the kept eigen-coordinates, rebuilt here from
  explicit per-example gradients (tests/reference.py) and the factors' tensors;
- re-rank: the returned scores equal ``compute_pairwise_scores`` on the same examples, for both
  ends; without re-rank the estimates are returned and said to be estimates;
- files: a damaged, stale, edited, unfinished or mismatched index is refused with a clear error;
  an interrupted build resumes and builds only the missing batches; a scoring pass builds it
  without a pass of its own; two processes write their own shards and give one process's index.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import reference as ref
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.callbacks import (
    EigenCorrection,
    InfluenceIndex,
    InfluenceScores,
    InfluenceStatistics,
)
from lightning_influence.index import (
    CorruptIndexError,
    IncompleteIndexError,
    IndexMismatchError,
    IndexWriter,
    build_index,
    open_index,
)
from lightning_influence.options import IndexOptions
from lightning_influence.scoring import observing_rows

N = 40


def _loader(*tensors, batch_size=6):
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


class CountingTask(li.ClassificationTask):
    """Counts forwards; raises on the forward of one batch while ``fail_at`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.fail_at: int | None = None

    def forward(self, model, batch):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("killed mid-build")
        return super().forward(model, batch)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = ref.mlp(d_in=5, hidden=4, classes=3, seed=1)
    x, y = ref.classification_data(N, seed=1)
    xq, yq = ref.classification_data(4, seed=2)
    train, queries = _loader(x, y), _loader(xq, yq, batch_size=4)
    factors = li.fit_factors(model, train, "classification", progress=False)
    full = li.compute_pairwise_scores(model, factors, queries, train, "classification",
                                      progress=False)
    return dict(model=model, x=x, y=y, train=train, queries=queries, factors=factors, full=full)


@pytest.fixture(scope="module")
def lm():
    model = ref.TinyLM(vocab=7, dim=4, hidden=5, seed=0)
    ids, mask = ref.token_data(18, length=6, seed=0)
    qids, qmask = ref.token_data(3, length=6, seed=1)
    batches = [{"input_ids": ids[s:s + 5], "attention_mask": mask[s:s + 5]}
               for s in range(0, 18, 5)]
    queries = [{"input_ids": qids, "attention_mask": qmask}]
    task = li.CausalLMTask()
    factors = li.fit_factors(model, batches, task, progress=False)
    return dict(model=model, ids=ids, mask=mask, train=batches, queries=queries, task=task,
                factors=factors)


def _estimates(index, queries):
    _, codes = index.query_codes(queries)
    return index.estimates(codes)


# ----------------------------------------------------------------------------------- codes
@pytest.mark.parametrize("compression", ["sketch", "eigen", "kronecker"])
def test_full_width_codes_give_the_exact_scores(mlp, lm, tmp_path, compression):
    for name, p in (("mlp", mlp), ("lm", lm)):
        task = "classification" if name == "mlp" else p["task"]
        index = build_index(p["model"], p["factors"], p["train"], task, tmp_path / name,
                            compression=compression, width=10**6, dtype="float32",
                            progress=False)
        assert index.width == sum(o * i for o, i in p["factors"].shapes.values())
        exact = li.compute_pairwise_scores(p["model"], p["factors"], p["queries"], p["train"],
                                           task, progress=False).scores
        est = _estimates(index, p["queries"]).double()
        torch.testing.assert_close(est, exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())


def test_eigen_code_is_the_ekfac_score_on_the_kept_coordinates(mlp, tmp_path):
    """The estimate at width 12 equals the EK-FAC score summed over the 12 eigen-coordinates with
    the largest Lambda / (Lambda + damping), from explicit per-example gradients."""
    model, factors, names = mlp["model"], mlp["factors"], ["0", "2"]
    index = build_index(model, factors, mlp["train"], "classification", tmp_path, width=12,
                        compression="eigen", dtype="float32", progress=False)
    xq, yq = next(iter(mlp["queries"]))
    train_grads = ref.per_example_gradients(model, names, ref.class_nll, mlp["x"], mlp["y"])
    query_grads = ref.per_example_gradients(model, names, ref.class_nll, xq, yq)
    ratios, terms = [], []
    for name in names:
        lf = factors.layers[name]
        lam = lf.eigenvalues.double()
        rot_q = lf.basis_out.T @ query_grads[name] @ lf.basis_in  # [Q, O, I]
        rot_n = lf.basis_out.T @ train_grads[name] @ lf.basis_in  # [N, O, I]
        ratios.append((lam / (lam + lf.damping)).flatten())
        terms.append(torch.einsum("qk,nk->qnk", (rot_q / (lam + lf.damping)).flatten(1),
                                  rot_n.flatten(1)))  # [Q, N, O*I]
    keep = torch.cat(ratios).topk(12).indices
    expected = torch.cat(terms, dim=-1)[..., keep].sum(-1)
    got = _estimates(index, mlp["queries"]).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    assert index.bytes_per_example() == 12 * 4


def test_eigen_needs_eigenvalues_and_kronecker_takes_any_preconditioner(mlp, tmp_path):
    identity = li.fit_factors(mlp["model"], mlp["train"], "classification", strategy="identity",
                              progress=False)
    with pytest.raises(ValueError, match="compression='kronecker'"):
        build_index(mlp["model"], identity, mlp["train"], "classification", tmp_path / "a",
                    compression="eigen", progress=False)
    plain = li.compute_pairwise_scores(mlp["model"], identity, mlp["queries"], mlp["train"],
                                       "classification", progress=False).scores
    for compression in ("sketch", "kronecker"):
        index = build_index(mlp["model"], identity, mlp["train"], "classification",
                            tmp_path / compression, compression=compression, width=10**6,
                            dtype="float32", progress=False)
        torch.testing.assert_close(_estimates(index, mlp["queries"]).double(), plain,
                                   rtol=1e-5, atol=1e-5)


def test_a_solver_is_indexed_by_the_sketch_of_the_raw_gradient(mlp, tmp_path):
    from lightning_influence.solvers import ExplicitGGN

    solver = ExplicitGGN(mlp["model"], mlp["train"], "classification", damping=mlp["factors"])
    index = build_index(mlp["model"], solver, mlp["train"], "classification", tmp_path,
                        width=10**6, dtype="float32", progress=False)
    exact = li.compute_pairwise_scores(mlp["model"], solver, mlp["queries"], mlp["train"],
                                       "classification", progress=False).scores
    torch.testing.assert_close(_estimates(index, mlp["queries"]).double(), exact, rtol=1e-5,
                               atol=1e-6 * exact.abs().max().item())
    result = index.query(mlp["queries"], top_k=3, candidates=8)
    torch.testing.assert_close(result.top.proponent_scores,
                               exact.gather(1, result.top.proponent_indices))


def test_sketch_is_the_count_sketch_of_the_whitened_gradient(mlp, tmp_path):
    """At a width below the coordinate count, the sketch estimate equals the count-sketch of
    the whitened eigenbasis gradients with the code's own buckets and signs, rebuilt from
    explicit per-example gradients; buckets go to the layers by effective dimension."""
    model, factors, names = mlp["model"], mlp["factors"], ["0", "2"]
    index = build_index(model, factors, mlp["train"], "classification", tmp_path, width=20,
                        dtype="float32", progress=False)
    assert index.width == 20
    xq, yq = next(iter(mlp["queries"]))
    train_grads = ref.per_example_gradients(model, names, ref.class_nll, mlp["x"], mlp["y"])
    query_grads = ref.per_example_gradients(model, names, ref.class_nll, xq, yq)
    expected = 0
    for name in names:
        lf, code = factors.layers[name], index.compression.layers[name]
        total = lf.eigenvalues.double() + lf.damping
        w_n = (lf.basis_out.T @ train_grads[name] @ lf.basis_in / total.sqrt()).flatten(1)
        w_q = (lf.basis_out.T @ query_grads[name] @ lf.basis_in / total.sqrt()).flatten(1)
        onehot = torch.zeros(code.bucket.numel(), code.buckets, dtype=torch.float64)
        onehot[torch.arange(code.bucket.numel()), code.bucket] = code.sign.double()
        expected = expected + (w_q @ onehot) @ (w_n @ onehot).T
    got = _estimates(index, mlp["queries"]).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
    sizes = index.compression.sizes()
    ratio = {n: float((factors.layers[n].eigenvalues / (factors.layers[n].eigenvalues
                                                        + factors.layers[n].damping)).sum())
             for n in names}
    assert (sizes["0"] > sizes["2"]) == (ratio["0"] > ratio["2"])


# ----------------------------------------------------------------------------------- queries
def test_reranked_scores_equal_the_full_pass_at_both_ends(mlp, tmp_path):
    index = build_index(mlp["model"], mlp["factors"], mlp["train"], "classification", tmp_path,
                        width=16, progress=False)
    full = mlp["full"]
    result = index.query(mlp["queries"], top_k=4, candidates=12)
    assert result.exact and "exact" in result.score_kind
    for end in ("proponent", "opponent"):
        idx = getattr(result.top, f"{end}_indices")
        scores = getattr(result.top, f"{end}_scores")
        torch.testing.assert_close(scores, full.scores.gather(1, idx), rtol=1e-10, atol=1e-12)
        # each query's results are the exact best of its own candidates
        cands = torch.cat([result.proponent_candidates, result.opponent_candidates], 1)
        for q in range(idx.shape[0]):
            values = full.scores[q, cands[q].unique()]
            best = values.topk(4, largest=end == "proponent").values
            torch.testing.assert_close(scores[q], best, rtol=1e-10, atol=1e-12)
    # with every example a candidate, the answer is the full pass's top-k
    everything = index.query(mlp["queries"], top_k=4, candidates=N)
    assert torch.equal(everything.top.proponent_indices, full.top.proponent_indices[:, :4])
    assert torch.equal(everything.top.opponent_indices, full.top.opponent_indices[:, :4])


def test_without_rerank_the_estimates_are_returned_and_said_to_be(mlp, tmp_path):
    index = build_index(mlp["model"], mlp["factors"], mlp["train"], "classification", tmp_path,
                        width=16, dtype="float32", progress=False)
    result = index.query(mlp["queries"], top_k=3, candidates=5, rerank=False)
    assert not result.exact and "not an exact score" in result.score_kind
    est = _estimates(index, mlp["queries"])
    torch.testing.assert_close(result.top.proponent_scores, est.topk(3).values.double())
    torch.testing.assert_close(result.top.opponent_scores,
                               est.topk(3, largest=False).values.double())


# ----------------------------------------------------------------------------------- files
def test_damaged_edited_stale_and_mismatched_indexes_are_refused(mlp, tmp_path):
    model, factors, train = mlp["model"], mlp["factors"], mlp["train"]
    folder = tmp_path / "index"
    build_index(model, factors, train, "classification", folder, width=16, shard_batches=2,
                progress=False)
    open_index(folder, model, factors, train, "classification")  # intact: opens
    # a flipped byte in a shard's codes
    shard = sorted(folder.glob("shard-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match=f"{shard.name}.*checksum"):
        open_index(folder, model, factors, train, "classification")
    # rebuilding in place replaces the damaged shard, then it opens again
    build_index(model, factors, train, "classification", folder, width=16, shard_batches=2,
                overwrite=True, progress=False)
    open_index(folder, model, factors, train, "classification")
    # an edited manifest
    manifest = folder / "index.safetensors"
    good = manifest.read_bytes()
    edited = good.replace(b'\\"dtype\\": \\"float16\\"', b'\\"dtype\\": \\"float32\\"')
    assert edited != good
    manifest.write_bytes(edited)
    with pytest.raises(CorruptIndexError, match="checksum"):
        open_index(folder, model, factors, train, "classification")
    manifest.write_bytes(good[:-10])
    with pytest.raises(CorruptIndexError, match="truncated|readable"):
        open_index(folder, model, factors, train, "classification")
    manifest.write_bytes(good)
    # other training data (same shapes, another example changed)
    x2 = mlp["x"].clone()
    x2[7, 0] += 1.0
    with pytest.raises(IndexMismatchError, match="other training data"):
        open_index(folder, model, factors, _loader(x2, mlp["y"]), "classification")
    # a retrained model, with factors refitted for it: the index is stale
    other = ref.mlp(d_in=5, hidden=4, classes=3, seed=9)
    refit = li.fit_factors(other, train, "classification", progress=False)
    with pytest.raises(IndexMismatchError, match="another model or factors"):
        open_index(folder, other, refit, train, "classification")
    # the old factors with the retrained model: refused by the factors' own check
    with pytest.raises(li.FactorMismatchError):
        open_index(folder, other, factors, train, "classification")
    # other damping: other factors
    with pytest.raises(IndexMismatchError, match="damping"):
        open_index(folder, model, factors.with_damping(1e-3), train, "classification")
    # another build into the same folder
    with pytest.raises(IndexMismatchError, match="compression"):
        build_index(model, factors, train, "classification", folder, width=8, progress=False)
    # a shard of the listed ones deleted
    shard.unlink()
    with pytest.raises(CorruptIndexError, match="missing"):
        open_index(folder, model, factors, train, "classification")


def test_a_killed_build_resumes_with_the_missing_batches_only(mlp, tmp_path):
    model, factors, train = mlp["model"], mlp["factors"], mlp["train"]  # 7 batches
    reference = build_index(model, factors, train, "classification", tmp_path / "whole",
                            width=16, progress=False)
    task = CountingTask()
    task.fail_at = 6  # batches 0-3 are in two shards of 2, batch 4 was only buffered
    folder = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        build_index(model, factors, train, task, folder, width=16, shard_batches=2,
                    progress=False)
    assert len(list(folder.glob("shard-*.safetensors"))) == 2
    with pytest.raises(IncompleteIndexError, match="resumes"):
        open_index(folder, model, factors, train, task)
    task.fail_at, task.calls = None, 0
    resumed = build_index(model, factors, train, task, folder, width=16, shard_batches=2,
                          progress=False)
    assert task.calls == 3  # batches 4, 5 and 6
    queries = mlp["queries"]
    assert torch.equal(_estimates(resumed, queries), _estimates(reference, queries))
    task.calls = 0
    build_index(model, factors, train, task, folder, width=16, shard_batches=2, progress=False)
    assert task.calls == 0  # finished: reused


def test_a_scoring_pass_builds_the_index_from_its_own_rows(mlp, tmp_path):
    model, factors, train = mlp["model"], mlp["factors"], mlp["train"]
    reference = build_index(model, factors, train, "classification", tmp_path / "alone",
                            width=16, progress=False)
    task = CountingTask()
    bound = li.bind(model, factors, task)
    writer = IndexWriter.prepare(bound, train, tmp_path / "fed", IndexOptions(width=16,
                                                                               progress=False))
    with observing_rows(writer):
        bound.pairwise(mlp["queries"], train, progress=False)
    calls = task.calls
    index = writer.close()
    assert task.calls == calls  # no pass of its own
    queries = mlp["queries"]
    assert torch.equal(_estimates(index, queries), _estimates(reference, queries))
    # a pass over other data feeds nothing
    other = IndexWriter.prepare(bound, train, tmp_path / "other", IndexOptions(width=16,
                                                                                progress=False))
    assert not other.wants(_loader(mlp["x"][:12], mlp["y"][:12]), bound)


# ----------------------------------------------------------------------------------- callback
class Classifier(pl.LightningModule):
    influence_task = "classification"

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_builds_during_the_scoring_pass_and_answers_queries(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    xq, yq = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    queries = _loader(xq, yq, batch_size=5)
    task = CountingTask()
    index_cb = InfluenceIndex(width=32, candidates=48, top_k=3,
                              options=IndexOptions(progress=False))
    callbacks = [InfluenceStatistics(task=task, progress=False), EigenCorrection(progress=False),
                 InfluenceScores(queries=queries, top_k=3, keep_scores=True, progress=False),
                 index_cb]
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=callbacks,
                         default_root_dir=str(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    model = Classifier()
    calls = []
    original = index_cb.training_pass_done
    index_cb.training_pass_done = lambda: (calls.append(task.calls), original())[1]
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    assert calls and task.calls == calls[0]  # the index came from the scoring pass's rows
    assert (tmp_path / "influence" / "index" / "index.safetensors").is_file()
    result = index_cb.query(model, queries)
    full = callbacks[2].pairwise_result
    assert torch.equal(result.top.proponent_indices, full.top.proponent_indices)
    # the callbacks' scores come from the fused pairwise+self float32 pass, the re-rank from the
    # separate one: equal up to float32 rounding of the largest score
    top = full.scores.abs().max().item()
    torch.testing.assert_close(result.top.opponent_scores, full.top.opponent_scores, rtol=0,
                               atol=2e-6 * top)
    for name, param in inspect.signature(InfluenceIndex).parameters.items():
        if name in {f for f in IndexOptions.__dataclass_fields__}:
            assert param.default is None, name  # shortcuts: never a second default


# ----------------------------------------------------------------------------------- DDP
def _ddp_build(rank: int, world: int, init: str, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = ref.mlp(d_in=5, hidden=4, classes=3, seed=1)
    x, y = ref.classification_data(N, seed=1)
    train = _loader(x, y)
    factors = li.Factors.load(folder)
    build_index(model, factors, train, "classification", Path(folder) / "index", width=16,
                shard_batches=2, progress=False)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_write_their_own_shards_and_a_query_reads_all(mlp, tmp_path):
    mlp["factors"].save(tmp_path)
    torch.multiprocessing.spawn(_ddp_build, args=(2, f"file://{tmp_path}/rendezvous",
                                                  str(tmp_path)), nprocs=2, join=True)
    shards = sorted(p.name for p in (tmp_path / "index").glob("shard-*.safetensors"))
    assert {s[:10] for s in shards} == {"shard-r000", "shard-r001"}
    ddp = open_index(tmp_path / "index", mlp["model"], li.Factors.load(tmp_path), mlp["train"],
                     "classification")
    one = build_index(mlp["model"], li.Factors.load(tmp_path), mlp["train"], "classification",
                      tmp_path / "one", width=16, progress=False)
    queries = mlp["queries"]
    torch.testing.assert_close(_estimates(ddp, queries), _estimates(one, queries), rtol=1e-3,
                               atol=1e-3)  # float16 codes of float-level different rows
    manifest = json.loads((tmp_path / "index" / "index.json").read_text())
    assert manifest["complete"] and sum(s["rows"] for s in manifest["shards"]) == N
    assert os.environ.get("RANK") is None


# ----------------------------------------------------------------------------------- language
def test_index_prefilter_and_recall_beside_tfidf(tmp_path):
    from test_language import QUERIES, TEXTS, TinyGPT

    from lightning_influence.language import Document, chunk_documents, document_influence
    from lightning_influence.language.corpus import CharTokenizer
    from lightning_influence.options import DocumentOptions

    docs = [Document(t, s) for t, s in TEXTS]
    tokenizer = CharTokenizer.from_texts([d.text for d in docs])
    corpus = chunk_documents(docs, tokenizer, context=24)
    model = TinyGPT(tokenizer.vocab_size)
    task = li.CausalLMTask(pad_token_id=tokenizer.pad_id)
    train = DataLoader(corpus, batch_size=5)
    factors = li.fit_factors(model, train, task, progress=False)
    build_index(model, factors, train, task, tmp_path, width=10**6, dtype="float32",
                progress=False)
    base = dict(rank=None, top_k=2, recall_ks=[2, 3], token_documents=0, batch_size=5,
                progress=False)
    exact = document_influence(model, factors, corpus, QUERIES, task, DocumentOptions(
        index=str(tmp_path), **base))
    torch.testing.assert_close(exact.index_estimates, exact.document_scores, rtol=1e-5,
                               atol=1e-6 * exact.document_scores.abs().max().item())
    assert [row["index_recall"] for row in exact.recall] == [1.0, 1.0]  # full width: exact
    assert {"recall", "index_opponent_recall"} <= set(exact.recall[0])
    fast = document_influence(model, factors, corpus, QUERIES, task, DocumentOptions(
        index=str(tmp_path), prefilter="index", candidates=1, **base))
    assert fast.candidates.shape == (len(QUERIES), 2)  # the largest and the most negative
    assert torch.equal(fast.proponents[:, 0], exact.proponents[:, 0])
    assert torch.equal(fast.opponents[:, 0], exact.opponents[:, 0])
    scored = ~torch.isnan(fast.chunk_scores)
    assert 0 < int(scored.sum()) < scored.numel()  # only the candidates' chunks were scored
    torch.testing.assert_close(fast.chunk_scores[scored], exact.chunk_scores[scored])
    with pytest.raises(ValueError, match="prefilter='index' needs index"):
        DocumentOptions(prefilter="index")
