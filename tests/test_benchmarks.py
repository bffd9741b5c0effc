"""Smoke tests: every benchmark script runs end to end on tiny settings and writes its report.

They run in the project's environment, where Kronfluence is absent: the scripts then skip the
peer's columns (shown as nan), which is also checked. The Kronfluence-only scripts run only
where Kronfluence is importable (benchmarks/README.md sets up that venv). The figures these tiny
runs print mean nothing; the full runs' figures are in benchmarks/results.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, timeout: int = 300) -> str:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_speed_benchmark_reports_every_ratio(tmp_path):
    run("speed.py", "--queries", "4", "--repeats", "2", "--epochs", "1", "--every", "10",
        "--threads", "1", "--seq-chunks", "64", "--out", str(tmp_path))
    sequence = json.loads((tmp_path / "speed_sequence.json").read_text())["summary"]
    for stage in ("covariances", "eigen", "fit", "pairwise", "self", "pairwise+self"):
        assert sequence[stage]["ours"] > 0 and sequence[stage]["ours_bf16"] > 0
        assert sequence[stage]["ours_over_floor"] > 0
    assert math.isnan(sequence["total"]["kronfluence"])
    assert sequence["bf16_vs_float32_pairwise_pearson"] > 0.99
    summary = json.loads((tmp_path / "speed.json").read_text())["summary"]
    report = (tmp_path / "speed.md").read_text()
    for stage in ("fit", "pairwise", "self"):
        assert summary[stage]["ours"] > 0 and summary[stage]["ours_over_floor"] > 0
        assert math.isnan(summary[stage]["kronfluence"])  # no peer in this environment
    for key in ("training_every_10", "training_every_10_separate"):
        assert summary[key]["seconds"] > 0
        assert 0 < summary[key]["callback_seconds_over_plain"] < 10
    assert "reuse_forward=False" in report and "time inside the callback" in report


def test_accuracy_benchmark_writes_table_plot_and_wandb_run(tmp_path):
    run("accuracy.py", "--queries", "3", "--pbrf-examples", "3", "--subsets", "4",
        "--lissa-steps", "2,4", "--pcg-steps", "1,2", "--arnoldi-steps", "3", "--fisher-seeds", "1",
        "--timing-runs", "1",
        "--cg-iterations", "3", "--epochs", "2", "--threads", "1", "--out", str(tmp_path))
    table = (tmp_path / "accuracy.md").read_text()
    for name in ("ours identity", "ours ekfac", "ours ekfac, exact Fisher", "lissa (4 it.)",
                 "block-diagonal GGN, CG", "CG + EK-FAC preconditioner (2 it.)", "arnoldi (3 it.)",
                 "ours ekfac, heuristic damping"):
        assert f"| {name}" in table, name
    assert "Kronfluence" not in table.split("EK-FAC LDS")[0]  # the peer is absent here
    summary = json.loads((tmp_path / "accuracy.json").read_text())
    assert all(math.isfinite(summary[k]["lds"]) for k in summary if k.startswith("ours"))
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_accuracy_tasks_benchmark_reports_every_task(tmp_path):
    run("accuracy_tasks.py", "--tasks", "mlp,conv", "--seeds", "2", "--subsets", "3",
        "--queries", "3", "--conv-epochs", "1", "--no-exact", "--threads", "1",
        "--out", str(tmp_path))
    summary = json.loads((tmp_path / "accuracy_tasks.json").read_text())
    for task in ("mlp", "conv"):
        rows = summary[task]
        assert set(rows) == {"ours, default (heuristic)", "ours, absolute 0.01"}  # no peer here
        assert all(len(r["lds"]) == 2 and r["seconds"] > 0 for r in rows.values())
    assert "| ours, default (heuristic) |" in (tmp_path / "accuracy_tasks.md").read_text()


def test_accuracy_ceiling_benchmark_reports_ratios_per_model(tmp_path):
    run("accuracy_ceiling.py", "--models", "2", "--label-seeds", "2", "--subsets", "8",
        "--queries", "4", "--pcg-steps", "1,2", "--timing-runs", "1", "--epochs", "2",
        "--cg-iterations", "2", "--threads", "1", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "accuracy_ceiling.json").read_text())
    names = ["EK-FAC, default (sampled labels)", "EK-FAC, fisher=exact", "K-FAC, fisher=exact",
             "CG + exact-Fisher EK-FAC, 1 it.", "CG + exact-Fisher EK-FAC, 2 it.",
             "exact damped GGN (0.01), CG"]
    assert [k for k in summary if k != "per_model"] == names
    assert len(summary["per_model"]) == 2
    assert summary[names[0]]["time_ratio"] == [1.0, 1.0]  # the unit of time
    assert summary[names[-1]]["ratio"] == [1.0, 1.0]  # the ceiling
    assert all(math.isfinite(r) for n in names for r in summary[n]["ratio"])
    # 2 CG iterations from scratch cannot reach a residual of 1e-6: the report must say so
    assert "NOT converged" in (tmp_path / "accuracy_ceiling.md").read_text()


def test_accuracy_ceiling_benchmark_without_the_exact_solve_on_the_conv_net(tmp_path):
    run("accuracy_ceiling.py", "--task", "conv", "--no-exact", "--pcg-steps", "", "--models", "1",
        "--label-seeds", "1", "--subsets", "8", "--queries", "4", "--timing-runs", "1",
        "--epochs", "1", "--threads", "1", "--out", str(tmp_path))
    summary = json.loads((tmp_path / "accuracy_ceiling_conv.json").read_text())
    assert [k for k in summary if k != "per_model"] == [
        "EK-FAC, default (sampled labels)", "EK-FAC, fisher=exact", "K-FAC, fisher=exact"]
    assert all(summary[k]["ratio"] == [] for k in summary if k != "per_model")
    assert "| K-FAC, fisher=exact |" in (tmp_path / "accuracy_ceiling_conv.md").read_text()


def test_memory_benchmark_prints_the_ratio():
    out = run("memory.py", "--scale", "2", "--queries", "4")
    assert "peak RSS ratio 2x / 1x:" in out


def test_query_batching_benchmark(tmp_path):
    run("query_batching.py", "--queries", "4", "--rank", "4", "--max-chunks", "1",
        "--factor-batches", "2", "--out", str(tmp_path))
    assert json.loads((tmp_path / "query_batching.json").read_text())


@pytest.mark.parametrize("script", ["compare_kronfluence.py", "kronfluence_side.py"])
def test_kronfluence_scripts(script, tmp_path):
    pytest.importorskip("kronfluence", reason="runs in benchmarks/.venv-kronfluence only")
    args = ["--queries", "4", "--epochs", "2"] if script.startswith("compare") else [
        "--num-queries", "4", "--epochs", "2"]
    run(script, *args)


def test_language_model_accuracy_benchmark(tmp_path):
    run("accuracy_lm.py", "--train-chunks", "48", "--queries", "3", "--epochs", "1",
        "--subsets", "3", "--lissa-steps", "2", "--pcg-steps", "1", "--cg-iterations", "1",
        "--threads", "1", "--out", str(tmp_path))
    table = (tmp_path / "accuracy_lm.md").read_text()
    for name in ("ours identity", "ours ekfac", "lissa (2 it.)", "CG + EK-FAC preconditioner"):
        assert f"| {name}" in table, name
    assert (tmp_path / "accuracy_lm.png").stat().st_size > 10_000


def test_llm_cost_benchmark_reports_the_ratio_to_an_epoch(tmp_path):
    pytest.importorskip("transformers")
    run("llm_cost.py", "--chunks", "32", "--queries", "2", "--sizes", "small", "--threads", "1",
        "--repeats", "1", "--no-isolated-memory", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "llm_cost.json").read_text())
    small = rows["small"]
    assert small["epoch_s"] > 0 and small["total_over_epoch"] > 0
    assert small["peak_mb"] >= 0 and small["estimate_mb"] > 0
    assert "fit+pairwise+self / epoch" in (tmp_path / "llm_cost.md").read_text()
    for key in ("one_pass_over_epoch", "bf16_over_epoch"):
        assert rows["small"][key] > 0
    assert math.isnan(rows["small"]["kronfluence_s"])  # no peer in this environment


def test_llm_memory_measures_each_stage_in_a_fresh_process(tmp_path):
    pytest.importorskip("transformers")
    run("llm_cost.py", "--memory-only", "--chunks", "32", "--queries", "2", "--sizes", "small",
        "--threads", "1", "--out", str(tmp_path))
    row = json.loads((tmp_path / "llm_memory.json").read_text())["small"]
    for stage in ("fit", "pairwise", "self"):
        assert row[f"{stage}_isolated_peak_mb"] > 0
    assert row["estimate_over_isolated_peak"] > 0


def test_llm_scale_measures_each_stage_in_a_fresh_process(tmp_path):
    """The child-process path at smoke shapes (width 64, a vocabulary of 8192), ours only: the
    floor, the fit and its parts, pairwise and self-influence, each timed and measured, beside
    the plan (or "n/a" where the library has none)."""
    pytest.importorskip("transformers")
    run("llm_scale.py", "--smoke", "--model", "llama", "--selection", "mlp", "--libraries",
        "ours", "--threads", "1", "--out", str(tmp_path))
    data = json.loads((tmp_path / "llm_scale.json").read_text())
    row = data["results"]["llama/mlp"]
    assert row["layers"] == 2 * 3 and row["left_out"] == []  # gate, up, down per block
    assert row["floor"]["seconds"] > 0 and row["floor"]["peak_mb"] >= 0
    for stage in ("fit", "covariances", "eigendecomposition", "eigenvalues", "pairwise", "self"):
        assert row["ours"][stage]["seconds"] > 0 and row["ours"][stage]["peak_mb"] >= 0, stage
    assert row["ours"]["fit"]["peak_mb"] >= row["ours"]["covariances"]["peak_mb"]
    assert "kronfluence" not in row
    assert row["plan"] is None or set(row["plan"]) >= {"covariances", "pairwise", "self"}
    report = (tmp_path / "llm_scale.md").read_text()
    assert "| · eigendecomposition |" in report and "ours peak / plan" in report


def test_gpu_check_runs_its_cpu_path(tmp_path):
    """benchmarks/gpu_check.sh --cpu: the same steps as on a GPU machine, at smoke sizes: the
    CUDA tests run on the CPU, the benchmarks write their reports, the summary says so."""
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    summary = (tmp_path / "summary.md").read_text()
    for step in ("device", "tests", "llm_scale", "speed"):
        assert f"| {step} | passed |" in summary, summary
    tests = (tmp_path / "tests.xml").read_text()
    assert 'failures="0"' in tests and 'errors="0"' in tests and 'skipped="1"' in tests
    results = json.loads((tmp_path / "llm_scale.json").read_text())["results"]
    assert set(results) == {"gpt2/default", "gpt2/mlp", "llama/default", "llama/mlp"}
    assert results["gpt2/default"]["left_out"] == ["lm_head"]
    assert all("error" not in s for r in results.values() for s in r["ours"].values())
    assert (tmp_path / "speed_sequence.json").is_file()


def test_eigh_precision_compares_each_dtype_with_float64(tmp_path):
    run("eigh_precision.py", "--smoke", "--threads", "1", "--out", str(tmp_path))
    data = json.loads((tmp_path / "eigh_precision.json").read_text())
    assert set(data) == {"float64, seed 0", "auto, seed 0", "float32, seed 0", "float64, seed 1"}
    reference = data["float64, seed 0"]
    assert reference["pairwise"]["pearson"] > 0.999999 and reference["pairwise"]["max_diff"] == 0
    assert reference["float32_sides"] == 0 and data["float64, seed 1"]["float32_sides"] == 0
    assert data["float32, seed 0"]["float32_sides"] == data["float32, seed 0"]["sides"] > 0
    for row in data.values():
        assert -1 <= row["self"]["spearman"] <= 1 and row["eigh_seconds"] >= 0
    assert "auto, seed 0" in (tmp_path / "eigh_precision.md").read_text()
