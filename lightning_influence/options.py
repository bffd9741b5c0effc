"""Typed options: every fitting and scoring option, defined once.

:class:`FitOptions` says how curvature factors are fitted (strategy, damping, Fisher, layers,
dtypes, passes) and :class:`ScoreOptions` how scores are computed (top-k, what is kept,
precision, chunks). Each field's name, type, default and help text live here and nowhere else:

- the plain functions take them (``fit_factors(model, loader, task, FitOptions(...))``) and
  also accept any field as a keyword (``fit_factors(..., strategy="kfac")``), which overrides
  the object's value;
- the callbacks take them (``EigenCorrection(fit=FitOptions(...))``), with the everyday fields
  also as plain keywords;
- the Hydra configs are structured configs built from them (:mod:`lightning_influence.hydra`),
  so ``conf/`` and command-line overrides are type-checked against these fields and a
  misspelled key fails with Hydra's own message.

Like Kronfluence's ``FactorArguments`` / ``ScoreArguments``, each field carries its help in
``metadata["help"]``; :meth:`FitOptions.help` prints them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

__all__ = ["FitOptions", "ScoreOptions", "DocumentOptions", "ValidationOptions",
           "IndexOptions", "resolve_options", "callback_options", "option_help", "DEFAULT_FIT",
           "DEFAULT_DOCUMENTS", "DEFAULT_VALIDATION", "DEFAULT_INDEX", "CALLBACK_SCORE"]

# OmegaConf reads these annotations to validate Hydra configs: fields are typed with what it
# understands (primitives, ``X | None``, lists, Any).

FISHER_CHOICES = ("sampled", "exact", "empirical")
PRECISIONS = (None, "auto", "32", "bf16", "16")


def _help(text: str, **default: Any) -> Any:
    return field(metadata={"help": text}, **default)


@dataclass
class FitOptions:
    """How curvature factors are fitted: the strategy and damping, the Fisher, the tracked
    layers and how the passes over the training data run.

    Used by :func:`~lightning_influence.fit_factors`, :func:`~lightning_influence.fit_covariances`,
    the :class:`~lightning_influence.callbacks.InfluenceStatistics` and
    :class:`~lightning_influence.callbacks.EigenCorrection` callbacks, and Hydra
    (``callbacks.influence_eigen.fit.<field>=...``).
    """

    strategy: str = _help(
        "identity | diagonal | kfac | ekfac (fitted), or a solver: lissa | cg | explicit | "
        "arnoldi (callbacks only; see lightning_influence.solvers)", default="ekfac")
    damping: Any = _help(
        "a number (the same for every layer), 'heuristic' (damping_factor x the mean "
        "eigenvalue of each layer, the paper's default) or 'weight_decay' (the optimizer's); "
        "None means 'heuristic'", default="heuristic")
    damping_factor: float = _help("the heuristic's factor", default=0.1)
    weight_decay: float | None = _help(
        "the weight decay for damping='weight_decay' (the callbacks read the optimizer's)",
        default=None)
    fisher: str = _help(
        "sampled (one label per example drawn from the model, as in the paper and "
        "Kronfluence) | exact (every label weighted by its probability: no sampling noise, "
        "one backward per class; classification and regression) | empirical (the true "
        "labels; deterministic, for agreement checks)", default="sampled")
    layers: list[str] | None = _help(
        "fnmatch patterns of the module names to track; None: every trainable Linear, "
        "Conv1d, Conv2d and transformers Conv1D", default=None)
    exclude: list[str] | None = _help("patterns of module names to leave out", default=None)
    include_frozen: bool = _help(
        "also track layers whose weight does not require grad", default=False)
    layer_preset: str | None = _help(
        "a named layer set of the common Hugging Face families, added to layers: mlp | "
        "attention | attention_mlp (lightning_influence.tracking.LAYER_PRESETS; Hydra: "
        "+influence_layers=mlp)", default=None)
    batch_layout: str = _help(
        "how rows map to examples when the model reshapes its batch: auto | contiguous | "
        "interleaved", default="auto")
    factor_dtype: str = _help(
        "dtype the factors are accumulated and kept in: auto (float64 for layers whose "
        "covariances hold at most 2^22 numbers and for float64 models, float32 for wider "
        "ones) | float64 | float32 | bfloat16 (eigenbases and eigenvalues kept in bfloat16 "
        "after float32 sums; eigendecompositions as eigh_dtype says)", default="auto")
    eigh_dtype: str = _help(
        "dtype of the eigendecompositions: auto (the default: float64, except float32 for a "
        "side of float32 factors at least 1024 wide whose condition number a float64 Cholesky "
        "test shows to be at most 1e4: about 2x faster there; on GPT-2's MLP layers it moves "
        "the scores by 1.6e-3 of the largest, benchmarks/results/eigh_precision.md) | "
        "float64 (every side, as Kronfluence) | float32 (every side: "
        "it moves the scores beyond float error on ill-conditioned sides, Spearman 0.94 "
        "against float64 on the digits MLP, benchmarks/results/factor_precision.md)",
        default="auto")
    block_size: int | None = _help(
        "block-diagonal factors: a covariance side wider than this keeps only its diagonal "
        "blocks of this width (Grosse et al. 2023's approximation for their largest layers; "
        "memory D x B instead of D^2); None: whole factors", default=None)
    memory_limit: Any = _help(
        "checked before any pass: 'auto' (what the device has: available RAM, or free CUDA "
        "memory for a model on a GPU), a number of GiB, or 'off'; a plan that needs more is "
        "refused with the layers that dominate and what would make it fit", default="auto")
    row_dtype: str | None = _help(
        "None (rows as the model makes them) or 'bfloat16': the covariance products, "
        "eigenbasis rotations and per-example contractions of every pass in bfloat16 "
        "(3-4x faster where the hardware multiplies bfloat16); stored with the factors",
        default=None)
    seed: int = _help("seed of the label sampling", default=0)
    max_batches: int | None = _help("cap on the batches of each pass", default=None)
    batch_size: int | None = _help(
        "callbacks: batch size of the passes over the training data (default: the training "
        "loader's); the functions use the loader they are given", default=None)
    overwrite: bool = _help(
        "refit even when matching factors exist in the output folder", default=False)
    progress: bool = _help("show progress bars", default=True)

    def __post_init__(self) -> None:
        # validated here, before any pass; the imports are local to keep this module light
        from lightning_influence.factors import Damping
        from lightning_influence.passes import row_dtype_of
        from lightning_influence.strategies import ALL_STRATEGIES
        from lightning_influence.tracking import BATCH_LAYOUTS

        if self.damping is None:
            self.damping = "heuristic"
        if self.strategy not in ALL_STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}: strategy={self.strategy!r} is "
                             f"not one of {list(ALL_STRATEGIES)}.")
        Damping(self.damping, self.damping_factor, self.weight_decay)  # raises on bad values
        if self.fisher not in FISHER_CHOICES:
            raise ValueError(f"fisher={self.fisher!r} is not one of {list(FISHER_CHOICES)}.")
        if self.batch_layout not in BATCH_LAYOUTS:
            raise ValueError(f"batch_layout={self.batch_layout!r} is not one of "
                             f"{list(BATCH_LAYOUTS)}.")
        row_dtype_of(self.row_dtype)
        from lightning_influence.statistics import FACTOR_DTYPES
        if self.factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"factor_dtype={self.factor_dtype!r} is not one of "
                             f"{list(FACTOR_DTYPES)}.")
        if self.eigh_dtype not in ("auto", "float64", "float32"):
            raise ValueError(f"eigh_dtype={self.eigh_dtype!r} is not one of "
                             "['auto', 'float64', 'float32'].")
        _positive(self, "max_batches", "batch_size", "block_size")
        _memory_limit(self.memory_limit)
        for name in ("layers", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif value is not None:
                setattr(self, name, list(value))

    def damping_rule(self) -> Any:
        """The :class:`~lightning_influence.factors.Damping` these options describe."""
        from lightning_influence.factors import Damping
        return Damping(self.damping, self.damping_factor, self.weight_decay)

    @classmethod
    def help(cls) -> str:
        """Every option with its type, default and help, one per line."""
        return option_help(cls)


@dataclass
class ScoreOptions:
    """How influence scores are computed and kept.

    Used by :func:`~lightning_influence.compute_pairwise_scores`,
    :func:`~lightning_influence.compute_self_scores`, :class:`~lightning_influence.BoundInfluence`
    and the :class:`~lightning_influence.callbacks.InfluenceScores` callback (Hydra:
    ``callbacks.influence_scores.score.<field>=...``).
    """

    top_k: int = _help("proponents and opponents kept per query", default=10)
    keep_scores: bool = _help(
        "keep the whole [Q, N] score matrix in memory (the callback's default is False)",
        default=True)
    per_layer: bool = _help(
        "keep each layer's share of the scores ([L, Q, N] with keep_scores, and per top-k "
        "entry; the callback's default is True)", default=False)
    normalize: bool = _help(
        "divide scores by the number of training examples: the first-order change of the "
        "query loss when the example is removed", default=False)
    precision: str | None = _help(
        "None/'32' (the model's dtype) | 'bf16' | '16': the score pass's forward, backward and "
        "contractions under torch.autocast; 'auto' (callbacks): the Trainer's mixed "
        "precision", default=None)
    chunk_batches: int = _help("batches per resumable score file", default=16)
    memory_limit: Any = _help(
        "checked before the scoring pass: 'auto' (what the device has), a number of GiB, or "
        "'off' (see FitOptions.memory_limit)", default="auto")
    resumable: bool = _help(
        "callbacks: write score chunks under <output_dir>/score_chunks so that an interrupted "
        "pass resumes (the functions resume when given scores_dir)", default=True)
    batch_size: int | None = _help(
        "callbacks: batch size of the scoring passes (default: the loaders')", default=None)
    render: bool = _help(
        "callbacks: show examples in the logged tables (images or text)", default=True)
    progress: bool = _help("show progress bars", default=True)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}.")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {list(PRECISIONS)}.")
        _positive(self, "chunk_batches", "batch_size")
        _memory_limit(self.memory_limit)

    def autocast(self, trainer_precision: Any = None) -> Any:
        """The ``torch.autocast`` dtype of the score pass, or None (``"auto"`` reads
        ``trainer_precision``, e.g. ``"bf16-mixed"``)."""
        import torch
        precision = self.precision
        if precision == "auto":
            precision = str(trainer_precision or "32")
        if precision is None or not (precision.endswith("mixed") or precision in ("bf16", "16")):
            return None
        return torch.bfloat16 if precision.startswith("bf16") else torch.float16

    @classmethod
    def help(cls) -> str:
        """Every option with its type, default and help, one per line."""
        return option_help(cls)


@dataclass
class DocumentOptions:
    """How a language model's documents are scored against prompt + completion queries.

    Used by :func:`~lightning_influence.language.document_influence` and the
    :class:`~lightning_influence.callbacks.DocumentInfluence` callback (Hydra:
    ``callbacks.influence_documents.options.<field>=...``).
    """

    rank: int | None = _help(
        "rank per layer of the stored query gradients (truncated SVD); None: full rank",
        default=32)
    top_k: int = _help(
        "proponent and opponent documents kept per query (also the k of the recall table)",
        default=5)
    compare_full_rank: bool = _help(
        "also score with full-rank queries (one more pass) and report the Spearman "
        "correlation of the rank-limited scores with them", default=False)
    candidates: int | None = _help(
        "score only K candidate documents per query, chosen by the prefilter (None: every "
        "document, exact, and the prefilters' recall table is reported)", default=None)
    prefilter: str = _help(
        "tfidf (the K documents most similar to the query's text) | index (the K largest and "
        "the K most negative document estimates of the training-gradient index: needs index)",
        default="tfidf")
    index: str | None = _help(
        "folder of a training-gradient index of the corpus (lightning_influence.index); with "
        "it the recall table also shows the index's recall at each K", default=None)
    recall_ks: list[int] = _help("candidate-set sizes K of the recall table",
                                 default_factory=lambda: [5, 10, 20, 40])
    token_documents: int = _help(
        "top proponent and opponent documents per query shown token by token", default=2)
    render_tokens: int = _help(
        "tokens of a document shown (the window holding the most influence)", default=1200)
    batch_size: int = _help("batch size of the passes", default=32)
    progress: bool = _help("show progress bars", default=True)

    def __post_init__(self) -> None:
        _positive(self, "rank", "top_k", "candidates", "batch_size", "render_tokens")
        if self.prefilter not in ("tfidf", "index"):
            raise ValueError(f"prefilter={self.prefilter!r} is not one of ['tfidf', 'index'].")
        if self.prefilter == "index" and self.index is None:
            raise ValueError("prefilter='index' needs index=<folder of a training-gradient "
                             "index of the corpus> (build_index, or the InfluenceIndex callback).")
        if self.token_documents < 0:
            raise ValueError(f"token_documents must be >= 0, got {self.token_documents}.")
        self.recall_ks = [int(k) for k in self.recall_ks]

    @classmethod
    def help(cls) -> str:
        """Every option with its type, default and help, one per line."""
        return option_help(cls)


@dataclass
class ValidationOptions:
    """How fitted factors are checked against LiSSA (and PBRF) on a user's model.

    Used by :func:`~lightning_influence.evaluation.validate_influence` and the
    :class:`~lightning_influence.callbacks.InfluenceValidation` callback (Hydra:
    ``callbacks.influence_validation.options.<field>=...``).
    """

    num_train: int = _help("training examples sampled (seeded) for the comparison", default=100)
    seed: int = _help("seed of the training sample", default=0)
    lissa_iterations: int = _help(
        "depth of the LiSSA series (it needs about scale / damping iterations)", default=500)
    lissa_options: dict[str, Any] | None = _help(
        "other LiSSA arguments, e.g. {scale: 10.0, batch_size: 128, repeats: 1}", default=None)
    pbrf_examples: int = _help(
        "sampled training examples that also get PBRF (0: none; costly)", default=0)
    pbrf_options: dict[str, Any] | None = _help(
        "PBRF options, e.g. {epsilon: 0.001, max_iterations: 500}", default=None)

    def __post_init__(self) -> None:
        for name, low in (("num_train", 2), ("lissa_iterations", 2), ("pbrf_examples", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}.")
        if self.pbrf_examples > self.num_train:
            raise ValueError(f"pbrf_examples={self.pbrf_examples} exceeds num_train="
                             f"{self.num_train} (PBRF runs on the sampled examples).")
        self.lissa_options = dict(self.lissa_options) if self.lissa_options else None
        self.pbrf_options = dict(self.pbrf_options) if self.pbrf_options else None

    @classmethod
    def help(cls) -> str:
        """Every option with its type, default and help, one per line."""
        return option_help(cls)


def _memory_limit(value: Any) -> None:
    if value in ("auto", "off") or (isinstance(value, int | float) and not isinstance(value, bool)
                                    and value > 0):
        return
    raise ValueError(f"memory_limit={value!r}: use 'auto', 'off' or a positive number of GiB.")


def _positive(options: Any, *names: str) -> None:
    for name in names:
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}.")


OptionsT = TypeVar("OptionsT")

# Keywords of earlier versions, and what they are now.
_RENAMED: dict[str, tuple[str, Any]] = {
    # autocast=torch.bfloat16 (a dtype) -> precision="bf16"
    "autocast": ("precision", lambda v: None if v is None else
                 {"torch.bfloat16": "bf16", "torch.float16": "16",
                  "torch.float32": "32"}.get(str(v), v)),
}


def resolve_options(cls: type[OptionsT], options: OptionsT | Mapping[str, Any] | None,
                    overrides: Mapping[str, Any], who: str) -> OptionsT:
    """``options`` (an instance, a mapping such as a Hydra node, or None for the defaults) with
    ``overrides`` (keywords naming fields) applied; a keyword that is no field is a
    ``TypeError`` that lists the fields and names ``who`` was called."""
    if options is None:
        base = cls()
    elif isinstance(options, cls):
        base = options
    elif isinstance(options, Mapping) or hasattr(options, "items"):
        base = _from_mapping(cls, options, who)
    else:
        raise TypeError(f"{who}: options must be a {cls.__name__}, a mapping of its fields or "
                        f"None, got {type(options).__name__}.")
    if not overrides:
        return base
    changes = {}
    names = {f.name for f in fields(cls)}
    for key, value in overrides.items():
        if key in _RENAMED and _RENAMED[key][0] in names:
            key, value = _RENAMED[key][0], _RENAMED[key][1](value)
        if key not in names:
            raise TypeError(_unknown(cls, key, who))
        changes[key] = value
    return dataclasses.replace(base, **changes)


def _from_mapping(cls: type[OptionsT], mapping: Any, who: str) -> OptionsT:
    data = dict(mapping.items())
    data.pop("_target_", None)
    names = {f.name for f in fields(cls)}
    for key in data:
        if key not in names:
            raise TypeError(_unknown(cls, key, who))
    for key, value in data.items():  # OmegaConf containers -> plain lists and dicts
        if hasattr(value, "items"):
            data[key] = dict(value.items())
        elif hasattr(value, "__iter__") and not isinstance(value, str | bytes):
            data[key] = list(value)
    return cls(**data)


def _unknown(cls: type, key: str, who: str) -> str:
    import difflib
    names = [f.name for f in fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"{who} got an unknown option {key!r}.{hint} The {cls.__name__} fields are: "
            f"{', '.join(names)}.")


def option_help(cls: type) -> str:
    """One line per field: name, type, default and help."""
    lines = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


def callback_options(cls: type[OptionsT], options: OptionsT | Mapping[str, Any] | None,
                     shortcuts: Mapping[str, Any], legacy: Mapping[str, Any], who: str,
                     param: str) -> OptionsT:
    """A callback's options object: ``options`` (instance, mapping or None), then the keywords
    that earlier versions of the callback took flat (``legacy``: each must be a field; it
    works, with a deprecation warning naming the new spelling), then the callback's everyday
    keywords that are set (``shortcuts``: they win). Always a fresh copy."""
    import warnings

    names = {f.name for f in fields(cls)}
    for key in legacy:
        if key not in names:
            raise TypeError(_unknown(cls, key, f"{who}()").replace(
                f"The {cls.__name__} fields are",
                f"Pass them as {param}={cls.__name__}(...); its fields are"))
        warnings.warn(
            f"{who}({key}=...) is now {who}({param}={cls.__name__}({key}=...)) (Hydra: "
            f"<callback>.{param}.{key}); the old keyword still works.", DeprecationWarning,
            stacklevel=3)
    given = resolve_options(cls, options, legacy, f"{who}()")
    default = cls()
    for key, value in shortcuts.items():
        set_in_options = getattr(given, key)
        if set_in_options != getattr(default, key) and set_in_options != value:
            raise ValueError(
                f"{who}({key}={value!r}) and {param}.{key}={set_in_options!r} disagree; set "
                f"one of them.")
    return dataclasses.replace(resolve_options(cls, given, shortcuts, f"{who}()"))


DEFAULT_FIT = FitOptions()
"""The default of the callbacks' ``fit`` parameter (never modified: callbacks copy it)."""

DEFAULT_DOCUMENTS = DocumentOptions()
"""The default of :class:`~lightning_influence.callbacks.DocumentInfluence`' ``options``."""

DEFAULT_VALIDATION = ValidationOptions()
"""The default of :class:`~lightning_influence.callbacks.InfluenceValidation`' ``options``."""

CALLBACK_SCORE = ScoreOptions(keep_scores=False, per_layer=True, precision="auto")
"""The default of :class:`~lightning_influence.callbacks.InfluenceScores`' ``score``: the
callback keeps top-k lists rather than the whole matrix, with each layer's share (for the
layer-wise chart), and follows the Trainer's mixed precision."""


COMPRESSIONS = ("sketch", "eigen", "kronecker")
INDEX_DTYPES = ("float16", "bfloat16", "float32")


@dataclass
class IndexOptions:
    """How the training-gradient index is built and queried.

    Used by :func:`~lightning_influence.index.build_index`,
    :meth:`~lightning_influence.index.TrainingIndex.query` and the
    :class:`~lightning_influence.callbacks.InfluenceIndex` callback (Hydra:
    ``callbacks.influence_index.options.<field>=...``).
    """

    compression: str = _help(
        "sketch (a count-sketch of each example's whitened gradient in the EK-FAC eigenbasis: "
        "the measured default; any preconditioner) | eigen (the eigen-coordinates whose "
        "Lambda / (Lambda + damping) is largest) | kronecker (whitened Kronecker-structured "
        "projections of each layer's activations and output gradients)", default="sketch")
    width: int = _help("numbers stored per training example, over all tracked layers",
                       default=8192)
    dtype: str = _help("float16 | bfloat16 | float32: the stored codes' dtype",
                       default="float16")
    candidates: int | None = _help(
        "candidates per end (largest and most negative index estimates) re-ranked exactly per "
        "query; None: 2% of the training examples (at least top_k)", default=None)
    top_k: int = _help("proponents and opponents returned per query", default=10)
    rerank: bool = _help(
        "recompute the candidates' gradients and score them with the full preconditioner "
        "(exact scores); False returns the index estimates, marked as such", default=True)
    shard_batches: int = _help(
        "batches per shard file (an interrupted build loses at most one shard's work)",
        default=32)
    seed: int = _help("seed of the kronecker projections", default=0)
    verify: bool = _help("check every shard's checksum when the index is opened",
                         default=True)
    batch_size: int | None = _help(
        "callbacks: batch size of the build pass (default: the training loader's)",
        default=None)
    overwrite: bool = _help("rebuild even when a matching index exists in the folder",
                            default=False)
    progress: bool = _help("show progress bars", default=True)

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression={self.compression!r} is not one of "
                             f"{list(COMPRESSIONS)}.")
        if self.dtype not in INDEX_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {list(INDEX_DTYPES)}.")
        _positive(self, "width", "candidates", "top_k", "shard_batches", "batch_size")

    @classmethod
    def help(cls) -> str:
        """Every option with its type, default and help, one per line."""
        return option_help(cls)


DEFAULT_INDEX = IndexOptions()
"""The default of :class:`~lightning_influence.callbacks.InfluenceIndex`' ``options``."""
