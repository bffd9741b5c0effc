"""The three callbacks in a real Trainer: W&B offline files, both covariance modes, reuse,
checkpoint and resume."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_influence as li
from lightning_influence.callbacks import EigenCorrection, InfluenceScores, InfluenceStatistics


class TinyClassifier(pl.LightningModule):
    influence_task = "classification"

    def __init__(self, d_in: int = 16, hidden: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=1e-3)


def _data(n: int = 96, d: int = 16, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes].argmax(1) + (torch.rand(n, generator=g) < 0.1).long()) % classes
    return TensorDataset(x, y)


def _trainer(tmp_path: Path, callbacks, logger=False, epochs: int = 3, **kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger,
                      callbacks=callbacks, default_root_dir=str(tmp_path),
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, **kw)


def _loaders(batch_size: int = 16):
    train, val = _data(96, seed=0), _data(20, seed=1)
    return (DataLoader(train, batch_size=batch_size, shuffle=True),
            DataLoader(val, batch_size=batch_size))


def _callbacks(mode: str = "after_fit", **score_kw):
    return [InfluenceStatistics(mode=mode, every_n_steps=2, progress=False),
            EigenCorrection(progress=False),
            InfluenceScores(num_queries=4, top_k=3, keep_scores=True, progress=False,
                            **score_kw)]


def test_after_fit_matches_the_functional_api_and_writes_files(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    callbacks = _callbacks()
    train, val = _loaders()
    _trainer(tmp_path, callbacks).fit(model, train, val)

    scores_cb = callbacks[2]
    folder = tmp_path / "influence"
    for name in ("factors.safetensors", "factors.json", "scores.safetensors",
                 "top_influential.csv", "self_influence_flags.csv", "summary.json",
                 "layer_influence.csv"):
        assert (folder / name).is_file(), name
    # The callbacks own no math: the same numbers come from the functional API.
    ordered = DataLoader(train.dataset, batch_size=16)
    queries = DataLoader(torch.utils.data.Subset(val.dataset, range(4)), batch_size=16)
    factors = li.fit_factors(model, ordered, "classification", progress=False)
    expected = li.compute_pairwise_scores(model, factors, queries, ordered, progress=False)
    # the callback computes both scores in one pass, contracting in the Kronecker eigenbasis
    # (<R_q, G'_n> = <P_q, G_n>): the float32 pairwise scores agree to float32 rounding of the
    # largest score (against float64 arithmetic: 3e-7 of it, the separate pass 6e-7)
    top = expected.scores.abs().max().item()
    torch.testing.assert_close(scores_cb.pairwise_result.scores, expected.scores, rtol=0,
                               atol=2e-6 * top)
    self_expected = li.compute_self_scores(model, factors, ordered, progress=False)
    torch.testing.assert_close(scores_cb.self_result.scores, self_expected.scores)
    rows = (folder / "self_influence_flags.csv").read_text().splitlines()
    assert len(rows) == 1 + round(0.1 * 96)


def test_wandb_offline_run_holds_tables_and_flags(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    logger = WandbLogger(project="li-test", save_dir=str(tmp_path), offline=True)
    callbacks = _callbacks()
    train, val = _loaders()
    _trainer(tmp_path, callbacks, logger=logger).fit(model, train, val)
    run = logger.experiment
    run_dir = Path(run.dir).parent
    summary_keys = set(run.summary.keys())
    top_path = run.summary["influence/top_influential"]["path"]
    run.finish()

    assert {"influence/self_influence_histogram", "influence/pairwise_score_histogram",
            "influence/self_influence_flags", "influence/top_influential"} <= summary_keys
    assert (run_dir / "files" / top_path).is_file()
    assert list(run_dir.glob("run-*.wandb")), "the offline run log is missing"
    names = sorted(p.relative_to(run_dir).as_posix() for p in
                   run_dir.glob("files/media/table/**/*.table.json"))
    assert any("top_influential" in n for n in names), names
    assert any("self_influence_flags" in n for n in names), names
    top = json.loads(next(run_dir.glob("files/media/table/**/top_influential*.table.json"))
                     .read_text())
    assert "score (+ = proponent/helpful, - = opponent)" in top["columns"]
    assert len(top["data"]) == 4 * 2 * 3  # queries x {proponent, opponent} x top_k
    flags = json.loads(next(run_dir.glob("files/media/table/**/self_influence_flags*.table.json"))
                       .read_text())
    flagged = [row[1] for row in flags["data"]]
    expected = callbacks[2].self_result.scores.topk(len(flagged)).indices.tolist()
    assert flagged == expected
    assert "influence/layer_influence_table" in summary_keys  # the layer chart's data

    # The example images: staged inside the run folder (one folder for `wandb sync`), and with
    # their pixels on the 0-255 scale (0-1 floats cast straight to 8 bits came out black).
    pngs = [p for p in run_dir.rglob("*") if p.is_file()
            and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"]
    assert len(pngs) >= 4 * 2 * 3, len(pngs)
    elsewhere = [p for p in Path(os.environ["WANDB_DATA_DIR"]).rglob("*.png")]
    assert not elsewhere, elsewhere
    from PIL import Image
    for path in pngs:
        pixels = np.asarray(Image.open(path).convert("L"))
        assert pixels.max() == 255 and pixels.min() == 0, (path, pixels.min(), pixels.max())


def test_layer_influence_is_written_whatever_keep_scores_says(tmp_path):
    torch.manual_seed(0)
    callbacks = [InfluenceStatistics(progress=False), EigenCorrection(progress=False),
                 InfluenceScores(num_queries=4, top_k=3, keep_scores=False, progress=False)]
    train, val = _loaders()
    _trainer(tmp_path, callbacks).fit(TinyClassifier(), train, val)
    rows = list(csv.DictReader((tmp_path / "influence" / "layer_influence.csv").open()))
    assert [r["layer"] for r in rows] == ["net.0", "net.2"]
    assert {r["source"] for r in rows} == {"top-k pairwise scores"}
    assert abs(sum(float(r["mean_abs_share"]) for r in rows) - 1) < 1e-9


def test_during_training_mode_accumulates_every_n_steps(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    callbacks = _callbacks(mode="during_training")
    train, val = _loaders()
    _trainer(tmp_path, callbacks, epochs=2).fit(model, train, val)
    stats = callbacks[0]
    # 2 epochs x 6 batches = 12 steps; updates at global steps 0, 2, ..., 10 -> 6.
    assert stats.updates == 6
    covs = stats.covariances
    assert all(float(c.compute()["examples"]) == 6 * 16 for c in covs.values())
    assert callbacks[1].factors.strategy == "ekfac"
    assert callbacks[2].self_result.scores.shape == (96,)


def test_factor_files_are_reused_not_recomputed(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    train, val = _loaders()
    first = _callbacks()
    _trainer(tmp_path, first).fit(model, train, val)
    path = tmp_path / "influence" / "factors.safetensors"
    stamp = path.stat().st_mtime_ns

    second = _callbacks()
    trainer = _trainer(tmp_path, second, epochs=0)  # same weights: nothing to train
    trainer.fit(model, train, val)
    assert path.stat().st_mtime_ns == stamp
    assert not second[0].finished  # the covariance pass never ran
    torch.testing.assert_close(second[2].self_result.scores, first[2].self_result.scores)


def test_factors_of_changed_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    train, val = _loaders()
    _trainer(tmp_path, _callbacks()).fit(model, train, val)
    with pytest.raises(li.FactorMismatchError, match="different weights"):
        _trainer(tmp_path, _callbacks(), epochs=1).fit(TinyClassifier(), train, val)


def test_state_survives_checkpoint_and_resume(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    train, val = _loaders()
    stats = InfluenceStatistics(mode="during_training", every_n_steps=1, progress=False)
    trainer = _trainer(tmp_path, [stats], epochs=1)
    trainer.fit(model, train, val)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    before = {n: c.compute()["A"].clone() for n, c in stats.covariances.items()}

    resumed = InfluenceStatistics(mode="during_training", every_n_steps=1, progress=False)
    trainer2 = _trainer(tmp_path, [resumed], epochs=1)
    trainer2.fit(TinyClassifier(), train, val, ckpt_path=str(ckpt))  # epoch 1 already done
    assert resumed.updates == stats.updates == 6
    for name, value in before.items():
        torch.testing.assert_close(resumed.covariances[name].compute()["A"], value)


def test_bad_callback_arguments_name_the_problem():
    with pytest.raises(ValueError, match="mode='sometimes'"):
        InfluenceStatistics(mode="sometimes")
    with pytest.raises(ValueError, match="strategy='fancy'"):
        EigenCorrection(strategy="fancy")
    with pytest.raises(ValueError, match="top_k"):
        InfluenceScores(top_k=0)


def test_empty_training_data_is_a_clear_error(tmp_path):
    model = TinyClassifier()
    empty = DataLoader(TensorDataset(torch.randn(0, 16), torch.zeros(0, dtype=torch.long)),
                       batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        li.fit_factors(model, empty, "classification", progress=False)


def test_during_training_updates_once_per_step_with_gradient_accumulation(tmp_path):
    torch.manual_seed(0)
    stats = InfluenceStatistics(mode="during_training", every_n_steps=2, progress=False)
    train, val = _loaders()
    _trainer(tmp_path, [stats], epochs=2, accumulate_grad_batches=2).fit(TinyClassifier(),
                                                                          train, val)
    # 12 micro-batches, 6 optimizer steps (global_step 0..5 when each micro-batch starts); one
    # update on the first micro-batch of steps 0, 2 and 4
    assert stats.updates == 3
    assert all(float(c.compute()["examples"]) == 3 * 16 for c in stats.covariances.values())


class SkipsNonFinite(TinyClassifier):
    def training_step(self, batch, batch_idx):  # the module's own choice: skip the batch
        if not torch.isfinite(batch[0]).all():
            return None
        return super().training_step(batch, batch_idx)


def test_during_training_follows_a_training_step_that_skips_a_batch(tmp_path):
    """A training step that returns None (a NaN batch skipped) stopped training: the
    covariance update then ran on that batch and refused its non-finite loss."""
    import warnings

    x, y = _data(96, seed=0).tensors
    x = x.clone()
    x[40, 3] = float("nan")  # batch 2 of 6, in each epoch
    train = DataLoader(TensorDataset(x, y), batch_size=16)
    stats = InfluenceStatistics(mode="during_training", every_n_steps=1, progress=False)
    trainer = _trainer(tmp_path, [stats], epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(SkipsNonFinite(), train)
    skipped = [w for w in caught if "returned None" in str(w.message)]
    assert len(skipped) == 1  # warned once
    assert "skips its covariance update too" in str(skipped[0].message)
    assert trainer.current_epoch == 2  # trained to the end
    assert stats.skipped_updates == 2 and stats.updates == 10
    for stat in stats.covariances.values():
        got = stat.compute()
        assert float(got["examples"]) == 10 * 16
        assert torch.isfinite(got["A"]).all() and torch.isfinite(got["S"]).all()


class DropoutClassifier(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3))


class InnerCallClassifier(TinyClassifier):
    def training_step(self, batch, batch_idx):  # calls the inner net, not the LightningModule
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])


class FrozenOptimizer(TinyClassifier):
    def configure_optimizers(self):  # lr 0: every update sees the same weights in both paths
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit_stats(tmp_path, module, reuse, epochs=2, every=2):
    torch.manual_seed(0)
    model = module()
    stats = InfluenceStatistics(mode="during_training", every_n_steps=every, progress=False,
                                reuse_forward=reuse)
    train = DataLoader(_data(96, seed=0), batch_size=16, shuffle=False)
    _trainer(tmp_path, [stats], epochs=epochs).fit(model, train)
    return stats, model


def test_reused_training_forward_gives_the_separate_pass_covariances(tmp_path):
    reused, _ = _fit_stats(tmp_path, FrozenOptimizer, reuse=True)
    separate, _ = _fit_stats(tmp_path, FrozenOptimizer, reuse=False)
    assert reused.reuse_verified is True and reused.fallback_reason is None
    assert reused.updates == separate.updates == 6
    for name, stat in reused.covariances.items():
        got, want = stat.compute(), separate.covariances[name].compute()
        for key in ("A", "S", "rows", "examples"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-9)


def test_reusing_the_training_forward_leaves_training_unchanged(tmp_path):
    _, with_stats = _fit_stats(tmp_path, TinyClassifier, reuse=True, every=1)
    torch.manual_seed(0)
    plain = TinyClassifier()
    train = DataLoader(_data(96, seed=0), batch_size=16, shuffle=False)
    _trainer(tmp_path, [], epochs=2).fit(plain, train)
    for (name, p), q in zip(with_stats.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("module", "reason"), [(DropoutClassifier, "differ between train and eval"),
                                                (InnerCallClassifier, "did not call")])
def test_forwards_that_cannot_be_reused_fall_back_to_a_separate_pass(tmp_path, module, reason):
    stats, _ = _fit_stats(tmp_path, module, reuse=True)
    assert stats.reuse_verified is False
    assert reason in stats.fallback_reason
    assert stats.updates == 6
    assert all(float(c.compute()["examples"]) == 6 * 16 for c in stats.covariances.values())


def test_during_training_mode_says_it_is_on_and_why_it_falls_back(tmp_path, caplog):
    # (Lightning's rank-zero info: on the console outside pytest, in caplog here)
    caplog.set_level(logging.INFO)
    _fit_stats(tmp_path, TinyClassifier, reuse=True)
    said = caplog.text
    assert ("lightning-influence: covariances accumulated during training, on the current batch "
            "every 2 optimizer steps (reusing the training step's forward") in said
    assert "cannot be reused" not in said
    caplog.clear()
    _fit_stats(tmp_path, DropoutClassifier, reuse=True)
    said = caplog.text
    assert ("lightning-influence: the training step's own forward cannot be reused for the "
            "covariance updates: the model's outputs differ between train and eval mode "
            "(dropout, batch norm or a forward that depends on self.training). Each update runs "
            "a separate eval-mode forward and backward instead.") in said


def test_solver_strategies_run_in_the_callbacks(tmp_path):
    """strategy='explicit' in EigenCorrection: the callbacks' scores are the exact damped
    Gauss-Newton ones (as built directly), self-influence included; heuristic damping comes from
    the EK-FAC factors, so the solver solves the system EK-FAC approximates."""
    from lightning_influence.solvers import ExplicitGGN, self_influence

    torch.manual_seed(0)
    model = TinyClassifier()
    train, val = _loaders()
    callbacks = [InfluenceStatistics(progress=False),
                 EigenCorrection(strategy="explicit", progress=False),
                 InfluenceScores(num_queries=4, top_k=3, keep_scores=True, progress=False)]
    _trainer(tmp_path, callbacks).fit(model, train, val)
    solver = callbacks[1].factors
    assert isinstance(solver, ExplicitGGN)
    ekfac = li.Factors.load(tmp_path / "influence")
    assert solver.damping == pytest.approx(ekfac.damping)

    ordered = li.ordered_loader(train)
    direct = ExplicitGGN(model, ordered, "classification", damping=ekfac)
    queries = DataLoader(torch.utils.data.Subset(val.dataset, range(4)), batch_size=16)
    expected = li.compute_pairwise_scores(model, direct, queries, ordered, "classification",
                                          top_k=3, keep_scores=True, progress=False)
    torch.testing.assert_close(callbacks[2].pairwise_result.scores, expected.scores)
    self_scores = callbacks[2].self_result.scores
    torch.testing.assert_close(self_scores, self_influence(model, direct, ordered,
                                                           "classification").to(self_scores.dtype))
    assert callbacks[2].self_result.layer_scores.shape == (2, 96)
    assert (self_scores > 0).all()


def test_solver_options_are_checked():
    with pytest.raises(ValueError, match="solver_options are for the solver strategies"):
        EigenCorrection(strategy="ekfac", solver_options={"iterations": 10})


def test_exact_fisher_through_the_callbacks(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    train, val = _loaders()
    callbacks = [InfluenceStatistics(progress=False, fisher="exact"),
                 EigenCorrection(progress=False)]
    _trainer(tmp_path, callbacks).fit(model, train, val)
    factors = callbacks[1].factors
    assert factors.extra["fisher"] == "exact"
    direct = li.fit_factors(model, li.ordered_loader(train), "classification", fisher="exact",
                            progress=False)
    for name, lf in factors.layers.items():
        torch.testing.assert_close(lf.eigenvalues, direct.layers[name].eigenvalues)


# ----------------------------------------------------------------------------------- model shapes
class ResNetBlockClassifier(TinyClassifier):
    """A torchvision-style basic block (in-place ReLU, BatchNorm, residual add) on 4x4 images."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        x = self.relu(self.stem(x.reshape(-1, 1, 4, 4)))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)) + x)
        return self.fc(out.flatten(1))


class ScalarHeadRegressor(TinyClassifier):
    """An MLP regression with a ``Linear(h, 1)`` head, targets ``[N]``."""

    influence_task = "regression"

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(inplace=True), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x).squeeze(-1), y))


def _regression_loaders():
    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 16, generator=g)
        return TensorDataset(x, x[:, :3].sum(1) + 0.1 * torch.randn(n, generator=g))
    return (DataLoader(data(64, 0), batch_size=16, shuffle=True),
            DataLoader(data(12, 1), batch_size=16))


@pytest.mark.parametrize("model_cls", [ResNetBlockClassifier, ScalarHeadRegressor])
@pytest.mark.parametrize("mode", ["after_fit", "during_training"])
def test_resnet_block_and_scalar_head_run_through_the_callbacks(tmp_path, model_cls, mode):
    """End to end, and the scores equal the plain API's on the same factors."""
    torch.manual_seed(0)
    model = model_cls()
    callbacks = _callbacks(mode=mode)
    train, val = _loaders() if model_cls is ResNetBlockClassifier else _regression_loaders()
    _trainer(tmp_path, callbacks, epochs=2).fit(model, train, val)
    scores_cb = callbacks[2]
    factors = callbacks[1].factors
    assert set(factors.shapes) == {n for n, m in model.named_modules()
                                   if isinstance(m, nn.Linear | nn.Conv2d)}
    assert all(torch.isfinite(layer.eigenvalues).all() for layer in factors.layers.values())
    ordered = DataLoader(train.dataset, batch_size=16)
    queries = DataLoader(torch.utils.data.Subset(val.dataset, range(4)), batch_size=16)
    expected = li.compute_pairwise_scores(model, factors, queries, ordered, top_k=3,
                                          progress=False)
    torch.testing.assert_close(scores_cb.pairwise_result.top.proponent_scores,
                               expected.top.proponent_scores, rtol=1e-4, atol=1e-6)
    assert (tmp_path / "influence" / "self_influence_flags.csv").exists()


def test_during_training_tracks_a_frozen_layer_through_the_separate_pass(tmp_path):
    """With include_frozen=True a frozen first layer runs without gradient in the training
    step: the update falls back to the separate pass (which takes its gradient) instead of
    reporting the layer as never run."""
    torch.manual_seed(0)
    model = TinyClassifier()
    model.net[0].requires_grad_(False)
    callbacks = [InfluenceStatistics(mode="during_training", every_n_steps=2, progress=False,
                                     include_frozen=True),
                 EigenCorrection(progress=False)]
    train, val = _loaders()
    _trainer(tmp_path, callbacks, epochs=1).fit(model, train, val)
    assert "ran without gradient" in callbacks[0].fallback_reason
    assert set(callbacks[1].factors.shapes) == {"net.0", "net.2"}
    assert not model.net[0].weight.requires_grad


def test_eigen_correction_takes_row_dtype_and_scores_use_it(tmp_path):
    """EigenCorrection(row_dtype="bfloat16") fits with bfloat16 rows, records it with the
    factors, and the scores callback (pairwise and self-influence in one pass) reads the same
    rows; an unknown row dtype is refused when the callback is built."""
    torch.manual_seed(0)
    callbacks = [InfluenceStatistics(progress=False),
                 EigenCorrection(progress=False, row_dtype="bfloat16"),
                 InfluenceScores(num_queries=4, top_k=3, keep_scores=True, progress=False)]
    train, val = _loaders()
    _trainer(tmp_path, callbacks).fit(TinyClassifier(), train, val)
    factors = callbacks[1].factors
    assert factors.extra["row_dtype"] == "bfloat16"
    assert li.Factors.load(callbacks[1].factors_path).extra["row_dtype"] == "bfloat16"
    scores = callbacks[2]
    assert scores.pairwise_result.self_result is scores.self_result  # one pass gave both
    assert torch.isfinite(scores.self_result.scores).all()
    with pytest.raises(ValueError, match="row_dtype='float16'"):
        EigenCorrection(row_dtype="float16")


def test_the_callbacks_run_in_a_lightning_pytorch_trainer(tmp_path):
    """``import lightning.pytorch as pl`` (the ``lightning`` package) works as the README says:
    its Trainer takes the callbacks, and the scores equal the plain functions'."""
    lpl = pytest.importorskip("lightning.pytorch")

    class Classifier(lpl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    val = TensorDataset(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g))
    callbacks = [InfluenceStatistics(task="classification", progress=False),
                 EigenCorrection(progress=False),
                 InfluenceScores(num_queries=4, top_k=5, keep_scores=True, progress=False)]
    trainer = lpl.Trainer(max_epochs=1, accelerator="cpu", logger=lpl.loggers.CSVLogger(tmp_path),
                          callbacks=callbacks, default_root_dir=str(tmp_path),
                          enable_checkpointing=False, enable_progress_bar=False)
    model = Classifier()
    trainer.fit(model, DataLoader(train, batch_size=8), DataLoader(val, batch_size=4))
    result = callbacks[2].pairwise_result
    expected = li.compute_pairwise_scores(model, callbacks[1].factors, DataLoader(val, batch_size=4),
                                          DataLoader(train, batch_size=8), "classification",
                                          progress=False)
    top = expected.scores.abs().max().item()
    torch.testing.assert_close(result.scores, expected.scores, rtol=0, atol=2e-6 * top)
    assert (tmp_path / "influence" / "report.html").is_file()


@pytest.mark.parametrize("mode", ["after_fit", "during_training"])
def test_the_callbacks_leave_the_training_run_unchanged(tmp_path, mode):
    """With a shuffling training loader, a Trainer with the callbacks trains exactly the
    weights it trains without them: the memory check before training (a probe batch) and
    the covariance updates draw nothing from the random number generators."""
    def train(callbacks, folder):
        pl.seed_everything(3)
        model = TinyClassifier()
        loader = DataLoader(_data(), batch_size=16, shuffle=True)
        _trainer(folder, callbacks, epochs=2).fit(model, loader)
        return [p.detach().clone() for p in model.parameters()]

    plain = train([], tmp_path / "plain")
    stats = InfluenceStatistics(mode=mode, progress=False)
    with_callbacks = train([stats, EigenCorrection(progress=False)], tmp_path / "influence")
    assert stats.covariances  # the callbacks ran
    for a, b in zip(plain, with_callbacks, strict=True):
        assert torch.equal(a, b)
