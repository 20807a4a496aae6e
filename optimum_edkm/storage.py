"""What a compressed weight tensor stores: one description that size reports, checkpoints, the quality
benchmark and the Core ML export all read (pure Python).

Every palettized or clustered module describes its packed form with :meth:`storage` (a :class:`WeightStorage`);
the baselines describe their integer codes the same way, so bits per weight are always counted alike: indices,
every LUT, scale and zero point included.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

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
    def total_bits(self) -> int:
        return (
            self.numel * self.index_bits
            + self.lut_count * self.lut_entries * self.lut_entry_bits
            + self.scale_count * self.scale_bits
            + self.zero_count * self.zero_bits
            + self.extra_bits
        )

    @property
    def stored_bytes(self) -> int:
        """Bytes of the stored form: the indices packed into whole bytes, then the tables, scales and zero
        points (what a safetensors checkpoint or a Core ML weight blob holds for this tensor)."""
        tables = (
            self.lut_count * self.lut_entries * self.lut_entry_bits
            + self.scale_count * self.scale_bits
            + self.zero_count * self.zero_bits
            + self.extra_bits
        )
        return math.ceil(self.numel * self.index_bits / 8) + math.ceil(tables / 8)

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


def _matrix_shape(shape) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D (out_features, in_features) weight shape, got {shape}")
    return shape
