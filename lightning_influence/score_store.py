"""Score chunks on disk: bounded memory for full score matrices, and resumable scoring passes.

Index letters: Q queries, L layers, n training examples in a chunk.

A scoring pass hands its per-batch results to a :class:`ScoreStore`, which writes one
safetensors file per group of ``chunk_batches`` batches, atomically. A rerun of the same pass
(same factors, queries, options and training data: the *signature*) finds the finished batches,
skips them and reads their scores back instead, so a run killed in the middle resumes from its
last finished chunk and ends with the same scores as an uninterrupted run. Files whose signature
differs are refused with a message that says so; a chunk whose contents fail their checksum
(a damaged file) is ignored and its batches are scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_influence.distributed import rank
from lightning_influence.io import (
    atomic_save_safetensors,
    read_safetensors,
    tensors_checksum,
    update_with_tensor,
)

__all__ = ["ScoreStore", "ScoreStoreMismatchError", "data_fingerprint"]

log = logging.getLogger(__name__)


def data_fingerprint(loader: Any) -> str:
    """An identity of a training set as a loader yields it: the number of batches and a SHA-256
    over every batch's contents in order (tensor bytes, shapes and dtypes; other values by
    ``repr``). One pass over the data, no model."""
    digest = hashlib.sha256()
    count = 0

    def feed(value: Any) -> None:
        if isinstance(value, Tensor):
            update_with_tensor(digest, value, "T{dtype}{shape}")
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                digest.update(f"K{key}".encode())
                feed(value[key])
        elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"V{value!r}".encode())

    for batch in loader:
        count += 1
        feed(batch)
    return f"{count}:{digest.hexdigest()[:24]}"


_SIGNATURE_LABELS = {
    "model_structure": "the model's module structure", "model_tracked": "the tracked weights",
    "model_untracked": "the model's untracked parameters", "model_buffers": "the model's buffers",
    "train": "the training data", "queries": "the queries", "damping": "the damping",
    "strategy": "the strategy", "settings": "the factors' or solver's settings",
    "scale": "the normalization",
}


def _differences(stored: str | None, ours: str) -> str:
    """The parts of two pass signatures (JSON) that differ, in words."""
    try:
        theirs = json.loads(stored) if stored else {}
    except json.JSONDecodeError:
        theirs = {}
    if not isinstance(theirs, dict) or not theirs:
        return "the chunk carries no readable signature"
    mine = json.loads(ours)
    keys = [k for k in {**mine, **theirs} if mine.get(k) != theirs.get(k)]
    return "here " + ", ".join(_SIGNATURE_LABELS.get(k, f"the option {k}") for k in keys) + \
        (" differ" if len(keys) > 1 else " differs")


class ScoreStoreMismatchError(ValueError):
    """Score chunks on disk belong to another pass (other factors, queries or options)."""


class ScoreStore:
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
            raise ScoreStoreMismatchError(
                f"{path} holds {self.kind} scores of another pass (other factors, queries, "
                f"options or training data: {_differences(metadata.get('signature'), self.signature)}"
                f"). Delete the chunk files in {self.folder}, or score into another folder."
            )

    def _read(self, path: Path) -> dict[str, Tensor] | None:
        """A chunk's tensors, or None (logged) when the file is damaged; raises for a chunk of
        another pass."""
        try:
            tensors, metadata = read_safetensors(path)
        except ValueError as err:  # truncated or damaged
            log.warning("Score chunk %s is unreadable (%s); its batches are scored again.", path,
                        err)
            return None
        self._check(path, metadata)
        if metadata.get("checksum") != tensors_checksum(tensors, self.signature):
            log.warning("Score chunk %s fails its checksum (a damaged file); its batches are "
                        "scored again.", path)
            return None
        return tensors

    def done_batches(self) -> set[int]:
        """Batch indices whose scores are already on disk (in chunks that pass their check)."""
        done: set[int] = set()
        for path in self.files():
            tensors = self._read(path)
            if tensors is not None:
                done.update(tensors["batches"].tolist())
        return done

    def load(self) -> Iterator[dict[str, Tensor]]:
        """Every finished, intact chunk as a dict of tensors (``indices [n]``, ``scores``...)."""
        for path in self.files():
            tensors = self._read(path)
            if tensors is not None:
                yield tensors

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
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_save_safetensors(tensors, self.folder / name, metadata={
            "signature": self.signature, "checksum": tensors_checksum(tensors, self.signature)})
        self._buffer = {}
        self._batches = []
