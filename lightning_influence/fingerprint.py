"""What ties factors and scores to a model: a fingerprint of the whole function it computes.

Index letters: W int32 words of a tensor's raw bits, R rows of K words, H = 2 hash lanes.

Influence depends on everything the model computes, not only on the tracked layers: another
activation function, recalibrated batch-norm statistics or a retrained (untracked) embedding
change every gradient. The fingerprint has four parts, each a digest, so that a refusal can say
which part changed:

- ``structure``: every module's name, type and settings (``extra_repr``), in order, and the
  tracked layers' shapes;
- ``tracked``: the parameters of the tracked layers;
- ``untracked``: every other parameter (frozen or not);
- ``buffers``: every buffer (persistent or not: running statistics, masks, rotary tables).

Each tensor is hashed where it lives, without a copy to the CPU. Its raw bits, viewed as int32
words ``[W]`` (any dtype: float16/bfloat16 in pairs, int64/float64 as two words), are mixed
word by word by a bijection of 32-bit words (``m = mix(w)``: two xorshifts around a
multiplication by an odd constant, the steps of murmur3's finalizer), cut into rows ``[R, K]``,
and every row is reduced to H = 2 sums with fixed odd coefficients, modulo 2^32:

    h[r, l] = sum_k c[l, k] * mix(w[r * K + k])   (mod 2^32)

``mix`` is a bijection and multiplying by an odd number is one modulo 2^32, so changing any
single word changes its row's sums: every single-element change is detected, whatever its size
(a flipped low bit, a NaN payload, -0.0 for 0.0). ``mix`` also moves every bit's change into the
low bits: without it, the sums see a change of the top bit (a sign) only in their top bit, and
two sign flips in one row cancel. Two or more changes within one row then collide with
probability about 2^-64. Only the ``[R, H]`` row sums (``8 / K`` = 1/512 of the tensor's bytes)
travel to the CPU, where SHA-256 turns them, with the tensor's dtype and shape, into the
tensor's digest. A few passes over memory on the tensor's device, in steps of a few MiB: about
0.1 s for GPT-2's 124M parameters on two CPU cores. A parameter sharded by FSDP (a DTensor) is
gathered first, one at a time (a collective: every rank fingerprints, in the same order), so a
sharded model has the digests of the unsharded one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PARTS", "model_fingerprint", "fingerprint_changes", "tensor_digests",
           "structure_rows"]

PARTS = ("structure", "tracked", "untracked", "buffers")
"""The parts of a fingerprint, each a digest of its own."""

PART_LABELS = {"structure": "the module structure", "tracked": "tracked weights",
               "untracked": "untracked parameters", "buffers": "buffers"}

_K = 4096  # words per row
_CHUNK_WORDS = {"cpu": 1 << 18}  # words per step: work space of 16 bytes per word (4 MiB)
_DEFAULT_CHUNK_WORDS = 1 << 22  # on an accelerator: 64 MiB
_MASK = (1 << 64) - 1
_MIX = 0x85EBCA6B - (1 << 32)  # murmur3's first finalizer constant (odd), as a signed int32
_coefficients_cache: dict[torch.device, Tensor] = {}


def _coefficients(device: torch.device) -> Tensor:
    """``c [H, K]``: fixed odd int32 coefficients (splitmix64, no random state involved)."""
    if device not in _coefficients_cache:
        state, values = 0x6C69676874696E67, []  # any fixed seed
        for _ in range(2 * _K):
            state = (state + 0x9E3779B97F4A7C15) & _MASK
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
            word = ((z ^ (z >> 31)) & 0xFFFFFFFF) | 1  # odd
            values.append(word - (1 << 32) if word >= 1 << 31 else word)
        _coefficients_cache[device] = torch.tensor(values, dtype=torch.int32,
                                                   device=device).view(2, _K)
    return _coefficients_cache[device]


def _plain(tensor: Tensor) -> Tensor:
    """A detached, dense, unsharded tensor on its own device."""
    if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2): gathered, as the forward sees it
        tensor = tensor.full_tensor()
    tensor = tensor.detach()
    if tensor.is_quantized:
        tensor = tensor.int_repr()
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    return tensor


def _words(tensor: Tensor) -> Tensor:
    """The raw bits of a dense tensor as int32 words ``[W]``, on its device."""
    flat = tensor.reshape(-1)  # a copy only when the tensor is not contiguous
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    try:
        return flat.view(torch.int32)  # 8-byte elements: two words; 1-2 byte ones: packed
    except RuntimeError:  # an odd count of small elements: one word each
        small = flat.view(torch.int16 if flat.element_size() == 2 else torch.uint8)
        return small.to(torch.int32)


def _buffers(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Work space of one step on ``device``: mixed words, shifted words ``[S]`` and products
    ``[S / K, H, K]`` (S words per step)."""
    step = _CHUNK_WORDS.get(device.type, _DEFAULT_CHUNK_WORDS)
    return (torch.empty(step, dtype=torch.int32, device=device),
            torch.empty(step, dtype=torch.int32, device=device),
            torch.empty(step // _K, 2, _K, dtype=torch.int32, device=device))


def _row_sums(words: Tensor, buffers: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``h [R, H]`` int32: each row of K mixed words reduced with the coefficients, modulo
    2^32, in steps of the ``buffers``' size (:func:`_buffers`)."""
    c = _coefficients(words.device)  # [H, K]
    n = words.numel()
    if n == 0:
        return torch.zeros(0, 2, dtype=torch.int32, device=words.device)
    mixed, shifted, products = buffers
    step = mixed.numel()
    parts = []
    for start in range(0, n, step):
        w = words[start:start + step]
        length = w.numel()
        m, t = mixed[:length], shifted[:length]
        # m = mix(w): x ^= x >>> 16; x *= C; x ^= x >>> 15 (>>> logical: torch's >> is
        # arithmetic on int32, hence the masks); each step is a bijection of 32-bit words
        torch.bitwise_right_shift(w, 16, out=t).bitwise_and_(0xFFFF)
        torch.bitwise_xor(w, t, out=m).mul_(_MIX)
        torch.bitwise_right_shift(m, 15, out=t).bitwise_and_(0x1FFFF)
        m.bitwise_xor_(t)
        rows = length // _K
        if rows:
            p = torch.mul(m[:rows * _K].view(rows, 1, _K), c, out=products[:rows])
            parts.append(p.sum(-1, dtype=torch.int32))  # [rows, H]
        if rows * _K < length:  # the last, shorter row
            tail = m[rows * _K:]
            parts.append((tail.view(1, 1, -1) * c[:, :tail.numel()]).sum(-1, dtype=torch.int32))
    return torch.cat(parts)


def tensor_digests(named: Iterable[tuple[str, Tensor]]) -> dict[str, str]:
    """``{name: digest}`` of tensors, each hashed on its own device (see the module docstring);
    one transfer of the row sums per device."""
    heads: list[tuple[str, str]] = []
    sums: list[Tensor] = []
    buffers: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
    with torch.no_grad():
        for name, tensor in named:
            plain = _plain(tensor)
            heads.append((name, f"{plain.dtype}|{list(plain.shape)}|{plain.device.type == 'meta'}"))
            if plain.is_meta:  # no values to read: its dtype and shape only
                sums.append(torch.zeros(0, 2, dtype=torch.int32))
                continue
            if plain.device not in buffers:
                buffers[plain.device] = _buffers(plain.device)
            sums.append(_row_sums(_words(plain), buffers[plain.device]))
    on_cpu: list[Tensor | None] = [None] * len(sums)
    for device in {s.device for s in sums}:
        picked = [i for i, s in enumerate(sums) if s.device == device]
        moved = torch.cat([sums[i] for i in picked]).cpu()
        offset = 0
        for i in picked:
            on_cpu[i] = moved[offset:offset + sums[i].shape[0]]
            offset += sums[i].shape[0]
    out = {}
    for (name, head), rows in zip(heads, on_cpu, strict=True):
        digest = hashlib.sha256(head.encode())
        digest.update(rows.contiguous().numpy().tobytes())
        out[name] = digest.hexdigest()[:16]
    return out


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return FSDPModule


def _module_class(module: nn.Module, fsdp: type | None) -> type:
    """The module's class, without the subclass FSDP2's ``fully_shard`` swaps in."""
    if fsdp is not None and isinstance(module, fsdp):
        return next(c for c in type(module).__mro__ if not issubclass(c, fsdp))
    return type(module)


def structure_rows(model: nn.Module) -> list[list[str]]:
    """``[[name, type, settings], ...]`` of every module, in ``named_modules`` order."""
    rows = []
    fsdp = _fsdp_module_class()
    for name, module in model.named_modules():
        cls = _module_class(module, fsdp)
        try:
            settings = module.extra_repr()
        except Exception:  # noqa: BLE001 - a module whose repr needs state it lacks
            settings = ""
        rows.append([name, f"{cls.__module__}.{cls.__qualname__}", settings])
    return rows


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(model: nn.Module, tracked_layers: dict[str, nn.Module],
                      tracked_shapes: dict[str, list[int]]) -> dict[str, Any]:
    """The fingerprint of the whole model: the four part digests of :data:`PARTS`, the module
    rows and every tensor's digest (kept so that a refusal can name what changed).

    Args:
        model: the model (every parameter and buffer counts, tracked or not).
        tracked_layers: ``{name: module}`` of the tracked layers (their parameters form the
            ``tracked`` part; a weight shared with an untracked module, e.g. a tied embedding,
            is counted there once).
        tracked_shapes: ``{name: [O, I]}`` of the tracked layers (part of the structure).
    """
    tracked_names: dict[int, str] = {}
    for layer_name, module in tracked_layers.items():
        for attr, p in module.named_parameters(recurse=False):
            tracked_names.setdefault(id(p), f"{layer_name}.{attr}")
    tracked, untracked = [], []
    for name, p in model.named_parameters():
        if id(p) in tracked_names:
            tracked.append((tracked_names[id(p)], p))
        else:
            untracked.append((name, p))
    tensors = {"tracked": tensor_digests(tracked), "untracked": tensor_digests(untracked),
               "buffers": tensor_digests(model.named_buffers())}
    rows = structure_rows(model)
    out: dict[str, Any] = {"structure": _digest({"modules": rows, "tracked": tracked_shapes})}
    for part, digests in tensors.items():
        out[part] = _digest(sorted(digests.items()))
    out["modules"] = rows
    out["tensors"] = tensors
    return out


def _listed(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _short(row: list[str]) -> str:
    return row[1].rsplit(".", 1)[-1]


def _structure_changes(old_rows: list, new_rows: list) -> str:
    """What differs between two module lists, in words."""
    old = {r[0]: r for r in old_rows}
    new = {r[0]: r for r in new_rows}
    said = []
    for name, row in new.items():
        before = old.get(name)
        if before is None or before == row:
            continue
        label = repr(name) if name else "the model itself"
        if row[1] != before[1]:
            said.append(f"module {label} is now {_short(row)}, was {_short(before)}")
        else:
            said.append(f"module {label} is now {_short(row)}({row[2]}), was "
                        f"{_short(before)}({before[2]})")
    added = [n for n in new if n not in old]
    removed = [n for n in old if n not in new]
    if added:
        said.append(f"modules added: {_listed(added)}")
    if removed:
        said.append(f"modules removed: {_listed(removed)}")
    if not said and [r[0] for r in old_rows] != [r[0] for r in new_rows]:
        said.append("the modules are registered in another order")
    if not said:
        said.append("the tracked layers differ")
    return "; ".join(said[:3]) + (f" (and {len(said) - 3} more)" if len(said) > 3 else "")


def has_parts(fingerprint: dict[str, Any]) -> bool:
    """Whether ``fingerprint`` holds every part of a whole-model fingerprint."""
    return isinstance(fingerprint, dict) and all(part in fingerprint for part in PARTS)


def fingerprint_changes(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
    """What changed between a stored fingerprint and the model's now: ``{part: phrase}`` for
    every part of :data:`PARTS` that differs (empty when none does), e.g. ``{"structure": "the
    module structure changed (module 'act' is now GELU, was ReLU)", "buffers": "buffers
    changed: bn.running_mean, bn.running_var"}``; ``{"missing": ...}`` when ``stored`` is not
    a whole-model fingerprint."""
    if not has_parts(stored):
        return {"missing": "no whole-model fingerprint was stored with them (made by an older "
                           "version, or by hand)"}
    changes = {}
    if stored["structure"] != current["structure"]:
        changes["structure"] = (
            f"{PART_LABELS['structure']} changed "
            f"({_structure_changes(stored.get('modules', []), current['modules'])})")
    for part in PARTS[1:]:
        if stored[part] == current[part]:
            continue
        old = stored.get("tensors", {}).get(part, {})
        new = current["tensors"][part]
        names = [n for n in new if old.get(n) != new[n]] + [n for n in old if n not in new]
        changes[part] = f"{PART_LABELS[part]} changed: {_listed(names) or '(not named)'}"
    return changes
