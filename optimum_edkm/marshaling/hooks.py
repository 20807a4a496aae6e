"""The hook object: :class:`TensorMarshal`, the ``saved_tensors_hooks`` context that applies a policy."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef

from .policy import MarshalCounters, MarshalPolicy, check_field_names
from .records import (
    CopiedSpan,
    Reference,
    ReplayedTensor,
    ShardedSpan,
    StoredTensor,
    byte_span,
    is_non_overlapping_and_dense,
    marshallable,
    storage_bytes,
    storage_key,
)
from .replay import replay, step_back

_PRUNE_EVERY = 512
_serial = itertools.count()
_active = threading.local()


# ------------------------------------------------------------------------------------------------- marshal
class _Counter:
    """Read-only attribute forwarding to ``TensorMarshal.counters``."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, instance, owner=None):
        return self if instance is None else getattr(instance.counters, self.name)


class TensorMarshal:
    """Context manager that marshals the tensors autograd saves for backward (see the module docstring).

    ``TensorMarshal(policy, resident=(), **fields)``: ``fields`` override those of ``policy`` (default
    :class:`MarshalPolicy`); ``resident`` lists tensors that live anyway (parameters, inputs): saved tensors
    sharing their storage are kept by reference and counted in ``bytes_resident``.

    Only the forward pass has to run inside the context; backward can run after it exits. Contexts nest (the
    innermost one handles what is saved inside it) and the same instance may be re-entered; counters
    accumulate until :meth:`reset`.
    """

    tensors_saved = _Counter()
    tensors_deduplicated = _Counter()
    bytes_on_device = _Counter()
    bytes_offloaded = _Counter()
    bytes_deduplicated = _Counter()
    bytes_resident = _Counter()
    bytes_on_other_ranks = _Counter()
    copies = _Counter()
    copies_back = _Counter()
    all_gathers = _Counter()

    def __init__(self, policy: Optional[MarshalPolicy] = None, *, resident: Iterable[torch.Tensor] = (), **fields):
        if policy is None:
            policy = MarshalPolicy()
        if not isinstance(policy, MarshalPolicy):
            raise TypeError(
                f"policy must be a MarshalPolicy (or None for the defaults), got "
                f"{type(policy).__name__}; MarshalPolicy.from_config() converts config values"
            )
        if fields:
            check_field_names(fields)
            policy = dataclasses.replace(policy, **fields)
        resident = list(resident)
        for position, tensor in enumerate(resident):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"resident[{position}] must be a torch.Tensor, got {type(tensor).__name__}")
        self.policy = policy
        self.counters = MarshalCounters()
        self._lock = threading.Lock()
        self._tag = f"optimum_edkm.marshal/{next(_serial)}"
        self._hooks: List[Any] = []
        self._resident = {
            storage_key(t, t.untyped_storage()): StorageWeakRef(t.untyped_storage())
            for t in resident
            if t.layout == torch.strided and not t.is_meta
        }
        self._clear_tables()
        self._group, self._world, self._rank, self._gather_device = None, 1, 0, None

    # ------------------------------------------------------------------------------------------ public API
    @property
    def sharding(self) -> bool:
        """Whether saved tensors are sharded (``shard=True``, initialised group of more than one rank)."""
        return self._world > 1

    @property
    def world_size(self) -> int:
        return self._world

    def reset(self) -> None:
        """Zero the counters (for per-step logging)."""
        with self._lock:
            self.counters = MarshalCounters()

    def as_dict(self, prefix: str = "marshal/") -> Dict[str, int]:
        """Counters as a flat dict, e.g. for ``Trainer.log``."""
        return self.counters.as_dict(prefix)

    def __repr__(self) -> str:
        counters = ", ".join(f"{k}={v}" for k, v in self.counters.as_dict().items())
        return f"TensorMarshal(device={self.policy.device}, sharding={self.sharding}, {counters})"

    def __enter__(self) -> "TensorMarshal":
        if not self._hooks:
            self._resolve_group()
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        hooks.__enter__()
        self._hooks.append(hooks)
        stack = getattr(_active, "stack", None)
        if stack is None:
            stack = _active.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc) -> None:
        stack = getattr(_active, "stack", [])
        if not stack or stack[-1] is not self:
            raise RuntimeError("TensorMarshal contexts must be exited in the reverse order they were entered")
        stack.pop()
        self._hooks.pop().__exit__(*exc)
        if not self._hooks:
            # the tables only serve lookups while saving; what backward needs is held by the packed records
            self._clear_tables()

    # --------------------------------------------------------------------------------------------- setup
    def _clear_tables(self) -> None:
        self._kept: Dict[tuple, Tuple[StorageWeakRef, str]] = {}
        self._spans: Dict[tuple, List[tuple]] = {}
        self._since_prune = 0

    def _resolve_group(self) -> None:
        self._group, self._world, self._rank, self._gather_device = None, 1, 0, None
        if not self.policy.shard or not dist.is_available() or not dist.is_initialized():
            return
        group = self.policy.process_group
        world = dist.get_world_size(group)
        if world <= 1:
            return
        self._group, self._world, self._rank = group, world, dist.get_rank(group)
        backend = str(dist.get_backend(group)).lower()
        self._gather_device = torch.device("cpu") if backend == "gloo" else None

    def count(self, name: str, amount: int) -> None:
        """Add ``amount`` to counter ``name`` (thread-safe; the storage records report their copies here)."""
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + amount)

    # ------------------------------------------------------------------------------------------ packing
    def _pack(self, tensor: torch.Tensor):
        self.count("tensors_saved", 1)
        self._since_prune += 1
        if self._since_prune >= _PRUNE_EVERY:
            self._prune()
        if not marshallable(tensor):
            return self._keep(tensor, "bytes_on_device") if isinstance(tensor, torch.Tensor) else tensor
        storage = tensor.untyped_storage()
        key = storage_key(tensor, storage)
        if self._is_resident(tensor, key):
            return self._keep(tensor, "bytes_resident")
        if storage.nbytes() < self.policy.min_bytes:
            return self._keep(tensor, "bytes_on_device")
        start, end = byte_span(tensor)
        if self.policy.deduplicate:
            found = self._find_span(tensor, key, start, end)
            if found is not None:
                self._count_dedup(tensor.numel() * tensor.element_size())
                return self._tagged(StoredTensor(found, tensor, start, end), tensor)
            if self._held_by_reference(key) and not self.sharding:
                return self._tagged(self._keep(tensor, "bytes_offloaded"), tensor)
            replayed = self._find_replay(tensor)
            if replayed is not None:
                self._count_dedup(tensor.numel() * tensor.element_size())
                return self._tagged(replayed, tensor)
        offload = self._should_offload(tensor.device)
        if self.sharding:
            span = self._shard(tensor, start, end, offload)
        elif offload:
            span = self._copy(tensor, start, end)
        elif self._same_device(tensor.device):
            # the offload target is the compute device: hold by reference, no copy
            return self._tagged(self._keep(tensor, "bytes_offloaded"), tensor)
        else:
            return self._keep(tensor, "bytes_on_device")  # below the memory threshold
        if self.policy.deduplicate:
            entry = (StorageWeakRef(storage), tensor._version, weakref.ref(span))
            self._spans.setdefault(key, []).append(entry)
        return self._tagged(StoredTensor(span, tensor, start, end), tensor)

    def _unpack(self, packed):
        return packed.unpack() if isinstance(packed, (Reference, StoredTensor, ReplayedTensor)) else packed

    def _keep(self, tensor: torch.Tensor, counter: str) -> Reference:
        """Hold by reference; count the storage once (it is what stays alive)."""
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return Reference(tensor)
        key = storage_key(tensor, storage)
        entry = self._kept.get(key)
        if entry is not None and not entry[0].expired():
            if entry[1] == "bytes_offloaded" and self.policy.deduplicate:
                self._count_dedup(tensor.numel() * tensor.element_size())
            elif entry[1] == "bytes_offloaded":
                self.count(counter, storage.nbytes())  # naive: every save counts
        else:
            self._kept[key] = (StorageWeakRef(storage), counter)
            self.count(counter, storage.nbytes())
        return Reference(tensor)

    def _held_by_reference(self, key: tuple) -> bool:
        entry = self._kept.get(key)
        return entry is not None and entry[1] == "bytes_offloaded" and not entry[0].expired()

    def _count_dedup(self, nbytes: int) -> None:
        with self._lock:
            self.counters.tensors_deduplicated += 1
            self.counters.bytes_deduplicated += nbytes

    def _is_resident(self, tensor: torch.Tensor, key: tuple) -> bool:
        resident = self._resident.get(key)
        if resident is not None and not resident.expired():
            return True
        entry = self._kept.get(key)
        if entry is not None and entry[1] == "bytes_resident" and not entry[0].expired():
            return True
        if self.policy.keep_leaves:
            root = tensor._base if tensor._base is not None else tensor
            return root.is_leaf and root.requires_grad
        return False

    def _same_device(self, device: torch.device) -> bool:
        target = self.policy.device
        if target.type != device.type:
            return False
        return target.index is None or device.index is None or target.index == device.index

    def _should_offload(self, device: torch.device) -> bool:
        if self._same_device(device):
            return self.policy.copy_same_device
        threshold = self.policy.memory_threshold
        if threshold <= 0:
            return True
        used = _memory_in_use(device)
        return used is None or used >= threshold

    # ---------------------------------------------------------------------------------------- dedup lookups
    def _find_span(self, tensor: torch.Tensor, key: tuple, start: int, end: int):
        entries = self._spans.get(key)
        if not entries:
            return None
        alive = []
        found = None
        for storage_ref, version, span_ref in entries:
            span = span_ref()
            if span is None or storage_ref.expired():
                continue
            alive.append((storage_ref, version, span_ref))
            if found is None and version == tensor._version and span.start <= start and end <= span.end:
                found = span
        self._spans[key] = alive
        return found

    def _find_replay(self, tensor: torch.Tensor) -> Optional[ReplayedTensor]:
        """Walk back up to ``max_view_hops`` view-like nodes to an already marshalled tensor of which
        ``tensor`` is a copy. Safe only when nothing was modified in place on the way: the saved tensor and
        the base must still be at version 0, and at most one copy (clone) may sit in the chain - a second
        copy could have been taken after an untracked in-place change of the first."""
        hops = self.policy.max_view_hops
        node = tensor.grad_fn
        if hops == 0 or node is None or tensor._version != 0:
            return None
        output_nr, size_out = tensor.output_nr, tuple(tensor.shape)
        ops, copies = [], 0
        for _ in range(hops + 1):
            base = self._tag_of(node, output_nr)
            if base is not None and ops:
                return self._replay_record(base, ops, tensor)
            if len(ops) == hops:
                return None
            try:
                step = step_back(node, output_nr, size_out)
            except (AttributeError, TypeError, ZeroDivisionError):
                return None
            if step is None or len(node.next_functions) < 1:
                return None
            op, size_out = step
            copies += op[0] == "clone"
            if copies > 1:
                return None
            ops.append(op)
            node, output_nr = node.next_functions[0]
            if node is None:
                return None
        return None

    def _replay_record(self, base, ops, tensor: torch.Tensor) -> Optional[ReplayedTensor]:
        if base.alive_version() != 0:  # modified since (or before) it was saved, or gone
            return None
        forward_ops = tuple(reversed(ops))
        if isinstance(base, Reference):
            size, stride, dtype = base.tensor.shape, base.tensor.stride(), base.tensor.dtype
        else:
            size, stride, dtype = base.size, base.stride, base.dtype
        if dtype != tensor.dtype:
            return None
        try:
            probe = replay(torch.empty_strided(size, stride, dtype=dtype, device="meta"), forward_ops)
        except (RuntimeError, IndexError, TypeError, ValueError):
            return None
        if probe.shape != tensor.shape:
            return None
        copy_out = probe.stride() != tensor.stride()
        if copy_out and not is_non_overlapping_and_dense(tensor):
            return None
        root = base
        while isinstance(root, ReplayedTensor):
            root = root.base
        if isinstance(root, StoredTensor):
            root.span.users += 1  # each unpack of this record reads the root's bytes
        return ReplayedTensor(base, forward_ops, tensor, copy_out)

    def _tag_of(self, node, output_nr: int):
        try:
            tags = node.metadata.get(self._tag)
        except (AttributeError, RuntimeError):
            return None
        if not tags:
            return None
        record_ref = tags.get(output_nr)
        return None if record_ref is None else record_ref()

    def _tagged(self, record, tensor: torch.Tensor):
        """Remember on the tensor's autograd node that its value is marshalled, for later copies of it."""
        node = tensor.grad_fn
        if node is not None and self.policy.max_view_hops > 0:
            try:
                node.metadata.setdefault(self._tag, {})[tensor.output_nr] = weakref.ref(record)
            except (AttributeError, RuntimeError):
                pass
        return record

    # ---------------------------------------------------------------------------------------- copies
    def _pinned(self, source: torch.device) -> bool:
        if self.policy.device.type != "cpu" or source.type == "cpu":
            return False
        return source.type == "cuda" if self.policy.pin_memory is None else self.policy.pin_memory

    def _copy(self, tensor: torch.Tensor, start: int, end: int) -> CopiedSpan:
        pinned = self._pinned(tensor.device)
        with torch.no_grad():
            data = torch.empty(end - start, dtype=torch.uint8, device=self.policy.device, pin_memory=pinned)
            non_blocking = self.policy.non_blocking and pinned
            data.copy_(storage_bytes(tensor, start, end), non_blocking=non_blocking)
        ready = _record_event(tensor.device) if non_blocking else None
        with self._lock:
            self.counters.copies += 1
            self.counters.bytes_offloaded += end - start
        return CopiedSpan(data, start, end, ready, self)

    def _shard(self, tensor: torch.Tensor, start: int, end: int, offload: bool) -> ShardedSpan:
        total = end - start
        chunk = -(-total // self._world)
        lo = min(self._rank * chunk, total)
        hi = min(lo + chunk, total)
        source_bytes = storage_bytes(tensor, start, end)
        if self.policy.verify_replicated:
            self._verify_replicated(source_bytes, tensor)
        gather_device = self._gather_device or tensor.device
        keep_device = self.policy.device if offload else tensor.device
        pinned = offload and self._pinned(tensor.device)
        non_blocking = self.policy.non_blocking and pinned
        with torch.no_grad():
            piece = torch.empty(chunk, dtype=torch.uint8, device=keep_device, pin_memory=pinned)
            piece[: hi - lo].copy_(source_bytes[lo:hi], non_blocking=non_blocking)
            piece[hi - lo :].zero_()
        ready = _record_event(tensor.device) if non_blocking else None
        with self._lock:
            self.counters.copies += 1
            where = "bytes_offloaded" if (offload or self._same_device(tensor.device)) else "bytes_on_device"
            setattr(self.counters, where, getattr(self.counters, where) + chunk)
            self.counters.bytes_on_other_ranks += total - (hi - lo)
        return ShardedSpan(piece, start, end, chunk, self._group, self._world, gather_device, ready, self)

    def _verify_replicated(self, source_bytes: torch.Tensor, tensor: torch.Tensor) -> None:
        checksum = torch.stack(
            [
                source_bytes.sum(dtype=torch.int64),
                source_bytes[1::2].sum(dtype=torch.int64),
                source_bytes[::7].sum(dtype=torch.int64),
                torch.tensor(source_bytes.numel(), device=source_bytes.device),
            ]
        )
        gather_device = self._gather_device or tensor.device
        checksum = checksum.to(gather_device)
        everyone = [torch.empty_like(checksum) for _ in range(self._world)]
        dist.all_gather(everyone, checksum, group=self._group)
        if any(not torch.equal(other, everyone[0]) for other in everyone[1:]):
            raise RuntimeError(
                f"a saved {tuple(tensor.shape)} {tensor.dtype} tensor differs between ranks, so it cannot be "
                f"sharded: shard=True is only valid for tensors that every rank computes identically (weight "
                f"clustering under data parallelism). Wrap only the clustering code in the sharding "
                f"TensorMarshal, not the model's forward (activations differ between ranks)"
            )

    def _prune(self) -> None:
        self._since_prune = 0
        self._kept = {k: v for k, v in self._kept.items() if not v[0].expired()}
        for key in list(self._spans):
            alive = [e for e in self._spans[key] if e[2]() is not None and not e[0].expired()]
            if alive:
                self._spans[key] = alive
            else:
                del self._spans[key]


def _record_event(device: torch.device):
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _memory_in_use(device: torch.device) -> Optional[float]:
    """Fraction of the device's memory allocated by torch, or ``None`` when the device does not say."""
    try:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return torch.cuda.memory_allocated(index) / torch.cuda.get_device_properties(index).total_memory
        if device.type == "mps":
            return torch.mps.current_allocated_memory() / torch.mps.recommended_max_memory()
        if device.type == "xpu":
            index = device.index if device.index is not None else torch.xpu.current_device()
            return torch.xpu.memory_allocated(index) / torch.xpu.get_device_properties(index).total_memory
    except (RuntimeError, AttributeError, ZeroDivisionError):
        return None
    return None


def marshal(
    policy: Optional[MarshalPolicy] = None, *, resident: Iterable[torch.Tensor] = (), **fields
) -> TensorMarshal:
    """``with marshal(device="cpu", min_bytes=1 << 20) as m: ...`` - shorthand for :class:`TensorMarshal`."""
    return TensorMarshal(policy, resident=resident, **fields)
