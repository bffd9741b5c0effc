"""Pieces the recipes share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


def recipe_loggers(cfg: DictConfig, out: Path) -> list[Any]:
    """A W&B logger writing into ``out`` when ``cfg.wandb.enabled`` (offline by default)."""
    if not cfg.wandb.enabled:
        return []
    from pytorch_lightning.loggers import WandbLogger

    if cfg.wandb.offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    return [WandbLogger(project=cfg.wandb.project, save_dir=str(out), offline=cfg.wandb.offline,
                        config=OmegaConf.to_container(cfg, resolve=True))]
