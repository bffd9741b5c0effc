"""The index on disk: a manifest and memory-mapped shards of codes, written atomically.

Index letters: n training examples in a shard, D numbers per example (the code width).

A folder holds

- ``index.safetensors``: the manifest. Its tensors are the compression (eigenvectors, kept
  coordinates and scales, or projections) and its header holds the metadata with a checksum of
  both, exactly like a factor file: what the index was built for (the factors' signature and
  model fingerprint, the tracked layers and their shapes, the compression, the codes' dtype, the
  training data's identity: ``data_fingerprint`` of the loader, its examples and batches) and,
  once the build has finished, the shards with their row counts and checksums.
  ``index.json`` is a readable copy that is never read back.
- ``shard-r<rank>-b<first batch>.safetensors``: ``codes [n, D]`` (float16, bfloat16 or float32),
  ``indices [n]`` (training positions) and ``batches`` (the loader's batch indices it covers),
  with the build's identity and a checksum in its header. Each rank of a distributed build
  writes its own shards; one shard is written per ``shard_batches`` batches, by one rename, so
  a killed build keeps every finished shard and a rerun builds only the batches that are
  missing.

Reading maps a shard's codes straight from the file (``numpy.memmap`` at the tensor's offset
in the safetensors layout): searching reads the pages it needs, never a copy of the index.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from lightning_influence.distributed import rank
from lightning_influence.factors import (  # the factor files' checksum and check
    checked_metadata,
    content_checksum,
)
from lightning_influence.io import atomic_save_json, atomic_save_safetensors, tensors_checksum

__all__ = ["IndexMismatchError", "CorruptIndexError", "IncompleteIndexError", "MANIFEST",
           "FORMAT_VERSION", "write_manifest", "read_manifest", "ShardWriter", "Shard",
           "shard_files", "read_shard", "DTYPES"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "index"
_HEADER_KEY = "lightning_influence_index"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NUMPY = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}


class IndexMismatchError(ValueError):
    """An index made for another model, factors, layers, compression or training data."""


class CorruptIndexError(IndexMismatchError):
    """An index file that cannot be trusted: unreadable, truncated, edited or inconsistent."""


class IncompleteIndexError(IndexMismatchError):
    """An index whose build has not finished (killed, or still running)."""


def write_manifest(folder: Path, meta: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write the manifest (tensors, metadata and their checksum in one file, one rename) and its
    readable JSON copy (only rank zero writes)."""
    meta = dict(meta, format_version=FORMAT_VERSION)
    meta["checksum"] = content_checksum(tensors, meta)
    path = folder / f"{MANIFEST}.safetensors"
    if rank() == 0:
        atomic_save_safetensors(tensors, path, metadata={_HEADER_KEY: json.dumps(
            meta, sort_keys=True, default=str)})
        atomic_save_json(meta, folder / f"{MANIFEST}.json")
    return path


def read_manifest(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The manifest's metadata and tensors, checked (readable, this format, checksum).

    Raises:
        FileNotFoundError: no index in the folder.
        CorruptIndexError: a damaged, truncated, edited or foreign manifest.
    """
    path = Path(folder) / f"{MANIFEST}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"No index at {path}: build it first (build_index, or the "
                                "InfluenceIndex callback).")

    def corrupt(why: str) -> CorruptIndexError:
        return CorruptIndexError(f"The index manifest {path} cannot be trusted: {why}. Rebuild "
                                 "the index (overwrite=True, or delete the folder).")

    try:
        with safe_open(str(path), framework="pt") as fh:
            header = (fh.metadata() or {}).get(_HEADER_KEY)
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for bad files
        raise corrupt(f"it is not a readable safetensors file ({type(err).__name__}: {err})"
                      ) from err
    if header is None:
        raise corrupt("it has no lightning-influence index metadata")
    return checked_metadata(header, tensors, FORMAT_VERSION, corrupt), tensors


class ShardWriter:
    """Buffers one rank's codes and writes a shard file every ``shard_batches`` batches.

    Args:
        folder: the index folder.
        identity: the build's identity (stored in every shard and checked on reading).
        dtype: the codes' dtype.
        shard_batches: batches per shard.
    """

    def __init__(self, folder: Path, identity: str, dtype: torch.dtype,
                 shard_batches: int) -> None:
        self.folder, self.identity, self.dtype = folder, identity, dtype
        self.shard_batches = shard_batches
        self._codes: list[Tensor] = []
        self._indices: list[Tensor] = []
        self._batches: list[int] = []
        self.written: list[Path] = []

    def add(self, batch_index: int, indices: Tensor, codes: Tensor) -> None:
        """One batch's codes ``[n, D]`` of training examples ``indices [n]``."""
        stored = codes.detach().to("cpu", self.dtype)
        if not bool(torch.isfinite(stored).all()):
            bad = int((~torch.isfinite(stored)).any(1).nonzero()[0])
            raise FloatingPointError(
                f"The index code of training example {int(indices[bad])} (batch {batch_index}) "
                f"is not finite in {self.dtype} (largest magnitude "
                f"{float(codes.abs().max()):.3g}): store the index in bfloat16 or float32 "
                "(IndexOptions.dtype), or check that example's loss.")
        self._codes.append(stored)
        self._indices.append(indices.to("cpu", torch.long))
        self._batches.append(batch_index)
        if len(self._batches) >= self.shard_batches:
            self.flush()

    def flush(self) -> None:
        """Write the buffered batches as one shard (atomically)."""
        if not self._batches:
            return
        tensors = {"codes": torch.cat(self._codes).contiguous(),
                   "indices": torch.cat(self._indices),
                   "batches": torch.tensor(self._batches, dtype=torch.long)}
        path = self.folder / f"shard-r{rank():03d}-b{self._batches[0]:08d}.safetensors"
        atomic_save_safetensors(tensors, path, metadata={
            "identity": self.identity, "checksum": tensors_checksum(tensors, self.identity)})
        self.written.append(path)
        self._codes, self._indices, self._batches = [], [], []


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-r*-b*.safetensors"))


class Shard:
    """One shard: its training positions, batches, and its codes mapped from the file.

    Attributes:
        path: the file.
        indices: ``[n]`` training positions of its rows.
        batches: the batch indices it covers.
        checksum: the checksum in its header.
    """

    def __init__(self, path: Path, indices: Tensor, batches: Tensor, checksum: str,
                 offset: int, shape: tuple[int, int], dtype: str) -> None:
        self.path, self.indices, self.batches, self.checksum = path, indices, batches, checksum
        self._offset, self._shape, self._dtype = offset, shape, dtype

    @property
    def rows(self) -> int:
        return self._shape[0]

    def codes(self) -> Tensor:
        """``[n, D]`` codes mapped from the file (read-only pages; copy-on-write mapping)."""
        array = np.memmap(self.path, dtype=_NUMPY[self._dtype], mode="c", offset=self._offset,
                          shape=self._shape)
        tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self._dtype == "BF16" else tensor

    def verify(self, identity: str) -> str | None:
        """Why this shard cannot be trusted for the build ``identity``, or None."""
        tensors = {"codes": self.codes(), "indices": self.indices, "batches": self.batches}
        if tensors_checksum(tensors, identity) != self.checksum:
            return "its checksum does not match its contents (a damaged file)"
        return None


def _data_layout(path: Path) -> dict[str, Any]:
    """The safetensors header of ``path``: ``{tensor: {dtype, shape, data_offsets}}`` and where
    the data starts."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header["__start__"] = 8 + length
    return header


def read_shard(path: Path, identity: str) -> Shard:
    """Open a shard's header and small tensors (the codes stay on disk).

    Raises:
        CorruptIndexError: unreadable, or of another build (``identity`` differs).
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            indices, batches = fh.get_tensor("indices"), fh.get_tensor("batches")
        layout = _data_layout(path)
        codes = layout["codes"]
        offset = layout["__start__"] + codes["data_offsets"][0]
        shape = tuple(codes["shape"])
        if codes["dtype"] not in _NUMPY or len(shape) != 2 or shape[0] != indices.numel():
            raise ValueError(f"codes {codes['dtype']} {shape} for {indices.numel()} rows")
    except Exception as err:  # safetensors' and json's own error types for damaged files
        raise CorruptIndexError(
            f"The index shard {path} is unreadable or truncated ({type(err).__name__}: {err}). "
            "Delete it and run the build again: only its batches are rebuilt.") from err
    if metadata.get("identity") != identity:
        raise IndexMismatchError(
            f"The index shard {path} belongs to another build (other model, factors, "
            "compression or training data) than the manifest beside it. Delete the folder's "
            "shards and build again, or build into another folder.")
    return Shard(path, indices, batches, metadata.get("checksum", ""), offset, shape,
                 codes["dtype"])


def iterate_blocks(shards: list[Shard], rows: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``(indices [b], codes [b, D])`` blocks of at most ``rows`` rows over every shard."""
    for shard in shards:
        codes = shard.codes()
        for s in range(0, shard.rows, rows):
            yield shard.indices[s:s + rows], codes[s:s + rows]
