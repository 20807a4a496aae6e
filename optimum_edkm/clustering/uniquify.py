"""Uniquification: the distinct values of each group, their counts, and where each weight points.

A 16-bit tensor holds at most 65,536 distinct values, so the DKM attention map over distinct values is
at most 65,536 x k, whatever the size of the tensor. The distinct values are found by counting bit
patterns with ``bincount`` (no sort).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .spec import UNIQUE_DTYPES

PATTERNS = 1 << 16
# Above this many (group, distinct value) bins, counting per group with bincount would need more memory than
# sorting the per-weight keys, so torch.unique is used instead (many small groups, e.g. one per channel).
_MAX_DENSE_BINS = 1 << 25


@dataclass
class UniqueValues:
    """Distinct (group, value) pairs of a ``[groups, n]`` tensor, pairs sorted by group.

    values: (P,) the distinct value of each pair, in the compute dtype.
    counts: (P,) how many weights of the group hold that value (compute dtype, exact integers).
    group:  (P,) int64 group of each pair.
    index:  (groups * n,) pair of each weight, row-major over ``[groups, n]`` (int32 below 2**31 weights).
    """

    values: torch.Tensor
    counts: torch.Tensor
    group: torch.Tensor
    index: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.values.numel()


def bit_patterns(values: torch.Tensor) -> torch.Tensor:
    """The 16-bit pattern of each bf16/fp16 value as an int32 in [0, 65536)."""
    return values.contiguous().view(torch.int16).to(torch.int32).bitwise_and_(PATTERNS - 1)


def index_dtype(numel: int) -> torch.dtype:
    """int32 per-weight indices halve the transient memory of the gathers; int64 only for huge tensors."""
    return torch.int32 if numel < 2**31 else torch.int64


@lru_cache(maxsize=16)
def _pattern_table(dtype: torch.dtype, device: torch.device, compute: torch.dtype) -> torch.Tensor:
    codes = torch.arange(PATTERNS, dtype=torch.int32, device=device)
    codes = torch.where(codes >= PATTERNS // 2, codes - PATTERNS, codes).to(torch.int16)
    table = codes.view(dtype).to(compute)
    # NaN/Inf patterns never occur in checked weights; zero them so the table is safe to reduce over.
    return torch.where(torch.isfinite(table), table, torch.zeros_like(table))


@lru_cache(maxsize=16)
def _nonfinite_patterns(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    codes = torch.arange(PATTERNS, dtype=torch.int32, device=device)
    codes = torch.where(codes >= PATTERNS // 2, codes - PATTERNS, codes).to(torch.int16)
    return (~torch.isfinite(codes.view(dtype))).nonzero().squeeze(1)


def nonfinite_patterns(dtype: torch.dtype, device) -> torch.Tensor:
    """int64 patterns of a 16-bit ``dtype`` that stand for NaN or +-Inf."""
    return _nonfinite_patterns(dtype, torch.device(device))


def pattern_values(dtype: torch.dtype, device, compute: torch.dtype) -> torch.Tensor:
    """Value of every 16-bit pattern of ``dtype`` (index = pattern), in ``compute`` dtype."""
    return _pattern_table(dtype, torch.device(device), compute)


@torch.no_grad()
def uniquify(values: torch.Tensor, compute: torch.dtype, name: str = "weight") -> UniqueValues:
    """Distinct values per row of ``values`` (shape ``[groups, n]``), with counts and per-weight index.

    16-bit ``values`` come from finite weights (checked before); a NaN/Inf pattern among them is a value that
    overflowed the 16-bit clustering dtype when it was rounded to it: raises ``ValueError`` naming ``name``.
    """
    groups = values.shape[0]
    if values.dtype in UNIQUE_DTYPES:
        return _uniquify_patterns(values, compute, name)
    return _uniquify_sorted(values.to(compute), groups)


def _raise_overflow(overflowed: int, dtype: torch.dtype, name: str) -> None:
    if overflowed:
        raise ValueError(
            f"'{name}' has {overflowed} value(s) that overflow {dtype} (largest finite magnitude "
            f"{torch.finfo(dtype).max:.4g}) once rounded to the clustering dtype (divided by their channel's scale, "
            f"if any); clustering would treat them as 0. Use a per-channel scale, or unique_dtype=torch.bfloat16 "
            f"(fp32 range)"
        )


def check_rounded(values: torch.Tensor, name: str = "weight") -> None:
    """16-bit clustered values of finite weights: a NaN/Inf among them overflowed the 16-bit dtype when rounded to
    it; raises ``ValueError`` naming ``name``."""
    _raise_overflow(int((~torch.isfinite(values)).sum()), values.dtype, name)


def _uniquify_patterns(values: torch.Tensor, compute: torch.dtype, name: str) -> UniqueValues:
    groups = values.shape[0]
    device = values.device
    idx_dtype = index_dtype(values.numel())
    patterns = bit_patterns(values).reshape(-1)
    pattern_counts = torch.bincount(patterns, minlength=PATTERNS)
    _raise_overflow(int(pattern_counts[nonfinite_patterns(values.dtype, device)].sum()), values.dtype, name)
    present = pattern_counts > 0
    slot = (present.cumsum(0) - 1).to(torch.int32)
    table = pattern_values(values.dtype, device, compute)[present]
    index = slot[patterns].to(idx_dtype)
    del patterns
    if groups == 1:
        return UniqueValues(
            values=table,
            counts=pattern_counts[present].to(compute),
            group=torch.zeros(table.numel(), dtype=torch.int64, device=device),
            index=index,
        )
    distinct = table.numel()
    keys = index.view(groups, -1).to(torch.int64)
    keys = (keys + torch.arange(groups, device=device).unsqueeze(1) * distinct).reshape(-1)
    if groups * distinct <= _MAX_DENSE_BINS:
        key_counts = torch.bincount(keys, minlength=groups * distinct)
        key_present = key_counts > 0
        pair_keys = key_present.nonzero().squeeze(1)
        index = (key_present.cumsum(0) - 1).to(idx_dtype)[keys]
        counts = key_counts[key_present]
    else:
        pair_keys, index, counts = torch.unique(keys, sorted=True, return_inverse=True, return_counts=True)
        index = index.to(idx_dtype)
    return UniqueValues(
        values=table[pair_keys % distinct],
        counts=counts.to(compute),
        group=pair_keys // distinct,
        index=index,
    )


def _uniquify_sorted(values: torch.Tensor, groups: int) -> UniqueValues:
    flat = values.reshape(-1)
    if groups == 1:
        uniq, index, counts = torch.unique(flat, sorted=True, return_inverse=True, return_counts=True)
        return UniqueValues(
            values=uniq,
            counts=counts.to(values.dtype),
            group=torch.zeros(uniq.numel(), dtype=torch.int64, device=values.device),
            index=index,
        )
    group_of = torch.arange(groups, device=values.device, dtype=values.dtype).repeat_interleave(values.shape[1])
    pairs, index, counts = torch.unique(
        torch.stack([group_of, flat], 1), dim=0, sorted=True, return_inverse=True, return_counts=True
    )
    return UniqueValues(
        values=pairs[:, 1].contiguous(), counts=counts.to(values.dtype), group=pairs[:, 0].to(torch.int64), index=index
    )
