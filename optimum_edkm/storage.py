"""What a compressed model stores, and the one rule that counts it (pure Python; tensors are read through
their own methods, torch is not imported).

Every palettized or clustered module describes its packed form with :meth:`storage` (a :class:`WeightStorage`);
the baselines describe their integer codes the same way. :func:`model_size` turns a model plus those
descriptions into bytes and bits per weight; ``optimum_edkm.size_report``, ``optimum_edkm.evaluation.effective_bits``,
the command line's size column and the Core ML verifier's n-bit reference all call it.

The rule (docs/evaluation.md, "Bits per weight"):

* a compressed weight costs :attr:`WeightStorage.total_bits`: its indices or codes at ``index_bits`` each, plus
  every LUT entry, scale, zero point and extra bit stored with it;
* every other tensor of the state dict (parameters and persistent buffers; a tensor shared by several modules
  once) costs its elements at ``unquantized_bits`` when it is floating point and that is given (a deployment
  precision, 16 for half), at its own dtype's width otherwise (what a checkpoint holds);
* bits per weight = those bits / the weights: the dense element count of every compressed weight plus every
  other parameter (buffers cost bits but are not weights);
* bytes round each stored tensor up on its own: the packed indices, then the tables of a compressed weight
  (:attr:`WeightStorage.stored_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

from .validation import check_int


@dataclasses.dataclass(frozen=True)
class WeightStorage:
    """What a compressed weight tensor of shape ``shape`` stores.

    Attributes:
        shape: the weight's shape (``(out_features, in_features)`` for a linear).
        index_bits: bits per weight for its integer code or LUT index.
        lut_count, lut_entries, lut_entry_bits: number of look-up tables, entries in each, bits per entry.
        scale_count, scale_bits: number of stored scales and bits of each.
        zero_count, zero_bits: number of stored zero points and bits of each.
        extra_bits: anything else stored for the tensor (e.g. GPTQ act-order's per-column group index).
        scheme: a short human-readable description.
    """

    shape: tuple
    index_bits: int
    lut_count: int = 0
    lut_entries: int = 0
    lut_entry_bits: int = 16
    scale_count: int = 0
    scale_bits: int = 16
    zero_count: int = 0
    zero_bits: int = 16
    extra_bits: int = 0
    scheme: str = ""

    def __post_init__(self):
        if not isinstance(self.shape, tuple) or not self.shape:
            raise ValueError(f"shape must be a non-empty tuple of sizes, got {self.shape!r}")
        for size in self.shape:
            check_int(size, "every size in shape", 1)
        check_int(self.index_bits, "index_bits", 1)
        for name in (
            "lut_count",
            "lut_entries",
            "lut_entry_bits",
            "scale_count",
            "scale_bits",
            "zero_count",
            "zero_bits",
            "extra_bits",
        ):
            check_int(getattr(self, name), name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def table_bits(self) -> int:
        """Everything stored besides the indices: LUTs, scales, zero points, extra bits."""
        return (
            self.lut_count * self.lut_entries * self.lut_entry_bits
            + self.scale_count * self.scale_bits
            + self.zero_count * self.zero_bits
            + self.extra_bits
        )

    @property
    def total_bits(self) -> int:
        return self.numel * self.index_bits + self.table_bits

    @property
    def index_bytes(self) -> int:
        """The indices packed at ``index_bits`` each into whole bytes."""
        return math.ceil(self.numel * self.index_bits / 8)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the stored form: the indices packed into whole bytes, then the tables, scales and zero
        points (what a safetensors checkpoint or a Core ML weight blob holds for this tensor)."""
        return self.index_bytes + math.ceil(self.table_bits / 8)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.numel

    @classmethod
    def uniform(
        cls,
        shape,
        bits: int,
        group_size: Optional[int],
        symmetric: bool,
        scale_bits: int = 16,
        zero_bits: int = 16,
        extra_bits: int = 0,
    ) -> "WeightStorage":
        """Integer codes with a scale (and, if asymmetric, a zero point) per row and group of ``group_size``
        input columns (``None``: one per row). Symmetric codes need no stored zero point (it is ``2**(bits-1)``)."""
        rows, columns = _matrix_shape(shape)
        groups_per_row = 1 if group_size is None else math.ceil(columns / check_int(group_size, "group_size", 1))
        scales = rows * groups_per_row
        grouping = "per output channel" if group_size is None else f"groups of {group_size}"
        return cls(
            tuple(shape),
            bits,
            scale_count=scales,
            scale_bits=scale_bits,
            zero_count=0 if symmetric else scales,
            zero_bits=zero_bits,
            extra_bits=extra_bits,
            scheme=f"{bits}-bit {'sym' if symmetric else 'asym'} uniform, {grouping}",
        )

    @classmethod
    def palettized(
        cls,
        shape,
        bits: int,
        lut_group_size: Optional[int] = None,
        lut_entry_bits: int = 16,
        channel_scale_bits: Optional[int] = None,
    ) -> "WeightStorage":
        """``bits``-bit indices into ``2**bits``-entry LUTs: one LUT per tensor (``lut_group_size=None``) or one
        per ``lut_group_size`` consecutive output channels; optionally a per-output-channel scale."""
        rows, _ = _matrix_shape(shape)
        luts = 1 if lut_group_size is None else math.ceil(rows / check_int(lut_group_size, "lut_group_size", 1))
        grouping = "one LUT per tensor" if lut_group_size is None else f"one LUT per {lut_group_size} rows"
        return cls(
            tuple(shape),
            bits,
            lut_count=luts,
            lut_entries=2**bits,
            lut_entry_bits=lut_entry_bits,
            scale_count=0 if channel_scale_bits is None else rows,
            scale_bits=channel_scale_bits or 16,
            scheme=f"{bits}-bit palette, {grouping}" + ("" if channel_scale_bits is None else ", per-channel scale"),
        )

    def as_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["shape"] = list(self.shape)
        record["bits_per_weight"] = self.bits_per_weight
        return record


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """What a model stores, counted by the rule of this module's docstring.

    Attributes:
        compressed_weights: dense elements of the compressed weights.
        compressed_bits, compressed_bytes: what those weights store (indices, LUTs, scales, zero points).
        model_parameters: the weights of the model: the compressed ones plus every other parameter.
        model_bits, model_bytes: everything the model stores.
        unquantized_bits: the width every other floating-point tensor was counted at (``None``: its own dtype).
        linears: bits per compressed weight (``None`` when nothing is compressed).
        whole_model: bits per weight of the whole model.
    """

    compressed_weights: int
    compressed_bits: int
    compressed_bytes: int
    model_parameters: int
    model_bits: int
    model_bytes: int
    unquantized_bits: Optional[int]
    linears: Optional[float]
    whole_model: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


#: a compressed module's tensors whose names start with this are what its :class:`WeightStorage` describes (the
#: weight or packed indices, and the LUT, scale, centroids and temperature kept with it); a bias is counted apart
COMPRESSED_TENSOR_PREFIX = "weight"


def model_size(
    model,
    storage: Optional[Mapping[str, WeightStorage]] = None,
    unquantized_bits: Optional[int] = None,
    tensor_bits: Optional[Mapping[str, int]] = None,
):
    """The :class:`ModelSize` of ``model`` (a ``torch.nn.Module``) whose modules named in ``storage``
    (``named_modules`` names; default none) store their ``weight`` as described; every other tensor of its
    state dict costs ``tensor_bits[key]`` per element where given (a float part a checkpoint stores in 16 bits),
    else ``unquantized_bits`` if floating point and that is given, else its dtype's width. Tensors shared between
    modules (tied embeddings) count once."""
    storage = {} if storage is None else storage
    if unquantized_bits is not None:
        check_int(unquantized_bits, "unquantized_bits", 1)
    covered: dict = {}  # tensor key -> the module whose description covers it
    compressed_bits = compressed_bytes = compressed_weights = 0
    for name, description in storage.items():
        if not isinstance(description, WeightStorage):
            raise TypeError(f"storage[{name!r}] must be a WeightStorage, got {type(description).__name__}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"storage names module {name!r}, which the model does not have") from None
        weight = getattr(module, "weight", None)
        if weight is None or not hasattr(weight, "numel"):
            raise ValueError(f"module {name!r} has no weight tensor to account for")
        # a palettized module stores its weight packed; it describes the dense shape it stands for
        shape = tuple(getattr(module, "dense_shape", weight.shape))
        if shape != tuple(description.shape):
            raise ValueError(
                f"storage for {name!r} describes shape {description.shape}, but its weight has shape {shape}"
            )
        if _tensor_key(weight) in covered:
            raise ValueError(
                f"modules {covered[_tensor_key(weight)]!r} and {name!r} share one weight; describe it once"
            )
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tensor_name, tensor in tensors:
            if tensor_name.startswith(COMPRESSED_TENSOR_PREFIX):
                covered[_tensor_key(tensor)] = name
        compressed_bits += description.total_bits
        compressed_bytes += description.stored_bytes
        compressed_weights += description.numel
    parameters = {_tensor_key(parameter) for parameter in model.parameters()}
    model_bits, model_bytes, weights, seen = compressed_bits, compressed_bytes, compressed_weights, set(covered)
    tensor_bits = tensor_bits or {}
    for name, tensor in model.state_dict(keep_vars=True).items():  # persistent tensors: what a checkpoint holds
        key = _tensor_key(tensor)
        if key in seen:
            continue
        seen.add(key)
        width = tensor.element_size() * 8
        if name in tensor_bits:
            width = tensor_bits[name]
        elif unquantized_bits is not None and tensor.is_floating_point():
            width = unquantized_bits
        model_bits += tensor.numel() * width
        model_bytes += math.ceil(tensor.numel() * width / 8)
        if key in parameters:
            weights += tensor.numel()
    return ModelSize(
        compressed_weights=compressed_weights,
        compressed_bits=compressed_bits,
        compressed_bytes=compressed_bytes,
        model_parameters=weights,
        model_bits=model_bits,
        model_bytes=model_bytes,
        unquantized_bits=unquantized_bits,
        linears=compressed_bits / compressed_weights if compressed_weights else None,
        whole_model=model_bits / max(weights, 1),
    )


def _tensor_key(tensor):
    """Identifies the memory a tensor stores (two parameters tied to one storage are one tensor)."""
    if tensor.device.type == "meta":
        return id(tensor)
    try:
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
    except (RuntimeError, NotImplementedError):  # a wrapper subclass (a sharded DTensor) has no storage of its own
        return id(tensor)


def _matrix_shape(shape) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D (out_features, in_features) weight shape, got {shape}")
    return shape
