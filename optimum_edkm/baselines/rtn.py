"""Round-to-nearest (RTN): every decoder linear rounded group-wise to its own min-max grid, no calibration data.

The grid is the one of GPTQ's ``quant.py`` (see :mod:`optimum_edkm.baselines.quantizer`); the same rounding is
what GPTQ applies column by column and what AWQ applies after scaling and clipping, so the three baselines
differ only in the algorithm, never in the number format.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..calibration import decoder_layers, module_names, named_linears, weight_rows
from ..storage import WeightStorage
from .quantizer import check_bits_and_group, quantize_groupwise
from .result import BaselineResult


@torch.no_grad()
def rtn(model: torch.nn.Module, bits: int, group_size: Optional[int] = 128, symmetric: bool = False) -> BaselineResult:
    """Fake-quantize, in place, every linear (``nn.Linear``, ``Conv1D``) of the decoder layers (embeddings and
    LM head stay).

    Args:
        bits: code width.
        group_size: input columns per scale/zero (``None``: one per output channel).
        symmetric: symmetric grid (no stored zero point) instead of min-max with a zero point.
    """
    check_bits_and_group(bits, group_size)
    names = module_names(model)
    storage = {}
    for layer in decoder_layers(model):
        for linear in named_linears(layer).values():
            rows = weight_rows(linear)
            rows.copy_(quantize_groupwise(rows, bits, group_size, symmetric))
            storage[names[id(linear)]] = WeightStorage.uniform(tuple(rows.shape), bits, group_size, symmetric)
    return BaselineResult(
        storage=storage,
        settings={"symmetric": symmetric},
    )
