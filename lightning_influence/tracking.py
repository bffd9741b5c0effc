"""Which layers are tracked, and their activations and output gradients as rows.

Index letters: N examples, R rows of a layer call's batch dimension (N, or a multiple of N when
the model reshapes its batch, e.g. multiple choice ``[N, C, T] -> [N*C, T]``), T rows per example
(tokens, or spatial positions of a convolution), I = d_in (+1 when the layer has a bias: a
constant 1 is appended to every activation row), O = d_out.

For a tracked layer, the gradient of the loss with respect to its weight matrix ``[W, b]`` of
shape ``[O, I]`` for one example is ``G_n = sum_t g_nt a_nt^T`` where ``a`` are the activation
rows ``[N, T, I]`` and ``g`` the output-gradient rows ``[N, T, O]`` this module hands out.

How output gradients are taken. A forward hook (run before any other hook of the layer) keeps the
layer's input and the *autograd edge* of its raw output ``z`` (``get_gradient_edge``), not the
output tensor itself: an in-place op after the layer (``ReLU(inplace=True)``), a view, or another
library's hook that replaces the output changes the tensor but not that edge, so the gradient is
exactly ``dL/dz``. Forwards that run again inside a backward (gradient checkpointing's
recomputation) are ignored, except where the first forward ran without autograd (reentrant
checkpointing): there the recomputed call's output gradient is recorded by a tensor hook during
one full backward, and the parameters' ``.grad`` are restored afterwards.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

__all__ = ["SUPPORTED_MODULES", "BATCH_LAYOUTS", "LAYER_PRESETS", "LAYER_FAMILIES",
           "VOCABULARY_HEAD_WIDTH", "TrackedLayer", "LayerTracker", "Capture", "is_supported",
           "preset_layers", "vocabulary_heads"]

log = logging.getLogger(__name__)

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
"""Module types tracked natively; Hugging Face ``transformers``' ``Conv1D`` (GPT-2's
projections: a Linear whose weight is stored ``[in, out]``) is recognised as well."""

BATCH_LAYOUTS = ("auto", "contiguous", "interleaved")

VOCABULARY_HEAD_WIDTH = 8192
"""A language model's head with at least this many outputs, one per token of the vocabulary,
is left out of the default layer selection (:func:`vocabulary_heads`): its output-gradient
covariance alone is ``O^2`` float64 numbers (512 MiB at 8192, 19 GiB for GPT-2's 50257) and its
eigendecomposition costs ``O^3``, more than every other layer together. LLM vocabularies have
32k-256k tokens; a character model's or a small BPE's head (96, 512) stays in."""

LAYER_FAMILIES: dict[str, str] = {
    "llama": "Llama, Mistral, Qwen2, Gemma",
    "phi3": "Phi-3",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX, Pythia",
    "falcon": "Falcon",
    "gptj": "GPT-J",
    "opt": "OPT",
    "phi": "Phi-1, Phi-2",
    "bert": "BERT, RoBERTa",
}
"""The Hugging Face model families whose module names :data:`LAYER_PRESETS` know."""

_MLP: dict[str, tuple[str, ...]] = {
    "llama": ("*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj"),
    "phi3": ("*.mlp.gate_up_proj", "*.mlp.down_proj"),
    "gpt2": ("*.mlp.c_fc", "*.mlp.c_proj"),
    "gpt_neox": ("*.mlp.dense_h_to_4h", "*.mlp.dense_4h_to_h"),
    "falcon": ("*.mlp.dense_h_to_4h", "*.mlp.dense_4h_to_h"),
    "gptj": ("*.mlp.fc_in", "*.mlp.fc_out"),
    "opt": ("*.layers.*.fc1", "*.layers.*.fc2"),
    "phi": ("*.mlp.fc1", "*.mlp.fc2"),
    # the MLP's output is `layer.<i>.output.dense`; the attention's is `attention.output.dense`
    "bert": ("*.intermediate.dense", "*.layer.[0-9].output.dense",
             "*.layer.[0-9][0-9].output.dense"),
}
_ATTENTION: dict[str, tuple[str, ...]] = {
    "llama": ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj",
              "*.self_attn.o_proj"),
    "phi3": ("*.self_attn.qkv_proj", "*.self_attn.o_proj"),
    "gpt2": ("*.attn.c_attn", "*.attn.c_proj"),
    "gpt_neox": ("*.attention.query_key_value", "*.attention.dense"),
    "falcon": ("*.self_attention.query_key_value", "*.self_attention.dense"),
    "gptj": ("*.attn.q_proj", "*.attn.k_proj", "*.attn.v_proj", "*.attn.out_proj"),
    "opt": ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj",
            "*.self_attn.out_proj"),
    "phi": ("*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj",
            "*.self_attn.dense"),
    "bert": ("*.attention.self.query", "*.attention.self.key", "*.attention.self.value",
             "*.attention.output.dense"),
}

LAYER_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "mlp": _MLP,
    "attention": _ATTENTION,
    "attention_mlp": {family: _ATTENTION[family] + _MLP[family] for family in LAYER_FAMILIES},
}
"""Named layer sets: ``{preset: {family: fnmatch patterns of module names}}`` (families:
:data:`LAYER_FAMILIES`). A preset selects every supported layer that a pattern of any family
matches, or whose name continues such a match with ``.`` (a LoRA adapter's ``lora_A.default``
inside ``mlp.up_proj``); the patterns of the other families simply match nothing, and a preset
that matches nothing in a model is refused. Chosen with ``FitOptions(layer_preset="mlp")``
(Hydra: ``+influence_layers=mlp``)."""


def _is_transposed_linear(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (recognised without importing transformers)."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() == 2)


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` can be tracked (see :data:`SUPPORTED_MODULES`)."""
    return isinstance(module, SUPPORTED_MODULES) or _is_transposed_linear(module)


def _supported_names() -> str:
    return ", ".join(f"nn.{cls.__name__}" for cls in SUPPORTED_MODULES) + \
        ", transformers Conv1D"


def preset_layers(model: nn.Module, preset: str) -> list[str]:
    """The supported layers of ``model`` that the layer preset ``preset`` selects (see
    :data:`LAYER_PRESETS`), in the model's order (frozen ones included: the tracker decides).

    Raises:
        ValueError: an unknown preset, or one that matches no supported layer of this model
            (the message lists the families the preset knows and the model's layers).
    """
    if preset not in LAYER_PRESETS:
        raise ValueError(f"layer_preset={preset!r} is not one of {sorted(LAYER_PRESETS)}.")
    patterns = sorted({p for family in LAYER_PRESETS[preset].values() for p in family})
    chosen = [name for name, module in model.named_modules() if name and is_supported(module)
              and any(_matches_or_inside(name, p)
                      for p in patterns)]
    if not chosen:
        known = "; ".join(f"{family} ({LAYER_FAMILIES[family]}): {', '.join(pats)}"
                          for family, pats in LAYER_PRESETS[preset].items())
        supported = [n for n, m in model.named_modules() if n and is_supported(m)]
        raise ValueError(
            f"Layer preset {preset!r} matches no supported layer of {type(model).__name__}. It "
            f"knows these model families: {known}. Name this model's layers with layers=[...] "
            f"instead (its supported layers: {supported[:20]}"
            f"{' ...' if len(supported) > 20 else ''})."
        )
    return chosen


def _matches_or_inside(name: str, pattern: str) -> bool:
    """Whether ``pattern`` matches ``name`` or a module that contains it (``<match>.<rest>``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def vocabulary_heads(model: nn.Module, names: Sequence[str],
                     min_width: int = VOCABULARY_HEAD_WIDTH) -> list[str]:
    """Those of the layers ``names`` (supported modules of ``model``) that map to a vocabulary
    of at least ``min_width`` tokens: the output embeddings of a Hugging Face model in
    ``model`` (``get_output_embeddings()``), or, where there is none, a layer with as many
    outputs as an ``nn.Embedding`` of ``model`` has entries."""
    modules = dict(model.named_modules())
    outputs: set[int] = set()
    for module in modules.values():
        get = getattr(module, "get_output_embeddings", None)
        if callable(get):
            try:
                head = get()
            except (NotImplementedError, AttributeError):
                head = None
            if isinstance(head, nn.Module):
                outputs.add(id(head))
    sizes = {m.num_embeddings for m in modules.values() if isinstance(m, nn.Embedding)}
    heads = []
    for name in names:
        module = modules[name]
        width = TrackedLayer(name, module).d_out
        if width < min_width:
            continue
        if id(module) in outputs if outputs else width in sizes:
            heads.append(name)
    return heads


def _in_backward() -> bool:
    """Whether the caller runs inside an autograd backward (checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


class TrackedLayer:
    """A supported module seen as a matrix ``[O, I]`` acting on activation rows."""

    def __init__(self, name: str, module: nn.Module) -> None:
        if not is_supported(module):
            raise TypeError(
                f"Layer {name!r} is a {type(module).__name__}, which influence tracking does not "
                f"support. Supported types: {_supported_names()}. Exclude it, or track only "
                "supported layers (layers=None tracks every supported layer)."
            )
        if isinstance(module, nn.Conv1d | nn.Conv2d):
            if module.groups != 1:
                raise TypeError(f"Layer {name!r}: grouped convolutions (groups={module.groups}) "
                                "are not supported; exclude the layer.")
            if module.padding_mode != "zeros":
                raise TypeError(f"Layer {name!r}: padding_mode={module.padding_mode!r} is not "
                                "supported (only 'zeros'); exclude the layer.")
        self.name = name
        self.module = module
        self.transposed = _is_transposed_linear(module)
        self.conv_dims = 2 if isinstance(module, nn.Conv2d) else 1 if isinstance(
            module, nn.Conv1d) else 0
        self.has_bias = getattr(module, "bias", None) is not None
        weight = module.weight
        self.d_out = weight.shape[1] if self.transposed else weight.shape[0]
        in_features = weight.shape[0] if self.transposed else weight[0].numel()
        self.d_in = in_features + int(self.has_bias)

    @property
    def shape(self) -> tuple[int, int]:
        """``(O, I)``: the layer's weight matrix with the bias as last column."""
        return (self.d_out, self.d_in)

    def activation_rows(self, x: Tensor) -> Tensor:
        """Module input -> activation rows ``[R, T, I]`` (bias column of ones appended)."""
        module = self.module
        if self.conv_dims:
            if x.dim() == self.conv_dims + 1:  # unbatched input
                x = x.unsqueeze(0)
            kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
            padding = module.padding
            if self.conv_dims == 1:  # a Conv1d is a Conv2d of height 1
                x = x.unsqueeze(-2)
                kernel, dilation, stride = (1, *kernel), (1, *dilation), (1, *stride)
                padding = padding if isinstance(padding, str) else (0, *padding)
            if isinstance(padding, str):
                if padding == "valid":
                    padding = (0, 0)
                else:  # "same"
                    pads = []
                    for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
                        total = d * (k - 1)
                        pads += [total // 2, total - total // 2]
                    x = F.pad(x, pads)
                    padding = (0, 0)
            rows = F.unfold(x, kernel, dilation=dilation, padding=padding,
                            stride=stride).transpose(1, 2)  # [R, T, C*kh*kw]
        else:
            if x.dim() < 2:
                raise ValueError(
                    f"Layer {self.name!r} got an input of shape {tuple(x.shape)}, without a "
                    "batch dimension: influence needs batched inputs (a DataLoader with "
                    "batch_size=None must yield whole batches)."
                )
            rows = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() != 2 else x.unsqueeze(1)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)
        return rows

    def gradient_rows(self, grad_output: Tensor) -> Tensor:
        """Gradient w.r.t. the module output -> rows ``[R, T, O]``."""
        if self.conv_dims:
            if grad_output.dim() == self.conv_dims + 1:
                grad_output = grad_output.unsqueeze(0)
            return grad_output.flatten(2).transpose(1, 2)
        if grad_output.dim() == 2:
            return grad_output.unsqueeze(1)
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])

    def weight_matrix(self) -> Tensor:
        """The parameters as one ``[O, I]`` matrix ``[W, b]``."""
        bias = self.module.bias if self.has_bias else None
        return self.params_to_matrix(self.module.weight, bias)

    def params_to_matrix(self, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Weight ``[..., *weight.shape]`` (and bias ``[..., O]``) -> ``[..., O, I]``; any leading
        batch dimensions are kept."""
        lead = weight.shape[: weight.dim() - self.module.weight.dim()]
        if self.transposed:
            m = weight.transpose(-1, -2)
        else:
            m = weight.reshape(*lead, self.d_out, -1)
        if self.has_bias:
            m = torch.cat([m, bias.reshape(*lead, self.d_out, 1)], dim=-1)
        return m

    def split_matrix(self, matrix: Tensor) -> dict[str, Tensor]:
        """Split ``[..., O, I]`` back into tensors shaped like the weight (and bias), leading
        batch dimensions kept."""
        lead = matrix.shape[:-2]
        w = matrix[..., : self.d_in - int(self.has_bias)]
        if self.transposed:
            w = w.transpose(-1, -2)
        out = {"weight": w.reshape(*lead, *self.module.weight.shape)}
        if self.has_bias:
            out["bias"] = matrix[..., -1].reshape(*lead, *self.module.bias.shape)
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.module.weight, getattr(self.module, "bias", None))
                if p is not None]

    def input_of(self, args: tuple, kwargs: dict) -> Tensor:
        """The input tensor of a call ``module(*args, **kwargs)`` (positional or keyword)."""
        if args:
            return args[0]
        for key in ("input", "x", "hidden_states"):
            if key in kwargs:
                return kwargs[key]
        tensors = [v for v in kwargs.values() if isinstance(v, Tensor)]
        if len(tensors) == 1:
            return tensors[0]
        raise TypeError(f"Layer {self.name!r} was called with keywords {sorted(kwargs)}; "
                        "influence tracking cannot tell which one is the input. Call it "
                        "positionally or with input=...")

@dataclass
class Capture:
    """What one forward pass recorded, per layer and per call of the layer (in call order).

    ``activations[name][i]`` are the activation rows of call ``i`` and ``edges[name][i]`` the
    autograd edge of its raw output, or ``None`` where that output did not require grad (a
    frozen path, or a forward without autograd such as a reentrant checkpoint's, whose
    recomputation during the backward fills ``recomputed``).
    """

    activations: dict[str, list[Tensor]] = field(default_factory=dict)
    edges: dict[str, list[GradientEdge | None]] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    recomputed: dict[str, list[list[Any]]] = field(default_factory=dict)
    collecting: bool = False
    batch_index: int | None = None  # the batch of a pass this forward ran on (for messages)

    def without_gradient(self) -> list[str]:
        """Layers that ran but none of whose calls had an output that requires grad."""
        return [name for name, edges in self.edges.items() if all(e is None for e in edges)]

    def layer_counts(self) -> dict[str, int]:
        """How many times each tracked layer ran."""
        return {name: len(acts) for name, acts in self.activations.items()}


class LayerTracker:
    """Hooks into the supported layers of a model chosen by name patterns.

    Args:
        model: the model whose layers are tracked.
        layers: ``fnmatch`` patterns of module names (e.g. ``["fc*", "blocks.*.mlp.*"]``), or
            ``None`` for every supported layer. A pattern that names an unsupported module, or that
            matches no supported module, raises a ``ValueError`` that lists the supported types.
        exclude: patterns of module names to leave out.
        include_frozen: also track layers whose weight does not require grad. By default
            only trainable layers are tracked (what a LoRA adapter or a partial fine-tune
            trains); a layer named exactly (no wildcard) is tracked either way, and so is every
            layer of a model that is frozen as a whole (e.g. after training; noted in the log).
        batch_layout: how the rows of a layer call map back to the examples of the batch when
            the model reshapes its batch dimension inside (R = k x N rows, e.g. multiple
            choice ``[N, C, T] -> [N*C, T]``): ``"contiguous"`` (rows ``n*k .. n*k+k-1`` are
            example ``n``: what ``x.view(N * C, ...)`` produces), ``"interleaved"`` (rows
            ``n, n+N, n+2N, ...``: ``x.transpose(0, 1).reshape(C * N, ...)``), or ``"auto"``
            (contiguous, verified on the first such batch by the gradient of one example's
            loss; a model that mixes examples otherwise is refused with this advice).
        preset: a named layer set of the common Hugging Face families (:data:`LAYER_PRESETS`:
            ``"mlp"``, ``"attention"``, ``"attention_mlp"``), added to ``layers``; it matches
            tolerantly (the other families' patterns match nothing) but refuses a model in
            which it matches nothing, listing the families it knows.
        language_model: the task is a language model's (a ``CausalLMTask``): with neither
            ``layers`` nor ``preset``, a head with as many outputs as a vocabulary of at least
            :data:`VOCABULARY_HEAD_WIDTH` tokens is left out (:func:`vocabulary_heads`), with a
            warning that says how to include it: name it in ``layers``.

    Embeddings (``nn.Embedding``) are not tracked. A tracked weight that another module also
    uses (a language model's ``lm_head`` tied to the input embedding) is tracked in its use as
    this layer only: the tracker notes it in the log (``tracker.notes``).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | str | None = None,
                 exclude: Sequence[str] | str | None = None, include_frozen: bool = False,
                 batch_layout: str = "auto", preset: str | None = None,
                 language_model: bool = False) -> None:
        if batch_layout not in BATCH_LAYOUTS:
            raise ValueError(f"batch_layout={batch_layout!r} is not one of {list(BATCH_LAYOUTS)}.")
        self.model = model
        self.batch_layout = batch_layout
        patterns = [layers] if isinstance(layers, str) else list(layers or [])
        excludes = [exclude] if isinstance(exclude, str) else list(exclude or [])
        named = [(n, m) for n, m in model.named_modules() if n]
        chosen: dict[str, nn.Module] = {}
        exact: set[str] = set()
        if not patterns and preset is None:
            chosen = {n: m for n, m in named if is_supported(m)}
        elif preset is not None:
            modules = dict(named)
            chosen = {n: modules[n] for n in preset_layers(model, preset)}
        for pattern in patterns:
            matches = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
            supported = [(n, m) for n, m in matches if is_supported(m)]
            if not supported:
                if matches:
                    kinds = sorted({type(m).__name__ for _, m in matches})
                    raise ValueError(
                        f"Layer pattern {pattern!r} matches only unsupported modules ({', '.join(kinds)}"
                        f"; e.g. {matches[0][0]!r}). Supported types: {_supported_names()}."
                    )
                raise ValueError(
                    f"Layer pattern {pattern!r} matches no module. Supported layers of this model: "
                    f"{[n for n, m in named if is_supported(m)][:20]}"
                )
            if not any(c in pattern for c in "*?["):
                leaf = matches[0][1]
                if not is_supported(leaf):
                    raise ValueError(f"Layer {pattern!r} is a {type(leaf).__name__}; supported "
                                     f"types: {_supported_names()}.")
                exact.add(pattern)
            chosen.update(supported)
        chosen = {n: m for n, m in chosen.items()
                  if not any(fnmatch.fnmatchcase(n, p) for p in excludes)}
        frozen = [n for n, m in chosen.items()
                  if not m.weight.requires_grad and n not in exact]
        all_frozen = bool(chosen) and len(frozen) == len(chosen)
        if not include_frozen and frozen and not all_frozen:
            chosen = {n: m for n, m in chosen.items() if n not in frozen}
        self.heads_left_out: list[str] = []
        if language_model and not patterns and preset is None:
            self.heads_left_out = vocabulary_heads(model, list(chosen))
            chosen = {n: m for n, m in chosen.items() if n not in self.heads_left_out}
        if not chosen:
            raise ValueError(
                f"No layer to track in {type(model).__name__}: influence needs at least one of "
                f"{_supported_names()} (layers={patterns or None}, exclude={excludes or None}"
                f"{f', preset={preset!r}' if preset else ''})"
                + (f"; the vocabulary-sized heads {self.heads_left_out} are left out by default: "
                   "name them in layers=[...] to track them." if self.heads_left_out else ".")
            )
        self.layers: dict[str, TrackedLayer] = {n: TrackedLayer(n, m) for n, m in chosen.items()}
        self.frozen_skipped = frozen if not include_frozen and not all_frozen else []
        self.notes = self._tied_weight_notes()
        if all_frozen and not include_frozen:
            self.notes.append(
                "every chosen layer is frozen (requires_grad=False, e.g. a model frozen after "
                "training): all of them are tracked; in a partly frozen model only the "
                "trainable layers are")
        self._layout_checked: set[str] = set()
        log.log(logging.INFO if self.frozen_skipped else logging.DEBUG,
                "lightning-influence tracks %d layers: %s%s", len(self.layers), self.names(),
                 f" (frozen layers left out: {self.frozen_skipped}; include_frozen=True "
                 "tracks them)" if self.frozen_skipped else "")
        for note in self.notes:
            if note in self.tie_warnings:  # changes what the scores mean: shown by default
                # one location: shown once per process by default, however many trackers
                warnings.warn(f"lightning-influence: {note}", UserWarning, stacklevel=1)
            else:
                log.info("lightning-influence: %s", note)
        for name in self.heads_left_out:
            width = TrackedLayer(name, dict(named)[name]).d_out
            log.warning(
                "lightning-influence leaves the vocabulary-sized head %r (%d outputs) out of a "
                "language model's default layer selection: its output-gradient covariance alone "
                "would hold %.1f GiB in float64 and its eigendecomposition would cost more than "
                "every other layer together. Name it in layers=[...] to track it (layers=['*'] "
                "tracks every supported layer, the head included).", name, width,
                8 * width ** 2 / 2 ** 30)

    def _tied_weight_notes(self) -> list[str]:
        """Notes on tracked weights that other modules use too (tied embeddings); those whose
        other use is not tracked (its share of the gradient is left out) are also kept in
        ``tie_warnings`` and warned about."""
        owners: dict[int, list[tuple[str, nn.Module]]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append((name, module))
        notes = []
        self.tie_warnings: list[str] = []
        for layer in self:
            others = [(n, m) for n, m in owners.get(id(layer.module.weight), [])
                      if m is not layer.module]
            for other, module in others:
                tracked = other in self.layers
                notes.append(
                    f"layer {layer.name!r} shares its weight with {other!r} "
                    f"({type(module).__name__}, {'also tracked' if tracked else 'not tracked'}): "
                    + ("the two uses are separate blocks of the curvature and their "
                       "cross terms are left out" if tracked else
                       f"influence through this weight counts its use as {layer.name!r} only; "
                       f"the gradient of its use as {other!r}, which can be a large part of "
                       "the shared weight's gradient, is left out of the factors and scores "
                       f"(exclude=[{layer.name!r}] leaves the shared weight out altogether)")
                )
                if not tracked:
                    self.tie_warnings.append(notes[-1])
        return notes

    def __iter__(self) -> Iterator[TrackedLayer]:
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def names(self) -> list[str]:
        return list(self.layers)

    def describe(self) -> dict[str, list[int]]:
        """``{name: [O, I]}`` for every tracked layer (stored with factors, checked on reload)."""
        return {name: list(layer.shape) for name, layer in self.layers.items()}

    def attach(self, cap: Capture | None = None) -> tuple[Capture, Callable[[], None]]:
        """Start recording the tracked layers' forwards into ``cap``; returns it and a function
        that stops recording. Unlike :meth:`capture` it changes neither the grad mode nor
        ``requires_grad``: it observes forwards that run anyway (e.g. a training step)."""
        cap = cap if cap is not None else Capture()

        def make_hook(layer: TrackedLayer):
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                if not isinstance(output, Tensor):
                    raise TypeError(f"Layer {layer.name!r} returned a {type(output).__name__}, "
                                    "not a tensor; it cannot be tracked. Exclude it.")
                x = layer.input_of(args, kwargs)
                if _in_backward():
                    # gradient checkpointing recomputes this call inside a backward: its rows
                    # were recorded in the forward, except after a forward without autograd
                    if cap.collecting and cap.pending.get(layer.name, 0) > 0 and \
                            output.requires_grad:
                        cap.pending[layer.name] -= 1
                        slot = [layer.activation_rows(x.detach()), None]
                        cap.recomputed.setdefault(layer.name, []).append(slot)

                        def keep(grad: Tensor, slot: list = slot) -> None:
                            slot[1] = grad.detach()
                        output.register_hook(keep)
                    return
                cap.activations.setdefault(layer.name, []).append(
                    layer.activation_rows(x.detach()))
                edge = get_gradient_edge(output) if output.requires_grad else None
                cap.edges.setdefault(layer.name, []).append(edge)
                if edge is None and not torch.is_grad_enabled():
                    cap.pending[layer.name] = cap.pending.get(layer.name, 0) + 1
            return hook

        handles = [layer.module.register_forward_hook(make_hook(layer), with_kwargs=True,
                                                      prepend=True) for layer in self]

        def detach() -> None:
            for h in handles:
                h.remove()
            handles.clear()
        return cap, detach

    @contextmanager
    def capture(self) -> Iterator[Capture]:
        """Record activation rows and output edges of every tracked layer during forwards
        (with gradients enabled and the tracked parameters requiring grad)."""
        previous = {}
        for layer in self:
            for p in layer.parameters():
                previous[p] = p.requires_grad
                p.requires_grad_(True)
        cap, detach = self.attach()
        try:
            with torch.inference_mode(False), torch.enable_grad():
                yield cap
        finally:
            detach()
            for p, flag in previous.items():
                p.requires_grad_(flag)

    def rows(self, cap: Capture, losses: Tensor, retain_graph: bool = False,
             ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per-layer ``(a [N, T, I], g [N, T, O])`` from a capture and per-example losses ``[N]``.

        The gradient rows are those of ``losses.sum()``: for a model whose examples do not
        interact in the forward pass (eval mode), row ``n`` holds example ``n``'s own gradient.
        Several calls of one layer (a shared module) are concatenated along T. ``retain_graph``
        keeps the graph for a later backward (the training step's own).
        """
        names = [n for n in self.layers if cap.activations.get(n)]
        if not any(e is not None for n in names for e in cap.edges[n]) and \
                not any(cap.pending.values()):
            raise RuntimeError(
                "No tracked layer produced an output that requires grad during this pass: the "
                "tracked layers did not run, or the forward ran under torch.no_grad()."
            )
        n_examples = losses.shape[0]
        flat = [(n, i) for n in names for i, e in enumerate(cap.edges[n]) if e is not None]
        if any(cap.pending.values()):
            grads = self._full_backward(cap, losses, flat, retain_graph)
        else:
            self._check_layout(cap, losses, flat)
            edges = [cap.edges[n][i] for n, i in flat]
            grads = dict(zip(flat, torch.autograd.grad(losses.sum(), edges, allow_unused=True,
                                                       retain_graph=retain_graph), strict=True))
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for name in names:
            layer = self.layers[name]
            pairs = []
            for i, (a, edge) in enumerate(zip(cap.activations[name], cap.edges[name],
                                              strict=True)):
                if edge is None:
                    continue  # no gradient reaches this call (or it is recomputed below)
                g = grads.get((name, i))
                g = layer.gradient_rows(g.detach()) if g is not None else torch.zeros(
                    a.shape[:-1] + (layer.d_out,), dtype=a.dtype, device=a.device)
                pairs.append((a, g))
            pairs += [(a, layer.gradient_rows(g)) for a, g in cap.recomputed.get(name, [])
                      if g is not None]
            if not pairs:
                continue
            pairs = [self._per_example(name, a, g, n_examples) for a, g in pairs]
            a = torch.cat([p[0] for p in pairs], dim=1) if len(pairs) > 1 else pairs[0][0]
            g = torch.cat([p[1] for p in pairs], dim=1) if len(pairs) > 1 else pairs[0][1]
            out[name] = (a, g)
        if not out:
            raise RuntimeError(
                "No gradient reached any tracked layer in this pass. Under reentrant gradient "
                "checkpointing (use_reentrant=True) gradients flow only when an input of the "
                "checkpointed block requires grad: use use_reentrant=False, or call "
                "model.enable_input_require_grads() on a Hugging Face model."
            )
        return out

    def _full_backward(self, cap: Capture, losses: Tensor, flat: list[tuple[str, int]],
                       retain_graph: bool) -> dict[tuple[str, int], Tensor]:
        """One ``backward()`` (no ``inputs``: reentrant checkpointing refuses them) that records
        the output gradients of recorded edges (node pre-hooks) and of recomputed calls (tensor
        hooks), then restores every parameter's ``.grad``."""
        grads: dict[tuple[str, int], Tensor] = {}
        handles = []
        for key in flat:
            edge = cap.edges[key[0]][key[1]]

            def pre(grad_outputs: tuple, key: tuple = key, nr: int = edge.output_nr) -> None:
                if grad_outputs[nr] is not None:
                    grads[key] = grad_outputs[nr]
            handles.append(edge.node.register_prehook(pre))
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        if not losses.requires_grad:
            raise RuntimeError(
                "The losses do not depend on any parameter through autograd. Under reentrant "
                "gradient checkpointing (use_reentrant=True) gradients flow only when an input of "
                "the checkpointed block requires grad: use use_reentrant=False, or call "
                "model.enable_input_require_grads() on a Hugging Face model."
            )
        cap.collecting = True
        try:
            losses.sum().backward(retain_graph=retain_graph)
        finally:
            cap.collecting = False
            for h in handles:
                h.remove()
            for p, g in zip(params, saved, strict=True):
                p.grad = g
        return grads

    def _per_example(self, name: str, a: Tensor, g: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Fold a call's ``R = k N`` rows into ``[N, k T, *]`` by the batch layout."""
        r = a.shape[0]
        if r == n and g.shape[0] == n:
            return a, g
        if r % n or g.shape[0] != r:
            raise ValueError(
                f"Layer {name!r} saw {r} rows in the batch dimension but the task returned {n} "
                "losses: its rows cannot be mapped to examples. Tracked layers must take "
                "batch-first inputs whose leading dimension is the batch (or a whole multiple of "
                "it, declared with batch_layout='contiguous' or 'interleaved'); exclude the "
                "layer otherwise."
            )
        k = r // n
        if self.batch_layout == "interleaved":
            a = a.reshape(k, n, *a.shape[1:]).transpose(0, 1)
            g = g.reshape(k, n, *g.shape[1:]).transpose(0, 1)
        return a.reshape(n, k * a.shape[-2], a.shape[-1]), g.reshape(n, k * g.shape[-2],
                                                                     g.shape[-1])

    def _check_layout(self, cap: Capture, losses: Tensor, flat: list[tuple[str, int]]) -> None:
        """With ``batch_layout="auto"``: on the first batch where a layer's rows are a multiple
        k > 1 of the examples, check with one example's gradient that its rows are the
        contiguous block ``0 .. k-1``."""
        n = losses.shape[0]
        todo = [(name, i) for name, i in flat if self.batch_layout == "auto" and n > 1
                and name not in self._layout_checked
                and cap.activations[name][i].shape[0] not in (n,)
                and cap.activations[name][i].shape[0] % n == 0]
        if not todo:
            return
        grads = torch.autograd.grad(losses[0], [cap.edges[name][i] for name, i in todo],
                                    allow_unused=True, retain_graph=True)
        for (name, _), grad in zip(todo, grads, strict=True):
            if grad is None:
                continue
            rows = self.layers[name].gradient_rows(grad)
            k = rows.shape[0] // n
            touched = rows.reshape(rows.shape[0], -1).abs().sum(dim=1) > 0
            if not bool(touched.any()):
                continue  # inconclusive: check again on a later batch
            if bool(touched[k:].any()):
                interleaved = not bool(touched.reshape(k, n)[:, 1:].any())
                hint = ("its rows are interleaved (rows n, n+N, ...): pass "
                        "batch_layout='interleaved'" if interleaved else
                        "its rows mix examples in a way neither layout describes: exclude it")
                raise ValueError(
                    f"Layer {name!r} sees {rows.shape[0]} rows for {n} examples, but the rows "
                    f"{touched.nonzero().flatten()[:8].tolist()} carry example 0's gradient, not "
                    f"the contiguous block 0..{k - 1}: {hint}."
                )
            self._layout_checked.add(name)

    def warn_unused(self, seen: set[str], where: str) -> None:
        """Warn about tracked layers that never ran during a pass."""
        missing = [n for n in self.layers if n not in seen]
        if missing:
            warnings.warn(
                f"Tracked layers {missing} never ran during {where} (or no gradient reached "
                "them); they get no curvature and no influence. Exclude them (exclude=[...]) if "
                "that is expected.",
                stacklevel=3,
            )
