"""Silent wrong answers and lost work refused at the root (issue: no silent wrong answer).

Each test fails on the code before the fix: resumed runs wrote into the original run's folder,
subset / weighted / custom-order loaders were scored as if ordered, a zero-curvature layer gave
NaN scores, all-ignored queries gave arbitrary top-k lists, an unwritable folder was found only
after both passes, files came out 0600, and text cells were written as spreadsheet formulas.
"""

from __future__ import annotations

import csv
import os
import stat
import warnings

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


def test_no_warning_for_ordinary_queries():
    ds = _data()
    model = ref.mlp()
    loader = DataLoader(ds, batch_size=4)
    factors = li.fit_factors(model, loader, "classification", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        li.compute_pairwise_scores(model, factors, loader, loader, "classification",
                                   progress=False)
