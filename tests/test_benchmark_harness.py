"""benchmarks/harness.py: interleaved timing, minima, tables, result files, load, memory."""

from __future__ import annotations

import importlib
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_saved_path = list(sys.path)
sys.path.insert(0, str(ROOT / "benchmarks"))
harness = importlib.import_module("harness")
sys.path[:] = _saved_path  # importing the harness reorders sys.path; the tests do not need that


def test_interleave_alternates_contenders_within_each_round():
    calls = []

    def contender(name, seconds):
        def run(i):
            calls.append((name, i))
            return seconds[i] if i >= 0 else 99.0
        return run

    runs = harness.interleave({"a": contender("a", [3.0, 1.0, 2.0]),
                               "b": contender("b", [5.0, 6.0, 4.0])}, 3, warmup=True)
    assert calls == [("a", -1), ("b", -1), ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2),
                     ("b", 2)]
    assert runs == {"a": [3.0, 1.0, 2.0], "b": [5.0, 6.0, 4.0]}  # the warm-up is not kept
    assert harness.best(runs["a"]) == 1.0 and harness.best(runs["b"]) == 4.0


def test_interleave_runs_first_names_first_and_shuffles_the_rest_every_round():
    order = []
    contenders = {n: (lambda i, n=n: order.append(n)) for n in ("floor", "x", "y", "z")}
    harness.interleave(contenders, 4, first=["floor"], shuffle=random.Random(0))
    rounds = [order[i:i + 4] for i in range(0, 16, 4)]
    assert all(r[0] == "floor" and sorted(r[1:]) == ["x", "y", "z"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # reshuffled, not one fixed order
    with pytest.raises(ValueError, match="unknown contenders"):
        harness.interleave(contenders, 1, first=["nope"])


def test_minima_over_rounds():
    runs = [{"fit": 2.0, "score": 1.0}, {"fit": 1.5, "score": 3.0}]
    assert harness.best(runs, "fit") == 1.5 and harness.best(runs, "score") == 1.0
    assert harness.best_total(runs) == 3.0  # the best whole round, not 1.5 + 1.0
    assert harness.best_total(runs, ["score"]) == 1.0
    assert math.isnan(harness.best([], "fit")) and math.isnan(harness.best_total([]))
    rounds = [{"t_s": 2.0, "peak_mb": 10.0, "peer_s": 7.0}, {"t_s": 1.0, "peak_mb": 30.0}]
    assert harness.best_per_key(rounds, keep_max=lambda k: "peak" in k) == {
        "t_s": 1.0, "peak_mb": 30.0, "peer_s": 7.0}


def test_fastest_keeps_the_first_result_and_the_minimum_time():
    results = iter([{"seconds": 3.0, "id": 0}, {"seconds": 1.0, "id": 1}, {"seconds": 2.0, "id": 2}])
    seconds, first = harness.fastest(lambda: next(results), 3, seconds=lambda r: r["seconds"])
    assert seconds == 1.0 and first["id"] == 0
    wall, value = harness.fastest(lambda: 7, 2)
    assert value == 7 and 0 <= wall < 1
    clock = harness.Stopwatch()
    assert 0 <= clock.lap() and 0 <= clock.lap() < 1


def test_markdown_table_and_result_files(tmp_path):
    lines = harness.markdown_table(["method", "seconds", "note"], [["a", "1.00", "x, y"]],
                                   align="lrl")
    assert lines == ["| method | seconds | note |", "|---|---:|---|", "| a | 1.00 | x, y |"]
    assert harness.markdown_table(["a", "b"], [])[1] == "|---|---:|"
    with pytest.raises(ValueError, match="cells"):
        harness.markdown_table(["a", "b"], [["only one"]])
    args = harness.parser("Title line.\n\nmore", threads=1, repeats=2, seed=3).parse_args(
        ["--out", str(tmp_path / "results")])
    assert (args.threads, args.repeats, args.seed) == (1, 2, 3)
    bench = harness.start(args)
    assert torch.get_num_threads() == 1 and bench.out.is_dir()
    text = "\n".join(lines) + "\n"
    written = bench.write("demo", text, {"x": torch.tensor(0.5), "rows": [(1, 2.0)]})
    assert [p.name for p in written] == ["demo.md", "demo.json"]
    assert (bench.out / "demo.md").read_text() == text
    assert json.loads((bench.out / "demo.json").read_text()) == {"x": 0.5, "rows": [[1, 2.0]]}


def test_load_report_warns_when_the_load_exceeds_the_cpus(monkeypatch):
    bench = harness.Bench(None, 1, load_at_start=0.0)
    monkeypatch.setattr(harness, "load_average", lambda: 0.0)
    assert bench.load() == "load average 0.00 at start, 0.00 at end"
    assert bench.load(end=False) == "load average 0.00 at start"
    monkeypatch.setattr(harness, "load_average", lambda: harness.cpus() + 1.0)
    assert "timings are not trustworthy" in bench.load()


def test_peak_rss_sees_an_allocation_and_a_child_reports_json(tmp_path):
    with harness.PeakRSS() as mem:
        block = torch.ones(16 * 2**20)  # 64 MiB, written
    assert mem.mib > 32 and block.numel()
    assert harness.max_rss_bytes() > mem.start + 32 * 2**20  # the high-water mark saw it too
    child = tmp_path / "child.py"
    child.write_text(f"import sys\nsys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
                     "import harness\nprint('noise')\n"
                     "if sys.argv[1:] == ['fail']:\n    raise SystemExit('bad input')\n"
                     "if sys.argv[1:] == ['hang']:\n    import time; time.sleep(60)\n"
                     "harness.child_result({'args': sys.argv[1:]})\n")
    assert harness.run_child(child, "a", "b") == {"args": ["a", "b"]}
    with pytest.raises(RuntimeError, match="bad input"):
        harness.run_child(child, "fail")
    with pytest.raises(RuntimeError, match="timed out after 2 s"):
        harness.run_child(child, "hang", timeout=2)
