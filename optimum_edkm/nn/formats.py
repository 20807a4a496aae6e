"""Small descriptions shared by the module classes: how a weight is stored, and how it is clustered."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..clustering import ClusteringSpec

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
