"""Influence at real widths: GPT-2 small and a Llama shape, ours beside Kronfluence, per stage.

    .venv/bin/python benchmarks/llm_scale.py                             # ours, CPU
    benchmarks/.venv-kronfluence/bin/python benchmarks/llm_scale.py      # + Kronfluence
    python benchmarks/llm_scale.py --device cuda --layers 8              # on a GPU
    python benchmarks/llm_scale.py --smoke                               # tiny shapes (tests)

Models, built from ``transformers`` configs with random weights (the costs do not depend on
them), float32:

- ``gpt2``: ``GPT2Config()``, GPT-2 small: 12 blocks of width 768, 124M parameters, a
  50257-token vocabulary whose head is tied to the input embedding;
- ``llama``: hidden 2048, intermediate 8192, 16 heads, a 32000-token vocabulary (untied
  head), ``--layers`` blocks (about 67M parameters each).

Layer selections: ``default`` (what ``fit_factors`` tracks for a ``causal_lm`` task: every
projection; the vocabulary-sized head is left out) and ``mlp`` (``FitOptions(layer_preset=
"mlp")``). Kronfluence tracks the same modules (GPT-2's ``Conv1D`` projections are replaced by
the ``nn.Linear`` they compute: Kronfluence tracks Linear and Conv2d only), with the same
damping (0.1 x the mean of each layer's Lambda), batch size and float32 rows.

Data: ``--sequences`` random token sequences of ``--length`` tokens in batches of
``--batch-size``; ``--queries`` other sequences are the queries.

Stages: the floor (one forward and backward over the training data with parameter gradients,
the unit of time; the floor's process also makes our memory plan), the fit (covariances,
eigendecomposition, eigenvalues, each timed and measured), pairwise scores of the queries
against every training sequence (top 10 kept, no score matrix) and self-influence. Each stage
builds the model, runs one warm-up forward and backward, notes the memory, runs, and reports
its time and its peak beyond that memory: the process's resident memory sampled on a thread
on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Scoring stages load the factors inside
the measured span, as our plan counts them. Beside each, our plan
(``lightning_influence.memory.plan_memory``: the bytes each stage needs beyond the resident
model; "n/a" where this version has none). With ``--isolation process`` (the default on CPU)
each (library, stage) runs in a fresh process, so that no memory freed by an earlier stage is
reused unseen; on CUDA the stages run in this process (``--isolation none``, the default
there), the allocator's peak reset before each. Kronfluence runs where it is importable (its
venv, benchmarks/README.md); its times include its disk I/O (it writes factors and scores).

Writes ``<out>/llm_scale.md`` and ``<out>/llm_scale.json`` after every configuration, so a run
cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import harness
import torch
from torch.utils.data import DataLoader

import lightning_influence as li
from lightning_influence.fitting import options_tracker
from lightning_influence.passes import move_to_device
from lightning_influence.tracking import VOCABULARY_HEAD_WIDTH

STAGES = ("floor", "fit", "pairwise", "self")
FIT_PARTS = ("covariances", "eigendecomposition", "eigenvalues")
LIBRARIES = ("ours", "kronfluence")
MODELS = ("gpt2", "llama")
SELECTIONS = ("default", "mlp")
LLAMA = dict(vocab=32000, hidden=2048, intermediate=8192, heads=16)
# smoke shapes: a vocabulary just wide enough for the default selection to leave the head out
SMOKE = dict(vocab=VOCABULARY_HEAD_WIDTH, hidden=64, intermediate=256, heads=4,
             layers=2)
DATA = {"sequences": (64, 16), "length": (128, 16), "batch_size": (8, 4), "queries": (4, 2)}


# ------------------------------------------------------------------------------- the problem
def make_model(name: str, args: argparse.Namespace) -> torch.nn.Module:
    """The model ``name`` (random init, seeded: the same weights in every process), on
    ``args.device``, in eval mode."""
    import transformers

    torch.manual_seed(0)
    with torch.device(args.device):
        if name == "gpt2":
            config = transformers.GPT2Config() if not args.smoke else transformers.GPT2Config(
                vocab_size=SMOKE["vocab"], n_embd=SMOKE["hidden"], n_layer=SMOKE["layers"],
                n_head=SMOKE["heads"], n_positions=max(args.length, 64), bos_token_id=0,
                eos_token_id=0)
            model = transformers.GPT2LMHeadModel(config)
        else:
            shape = SMOKE if args.smoke else dict(LLAMA, layers=args.layers)
            config = transformers.LlamaConfig(
                vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                num_attention_heads=shape["heads"], max_position_embeddings=max(args.length, 128),
                tie_word_embeddings=False)
            model = transformers.LlamaForCausalLM(config)
    return model.eval()


def vocabulary(model: torch.nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def sequences(n: int, length: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` random token sequences as dict examples (``input_ids``, ``attention_mask``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones(length, dtype=torch.long)} for i in ids]


def loaders(args: argparse.Namespace, vocab: int) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(sequences(args.sequences, args.length, vocab, 0),
                       batch_size=args.batch_size)
    queries = DataLoader(sequences(args.queries, args.length, vocab, 1),
                         batch_size=args.queries)
    return train, queries


def fit_options(selection: str) -> li.FitOptions:
    return li.FitOptions(layer_preset="mlp" if selection == "mlp" else None, progress=False)


SCORE = li.ScoreOptions(top_k=10, keep_scores=False, progress=False)


def forward_backward(model: torch.nn.Module, batch: Any, task: li.Task) -> None:
    """One forward and backward of the summed next-token loss (parameter gradients)."""
    batch = move_to_device(batch, next(model.parameters()).device)
    task.loss(task.forward(model, batch), batch).sum().backward()


# ------------------------------------------------------------------------------- measuring
class Meter:
    """Time and peak memory of named spans, the peak beyond the memory when it was made
    (resident memory sampled on a thread on CPU; the CUDA allocator's peak on a GPU). Spans
    nest: an enclosing span's peak includes its inner spans' (on CUDA each span resets the
    allocator's peak, so the enclosing one takes the largest of its inner spans too)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        gc.collect()
        self.before = self.now()
        self.results: dict[str, dict[str, float]] = {}
        self._open: list[list[int]] = []  # per open span: the largest inner peak

    def now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        return harness.rss_bytes()

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        sampler = None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            sampler = harness.PeakRSS().__enter__()
        self._open.append([0])
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            if sampler is not None:
                sampler.__exit__(None, None, None)
                peak = sampler.peak
            else:
                peak = torch.cuda.max_memory_allocated(self.device)
            peak = max(peak - self.before, self._open.pop()[0], 0)
            if self._open:
                self._open[-1][0] = max(self._open[-1][0], peak)
            self.results[name] = {"seconds": seconds, "peak_mb": peak / 2**20}

    def wrap(self, fn: Callable, name: str) -> Callable:
        """``fn`` measured as the span ``name`` on every call."""
        def measured(*args: Any, **kwargs: Any) -> Any:
            with self.measure(name):
                return fn(*args, **kwargs)
        return measured


@contextmanager
def measured_fit_parts(meter: Meter) -> Iterator[None]:
    """Measure the parts of :func:`lightning_influence.fit_factors` (the module functions it
    calls for the covariance pass, the eigendecompositions and the eigenvalue pass) as spans,
    by replacing them in ``lightning_influence.fitting`` for the duration: the fit measured is
    the library's own. A part this version does not have is left unmeasured."""
    import lightning_influence.fitting as fitting

    parts = {"fit_covariances": "covariances", "eigenbases": "eigendecomposition",
             "fit_eigenvalues": "eigenvalues"}
    originals = {name: getattr(fitting, name) for name in parts if hasattr(fitting, name)}
    for name, fn in originals.items():
        setattr(fitting, name, meter.wrap(fn, parts[name]))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(fitting, name, fn)


# ------------------------------------------------------------------------------- the stages
def run_stage(stage: str, library: str, model_name: str, selection: str,
              args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build the model and data, warm up, run one stage; its measurements (and, for the floor,
    the model, the tracked layers and our plan of every selection)."""
    device = torch.device(args.device)
    model = make_model(model_name, args)
    train, queries = loaders(args, vocabulary(model))
    task = li.CausalLMTask()
    out: dict[str, Any] = {}
    if stage == "floor":
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["selections"] = {s: describe_selection(model, train, task, s, args)
                             for s in selections(args.selection)}
    # warm torch's runtime (kernels, thread pools, autograd engine) so that its one-time
    # allocations are not counted as the stage's
    forward_backward(model, next(iter(train)), task)
    model.zero_grad(set_to_none=True)
    folder = work / f"{library}_{model_name}_{selection}"
    if library == "kronfluence" and stage != "floor":
        out["stages"] = kronfluence_stage(stage, model_name, model, train, queries, task,
                                          selection, args, folder)
        return out
    meter = Meter(device)
    if stage == "floor":
        with meter.measure("floor"):
            for batch in train:
                forward_backward(model, batch, task)
    elif stage == "fit":
        with measured_fit_parts(meter), meter.measure("fit"):
            factors = li.fit_factors(model, train, task, fit_options(selection))
        out["layers"] = len(factors.shapes)
        factors.save(folder)
    else:
        with meter.measure(stage):
            factors = li.Factors.load(folder)
            if stage == "pairwise":
                li.compute_pairwise_scores(model, factors, queries, train, task, SCORE)
            else:
                li.compute_self_scores(model, factors, train, task, SCORE)
    out["stages"] = meter.results
    return out


def kronfluence_stage(stage: str, model_name: str, model: torch.nn.Module, train: DataLoader,
                      queries: DataLoader, task: li.Task, selection: str,
                      args: argparse.Namespace, folder: Path) -> dict[str, dict[str, float]]:
    """One stage of Kronfluence on the modules our ``selection`` tracks; factors and scores
    are kept under ``folder``, where the scoring stages find the fit's factors."""
    side = harness.optional_peer()
    if side is None:
        raise RuntimeError("Kronfluence is not importable in this environment (see "
                           "benchmarks/README.md for its venv).")
    device = torch.device(args.device)
    names = options_tracker(model, fit_options(selection), task).names()
    if model_name == "gpt2":
        side.linear_from_conv1d(model)
    analyzer, factor_args, score_args = side.prepare_analyzer(
        model, task=side.CausalLMTask(modules=names), damping=None, output_dir=folder,
        name=f"{model_name}_{selection}", cpu=device.type == "cpu", copy_model=False)
    meter = Meter(device)
    batch = args.batch_size
    with meter.measure(stage):
        if stage == "fit":
            side.fit_factors_by_stage(analyzer, train.dataset, factor_args=factor_args,
                                      batch_size=batch, measure=meter.measure)
        elif stage == "pairwise":
            side.pairwise_scores(analyzer, queries.dataset, train.dataset,
                                 score_args=score_args, batch_size=batch,
                                 query_batch_size=args.queries)
        else:
            side.self_scores(analyzer, train.dataset, score_args=score_args, batch_size=batch)
    return meter.results


def describe_selection(model: torch.nn.Module, train: DataLoader, task: li.Task,
                       selection: str, args: argparse.Namespace) -> dict[str, Any]:
    """The layers ``selection`` tracks and our memory plan of its stages (None where this
    version of the library has no ``plan_memory``)."""
    from lightning_influence import memory

    options = fit_options(selection)
    tracker = options_tracker(model, options, task)
    shapes = tracker.describe()
    out: dict[str, Any] = {"layers": len(shapes),
                           "tracked_weights": sum(o * i for o, i in shapes.values()),
                           "left_out": getattr(tracker, "heads_left_out", []),
                           "plan": None, "plan_text": "plan: n/a"}
    plan_memory = getattr(memory, "plan_memory", None)
    if plan_memory is not None:
        try:
            plan = plan_memory(model, train, task, options, SCORE, num_queries=args.queries,
                               tracker=tracker)
        except Exception as err:  # noqa: BLE001 - the plan's failure is a result to show
            out["plan_text"] = f"plan failed: {type(err).__name__}: {err}"
        else:
            out["plan"] = {k: int(v) for k, v in plan.stages.items()}
            out["plan_text"] = plan.format()
    return out


def selections(choice: str) -> list[str]:
    return list(SELECTIONS) if choice == "both" else [choice]


# ------------------------------------------------------------------------------- the parent
def child_args(args: argparse.Namespace, stage: str, library: str, model: str, selection: str,
               work: Path) -> list[str]:
    out = ["--child", stage, "--library", library, "--model", model, "--selection", selection,
           "--work", str(work), "--sequences", str(args.sequences), "--length",
           str(args.length), "--batch-size", str(args.batch_size), "--queries",
           str(args.queries), "--layers", str(args.layers), "--threads", str(args.threads),
           "--device", args.device]
    return out + (["--smoke"] if args.smoke else [])


def measure(args: argparse.Namespace, stage: str, library: str, model: str, selection: str,
            work: Path) -> dict[str, Any]:
    """One (library, stage) in a fresh process or in this one; a failure is a result
    (``{"error": ...}``): a stage killed for memory says so in the table."""
    try:
        if args.isolation == "process":
            return harness.run_child(__file__, *child_args(args, stage, library, model,
                                                           selection, work),
                                     timeout=args.stage_timeout)
        return run_stage(stage, library, model, selection, args, work)
    except Exception as err:  # noqa: BLE001 - reported, and the other stages still run
        return {"error": error_line(err)}
    finally:
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def error_line(err: Exception) -> str:
    """The line that says why a stage failed: the exception's last line (a child's stderr
    ends with it), or how the child ended when it printed nothing (killed for memory)."""
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if isinstance(err, RuntimeError) and len(lines) <= 1 and "failed (-9)" in text:
        return "killed (SIGKILL: out of memory?)"
    return lines[-1] if lines else type(err).__name__


def configuration(args: argparse.Namespace, model: str, selection: str, floor: dict[str, Any],
                  libraries: list[str], work: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "selection": selection,
                           "parameters": floor.get("parameters"),
                           "floor": floor.get("stages", {}).get("floor"),
                           "floor_error": floor.get("error"),
                           **floor.get("selections", {}).get(selection, {})}
    for library in libraries:
        row[library] = {}
        for stage in STAGES[1:]:
            result = measure(args, stage, library, model, selection, work)
            if "error" in result:
                row[library][stage] = {"error": result["error"]}
                if stage == "fit":  # nothing to score with
                    break
                continue
            row[library].update(result["stages"])
    return row


def _cell(value: float | None, fmt: str) -> str:
    return "n/a" if value is None or value != value else format(value, fmt)


def table(row: dict[str, Any]) -> list[str]:
    """The markdown lines of one configuration."""
    floor_s = (row.get("floor") or {}).get("seconds")
    plan = row.get("plan") or {}
    lines = []
    for stage in ("fit", *FIT_PARTS, "pairwise", "self"):
        ours = row.get("ours", {}).get(stage, {})
        peer = row.get("kronfluence", {}).get(stage, {})
        if not ours and not peer:
            continue
        planned = max((plan.get(p, 0) for p in FIT_PARTS), default=0) if stage == "fit" \
            else plan.get(stage)
        planned = planned / 2**20 if planned else None
        o_s, k_s = ours.get("seconds"), peer.get("seconds")
        o_m, k_m = ours.get("peak_mb"), peer.get("peak_mb")
        lines.append([
            stage if stage not in FIT_PARTS else f"· {stage}",
            "failed" if "error" in ours else _cell(o_s, ".1f"),
            "failed" if "error" in peer else _cell(k_s, ".1f"),
            _cell(o_s / k_s if o_s and k_s else None, ".2f"),
            _cell(o_s / floor_s if o_s and floor_s else None, ".2f"),
            _cell(o_m, ",.0f"), _cell(k_m, ",.0f"),
            _cell(o_m / k_m if o_m and k_m else None, ".2f"),
            _cell(planned, ",.0f"), _cell(o_m / planned if o_m and planned else None, ".2f")])
    return harness.markdown_table(
        ["stage", "ours (s)", "Kronfluence (s)", "ours / Kronfluence", "ours / floor",
         "ours peak (MiB)", "Kronfluence peak (MiB)", "peak ours / Kronfluence", "plan (MiB)",
         "ours peak / plan"], lines)


def report(args: argparse.Namespace, bench: harness.Bench, rows: dict[str, dict[str, Any]],
           where: str, final: bool) -> None:
    names = {"gpt2": "GPT-2 small" if not args.smoke else "GPT-2 shape (smoke)",
             "llama": (f"Llama shape, {args.layers} blocks of hidden 2048 / intermediate 8192"
                       if not args.smoke else "Llama shape (smoke)")}
    peak = ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda")
            else "resident memory")
    lines = [f"{args.sequences} sequences x {args.length} random tokens, batch {args.batch_size},"
             f" {args.queries} queries, float32, {where}, each (library, stage) "
             f"{'in a fresh process' if args.isolation == 'process' else 'in this process'}; "
             f"peak = {peak} beyond the memory before the stage; {bench.load()}", ""]
    for row in rows.values():
        floor = row.get("floor") or {}
        left_out = row.get("left_out") or []
        lines += [f"### {names[row['model']]}, {row['selection']} selection", "",
                  f"{_cell(row.get('parameters'), ',')} parameters; {row.get('layers', 'n/a')} "
                  f"tracked layers, {_cell(row.get('tracked_weights'), ',')} tracked weights"
                  + (f" (left out: {', '.join(left_out)})" if left_out else "")
                  + f"; floor (one forward + backward over the data): "
                  f"{_cell(floor.get('seconds'), '.1f')} s, peak "
                  f"{_cell(floor.get('peak_mb'), ',.0f')} MiB"
                  + (f" (failed: {row['floor_error']})" if row.get("floor_error") else ""),
                  f"{row.get('plan_text', 'plan: n/a')}", "", *table(row), ""]
        for library in LIBRARIES:
            for stage, result in row.get(library, {}).items():
                if "error" in result:
                    lines.append(f"- {library} {stage} failed: {result['error']}")
        lines.append("")
    markdown = "\n".join(lines)
    data = {"settings": {k: v for k, v in vars(args).items() if k not in ("child", "library",
                                                                         "work")},
            "where": where, "results": rows}
    if final:
        bench.report("llm_scale", markdown, data)
    else:
        bench.write("llm_scale", markdown, data)


def describe_device(args: argparse.Namespace) -> str:
    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(args.device))} (CUDA)"
    return f"CPU, {args.threads} threads of {harness.cpus()}"


def parse_args() -> argparse.Namespace:
    p = harness.parser(__doc__, threads=2)
    p.add_argument("--model", choices=[*MODELS, "both"], default="both")
    p.add_argument("--selection", choices=[*SELECTIONS, "both"], default="both")
    p.add_argument("--layers", type=int, default=2, help="blocks of the Llama shape")
    p.add_argument("--libraries", default="ours,kronfluence",
                   help="comma-separated: ours, kronfluence (where it is importable)")
    p.add_argument("--sequences", type=int, default=None, help="training sequences (64)")
    p.add_argument("--length", type=int, default=None, help="tokens per sequence (128)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (8)")
    p.add_argument("--queries", type=int, default=None, help="query sequences (4)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--isolation", choices=["process", "none"], default=None,
                   help="each (library, stage) in a fresh process, or all in this one "
                        "(default: process on CPU, none on CUDA)")
    p.add_argument("--stage-timeout", type=float, default=None,
                   help="seconds after which a stage's process is killed (with --isolation "
                        "process)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes (width 64, 2 blocks, a vocabulary of 8192) and data "
                        f"({', '.join(f'{k} {v[1]}' for k, v in DATA.items())}): for tests")
    p.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--library", choices=LIBRARIES, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    for key, (real, smoke) in DATA.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else real)
    if args.isolation is None:
        args.isolation = "none" if args.device.startswith("cuda") else "process"
    return args


def main() -> None:
    args = parse_args()
    if args.child:  # one (library, stage) in a fresh process: its result is one JSON line
        torch.set_num_threads(args.threads)
        harness.child_result(run_stage(args.child, args.library, args.model, args.selection,
                                       args, Path(args.work)))
        return
    bench = harness.start(args, quiet=True)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here.")
    libraries = [lib.strip() for lib in args.libraries.split(",") if lib.strip()]
    unknown = sorted(set(libraries) - set(LIBRARIES))
    if unknown:
        raise SystemExit(f"--libraries: unknown {unknown}; choose among {list(LIBRARIES)}.")
    if "kronfluence" in libraries and harness.optional_peer() is None:
        print("Kronfluence is not importable here: its columns stay empty (run from "  # noqa: T201
              "benchmarks/.venv-kronfluence for them).")
        libraries.remove("kronfluence")
    where = describe_device(args)
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="llm_scale_") as tmp:
        work = Path(tmp)
        for model in (MODELS if args.model == "both" else [args.model]):
            floor = measure(args, "floor", "ours", model, args.selection, work)
            for selection in selections(args.selection):
                key = f"{model}/{selection}"
                rows[key] = configuration(args, model, selection, floor, libraries, work)
                report(args, bench, rows, where, final=False)
    report(args, bench, rows, where, final=True)


if __name__ == "__main__":
    main()
