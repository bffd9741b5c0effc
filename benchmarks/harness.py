"""What every benchmark script shares: arguments, threads, timing, load, memory, result files.

    import harness

    p = harness.parser(__doc__, repeats=5, repeats_help="interleaved rounds (min is kept)")
    args = p.parse_args()
    bench = harness.start(args)                  # torch threads, <out>/, the load at start
    runs = harness.interleave({"ours": lambda i: ours(...), "peer": lambda i: peer(...)},
                              args.repeats)       # {name: [result of round 0, 1, ...]}
    seconds = harness.best(runs["ours"], "fit")   # the minimum over the rounds
    bench.report("speed", "\\n".join(lines), summary)   # prints, writes speed.md and speed.json

Timing on a shared machine: each time is the minimum over rounds, and contenders whose ratio is
reported run in alternation within one run (:func:`interleave`), so drift of the machine hits
them alike. Either is meaningless while the load average exceeds the CPU count: the load at
start and at the end goes into every report (:meth:`Bench.load`), with a warning when it does.

Memory: :func:`rss_bytes` (resident now), :func:`max_rss_bytes` (the process's high-water mark),
:class:`PeakRSS` (the high-water mark over a block, sampled on a thread), and :func:`run_child` /
:func:`child_result` to measure a stage in a fresh process.

Only the standard library and torch are imported here, so the harness runs in the Kronfluence
venv too. Importing it puts the benchmarks folder and the repository root first on ``sys.path``:
the scripts import ``recipes``, each other, and the checkout's ``lightning_influence``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULTS = "benchmarks/results"  # the default --out, relative to where the scripts are run from
for _path in (str(ROOT), str(BENCHMARKS)):
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)

R = TypeVar("R")

__all__ = ["ROOT", "RESULTS", "parser", "start", "Bench", "load_average", "cpus", "optional_peer",
           "Stopwatch", "timed", "fastest", "interleave", "best", "best_total", "best_per_key",
           "markdown_table", "rss_bytes", "max_rss_bytes", "PeakRSS", "run_child", "child_result"]


# ------------------------------------------------------------------------------- arguments
def parser(doc: str | None, *, threads: int | None = 2, repeats: int | None = None,
           repeats_help: str = "timed rounds; the minimum time is kept", seed: int | None = None,
           seed_help: str = "random seed", out: str | None = RESULTS) -> argparse.ArgumentParser:
    """An argument parser described by the first line of ``doc`` with the common options:
    ``--threads``, ``--repeats``, ``--seed`` and ``--out``, each where its default is not None."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads, help="CPU threads of torch")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    if seed is not None:
        p.add_argument("--seed", type=int, default=seed, help=seed_help)
    if out is not None:
        p.add_argument("--out", default=out, help="folder of the result files")
    return p


def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average (nan where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return float("nan")


@dataclass
class Bench:
    """One benchmark run: its result folder, threads and the load average at its start."""

    out: Path | None
    threads: int | None
    load_at_start: float = field(default_factory=load_average)

    def load(self, end: bool = True) -> str:
        """``load average S at start, E at end`` (E: now; without ``end``, ``load average S at
        start``), with a warning when one exceeds the CPU count: timings are then meaningless."""
        loads = [self.load_at_start] + ([load_average()] if end else [])
        text = f"load average {loads[0]:.2f} at start" + (f", {loads[1]:.2f} at end" if end else "")
        if max(loads) > cpus():
            text += f" (above the {cpus()} CPUs: timings are not trustworthy)"
        return text

    def write(self, stem: str, markdown: str | None = None, data: Any = None) -> list[Path]:
        """``<out>/<stem>.md`` (the text) and ``<out>/<stem>.json`` (the data), where given."""
        assert self.out is not None, "this benchmark has no --out"
        self.out.mkdir(parents=True, exist_ok=True)
        written = []
        if markdown is not None:
            written.append(self.out / f"{stem}.md")
            written[-1].write_text(markdown)
        if data is not None:
            written.append(self.out / f"{stem}.json")
            written[-1].write_text(json.dumps(data, indent=2, default=float))
        return written

    def report(self, stem: str, markdown: str, data: Any = None) -> list[Path]:
        """Print the text, then :meth:`write` it and the data."""
        print(markdown)  # noqa: T201 - a benchmark's report is its output
        return self.write(stem, markdown, data)


def start(args: argparse.Namespace, *, quiet: bool = False) -> Bench:
    """Set torch's threads (``--threads``), make ``--out``, note the load average; ``quiet``
    also silences Lightning's info logs and Python warnings."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        torch.set_num_threads(threads)
    if quiet:
        logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
    out = getattr(args, "out", None)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    return Bench(out, threads)


def optional_peer(name: str = "kronfluence_side") -> ModuleType | None:
    """The Kronfluence side (benchmarks/kronfluence_side.py) where Kronfluence is importable (its
    venv, benchmarks/README.md), else None: the scripts then leave the peer's columns empty."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# ------------------------------------------------------------------------------- timing
class Stopwatch:
    """Wall-time laps: :meth:`lap` returns the seconds since the previous lap (or the start)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds


def timed(fn: Callable[[], R]) -> tuple[float, R]:
    """``(seconds, result)`` of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def fastest(fn: Callable[[], R], runs: int,
            seconds: Callable[[R], float] | None = None) -> tuple[float, R]:
    """The minimum time of ``runs`` calls and the first call's result. ``seconds`` reads the time
    from a result that measures itself (e.g. without its setup); default: the call's wall time."""
    times, first = [], None
    for i in range(runs):
        wall, result = timed(fn)
        times.append(seconds(result) if seconds is not None else wall)
        if i == 0:
            first = result
    return min(times), first  # type: ignore[return-value]


def interleave(contenders: Mapping[str, Callable[[int], R]], rounds: int, *,
               first: Sequence[str] = (), shuffle: random.Random | None = None,
               warmup: bool = False) -> dict[str, list[R]]:
    """Run every contender once per round, in alternation, and keep each result.

    A contender is called with the round's number (0, 1, ...; -1 in the warm-up) and returns its
    seconds, ``{stage: seconds}``, or anything else the caller reads. Each round runs the
    contenders named in ``first`` in that order, then the others in the mapping's order, shuffled
    anew every round by ``shuffle`` when given (so that no contender always follows the same
    one). ``warmup``: one untimed call of each before the rounds (first calls allocate, import
    and build kernels).

    Returns ``{name: [result of round 0, round 1, ...]}`` in the mapping's order.
    """
    unknown = [n for n in first if n not in contenders]
    if unknown:
        raise ValueError(f"interleave: first names unknown contenders {unknown}.")
    if warmup:
        for fn in contenders.values():
            fn(-1)
    results: dict[str, list[R]] = {name: [] for name in contenders}
    for i in range(rounds):
        rest = [n for n in contenders if n not in first]
        if shuffle is not None:
            shuffle.shuffle(rest)
        for name in [*first, *rest]:
            results[name].append(contenders[name](i))
    return results


def best(runs: Sequence[Any], stage: str | None = None) -> float:
    """The minimum over rounds of each run's seconds (``run[stage]`` for ``{stage: seconds}``
    runs); nan when there is no run (a contender absent in this environment)."""
    if not runs:
        return float("nan")
    return min(run[stage] if stage is not None else run for run in runs)


def best_total(runs: Sequence[Mapping[str, float]], stages: Iterable[str] | None = None) -> float:
    """The minimum over rounds of the sum of ``stages`` (default every stage) within a round:
    the best whole run, not the sum of per-stage minima; nan when there is no run."""
    if not runs:
        return float("nan")
    stages = list(stages) if stages is not None else None
    return min(sum(run[s] for s in stages) if stages is not None else sum(run.values())
               for run in runs)


def best_per_key(rounds: Sequence[Mapping[str, float]],
                 keep_max: Callable[[str], bool] = lambda key: False) -> dict[str, float]:
    """``{key: minimum over the rounds that have it}`` for the keys of the first round; the
    maximum for keys where ``keep_max(key)`` (peaks of memory: the largest seen)."""
    return {key: (max if keep_max(key) else min)(r[key] for r in rounds if key in r)
            for key in rounds[0]}


# ------------------------------------------------------------------------------- tables
def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: str | None = None) -> list[str]:
    """The lines of a markdown table; ``align`` has one ``l`` or ``r`` per column (default: the
    first column left, the others right). Cells are written as given (format them first)."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"markdown_table: {len(header)} columns but align {align!r}.")
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"markdown_table: row {list(row)} has {len(row)} cells, not "
                             f"{len(header)}.")
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines


# ------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm; elsewhere psutil)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss


def max_rss_bytes() -> int:
    """The process's resident high-water mark so far (``ru_maxrss``)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


class PeakRSS:
    """The process's resident memory high-water mark over a block, sampled every ``interval``
    seconds on a thread (``ru_maxrss`` cannot be reset, so it cannot isolate one block):
    ``with PeakRSS() as mem: ...`` then ``mem.peak - mem.start`` bytes."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def mib(self) -> float:
        """The increase over the block, in MiB."""
        return (self.peak - self.start) / 2**20


def run_child(script: str | Path, *args: str, timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script args`` in a fresh process (same interpreter) and read the last line
    it prints as JSON (:func:`child_result`): a stage measured without what earlier stages
    left in the allocator. A child that fails, or runs past ``timeout`` seconds (then
    killed), raises a ``RuntimeError`` with the end of its stderr."""
    try:
        proc = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} timed out after {timeout:g} s"
                           ) from err
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_result(data: Mapping[str, Any]) -> None:
    """Print a child's result as the one JSON line :func:`run_child` reads."""
    print(json.dumps(data))  # noqa: T201 - read by the parent
