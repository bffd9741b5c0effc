"""Recipe: find flipped labels in scikit-learn's digits with EK-FAC self-influence.

An MLP LightningModule is trained on the 8x8 digits with 10% of the training labels flipped to
another class (seeded). The three lightning-influence callbacks, attached through the Hydra config
(``callbacks: influence``), fit EK-FAC when training ends, log the top proponents and opponents of a
few test digits and flag the training examples with the largest self-influence. The recipe then
prints how many flipped labels the flags find, beside the baseline a user would try first
(ranking by training loss), and logs both to W&B (offline by default).

Then it closes the loop: it drops the flagged training examples, retrains the same model from
the same seed on what is left, and reports the test accuracy beside the same budget of drops
chosen by the loss baseline and at random, and no drop at all (a table and a plot in W&B).

    python -m recipes.digits_debugging
    python -m recipes.digits_debugging trainer.max_epochs=50 +influence_strategy=kfac
    python -m recipes.digits_debugging -m seed=0,1,2,3,4      # several seeds (Hydra multirun)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence
from lightning_influence.io import atomic_save_json
from lightning_influence.ranking import detection_report
from recipes._common import recipe_loggers, start_run

log = logging.getLogger(__name__)
CONF_DIR = str(Path(lightning_influence.__file__).parent / "conf")


class DigitsData(pl.LightningDataModule):
    """Digits split into train/test, with a seeded fraction of training labels flipped.

    ``flipped`` is a boolean mask over the training set (loader order) marking corrupted labels.
    """

    def __init__(self, noise_fraction: float = 0.1, test_fraction: float = 0.2,
                 batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32)  # [1797, 64] in [0, 1]
        y = torch.tensor(y, dtype=torch.long)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)
        n_test = int(round(test_fraction * len(x)))
        test, train = perm[:n_test], perm[n_test:]
        self.clean_labels = y[train].clone()
        labels = y[train].clone()
        n_flip = int(round(noise_fraction * len(train)))
        flip = torch.randperm(len(train), generator=g)[:n_flip]
        labels[flip] = (labels[flip] + torch.randint(1, 10, (n_flip,), generator=g)) % 10
        self.flipped = torch.zeros(len(train), dtype=torch.bool)
        self.flipped[flip] = True
        self.train_set = TensorDataset(x[train], labels)
        self.test_set = TensorDataset(x[test], y[test])
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class DigitsMLP(pl.LightningModule):
    """64 -> hidden -> hidden -> 10 ReLU MLP trained with AdamW and cross-entropy."""

    def __init__(self, hidden: int = 128, lr: float = 1e-3, weight_decay: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [N, 10] logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                 weight_decay=self.hparams.weight_decay)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train with the influence callbacks, then evaluate the flags. Returns the figures."""
    out = start_run(cfg)  # threads: 1 in the config; a tiny MLP gains nothing from more
    data = DigitsData(cfg.data.noise_fraction, cfg.data.test_fraction, cfg.data.batch_size,
                      cfg.seed)
    model = DigitsMLP(cfg.model.hidden, cfg.model.lr, cfg.model.weight_decay)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    loggers = recipe_loggers(cfg, out)
    trainer = pl.Trainer(**cfg.trainer, default_root_dir=str(out), callbacks=callbacks,
                         logger=loggers or False)
    trainer.fit(model, datamodule=data)

    scores_cb = next(c for c in callbacks if isinstance(c, lightning_influence.InfluenceScores))
    result = scores_cb.self_result
    influence = detection_report(result.scores, data.flipped)
    baseline = detection_report(result.losses, data.flipped)
    figures = {"flipped": int(data.flipped.sum()), "train_size": len(data.flipped),
               "influence": influence, "loss_baseline": baseline,
               "strategy": next(c for c in callbacks
                                if isinstance(c, lightning_influence.EigenCorrection)).strategy,
               "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan")))}
    if cfg.retrain.enabled:
        figures["retraining"] = retrain_without(cfg, data, {
            "influence flags": result.scores, "loss baseline": result.losses,
            "random": torch.rand(len(data.flipped), generator=torch.Generator().manual_seed(
                cfg.seed + 1))}, trainer.callback_metrics.get("val/acc"))
    atomic_save_json(figures, out / "detection.json")
    _print_report(figures, scores_cb, data)
    for logger in loggers:
        import wandb

        table = wandb.Table(columns=["ranking", "found_top_10pct", "found_top_20pct", "auroc"])
        for name, rep in (("self-influence", influence), ("training loss", baseline)):
            table.add_data(name, rep["found_top_10pct"], rep["found_top_20pct"], rep["auroc"])
        logger.experiment.log({"influence/detection": table})
        for name, rep in (("influence", influence), ("loss_baseline", baseline)):
            for key, value in rep.items():
                logger.experiment.summary[f"detection/{name}/{key}"] = value
        if "retraining" in figures:
            rows = [[r["dropped_by"], r["dropped"], r["flipped_dropped"], r["test_acc"]]
                    for r in figures["retraining"]]
            table = wandb.Table(columns=["dropped_by", "dropped", "flipped_dropped", "test_acc"],
                                data=rows)
            logger.experiment.log({
                "influence/retraining": table,
                "influence/retraining_accuracy": wandb.plot.bar(
                    table, "dropped_by", "test_acc",
                    title="Test accuracy after dropping the flagged examples and retraining"),
            })
        logger.experiment.finish()
    return figures


def retrain_without(cfg: DictConfig, data: DigitsData, rankings: dict[str, torch.Tensor],
                    accuracy_before: Any = None) -> list[dict[str, Any]]:
    """Drop the top ``flag_fraction`` of the training set under each ranking (largest first),
    retrain the model from the same seed on the rest, and measure the test accuracy."""
    budget = int(round(cfg.callbacks.influence_scores.flag_fraction * len(data.flipped)))
    rows = [{"dropped_by": "nothing (the model above)", "dropped": 0, "flipped_dropped": 0,
             "test_acc": float(accuracy_before) if accuracy_before is not None else float("nan")}]
    for name, scores in rankings.items():
        drop = scores.double().topk(budget).indices
        keep = torch.ones(len(data.flipped), dtype=torch.bool)
        keep[drop] = False
        pl.seed_everything(cfg.seed, workers=True)
        model = DigitsMLP(cfg.model.hidden, cfg.model.lr, cfg.model.weight_decay)
        x, y = data.train_set.tensors
        loader = DataLoader(TensorDataset(x[keep], y[keep]), batch_size=cfg.data.batch_size,
                            shuffle=True)
        trainer = pl.Trainer(**{**cfg.trainer, "enable_progress_bar": False,
                                 "enable_checkpointing": False}, logger=False, callbacks=[])
        trainer.fit(model, loader, data.val_dataloader())
        rows.append({"dropped_by": name, "dropped": budget,
                     "flipped_dropped": int(data.flipped[drop].sum()),
                     "test_acc": float(trainer.callback_metrics["val/acc"])})
    return rows


def _print_report(figures: dict[str, Any], scores_cb: Any, data: DigitsData) -> None:
    inf, base = figures["influence"], figures["loss_baseline"]
    lines = [
        "",
        f"Flipped labels: {figures['flipped']} of {figures['train_size']} training digits "
        f"(test accuracy {figures['val_acc']:.3f}).",
        f"{'ranking':<28}{'found in top 10%':>18}{'found in top 20%':>18}{'AUROC':>8}",
        f"{figures['strategy'] + ' self-influence':<28}{inf['found_top_10pct']:>18.1%}"
        f"{inf['found_top_20pct']:>18.1%}{inf['auroc']:>8.3f}",
        f"{'training loss (baseline)':<28}{base['found_top_10pct']:>18.1%}"
        f"{base['found_top_20pct']:>18.1%}{base['auroc']:>8.3f}",
        "",
        "Top proponents (+, helpful) and opponents (-, harmful) of the first test digits:",
    ]
    pw = scores_cb.pairwise_result
    if pw is not None:
        test_labels = data.test_set.tensors[1]
        train_labels = data.train_set.tensors[1]
        for q in range(pw.top.proponent_indices.shape[0]):
            pro = ", ".join(f"#{int(i)}({int(train_labels[i])}{'*' if data.flipped[i] else ''})"
                            for i in pw.top.proponent_indices[q, :4])
            opp = ", ".join(f"#{int(i)}({int(train_labels[i])}{'*' if data.flipped[i] else ''})"
                            for i in pw.top.opponent_indices[q, :4])
            lines.append(f"  test digit {q} (label {int(test_labels[q])}): + {pro} | - {opp}")
        lines.append("  (#index(label); * = a flipped label)")
    if "retraining" in figures:
        lines += ["", "Retrained from the same seed after dropping the top "
                  f"{figures['retraining'][1]['dropped']} training digits of each ranking:",
                  f"{'dropped by':<28}{'flipped among them':>20}{'test accuracy':>16}"]
        for row in figures["retraining"]:
            lines.append(f"{row['dropped_by']:<28}{row['flipped_dropped']:>20}"
                         f"{row['test_acc']:>16.1%}")
    lines.append(f"Files: {scores_cb.files.get('summary', '')}")
    print("\n".join(lines))  # noqa: T201 - the recipe's report is its output


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="digits")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
