"""The fine-tuning recipe end to end, shrunk: a Llama-shaped model pretrained and LoRA-fine-tuned
offline, the influence callbacks on the adapters, the planted examples' recall reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from readable import assert_output_pngs_readable

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_finetune_recipe_ranks_the_planted_examples(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.finetune_influence", f"hydra.run.dir={tmp_path}",
         "progress=true", "pretrain.max_steps=60", "finetune.max_steps=60", "threads=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "influence recall@10" in proc.stdout
    report = json.loads((tmp_path / "finetune_report.json").read_text())
    assert len(report["planted"]) == 8 and report["examples"] > 100
    # only the adapters are tracked and trained: LoRA A and B of 7 projections x 2 layers
    assert report["tracked_layers"] == 2 * 7 * 2
    assert report["trainable"] < 0.2 * report["parameters"]
    assert len(report["per_probe"]) == 4
    # even briefly trained, the planted examples lead the proponents (chance: 8 of 119)
    assert report["recall_at_10"] >= 0.5, report["per_probe"]
    for name in ("token_influence", "layer_influence", "top_documents"):
        assert Path(report["files"][name]).is_file(), name
    assert_output_pngs_readable(tmp_path)  # layer_influence.png among them, 28 LoRA layers
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(p.name.startswith("finetune") or "planted_recall" in p.name
               for p in runs[0].glob("files/media/table/**/*.table.json"))
