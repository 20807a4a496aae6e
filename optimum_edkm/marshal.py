"""Cross-device tensor marshaling: offload, deduplicate and shard the tensors autograd saves for backward.

eDKM's third technique, usable around any autograd code. Inside a :class:`TensorMarshal` context every tensor
that an operation saves for its backward pass goes through ``torch.autograd.graph.saved_tensors_hooks``:

* **kept as is** - non-float tensors, tensors whose storage is smaller than ``min_bytes``, tensor subclasses,
  and leaf tensors that require grad (parameters: the model holds them anyway, a copy would only add one);
* **deduplicated** - a tensor whose bytes were already marshalled (same storage, same version: a view,
  transpose or reshape that did not copy) keeps a reference to those bytes plus its size, stride and offset,
  re-applied with ``set_`` on unpack; a tensor that is a *copy* made from an already marshalled tensor by at
  most ``max_view_hops`` view / reshape / transpose / clone operations keeps that tensor plus the recipe, and
  is recomputed on unpack (the paper's "look a few hops up the graph");
* **sharded** (optional, data parallel) - each rank keeps only its ``1/world`` slice of the bytes and the
  full tensor is all-gathered on unpack;
* **offloaded** - otherwise the bytes the tensor views are copied to the offload device (CPU by default;
  pinned memory and non-blocking copies from CUDA) once the compute device's memory use reaches
  ``memory_threshold``. When the offload device *is* the compute device (a CPU-only machine), nothing is
  copied; the same decisions and counters still apply.

Unpacking returns a tensor with the original values, dtype, device, size and strides, so gradients are
bit-identical with and without marshaling. No process group is needed unless ``shard=True``, and then only
with more than one rank.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["MarshalCounters", "MarshalPolicy", "TensorMarshal", "marshal"]

DEFAULT_MIN_BYTES = 64 * 1024
_MAX_VIEW_HOPS_LIMIT = 64
_PRUNE_EVERY = 512
_serial = itertools.count()
_active = threading.local()


def _is_bool(value) -> bool:
    return isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


@dataclass(frozen=True)
class MarshalPolicy:
    """Where the tensors saved for backward go, and which ones are deduplicated or sharded.

    Args:
        device: offload target. ``"cpu"`` (default) moves saved tensors off an accelerator; on a CPU-only
            machine the target is the compute device and nothing is copied.
        min_bytes: a saved tensor is marshalled only if the storage it keeps alive has at least this many
            bytes; smaller ones stay where they are (a copy would cost more than it saves).
        memory_threshold: fraction (0..1) of the compute device's memory in use from which saved tensors are
            offloaded; below it they stay on the device. ``0`` offloads always. Devices that do not report
            memory use (and the CPU) behave as if the threshold were reached.
        max_view_hops: how many view / reshape / transpose / clone operations to walk back through the
            autograd graph to find an already marshalled tensor that a saved copy was made from. ``0`` turns
            that off (tensors sharing a storage are still deduplicated when ``deduplicate`` is on).
        deduplicate: reuse the bytes already marshalled for tensors that share them. ``False`` copies every
            saved tensor on its own (naive offloading; for comparisons).
        non_blocking: asynchronous copies where the device supports them (pinned host memory).
        pin_memory: pin the host buffers; ``None`` pins when the source is an accelerator and the target is
            the CPU.
        keep_leaves: keep leaf tensors that require grad (parameters) by reference instead of marshalling
            them.
        copy_same_device: copy saved tensors even when the offload target is their own device. It frees
            nothing (the copy replaces the original on the same device); it exists to exercise and time the
            copy path on a CPU-only machine.
        shard: under data parallelism, keep only this rank's ``1/world`` slice of every marshalled tensor and
            all-gather it in backward. Valid only for tensors every rank computes identically (weight
            clustering under data parallelism - *not* activations, which differ between ranks). Without an
            initialised process group, or with one rank, it does nothing.
        process_group: the ``torch.distributed`` group to shard over; ``None`` is the default group.
        verify_replicated: with ``shard``, compare a checksum of every sharded tensor across ranks when it is
            saved and raise if they differ (one small collective per tensor; for debugging).
    """

    device: Union[str, torch.device] = "cpu"
    min_bytes: int = DEFAULT_MIN_BYTES
    memory_threshold: float = 0.0
    max_view_hops: int = 4
    deduplicate: bool = True
    non_blocking: bool = True
    pin_memory: Optional[bool] = None
    keep_leaves: bool = True
    copy_same_device: bool = False
    shard: bool = False
    process_group: Optional[Any] = None
    verify_replicated: bool = False

    def __post_init__(self):
        device = self.device
        if isinstance(device, str):
            try:
                device = torch.device(device)
            except (RuntimeError, ValueError) as error:
                raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda:0', got "
                                 f"{self.device!r} ({error})") from None
        if not isinstance(device, torch.device):
            raise TypeError(f"device must be a str or torch.device (the offload target), got "
                            f"{type(self.device).__name__}")
        if device.type == "meta":
            raise ValueError("device='meta' holds no data: saved tensors could not be restored; use 'cpu'")
        object.__setattr__(self, "device", device)
        if not _is_int(self.min_bytes) or self.min_bytes < 0:
            raise ValueError(f"min_bytes must be an integer >= 0, got {self.min_bytes!r}")
        if not isinstance(self.memory_threshold, (int, float)) or _is_bool(self.memory_threshold) \
                or not 0.0 <= float(self.memory_threshold) <= 1.0:
            raise ValueError(f"memory_threshold must be a fraction from 0 to 1 of the device memory in use "
                             f"(0 offloads always), got {self.memory_threshold!r}")
        if not _is_int(self.max_view_hops) or not 0 <= self.max_view_hops <= _MAX_VIEW_HOPS_LIMIT:
            raise ValueError(f"max_view_hops must be an integer from 0 to {_MAX_VIEW_HOPS_LIMIT} (0 turns "
                             f"the graph walk off), got {self.max_view_hops!r}")
        for name in ("deduplicate", "non_blocking", "keep_leaves", "copy_same_device", "shard",
                     "verify_replicated"):
            if not _is_bool(getattr(self, name)):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.pin_memory is not None and not _is_bool(self.pin_memory):
            raise TypeError(f"pin_memory must be True, False or None (automatic), got {self.pin_memory!r}")
        if self.pin_memory and not _accelerator_available():
            raise ValueError("pin_memory=True needs an accelerator (CUDA) to pin host memory for; leave it "
                             "None (automatic) on a CPU-only machine")
        if self.process_group is not None:
            if not self.shard:
                raise ValueError("process_group is only used with shard=True; set shard=True or drop it")
            if dist.is_available() and not isinstance(self.process_group, dist.ProcessGroup):
                raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got "
                                f"{type(self.process_group).__name__}")
        if self.verify_replicated and not self.shard:
            raise ValueError("verify_replicated checks sharded tensors; it needs shard=True")

    @classmethod
    def from_config(cls, value) -> Optional["MarshalPolicy"]:
        """The policy a config value asks for: ``None``/``False`` -> off, ``True`` -> defaults, a device
        string or ``torch.device`` -> that offload target, a dict -> those fields, a policy -> itself."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, (str, torch.device)):
            return cls(device=value)
        if isinstance(value, dict):
            _check_field_names(value)
            return cls(**value)
        raise TypeError(f"offload must be None, a bool, a device (e.g. 'cpu'), a dict of MarshalPolicy "
                        f"fields or a MarshalPolicy, got {type(value).__name__}")


def _check_field_names(names) -> None:
    valid = [f.name for f in dataclasses.fields(MarshalPolicy)]
    unknown = sorted(set(names) - set(valid))
    if unknown:
        raise TypeError(f"unknown MarshalPolicy field(s) {', '.join(unknown)}; valid: {', '.join(valid)}")


@dataclass
class MarshalCounters:
    """What a :class:`TensorMarshal` did. Bytes are counted once per storage (or copied span).

    tensors_saved: tensors autograd saved for backward inside the context.
    tensors_deduplicated: of those, tensors restored from bytes already marshalled for another one.
    bytes_on_device: bytes left on their (compute) device: small, non-float, below the memory threshold.
    bytes_offloaded: bytes held on the offload device. When it is the compute device (CPU-only) these are
        the bytes the policy would move elsewhere, held by reference and not copied (see ``copies``).
    bytes_deduplicated: bytes a naive offload would have copied again but that were reused.
    bytes_resident: bytes of leaf tensors (parameters) kept by reference; they live anyway.
    bytes_on_other_ranks: with sharding, bytes this rank does not keep (other ranks hold them).
    copies: copies made while saving (offloads, and shard slices).
    copies_back: copies made in backward to bring offloaded or gathered bytes back to the compute device
        (once per copy, however many saved tensors share it).
    all_gathers: collectives run in backward to rebuild sharded tensors (once per sharded copy).
    """

    tensors_saved: int = 0
    tensors_deduplicated: int = 0
    bytes_on_device: int = 0
    bytes_offloaded: int = 0
    bytes_deduplicated: int = 0
    bytes_resident: int = 0
    bytes_on_other_ranks: int = 0
    copies: int = 0
    copies_back: int = 0
    all_gathers: int = 0

    def as_dict(self, prefix: str = "") -> Dict[str, int]:
        return {prefix + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# -------------------------------------------------------------------------------------- byte-level helpers
def _storage_key(tensor: torch.Tensor, storage) -> tuple:
    return tensor.device.type, tensor.device.index, storage.data_ptr()


def _byte_span(tensor: torch.Tensor) -> Tuple[int, int]:
    """``[start, end)`` bytes of its storage that a (non-empty, non-negative-stride) tensor reads."""
    size = tensor.element_size()
    extent = sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    start = tensor.storage_offset() * size
    return start, start + (extent + 1) * size


def _storage_bytes(tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """A uint8 tensor aliasing bytes ``[start, end)`` of ``tensor``'s storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(
        tensor.untyped_storage(), start, (end - start,), (1,))


def _view_bytes(raw: torch.Tensor, dtype: torch.dtype, size, stride) -> torch.Tensor:
    """The tensor of ``dtype``/``size``/``stride`` whose first element is at ``raw``'s first byte."""
    element = dtype.itemsize
    if raw.storage_offset() % element:
        raw = raw.clone()                      # set_ counts offsets in elements: realign on a fresh buffer
    return torch.empty(0, dtype=dtype, device=raw.device).set_(
        raw.untyped_storage(), raw.storage_offset() // element, size, stride)


def _is_non_overlapping_and_dense(tensor: torch.Tensor) -> bool:
    expected = 1
    for stride, size in sorted((s, n) for n, s in zip(tensor.shape, tensor.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _marshallable(tensor) -> bool:
    """Plain strided float tensors with storage; everything else is kept exactly as autograd gave it."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if tensor.layout != torch.strided or tensor.is_meta or not tensor.is_floating_point():
        return False
    if tensor.numel() == 0 or tensor.is_neg() or tensor.is_conj():
        return False
    return all(s >= 0 for s in tensor.stride())


# ----------------------------------------------------------------------------------------------- held bytes
class _HeldBytes:
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
        return restored[start - self.start:end - self.start]

    def _restore(self, device: torch.device) -> torch.Tensor:
        raise NotImplementedError


class _CopiedSpan(_HeldBytes):
    """The bytes, copied to ``data.device`` (the offload target)."""

    __slots__ = ("data",)

    def __init__(self, data: torch.Tensor, start: int, end: int, ready, owner):
        super().__init__(start, end, ready, owner)
        self.data = data

    def bytes_for(self, start: int, end: int, device: torch.device) -> torch.Tensor:
        if self.data.device == device:             # held where they are needed: no transfer to share
            return self.data[start - self.start:end - self.start]
        return super().bytes_for(start, end, device)

    def _restore(self, device: torch.device) -> torch.Tensor:
        if self.ready is not None and device.type == "cuda":
            torch.cuda.current_stream(device).wait_event(self.ready)
        self.owner._count("copies_back", 1)
        return self.data.to(device, non_blocking=self.data.is_pinned())


class _ShardedSpan(_HeldBytes):
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
                self.ready.synchronize()       # the host reads the pinned buffer: the copy must have landed
        if piece.device != self.gather_device:
            piece = piece.to(self.gather_device, non_blocking=piece.is_pinned())
        full = torch.empty(self.world * self.chunk, dtype=torch.uint8, device=self.gather_device)
        dist.all_gather(list(full.split(self.chunk)), piece, group=self.group)
        self.owner._count("all_gathers", 1)
        full = full[:self.end - self.start]
        if full.device != device:
            full = full.to(device)
            self.owner._count("copies_back", 1)
        return full


# --------------------------------------------------------------------------------------------------- records
class _Reference:
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
                f"{self.tensor._version}; expected version {self.version} instead (kept by TensorMarshal)")
        return self.tensor


class _Stored:
    """A saved tensor rebuilt from held bytes: dtype, size, stride and the byte where it starts."""

    __slots__ = ("span", "start", "end", "dtype", "size", "stride", "device", "source", "version",
                 "__weakref__")

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
        return _view_bytes(self.span.bytes_for(self.start, self.end, self.device), self.dtype, self.size,
                           self.stride)


class _Replayed:
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
        result = _replay(self.base.unpack(), self.ops)
        if self.copy_out:
            out = torch.empty_strided(self.size, self.stride, dtype=result.dtype, device=result.device)
            result = out.copy_(result)
        return result


# ------------------------------------------------------------------------------------- view-chain replaying
_RESHAPES = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "_ReshapeAliasBackward0",
             "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3"}
_COPIES = {"CloneBackward0"}


def _signed(value: int) -> int:
    # some nodes report negative dims as unsigned 64-bit integers
    return value - (1 << 64) if value >= (1 << 63) else value


def _sizes(values) -> Tuple[int, ...]:
    return tuple(int(v) for v in values)


def _step_back(node, output_nr: int, size_out: Tuple[int, ...]):
    """``(op, size_in)`` for one view-like node whose output has ``size_out``; ``None`` if unsupported."""
    name = node.name()
    if name == "SplitBackward0":
        return ("split", int(node._saved_split_size), _signed(node._saved_dim), output_nr), \
            _sizes(node._saved_self_sym_sizes)
    if name == "SplitWithSizesBackward0":
        return ("split", _sizes(node._saved_split_sizes), _signed(node._saved_dim), output_nr), \
            _sizes(node._saved_self_sym_sizes)
    if output_nr != 0:
        return None
    if name in _RESHAPES:
        return ("reshape", size_out), _sizes(node._saved_self_sym_sizes)
    if name == "ExpandBackward0":
        return ("expand", size_out), _sizes(node._saved_self_sym_sizes)
    if name in _COPIES or name == "AliasBackward0":
        return (("clone",) if name in _COPIES else ("alias",)), size_out
    if name == "TBackward0":
        return ("t",), size_out[::-1]
    if name == "TransposeBackward0":
        rank = len(size_out)
        d0, d1 = _signed(node._saved_dim0) % rank, _signed(node._saved_dim1) % rank
        size_in = list(size_out)
        size_in[d0], size_in[d1] = size_in[d1], size_in[d0]
        return ("transpose", d0, d1), tuple(size_in)
    if name == "PermuteBackward0":
        rank = len(size_out)
        dims = tuple(_signed(d) % rank for d in node._saved_dims)
        size_in = [0] * rank
        for position, dim in enumerate(dims):
            size_in[dim] = size_out[position]
        return ("permute", dims), tuple(size_in)
    if name == "UnsqueezeBackward0":
        dim = _signed(node._saved_dim) % len(size_out)
        return ("unsqueeze", dim), size_out[:dim] + size_out[dim + 1:]
    if name == "SliceBackward0":
        return ("slice", _signed(node._saved_dim), _signed(node._saved_start), _signed(node._saved_end),
                int(node._saved_step)), _sizes(node._saved_self_sym_sizes)
    if name == "SelectBackward0":
        return ("select", _signed(node._saved_dim), _signed(node._saved_index)), \
            _sizes(node._saved_self_sym_sizes)
    if name == "DiagonalBackward0":
        return ("diagonal", _signed(node._saved_offset), _signed(node._saved_dim1),
                _signed(node._saved_dim2)), _sizes(node._saved_self_sym_sizes)
    if name == "UnfoldBackward0":
        return ("unfold", _signed(node._saved_dimension), int(node._saved_size), int(node._saved_step)), \
            _sizes(node._saved_self_sym_sizes)
    return None


def _apply(op, x: torch.Tensor) -> torch.Tensor:
    kind = op[0]
    if kind == "reshape":
        return x.reshape(op[1])
    if kind == "expand":
        return x.expand(op[1])
    if kind == "clone":
        return x.clone()
    if kind == "alias":
        return x
    if kind == "t":
        return x.t()
    if kind == "transpose":
        return x.transpose(op[1], op[2])
    if kind == "permute":
        return x.permute(op[1])
    if kind == "unsqueeze":
        return x.unsqueeze(op[1])
    if kind == "slice":
        return torch.ops.aten.slice.Tensor(x, op[1], op[2], op[3], op[4])
    if kind == "select":
        return x.select(op[1], op[2])
    if kind == "split":
        return torch.split(x, list(op[1]) if isinstance(op[1], tuple) else op[1], op[2])[op[3]]
    if kind == "diagonal":
        return x.diagonal(op[1], op[2], op[3])
    if kind == "unfold":
        return x.unfold(op[1], op[2], op[3])
    raise AssertionError(f"unknown replay op {kind}")


def _replay(x: torch.Tensor, ops) -> torch.Tensor:
    with torch.no_grad():
        for op in ops:
            x = _apply(op, x)
    return x


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

    def __init__(self, policy: Optional[MarshalPolicy] = None, *, resident: Iterable[torch.Tensor] = (),
                 **fields):
        if policy is None:
            policy = MarshalPolicy()
        if not isinstance(policy, MarshalPolicy):
            raise TypeError(f"policy must be a MarshalPolicy (or None for the defaults), got "
                            f"{type(policy).__name__}; MarshalPolicy.from_config() converts config values")
        if fields:
            _check_field_names(fields)
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
        self._resident = {_storage_key(t, t.untyped_storage()): StorageWeakRef(t.untyped_storage())
                          for t in resident if t.layout == torch.strided and not t.is_meta}
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

    def _count(self, name: str, amount: int) -> None:
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + amount)

    # ------------------------------------------------------------------------------------------ packing
    def _pack(self, tensor: torch.Tensor):
        self._count("tensors_saved", 1)
        self._since_prune += 1
        if self._since_prune >= _PRUNE_EVERY:
            self._prune()
        if not _marshallable(tensor):
            return self._keep(tensor, "bytes_on_device") if isinstance(tensor, torch.Tensor) else tensor
        storage = tensor.untyped_storage()
        key = _storage_key(tensor, storage)
        if self._is_resident(tensor, key):
            return self._keep(tensor, "bytes_resident")
        if storage.nbytes() < self.policy.min_bytes:
            return self._keep(tensor, "bytes_on_device")
        start, end = _byte_span(tensor)
        if self.policy.deduplicate:
            found = self._find_span(tensor, key, start, end)
            if found is not None:
                self._count_dedup(tensor.numel() * tensor.element_size())
                return self._tagged(_Stored(found, tensor, start, end), tensor)
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
            return self._keep(tensor, "bytes_on_device")      # below the memory threshold
        if self.policy.deduplicate:
            entry = (StorageWeakRef(storage), tensor._version, weakref.ref(span))
            self._spans.setdefault(key, []).append(entry)
        return self._tagged(_Stored(span, tensor, start, end), tensor)

    def _unpack(self, packed):
        return packed.unpack() if isinstance(packed, (_Reference, _Stored, _Replayed)) else packed

    def _keep(self, tensor: torch.Tensor, counter: str) -> _Reference:
        """Hold by reference; count the storage once (it is what stays alive)."""
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return _Reference(tensor)
        key = _storage_key(tensor, storage)
        entry = self._kept.get(key)
        if entry is not None and not entry[0].expired():
            if entry[1] == "bytes_offloaded" and self.policy.deduplicate:
                self._count_dedup(tensor.numel() * tensor.element_size())
            elif entry[1] == "bytes_offloaded":
                self._count(counter, storage.nbytes())    # naive: every save counts
        else:
            self._kept[key] = (StorageWeakRef(storage), counter)
            self._count(counter, storage.nbytes())
        return _Reference(tensor)

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

    def _find_replay(self, tensor: torch.Tensor) -> Optional[_Replayed]:
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
                step = _step_back(node, output_nr, size_out)
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

    def _replay_record(self, base, ops, tensor: torch.Tensor) -> Optional[_Replayed]:
        if base.alive_version() != 0:                 # modified since (or before) it was saved, or gone
            return None
        forward_ops = tuple(reversed(ops))
        if isinstance(base, _Reference):
            size, stride, dtype = base.tensor.shape, base.tensor.stride(), base.tensor.dtype
        else:
            size, stride, dtype = base.size, base.stride, base.dtype
        if dtype != tensor.dtype:
            return None
        try:
            probe = _replay(torch.empty_strided(size, stride, dtype=dtype, device="meta"), forward_ops)
        except (RuntimeError, IndexError, TypeError, ValueError):
            return None
        if probe.shape != tensor.shape:
            return None
        copy_out = probe.stride() != tensor.stride()
        if copy_out and not _is_non_overlapping_and_dense(tensor):
            return None
        root = base
        while isinstance(root, _Replayed):
            root = root.base
        if isinstance(root, _Stored):
            root.span.users += 1                    # each unpack of this record reads the root's bytes
        return _Replayed(base, forward_ops, tensor, copy_out)

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

    def _copy(self, tensor: torch.Tensor, start: int, end: int) -> _CopiedSpan:
        pinned = self._pinned(tensor.device)
        with torch.no_grad():
            data = torch.empty(end - start, dtype=torch.uint8, device=self.policy.device, pin_memory=pinned)
            non_blocking = self.policy.non_blocking and pinned
            data.copy_(_storage_bytes(tensor, start, end), non_blocking=non_blocking)
        ready = _record_event(tensor.device) if non_blocking else None
        with self._lock:
            self.counters.copies += 1
            self.counters.bytes_offloaded += end - start
        return _CopiedSpan(data, start, end, ready, self)

    def _shard(self, tensor: torch.Tensor, start: int, end: int, offload: bool) -> _ShardedSpan:
        total = end - start
        chunk = -(-total // self._world)
        lo = min(self._rank * chunk, total)
        hi = min(lo + chunk, total)
        source_bytes = _storage_bytes(tensor, start, end)
        if self.policy.verify_replicated:
            self._verify_replicated(source_bytes, tensor)
        gather_device = self._gather_device or tensor.device
        keep_device = self.policy.device if offload else tensor.device
        pinned = offload and self._pinned(tensor.device)
        non_blocking = self.policy.non_blocking and pinned
        with torch.no_grad():
            piece = torch.empty(chunk, dtype=torch.uint8, device=keep_device, pin_memory=pinned)
            piece[:hi - lo].copy_(source_bytes[lo:hi], non_blocking=non_blocking)
            piece[hi - lo:].zero_()
        ready = _record_event(tensor.device) if non_blocking else None
        with self._lock:
            self.counters.copies += 1
            where = "bytes_offloaded" if (offload or self._same_device(tensor.device)) else "bytes_on_device"
            setattr(self.counters, where, getattr(self.counters, where) + chunk)
            self.counters.bytes_on_other_ranks += total - (hi - lo)
        return _ShardedSpan(piece, start, end, chunk, self._group, self._world, gather_device, ready, self)

    def _verify_replicated(self, source_bytes: torch.Tensor, tensor: torch.Tensor) -> None:
        checksum = torch.stack([source_bytes.sum(dtype=torch.int64),
                                source_bytes[1::2].sum(dtype=torch.int64),
                                source_bytes[::7].sum(dtype=torch.int64),
                                torch.tensor(source_bytes.numel(), device=source_bytes.device)])
        gather_device = self._gather_device or tensor.device
        checksum = checksum.to(gather_device)
        everyone = [torch.empty_like(checksum) for _ in range(self._world)]
        dist.all_gather(everyone, checksum, group=self._group)
        if any(not torch.equal(other, everyone[0]) for other in everyone[1:]):
            raise RuntimeError(
                f"a saved {tuple(tensor.shape)} {tensor.dtype} tensor differs between ranks, so it cannot be "
                f"sharded: shard=True is only valid for tensors that every rank computes identically (weight "
                f"clustering under data parallelism). Wrap only the clustering code in the sharding "
                f"TensorMarshal, not the model's forward (activations differ between ranks)")

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


def marshal(policy: Optional[MarshalPolicy] = None, *, resident: Iterable[torch.Tensor] = (),
            **fields) -> TensorMarshal:
    """``with marshal(device="cpu", min_bytes=1 << 20) as m: ...`` - shorthand for :class:`TensorMarshal`."""
    return TensorMarshal(policy, resident=resident, **fields)
