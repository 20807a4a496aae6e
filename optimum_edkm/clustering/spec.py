"""What to cluster and how: one validated, immutable description shared by every engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..validation import is_int, is_number

MAX_BITS = 8
#: 16-bit dtypes whose bit patterns can index distinct values (2**16 patterns at most).
UNIQUE_DTYPES = (torch.bfloat16, torch.float16)


def check_bits(bits, what: str = "bits") -> int:
    if not is_int(bits) or not 1 <= bits <= MAX_BITS:
        raise ValueError(
            f"{what} must be an integer from 1 to {MAX_BITS} (2 to {2**MAX_BITS} clusters), got {bits!r}; "
            f"palettized weights index a look-up table with at most 8-bit indices"
        )
    return bits


@dataclass(frozen=True)
class ClusteringSpec:
    """Hyper-parameters of (e)DKM for one weight tensor.

    Args:
        bits: index width; the look-up table has ``2**bits`` centroids.
        group_size: ``None`` for one LUT per tensor, otherwise the number of consecutive output channels
            (rows, dim 0) sharing one LUT ("per grouped channel").
        temperature: softmax temperature ``tau`` applied to the *squared* distance, in the units of the
            clustered values (after division by the per-channel scale, if one is used).
        iterations: maximum number of differentiable centroid updates per forward pass.
        tolerance: stop iterating once no centroid moved by more than this (absolute, same units as the
            values); ``0`` always runs ``iterations`` updates.
        unique_dtype: 16-bit dtype through which fp32/fp64 values are rounded so that eDKM can work on at most
            65,536 distinct values. bf16/fp16 weights always use their own bit patterns. ``None`` clusters the
            exact values (distinct values found with ``torch.unique``; slower, and no memory guarantee).
    """

    bits: int
    group_size: Optional[int] = None
    temperature: float = 1e-4
    iterations: int = 3
    tolerance: float = 0.0
    unique_dtype: Optional[torch.dtype] = torch.bfloat16

    def __post_init__(self):
        check_bits(self.bits)
        if self.group_size is not None and (not is_int(self.group_size) or self.group_size < 1):
            raise ValueError(
                f"group_size must be a positive integer (output channels per LUT) or None for one LUT per "
                f"tensor, got {self.group_size!r}"
            )
        if not is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not is_int(self.iterations) or self.iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {self.iterations!r}")
        if not is_number(self.tolerance) or self.tolerance < 0:
            raise ValueError(f"tolerance must be a finite number >= 0, got {self.tolerance!r}")
        if self.unique_dtype is not None and self.unique_dtype not in UNIQUE_DTYPES:
            raise ValueError(f"unique_dtype must be torch.bfloat16, torch.float16 or None, got {self.unique_dtype!r}")

    @property
    def num_clusters(self) -> int:
        return 2**self.bits
