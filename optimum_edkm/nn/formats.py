"""The descriptions shared by the module classes: how a weight is stored (:class:`PaletteFormat`), a stored
palettized weight itself (:class:`Palette`), and how a train-time module clusters (:class:`ClusteringOptions`).

Temperatures: ``ClusteringOptions.relative_temperature`` (``EDKMConfig.temperature`` in a checkpoint's config) is
relative to the squared centroid spacing; each module turns it into the absolute temperature it keeps in its
``weight_temperature`` buffer and hands the engine as ``ClusteringSpec.temperature``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..clustering import ClusteringSpec, pack_indices, unpack_indices
from ..storage import WeightStorage

LUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclasses.dataclass(frozen=True)
class PaletteFormat:
    """How one weight is stored once palettized (what a checkpoint holds for it).

    bits: index width; each LUT has ``2**bits`` entries.
    group_size: ``None`` for one LUT per tensor, else one LUT per ``group_size`` consecutive output channels.
    per_channel_scale: a scale per output channel is stored next to the LUT.
    lut_dtype: dtype of the LUT and the scale.
    """

    bits: int
    group_size: Optional[int] = None
    per_channel_scale: bool = False
    lut_dtype: torch.dtype = torch.float16

    def groups(self, out_channels: int) -> int:
        return 1 if self.group_size is None else out_channels // self.group_size

    def storage(self, shape: tuple) -> WeightStorage:
        """What a ``(out, in)`` weight stores in this format: the one description size accounting reads."""
        entry_bits = torch.finfo(self.lut_dtype).bits
        return WeightStorage.palettized(
            tuple(shape), self.bits, self.group_size, entry_bits, entry_bits if self.per_channel_scale else None
        )


@dataclasses.dataclass(frozen=True)
class Palette:
    """One palettized weight as stored: ``dense[r, c] = scale[r] * lut[r // group_size, index[r, c]]``.

    As torchao's codebook-quantized tensor (codes, codebook, block size): the record the readers of a palettized
    module work from (the Core ML export, its verifier and manifest) and whose :meth:`storage` the size accounting
    counts. The tensors are the module's own buffers, not copies.

    Attributes:
        format: bits, LUT grouping (``group_size`` output channels per LUT), per-channel scale, LUT dtype.
        shape: ``(out_channels, in_channels)`` of the dense weight.
        packed: uint8, the n-bit indices packed row-major, LSB first (the checkpoint's ``weight``).
        lut: ``[groups, 2**bits]`` (``weight_lut``).
        scale: ``[out_channels]`` (``weight_scale``), or ``None``.
    """

    format: PaletteFormat
    shape: tuple
    packed: torch.Tensor
    lut: torch.Tensor
    scale: Optional[torch.Tensor] = None

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def group_size(self) -> Optional[int]:
        return self.format.group_size

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def in_channels(self) -> int:
        return self.shape[1]

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def groups(self) -> int:
        return int(self.lut.shape[0])

    @property
    def entries(self) -> int:
        return int(self.lut.shape[1])

    def storage(self) -> WeightStorage:
        return self.format.storage(self.shape)

    def indices(self) -> torch.Tensor:
        """The unpacked uint8 ``[out, in]`` LUT index of every weight."""
        return unpack_indices(self.packed, self.bits, self.numel).view(self.shape)

    @classmethod
    def from_indices(
        cls, format: PaletteFormat, indices: torch.Tensor, lut: torch.Tensor, scale: Optional[torch.Tensor] = None
    ) -> "Palette":
        """The record of ``[out, in]`` integer ``indices`` into ``lut`` (times ``scale``): the indices are packed,
        the LUT and scale rounded to ``format.lut_dtype`` as a checkpoint stores them."""
        packed = pack_indices(indices.to(torch.uint8), format.bits)
        scale = None if scale is None else scale.to(format.lut_dtype)
        return cls(format, tuple(indices.shape), packed, lut.to(format.lut_dtype), scale)


@dataclasses.dataclass(frozen=True)
class ClusteringOptions:
    """How a train-time module clusters its weight (the absolute temperature is set from the weight itself).

    relative_temperature: softmax temperature relative to the squared mean spacing of neighbouring centroids at
        initialisation.
    iterations, tolerance: differentiable centroid updates per forward pass, and their early stop.
    uniquify: eDKM (cluster distinct 16-bit values) instead of plain DKM.
    """

    relative_temperature: float = 0.01
    iterations: int = 3
    tolerance: float = 0.0
    uniquify: bool = True

    def spec(self, palette: PaletteFormat) -> ClusteringSpec:
        return ClusteringSpec(
            bits=palette.bits,
            group_size=palette.group_size,
            iterations=self.iterations,
            tolerance=float(self.tolerance),
        )
