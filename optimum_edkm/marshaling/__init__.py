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

from .hooks import TensorMarshal, marshal
from .policy import MarshalCounters, MarshalPolicy
from .training import saved_tensor_policy

__all__ = ["MarshalCounters", "MarshalPolicy", "TensorMarshal", "marshal", "saved_tensor_policy"]
