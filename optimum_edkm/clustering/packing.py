"""n-bit packing of LUT indices: a row-major, LSB-first bit stream (the layout Core ML's blobs use).

Index ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream; bit ``b`` of the stream is bit ``b % 8`` of
byte ``b // 8``. Eight indices always fill exactly ``bits`` bytes, so packing works on blocks of eight.
"""

from __future__ import annotations

import math

import torch

from .spec import check_bits


def packed_size(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` indices of ``bits`` bits."""
    check_bits(bits)
    return math.ceil(numel * bits / 8)


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices in ``[0, 2**bits)`` (any shape, row-major) into a flat uint8 tensor."""
    check_bits(bits)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    flat = indices.reshape(-1).to(torch.int64)
    numel = flat.numel()
    if numel and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(
            f"indices must lie in [0, {2**bits}) for {bits}-bit packing, got values in "
            f"[{int(flat.min())}, {int(flat.max())}]"
        )
    if bits == 8:
        return flat.to(torch.uint8)
    blocks = torch.nn.functional.pad(flat, (0, (-numel) % 8)).view(-1, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    words = (blocks << shifts).sum(1)  # 8 indices -> 8*bits bits
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    packed = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_size(numel, bits)]


def unpack_indices(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: ``numel`` uint8 indices from a flat uint8 tensor."""
    check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed indices must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    expected = packed_size(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"{numel} indices of {bits} bits need {expected} packed bytes, got {packed.numel()}; the tensor "
            f"is truncated or was packed with another bit width"
        )
    if bits == 8:
        return packed.clone()
    padded = torch.nn.functional.pad(packed.to(torch.int64), (0, (-packed.numel()) % bits)).view(-1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    words = (padded << byte_shifts).sum(1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    indices = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return indices.reshape(-1)[:numel].to(torch.uint8)
