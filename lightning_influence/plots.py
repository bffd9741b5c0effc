"""Figures written as PNG files: readable whatever the number of layers and the length of
their names.

Layer names of real models are long and mostly alike
(``model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default``): :func:`short_labels`
drops the dotted parts every name shares at its start and end, and shortens what is left in the
middle, keeping its distinguishing head and tail. Bar charts over layers are horizontal, one row
per layer, so the figure grows in height with the count and every label stays horizontal;
figures are laid out by matplotlib's constrained layout and saved with a tight bounding box, so
no title or label is cut.

Only ``matplotlib.figure.Figure`` is used (no pyplot): no GUI backend, no global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_influence.io import atomic_write

__all__ = ["short_labels", "ellipsize", "layer_bar_figure", "histogram_figure", "save_png",
           "MAX_LABEL_CHARS"]

MAX_LABEL_CHARS = 42  # longest axis label kept whole; longer ones are shortened in the middle
_ROW_INCHES = 0.24  # height of one layer's row in a horizontal bar chart
_FONT = 8


def ellipsize(text: str, limit: int = MAX_LABEL_CHARS) -> str:
    """``text`` cut to ``limit`` characters by replacing its middle with an ellipsis (the tail,
    which usually tells layers apart, keeps two thirds)."""
    if len(text) <= limit:
        return text
    tail = (limit - 1) * 2 // 3
    head = limit - 1 - tail
    return f"{text[:head]}\u2026{text[len(text) - tail:]}"


def short_labels(names: Sequence[str], limit: int = MAX_LABEL_CHARS) -> list[str]:
    """Short, distinct labels for dotted module names.

    Drops the dotted components all names share at the start and at the end (keeping the one
    before a block number: ``layers.0.mlp``; a single name keeps its last two), then shortens
    each label longer than ``limit`` in the middle. Labels that come out equal are told apart
    by their position (``#3 ...``).
    """
    parts = [str(n).split(".") for n in names]
    if not parts:
        return []
    shortest = min(len(p) for p in parts)
    head = 0
    while head < shortest - 1 and len({p[head] for p in parts}) == 1:
        head += 1
    tail = 0
    while tail < shortest - head - 1 and len({p[len(p) - 1 - tail] for p in parts}) == 1:
        tail += 1
    if head and any(p[head].isdigit() for p in parts):
        head -= 1  # "layers.0.mlp" reads better than "0.mlp"
    if len(parts) == 1:
        head, tail = max(0, len(parts[0]) - 2), 0
    labels = [ellipsize(".".join(p[head:len(p) - tail]) or str(n), limit)
              for p, n in zip(parts, names, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [ellipsize(f"#{i} {label}", limit) for i, label in enumerate(labels)]
    return labels


def _label_inches(labels: Sequence[str], fontsize: float = _FONT) -> float:
    """A generous width estimate of the widest label (about 0.62 em per character)."""
    longest = max((len(s) for s in labels), default=0)
    return 0.62 * fontsize / 72.0 * longest + 0.2


def layer_bar_figure(names: Sequence[str], values: Any, title: str, xlabel: str,
                     series: Sequence[str] | None = None) -> Any:
    """A horizontal bar chart with one row per layer (first layer at the top).

    Args:
        names: the layer names ``[L]`` (shortened here; the full names are in the CSV files).
        values: ``[L]`` one value per layer, or ``[S, L]`` one series per row of ``series``
            (grouped bars, e.g. one per query).
        title: the figure's title (wrapped, never cut).
        xlabel: what the values are.
        series: the names of the ``S`` series (a legend); None for a single series.

    Returns:
        A ``matplotlib.figure.Figure``; write it with :func:`save_png`.
    """
    from matplotlib.figure import Figure

    data = np.atleast_2d(np.asarray(values, dtype=float))  # [S, L]
    count = data.shape[1]
    if len(names) != count:
        raise ValueError(f"layer_bar_figure: {len(names)} names for {count} values per series.")
    labels = short_labels(names)
    groups = data.shape[0]
    row = _ROW_INCHES * max(1.0, 0.6 + 0.2 * groups)  # a row holds every series' bar
    height = 1.6 + row * max(count, 3)
    label_width = _label_inches(labels)
    width = max(6.5, 4.5 + label_width)
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(count, dtype=float)
    bar = 0.8 / groups
    colours = ["#3b6fb6", "#e07b39", "#3a9e5f", "#c8414b", "#8064a2", "#7f7f7f", "#b5a02f",
               "#2ab0b8"]
    for s in range(groups):
        offset = (s - (groups - 1) / 2) * bar
        ax.barh(y + offset, data[s], height=bar * 0.92, color=colours[s % len(colours)],
                label=None if series is None else str(series[s]))
    ax.set_yticks(y, labels, fontsize=_FONT)
    ax.set_ylim(count - 0.5, -0.5)  # the first layer on top
    ax.axvline(0, color="black", lw=0.6)
    ax.grid(axis="x", color="#dddddd", lw=0.6)
    ax.set_axisbelow(True)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_title(_wrap(title, width - label_width - 0.4), fontsize=10)  # centred on the axes
    if series is not None and groups > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def histogram_figure(values: Any, title: str, xlabel: str, bins: int = 60,
                     log_counts: bool = True) -> Any:
    """A histogram of ``values`` (non-finite values left out, counted in the title)."""
    from matplotlib.figure import Figure

    data = np.asarray(values, dtype=float).ravel()
    finite = data[np.isfinite(data)]
    dropped = data.size - finite.size
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    if finite.size:
        ax.hist(finite, bins=bins, color="#3b6fb6", edgecolor="white", linewidth=0.3,
                log=log_counts and finite.size > 1)
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("count (log scale)" if log_counts else "count", fontsize=9)
    suffix = f" ({dropped} non-finite left out)" if dropped else ""
    ax.set_title(_wrap(f"{title}: {finite.size:,} values{suffix}", 6.5), fontsize=10)
    ax.grid(axis="y", color="#dddddd", lw=0.6)
    ax.set_axisbelow(True)
    return fig


def _wrap(title: str, width_inches: float, fontsize: float = 10) -> str:
    """Wrap a title at spaces to ``width_inches`` (about 0.6 em per character)."""
    per_line = max(20, int(width_inches * 72 / (0.6 * fontsize)))
    words, lines, line = title.split(" "), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > per_line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines)


def save_png(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` atomically, with a tight bounding box (nothing cut)."""
    return atomic_write(Path(path), lambda tmp: fig.savefig(
        tmp, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.12, facecolor="white"))

