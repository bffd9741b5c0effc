"""What each stage keeps in memory, planned before any pass, and the refusal when it cannot fit.

Index letters: O = d_out, I = d_in (+1 bias) per layer, D one side's width (I or O), B a block
width, Q queries, r query rank, N training examples, b batch size, T rows per example.

A plan counts, per stage, the bytes it needs beyond what is resident already (the model's
parameters and buffers):

- ``covariances`` (the covariance pass): every layer's sums of ``A [I, I]`` and ``S [O, O]``
  (``[K, B, B]`` per side with ``block_size``) in the accumulation dtype, plus the float32
  buffers of float64 sums; and one batch's working set;
- ``eigendecomposition``: layer by layer, each side's sums freed as its ``eigh`` (input copy,
  eigenvectors and LAPACK's workspace, about ``4 D^2`` numbers of the eigendecomposition's
  dtype) produces its eigenbasis in the storage dtype: the largest amount held at any point of
  that sequence;
- ``eigenvalues`` (the eigenvalue pass): the eigenbases, ``Lambda [O, I]`` sums, one batch;
- ``pairwise``: the factors, float32 copies of float64 factors (and Lambda's reciprocal), the
  preconditioned query gradients ``Q O I`` (or ``Q r (O + I)``), the kept ``[Q, N]`` scores,
  one batch;
- ``self``: the factors, their copies, one batch.

One batch's working set comes from a probe: one forward of the first example of the first
batch, without gradients (about one-hundredth of an epoch), whose module outputs give the bytes
autograd holds per example, the model's output width (a language model's logits, drawn from
and differentiated) and each tracked layer's rows per example.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_influence.blocks import basis_numel, block_count, padded_width
from lightning_influence.options import FitOptions, ScoreOptions, resolve_options
from lightning_influence.statistics import eigh_dtype_of, factor_dtypes
from lightning_influence.strategies import strategy as strategy_row
from lightning_influence.tracking import LAYER_PRESETS

__all__ = ["MemoryPlan", "MemoryPlanError", "BatchProfile", "Workload", "plan_memory",
           "plan_layers", "plan_scoring", "check_plan", "probe_batch", "available_memory",
           "estimate_bytes", "format_bytes", "format_estimate"]

log = logging.getLogger(__name__)

GIB = 2**30
EIGH_NUMBERS_PER_ENTRY = 4  # eigh: input copy, eigenvectors and syevd's ~2 D^2 workspace
CHUNK_ELEMENTS = 2**22  # the per-example chunks of the eigenvalue and self-influence passes
GRAPH_FACTOR = 1.0  # autograd's saved tensors (about every module output once)
OUTPUT_COPIES = 3  # a language model's logits: themselves, their log-softmax, their gradient


class MemoryPlanError(MemoryError):
    """A run whose memory plan does not fit what the device has: refused before any pass."""


@dataclass
class BatchProfile:
    """What one batch costs, from a probe of the model on one example.

    Attributes:
        batch_size: b, examples per batch.
        activation_bytes: bytes of every module output for one example (what autograd keeps).
        output_numel: numbers of the model's output for one example (a language model's logits).
        rows: each tracked layer's rows per example (T; 1 for a plain Linear).
        dtype_bytes: bytes per number of the rows.
    """

    batch_size: int = 1
    activation_bytes: int = 0
    output_numel: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    dtype_bytes: int = 4


@dataclass
class MemoryPlan:
    """Bytes each stage needs beyond the resident model, and each layer's share.

    Attributes:
        stages: ``{stage: bytes}`` (see the module docstring for what each counts).
        layers: ``{layer: {item: bytes}}``: ``covariances``, ``eigenbases``, ``eigenvalues``,
            ``query_gradients`` of each tracked layer.
        shapes: ``{layer: [O, I]}``.
        batch: one batch's working set (in every pass stage).
        resident: the model's parameters and buffers (allocated already, not in ``stages``).
        device: ``"cpu"`` or the CUDA device the model is on.
    """

    stages: dict[str, int]
    layers: dict[str, dict[str, int]]
    shapes: dict[str, list[int]]
    batch: int = 0
    resident: int = 0
    device: str = "cpu"
    inputs: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.get) if self.stages else ""

    @property
    def peak_bytes(self) -> int:
        return max(self.stages.values(), default=0)

    def format(self) -> str:
        """One line: each stage's bytes, the largest marked."""
        parts = [f"{k} {format_bytes(v)}" + (" (largest)" if k == self.peak_stage else "")
                 for k, v in self.stages.items()]
        return (f"memory plan ({self.device}, beyond the model's {format_bytes(self.resident)}): "
                + ", ".join(parts))

    def dominant(self, count: int = 3) -> list[tuple[str, int]]:
        """The layers that cost most, ``[(name, bytes)]``, largest first."""
        totals = {name: sum(v for k, v in items.items() if k != "query_gradients")
                  + items.get("query_gradients", 0) for name, items in self.layers.items()}
        return sorted(totals.items(), key=lambda kv: -kv[1])[:count]


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes a new allocation can take: free CUDA memory on a GPU; on the CPU the smaller of
    the kernel's ``MemAvailable`` and what the process's cgroup allows (containers, CI)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = _meminfo_available()
    limit = _cgroup_headroom()
    return min(v for v in (available, limit) if v is not None) if (available or limit) else \
        2**62


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_headroom() -> int | None:
    """``memory.max - memory.current`` of the process's cgroup (v2), or None."""
    try:
        path = Path("/proc/self/cgroup").read_text().strip().splitlines()[-1].split(":")[-1]
        base = Path("/sys/fs/cgroup") / path.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------- the probe
def probe_batch(model: nn.Module, loader: Any, task: Any, tracker: Any) -> BatchProfile:
    """One forward, without gradients, of the first example of ``loader``'s first batch:
    module outputs per example, the model's output width and each tracked layer's rows per
    example. Falls back to the whole first batch when the batch cannot be cut.

    The random number generators are left as they were: a shuffling loader draws its order
    from torch's generator when an iterator is made, and a probe before training must not
    change the user's training run."""
    with torch.random.fork_rng(devices=[]):
        return _probe_batch(model, loader, task, tracker)


def _probe_batch(model: nn.Module, loader: Any, task: Any, tracker: Any) -> BatchProfile:
    from lightning_influence.passes import evaluation_mode, model_device, move_to_device

    batch = next(iter(loader), None)
    if batch is None:
        return BatchProfile()
    batch_size = _batch_size(batch)
    one, n = _first_example(batch), 1
    if one is None:
        one, n = batch, batch_size
    outputs = {"bytes": 0}
    handles = []

    def count(module: nn.Module, args: Any, output: Any) -> None:
        outputs["bytes"] += sum(t.numel() * t.element_size() for t in _tensors(output))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad(), evaluation_mode(model), tracker.capture() as cap:
            out = task.forward(model, move_to_device(one, model_device(model)))
            logits = task.logits(out)
    except Exception as err:  # noqa: BLE001 - the pass itself reports the model's errors
        log.debug("memory probe failed (%s); planning without it", err)
        return BatchProfile(batch_size)
    finally:
        for h in handles:
            h.remove()
    rows = {name: max(1, sum(a.shape[0] * a.shape[1] for a in acts) // n)
            for name, acts in cap.activations.items()}
    first = next(iter(cap.activations.values()), [None])[0]
    return BatchProfile(batch_size, outputs["bytes"] // n, logits.numel() // n, rows,
                        first.element_size() if first is not None else 4)


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping) or hasattr(value, "values") and callable(value.values):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _batch_size(batch: Any) -> int:
    tensors = _tensors(batch)
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1


def _first_example(batch: Any) -> Any:
    """The batch cut to its first example (every tensor's first row), or None if not cuttable."""
    n = _batch_size(batch)
    if n <= 1 or any(t.dim() == 0 or t.shape[0] != n for t in _tensors(batch)):
        return None

    def cut(v: Any) -> Any:
        if isinstance(v, Tensor):
            return v[:1]
        if isinstance(v, Mapping):
            return type(v)({k: cut(x) for k, x in v.items()})
        if isinstance(v, tuple) and hasattr(v, "_fields"):
            return type(v)(*(cut(x) for x in v))
        if isinstance(v, list | tuple):
            return type(v)(cut(x) for x in v)
        return v
    try:
        return cut(batch)
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------- planning
@dataclass
class _Layer:
    name: str
    o: int
    i: int
    acc: int  # bytes per number of the sums
    store: int  # bytes per number of the stored factors
    pending: bool  # float32 buffers beside float64 sums
    rows: int  # rows per example
    solve: int = 8  # bytes per number of the eigendecomposition


def plan_layers(shapes: Mapping[str, list[int]], fit: FitOptions, batch: BatchProfile,
                score: ScoreOptions | None = None, workload: Workload | None = None,
                model_dtype: torch.dtype = torch.float32) -> MemoryPlan:
    """The plan of a fit (and, with ``score``, its scoring passes) from the layer shapes alone:
    what :func:`plan_memory` computes once the model has been probed. ``workload``: the
    queries (``num_queries``, ``query_rank``), ``num_train`` and whether the factors are
    resident already (``factors_resident``: scoring with fitted factors)."""
    workload = workload or Workload()
    num_queries, query_rank = workload.num_queries, workload.query_rank
    num_train = workload.num_train
    row = strategy_row(fit.strategy)
    kronecker, corrected = row.needs_covariances, row.needs_eigenvalue_pass
    solver = row.solver is not None
    layers = []
    for name, (o, i) in shapes.items():
        acc, store = factor_dtypes(fit.factor_dtype, i, o, model_dtype)
        layers.append(_Layer(name, o, i, _size(acc), _size(store), acc == torch.float64,
                             batch.rows.get(name, 1),
                             _size(eigh_dtype_of(fit.eigh_dtype, store) or torch.float64)))
    bs = fit.block_size
    rb = batch.dtype_bytes
    per_layer: dict[str, dict[str, int]] = {}
    for lay in layers:
        side = basis_numel(lay.i, bs) + basis_numel(lay.o, bs)
        per_layer[lay.name] = {
            "covariances": side * (lay.acc + (4 if lay.pending else 0)) if kronecker else 0,
            "eigenbases": side * lay.store if kronecker else 0,
            "eigenvalues": lay.o * lay.i * (lay.acc + lay.store) if (kronecker or corrected)
            and not solver else 0,
            "query_gradients": 4 * num_queries * (query_rank * (lay.o + lay.i) if query_rank
                                                   else lay.o * lay.i),
        }
    b = batch.batch_size
    rows_bytes = sum(rb * b * lay.rows * (lay.i + lay.o) for lay in layers)
    # rows in the eigenbasis: buffers as wide as the padded basis (blocks.rows_times), and the
    # one padded copy of a basis that a rotation makes at a time
    rotated_bytes = sum(rb * b * lay.rows * (_rotated_width(lay.i, fit.block_size)
                                             + _rotated_width(lay.o, fit.block_size))
                        for lay in layers) + max(
        (rb * dim * padded_width(dim) for lay in layers for dim in (lay.i, lay.o)
         if block_count(dim, fit.block_size) == 1), default=0)
    graph = int(GRAPH_FACTOR * b * batch.activation_bytes)
    outputs = OUTPUT_COPIES * 4 * b * batch.output_numel
    per_example = max((lay.o * lay.i * 4 for lay in layers if lay.rows > 1), default=0)
    batch_bytes = graph + outputs + rows_bytes  # the rows: every layer's a and g, once
    chunk = 2 * min(4 * CHUNK_ELEMENTS, b * per_example) if per_example else 0
    stages: dict[str, int] = {}
    sums = sum(v["covariances"] for v in per_layer.values())
    bases = sum(v["eigenbases"] for v in per_layer.values())
    lam_store = sum(lay.o * lay.i * lay.store for lay in layers) if not solver else 0
    lam_acc = sum(lay.o * lay.i * lay.acc for lay in layers) if not solver else 0
    if kronecker:
        stages["covariances"] = sums + batch_bytes + max(
            (_biggest_side(lay, bs) ** 2 * 4 for lay in layers), default=0)
        stages["eigendecomposition"] = _eigh_peak(layers, bs)
    if corrected and not solver:
        stages["eigenvalues"] = bases + lam_acc + batch_bytes + rotated_bytes + chunk
    factors = 0 if workload.factors_resident else bases + lam_store
    copies = sum((basis_numel(lay.i, bs) + basis_numel(lay.o, bs)) * rb
                 for lay in layers if lay.store != rb and kronecker) + \
        sum(lay.o * lay.i * rb for lay in layers)  # the reciprocal of Lambda + damping
    if score is not None:
        queries = sum(v["query_gradients"] for v in per_layer.values())
        if num_queries:
            kept = 8 * num_queries * num_train if score.keep_scores else 0
            stages["pairwise"] = factors + copies + queries + kept + batch_bytes + min(
                4 * 2**24, b * per_example)  # a chunk of per-example gradients
        stages["self"] = factors + copies + batch_bytes + rotated_bytes + chunk
    inputs = {"fit": fit, "batch": batch, "score": score, "workload": workload,
              "model_dtype": model_dtype}
    return MemoryPlan(stages, per_layer, {k: list(v) for k, v in shapes.items()}, batch_bytes,
                      inputs=inputs)


def _rotated_width(dim: int, block_size: int | None) -> int:
    """Width of the buffer of rows rotated into a side's eigenbasis (padded: whole blocks, or
    a multiple of 16 columns)."""
    k = block_count(dim, block_size)
    return padded_width(dim) if k == 1 else k * block_size


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _biggest_side(lay: _Layer, block_size: int | None) -> int:
    return max(min(d, block_size) if block_count(d, block_size) > 1 else d
               for d in (lay.i, lay.o))


def _eigh_peak(layers: list[_Layer], block_size: int | None) -> int:
    """The most held while the layers are decomposed one side at a time: the sums not yet
    taken, the eigenbases made so far and one ``eigh``'s float64 working set."""
    remaining = sum((basis_numel(lay.i, block_size) + basis_numel(lay.o, block_size))
                    * (lay.acc + (4 if lay.pending else 0)) for lay in layers)
    made = 0
    peak = 0
    for lay in layers:
        for dim in (lay.i, lay.o):
            numel = basis_numel(dim, block_size)
            width = dim if block_count(dim, block_size) == 1 else block_size
            peak = max(peak, remaining + made
                       + EIGH_NUMBERS_PER_ENTRY * lay.solve * width * width)
            remaining -= numel * (lay.acc + (4 if lay.pending else 0))
            made += numel * lay.store
    return peak


def plan_memory(model: nn.Module, loader: Any, task: Any = None,
                fit: FitOptions | None = None, score: ScoreOptions | None = None, *,
                num_queries: int = 0, tracker: Any = None, **overrides: Any) -> MemoryPlan:
    """The memory plan of fitting ``model``'s factors on ``loader`` (and, with ``score``,
    scoring ``num_queries`` queries against it), from the layer shapes and one probe forward of
    one example. ``overrides``: :class:`~lightning_influence.FitOptions` fields."""
    from lightning_influence.fitting import options_tracker
    from lightning_influence.passes import count_examples, model_device
    from lightning_influence.task import resolve_task

    fit = resolve_options(FitOptions, fit, overrides, "plan_memory()")
    task = resolve_task(task, model)
    tracker = tracker or options_tracker(model, fit, task)
    profile = probe_batch(model, loader, task, tracker)
    weight = next(iter(tracker)).module.weight
    workload = Workload(num_queries=num_queries, num_train=count_examples(loader))
    plan = plan_layers(tracker.describe(), fit, profile, score, workload, weight.dtype)
    plan.resident = sum(t.numel() * t.element_size()
                        for t in [*model.parameters(), *model.buffers()])
    plan.device = str(model_device(model))
    return plan


def plan_scoring(model: nn.Module, preconditioner: Any, train_loader: Any, task: Any,
                 tracker: Any, options: ScoreOptions, num_queries: int = 0) -> MemoryPlan:
    """The memory plan of a scoring pass with fitted factors (already in memory): the query
    gradients, the factors' working copies, the kept scores and one batch."""
    from lightning_influence.passes import count_examples, model_device

    layers = getattr(preconditioner, "layers", None) or {}
    dtypes = {lf.eigenvalues.dtype for lf in layers.values() if lf.eigenvalues is not None}
    factor_dtype = {torch.float64: "float64", torch.float32: "float32",
                    torch.bfloat16: "bfloat16"}.get(next(iter(dtypes)), "float32") \
        if len(dtypes) == 1 else "auto"
    blocks = {b for lf in layers.values() for b in lf.block_sizes().values()}
    fit = FitOptions(strategy=preconditioner.strategy, factor_dtype=factor_dtype,
                     block_size=min(blocks) if blocks else None, memory_limit="off")
    profile = probe_batch(model, train_loader, task, tracker)
    workload = Workload(num_queries=num_queries, num_train=count_examples(train_loader),
                        factors_resident=True)
    weight = next(iter(tracker)).module.weight
    plan = plan_layers(preconditioner.shapes, fit, profile, options, workload, weight.dtype)
    plan.stages = {k: v for k, v in plan.stages.items()
                   if k == ("pairwise" if num_queries else "self")}
    plan.resident = sum(t.numel() * t.element_size()
                        for t in [*model.parameters(), *model.buffers()])
    plan.device = str(model_device(model))
    return plan


# ------------------------------------------------------------------------------- refusal
def check_plan(plan: MemoryPlan, limit: Any, who: str) -> None:
    """Refuse a plan whose largest stage needs more than ``limit`` (``"auto"``: what the
    device has, a number of GiB, or ``"off"``), with the layers that dominate, what each
    costs and what would make it fit (each fix re-planned); log the plan otherwise."""
    log.info("lightning-influence: %s", plan.format())
    if limit == "off":
        return
    have = available_memory(plan.device) if limit == "auto" else int(float(limit) * GIB)
    need = plan.peak_bytes
    if need <= have:
        return
    where = "free CUDA memory" if plan.device.startswith("cuda") else (
        "available RAM" if limit == "auto" else "memory_limit")
    lines = [f"{who}: the memory plan needs {format_bytes(need)} at its largest stage "
             f"({plan.peak_stage}) beyond the model's {format_bytes(plan.resident)}, and "
             f"{format_bytes(have)} are {'allowed' if limit != 'auto' else 'available'} "
             f"({where}). Refused before any pass.", "The layers that cost most:"]
    for name, total in plan.dominant():
        items = plan.layers[name]
        o, i = plan.shapes[name]
        detail = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in items.items()
                           if v)
        lines.append(f"  - {name} [{o} x {i}]: {format_bytes(total)} ({detail})")
    if plan.inputs:
        lines.append("What would make it fit (each re-planned):")
        lines += [f"  - {fix}: {format_bytes(peak)} at its largest stage"
                  + ("" if peak <= have else " (still too much)") for fix, peak in _fixes(plan, have)]
    lines.append("To run anyway: memory_limit='off' (or a number of GiB) in FitOptions / "
                 "ScoreOptions.")
    raise MemoryPlanError("\n".join(lines))


def _fixes(plan: MemoryPlan, limit: int) -> list[tuple[str, int]]:
    """Changes that shrink the plan, with the peak each gives (everything else as asked)."""
    fit: FitOptions = plan.inputs["fit"]
    batch, score = plan.inputs["batch"], plan.inputs["score"]
    workload, dtype = plan.inputs["workload"], plan.inputs["model_dtype"]

    def replan(shapes: Mapping[str, list[int]], options: FitOptions) -> int:
        return plan_layers(shapes, options, batch, score, workload, dtype).peak_bytes
    out = []
    head = plan.dominant(1)[0][0]
    rest = {k: v for k, v in plan.shapes.items() if k != head}
    if rest:
        out.append((f"leave out {head} (exclude=[{head!r}])", replan(rest, fit)))
    patterns = {p for family in LAYER_PRESETS["mlp"].values() for p in family}
    mlp = {k: v for k, v in plan.shapes.items()
           if any(fnmatch.fnmatchcase(k, p) or fnmatch.fnmatchcase(k, p + ".*")
                  for p in patterns)}
    if mlp and len(mlp) < len(plan.shapes):
        out.append(("track the MLP layers only (layer_preset='mlp'; Hydra: "
                    "+influence_layers=mlp)", replan(mlp, fit)))
    for dtype in ("float32", "bfloat16"):
        if fit.factor_dtype != dtype:
            peak = replan(plan.shapes, dataclasses.replace(fit, factor_dtype=dtype))
            if peak < 0.95 * plan.peak_bytes:  # only what helps
                out.append((f"factor_dtype={dtype!r}", peak))
    widest = max(max(shape) for shape in plan.shapes.values())
    tried = []
    for block in (8192, 4096, 2048, 1024, 512, 256):
        if block < widest and (fit.block_size is None or block < fit.block_size):
            tried.append((block, replan(plan.shapes, dataclasses.replace(fit, block_size=block))))
            if tried[-1][1] <= limit:
                break
    if tried:
        block, peak = tried[-1]
        out.append((f"block-diagonal factors (block_size={block})", peak))
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# ------------------------------------------------------------------ the earlier estimate
@dataclass
class Workload:
    """What a stage processes at once (for :func:`estimate_bytes`).

    Attributes:
        num_queries: Q, the queries whose gradients are held.
        query_rank: r, their rank per layer (None: full).
        batch_size: b, examples per batch.
        rows_per_example: T, rows (tokens, positions) per example.
        num_train: N, training examples (for a kept score matrix).
        keep_scores: the whole ``[Q, N]`` matrix is kept.
        dtype_bytes: bytes per number of the rows and query gradients.
        factors_resident: the factors are in memory already (a plan of scoring with them).
    """

    num_queries: int = 0
    query_rank: int | None = None
    batch_size: int = 0
    rows_per_example: int = 1
    num_train: int = 0
    keep_scores: bool = False
    dtype_bytes: int = 4
    factors_resident: bool = False


def estimate_bytes(shapes: dict[str, list[int]], strategy: str = "ekfac",
                   workload: Workload | None = None, **fields: Any) -> dict[str, int]:
    """Bytes of each kind held at once, summed over the tracked layers, for a :class:`Workload`
    (its fields may also be keywords), with float64 factors: a quick estimate from the shapes
    alone (:func:`plan_memory` plans each stage, probing the model).

    - ``covariances``: the float64 sums of A ``[I, I]`` and S ``[O, O]`` (kfac, ekfac), and
      the float32 buffers that batches are multiplied into before they are added to them;
    - ``eigenbases``: Q_A and Q_S in float64 (kfac, ekfac);
    - ``eigenvalues``: Lambda ``[O, I]`` in float64 (diagonal, kfac, ekfac);
    - ``query_gradients``: ``Q x O x I`` (or ``Q x r x (O + I)`` at rank r) in the model dtype;
    - ``batch_rows``: one batch's activations and output gradients ``b x T x (I + O)``, plus
      its per-example gradients ``b x O x I`` for sequence layers;
    - ``forward_graph``: what autograd holds for the same batch while it runs, the tracked
      layers' saved inputs and their output gradients, ``b x T x (I + O)`` again;
    - ``model_outputs``: the widest tracked layer's outputs ``b x T x O`` four times over;
    - ``score_matrix``: ``Q x N`` float64, only when the full matrix is kept in memory.
    """
    w = resolve_options(Workload, workload, fields, "estimate_bytes()")
    row = strategy_row(strategy)
    kronecker = row.needs_covariances
    sq = sum(o * o + i * i for o, i in shapes.values())
    oi = sum(o * i for o, i in shapes.values())
    oplusi = sum(o + i for o, i in shapes.values())
    return {
        "covariances": (8 + 4) * sq if kronecker else 0,
        "eigenbases": 8 * sq if kronecker else 0,
        "eigenvalues": 8 * oi if "eigenvalues" in row.stored else 0,
        "query_gradients": w.dtype_bytes * w.num_queries * (
            w.query_rank * oplusi if w.query_rank else oi),
        "batch_rows": w.dtype_bytes * w.batch_size * (
            w.rows_per_example * oplusi + (oi if w.rows_per_example > 1 else 0)),
        "forward_graph": w.dtype_bytes * w.batch_size * w.rows_per_example * oplusi,
        "model_outputs": 4 * w.dtype_bytes * w.batch_size * w.rows_per_example * max(
            (o for o, _ in shapes.values()), default=0),
        "score_matrix": 8 * w.num_queries * w.num_train if w.keep_scores else 0,
    }


def format_estimate(estimate: dict[str, int]) -> str:
    """One line: each non-zero stage and the total."""
    parts = [f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in estimate.items() if v]
    return f"memory estimate: {', '.join(parts)}; total {format_bytes(sum(estimate.values()))}"

