"""Storage records: how a saved tensor is held (by reference, as copied or sharded bytes, or as a recipe that
replays it from another held tensor) and rebuilt for backward."""

from __future__ import annotations

import weakref
from typing import Tuple

import torch
import torch.distributed as dist

from .replay import replay


# -------------------------------------------------------------------------------------- byte-level helpers
def storage_key(tensor: torch.Tensor, storage) -> tuple:
    return tensor.device.type, tensor.device.index, storage.data_ptr()


def byte_span(tensor: torch.Tensor) -> Tuple[int, int]:
    """``[start, end)`` bytes of its storage that a (non-empty, non-negative-stride) tensor reads."""
    size = tensor.element_size()
    extent = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    start = tensor.storage_offset() * size
    return start, start + (extent + 1) * size


def storage_bytes(tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """A uint8 tensor aliasing bytes ``[start, end)`` of ``tensor``'s storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(
        tensor.untyped_storage(), start, (end - start,), (1,)
    )


def view_bytes(raw: torch.Tensor, dtype: torch.dtype, size, stride) -> torch.Tensor:
    """The tensor of ``dtype``/``size``/``stride`` whose first element is at ``raw``'s first byte."""
    element = dtype.itemsize
    if raw.storage_offset() % element:
        raw = raw.clone()  # set_ counts offsets in elements: realign on a fresh buffer
    return torch.empty(0, dtype=dtype, device=raw.device).set_(
        raw.untyped_storage(), raw.storage_offset() // element, size, stride
    )


def is_non_overlapping_and_dense(tensor: torch.Tensor) -> bool:
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(tensor.shape, tensor.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def marshallable(tensor) -> bool:
    """Plain strided float tensors with storage; everything else is kept exactly as autograd gave it."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if tensor.layout != torch.strided or tensor.is_meta or not tensor.is_floating_point():
        return False
    if tensor.numel() == 0 or tensor.is_neg() or tensor.is_conj():
        return False
    return all(s >= 0 for s in tensor.stride())


# ----------------------------------------------------------------------------------------------- held bytes
class HeldBytes:
    """Bytes ``[start, end)`` of one source storage, shared by every record that reads them.

    In backward the bytes are brought back to the compute device once and handed to each of the ``users``
    records (a view, a transpose, a replayed copy...) before being dropped, so that deduplicated tensors are
    not transferred (or all-gathered) once each. The count is known when saving, so every rank of a sharded
    run makes the same number of collectives in the same order."""

    __slots__ = ("start", "end", "ready", "owner", "users", "_restored", "_served", "__weakref__")

    def __init__(self, start: int, end: int, ready, owner):
        self.start, self.end, self.ready, self.owner = start, end, ready, owner
        self.users, self._restored, self._served = 0, None, 0

    def bytes_for(self, start: int, end: int, device: torch.device) -> torch.Tensor:
        restored = self._restored
        if restored is None or restored.device != device:
            restored = self._restore(device)
            self._served = 0
        self._served += 1
        self._restored = None if self._served >= self.users else restored
        return restored[start - self.start : end - self.start]

    def _restore(self, device: torch.device) -> torch.Tensor:
        raise NotImplementedError


class CopiedSpan(HeldBytes):
    """The bytes, copied to ``data.device`` (the offload target)."""

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor, start: int, end: int, ready, owner):
        super().__init__(start, end, ready, owner)
        self.data = data

    def bytes_for(self, start: int, end: int, device: torch.device) -> torch.Tensor:
        if self.data.device == device:  # held where they are needed: no transfer to share
            return self.data[start - self.start : end - self.start]
        return super().bytes_for(start, end, device)

    def _restore(self, device: torch.device) -> torch.Tensor:
        if self.ready is not None and device.type == "cuda":
            torch.cuda.current_stream(device).wait_event(self.ready)
        self.owner.count("copies_back", 1)
        return self.data.to(device, non_blocking=self.data.is_pinned())


class ShardedSpan(HeldBytes):
    """This rank's ``1/world`` slice of the bytes; the rest is all-gathered from the other ranks."""

    __slots__ = ("piece", "chunk", "group", "world", "gather_device")

    def __init__(self, piece, start, end, chunk, group, world, gather_device, ready, owner):
        super().__init__(start, end, ready, owner)
        self.piece, self.chunk, self.group = piece, chunk, group
        self.world, self.gather_device = world, gather_device

    def _restore(self, device: torch.device) -> torch.Tensor:
        piece = self.piece
        if self.ready is not None:
            if self.gather_device.type == "cuda":
                torch.cuda.current_stream(self.gather_device).wait_event(self.ready)
            else:
                self.ready.synchronize()  # the host reads the pinned buffer: the copy must have landed
        if piece.device != self.gather_device:
            piece = piece.to(self.gather_device, non_blocking=piece.is_pinned())
        full = torch.empty(self.world * self.chunk, dtype=torch.uint8, device=self.gather_device)
        dist.all_gather(list(full.split(self.chunk)), piece, group=self.group)
        self.owner.count("all_gathers", 1)
        full = full[: self.end - self.start]
        if full.device != device:
            full = full.to(device)
            self.owner.count("copies_back", 1)
        return full


# --------------------------------------------------------------------------------------------------- records
class Reference:
    """A tensor kept as autograd gave it. Checks, like autograd does without hooks, that it was not modified
    in place before backward (hooks switch autograd's own check off)."""

    __slots__ = ("tensor", "version", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.version = tensor, tensor._version

    def alive_version(self):
        return self.tensor._version

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: a saved {tuple(self.tensor.shape)} {self.tensor.dtype} tensor is at version "
                f"{self.tensor._version}; expected version {self.version} instead (kept by TensorMarshal)"
            )
        return self.tensor


class StoredTensor:
    """A saved tensor rebuilt from held bytes: dtype, size, stride and the byte where it starts."""

    __slots__ = ("span", "start", "end", "dtype", "size", "stride", "device", "source", "version", "__weakref__")

    def __init__(self, span, tensor: torch.Tensor, start: int, end: int):
        self.span, self.start, self.end = span, start, end
        span.users += 1
        self.dtype, self.size, self.stride = tensor.dtype, tensor.shape, tensor.stride()
        self.device = tensor.device
        self.source, self.version = weakref.ref(tensor), tensor._version

    def alive_version(self):
        source = self.source()
        return None if source is None else source._version

    def unpack(self) -> torch.Tensor:
        return view_bytes(self.span.bytes_for(self.start, self.end, self.device), self.dtype, self.size, self.stride)


class ReplayedTensor:
    """A saved copy of an already marshalled tensor, recomputed from it by a short chain of view-like ops."""

    __slots__ = ("base", "ops", "dtype", "size", "stride", "copy_out", "source", "version", "__weakref__")

    def __init__(self, base, ops, tensor: torch.Tensor, copy_out: bool):
        self.base, self.ops, self.copy_out = base, ops, copy_out
        self.dtype, self.size, self.stride = tensor.dtype, tensor.shape, tensor.stride()
        self.source, self.version = weakref.ref(tensor), tensor._version

    def alive_version(self):
        source = self.source()
        return None if source is None else source._version

    def unpack(self) -> torch.Tensor:
        result = replay(self.base.unpack(), self.ops)
        if self.copy_out:
            out = torch.empty_strided(self.size, self.stride, dtype=result.dtype, device=result.device)
            result = out.copy_(result)
        return result
