"""The shipped Hydra configs: they compose into a template-shaped app, instantiate, and match
their targets' signatures."""

from __future__ import annotations

import dataclasses
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
    targets = {"influence_strategy": EigenCorrection, "influence_layers": InfluenceStatistics}
    if yaml_file.parent.name in targets:
        assert set(data) <= set(inspect.signature(targets[yaml_file.parent.name]).parameters)
        if "fit" in data:
            assert set(data["fit"]) <= {f.name for f in dataclasses.fields(
                lightning_influence.FitOptions)}


def test_callback_schemas_are_the_constructor_signatures():
    """Each callback's structured config has exactly its constructor's parameters (its
    ``**legacy`` keywords aside), with their defaults; option objects are typed nested nodes."""
    from omegaconf import OmegaConf

    from lightning_influence.configs import SCHEMAS
    from lightning_influence.options import DocumentOptions

    for name, cls in (("statistics", InfluenceStatistics), ("eigen", EigenCorrection),
                      ("scores", InfluenceScores)):
        params = {k: p for k, p in inspect.signature(cls).parameters.items()
                  if p.kind is not p.VAR_KEYWORD}
        node = OmegaConf.structured(SCHEMAS[name])
        assert set(node) - {"_target_"} == set(params), name
        for key, param in params.items():
            default = param.default
            if isinstance(default, lightning_influence.FitOptions | lightning_influence.ScoreOptions
                          | DocumentOptions):
                assert OmegaConf.get_type(node, key) is type(default)
                assert OmegaConf.to_object(node[key]) == default
            elif default is not inspect.Parameter.empty and default is not None:
                assert node[key] == default, (name, key)


def _every_shipped_config():
    for app in ("digits", "lm", "finetune"):
        yield app, []
    for preset in sorted((CONF / "influence_strategy").glob("*.yaml")):
        yield "digits", [f"+influence_strategy={preset.stem}"]
    for preset in sorted((CONF / "influence_layers").glob("*.yaml")):
        yield "lm", [f"+influence_layers={preset.stem}"]


@pytest.mark.parametrize(("app", "overrides"), list(_every_shipped_config()),
                         ids=lambda v: v if isinstance(v, str) else ",".join(v) or "-")
def test_every_shipped_config_composes_and_instantiates(app, overrides):
    """The YAML files are checked against the option types by composing them (every key and
    value is validated against the structured configs) and building every callback."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name=app, overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    built = [hydra.utils.instantiate(node) for node in cfg.callbacks.values() if node is not None]
    assert built and all(type(cb).__module__.startswith("lightning_influence.callbacks")
                         for cb in built)


@pytest.mark.parametrize(("override", "names"), [
    ("callbacks.influence_eigen.fit.fishr=exact", "fishr"),
    ("callbacks.influence_scores.score.top_kk=3", "top_kk"),
    ("callbacks.influence_statistics.every_n_step=5", "every_n_step"),
    ("callbacks.influence_scores.top_k=many", "top_k"),
    ("callbacks.influence_eigen.fit.seed=abc", "seed"),
])
def test_misspelled_or_mistyped_overrides_fail_with_hydras_message(template_app, override, names):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        _compose(template_app, ["hydra.searchpath=[pkg://lightning_influence.conf]",
                                "callbacks=[default,influence]", override])
    assert names in str(info.value) + str(info.value.__cause__)


def test_a_key_forced_in_with_plus_is_refused_when_the_callback_is_built(template_app):
    """``+key=value`` bypasses Hydra's struct check; the option type still refuses the key,
    naming it and the closest field."""
    cfg = _compose(template_app, ["hydra.searchpath=[pkg://lightning_influence.conf]",
                                  "callbacks=[default,influence]",
                                  "+callbacks.influence_eigen.fit.fishr=exact"])
    with pytest.raises(Exception, match="fishr.*Did you mean 'fisher'"):
        hydra.utils.instantiate(cfg.callbacks.influence_eigen)


def test_option_overrides_reach_the_callbacks(template_app):
    cfg = _compose(template_app, ["hydra.searchpath=[pkg://lightning_influence.conf]",
                                  "callbacks=[default,influence]",
                                  "callbacks.influence_eigen.fit.fisher=exact",
                                  "callbacks.influence_eigen.fit.row_dtype=bfloat16",
                                  "callbacks.influence_scores.score.keep_scores=true",
                                  "callbacks.influence_statistics.layers=[fc1]"])
    built = {k: hydra.utils.instantiate(v) for k, v in cfg.callbacks.items()}
    assert built["influence_eigen"].fit.fisher == "exact"
    assert built["influence_eigen"].fit.row_dtype == "bfloat16"
    assert built["influence_scores"].score.keep_scores is True
    assert built["influence_scores"].score.per_layer is True  # the callback's own default kept
    assert built["influence_statistics"].fit.layers == ["fc1"]


def test_layer_presets_select_the_layers_of_a_hugging_face_model(template_app):
    """``+influence_layers=mlp`` sets the statistics callback's layer preset; the callbacks'
    shared run then tracks the MLP projections only (a tiny random-init Llama)."""
    transformers = pytest.importorskip("transformers")
    from lightning_influence.callbacks.run import InfluenceRun
    from lightning_influence.tracking import LAYER_PRESETS

    shipped = {p.stem for p in (CONF / "influence_layers").glob("*.yaml")}
    assert shipped == set(LAYER_PRESETS)
    cfg = _compose(template_app, ["hydra.searchpath=[pkg://lightning_influence.conf]",
                                  "callbacks=[default,influence]", "+influence_layers=mlp",
                                  "callbacks.influence_statistics.task=causal_lm"])
    built = {k: hydra.utils.instantiate(v) for k, v in cfg.callbacks.items()}
    assert built["influence_statistics"].fit.layer_preset == "mlp"
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4))
    run = InfluenceRun()
    run.statistics, run.eigen = built["influence_statistics"], built["influence_eigen"]
    run.bind(model)
    assert run.tracker.names() == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2)
                                   for p in ("gate", "up", "down")]
