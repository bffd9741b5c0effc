"""Atomic files: write to a temporary file in the target folder, then rename over the target.

A reader (or a rerun after a crash) sees either the previous file or the complete new one, never
a half-written one.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

__all__ = ["atomic_write", "atomic_save_safetensors", "atomic_save_json", "atomic_save_csv"]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the temporary file to ``path`` (same folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save_safetensors(tensors: Mapping[str, Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> Path:
    """Save tensors (made contiguous, on CPU) as a safetensors file, atomically."""
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


def atomic_save_json(obj: Any, path: str | Path) -> Path:
    """Save JSON (indented, sorted keys), atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_save_csv(rows: Iterable[Mapping[str, Any]], path: str | Path,
                    columns: list[str]) -> Path:
    """Save rows of dicts as CSV with the given columns, atomically."""
    rows = list(rows)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)
