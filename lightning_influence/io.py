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
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["atomic_write", "atomic_save_safetensors", "atomic_save_json", "atomic_save_csv",
           "check_writable", "csv_safe", "read_safetensors", "tensors_checksum",
           "update_with_tensor"]

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


def check_writable(folder: str | Path, what: str, option: str = "output_dir") -> Path:
    """Create ``folder`` and check that a file can be written there, before any expensive work;
    a clear error naming the folder, what stands in the way and the fix otherwise (``option``:
    the argument that named the folder)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"{what}: cannot write to {folder} ({_blocker(folder) or err.strerror or err}). "
            f"Point {option} at a writable folder, or fix the folder's permissions, before the "
            "passes run."
        ) from err
    return folder


def _blocker(folder: Path) -> str | None:
    """What keeps ``folder`` from being a folder: the first part of its path, from the root
    down, that is a dangling symbolic link or a file."""
    for part in [*reversed(folder.parents), folder]:
        if part.is_symlink() and not part.exists():
            return (f"{part} is a symbolic link to {os.readlink(part)}, which does not exist: "
                    "create its target or remove the link")
        if part.exists() and not part.is_dir():
            return f"{part} is a file, not a folder"
    return None


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the temporary file to ``path`` (same folder)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = _blocker(path.parent)
        if why is None:
            raise
        raise type(err)(err.errno, f"cannot create the folder {path.parent}: {why}") from err
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # as open() would create it, not mkstemp's 0600; after write(), which may replace the
        # file (safetensors writes its own 0600 temporary file and renames it onto ``tmp``)
        os.chmod(tmp, 0o666 & ~_umask())
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
    """Save tensors (made contiguous, on CPU) as a safetensors file, atomically. A failed
    write (a full disk) is an ``OSError`` naming the file, like any other file's."""
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(clean, tmp, metadata=metadata)
        except SafetensorError as err:  # safetensors' own type for its I/O errors
            raise OSError(f"could not write {path}: {err}") from err

    return atomic_write(path, write)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, read through one open file.

    A file replaced while it is read (``os.replace`` by another process) is read whole from
    the version that was opened: ``safetensors.safe_open`` reads the header through one open
    and the tensors through a second open by name (``torch.UntypedStorage.from_file``), which
    can pair one version's metadata with the next one's tensors.

    Raises:
        ValueError: not a (complete) safetensors file: the message says what is wrong.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise ValueError(f"a header of {length} bytes in a file of {size} bytes")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"its header is not valid JSON ({err})") from err
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise ValueError("its metadata is not a JSON object")
        start, data = 8 + length, size - 8 - length
        tensors = {}
        for name, info in sorted(header.items(), key=lambda kv: _offsets(kv[1])[0]):
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
            shape = info.get("shape") if dtype is not None else None
            begin, end = _offsets(info)
            if (dtype is None or not isinstance(shape, list)
                    or not all(isinstance(d, int) and d >= 0 for d in shape)
                    or not 0 <= begin <= end <= data):
                raise ValueError(f"tensor {name!r} has an invalid entry {info!r}")
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if nbytes != end - begin:
                raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {shape}")
            tensor = torch.empty(shape, dtype=dtype)
            fh.seek(start + begin)
            if nbytes and fh.readinto(tensor.view(-1).view(torch.uint8).numpy()) != nbytes:
                raise ValueError(f"tensor {name!r} is cut short")
            tensors[name] = tensor
    return tensors, metadata


def _offsets(info: Any) -> tuple[int, int]:
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)):
        return offsets[0], offsets[1]
    return -1, -1


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
    """Save rows of dicts as CSV (UTF-8) with the given columns, atomically; text cells are
    escaped with :func:`csv_safe`, and characters UTF-8 cannot hold (the lone surrogates of a
    file name that is not UTF-8) as ``\\udcNN``."""
    rows = [{k: csv_safe(v) for k, v in row.items()} for row in rows]

    def write(tmp: str) -> None:  # text that UTF-8 cannot hold (lone surrogates) escaped
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)
