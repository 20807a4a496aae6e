"""eDKM's per-weight passes keyed by 16-bit bit patterns, in torch, and the loader of the compiled kernel.

Every weight maps to a *key* ``group * 65536 + pattern``, the 16-bit pattern of its clustered value (the weight,
divided by its row's scale, rounded to bf16/fp16). The distinct keys ("pairs", increasing) replace the
compacted distinct-value index of :func:`~optimum_edkm.clustering.uniquify`: the forward pass counts the keys
and writes each weight's clustered value from a per-pair table; the backward pass sums the output gradient per
key and writes each weight's gradient from two per-pair tables. The key is recomputed from the weight in each
pass, which costs less than storing (and re-reading) a per-weight index.

:class:`TorchPatternOps` runs these passes on any device (the torch path with few LUT groups, see ``edkm._plan``).
The compiled kernel (:func:`compiled_ops`, ``optimum_edkm/clustering/csrc/``) does the same per group, in tables
indexed by pattern that only the group's weights touch, with the DKM in between.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .uniquify import PATTERNS, bit_patterns, nonfinite_patterns

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SOURCES = ("edkm_groups.cpp", "edkm_bindings.cpp")
#: key-indexed tables are ``groups * 65536`` long; above this many entries other paths run (see ``edkm._plan``)
MAX_DENSE_KEYS = 1 << 25
_KIND = {torch.bfloat16: 0, torch.float16: 1}
_PATTERN_DTYPE = {0: torch.bfloat16, 1: torch.float16}


class TorchPatternOps:
    """The pattern-keyed passes in torch (any device and dtype).

    ``weight`` is contiguous with output channels on dim 0, ``scale`` (optional) a contiguous ``[rows]`` tensor in
    the table dtype, ``kind`` 0 for bf16 patterns and 1 for fp16; keys come back as int64, increasing.
    """

    @staticmethod
    def keys(weight: torch.Tensor, scale: Optional[torch.Tensor], groups: int, kind: int) -> torch.Tensor:
        """int32 key of every weight, row-major."""
        rows = weight.shape[0]
        values = weight.reshape(rows, -1)
        if scale is not None:
            values = values.to(scale.dtype) / scale.unsqueeze(1)
        patterns = bit_patterns(values.to(_PATTERN_DTYPE[kind]))
        if groups > 1:
            offsets = torch.arange(groups, dtype=torch.int32, device=weight.device) * PATTERNS
            patterns = patterns.view(groups, -1).add_(offsets.unsqueeze(1))
        return patterns.reshape(-1)

    @staticmethod
    def _expand(keys: torch.Tensor, per_pair: torch.Tensor, groups: int) -> torch.Tensor:
        table = torch.zeros(groups * PATTERNS, dtype=per_pair.dtype, device=per_pair.device)
        return table.index_copy_(0, keys, per_pair)

    @classmethod
    def count_pairs(cls, weight, scale, groups: int, kind: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Distinct keys, how many weights hold each, and how many weights fell on NaN/Inf patterns."""
        counts = torch.bincount(cls.keys(weight, scale, groups, kind), minlength=groups * PATTERNS)
        bad = nonfinite_patterns(_PATTERN_DTYPE[kind], counts.device)
        nonfinite = int(counts.view(groups, PATTERNS).index_select(1, bad).sum())
        keys = counts.nonzero().squeeze(1)
        return keys, counts[keys], nonfinite

    @classmethod
    def gather_pairs(cls, weight, scale, groups: int, kind: int, keys, table) -> torch.Tensor:
        """``table[pair of the weight's key] * scale[row]`` per weight, in the weight's dtype."""
        out = cls._expand(keys, table, groups)[cls.keys(weight, scale, groups, kind)].view(weight.shape[0], -1)
        if scale is not None:
            out = out * scale.unsqueeze(1)
        return out.view(weight.shape).to(weight.dtype)

    @classmethod
    def sum_pairs(cls, weight, scale, groups: int, kind: int, grad) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distinct keys, their counts, and the sum of ``grad * scale[row]`` over the weights of each."""
        keys = cls.keys(weight, scale, groups, kind)
        grad = grad.reshape(weight.shape[0], -1).to(table_dtype(weight))
        if scale is not None:
            grad = grad * scale.unsqueeze(1)
        counts = torch.bincount(keys, minlength=groups * PATTERNS)
        sums = torch.bincount(keys, weights=grad.reshape(-1), minlength=groups * PATTERNS)
        present = counts.nonzero().squeeze(1)
        return present, counts[present], sums[present]

    @classmethod
    def weight_grad_pairs(cls, weight, scale, groups: int, kind: int, grad, keys, local, shift) -> torch.Tensor:
        """``(local[pair] * grad * scale[row] + shift[pair]) / scale[row]`` per weight, in the weight's dtype."""
        key = cls.keys(weight, scale, groups, kind)
        grad = grad.reshape(weight.shape[0], -1).to(local.dtype)
        if scale is not None:
            grad = grad * scale.unsqueeze(1)
        out = cls._expand(keys, local, groups)[key].view_as(grad).mul_(grad)
        out.add_(cls._expand(keys, shift, groups)[key].view_as(grad))
        if scale is not None:
            out = out / scale.unsqueeze(1)
        return out.view(weight.shape).to(weight.dtype)


def table_dtype(weight: torch.Tensor) -> torch.dtype:
    """dtype of the key-indexed tables and of the per-weight arithmetic: fp64 for fp64 weights, else fp32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def pattern_kind(dtype: torch.dtype) -> int:
    """The ``kind`` argument of the passes for a 16-bit pattern dtype."""
    return _KIND[dtype]


def compiled_ops():
    """The compiled CPU kernel of the engine (``groups_forward`` / ``groups_backward``: all of eDKM per LUT group), or
    ``None`` when it cannot be built (or kernels are disabled with ``OPTIMUM_EDKM_DISABLE_KERNELS=1``)."""
    # the kernel loader imports nothing but torch: no dependency of the engine on the layers above it
    from ..extensions import load_extension

    return load_extension("edkm", _SOURCES, ("-ffp-contract=off",), directory=_CSRC)
