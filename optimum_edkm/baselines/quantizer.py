"""The uniform min-max quantizer shared by RTN, GPTQ and AWQ (the semantics of GPTQ's ``quant.py``).

For each row and group of input columns, with ``maxq = 2**bits - 1``:

* ``xmin = min(min(x), 0)``, ``xmax = max(max(x), 0)`` (the range always contains 0);
* symmetric: ``xmax = max(-xmin, xmax)``, ``xmin = -xmax``, zero point ``(maxq + 1) / 2`` (a constant, not stored);
* asymmetric: zero point ``round(-xmin / scale)`` (an integer code, stored per group);
* ``scale = (xmax - xmin) / maxq`` (an all-zero group uses the range [-1, 1]);
* ``q = clamp(round(x / scale) + zero, 0, maxq)``, de-quantized ``scale * (q - zero)``.

Because the range contains 0, padding a short last group with zero columns changes nothing; that is how a
group size that does not divide the number of columns is handled.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

MAX_BITS = 8


class QuantParams(NamedTuple):
    """Per-row (and per-group) scale and zero point, broadcastable against the quantized values."""

    scale: torch.Tensor
    zero: torch.Tensor
    maxq: int


def check_bits_and_group(bits, group_size) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from 1 to {MAX_BITS}, got {bits!r}")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise ValueError(
            f"group_size must be a positive integer (input columns per scale) or None for one scale per output "
            f"channel, got {group_size!r}"
        )


def minmax_params(x: torch.Tensor, bits: int, symmetric: bool) -> QuantParams:
    """Scale and zero point over the last dimension of ``x`` (one pair per leading index)."""
    maxq = 2**bits - 1
    zeros = torch.zeros((), dtype=x.dtype, device=x.device)
    xmin = torch.minimum(x.amin(-1, keepdim=True), zeros)
    xmax = torch.maximum(x.amax(-1, keepdim=True), zeros)
    if symmetric:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return QuantParams(scale, zero, maxq)


def fake_quantize(x: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """Round ``x`` to the grid of ``params`` and de-quantize."""
    # clamp(round(x/scale) + zero, 0, maxq) - zero, in fewer passes: the zero point is a whole number
    return torch.clamp(torch.round(x / params.scale), -params.zero, params.maxq - params.zero) * params.scale


def quantize_groupwise(weight: torch.Tensor, bits: int, group_size: Optional[int], symmetric: bool) -> torch.Tensor:
    """Round-to-nearest of a 2-D weight with one scale/zero per row and group of ``group_size`` columns
    (``None``: per row); returns the de-quantized weight (same dtype)."""
    check_bits_and_group(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    size = columns if group_size is None else group_size
    work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    padding = (-columns) % size
    grouped = torch.nn.functional.pad(work, (0, padding)).view(rows, -1, size)
    quantized = fake_quantize(grouped, minmax_params(grouped, bits, symmetric))
    return quantized.view(rows, -1)[:, :columns].to(weight.dtype)
