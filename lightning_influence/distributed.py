"""Process-group helpers: which batches are this rank's, and small gathers/broadcasts.

Works with any initialized ``torch.distributed`` process group (Lightning's DDP and FSDP
strategies initialize one), with the gloo backend on CPU as well as NCCL. Without a process
group, or with one process, every helper is the identity.

Batches are numbered in the (unshuffled) loader's order and assigned round-robin: rank ``r`` of
``W`` handles batches ``r, r + W, r + 2W, ...``. Label sampling is seeded per batch, so a
distributed run draws exactly the labels a single-process run draws and their sums agree.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

__all__ = [
    "rank",
    "world_size",
    "is_distributed",
    "numbered_batches",
    "sampling_generator",
    "all_gather_objects",
    "broadcast_object",
    "broadcast_tensor",
    "all_reduce_sum_",
    "barrier",
]


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


EIGENVALUE_STREAM = 1


def sampling_generator(seed: int, batch_index: int, stream: int = 0) -> torch.Generator:
    """The generator for label sampling of one batch: depends on the seed, the batch and the
    pass's ``stream`` only (0: the covariance pass, also during training; 1: the eigenvalue
    pass), never on the sharding.

    The three are hashed into the generator's seed (torch's CPU generator keeps 32 bits of it),
    so the eigenvalue pass of one seed never replays the covariance pass of another: fits with
    different seeds are independent draws. (An earlier ``seed + 1`` for the eigenvalue pass made
    seed s's eigenvalue labels those of seed s + 1's covariances.)
    """
    key = f"{seed}:{stream}:{batch_index}".encode()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return torch.Generator().manual_seed(value & 0xFFFF_FFFF)


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, list | tuple):
        return _batch_len(batch[0])
    raise TypeError(f"Cannot tell the number of examples of a {type(batch).__name__} batch.")


def _splittable(loader: Any) -> bool:
    return (isinstance(loader, DataLoader) and loader.batch_size is not None
            and isinstance(loader.sampler, SequentialSampler)
            and not isinstance(loader.dataset, IterableDataset))


def numbered_batches(loader: Any, shard: bool = True, skip: set[int] | None = None,
                     ) -> tuple[int, Iterator[tuple[int, int, Any]]]:
    """This rank's batches as ``(batch_index, first_example_index, batch)``.

    Returns ``(count, iterator)``; ``count`` is the number of batches the iterator yields when
    known (else -1). With ``shard`` inside a process group, rank ``r`` gets batches
    ``b % W == r``; a plain sequential DataLoader then loads only its own batches, any other
    loader is iterated in full and the other ranks' batches are skipped. Batch indices in
    ``skip`` (finished earlier) are not yielded.
    """
    r, w = (rank(), world_size()) if shard else (0, 1)
    skip = skip or set()
    if _splittable(loader):
        size, n = loader.batch_size, len(loader.dataset)
        mine = [b for b in range(r, math.ceil(n / size), w) if b not in skip]
        if not mine:
            return 0, iter(())
        sampler = [list(range(b * size, min(n, (b + 1) * size))) for b in mine]
        own = DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=loader.collate_fn,
                         num_workers=loader.num_workers, pin_memory=loader.pin_memory)
        return len(mine), ((b, b * size, batch) for b, batch in zip(mine, own, strict=True))

    def walk() -> Iterator[tuple[int, int, Any]]:
        offset = 0
        for b, batch in enumerate(loader):
            if b % w == r and b not in skip:
                yield b, offset, batch
            offset += _batch_len(batch)

    try:
        total = len(loader)
        count = len([b for b in range(r, total, w) if b not in skip])
    except TypeError:
        count = -1
    return count, walk()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, small), in rank order; ``[obj]`` without a group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over every rank, in place (no-op without a process group): one buffer,
    where gathering every rank's copy would take W of them."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_tensor(tensor: Tensor | None, src: int, device: Any = "cpu") -> Tensor:
    """``tensor`` from rank ``src`` on every rank; the others pass ``None`` and get a fresh
    tensor on ``device`` (its shape and dtype are sent first, as a small object)."""
    if not is_distributed():
        return tensor
    shape, dtype = broadcast_object(
        (tuple(tensor.shape), tensor.dtype) if rank() == src else None, src)
    if rank() != src:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    else:
        tensor = tensor.contiguous()  # eigh's eigenvectors come column-major
    dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj: Any, src: int) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
