"""Language-model influence: low-rank query batching, token/layer/document influence, TF-IDF.

Each fast path is checked against a definition: full-rank scores (api), brute-force per-example
gradients (tests/reference.py), explicit sums; in float64 on a one-block causal transformer.
"""

from __future__ import annotations

import sys

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import Tensor, nn
from torch.testing import assert_close
from torch.utils.data import DataLoader

from lightning_influence import CausalLMTask, compute_pairwise_scores, fit_factors, query_gradients
from lightning_influence.language import (
    CharTokenizer,
    Document,
    Query,
    QueryDataset,
    candidate_recall,
    chunk_documents,
    document_influence,
    document_scores,
    hf_documents,
    layer_influence,
    python_docs,
    rank_correlation,
    read_text_files,
    recall_table,
    tfidf_candidates,
    token_scores,
)
from lightning_influence.language.reporting import render_window, tail_exponent, token_html
from lightning_influence.lowrank import LowRankGradient, QueryStore, truncate
from lightning_influence.scores import (
    low_rank_layer_scores,
    low_rank_token_scores,
    pairwise_layer_scores,
    token_layer_scores,
)
from lightning_influence.scoring import build_query_store

TEXTS = [
    ("lambda", "Lambda expressions create anonymous functions. The expression yields a function."),
    ("break", "The break statement terminates the nearest enclosing loop, skipping the else clause."),
    ("with", "The with statement wraps the execution of a block with methods of a context manager."),
    ("assert", "Assert statements insert debugging assertions; a failure raises AssertionError."),
    ("short", "ok."),
]
QUERIES = [Query("Q: lambda?\nA:", " anonymous functions."), Query("Q: loop?\nA:", " break it."),
           Query("Q: with?\nA:", " a context manager.")]


class TinyGPT(nn.Module):
    """One pre-norm-free causal attention block and an MLP head, float64, ``[N, T] -> [N, T, V]``."""

    def __init__(self, vocab: int, dim: int = 6, context: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, 2 * dim)
        self.head = nn.Linear(2 * dim, vocab)
        self.double().eval()

    def forward(self, ids: Tensor) -> Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))  # [N, T, D]
        q, k, v = self.qkv(x).split(x.shape[-1], dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.head(torch.tanh(self.fc(x)))  # [N, T, V]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids waiting on a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def problem(_one_thread):
    docs = [Document(t, s) for t, s in TEXTS]
    tokenizer = CharTokenizer.from_texts([d.text for d in docs])
    corpus = chunk_documents(docs, tokenizer, context=24)
    model = TinyGPT(tokenizer.vocab_size)
    task = CausalLMTask(pad_token_id=tokenizer.pad_id)
    train = DataLoader(corpus, batch_size=5)
    factors = fit_factors(model, train, task, strategy="ekfac", seed=3, progress=False)
    queries = DataLoader(QueryDataset(QUERIES, tokenizer), batch_size=2)
    return dict(docs=docs, tokenizer=tokenizer, corpus=corpus, model=model, task=task,
                train=train, factors=factors, queries=queries)


def full_rank(shape) -> int:
    return min(shape[1], shape[2])


# ----------------------------------------------------------------------------------- low rank
def test_truncate_is_exact_at_full_rank_and_optimal_below():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)
    assert_close(truncate(m, 5).dense(), m)
    assert truncate(m, 50).rank == 5
    low = truncate(m, 2)
    assert low.left.shape == (3, 7, 2) and low.right.shape == (3, 2, 5)
    s = torch.linalg.svdvals(m)
    err = (low.dense() - m).flatten(1).norm(dim=1)
    assert_close(err, s[:, 2:].norm(dim=1))  # Eckart-Young: the best rank-2 approximation


@pytest.mark.parametrize("path", ["rows", "rebuild", "auto"])
def test_low_rank_contractions_equal_dense(path):
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(4, 5, 7, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 6, 7, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    low = truncate(p, 5)
    expected = torch.einsum("nto,qoi,nti->qn", g, p, a)
    assert_close(low_rank_layer_scores(low, a, g, path=path), expected)
    assert_close(low_rank_token_scores(low, a, g, path=path).sum(-1), expected)
    # small intermediates force chunking over examples and queries
    assert_close(low_rank_layer_scores(low, a, g, max_elements=30, path=path), expected)
    assert_close(pairwise_layer_scores(low, a, g), expected)
    assert_close(token_layer_scores(p, a, g, max_elements=50).sum(-1), expected)


def test_rank_r_scores_equal_full_rank_scores_at_full_rank(problem):
    p = problem
    full = build_query_store(p["model"], p["queries"], p["task"], p["factors"], rank=None)
    dense = query_gradients(p["model"], p["queries"], p["task"], p["factors"], progress=False)
    for name in dense:
        assert_close(full[name], dense[name])
    top_rank = max(full_rank(v.shape) for v in full.values())
    low = build_query_store(p["model"], p["queries"], p["task"], p["factors"], rank=top_rank)
    assert all(isinstance(v, LowRankGradient) for v in low.values())
    kwargs = dict(per_layer=True, progress=False)
    exact = compute_pairwise_scores(p["model"], p["factors"], p["queries"], p["train"], p["task"],
                                    query_grads=full, **kwargs)
    same = compute_pairwise_scores(p["model"], p["factors"], p["queries"], p["train"], p["task"],
                                   query_grads=low, **kwargs)
    assert_close(same.scores, exact.scores, rtol=1e-9, atol=1e-9 * exact.scores.abs().max())
    assert_close(same.layer_scores, exact.layer_scores, rtol=1e-9,
                 atol=1e-9 * exact.scores.abs().max())
    # below full rank the scores change but stay correlated
    rank2 = build_query_store(p["model"], p["queries"], p["task"], p["factors"], rank=2)
    approx = compute_pairwise_scores(p["model"], p["factors"], p["queries"], p["train"], p["task"],
                                     query_grads=rank2, **kwargs)
    assert not torch.allclose(approx.scores, exact.scores)


def test_query_store_memory_is_rank_times_d_out_plus_d_in(problem):
    p = problem
    store = build_query_store(p["model"], p["queries"], p["task"], p["factors"], rank=2)
    shapes = p["factors"].shapes
    q = len(QUERIES)
    assert store.memory_bytes() == sum(q * 2 * (o + i) * 8 for o, i in shapes.values())
    assert store.full_rank_bytes() == sum(q * o * i * 8 for o, i in shapes.values())
    assert store.memory_ratio() == pytest.approx(
        sum(2 * (o + i) for o, i in shapes.values()) / sum(o * i for o, i in shapes.values()))
    both = QueryStore.concatenate([store.select(slice(0, 1)), store.select(slice(1, 3))])
    for name in store:
        assert_close(both[name].dense(), store[name].dense())


# ----------------------------------------------------------------------------------- masks
def test_query_measurement_is_the_completion_log_likelihood(problem):
    p = problem
    data = QueryDataset(QUERIES, p["tokenizer"])
    batch = next(iter(DataLoader(data, batch_size=3)))
    logits = p["model"](batch["input_ids"])
    measured = p["task"].measurement(logits, batch)
    for q, query in enumerate(QUERIES):
        prompt = p["tokenizer"].encode(query.prompt)
        completion = p["tokenizer"].encode(query.completion)
        logp = torch.log_softmax(logits[q], dim=-1)
        nll = -sum(logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(completion))
        assert_close(measured[q], nll)
    # prompt tokens and padding carry the ignore label
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    for q, query in enumerate(QUERIES):
        assert (batch["labels"][q, :len(p["tokenizer"].encode(query.prompt))] == -100).all()


def test_masked_prompt_and_padding_contribute_nothing(problem):
    p = problem
    model, task, factors = p["model"], p["task"], p["factors"]
    data = QueryDataset(QUERIES, p["tokenizer"])
    names = list(factors.shapes)
    # the gradient of the measurement equals the brute-force gradient of the completion NLL
    grads = query_gradients(model, DataLoader(data, batch_size=3), task, factors,
                            precondition=False, progress=False)
    targets = ref.lm_targets(data.input_ids, data.attention_mask, data.labels)
    expected = ref.per_example_gradients(model, names, ref.token_nll, data.input_ids, targets)
    for name in names:
        assert_close(grads[name], expected[name])
    # a query padded to twice its width has the same gradient
    wide = {"input_ids": F.pad(data.input_ids, (0, 20)),
            "attention_mask": F.pad(data.attention_mask, (0, 20)),
            "labels": F.pad(data.labels, (0, 20), value=-100)}
    padded = query_gradients(model, [wide], task, factors, precondition=False, progress=False)
    for name in names:
        assert_close(padded[name], grads[name])
    # on the training side, padding tokens carry exactly zero token-wise influence
    store = build_query_store(model, p["queries"], task, factors, rank=3)
    tracker = factors.tracker(model)
    tokens = token_scores(model, store, p["train"], task, tracker)  # [Q, N, T]
    pad = ~p["corpus"].attention_mask
    assert pad.any()
    assert (tokens[:, pad] == 0).all()
    # and a padded chunk scores as its unpadded self
    n = int(pad.any(1).nonzero()[0])
    length = int(p["corpus"].attention_mask[n].sum())
    alone = [{"input_ids": p["corpus"].input_ids[n:n + 1, :length],
              "attention_mask": p["corpus"].attention_mask[n:n + 1, :length]}]
    single = token_scores(model, store, alone, task, tracker)
    assert_close(single.sum(-1)[:, 0], tokens[:, n].sum(-1))


# ----------------------------------------------------------------------------------- sums
@pytest.mark.parametrize("rank", [None, 3])
def test_token_scores_sum_to_sequence_scores(problem, rank):
    p = problem
    store = build_query_store(p["model"], p["queries"], p["task"], p["factors"], rank=rank)
    result = compute_pairwise_scores(p["model"], p["factors"], p["queries"], p["train"], p["task"],
                                     query_grads=store, progress=False)
    tracker = p["factors"].tracker(p["model"])
    per_layer = token_scores(p["model"], store, p["train"], p["task"], tracker, per_layer=True)
    assert per_layer.shape == (len(store), len(QUERIES), len(p["corpus"]), p["corpus"].context)
    assert_close(per_layer.sum((0, 3)), result.scores)
    assert_close(token_scores(p["model"], store, p["train"], p["task"], tracker), per_layer.sum(0))


def test_layer_scores_sum_to_the_total(problem):
    p = problem
    store = build_query_store(p["model"], p["queries"], p["task"], p["factors"], rank=3)
    result = compute_pairwise_scores(p["model"], p["factors"], p["queries"], p["train"], p["task"],
                                     query_grads=store, per_layer=True, progress=False)
    assert_close(result.layer_scores.sum(0), result.scores)
    corpus = p["corpus"]
    docs = document_scores(result.scores, corpus.chunk_document, corpus.num_documents)
    doc_layers = document_scores(result.layer_scores, corpus.chunk_document, corpus.num_documents)
    top = docs.topk(2, dim=1).indices
    totals, shares = layer_influence(doc_layers, top)
    assert totals.shape == shares.shape == (len(QUERIES), len(store))
    assert_close(totals.sum(1), docs.gather(1, top).sum(1))
    assert_close(shares.sum(1), torch.ones(len(QUERIES), dtype=torch.float64))


def test_chunk_scores_sum_to_the_document_score(problem):
    p = problem
    corpus = p["corpus"]
    result = document_influence(p["model"], p["factors"], corpus, QUERIES, p["task"], rank=3,
                                top_k=2, token_documents=2, batch_size=4, progress=False)
    for d in range(corpus.num_documents):
        chunks = corpus.document_chunks(d)
        assert_close(result.document_scores[:, d], result.chunk_scores[:, chunks].sum(1))
    assert_close(result.document_layer_scores.sum(0), result.document_scores)
    # the token-wise scores of a top document sum to its document score
    assert result.token_scores
    for (q, d), tokens in result.token_scores.items():
        assert tokens.numel() == len(p["tokenizer"].encode(corpus.documents[d].text))
        assert_close(tokens.sum(), result.document_scores[q, d])
    for q in range(len(QUERIES)):
        assert result.document_scores[q, result.proponents[q, 0]] == result.document_scores[q].max()
        assert result.document_scores[q, result.opponents[q, 0]] == result.document_scores[q].min()


def test_full_rank_comparison_and_prefilter(problem):
    p = problem
    corpus = p["corpus"]
    exact = document_influence(p["model"], p["factors"], corpus, QUERIES, p["task"], rank=2,
                               compare_full_rank=True, token_documents=0, recall_ks=[1, 2, 4],
                               top_k=2, progress=False)
    assert exact.spearman_chunks.shape == (len(QUERIES),)
    assert (exact.spearman_chunks > -1).all() and (exact.spearman_chunks <= 1).all()
    assert [row["K"] for row in exact.recall] == [1, 2, 4]
    assert exact.recall[-1]["recall"] >= exact.recall[0]["recall"]
    pre = document_influence(p["model"], p["factors"], corpus, QUERIES, p["task"], rank=2,
                             candidates=2, token_documents=1, top_k=2, progress=False)
    assert pre.recall is None and pre.candidates.shape == (len(QUERIES), 2)
    for q in range(len(QUERIES)):
        scored = ~torch.isnan(pre.document_scores[q])
        assert set(scored.nonzero().flatten().tolist()) == set(pre.candidates[q].tolist())
        assert_close(pre.document_scores[q, scored], exact.document_scores[q, scored])
        assert set(pre.proponents[q].tolist()) <= set(pre.candidates[q].tolist())


def test_a_query_longer_than_the_context_is_refused_before_any_pass(problem):
    p = problem
    model = TinyGPT(p["tokenizer"].vocab_size, context=36)  # 36 positions
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    long = Query("Q: with? with? \nA:", " a context manager.")  # 18 + 19 characters
    with pytest.raises(ValueError, match=r"Query 1 \('Q: with\? with.*has 37 tokens \(18 of "
                                         r"prompt, 19 of completion\), more than the model's "
                                         r"context of 36 \(the position embedding 'wpe'\)\. "
                                         r"Shorten its prompt"):
        document_influence(model, p["factors"], p["corpus"], [QUERIES[0], long], p["task"],
                           rank=2, progress=False)
    assert calls == []


def test_the_models_context_is_read_from_its_config_or_position_embedding():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_influence.language.documents import model_context

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11,
                                      n_positions=48))
    assert model_context(gpt2) == (48, "config.max_position_embeddings")
    wrapped = nn.ModuleDict({"lm": gpt2})
    assert model_context(wrapped) == (48, "lm.config.max_position_embeddings")
    assert model_context(TinyGPT(5, context=20)) == (20, "the position embedding 'wpe'")
    assert model_context(ref.TinyLM()) is None  # no positions: nothing to check


# ----------------------------------------------------------------------------------- TF-IDF
def test_tfidf_candidates_put_an_exact_duplicate_first():
    docs = [d.text for d in python_docs(topics=True, modules=())[:30]]
    query = "Lambda expressions (sometimes called lambda forms) create anonymous functions."
    docs.insert(17, query)
    candidates, sims = tfidf_candidates([query, "the break statement"], docs, k=5)
    assert candidates.shape == (2, 5)
    assert int(candidates[0, 0]) == 17
    assert float(sims[0, 0]) == pytest.approx(1.0)
    assert (sims[:, :-1] >= sims[:, 1:]).all()


def test_candidate_recall_and_recall_table():
    cands = torch.tensor([[3, 1, 2], [0, 4, 1]])
    exact = torch.tensor([[1, 5], [4, 0]])
    assert_close(candidate_recall(cands, exact), torch.tensor([0.5, 1.0], dtype=torch.float64))
    docs = ["apples and pears", "loops break early", "context managers wrap blocks",
            "anonymous lambda functions", "assert raises errors"]
    scores = torch.tensor([[0.0, 0.1, 0.2, 5.0, 0.3]], dtype=torch.float64)
    table = recall_table(["what is a lambda function"], docs, scores, ks=[1, 3, 5], top_k=1)
    assert [r["K"] for r in table] == [1, 3, 5]
    assert table[0]["recall"] == 1.0 and table[-1]["random_recall"] == 1.0


def test_rank_correlation_equals_scipy():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    y = x + 0.5 * torch.randn(3, 50, generator=gen, dtype=torch.float64)
    y[0, :10] = 1.0  # ties
    got = rank_correlation(x, y)
    for q in range(3):
        assert float(got[q]) == pytest.approx(spearmanr(x[q], y[q]).statistic, abs=1e-12)


# ----------------------------------------------------------------------------------- data
def test_chunking_splits_long_documents_and_keeps_every_token():
    docs = [Document("a", "x" * 23), Document("b", "y"), Document("c", "hello world")]
    tok = CharTokenizer.from_texts([d.text for d in docs])
    corpus = chunk_documents(docs, tok, context=10)
    assert corpus.num_documents == 2  # "y" has nothing to predict
    assert corpus.titles == ["a", "c"]
    assert corpus.chunk_document.tolist() == [0, 0, 0, 1]  # "hello worl" + "d" (dropped)
    assert corpus.chunk_offset.tolist() == [0, 10, 20, 0]
    assert corpus.attention_mask.sum(1).tolist() == [10, 10, 3, 10]
    for d, doc in enumerate(corpus.documents):
        ids = corpus.input_ids[corpus.document_chunks(d)][corpus.attention_mask[corpus.document_chunks(d)]]
        text = tok.decode(ids.tolist())
        assert doc.text.startswith(text) and len(doc.text) - len(text) <= 1
    assert tok.decode(tok.encode("x\u2603")) == "x\ufffd"


def test_user_text_files_and_directories(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("first document\n")
    (tmp_path / "notes" / "b.md").write_text("second document\n")
    (tmp_path / "notes" / "skip.bin").write_text("not text")
    (tmp_path / "c.txt").write_text("third\n")
    docs = read_text_files([tmp_path / "notes", str(tmp_path / "*.txt")])
    assert [d.text for d in docs] == ["first document\n", "second document\n", "third\n"]
    assert docs[0].title.endswith("a.txt")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        read_text_files([tmp_path / "missing*.txt"])


def test_a_document_whose_file_name_is_not_utf8_is_written_and_shown(tmp_path, problem):
    import csv
    import os

    from lightning_influence.language.reporting import write_document_influence

    p = problem
    folder = tmp_path / "corpus"
    folder.mkdir()
    with open(os.fsencode(folder) + b"/caf\xe9 notes.txt", "w") as fh:  # Latin-1 name
        fh.write(TEXTS[0][1])
    (folder / "plain.txt").write_text(TEXTS[1][1])
    docs = read_text_files([folder])
    assert docs[0].title == f"{folder}/caf\\xe9 notes.txt"  # the byte shown, not a surrogate
    corpus = chunk_documents(docs, p["tokenizer"], context=24)
    model = TinyGPT(p["tokenizer"].vocab_size)
    factors = fit_factors(model, DataLoader(corpus, batch_size=5), p["task"], progress=False)
    result = document_influence(model, factors, corpus, QUERIES[:1], p["task"], rank=2, top_k=1,
                                token_documents=1, progress=False)
    paths = write_document_influence(tmp_path / "out", result, corpus)
    titles = {row["top_proponent"] for row in csv.DictReader(paths["queries"].open())} | {
        row["top_opponent"] for row in csv.DictReader(paths["queries"].open())}
    assert f"{folder}/caf\\xe9 notes.txt" in titles
    assert "caf\\xe9 notes.txt" in paths["token_influence"].read_text(encoding="utf-8")
    # text from elsewhere with lone surrogates is written escaped, not an error at the end
    from lightning_influence.io import atomic_save_csv
    atomic_save_csv([{"title": "caf\udce9"}], tmp_path / "t.csv", ["title"])
    assert (tmp_path / "t.csv").read_text(encoding="utf-8").splitlines()[1] == "caf\\udce9"


def test_hugging_face_corpus_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        hf_documents("wikitext", config="wikitext-2-raw-v1")


def test_default_corpus_is_pythons_documentation():
    docs = python_docs()
    titles = [d.title for d in docs]
    assert sum(t.startswith("topic ") for t in titles) == 79
    assert "topic lambda" in titles and "module json" in titles
    assert sum(len(d.text) for d in docs if d.title.startswith("topic ")) > 400_000


# ----------------------------------------------------------------------------------- reporting
def test_token_html_and_render_window():
    scores = torch.tensor([0.1, -2.0, 0.0, 3.0, 0.2])
    page = token_html(list("ab<de"), scores, title="doc")
    assert "&lt;" in page and page.count("<span") == 5
    assert "rgba(220,40,40,0.667)" in page and "rgba(0,160,60,1.000)" in page
    assert render_window(scores, 2) == (3, 5)  # the most positive pair of a positive sequence
    assert render_window(-scores, 2) == (3, 5)  # the most negative pair of a negative one
    assert render_window(torch.tensor([1.0, -3.0, -1.0, 0.5]), 2) == (1, 3)
    assert render_window(scores, 10) == (0, 5)


def test_tail_exponent_recovers_a_power_law():
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, generator=gen, dtype=torch.float64)
    pareto = u.pow(-1 / 1.5)  # P(S > s) = s^-1.5
    assert tail_exponent(pareto, tail=0.01) == pytest.approx(1.5, rel=0.1)
