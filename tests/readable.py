"""Checks that a written PNG is a readable picture: not a strip, not blank (shared by the tests
of the plots and of the recipes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def assert_readable_png(path: str | Path, min_side: int = 250, max_aspect: float = 6.0) -> None:
    """The PNG at ``path`` is at least ``min_side`` pixels on each side, no more than
    ``max_aspect`` times longer than wide (or wider than long) and not a blank page."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG", path
        width, height = image.size
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert min(width, height) >= min_side, (path, image.size)
    assert max(width, height) <= max_aspect * min(width, height), (path, image.size)
    assert pixels.std() > 10, f"{path} is (nearly) blank"
    # something is drawn in at least a tenth of the rows (a plot, not a squashed strip)
    assert (pixels < 200).any(axis=1).mean() > 0.1, path


def _longest_runs(mask: np.ndarray) -> np.ndarray:
    """The longest run of True along the last axis, per row."""
    best = np.zeros(mask.shape[0], dtype=np.int64)
    current = np.zeros(mask.shape[0], dtype=np.int64)
    for column in mask.T:
        current = np.where(column, current + 1, 0)
        best = np.maximum(best, current)
    return best


def plot_area(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` in pixels of the plot area of a PNG chart, read from the picture:
    the longest straight dark lines (the axes frame's spines) across and down."""
    from PIL import Image

    with Image.open(path) as image:
        dark = np.asarray(image.convert("L")) < 80
    return int(_longest_runs(dark).max()), int(_longest_runs(dark.T).max())


def assert_output_pngs_readable(folder: str | Path, at_least: int = 1) -> list[Path]:
    """Every PNG a run wrote under ``folder`` (W&B's own run folders aside: those hold the
    logged example images) is readable; returns them."""
    pngs = [p for p in Path(folder).rglob("*.png") if "wandb" not in p.parts]
    assert len(pngs) >= at_least, f"expected at least {at_least} PNG files under {folder}"
    for path in pngs:
        assert_readable_png(path)
    return pngs
