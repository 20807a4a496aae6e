"""One weight's palettization as tensors: the LUT, each weight's index and the optional per-channel scale.

What a post-training method produces and what a train-time module can start from
(:meth:`~optimum_edkm.nn.ClusteredModule.start_from`, ``optimum_edkm.prepare(..., palettes=...)``), so that
eDKM fine-tuning continues from that model instead of redoing k-means.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Palette(NamedTuple):
    """One weight's palettization.

    Attributes:
        lut: ``[groups, 2**bits]`` LUT entries (one row per LUT group, as ``weight_centroids``).
        indices: ``[out, in]`` integer LUT index of every weight (output channels on dim 0), or ``None``: only the
            LUT is given and the weights keep their values (snapping then picks the nearest entry).
        scale: ``[out]`` per-channel scale, or ``None`` for a module without one.
        values: ``[out, in]`` what each weight should hold when its decoded value would snap to another entry
            (two LUT entries closer than the 16-bit rounding of the clustered values), e.g. the value a GPTQ pass
            rounded; ``None``: the decoded values only.
    """

    lut: torch.Tensor
    indices: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
