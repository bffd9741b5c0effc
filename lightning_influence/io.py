"""Atomic files: write to a temporary file in the target folder, then rename over the target.

A reader (or a rerun after a crash) sees either the previous file or the complete new one, never
a half-written one. Files get the permissions the process's umask gives any new file (the
temporary file's private 0600 is not kept), and CSV cells from text that a spreadsheet would run
as a formula are escaped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["atomic_write", "atomic_save_safetensors", "atomic_save_json", "atomic_save_csv",
           "check_writable", "csv_safe", "tensors_checksum", "update_with_tensor"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tensors_checksum(tensors: Mapping[str, Tensor], text: str = "") -> str:
    """SHA-256 over tensors (name, dtype, shape and bytes, sorted by name) and ``text``: any
    flipped byte, missing tensor or edited field changes it."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(f"{key}|".encode())
        update_with_tensor(digest, tensors[key], "{dtype}|{shape}|")
    digest.update(text.encode())
    return digest.hexdigest()


def update_with_tensor(digest: Any, tensor: Tensor, head: str = "{dtype}{shape}") -> None:
    """Feed a tensor to a hash: ``head`` (its dtype and shape) then its raw bytes, whatever the
    dtype (bfloat16 included) or device."""
    t = tensor.detach().cpu().contiguous()
    digest.update(head.format(dtype=t.dtype, shape=list(t.shape)).encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def check_writable(folder: str | Path, what: str) -> Path:
    """Create ``folder`` and check that a file can be written there, before any expensive work;
    a clear error naming the folder and the fix otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"{what}: cannot write to {folder} ({err.strerror or err}). Point output_dir at a "
            "writable folder, or fix the folder's permissions, before the passes run."
        ) from err
    return folder


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the temporary file to ``path`` (same folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it, not mkstemp's 0600
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


def csv_safe(value: Any) -> Any:
    """A text cell that starts like a spreadsheet formula (``=``, ``+``, ``-``, ``@``, tab, CR)
    gets a leading ``'`` so that spreadsheets show it as text (OWASP's CSV-injection advice);
    numbers and other values are kept as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def atomic_save_csv(rows: Iterable[Mapping[str, Any]], path: str | Path,
                    columns: list[str]) -> Path:
    """Save rows of dicts as CSV with the given columns, atomically; text cells are escaped
    with :func:`csv_safe`."""
    rows = [{k: csv_safe(v) for k, v in row.items()} for row in rows]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)
