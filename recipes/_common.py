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


def start_run(cfg: DictConfig) -> Path:
    """Seed everything, set torch's CPU threads (``cfg.threads``; null keeps torch's default)
    and create the output folder; returns it."""
    import pytorch_lightning as pl
    import torch

    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out

