"""The shipped Hydra configs: they compose into a template-shaped app, instantiate, and match
their targets' signatures."""

from __future__ import annotations

import inspect
from pathlib import Path

import hydra
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class

import lightning_influence
from lightning_influence.callbacks import EigenCorrection, InfluenceScores, InfluenceStatistics

CONF = Path(lightning_influence.__file__).parent / "conf"


@pytest.fixture
def template_app(tmp_path: Path) -> Path:
    """A lightning-hydra-template-shaped app: train.yaml selecting callbacks: default."""
    (tmp_path / "callbacks").mkdir()
    (tmp_path / "train.yaml").write_text(
        "defaults:\n  - callbacks: default\n  - _self_\nseed: 1\n")
    (tmp_path / "callbacks" / "default.yaml").write_text(
        "model_summary:\n  _target_: pytorch_lightning.callbacks.ModelSummary\n  max_depth: 1\n")
    GlobalHydra.instance().clear()
    yield tmp_path
    GlobalHydra.instance().clear()


def _compose(app: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(app), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_plugin_callbacks_merge_into_a_template_app(template_app):
    cfg = _compose(template_app, ["hydra.searchpath=[pkg://lightning_influence.conf]",
                                  "callbacks=[default,influence]",
                                  "callbacks.influence_scores.top_k=20",
                                  "callbacks.influence_statistics.mode=during_training"])
    assert set(cfg.callbacks) == {"model_summary", "influence_statistics", "influence_eigen",
                                  "influence_scores"}
    built = {k: hydra.utils.instantiate(v) for k, v in cfg.callbacks.items()}
    assert isinstance(built["influence_statistics"], InfluenceStatistics)
    assert built["influence_statistics"].mode == "during_training"
    assert isinstance(built["influence_eigen"], EigenCorrection)
    assert isinstance(built["influence_scores"], InfluenceScores)
    assert built["influence_scores"].top_k == 20


def test_plus_callbacks_and_strategy_group_in_an_app_without_callbacks(tmp_path):
    (tmp_path / "train.yaml").write_text("seed: 1\n")
    GlobalHydra.instance().clear()
    try:
        cfg = _compose(tmp_path, ["hydra.searchpath=[pkg://lightning_influence.conf]",
                                  "+callbacks=influence", "+influence_strategy=kfac",
                                  "callbacks.influence_eigen.damping=0.01"])
    finally:
        GlobalHydra.instance().clear()
    eigen = hydra.utils.instantiate(cfg.callbacks.influence_eigen)
    assert eigen.strategy == "kfac" and eigen.damping == 0.01


def test_solver_strategy_group_with_option_overrides(tmp_path):
    (tmp_path / "train.yaml").write_text("seed: 1\n")
    GlobalHydra.instance().clear()
    try:
        cfg = _compose(tmp_path, ["hydra.searchpath=[pkg://lightning_influence.conf]",
                                  "+callbacks=influence", "+influence_strategy=lissa",
                                  "callbacks.influence_eigen.solver_options.iterations=300"])
    finally:
        GlobalHydra.instance().clear()
    eigen = hydra.utils.instantiate(cfg.callbacks.influence_eigen)
    assert eigen.strategy == "lissa"
    assert eigen.solver_options["iterations"] == 300 and eigen.solver_options["scale"] is None


def test_task_target_in_config_builds_a_task(template_app):
    cfg = _compose(template_app, [
        "hydra.searchpath=[pkg://lightning_influence.conf]", "callbacks=[influence]",
        "callbacks.influence_statistics.task={_target_:lightning_influence.RegressionTask}",
    ])
    stats = hydra.utils.instantiate(cfg.callbacks.influence_statistics)
    assert isinstance(stats.task_spec, lightning_influence.RegressionTask)


def _targets(node, path=""):
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from _targets(value, f"{path}.{key}" if path else key)


@pytest.mark.parametrize("yaml_file", sorted(CONF.rglob("*.yaml")), ids=lambda p: p.name)
def test_yaml_keys_match_target_signatures(yaml_file):
    """Config and code cannot drift: every key under a _target_ is a parameter of it."""
    data = yaml.safe_load(yaml_file.read_text()) or {}
    for path, node in _targets(data):
        params = inspect.signature(get_class(node["_target_"])).parameters
        unknown = {k for k in node if not k.startswith("_")} - set(params)
        assert not unknown, f"{yaml_file.name}:{path}: {sorted(unknown)} not in {node['_target_']}"
    if yaml_file.parent.name == "influence_strategy":
        assert set(data) <= set(inspect.signature(EigenCorrection).parameters)


def test_callback_config_covers_every_constructor_argument():
    data = yaml.safe_load((CONF / "callbacks" / "influence.yaml").read_text())
    for key, cls in (("influence_statistics", InfluenceStatistics),
                     ("influence_eigen", EigenCorrection), ("influence_scores", InfluenceScores)):
        params = set(inspect.signature(cls).parameters)
        documented = set(data[key]) - {"_target_"}
        # everything a YAML can express is exposed (loaders and task objects come by override)
        assert params - documented <= {"queries", "task", "layers", "exclude", "include_frozen",
                                       "batch_layout"}, (key,
                                                                                params - documented)
