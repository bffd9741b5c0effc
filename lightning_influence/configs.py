"""Hydra structured configs of the callbacks, built from their signatures and the option types.

Nothing here restates an option: each callback's config schema is made from its constructor
(every parameter, with its default) and the option dataclasses of
:mod:`lightning_influence.options` (nested, typed). The schemas are registered in Hydra's
``ConfigStore`` under the group ``lightning_influence`` when the package is imported, and the
shipped YAML files (``conf/callbacks/influence.yaml``, ...) extend them through their defaults
lists, so every key of the YAML files and of command-line overrides is checked against these
types: ``callbacks.influence_eigen.fit.fishr=exact`` fails with Hydra's own message ("Key
'fishr' not in 'FitOptions'"), and so does a value of the wrong type.

Registered names (group ``lightning_influence``): ``statistics``, ``eigen``, ``scores``,
``documents``, ``validation``, ``index``; and ``fit_options``, ``score_options``.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

__all__ = ["callback_schema", "register_configs", "SCHEMAS"]

GROUP = "lightning_influence"


def _omegaconf_type(annotation: Any) -> Any:
    """``annotation`` when OmegaConf can validate values against it, else ``Any``."""
    if annotation is inspect.Parameter.empty:
        return Any
    probe = dataclasses.make_dataclass("Probe", [("value", annotation, dataclasses.field(
        default=None))])
    try:
        OmegaConf.structured(probe)
    except Exception:  # noqa: BLE001 - OmegaConf's several error types: not representable
        return Any
    return annotation


def callback_schema(cls: type, target: str | None = None) -> type:
    """A dataclass with ``_target_`` and one field per constructor parameter of ``cls``: typed
    as annotated where OmegaConf can check the type (else ``Any``), with the constructor's
    default; a parameter whose default is an options dataclass instance becomes a nested,
    typed node with that instance's values."""
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", str, dataclasses.field(default=target or f"{cls.__module__}.{cls.__name__}"))]
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = param.default
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            fields.append((name, type(default), dataclasses.field(
                default_factory=_copier(default))))
            continue
        kind = _omegaconf_type(hints.get(name, param.annotation))
        if isinstance(default, tuple | list):
            fields.append((name, kind, dataclasses.field(default_factory=_copier(list(default)))))
        else:
            fields.append((name, kind, dataclasses.field(
                default=None if default is inspect.Parameter.empty else default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def _copier(value: Any) -> Callable[[], Any]:
    return lambda: dataclasses.replace(value) if dataclasses.is_dataclass(value) else \
        type(value)(value)


def _schemas() -> dict[str, type]:
    from lightning_influence.callbacks import (
        DocumentInfluence,
        EigenCorrection,
        InfluenceIndex,
        InfluenceScores,
        InfluenceStatistics,
        InfluenceValidation,
    )
    return {"statistics": InfluenceStatistics, "eigen": EigenCorrection,
            "scores": InfluenceScores, "documents": DocumentInfluence,
            "validation": InfluenceValidation, "index": InfluenceIndex}


SCHEMAS: dict[str, type] = {}


def register_configs() -> None:
    """Register every callback's schema and the option types in Hydra's ConfigStore (once)."""
    if SCHEMAS:
        return
    from hydra.core.config_store import ConfigStore

    from lightning_influence.options import FitOptions, ScoreOptions

    store = ConfigStore.instance()
    for name, cls in _schemas().items():
        SCHEMAS[name] = callback_schema(cls, f"lightning_influence.callbacks.{cls.__name__}")
        store.store(group=GROUP, name=name, node=SCHEMAS[name])
    store.store(group=GROUP, name="fit_options", node=FitOptions)
    store.store(group=GROUP, name="score_options", node=ScoreOptions)
