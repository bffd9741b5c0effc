"""The LM recipe end to end on a user's own text files (a shortened run), with an offline W&B run.

The full default run (Python's docs, 1200 steps) takes about five minutes on 2 CPU cores and is
measured by hand (README); this test runs the same code with fewer steps on a few local files
written from Python's help topics, so that the configured queries still have their documents.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import pytest
from readable import assert_output_pngs_readable

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lm_recipe_on_local_files_logs_everything(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "more").mkdir(parents=True)
    for name in ("lambda", "break", "with", "assert"):
        (corpus / f"{name}.txt").write_text(topics[name])
    for name in ("global", "try", "exceptions"):
        (corpus / "more" / f"{name}.md").write_text(topics[name])
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.lm_influence", f"hydra.run.dir={run_dir}", "threads=1",
         f"data.files=[{corpus}/*.txt,{corpus / 'more'}]", "trainer.max_steps=40",
         "model.warmup_steps=5", "callbacks.influence_documents.options.recall_ks=[1,3,7]",
         "callbacks.influence_documents.top_k=3", "+trainer.enable_progress_bar=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("Query store (rank 32)", "Rank-32 vs full-rank scores, Spearman",
                 "TF-IDF prefilter", "Wall time, end to end"):
        assert line in proc.stdout, (line, proc.stdout[-2000:])

    report = json.loads((run_dir / "lm_report.json").read_text())
    assert report["documents"] == 7
    assert 0 < report["query_store"]["ratio"] < 1
    assert len(report["spearman_vs_full_rank"]["chunks"]) == 8
    assert [row["K"] for row in report["tfidf_recall"]] == [1, 3, 7]
    assert report["tfidf_recall"][-1]["recall"] == 1.0  # K = D: every document is a candidate

    out = run_dir / "influence" / "documents"
    with open(out / "queries.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {"prompt", "completion", "top_proponent", "top_layer"} <= set(rows[0])
    with open(out / "top_documents.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8 * 2 * 3
    html = (out / "token_influence.html").read_text()
    assert html.count("<h2>") == 8 and "rgba(0,160,60," in html
    for name in ("layer_influence.csv", "tfidf_recall.csv", "influence_distribution.png",
                 "layer_influence.png", "document_scores.safetensors", "summary.json"):
        assert (out / name).is_file(), name
    assert (run_dir / "influence" / "factors.safetensors").is_file()
    assert_output_pngs_readable(run_dir, at_least=2)
    # the index was built from the document pass; its recall is printed beside TF-IDF's
    assert (run_dir / "influence" / "index" / "index.safetensors").is_file()
    assert {"index_recall", "index_opponent_recall"} <= set(report["tfidf_recall"][0])
    assert report["tfidf_recall"][-1]["index_recall"] == 1.0  # K = D

    # query mode: a new prompt answered from the saved index, no pass over the corpus
    ask_dir = tmp_path / "ask"
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.lm_influence", "mode=query", f"ask.run_dir={run_dir}",
         f"hydra.run.dir={ask_dir}", "threads=1", "wandb.enabled=false", "ask.candidates=2",
         "ask.top_k=2", "ask.max_new_tokens=12"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Answered in" in proc.stdout and "\x1b[48;5;" in proc.stdout, proc.stdout[-2000:]
    answer = json.loads((ask_dir / "answer.json").read_text())
    assert len(answer["proponents"]) == 2 and answer["completion"]
    assert (ask_dir / "answer" / "token_influence.html").is_file()

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = [p.name for p in runs[0].glob("files/media/table/**/*.table.json")]
    for key in ("queries", "top_documents", "tfidf_recall", "layer_influence"):
        assert any(t.startswith(key) for t in tables), (key, tables)
    images = [p.name for p in runs[0].glob("files/media/images/**/*.png")]
    assert any(i.startswith("influence_distribution") for i in images), images
    assert any(i.startswith("layer_figure") for i in images), images
    top = json.loads(next(runs[0].glob("files/media/table/**/top_documents*.json")).read_text())
    assert len(top["data"]) == 8 * 2 * 3
    assert sum(row[-1] is not None for row in top["data"]) >= 8 * 2 * 2  # token_documents = 2
    # the token-coloured wandb.Html cells are staged with the table's artifact (`wandb sync`)
    staged = [p for p in Path(os.environ["WANDB_DATA_DIR"]).rglob("*") if p.is_file()]
    assert sum("rgba(0,160,60," in p.read_text(errors="ignore") for p in staged) >= 8
