"""Kronfluence side of the EK-FAC benchmark (classification MLP on sklearn digits).

Run it with the separate Kronfluence venv (see benchmarks/README.md); it installs nothing:

    benchmarks/.venv-kronfluence/bin/python benchmarks/kronfluence_side.py

Semantics of Kronfluence 1.0.1 that this file relies on (read from its source):

* Loss scale. Kronfluence takes per-example gradients from the backward pass of whatever
  ``Task.compute_train_loss`` returns, so the loss must be SUMMED over the batch (a mean would scale
  every per-example gradient by 1/B). The covariance factors A and S are normalised by the number of
  rows fed to each layer (examples, or tokens for sequence inputs); Lambda is normalised by the
  number of EXAMPLES (``NUM_LAMBDA_PROCESSED += per_sample_gradient.size(0)``), i.e. a per-example
  second moment, not per-token.
* Fisher labels. Covariances and Lambda are fitted with ``compute_train_loss(..., sample=not
  FactorArguments.use_empirical_fisher)``: with the default ``use_empirical_fisher=False`` the task
  must draw labels itself (here: ``torch.multinomial`` on the detached softmax, using torch's global
  RNG, which we seed). ``use_empirical_fisher=True`` would use the true labels instead.
* Scores. pairwise[q, n] = grad f_q^T (G + damping)^-1 grad L_n with NO minus sign, i.e. the
  first-order change of the query measurement when training example n is REMOVED. With the
  measurement being the query loss, positive = the training example is helpful (removing it would
  raise the query loss); negative = harmful. Self-influence = grad L_n^T (G + damping)^-1 grad L_n
  (``use_measurement_for_self_influence=False``: it uses the training loss, not the measurement).
* Damping. ``ScoreArguments.damping_factor`` is an ABSOLUTE value added to every entry of each
  layer's (per-example) Lambda before inversion (EK-FAC: 1 / (Lambda + damping), in float64).
  Its default is 1e-8 (absolute), NOT the heuristic; ``damping_factor=None`` gives the heuristic
  ``0.1 * mean(Lambda)`` computed PER LAYER (HEURISTIC_DAMPING_SCALE = 0.1). The same applies to
  ``strategy="kfac"`` with Lambda = kron(eigvals(A), eigvals(S)).
* dtypes. FactorArguments: activation/gradient covariance, per-sample-gradient and lambda dtypes
  (float32 default), eigendecomposition_dtype (float64 default); ScoreArguments:
  per_sample_gradient/precondition/score/query_gradient_svd dtypes (float32 default). Damping and
  the reciprocal are always done in float64 (LAMBDA_DTYPE) and then cast to precondition_dtype.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from digits_protocol import make_digits, train_plain
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.utils.data import TensorDataset

ALL_MODULES = "all_modules"  # kronfluence.utils.constants.ALL_MODULE_NAME


class ClassificationTask(Task):
    """Cross-entropy task: summed training loss, model-sampled labels for the Fisher,
    and the query's own summed cross-entropy as the measurement."""

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                probs = torch.softmax(logits.detach(), dim=-1)
                labels = torch.multinomial(probs, num_samples=1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels, reduction="sum")


class CausalLMTask(Task):
    """Next-token task on ``(input_ids,)`` batches of full-length sequences, or on dict batches
    with ``input_ids`` and ``attention_mask`` (padding excluded from the loss and, through
    ``get_attention_mask``, from the covariances, as our ``CausalLMTask`` does; the mask is
    passed to a model whose ``forward`` takes one, as Hugging Face models do and ours passes
    it): the summed next-token cross-entropy, labels drawn per token from the model's softmax
    for the Fisher (only where the loss has a target), and the query's own summed loss as the
    measurement. ``modules``: the names of the modules to track (Kronfluence's
    ``get_influence_tracked_modules``; None: every Linear and Conv2d)."""

    def __init__(self, pad_token_id: int | None = None,
                 modules: Sequence[str] | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.modules = list(modules) if modules is not None else None

    def get_influence_tracked_modules(self) -> list[str] | None:
        return self.modules

    @staticmethod
    def _ids_mask(batch):
        if isinstance(batch, dict):
            return batch["input_ids"], batch["attention_mask"].bool()
        (ids,) = batch
        return ids, torch.ones_like(ids, dtype=torch.bool)

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        ids, mask = self._ids_mask(batch)
        takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
        out = model(ids, attention_mask=mask.long()) if isinstance(batch, dict) and takes_mask \
            else model(ids)
        logits = getattr(out, "logits", out)[:, :-1]  # a Hugging Face ModelOutput or a tensor
        logits = logits.reshape(-1, logits.shape[-1])
        valid = mask[:, 1:].reshape(-1)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
        else:
            labels = ids[:, 1:].reshape(-1)
        labels = labels.masked_fill(~valid, -100)
        return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)

    def get_attention_mask(self, batch):
        return self._ids_mask(batch)[1].long() if isinstance(batch, dict) else None


def run_kronfluence(
    model: torch.nn.Module,
    train_x,
    train_y,
    query_x,
    query_y,
    *,
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> dict:
    """Fit Kronfluence factors on (train_x, train_y) and score queries x train and train self-influence.

    The classification case of :func:`run_kronfluence_datasets` (which documents the keywords):
    the arrays become float ``dtype`` / long TensorDatasets and the task is ClassificationTask.
    """
    def as_dataset(x, y) -> TensorDataset:
        return TensorDataset(torch.as_tensor(x).to(dtype=dtype), torch.as_tensor(y).long())

    return run_kronfluence_datasets(model, as_dataset(train_x, train_y), as_dataset(query_x, query_y),
                                    task=ClassificationTask(), dtype=dtype, **kwargs)


def linear_from_conv1d(model: nn.Module) -> nn.Module:
    """``model`` with every Hugging Face ``Conv1D`` (GPT-2's projections: a Linear whose weight
    is stored ``[in, out]``) replaced in place by the ``nn.Linear`` it computes, under the same
    name: Kronfluence tracks ``nn.Linear`` and ``nn.Conv2d`` only."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
            continue
        d_in, d_out = module.weight.shape
        linear = nn.Linear(d_in, d_out, bias=module.bias is not None,
                           device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.T)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, linear)
    return model


def prepare_analyzer(
    model: torch.nn.Module,
    *,
    task: Task,
    strategy: str = "ekfac",
    damping: float | None,
    output_dir,
    name: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    cpu: bool = True,
    copy_model: bool = True,
) -> tuple[Analyzer, FactorArguments, ScoreArguments]:
    """Kronfluence's ``Analyzer`` over ``model`` (a deep copy unless ``copy_model=False``, which
    wraps the caller's model in place), with the factor and score arguments of this comparison
    (see :func:`run_kronfluence_datasets` for ``damping``, ``seed`` and ``dtype``). ``cpu``:
    False runs on the model's accelerator (Kronfluence's ``Analyzer(cpu=...)``). Factors and
    scores are kept under ``output_dir``/``name``..., so another process with the same
    arguments finds the factors fitted by an earlier one."""
    model = copy.deepcopy(model) if copy_model else model
    if cpu:
        model = model.to(device="cpu")
    model = model.to(dtype=dtype).eval()
    model = prepare_model(model=model, task=task)

    # Kronfluence's get_logger also sets the ROOT logger's level; restore it afterwards. Its own
    # logger keeps WARNING, which silences its per-step INFO messages.
    root_level = logging.getLogger().level
    analyzer = Analyzer(
        analysis_name=f"{name}_{strategy}_{str(dtype).replace('torch.', '')}_seed{seed}",
        model=model,
        task=task,
        cpu=cpu,
        log_level=logging.WARNING,
        disable_tqdm=True,
        output_dir=str(Path(output_dir)),
        disable_model_save=True,
    )
    logging.getLogger().setLevel(root_level)

    factor_args = FactorArguments(
        strategy=strategy,
        use_empirical_fisher=False,  # sample labels from the model's softmax
        covariance_max_examples=None,  # use the whole training set
        lambda_max_examples=None,
        activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=torch.float64,
        per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype,
    )
    score_args = ScoreArguments(
        damping_factor=damping,  # absolute; None -> 0.1 * mean(Lambda) per layer
        per_sample_gradient_dtype=dtype,
        precondition_dtype=dtype,
        score_dtype=dtype,
        query_gradient_svd_dtype=dtype,
    )
    return analyzer, factor_args, score_args


@contextmanager
def _quiet() -> Iterator[None]:
    """Kronfluence 1.0.1 builds a disabled torch.cuda.amp.GradScaler in every step
    (FutureWarning): silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*GradScaler.*", category=FutureWarning)
        yield


Measure = Callable[[str], AbstractContextManager]


def fit_factors_by_stage(analyzer: Analyzer, train_ds, *, factor_args: FactorArguments,
                         batch_size: int, seed: int = 0,
                         measure: Measure | None = None) -> dict[str, float]:
    """Kronfluence's fit as its three stages (what ``fit_all_factors`` runs), each timed and,
    with ``measure``, run inside ``measure(stage)``: ``covariances``,
    ``eigendecomposition``, ``eigenvalues`` (its Lambda). Returns each stage's seconds."""
    measure = measure or (lambda _: nullcontext())
    seconds = {}
    with _quiet():
        torch.manual_seed(seed)  # drives torch.multinomial in the tasks (Fisher labels)
        clock = harness.Stopwatch()
        with measure("covariances"):
            analyzer.fit_covariance_matrices(factors_name="factors", dataset=train_ds,
                                             per_device_batch_size=batch_size,
                                             factor_args=factor_args, overwrite_output_dir=True)
        seconds["covariances"] = clock.lap()
        with measure("eigendecomposition"):
            analyzer.perform_eigendecomposition(factors_name="factors", factor_args=factor_args,
                                                overwrite_output_dir=True)
        seconds["eigendecomposition"] = clock.lap()
        with measure("eigenvalues"):
            analyzer.fit_lambda_matrices(factors_name="factors", dataset=train_ds,
                                         per_device_batch_size=batch_size,
                                         factor_args=factor_args, overwrite_output_dir=True)
        seconds["eigenvalues"] = clock.lap()
    return seconds


def pairwise_scores(analyzer: Analyzer, query_ds, train_ds, *, score_args: ScoreArguments,
                    batch_size: int, query_batch_size: int | None = None) -> torch.Tensor:
    """Kronfluence's pairwise scores ``[Q, N]`` with the fitted factors (``"factors"``)."""
    with _quiet():
        analyzer.compute_pairwise_scores(
            scores_name="pairwise", factors_name="factors", query_dataset=query_ds,
            train_dataset=train_ds, per_device_query_batch_size=query_batch_size or batch_size,
            per_device_train_batch_size=batch_size, score_args=score_args,
            overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("pairwise")[ALL_MODULES]


def self_scores(analyzer: Analyzer, train_ds, *, score_args: ScoreArguments,
                batch_size: int) -> torch.Tensor:
    """Kronfluence's self-influence ``[N]`` with the fitted factors (``"factors"``)."""
    with _quiet():
        analyzer.compute_self_scores(scores_name="self", factors_name="factors",
                                     train_dataset=train_ds, per_device_train_batch_size=batch_size,
                                     score_args=score_args, overwrite_output_dir=True)
    return analyzer.load_self_scores("self")[ALL_MODULES]


def run_kronfluence_datasets(
    model: torch.nn.Module,
    train_ds,
    query_ds,
    *,
    task: Task,
    strategy="ekfac",
    damping: float | None,
    batch_size=128,
    output_dir,
    seed=0,
    dtype: torch.dtype = torch.float32,
    query_batch_size: int | None = None,
    name: str = "digits",
    cpu: bool = True,
) -> dict:
    """Fit Kronfluence factors on ``train_ds`` and score ``query_ds`` x ``train_ds`` and the
    training set's self-influence, with the Kronfluence ``task``.

    damping: None -> Kronfluence's heuristic (0.1 * mean of each layer's Lambda, per layer);
             a float -> that ABSOLUTE value added to every layer's Lambda (per-example scale,
             summed-loss gradients). Passed as ScoreArguments(damping_factor=damping).
    seed:    seeds torch's global RNG before fitting; it only drives the Fisher label sampling.
    dtype:   float32 (default) or float64 for the model copy and every Kronfluence dtype
             (the eigendecomposition is float64 either way).
    query_batch_size: queries per pass over the training set (default: batch_size).
    cpu:     False runs on the model's accelerator (see :func:`prepare_analyzer`).

    The caller's model is not modified (a deep copy is wrapped by ``prepare_model``).
    Returns {"pairwise": Tensor[Q, N], "self": Tensor[N], "fit_seconds", "pairwise_seconds",
    "self_seconds"}; scores are returned as float32 tensors for dtype=float32, float64 otherwise.
    """
    analyzer, factor_args, score_args = prepare_analyzer(
        model, task=task, strategy=strategy, damping=damping, output_dir=output_dir, name=name,
        seed=seed, dtype=dtype, cpu=cpu)
    fit_seconds = sum(fit_factors_by_stage(analyzer, train_ds, factor_args=factor_args,
                                           batch_size=batch_size, seed=seed).values())
    pairwise_seconds, pairwise = harness.timed(lambda: pairwise_scores(
        analyzer, query_ds, train_ds, score_args=score_args, batch_size=batch_size,
        query_batch_size=query_batch_size))
    self_seconds, self_influence = harness.timed(lambda: self_scores(
        analyzer, train_ds, score_args=score_args, batch_size=batch_size))
    assert pairwise.shape == (len(query_ds), len(train_ds)), pairwise.shape
    assert self_influence.shape == (len(train_ds),), self_influence.shape
    return {
        "pairwise": pairwise,
        "self": self_influence,
        "fit_seconds": fit_seconds,
        "pairwise_seconds": pairwise_seconds,
        "self_seconds": self_seconds,
    }


# --------------------------------------------------------------------------- smoke test


def make_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train_mlp(x, y, *, epochs: int = 30, seed: int = 0, lr: float = 1e-3, batch_size: int = 64):
    """The smoke test's 64-128-10 MLP, Adam, on the digits protocol's data and loop."""
    torch.manual_seed(seed)
    model = make_mlp()
    return train_plain(model, torch.optim.Adam(model.parameters(), lr=lr), x, y, epochs=epochs,
                       seed=seed, batch_size=batch_size)


def main() -> None:
    import tempfile

    import numpy as np
    from scipy.stats import spearmanr

    p = harness.parser(__doc__, threads=2, out=None)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--num-queries", type=int, default=100)
    p.add_argument("--damping", type=float, default=None, help="absolute; default: heuristic")
    p.add_argument("--strategy", default="ekfac")
    p.add_argument("--float64", action="store_true", help="also run once in float64")
    args = p.parse_args()

    bench = harness.start(args)
    print(f"{args.threads} threads, {bench.load(end=False)}")
    x_tr, y_tr, x_te, y_te = make_digits()
    model = train_mlp(x_tr, y_tr, epochs=args.epochs)
    with torch.no_grad():
        acc = (model(x_te).argmax(-1) == y_te).float().mean().item()
    print(f"MLP 64-128-10: train N={len(x_tr)}, test acc={acc:.4f}")
    qx, qy = x_te[: args.num_queries], y_te[: args.num_queries]

    def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(spearmanr(a.double().flatten().numpy(), b.double().flatten().numpy())[0])

    def per_query_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(np.mean([spearman(a[i], b[i]) for i in range(a.shape[0])]))

    with tempfile.TemporaryDirectory(prefix="kronfluence_") as tmp:
        runs = {}
        for seed in (0, 1):
            r = run_kronfluence(model, x_tr, y_tr, qx, qy, strategy=args.strategy,
                                damping=args.damping, output_dir=tmp, seed=seed)
            runs[seed] = r
            print(f"seed={seed}: pairwise {tuple(r['pairwise'].shape)} {r['pairwise'].dtype}, "
                  f"self {tuple(r['self'].shape)}; fit {r['fit_seconds']:.2f}s, "
                  f"pairwise {r['pairwise_seconds']:.2f}s, self {r['self_seconds']:.2f}s")
        a, b = runs[0], runs[1]
        print(f"self-agreement seed 0 vs 1 (label-sampling noise), damping={args.damping}:")
        print(f"  pairwise Spearman (all Q*N)      = {spearman(a['pairwise'], b['pairwise']):.4f}")
        print(f"  pairwise Spearman (mean per query) = "
              f"{per_query_spearman(a['pairwise'], b['pairwise']):.4f}")
        print(f"  pairwise Pearson  (all Q*N)      = "
              f"{float(np.corrcoef(a['pairwise'].flatten(), b['pairwise'].flatten())[0, 1]):.4f}")
        k = 10
        overlap = np.mean([
            len(set(a["pairwise"][i].topk(k).indices.tolist())
                & set(b["pairwise"][i].topk(k).indices.tolist())) / k
            for i in range(a["pairwise"].shape[0])
        ])
        print(f"  top-{k} most-helpful overlap per query = {overlap:.3f}")
        print(f"  self-influence Spearman          = {spearman(a['self'], b['self']):.4f}")
        # Sign sanity check (positive = helpful): how often the most positive training example
        # shares the query's label.
        top = a["pairwise"].argmax(dim=1)
        print(f"  top-1 (most positive) train example has the query's label: "
              f"{(y_tr[top] == qy).float().mean().item():.2f}")
        if args.float64:
            r64 = run_kronfluence(model, x_tr, y_tr, qx, qy, strategy=args.strategy,
                                  damping=args.damping, output_dir=tmp, seed=0,
                                  dtype=torch.float64)
            rel = ((r64["pairwise"] - a["pairwise"].double()).norm()
                   / r64["pairwise"].norm()).item()
            print(f"float64 seed=0: fit {r64['fit_seconds']:.2f}s, pairwise "
                  f"{r64['pairwise_seconds']:.2f}s, self {r64['self_seconds']:.2f}s; "
                  f"rel. diff vs float32 = {rel:.2e}")
    print(bench.load())


if __name__ == "__main__":
    main()
