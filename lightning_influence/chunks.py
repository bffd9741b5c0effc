"""Score chunks on disk: bounded memory for full score matrices, and resumable scoring passes.

Index letters: Q queries, L layers, n training examples in a chunk.

A scoring pass hands its per-batch results to a :class:`ChunkStore`, which writes one
safetensors file per group of ``chunk_batches`` batches, atomically. A rerun of the same pass
(same factors, queries and options: the *signature*) finds the finished batches, skips them and
reads their scores back instead, so a run killed in the middle resumes from its last finished
chunk and ends with the same scores as an uninterrupted run. Files whose signature differs are
refused with a message that says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from lightning_influence.distributed import rank
from lightning_influence.io import atomic_save_safetensors

__all__ = ["ChunkStore", "ChunkMismatchError"]


class ChunkMismatchError(ValueError):
    """Score chunks on disk belong to another pass (other factors, queries or options)."""


class ChunkStore:
    """Writes and reads the score chunks of one pass.

    Args:
        folder: where the chunk files go.
        kind: ``"pairwise"`` or ``"self"`` (the file name prefix).
        signature: what identifies the pass; stored in every file and checked on reuse.
        chunk_batches: batches per chunk file.
    """

    def __init__(self, folder: str | Path, kind: str, signature: dict[str, str],
                 chunk_batches: int = 16) -> None:
        if chunk_batches < 1:
            raise ValueError(f"chunk_batches must be >= 1, got {chunk_batches}.")
        self.folder = Path(folder)
        self.kind = kind
        self.signature = json.dumps(signature, sort_keys=True)
        self.chunk_batches = chunk_batches
        self._buffer: dict[str, list[Tensor]] = {}
        self._batches: list[int] = []

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.kind}-chunk-*.safetensors"))

    def _check(self, path: Path, metadata: dict[str, str]) -> None:
        if metadata.get("signature") != self.signature:
            raise ChunkMismatchError(
                f"{path} holds {self.kind} scores of another pass (other factors, queries or "
                f"options). Delete the chunk files in {self.folder}, or score into another folder."
            )

    def done_batches(self) -> set[int]:
        """Batch indices whose scores are already on disk."""
        done: set[int] = set()
        for path in self.files():
            with safe_open(str(path), framework="pt") as fh:
                self._check(path, fh.metadata() or {})
                done.update(fh.get_tensor("batches").tolist())
        return done

    def load(self) -> Iterator[dict[str, Tensor]]:
        """Every finished chunk as a dict of tensors (``indices [n]``, ``scores``, ...)."""
        for path in self.files():
            with safe_open(str(path), framework="pt") as fh:
                self._check(path, fh.metadata() or {})
                yield {key: fh.get_tensor(key) for key in fh.keys()}

    def add(self, batch_index: int, **tensors: Tensor) -> None:
        """Buffer one batch's results (the last axis indexes its examples); flush when full."""
        self._batches.append(batch_index)
        for key, value in tensors.items():
            self._buffer.setdefault(key, []).append(value.detach().cpu())
        if len(self._batches) >= self.chunk_batches:
            self.flush()

    def flush(self) -> None:
        """Write the buffered batches as one chunk file (atomically)."""
        if not self._batches:
            return
        tensors = {key: torch.cat(parts, dim=-1) for key, parts in self._buffer.items()}
        tensors["batches"] = torch.tensor(self._batches, dtype=torch.long)
        name = f"{self.kind}-chunk-r{rank():03d}-b{self._batches[0]:08d}.safetensors"
        atomic_save_safetensors(tensors, self.folder / name, metadata={"signature": self.signature})
        self._buffer = {}
        self._batches = []
