"""Options in one place: typed option objects, short public signatures, the callbacks' shared
run, and the keywords of earlier versions."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.callbacks import EigenCorrection, InfluenceScores, InfluenceStatistics
from lightning_influence.options import DocumentOptions, FitOptions, ScoreOptions

OPTION_TYPES = (FitOptions, ScoreOptions, DocumentOptions)


def _public_callables():
    """Every function, method and callback a module of the package exports in ``__all__``."""
    seen = set()
    for info in pkgutil.walk_packages(li.__path__, "lightning_influence."):
        if ".conf" in info.name:
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isclass(obj):
                if issubclass(obj, pl.Callback):
                    yield f"{info.name}.{name}", obj.__init__, 12
                    continue
                if dataclasses.is_dataclass(obj) or issubclass(obj, Exception):
                    continue  # data containers: their fields are not parameters of a call
                for meth_name, meth in vars(obj).items():
                    if inspect.isfunction(meth) and (not meth_name.startswith("_")
                                                     or meth_name == "__init__"):
                        yield f"{info.name}.{name}.{meth_name}", meth, 8
            elif inspect.isfunction(obj):
                yield f"{info.name}.{name}", obj, 8


def _count(func) -> int:
    params = list(inspect.signature(func).parameters)
    return len(params) - (1 if params and params[0] in ("self", "cls") else 0)


def test_no_public_function_takes_more_than_8_parameters_nor_a_callback_more_than_12():
    too_long = [(name, _count(func), limit) for name, func, limit in _public_callables()
                if _count(func) > limit]
    assert not too_long, too_long


def test_every_option_is_defined_once():
    """A callback parameter that shares its name with an option field is a shortcut: default
    None (keep the option's value), never a second default."""
    fields = {f.name for cls in OPTION_TYPES for f in dataclasses.fields(cls)}
    for cls in (li.callbacks.InfluenceStatistics, li.callbacks.EigenCorrection,
                li.callbacks.InfluenceScores, li.callbacks.DocumentInfluence):
        for name, param in inspect.signature(cls).parameters.items():
            if name in fields:
                assert param.default is None, (cls.__name__, name, param.default)


def test_keywords_override_options_in_the_functions():
    options = FitOptions(strategy="kfac", damping=1e-3)
    assert li.options.resolve_options(FitOptions, options, {"fisher": "exact"}, "x") == \
        FitOptions(strategy="kfac", damping=1e-3, fisher="exact")
    model = nn.Sequential(nn.Linear(4, 3))
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(2)]
    by_keyword = li.fit_factors(model, data, "classification", strategy="kfac", damping=1e-3,
                                progress=False)
    by_object = li.fit_factors(model, data, "classification", FitOptions(
        strategy="kfac", damping=1e-3, progress=False))
    assert by_keyword.strategy == by_object.strategy == "kfac"
    for name in by_object.layers:
        torch.testing.assert_close(by_keyword.layers[name].eigenvalues,
                                   by_object.layers[name].eigenvalues)
    with pytest.raises(TypeError, match="unknown option 'fishr'. Did you mean 'fisher'"):
        li.fit_factors(model, data, "classification", fishr="exact")
    with pytest.raises(TypeError, match="unknown option 'topk'. Did you mean 'top_k'"):
        li.compute_self_scores(model, by_object, data, "classification", topk=3)


def test_bad_option_values_are_refused_when_the_options_are_made():
    with pytest.raises(ValueError, match="fisher='sampeld'"):
        FitOptions(fisher="sampeld")
    with pytest.raises(ValueError, match="Unknown strategy .ekfca."):
        FitOptions(strategy="ekfca")
    with pytest.raises(ValueError, match="damping must be >= 0"):
        FitOptions(damping=-1.0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        ScoreOptions(top_k=0)
    with pytest.raises(ValueError, match="precision='bf32'"):
        ScoreOptions(precision="bf32")
    assert FitOptions(damping=None).damping == "heuristic"
    assert "fisher = 'sampled'" in FitOptions.help()


def test_callback_keywords_of_earlier_versions_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"fit=FitOptions\(fisher=...\)"):
        stats = InfluenceStatistics(fisher="exact", seed=3)
    assert stats.fit.fisher == "exact" and stats.fit.seed == 3
    with pytest.warns(DeprecationWarning):
        scores = InfluenceScores(keep_scores=True, precision=None)
    assert scores.score.keep_scores and scores.score.precision is None
    assert scores.score.per_layer  # the callback's own default is kept
    with pytest.warns(DeprecationWarning):
        eigen = EigenCorrection(strategy="kfac", row_dtype="bfloat16", damping_factor=0.3)
    assert (eigen.fit.strategy, eigen.fit.row_dtype, eigen.fit.damping_factor) == \
        ("kfac", "bfloat16", 0.3)
    with pytest.raises(TypeError, match="unknown option 'fishr'.*fit=FitOptions"):
        InfluenceStatistics(fishr="exact")


def test_a_shortcut_and_its_option_must_agree():
    assert EigenCorrection(strategy="kfac", fit=FitOptions(strategy="kfac")).strategy == "kfac"
    with pytest.raises(ValueError, match=r"strategy='kfac'.*fit.strategy='diagonal'"):
        EigenCorrection(strategy="kfac", fit=FitOptions(strategy="diagonal"))


class _Tiny(pl.LightningModule):
    influence_task = "classification"

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks) -> _Tiny:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))
    model = _Tiny()
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=callbacks,
               default_root_dir=str(tmp_path), enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        model, DataLoader(data, batch_size=8))
    return model


def test_the_callbacks_share_one_run_with_merged_fit_options(tmp_path):
    stats = InfluenceStatistics(fit=FitOptions(fisher="exact", progress=False))
    eigen = EigenCorrection(strategy="kfac", fit=FitOptions(seed=5, progress=False))
    g = torch.Generator().manual_seed(1)
    queries = DataLoader(TensorDataset(torch.randn(2, 6, generator=g), torch.tensor([0, 1])),
                         batch_size=2)
    scores = InfluenceScores(queries, top_k=2, score=ScoreOptions(progress=False))
    _fit(tmp_path, [stats, eigen, scores])
    run = stats.influence_run
    assert run is eigen.influence_run is scores.influence_run
    assert run.statistics is stats and run.eigen is eigen and run.consumers == [scores]
    merged = run.fit_options()
    assert (merged.fisher, merged.seed, merged.strategy) == ("exact", 5, "kfac")
    assert eigen.factors.extra["fisher"] == "exact" and run.factors is eigen.factors


def test_disagreeing_fit_options_are_refused_before_training(tmp_path):
    stats = InfluenceStatistics(fit=FitOptions(fisher="exact", progress=False))
    eigen = EigenCorrection(fit=FitOptions(fisher="empirical", progress=False))
    model = _Tiny()
    with pytest.raises(ValueError, match=r"disagree on the fit option 'fisher'"):
        _fit(tmp_path, [stats, eigen])
    assert model.steps == 0


@pytest.mark.parametrize(("callbacks", "message"), [
    (lambda: [EigenCorrection(strategy="ekfac")], "needs an InfluenceStatistics callback"),
    (lambda: [InfluenceStatistics(), InfluenceScores()], "needs an EigenCorrection callback"),
])
def test_presence_rules_are_checked_before_training(tmp_path, callbacks, message):
    steps = []

    class Counting(_Tiny):
        def training_step(self, batch, batch_idx):
            steps.append(batch_idx)
            return super().training_step(batch, batch_idx)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=callbacks(),
                         default_root_dir=str(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises((RuntimeError, ValueError), match=message):
        trainer.fit(Counting(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert steps == []  # refused before the first training step
