"""Fair size accounting: effective bits per weight, counting every scale, zero point, look-up table and every
weight that was left uncompressed.

Each compressed weight tensor is described by a :class:`WeightStorage` (what a deployable format has to store
for it), and :func:`effective_bits` turns a model plus those descriptions into two numbers:

* bits per weight over the compressed tensors only (``"linears"``), e.g. 3-bit RTN/GPTQ/AWQ with groups of
  128 and an fp16 scale and fp16 zero point per group costs ``3 + 32/128 = 3.25`` bits; a 3-bit palette with one
  fp16 look-up table per tensor costs ``3 + 8*16/numel`` bits, and one table per group of output channels
  ``3 + groups*2**bits*16/numel``;
* bits per parameter of the whole model, where every parameter outside those tensors (embeddings, norms,
  biases, the LM head unless compressed) costs ``unquantized_bits`` (16 by default: a half-precision
  deployment). Parameters shared between modules (tied embeddings) are counted once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional

import torch


def _check_count(value, what: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


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
            _check_count(size, "every size in shape", 1)
        _check_count(self.index_bits, "index_bits", 1)
        for name in ("lut_count", "lut_entries", "lut_entry_bits", "scale_count", "scale_bits", "zero_count",
                     "zero_bits", "extra_bits"):
            _check_count(getattr(self, name), name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def total_bits(self) -> int:
        return (self.numel * self.index_bits + self.lut_count * self.lut_entries * self.lut_entry_bits
                + self.scale_count * self.scale_bits + self.zero_count * self.zero_bits + self.extra_bits)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.numel

    @classmethod
    def uniform(cls, shape, bits: int, group_size: Optional[int], symmetric: bool, scale_bits: int = 16,
                zero_bits: int = 16, extra_bits: int = 0) -> "WeightStorage":
        """Integer codes with a scale (and, if asymmetric, a zero point) per row and group of ``group_size``
        input columns (``None``: one per row). Symmetric codes need no stored zero point (it is ``2**(bits-1)``)."""
        rows, columns = _matrix_shape(shape)
        groups_per_row = 1 if group_size is None else math.ceil(columns / _check_count(group_size, "group_size", 1))
        scales = rows * groups_per_row
        grouping = "per output channel" if group_size is None else f"groups of {group_size}"
        return cls(tuple(shape), bits, scale_count=scales, scale_bits=scale_bits,
                   zero_count=0 if symmetric else scales, zero_bits=zero_bits, extra_bits=extra_bits,
                   scheme=f"{bits}-bit {'sym' if symmetric else 'asym'} uniform, {grouping}")

    @classmethod
    def palettized(cls, shape, bits: int, lut_group_size: Optional[int] = None, lut_entry_bits: int = 16,
                   channel_scale_bits: Optional[int] = None) -> "WeightStorage":
        """``bits``-bit indices into ``2**bits``-entry LUTs: one LUT per tensor (``lut_group_size=None``) or one
        per ``lut_group_size`` consecutive output channels; optionally a per-output-channel scale."""
        rows, _ = _matrix_shape(shape)
        luts = 1 if lut_group_size is None else math.ceil(rows / _check_count(lut_group_size, "lut_group_size", 1))
        grouping = "one LUT per tensor" if lut_group_size is None else f"one LUT per {lut_group_size} rows"
        return cls(tuple(shape), bits, lut_count=luts, lut_entries=2 ** bits, lut_entry_bits=lut_entry_bits,
                   scale_count=0 if channel_scale_bits is None else rows, scale_bits=channel_scale_bits or 16,
                   scheme=f"{bits}-bit palette, {grouping}"
                          + ("" if channel_scale_bits is None else ", per-channel scale"))

    def as_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["shape"] = list(self.shape)
        record["bits_per_weight"] = self.bits_per_weight
        return record


@dataclasses.dataclass(frozen=True)
class BitsReport:
    """Effective bits per weight; ``linears`` is ``None`` when nothing was compressed."""

    linears: Optional[float]
    whole_model: float
    compressed_weights: int
    model_parameters: int
    compressed_bits: int
    model_bits: int
    unquantized_bits: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def effective_bits(model: torch.nn.Module, storage: Mapping[str, WeightStorage],
                   unquantized_bits: int = 16) -> BitsReport:
    """Effective bits per weight of ``model`` whose modules named in ``storage`` (``named_modules`` names) have
    their ``weight`` stored as described; every other parameter costs ``unquantized_bits``."""
    _check_count(unquantized_bits, "unquantized_bits", 1)
    compressed: dict[int, str] = {}
    compressed_bits = compressed_weights = 0
    for name, description in storage.items():
        if not isinstance(description, WeightStorage):
            raise TypeError(f"storage[{name!r}] must be a WeightStorage, got {type(description).__name__}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"storage names module {name!r}, which the model does not have") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"module {name!r} has no weight tensor to account for")
        # a palettized module stores its weight packed; it describes the dense shape it stands for
        shape = tuple(getattr(module, "dense_shape", weight.shape))
        if shape != tuple(description.shape):
            raise ValueError(f"storage for {name!r} describes shape {description.shape}, but its weight has shape "
                             f"{shape}")
        if id(weight) in compressed:
            raise ValueError(f"modules {compressed[id(weight)]!r} and {name!r} share one weight; describe it once")
        compressed[id(weight)] = name
        compressed_bits += description.total_bits
        compressed_weights += description.numel
    # a compressed weight counts through its description: a palettized module holds it as a packed buffer, which
    # model.parameters() does not yield
    model_bits, parameters = compressed_bits, compressed_weights
    for parameter in model.parameters():  # yields a shared (tied) parameter once
        if id(parameter) not in compressed:
            parameters += parameter.numel()
            model_bits += parameter.numel() * unquantized_bits
    return BitsReport(
        linears=compressed_bits / compressed_weights if compressed_weights else None,
        whole_model=model_bits / parameters,
        compressed_weights=compressed_weights,
        model_parameters=parameters,
        compressed_bits=compressed_bits,
        model_bits=model_bits,
        unquantized_bits=unquantized_bits,
    )


def palettized_storage(model: torch.nn.Module) -> dict:
    """``{module name: WeightStorage}`` of every palettized module of ``model`` (after
    :func:`optimum_edkm.palettize`): its index width, LUT grouping, LUT dtype and per-channel scale, read from
    the module itself. Feeds :func:`effective_bits`."""
    from ..modules import PALETTIZED_TYPES

    return {name: WeightStorage.palettized(
                (m.out_channels, m.in_channels), m.bits, m.group_size,
                lut_entry_bits=torch.finfo(m.weight_lut.dtype).bits,
                channel_scale_bits=None if m.weight_scale is None else torch.finfo(m.weight_scale.dtype).bits)
            for name, m in model.named_modules() if isinstance(m, PALETTIZED_TYPES)}


def _matrix_shape(shape) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D (out_features, in_features) weight shape, got {shape}")
    return shape
