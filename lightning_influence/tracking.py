"""Which layers are tracked, and their activations and output gradients as rows.

Index letters: N examples, T rows per example (tokens, or spatial positions of a convolution),
I = d_in (+1 when the layer has a bias: a constant 1 is appended to every activation row),
O = d_out.

For a tracked layer, the gradient of the loss with respect to its weight matrix ``[W, b]`` of
shape ``[O, I]`` for one example is ``G_n = sum_t g_nt a_nt^T`` where ``a`` are the activation
rows ``[N, T, I]`` and ``g`` the output-gradient rows ``[N, T, O]`` this module hands out.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SUPPORTED_MODULES", "TrackedLayer", "LayerTracker", "Capture"]

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def _supported_names() -> str:
    return ", ".join(f"nn.{cls.__name__}" for cls in SUPPORTED_MODULES)


class TrackedLayer:
    """A supported module seen as a matrix ``[O, I]`` acting on activation rows."""

    def __init__(self, name: str, module: nn.Module) -> None:
        if not isinstance(module, SUPPORTED_MODULES):
            raise TypeError(
                f"Layer {name!r} is a {type(module).__name__}, which influence tracking does not "
                f"support. Supported types: {_supported_names()}. Exclude it, or track only "
                "supported layers (layers=None tracks every supported layer)."
            )
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise TypeError(f"Layer {name!r}: grouped convolutions (groups={module.groups}) "
                                "are not supported; exclude the layer.")
            if module.padding_mode != "zeros":
                raise TypeError(f"Layer {name!r}: padding_mode={module.padding_mode!r} is not "
                                "supported (only 'zeros'); exclude the layer.")
        self.name = name
        self.module = module
        self.has_bias = module.bias is not None
        weight = module.weight
        self.d_out = weight.shape[0]
        self.d_in = weight[0].numel() + int(self.has_bias)

    @property
    def shape(self) -> tuple[int, int]:
        """``(O, I)``: the layer's weight matrix with the bias as last column."""
        return (self.d_out, self.d_in)

    def activation_rows(self, x: Tensor) -> Tensor:
        """Module input -> activation rows ``[N, T, I]`` (bias column of ones appended)."""
        module = self.module
        if isinstance(module, nn.Conv2d):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            padding = module.padding
            if isinstance(padding, str):
                if padding == "valid":
                    padding = (0, 0)
                else:  # "same"
                    pads = []
                    for k, d in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
                        total = d * (k - 1)
                        pads += [total // 2, total - total // 2]
                    x = F.pad(x, pads)
                    padding = (0, 0)
            rows = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                            stride=module.stride).transpose(1, 2)  # [N, T, C*kh*kw]
        else:
            rows = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() != 2 else x.unsqueeze(1)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)
        return rows

    def gradient_rows(self, grad_output: Tensor) -> Tensor:
        """Gradient w.r.t. the module output -> rows ``[N, T, O]``."""
        if isinstance(self.module, nn.Conv2d):
            if grad_output.dim() == 3:
                grad_output = grad_output.unsqueeze(0)
            return grad_output.flatten(2).transpose(1, 2)
        if grad_output.dim() == 2:
            return grad_output.unsqueeze(1)
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])

    def weight_matrix(self) -> Tensor:
        """The parameters as one ``[O, I]`` matrix ``[W, b]``."""
        w = self.module.weight.reshape(self.d_out, -1)
        if self.has_bias:
            w = torch.cat([w, self.module.bias.reshape(-1, 1)], dim=1)
        return w

    def split_matrix(self, matrix: Tensor) -> dict[str, Tensor]:
        """Split an ``[O, I]`` matrix back into tensors shaped like the weight (and bias)."""
        out = {"weight": matrix[:, : self.d_in - int(self.has_bias)].reshape(
            self.module.weight.shape)}
        if self.has_bias:
            out["bias"] = matrix[:, -1].reshape(self.module.bias.shape)
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.module.weight, self.module.bias) if p is not None]


@dataclass
class Capture:
    """What one forward pass recorded: per layer, activation rows and the output tensors."""

    activations: dict[str, list[Tensor]] = field(default_factory=dict)
    outputs: dict[str, list[Tensor]] = field(default_factory=dict)

    def clear(self) -> None:
        self.activations.clear()
        self.outputs.clear()


class LayerTracker:
    """Hooks into the supported layers of a model chosen by name patterns.

    Args:
        model: the model whose layers are tracked.
        layers: ``fnmatch`` patterns of module names (e.g. ``["fc*", "blocks.*.mlp.*"]``), or
            ``None`` for every supported layer. A pattern that names an unsupported module, or that
            matches no supported module, raises a ``ValueError`` that lists the supported types.
        exclude: patterns of module names to leave out.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | str | None = None,
                 exclude: Sequence[str] | str | None = None) -> None:
        self.model = model
        patterns = [layers] if isinstance(layers, str) else list(layers or [])
        excludes = [exclude] if isinstance(exclude, str) else list(exclude or [])
        named = [(n, m) for n, m in model.named_modules() if n]
        chosen: dict[str, nn.Module] = {}
        if not patterns:
            chosen = {n: m for n, m in named if isinstance(m, SUPPORTED_MODULES)}
        for pattern in patterns:
            matches = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pattern)]
            supported = [(n, m) for n, m in matches if isinstance(m, SUPPORTED_MODULES)]
            if not supported:
                if matches:
                    kinds = sorted({type(m).__name__ for _, m in matches})
                    raise ValueError(
                        f"Layer pattern {pattern!r} matches only unsupported modules ({', '.join(kinds)}"
                        f"; e.g. {matches[0][0]!r}). Supported types: {_supported_names()}."
                    )
                raise ValueError(
                    f"Layer pattern {pattern!r} matches no module. Supported layers of this model: "
                    f"{[n for n, m in named if isinstance(m, SUPPORTED_MODULES)][:20]}"
                )
            if not any(c in pattern for c in "*?["):
                leaf = matches[0][1]
                if not isinstance(leaf, SUPPORTED_MODULES):
                    raise ValueError(f"Layer {pattern!r} is a {type(leaf).__name__}; supported "
                                     f"types: {_supported_names()}.")
            chosen.update(supported)
        chosen = {n: m for n, m in chosen.items()
                  if not any(fnmatch.fnmatchcase(n, p) for p in excludes)}
        if not chosen:
            raise ValueError(
                f"No layer to track in {type(model).__name__}: influence needs at least one of "
                f"{_supported_names()} (layers={patterns or None}, exclude={excludes or None})."
            )
        self.layers: dict[str, TrackedLayer] = {n: TrackedLayer(n, m) for n, m in chosen.items()}

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
            def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
                cap.activations.setdefault(layer.name, []).append(
                    layer.activation_rows(inputs[0].detach()))
                if output.requires_grad:
                    cap.outputs.setdefault(layer.name, []).append(output)
            return hook

        handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in self]

        def detach() -> None:
            for h in handles:
                h.remove()
            handles.clear()
        return cap, detach

    @contextmanager
    def capture(self) -> Iterator[Capture]:
        """Record activation rows and output tensors of every tracked layer during forwards
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
        ``retain_graph`` keeps the graph for a later backward (the training step's own).
        """
        names = [n for n in self.layers if n in cap.outputs]
        flat = [o for n in names for o in cap.outputs[n]]
        if not flat:
            raise RuntimeError(
                "No tracked layer produced an output that requires grad during this pass: the "
                "tracked layers did not run, or the forward ran under torch.no_grad()."
            )
        grads = torch.autograd.grad(losses.sum(), flat, allow_unused=True,
                                    retain_graph=retain_graph)
        out: dict[str, tuple[Tensor, Tensor]] = {}
        i = 0
        n_examples = losses.shape[0]
        for name in names:
            layer = self.layers[name]
            acts, gs = [], []
            for a, o in zip(cap.activations[name], cap.outputs[name], strict=True):
                g = grads[i]
                i += 1
                g = torch.zeros_like(o) if g is None else g
                acts.append(a)
                gs.append(layer.gradient_rows(g.detach()))
            a = torch.cat(acts, dim=1) if len(acts) > 1 else acts[0]
            g = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
            if a.shape[0] != n_examples or g.shape[0] != n_examples:
                raise ValueError(
                    f"Layer {name!r} saw {a.shape[0]} rows in the batch dimension but the task "
                    f"returned {n_examples} losses; tracked layers must take batch-first inputs."
                )
            out[name] = (a, g)
        return out

    def warn_unused(self, seen: set[str], where: str) -> None:
        """Warn about tracked layers that never ran during a pass."""
        missing = [n for n in self.layers if n not in seen]
        if missing:
            warnings.warn(
                f"Tracked layers {missing} never ran during {where}; they get no curvature and "
                "no influence. Exclude them (exclude=[...]) if that is expected.",
                stacklevel=3,
            )
