"""Silent wrong answers and lost work refused at the root (issue: no silent wrong answer).

Each test fails on the code before the fix: resumed runs wrote into the original run's folder,
subset / weighted / custom-order loaders were scored as if ordered, a zero-curvature layer gave
NaN scores, all-ignored queries gave arbitrary top-k lists, an unwritable folder was found only
after both passes, files came out 0600, and text cells were written as spreadsheet formulas.
"""

from __future__ import annotations

import csv
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
import reference as ref
import torch
from test_callbacks import TinyClassifier, _callbacks, _loaders, _trainer
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import lightning_influence as li
from lightning_influence.callbacks import EigenCorrection
from lightning_influence.io import atomic_save_csv, csv_safe


def _data(n=12, seed=0):
    x, y = ref.classification_data(n, seed=seed)
    return TensorDataset(x, y)


# ----------------------------------------------------------------------------------- paths
def test_a_resumed_run_never_writes_into_the_original_runs_folder(tmp_path):
    torch.manual_seed(0)
    first, second = tmp_path / "first", tmp_path / "second"
    train, val = _loaders()
    trainer = _trainer(first, _callbacks(), epochs=1)
    trainer.fit(TinyClassifier(), train, val)
    ckpt = first / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    before = {p.name: p.stat().st_mtime_ns for p in (first / "influence").iterdir()}
    callbacks = _callbacks()
    _trainer(second, callbacks, epochs=2).fit(TinyClassifier(), train, val, ckpt_path=str(ckpt))
    after = {p.name: p.stat().st_mtime_ns for p in (first / "influence").iterdir()}
    assert after == before  # nothing new or rewritten in the original run's folder
    assert (second / "influence" / "scores.safetensors").exists()
    assert callbacks[1].factors_path == str(second / "influence")


def test_an_unwritable_output_folder_is_refused_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    train, val = _loaders()
    callbacks = [EigenCorrection(strategy="identity", output_dir=blocker / "influence")]
    trainer = _trainer(tmp_path, callbacks, epochs=1)
    with pytest.raises(PermissionError, match=r"cannot write to .*file/influence"):
        trainer.fit(TinyClassifier(), train, val)
    assert trainer.global_step == 0  # refused before any training step


def test_a_dangling_link_as_scores_dir_is_refused_before_any_pass(tmp_path):
    link, target = tmp_path / "chunks", tmp_path / "unmounted" / "chunks"
    link.symlink_to(target)
    model = ref.mlp()
    loader = DataLoader(_data(12), batch_size=4)
    factors = li.fit_factors(model, loader, "classification", strategy="identity",
                             progress=False)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    message = (rf"cannot write to {re.escape(str(link))} \({re.escape(str(link))} is a symbolic "
               rf"link to {re.escape(str(target))}, which does not exist: create its target or "
               r"remove the link\)\. Point scores_dir at")
    with pytest.raises(PermissionError, match=message):
        li.compute_self_scores(model, factors, loader, "classification", progress=False,
                               scores_dir=link)
    with pytest.raises(PermissionError, match=message):
        li.compute_pairwise_scores(model, factors, loader, loader, "classification",
                                   progress=False, scores_dir=link)
    assert calls == []  # refused before the first forward, not at the first chunk's flush


def test_a_dangling_link_as_output_folder_says_why(tmp_path):
    link = tmp_path / "influence"
    link.symlink_to(tmp_path / "gone")
    train, val = _loaders()
    trainer = _trainer(tmp_path, [EigenCorrection(strategy="identity", output_dir=link)],
                       epochs=1)
    with pytest.raises(PermissionError, match=r"influence is a symbolic link to .*gone, which "
                                              r"does not exist: create its target"):
        trainer.fit(TinyClassifier(), train, val)
    with pytest.warns(UserWarning, match=r"Could not save the fitted factors .*influence is a "
                                         r"symbolic link to .*gone, which does not exist"):
        li.fit_factors(ref.mlp(), DataLoader(_data(12), batch_size=4), "classification",
                       progress=False, output_dir=link)


# ----------------------------------------------------------------------------------- order
@pytest.mark.parametrize("make", [
    lambda ds: DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(range(6))),
    lambda ds: DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler([1.0] * len(ds), 12)),
    lambda ds: DataLoader(ds, batch_sampler=[[3, 1], [0, 2]]),
])
def test_scoring_refuses_every_order_that_is_not_the_datasets(make):
    ds = _data()
    model = ref.mlp()
    factors = li.fit_factors(model, DataLoader(ds, batch_size=4), "classification",
                             strategy="identity", progress=False)
    with pytest.raises(ValueError, match="would not name examples"):
        li.compute_self_scores(model, factors, make(ds), "classification", progress=False)
    ordered = DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 5, False))
    li.compute_self_scores(model, factors, ordered, "classification", progress=False)


def test_callbacks_refuse_a_subset_sampler_instead_of_scoring_untrained_examples(tmp_path):
    train_set = _loaders()[0].dataset
    train = DataLoader(train_set, batch_size=16, sampler=SubsetRandomSampler(range(32)))
    trainer = _trainer(tmp_path, _callbacks(), epochs=1)
    with pytest.raises(ValueError, match="SubsetRandomSampler.*never trained on"):
        trainer.fit(TinyClassifier(), train, _loaders()[1])


# ----------------------------------------------------------------------------------- numerics
class IgnoredHead(nn.Module):
    """A second head the loss never sees: zero Fisher."""

    def __init__(self):
        super().__init__()
        self.body = ref.mlp()
        self.unused = nn.Linear(3, 2).double()
        self.extra = None

    def forward(self, x):
        out = self.body(x)
        self.extra = self.unused(out.detach())  # runs, but no loss depends on it
        return out + 0 * self.unused(out).sum(-1, keepdim=True)


def test_a_layer_without_curvature_is_refused_not_turned_into_nan():
    model = IgnoredHead()
    data = DataLoader(_data(), batch_size=4)
    with pytest.raises(FloatingPointError, match=r"'unused' has no curvature.*exclude"):
        li.fit_factors(model, data, "classification", progress=False)
    factors = li.fit_factors(model, data, "classification", progress=False, exclude=["unused"])
    scores = li.compute_self_scores(model, factors, data, "classification", progress=False)
    assert torch.isfinite(scores.scores).all()


def test_queries_whose_labels_are_all_ignored_are_reported():
    model = ref.TinyLM()
    ids, mask = ref.token_data(6, seed=1)
    train = DataLoader([{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask,
                                                                             strict=True)],
                       batch_size=3)
    labels = torch.full_like(ids[:2], -100)
    labels[1, 2:] = ids[1, 2:]
    queries = DataLoader([{"input_ids": i, "attention_mask": m, "labels": lab}
                          for i, m, lab in zip(ids[:2], mask[:2], labels, strict=True)],
                         batch_size=2)
    factors = li.fit_factors(model, train, "causal_lm", progress=False)
    with pytest.warns(UserWarning, match=r"Queries \[0\] have a zero gradient"):
        li.compute_pairwise_scores(model, factors, queries, train, "causal_lm", progress=False)


# ----------------------------------------------------------------------------------- files
def test_files_follow_the_umask_and_csv_text_cannot_run_as_a_formula(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_save_csv([{"prompt": "=HYPERLINK(\"x\")", "score": -1.5, "label": "@a"},
                                {"prompt": "plain", "score": 2.0, "label": "-3"}],
                               tmp_path / "t.csv", ["prompt", "score", "label"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    rows = list(csv.DictReader(path.open()))
    assert rows[0] == {"prompt": "'=HYPERLINK(\"x\")", "score": "-1.5", "label": "'@a"}
    assert rows[1] == {"prompt": "plain", "score": "2.0", "label": "'-3"}
    assert csv_safe(-3) == -3


def test_safetensors_outputs_follow_the_umask_too(tmp_path):
    """safetensors writes its own 0600 temporary file and renames it onto ours: the mode set
    before the write was lost, so factor and score files came out 0600."""
    old = os.umask(0o022)
    try:
        factors = li.fit_factors(ref.mlp(), DataLoader(_data(12), batch_size=4),
                                 "classification", progress=False, output_dir=tmp_path)
        chunks = tmp_path / "chunks"
        li.compute_self_scores(ref.mlp(), factors, DataLoader(_data(12), batch_size=4),
                               "classification", progress=False, scores_dir=chunks)
    finally:
        os.umask(old)
    written = [tmp_path / "factors.safetensors", *chunks.glob("*.safetensors")]
    assert len(written) == 2
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o644}


def test_no_warning_for_ordinary_queries():
    ds = _data()
    model = ref.mlp()
    loader = DataLoader(ds, batch_size=4)
    factors = li.fit_factors(model, loader, "classification", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        li.compute_pairwise_scores(model, factors, loader, loader, "classification",
                                   progress=False)


# ----------------------------------------------------------------------------------- factor files
@pytest.fixture()
def saved_factors(tmp_path):
    ds = _data(16)
    factors = li.fit_factors(ref.mlp(), DataLoader(ds, batch_size=4), "classification",
                             progress=False, output_dir=tmp_path)
    return tmp_path, factors


def _rewrite(path, edit_tensors=None, edit_meta=None):
    """Rewrite a factor file with edited tensors or metadata (the checksum left as it was)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    if edit_tensors:
        edit_tensors(tensors)
    body = json.loads(meta["lightning_influence"])
    if edit_meta:
        edit_meta(body)
    save_file(tensors, str(path), metadata={"lightning_influence": json.dumps(body)})


def test_factors_round_trip_and_the_json_is_only_a_readable_copy(saved_factors):
    folder, factors = saved_factors
    (folder / "factors.json").write_text('{"strategy": "identity"}')  # another fit's metadata
    loaded = li.Factors.load(folder)
    assert loaded.strategy == "ekfac" and loaded.shapes == factors.shapes
    for name, layer in factors.layers.items():
        assert torch.equal(loaded.layers[name].eigenvalues, layer.eigenvalues)
        assert loaded.layers[name].damping == layer.damping


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "not a readable"),
    (lambda p: p.write_bytes(b""), "not a readable"),
    (lambda p: p.write_bytes(p.read_bytes()[:-9] + bytes([p.read_bytes()[-9] ^ 1])
                             + p.read_bytes()[-8:]), "checksum"),
    (lambda p: _rewrite(p, edit_meta=lambda m: m.update(num_examples=m["num_examples"] + 1)),
     "checksum"),
    (lambda p: _rewrite(p, edit_tensors=lambda t: t.pop(next(iter(sorted(t))))), "checksum"),
    (lambda p: _rewrite(p, edit_meta=lambda m: m.pop("checksum")), "checksum"),
])
def test_damaged_or_edited_factor_files_are_refused_naming_the_file(saved_factors, damage,
                                                                    message):
    folder, _ = saved_factors
    path = folder / "factors.safetensors"
    damage(path)
    with pytest.raises(li.CorruptFactorsError, match=rf"{path}.*{message}.*overwrite=True"):
        li.Factors.load(folder)
    ds = _data(16)
    with pytest.raises(li.CorruptFactorsError):  # a rerun does not reuse it silently
        li.fit_factors(ref.mlp(), DataLoader(ds, batch_size=4), "classification",
                       progress=False, output_dir=folder)
    li.fit_factors(ref.mlp(), DataLoader(ds, batch_size=4), "classification", progress=False,
                   output_dir=folder, overwrite=True)
    li.Factors.load(folder)


@pytest.mark.parametrize("corrupt_field, message", [
    (lambda f: setattr(f, "strategy", "magic"), "unknown strategy 'magic'"),
    (lambda f: f.layers["0"].eigenvalues.__setitem__((0, 0), float("nan")), "NaN or Inf"),
    (lambda f: setattr(f.layers["0"], "damping", float("nan")), "damping nan"),
    (lambda f: setattr(f.layers["0"], "damping", -1.0), "damping -1.0"),
    (lambda f: setattr(f.layers["2"], "basis_in", None), r"tensors missing: \['2.basis_in'\]"),
])
def test_factor_files_with_impossible_contents_are_refused(saved_factors, corrupt_field,
                                                           message):
    folder, factors = saved_factors
    corrupt_field(factors)
    factors.save(folder)  # a consistent checksum over impossible contents
    with pytest.raises(li.CorruptFactorsError, match=message):
        li.Factors.load(folder)


def test_factor_files_of_the_old_format_ask_for_a_refit(saved_factors):
    folder, _ = saved_factors
    from safetensors.torch import save_file
    save_file({"0.eigenvalues": torch.ones(4, 6, dtype=torch.float64)},
              str(folder / "factors.safetensors"))
    with pytest.raises(li.CorruptFactorsError, match="older version.*overwrite=True"):
        li.Factors.load(folder)


def test_fitted_factors_are_kept_when_only_their_file_fails(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    ds = _data(16)
    with pytest.warns(UserWarning, match=r"Could not save the fitted factors to .*file.*kept in "):
        factors = li.fit_factors(ref.mlp(), DataLoader(ds, batch_size=4), "classification",
                                 progress=False, output_dir=blocker / "factors")
    assert set(factors.layers) == {"0", "2"}


def test_fitted_factors_are_kept_when_the_disk_is_full_during_a_refit(tmp_path, monkeypatch):
    """safetensors reports a failed write (ENOSPC) as its own SafetensorError, not an OSError:
    the refit was thrown away instead of kept in memory with a warning."""
    from safetensors import SafetensorError

    import lightning_influence.io as io

    ds = _data(16)
    loader = DataLoader(ds, batch_size=4)
    li.fit_factors(ref.mlp(), loader, "classification", progress=False, output_dir=tmp_path)

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 10)  # the part written before the disk filled up
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(io, "save_file", disk_full)
    with pytest.warns(UserWarning, match=r"Could not save the fitted factors to .*No space left "
                                         r"on device.*kept in memory"):
        factors = li.fit_factors(ref.mlp(seed=1), loader, "classification", progress=False,
                                 output_dir=tmp_path, overwrite=True)
    assert set(factors.layers) == {"0", "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors.json",
                                                         "factors.safetensors"]  # no leftovers


# ----------------------------------------------------------------------------------- score chunks
def _chunked_self_scores(model, factors, ds, folder):
    return li.compute_self_scores(model, factors, DataLoader(ds, batch_size=4),
                                  "classification", progress=False, scores_dir=folder,
                                  chunk_batches=1).scores


def test_score_chunks_of_another_training_set_are_refused(tmp_path):
    model = ref.mlp()
    ds, other = _data(12, seed=0), _data(12, seed=1)  # same size, other contents
    factors = li.fit_factors(model, DataLoader(ds, batch_size=4), "classification",
                             progress=False)
    _chunked_self_scores(model, factors, ds, tmp_path)
    with pytest.raises(li.ScoreStoreMismatchError, match="training data"):
        _chunked_self_scores(model, factors, other, tmp_path)
    reordered = torch.utils.data.Subset(ds, list(range(11, -1, -1)))
    with pytest.raises(li.ScoreStoreMismatchError):
        _chunked_self_scores(model, factors, reordered, tmp_path)


def test_a_damaged_score_chunk_is_scored_again(tmp_path, caplog):
    model = ref.mlp()
    ds = _data(12)
    factors = li.fit_factors(model, DataLoader(ds, batch_size=4), "classification",
                             progress=False)
    want = _chunked_self_scores(model, factors, ds, tmp_path / "fresh")
    _chunked_self_scores(model, factors, ds, tmp_path)
    chunks = sorted(tmp_path.glob("self-chunk-*.safetensors"))
    assert len(chunks) == 3
    raw = bytearray(chunks[1].read_bytes())
    raw[-3] ^= 0xFF  # a flipped byte in the scores
    chunks[1].write_bytes(bytes(raw))
    chunks[2].write_bytes(chunks[2].read_bytes()[:40])  # truncated
    got = _chunked_self_scores(model, factors, ds, tmp_path)
    assert torch.equal(got, want)
    assert "fails its checksum" in caplog.text and "unreadable" in caplog.text
    assert torch.equal(_chunked_self_scores(model, factors, ds, tmp_path), want)  # rewritten


# ----------------------------------------------------------------------------------- loaders
class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, ds):
        self.ds = ds

    def __iter__(self):
        return (self.ds[i] for i in range(len(self.ds)))


def test_callbacks_score_an_iterable_dataset(tmp_path):
    torch.manual_seed(0)
    train_set, val = _loaders()[0].dataset, _loaders()[1]
    callbacks = _callbacks()
    _trainer(tmp_path, callbacks, epochs=1).fit(TinyClassifier(),
                                                DataLoader(_Stream(train_set), batch_size=16), val)
    flags = list(csv.DictReader((tmp_path / "influence" / "self_influence_flags.csv").open()))
    assert len(flags) == round(0.1 * len(train_set))
    n = int(flags[0]["train_index"])
    assert flags[0]["label"] == str(int(train_set[n][1]))  # labels from the stream
    assert callbacks[2].self_result.scores.shape == (len(train_set),)


def test_callbacks_take_num_queries_from_a_streaming_validation_loader(tmp_path):
    torch.manual_seed(0)
    train, val = _loaders()
    callbacks = _callbacks()  # num_queries=4
    model = TinyClassifier()
    _trainer(tmp_path, callbacks, epochs=1).fit(
        model, train, DataLoader(_Stream(val.dataset), batch_size=3))
    result = callbacks[2].pairwise_result
    assert result.top.proponent_indices.shape[0] == 4
    queries = DataLoader(torch.utils.data.Subset(val.dataset, range(4)), batch_size=3)
    expected = li.compute_pairwise_scores(model, callbacks[1].factors,
                                          queries, DataLoader(train.dataset, batch_size=16),
                                          progress=False)
    # the callbacks score pairwise and self-influence in one fused float32 pass (the queries
    # kept in the Kronecker eigenbasis): equal to the separate pass up to float32 rounding
    top = expected.scores.abs().max().item()
    torch.testing.assert_close(result.scores, expected.scores, rtol=0, atol=2e-6 * top)
    rows = list(csv.DictReader((tmp_path / "influence" / "top_influential.csv").open()))
    assert {row["query_label"] for row in rows if row["query_index"] == "3"} == {
        str(int(val.dataset[3][1]))}  # the queries' own labels, from the stream


def test_callbacks_keep_a_loader_that_yields_whole_batches(tmp_path):
    torch.manual_seed(0)
    train_set, val = _loaders()[0].dataset, _loaders()[1]
    batches = [train_set[i:i + 16] for i in range(0, len(train_set), 16)]
    callbacks = _callbacks()
    _trainer(tmp_path, callbacks, epochs=1).fit(TinyClassifier(),
                                                DataLoader(batches, batch_size=None), val)
    assert callbacks[2].self_result.scores.shape == (len(train_set),)


def test_one_shot_iterators_and_unbatched_items_are_named():
    ds = _data(12)
    model = ref.mlp()
    batches = (ds[i:i + 4] for i in range(0, 12, 4))
    with pytest.raises(TypeError, match="one-shot iterator.*re-iterable"):
        li.fit_factors(model, batches, "classification", progress=False)
    with pytest.raises(ValueError, match="Layer '0' got an input of shape \\(5,\\)"):
        li.fit_factors(model, DataLoader(ds, batch_size=None), "classification", progress=False)


# ----------------------------------------------------------------------------------- numerics, 2
class Gated(nn.Module):
    """``extra`` runs only on batches whose examples all have x[:, 0] > 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(5, 4).double()
        self.extra = nn.Linear(4, 4).double()
        self.head = nn.Linear(4, 3).double()

    def forward(self, x):
        h = torch.tanh(self.body(x))
        if bool((x[:, 0] > 0).all()):
            h = h + self.extra(h)
        return self.head(h)


def _gated_data():
    x, y = ref.classification_data(12, seed=3)
    x[:4, 0] = x[:4, 0].abs() + 0.1   # batch 0: extra runs
    x[4:, 0] = -x[4:, 0].abs() - 0.1  # batches 1 and 2: it does not
    return x, y


def test_a_layer_that_skips_batches_is_averaged_over_every_example():
    x, y = _gated_data()
    model = Gated()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    factors = li.fit_factors(model, loader, "classification", strategy="diagonal",
                             fisher="empirical", damping=1e-3, progress=False)
    grads = []  # per example, by plain autograd (vmap cannot follow the data-dependent branch)
    for n in range(12):
        w, b = torch.autograd.grad(ref.class_nll(model(x[n:n + 1]), y[n:n + 1]).sum(),
                                   [model.extra.weight, model.extra.bias], allow_unused=True)
        grads.append(torch.zeros(4, 5, dtype=torch.float64) if w is None
                     else torch.cat([w, b[:, None]], 1))
    grads = torch.stack(grads)
    assert factors.num_examples == 12
    torch.testing.assert_close(factors.layers["extra"].eigenvalues, grads.square().mean(0))
    ekfac = li.fit_factors(model, loader, "classification", progress=False)
    assert ekfac.num_examples == 12
    # queries on which the layer never runs: zero gradient there, not a stacking error
    queries = DataLoader(TensorDataset(x[4:6], y[4:6]), batch_size=2)
    both = DataLoader(TensorDataset(x[:6], y[:6]), batch_size=4)
    for q in (queries, both):
        result = li.compute_pairwise_scores(model, ekfac, q, loader, "classification",
                                            progress=False)
        assert torch.isfinite(result.scores).all()


def test_fractional_class_labels_and_unknown_counts_are_refused():
    x, _ = ref.classification_data(8)
    soft = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    loader = DataLoader(TensorDataset(x, soft), batch_size=4)
    with pytest.raises(ValueError, match=r"fractions \(e.g. 0.5\)"):
        li.fit_factors(ref.mlp(), loader, "classification", fisher="empirical", progress=False)
    whole = DataLoader(TensorDataset(x, soft.round()), batch_size=4)
    li.fit_factors(ref.mlp(), whole, "classification", fisher="empirical", progress=False)
    stream = DataLoader(_Stream(TensorDataset(x, soft.round().long())), batch_size=4)
    factors = li.fit_factors(ref.mlp(), stream, "classification", strategy="identity",
                             progress=False)
    with pytest.raises(ValueError, match="normalize=True .* do not know"):
        li.compute_self_scores(ref.mlp(), factors, stream, "classification", normalize=True,
                               progress=False)


def test_string_labels_and_model_errors_name_the_problem():
    x, y = ref.classification_data(8)
    named = DataLoader(list(zip(x, ["a", "b", "c", "a", "b", "c", "a", "b"], strict=True)),
                       batch_size=4)
    with pytest.raises(TypeError, match="labels must be a tensor of class indices, got a "
                                        "tuple of str"):
        li.fit_factors(ref.mlp(), named, "classification", fisher="empirical", progress=False)
    with pytest.raises(RuntimeError) as info:  # the model's own error, plus where
        li.fit_factors(ref.mlp().float(), DataLoader(TensorDataset(x, y), batch_size=4),
                       "classification", progress=False)
    assert "on batch 0" in "".join(getattr(info.value, "__notes__", ["on batch 0"]))


_REPLACER = """
import os, shutil, sys, time
sources, target, stop = sys.argv[1:3], sys.argv[3], sys.argv[4]
i, deadline = 0, time.time() + 60
while not os.path.exists(stop) and time.time() < deadline:
    shutil.copyfile(sources[i % 2], target + ".tmp")
    os.replace(target + ".tmp", target)  # atomic, as Factors.save does it
    i += 1
"""


def test_loading_factors_that_another_process_replaces_never_fails(tmp_path):
    """Every load while another process replaces the file (atomically, in a loop) reads one
    whole version: safe_open read the header and the tensors through two opens by name, and
    some loads (here about 9%) paired one version's metadata with the other's tensors, failed
    their checksum and asked for a refit."""
    import subprocess
    import sys
    import time

    for seed in (0, 1):  # two fits of the same layers with other numbers
        li.fit_factors(ref.mlp(), DataLoader(_data(16, seed=seed), batch_size=4),
                       "classification", progress=False, output_dir=tmp_path / f"v{seed}")
    folder = tmp_path / "live"
    folder.mkdir()
    target = folder / "factors.safetensors"
    sources = [str(tmp_path / f"v{seed}" / "factors.safetensors") for seed in (0, 1)]
    target.write_bytes(Path(sources[0]).read_bytes())
    stop = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", _REPLACER, *sources, str(target), str(stop)])
    try:
        seen, failures, deadline = set(), [], time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                seen.add(float(li.Factors.load(folder).layers["0"].eigenvalues.sum()))
            except li.CorruptFactorsError as err:
                failures.append(str(err))
    finally:
        stop.touch()
        writer.wait(timeout=30)
    assert failures == []
    assert len(seen) == 2  # both versions were read, whole
