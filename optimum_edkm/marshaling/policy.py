"""What to do with the tensors autograd saves for backward: :class:`MarshalPolicy`, and the counters of what
was done (:class:`MarshalCounters`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
import torch.distributed as dist

from ..validation import is_bool, is_int

DEFAULT_MIN_BYTES = 64 * 1024
MAX_VIEW_HOPS_LIMIT = 64


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
                raise ValueError(
                    f"device must name a torch device such as 'cpu' or 'cuda:0', got {self.device!r} ({error})"
                ) from None
        if not isinstance(device, torch.device):
            raise TypeError(
                f"device must be a str or torch.device (the offload target), got {type(self.device).__name__}"
            )
        if device.type == "meta":
            raise ValueError("device='meta' holds no data: saved tensors could not be restored; use 'cpu'")
        object.__setattr__(self, "device", device)
        if not is_int(self.min_bytes) or self.min_bytes < 0:
            raise ValueError(f"min_bytes must be an integer >= 0, got {self.min_bytes!r}")
        if (
            not isinstance(self.memory_threshold, (int, float))
            or is_bool(self.memory_threshold)
            or not 0.0 <= float(self.memory_threshold) <= 1.0
        ):
            raise ValueError(
                f"memory_threshold must be a fraction from 0 to 1 of the device memory in use "
                f"(0 offloads always), got {self.memory_threshold!r}"
            )
        if not is_int(self.max_view_hops) or not 0 <= self.max_view_hops <= MAX_VIEW_HOPS_LIMIT:
            raise ValueError(
                f"max_view_hops must be an integer from 0 to {MAX_VIEW_HOPS_LIMIT} (0 turns "
                f"the graph walk off), got {self.max_view_hops!r}"
            )
        for name in ("deduplicate", "non_blocking", "keep_leaves", "copy_same_device", "shard", "verify_replicated"):
            if not is_bool(getattr(self, name)):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.pin_memory is not None and not is_bool(self.pin_memory):
            raise TypeError(f"pin_memory must be True, False or None (automatic), got {self.pin_memory!r}")
        if self.pin_memory and not _accelerator_available():
            raise ValueError(
                "pin_memory=True needs an accelerator (CUDA) to pin host memory for; leave it "
                "None (automatic) on a CPU-only machine"
            )
        if self.process_group is not None:
            if not self.shard:
                raise ValueError("process_group is only used with shard=True; set shard=True or drop it")
            if dist.is_available() and not isinstance(self.process_group, dist.ProcessGroup):
                raise TypeError(
                    f"process_group must be a torch.distributed.ProcessGroup, got {type(self.process_group).__name__}"
                )
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
            check_field_names(value)
            return cls(**value)
        raise TypeError(
            f"offload must be None, a bool, a device (e.g. 'cpu'), a dict of MarshalPolicy "
            f"fields or a MarshalPolicy, got {type(value).__name__}"
        )


def check_field_names(names) -> None:
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
